"""The other GUIE winners' tricks as options: overlapping patches for open_clip ViTs (1st place), multi-sample
dropout (3rd), a wide head exported through a PCA to 64 (6th) and several members concatenated + PCA (4th)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from guie.errors import InputError
from guie.models import create_embedder, load_embedder, save_embedder
from model_fixtures import register_tiny_open_clip
from train_fixtures import make_labelled_images


@pytest.fixture(scope="module")
def tiny_vit(tmp_path_factory):
    """A 2-block open_clip ViT at 32 px with 8-px patches (4x4 grid), random weights."""
    register_tiny_open_clip(tmp_path_factory.mktemp("oc"), "guie-tricks-vit", embed_dim=16, width=32, head_width=16,
                            layers=2)
    return "open_clip:guie-tricks-vit"


@pytest.fixture(scope="module")
def images():
    return torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))


# ------------------------------------------------------------------------------------- 1st place: patch stride
def test_patch_stride_equal_to_the_patch_size_is_the_plain_model_bit_for_bit(tiny_vit, images):
    plain = create_embedder(tiny_vit, 8, pretrained=False, seed=0).eval()
    strided = create_embedder(tiny_vit, 8, pretrained=False, seed=0, patch_stride=8).eval()
    with torch.no_grad():
        assert torch.equal(plain(images), strided(images))
    a, b = plain.state_dict(), strided.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_overlapping_patches_reuse_the_pretrained_patch_projection_on_a_finer_grid(tiny_vit, images, tmp_path):
    from open_clip.model import resize_pos_embed  # noqa: F401 - the resampling the strided tower must match

    plain = create_embedder(tiny_vit, 8, pretrained=False, seed=0)
    tower = tmp_path / "tower.pt"
    torch.save(plain.backbone.visual.state_dict(), tower)
    overlap = create_embedder(f"{tiny_vit}:{tower}", 8, pretrained=True, seed=0, patch_stride=4).eval()
    v, pv = overlap.backbone.visual, plain.backbone.visual
    # (32 - 8) // 4 + 1 = 7 patches a side, overlapping by half a patch
    assert v.conv1.stride == (4, 4) and tuple(v.grid_size) == (7, 7) and v.positional_embedding.shape[0] == 7 * 7 + 1
    assert torch.equal(v.conv1.weight, pv.conv1.weight)                       # the patch projection is reused
    assert torch.equal(v.positional_embedding[0], pv.positional_embedding[0])  # the class token's position too
    grid = torch.nn.functional.interpolate(pv.positional_embedding[1:].reshape(1, 4, 4, -1).permute(0, 3, 1, 2),
                                           size=(7, 7), mode="bicubic", antialias=True, align_corners=False)
    torch.testing.assert_close(v.positional_embedding[1:], grid.permute(0, 2, 3, 1).reshape(49, -1))
    with torch.no_grad():
        out = overlap(images)
        assert out.shape == (3, 8) and not torch.allclose(out, plain.eval()(images))
    # the stride is part of the model: a checkpoint rebuilds it
    path = save_embedder(overlap, tmp_path / "overlap.pt")
    loaded = load_embedder(path)
    assert loaded.spec.backbone_kwargs["patch_stride"] == 4
    with torch.no_grad():
        assert torch.equal(loaded(images), out)


def test_a_stage_switches_to_overlapping_patches_at_a_new_resolution(tiny_vit):
    emb = create_embedder(tiny_vit, 8, pretrained=False, seed=0)
    emb.set_image_size(40, patch_stride=4)            # the 1st place's s10: 290 px at stride 12
    assert tuple(emb.backbone.visual.grid_size) == (9, 9) and emb.preprocess.image_size == 40
    assert emb.spec.backbone_kwargs["patch_stride"] == 4 and emb.spec.image_size == 40
    with pytest.raises(InputError, match="patch_stride 9 must be in"):
        emb.set_image_size(40, patch_stride=9)
    lite = create_embedder("efficientnet_lite0", 8, pretrained=False, image_size=32)
    with pytest.raises(InputError, match="patch_stride: .* no patch embedding"):
        lite.set_image_size(64, patch_stride=4)


# ---------------------------------------------------------------------------- 3rd place: multi-sample dropout
def test_multisample_dropout_averages_the_margin_loss_over_n_dropout_masks(tiny_vit):
    from guie.losses import create_loss
    from guie.train.batches import Batch
    from guie.train.objectives import TrainModule

    emb = create_embedder(tiny_vit, 8, dropout=0.5, pretrained=False, seed=0)
    loss = create_loss("arcface", 8, 4)
    feats = torch.randn(6, 16, generator=torch.Generator().manual_seed(1))
    batch = Batch(feats, torch.tensor([0, 1, 2, 3, 0, 1]))
    module = TrainModule(emb, loss, samples=5).train()
    torch.manual_seed(3)
    got = module(batch, True)
    torch.manual_seed(3)
    want = torch.stack([loss(emb.head(feats), batch.targets) for _ in range(5)]).mean()
    torch.testing.assert_close(got, want)

    def spread(samples):
        m = TrainModule(emb, loss, samples=samples).train()
        values = []
        for seed in range(12):
            torch.manual_seed(seed)
            values.append(float(m(batch, True).detach()))
        return np.std(values)

    assert spread(8) < spread(1) / 2       # the point: a steadier loss (and gradient) per step
    emb.head.dropout.p = 0.0                # without dropout the N copies are one and the same
    torch.testing.assert_close(TrainModule(emb, loss, samples=5)(batch, True), TrainModule(emb, loss)(batch, True))


def test_recipe_options_reach_the_model_and_the_objective(tmp_path):
    from guie.train.engine import Trainer
    from guie.train.recipe import ModelConfig, load_run_config
    from train_fixtures import tiny_recipe

    with pytest.raises(InputError, match="model.embed_dim 256 is over the GUIE limit of 64: set model.wide_head"):
        ModelConfig(embed_dim=256)
    manifest = make_labelled_images(tmp_path / "gen", n_classes=8, per_class=4)
    stage = "  - {name: head, datasets: [gen], train: [head, centers], steps: 2, batch_size: 8, " \
            "lr: {head: 0.05, centers: 0.05}}\n"
    path = tmp_path / "r.yaml"
    path.write_text(tiny_recipe(manifest, tmp_path / "run", tmp_path / "cache", stage).replace(
        "embed_dim: 16,", "embed_dim: 96, wide_head: true, head_multisample_dropout: 4,"))
    cfg = load_run_config(path)
    trainer = Trainer(cfg, progress=False)
    assert trainer.embedder.embed_dim == 96
    assert trainer._train_module(cfg.stages[0], True).samples == 4


# ------------------------------------------------------ 4th / 6th place: concatenation (or a wide head) + PCA
@pytest.fixture(scope="module")
def members(tiny_vit, tmp_path_factory):
    """Two unrelated members: a 16-d raw-feature model and a 96-d wide head; and training images."""
    root = tmp_path_factory.mktemp("concat")
    raw = save_embedder(create_embedder(tiny_vit, None, pretrained=False, seed=0), root / "raw.pt")
    wide = save_embedder(create_embedder(tiny_vit, 96, pretrained=False, seed=1, max_embed_dim=None), root / "wide.pt")
    manifest = make_labelled_images(root / "train", n_classes=10, per_class=3)
    return raw, wide, manifest


@pytest.mark.slow  # ~20 s: check-submission's clean-process probe
def test_export_concat_pca_of_two_members_is_checked_against_the_eager_reference(members, tmp_path):
    from guie.cli import app
    from guie.export import read_metadata

    raw, wide, manifest = members
    out = tmp_path / "sub.pt"
    r = CliRunner().invoke(app, ["export", str(raw), str(wide), "-o", str(out), "--concat-pca", "8",
                                 "--pca-images", str(manifest)])
    assert r.exit_code == 0, r.output
    assert "members concatenated + PCA" in r.output and "FAIL" not in r.output
    meta = read_metadata(out)
    assert meta.embed_dim == 8 and meta.projection["member_dims"] == [16, 96]
    assert meta.projection["fitted_on"]["images"] == 30
    model = torch.jit.load(str(out))
    emb = model(torch.randint(0, 256, (2, 3, 50, 70), dtype=torch.uint8))
    assert emb.shape == (2, 8)
    torch.testing.assert_close(emb.norm(dim=1), torch.ones(2))


def test_a_wide_head_is_refused_at_export_unless_projected_to_64(members, tmp_path):
    from guie.data.manifest import read_manifest
    from guie.export import export_model
    from guie.export.metadata import ExportError
    from guie.export.projection import fit_concat_pca

    _, wide, manifest = members
    model = load_embedder(wide)
    with pytest.raises(ExportError, match="96-d embeddings, over the GUIE limit of 64.*concat-pca"):
        export_model(model, tmp_path / "x.pt")
    paths = read_manifest(manifest)["path"].tolist()
    pca = fit_concat_pca([model], paths, 8)
    result = export_model([model], tmp_path / "pca.pt", projection=pca)
    assert result.metadata.embed_dim == 8 and result.max_abs_diff < 1e-4
