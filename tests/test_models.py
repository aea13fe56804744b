"""Backbone registry, embedder contract, heads and checkpoints; every family offline on tiny random architectures."""
from __future__ import annotations

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from guie.models import (
    MAX_EMBED_DIM,
    ProjectionHead,
    create_backbone,
    create_embedder,
    fit_pca,
    load_embedder,
    resolve_embedder,
    save_embedder,
)
from guie.models.efficientnet_lite import lite0_weights_path, lukemelas_to_timm
from model_fixtures import register_tiny_open_clip

TINY_CLIP = "guie-test-tiny-vit"


@pytest.fixture(scope="module")
def lite0():
    """The offline default, pretrained, without a head (raw 1280-d features)."""
    return create_embedder("efficientnet_lite0", embed_dim=None).eval()


@pytest.fixture(scope="module")
def lite0_state():
    return torch.load(lite0_weights_path(), map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def tiny_clip_config(tmp_path_factory):
    """Register a tiny OpenCLIP architecture (32 px, patch 8, width 32, 2 layers, 16-d CLIP space)."""
    return register_tiny_open_clip(tmp_path_factory.mktemp("open_clip_cfg"), TINY_CLIP, embed_dim=16, width=32,
                                   head_width=16, layers=2, text_width=16, vocab_size=64)


def _images(n=2, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g)


# --- the offline default is really pretrained ------------------------------------------------------------------

@pytest.mark.parametrize("picture, accepted, required", [("chelsea", {281, 282, 285}, {281, 282, 285}),
                                                         ("coffee", {967}, {967})])
def test_default_backbone_is_pretrained_on_imagenet(lite0, lite0_state, picture, accepted, required):
    """A real photo goes through the embedder's own preprocessing and features, then the package's ImageNet
    classifier (`_fc`): the cat is a tabby/tiger/Egyptian cat (281/282/285), the coffee an espresso (967)."""
    skdata = pytest.importorskip("skimage.data")
    image = Image.fromarray(getattr(skdata, picture)())
    x = lite0.transform(image)[None]
    assert x.dtype == torch.uint8 and x.shape == (1, 3, 224, 224)
    with torch.inference_mode():
        logits = lite0.forward_features(x) @ lite0_state["_fc.weight"].T + lite0_state["_fc.bias"]
    top5 = logits[0].topk(5).indices.tolist()
    assert top5[0] in accepted, top5
    assert required <= set(top5), top5


def test_default_preprocessing_is_that_of_the_weights(lite0):
    pre = lite0.preprocess
    assert (pre.mean, pre.std, pre.interpolation, pre.image_size) == ((0.5,) * 3, (0.5,) * 3, "bicubic", 224)
    assert lite0.backbone.num_features == 1280


def test_lukemelas_mapping_is_strict_and_plain_lite0_differs(lite0_state):
    renamed = lukemelas_to_timm(lite0_state)
    assert len(renamed) == len(lite0_state)  # no two keys collapse
    tf = timm.create_model("tf_efficientnet_lite0", pretrained=False).eval()
    target = tf.state_dict()
    assert set(renamed) == set(target)
    assert all(renamed[k].shape == target[k].shape for k in target)
    tf.load_state_dict(renamed, strict=True)
    plain = timm.create_model("efficientnet_lite0", pretrained=False).eval()
    plain.load_state_dict(renamed, strict=True)  # same names and shapes...
    x = torch.rand(2, 3, 96, 96) * 2 - 1
    with torch.inference_mode():
        a, b = tf(x), plain(x)
    # ...but symmetric padding and BN eps 1e-5 compute other outputs: the tf_ variant is the right one.
    assert (a - b).abs().max() > 0.1
    with torch.inference_mode():
        ours = create_backbone("efficientnet_lite0")[0].eval()(x)
    torch.testing.assert_close(ours, tf.forward_head(tf.forward_features(x), pre_logits=True))


# --- timm family -----------------------------------------------------------------------------------------------

def test_timm_cnn_random_init(tmp_path):
    e = create_embedder("timm:resnet18", pretrained=False, embed_dim=16, image_size=64).eval()
    out = e(_images(3, 64))
    assert out.shape == (3, 16) and out.dtype == torch.float32
    torch.testing.assert_close(out.norm(dim=1), torch.ones(3))
    assert e.backbone.num_features == 512 and e.preprocess.image_size == 64


def test_timm_vit_at_a_non_native_size():
    e = create_embedder("timm:vit_tiny_patch16_224", pretrained=False, embed_dim=8, image_size=64).eval()
    assert e.backbone.model.pos_embed.shape[1] == 1 + (64 // 16) ** 2
    assert e(_images(2, 64)).shape == (2, 8)
    e.set_image_size(96)  # resamples the position embedding in place
    assert e.backbone.model.pos_embed.shape[1] == 1 + (96 // 16) ** 2
    assert e(_images(1, 96)).shape == (1, 8) and e.preprocess.image_size == 96


def test_timm_local_checkpoint_both_spellings(tmp_path):
    src = timm.create_model("resnet18", pretrained=False).eval()
    ckpt = tmp_path / "r18.pth"
    torch.save(src.state_dict(), ckpt)
    x = torch.rand(2, 3, 64, 64)
    with torch.inference_mode():
        expected = src.forward_head(src.forward_features(x), pre_logits=True)
    for name, kw in ((f"timm:resnet18:{ckpt}", {}), ("timm:resnet18", {"checkpoint": str(ckpt)})):
        net, _ = create_backbone(name, **kw)
        with torch.inference_mode():
            torch.testing.assert_close(net.eval()(x), expected)
    with pytest.raises(FileNotFoundError, match="timm checkpoint not found"):
        create_backbone(f"timm:resnet18:{tmp_path / 'missing.pth'}")


def test_timm_vit_checkpoint_resampled_to_image_size(tmp_path):
    src = timm.create_model("vit_tiny_patch16_224", pretrained=False)
    torch.save(src.state_dict(), tmp_path / "vit.pth")
    e = create_embedder(f"timm:vit_tiny_patch16_224:{tmp_path / 'vit.pth'}", embed_dim=None, image_size=64).eval()
    pos = e.backbone.model.pos_embed
    assert pos.shape == (1, 17, 192)
    torch.testing.assert_close(pos[:, 0], src.pos_embed[:, 0])  # class token kept, grid resampled
    torch.testing.assert_close(e.backbone.model.blocks[0].attn.qkv.weight, src.blocks[0].attn.qkv.weight)


def test_trained_model_loads_without_its_starting_checkpoint(tmp_path):
    src = timm.create_model("resnet18", pretrained=False)
    torch.save(src.state_dict(), tmp_path / "r18.pth")
    e = create_embedder("timm:resnet18", checkpoint=str(tmp_path / "r18.pth"), embed_dim=8).eval()
    save_embedder(e, tmp_path / "model.pt")
    (tmp_path / "r18.pth").unlink()
    back = load_embedder(tmp_path / "model.pt")
    x = _images(2, 64)
    with torch.inference_mode():
        torch.testing.assert_close(back(x), e(x))


# --- open_clip family ------------------------------------------------------------------------------------------

def test_open_clip_with_and_without_projection(tiny_clip_config):
    torch.manual_seed(0)
    with_proj = create_embedder(f"open_clip:{TINY_CLIP}", pretrained=False, embed_dim=None).eval()
    without = create_embedder(f"open_clip:{TINY_CLIP}", pretrained=False, embed_dim=None,
                              keep_projection=False).eval()
    assert with_proj.backbone.num_features == 16 and without.backbone.num_features == 32
    without.backbone.load_state_dict({k: v for k, v in with_proj.backbone.state_dict().items()
                                      if not k.endswith("visual.proj")})
    x = _images(3, 32)
    with torch.inference_mode():
        pooled = without.forward_features(x)
        projected = with_proj.forward_features(x)
    assert pooled.shape == (3, 32)
    torch.testing.assert_close(projected, pooled @ with_proj.backbone.visual.proj.detach())
    pre = with_proj.preprocess
    assert pre.crop_pct == 1.0 and pre.image_size == 32 and pre.mean[0] == pytest.approx(0.48145466)


def test_open_clip_full_checkpoint_file_and_resampling(tiny_clip_config, tmp_path):
    import open_clip

    torch.manual_seed(1)
    clip = open_clip.create_model(TINY_CLIP, pretrained=None).eval()
    ckpt = tmp_path / "clip.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in clip.state_dict().items()}}, ckpt)  # DDP-style
    e = create_embedder(f"open_clip:{TINY_CLIP}:{ckpt}", embed_dim=None).eval()
    x = _images(2, 32)
    with torch.inference_mode():
        expected = clip.encode_image(e.normalize(x), normalize=True)
        torch.testing.assert_close(e(x), expected)
    big = create_embedder(f"open_clip:{TINY_CLIP}:{ckpt}", embed_dim=8, image_size=48).eval()
    pos = big.backbone.visual.positional_embedding
    assert pos.shape == (1 + (48 // 8) ** 2, 32)
    torch.testing.assert_close(pos[0], clip.visual.positional_embedding[0])
    assert big(_images(2, 48)).shape == (2, 8)


def test_open_clip_errors(tiny_clip_config):
    with pytest.raises(ValueError, match="needs a pretrained tag or file"):
        create_backbone(f"open_clip:{TINY_CLIP}")
    with pytest.raises(ValueError, match="neither a file nor a known pretrained tag"):
        create_backbone(f"open_clip:{TINY_CLIP}:/no/such/file.pt")
    with pytest.raises(ValueError, match="unknown open_clip architecture"):
        create_backbone("open_clip:NoSuchArch", pretrained=False)
    net, _ = create_backbone(f"open_clip:{TINY_CLIP}", pretrained=False)
    with pytest.raises(ValueError, match="multiple of the patch size"):
        net.set_image_size(30)


def test_unknown_backbone_names():
    for name in ("resnet50", "hub:thing", "timm:"):
        with pytest.raises(ValueError, match="unknown backbone"):
            create_backbone(name, pretrained=False)
    with pytest.raises(TypeError, match="efficientnet_lite0 takes only"):
        create_backbone("efficientnet_lite0", pretrained=False, keep_projection=False)


# --- head, PCA, contract, checkpoints --------------------------------------------------------------------------

def test_embed_dim_above_64_is_rejected(tiny_embedder):
    assert MAX_EMBED_DIM == 64
    with pytest.raises(ValueError, match="exceeds the GUIE limit of 64"):
        ProjectionHead(128, 65)
    with pytest.raises(ValueError, match="exceeds the GUIE limit"):
        tiny_embedder(embed_dim=65)
    assert tiny_embedder(embed_dim=64).embed_dim == 64
    assert tiny_embedder(embed_dim=None).embed_dim == 256  # no head: raw features may be wider


def test_pca_head_is_centred_projection():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 40)).astype(np.float32) @ rng.normal(size=(40, 40)).astype(np.float32)
    mean, comps = fit_pca(x, 8)
    assert comps.shape == (8, 40)
    np.testing.assert_allclose(comps @ comps.T, np.eye(8), atol=1e-4)  # orthonormal directions
    head = ProjectionHead(40, 8).init_from_pca(mean, comps).eval()
    with torch.no_grad():
        got = head(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(got, (x - mean) @ comps.T, rtol=1e-4, atol=1e-3)
    var = got.var(0)
    assert (np.diff(var) <= 1e-3).all()  # components ordered by explained variance
    with pytest.raises(ValueError, match="do not fit head"):
        ProjectionHead(40, 4).init_from_pca(mean, comps)


def test_two_layer_head_is_nonlinear_round_trips_and_refuses_pca(tiny_embedder, tmp_path):
    e = tiny_embedder(embed_dim=8, head_hidden=16)
    assert e.spec.head_hidden == 16 and e.embed_dim == 8
    assert [type(m) for m in e.head.proj] == [torch.nn.Linear, torch.nn.GELU, torch.nn.Linear]
    feats = torch.randn(4, e.head.in_features)
    with torch.no_grad():
        # a linear head maps -f to -head(f) up to the bias; a GELU layer between does not
        odd = e.head(feats) + e.head(-feats) - 2 * e.head(torch.zeros_like(feats))
    assert odd.abs().max() > 1e-3
    save_embedder(e, tmp_path / "m.pt")
    back = load_embedder(tmp_path / "m.pt")
    assert back.spec == e.spec
    x = _images(3, 32)
    with torch.inference_mode():
        torch.testing.assert_close(back(x), e(x), rtol=0, atol=0)
    with pytest.raises(ValueError, match="linear head only"):
        e.head.init_from_pca(np.zeros(e.head.in_features, np.float32), np.zeros((8, e.head.in_features), np.float32))
    with pytest.raises(ValueError, match="hidden width must be >= 1"):
        ProjectionHead(40, 8, hidden=0)


def test_output_is_l2_normalised_and_accepts_uint8_or_float(tiny_embedder):
    e = tiny_embedder()
    x = _images(4, 32)
    with torch.inference_mode():
        a, b = e(x), e(x.float() / 255)
    assert a.shape == (4, 8) and a.dtype == torch.float32
    torch.testing.assert_close(a.norm(dim=1), torch.ones(4))
    torch.testing.assert_close(a, b)


def test_transform_is_the_model_input(tiny_embedder, mode_images):
    e = tiny_embedder(image_size=40)
    with Image.open(mode_images["rgb"]) as im:
        t = e.transform(im.convert("RGB"))
    assert t.dtype == torch.uint8 and t.shape == (3, 40, 40)


def test_save_load_round_trip(tiny_embedder, tmp_path):
    e = tiny_embedder(embed_dim=8, preprocess={"crop_pct": 1.0, "resize_mode": "pad"})
    with torch.no_grad():
        e.head.proj.weight.normal_()  # not the initial weights
    save_embedder(e, tmp_path / "m.pt", extra={"note": "x"})
    back = load_embedder(tmp_path / "m.pt")
    assert back.preprocess == e.preprocess and back.spec == e.spec
    x = _images(3, 32)
    with torch.inference_mode():
        torch.testing.assert_close(back(x), e(x), rtol=0, atol=0)
    assert not back.training


def test_round_trip_keeps_backbone_options_and_resized_vit(tiny_clip_config, tmp_path):
    e = create_embedder(f"open_clip:{TINY_CLIP}", pretrained=False, embed_dim=4, keep_projection=False).eval()
    e.set_image_size(48)
    save_embedder(e, tmp_path / "clip.pt")
    back = load_embedder(tmp_path / "clip.pt")
    assert back.backbone.num_features == 32 and back.preprocess.image_size == 48
    x = _images(2, 48)
    with torch.inference_mode():
        torch.testing.assert_close(back(x), e(x))


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="none.pt: model file not found"):
        load_embedder(tmp_path / "none.pt")
    torch.save({"weights": 1}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a guie embedder checkpoint"):
        load_embedder(tmp_path / "other.pt")


def test_resolve_embedder(tiny_embedder, tmp_path):
    e = tiny_embedder()
    save_embedder(e, tmp_path / "m.pt")
    assert resolve_embedder(e) is e
    resized = resolve_embedder(tmp_path / "m.pt", image_size=48)
    assert resized.preprocess.image_size == 48 and resized.spec.image_size == 48
    with pytest.raises(ValueError, match="cannot be changed on a trained model"):
        resolve_embedder(tmp_path / "m.pt", embed_dim=16)
    raw = resolve_embedder("timm:test_efficientnet", pretrained=False)
    assert raw.embed_dim == 256  # a backbone name alone gives raw features


def test_set_preprocess_keeps_mean_and_std(tiny_embedder):
    e = tiny_embedder()
    with pytest.raises(ValueError, match="cannot change mean/std"):
        e.set_preprocess(e.preprocess.replace(mean=(0.1, 0.2, 0.3)))
    e.set_preprocess(e.preprocess.replace(resize_mode="squash"))
    assert e.preprocess.resize_mode == "squash"
