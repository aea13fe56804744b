"""Export to TorchScript: the competition contract, parity with the training-time Embedder, TTA, shared-head
ensembles, soups, and `guie check-submission`. Tiny random timm / open_clip models keep each test to seconds."""
import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from typer.testing import CliRunner

from guie.cli import app
from guie.export import (
    ExportError,
    IncompatibleMembersError,
    TTAConfig,
    build_exported_module,
    check_shared_head,
    check_submission,
    ensemble_embeddings,
    export_torchscript,
    load_members,
    read_metadata,
    reference_embed,
    soup_checkpoints,
    soup_embedders,
)
from guie.export.check import identity_side, synthetic_image
from guie.export.module import MemberPipeline
from guie.models import create_embedder, load_embedder, save_embedder
from guie.models.preprocess import ImageTransform, PreprocessConfig
from model_fixtures import register_tiny_open_clip

ODD = [(37, 500), (500, 37), (3000, 4000), (9, 13)]
# TorchScript itself is deprecated upstream, but it is the format the competition took
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning")


def tiny(seed=0, image_size=32, **kw):
    """A random 64-d embedder on timm's test_efficientnet with TF 'SAME' padding (the path tf_efficientnet_lite0
    uses)."""
    return create_embedder("timm:test_efficientnet", pretrained=False, image_size=image_size, pad_type="same",
                           seed=seed, **kw).eval()


def pil(arr):
    return Image.fromarray(np.ascontiguousarray(arr.transpose(1, 2, 0)), "RGB")


def cos(a, b):
    a, b = torch.as_tensor(a), torch.as_tensor(b)
    return F.cosine_similarity(a.reshape(1, -1), b.reshape(1, -1)).item()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(embedder, its checkpoint, the TorchScript export of it) shared by the tests below."""
    d = tmp_path_factory.mktemp("export")
    emb = tiny()
    ckpt = save_embedder(emb, d / "tiny.pt")
    result = export_torchscript([emb], d / "tiny.ts.pt", checkpoints=[ckpt])
    return emb, ckpt, result


def test_resize_is_identity_at_the_native_side():
    pre = PreprocessConfig(image_size=32, crop_pct=0.875)
    side = identity_side(pre)
    x = torch.from_numpy(synthetic_image(side, side, seed=3))
    out = MemberPipeline(torch.nn.Identity(), pre, TTAConfig()).resize(x[None].float(), "crop")[0]
    off = (side - 32) // 2
    assert torch.equal(out, x[:, off:off + 32, off:off + 32])


def test_torchscript_contract_and_parity(exported):
    emb, _, result = exported
    model = torch.jit.load(str(result.path))
    side = identity_side(emb.preprocess)
    native = synthetic_image(side, side, seed=0)
    with torch.no_grad(), torch.jit.optimized_execution(False):  # no per-shape re-profiling: faster first calls
        # (a) identical pixels reach the network: exact parity with the eager Embedder
        out = model(torch.from_numpy(native))
        eager = emb(ImageTransform(emb.preprocess)(pil(native))[None])
        assert out.shape == (1, 64) and out.dtype == torch.float32
        assert (out - eager).abs().max() < 1e-5
        # (b) end to end on odd sizes and a grey image: in-model resize vs PIL resize
        arrays = [synthetic_image(h, w, seed=i) for i, (h, w) in enumerate(ODD)]
        arrays.append(synthetic_image(240, 320, seed=9, grayscale=True))
        ref = reference_embed([emb], [pil(a) for a in arrays])
        for a, r in zip(arrays, ref):
            e = model(torch.from_numpy(a))
            assert e.shape == (1, 64) and torch.allclose(e.norm(dim=1), torch.ones(1), atol=1e-5)
            assert cos(e, r) > 0.999
        # a batch gives the rows of single images; [3,H,W] == [1,3,H,W]; float [0,1] reads like uint8
        batch = torch.from_numpy(np.stack([synthetic_image(60, 80, seed=s) for s in range(3)]))
        rows = torch.cat([model(b) for b in batch])
        assert torch.allclose(model(batch), rows, atol=1e-5)
        assert torch.equal(model(batch[0]), model(batch[:1]))
        assert torch.allclose(model(batch[0].float() / 255), model(batch[0]), atol=1e-5)
        assert not torch.allclose(rows[0], rows[1], atol=1e-3)  # distinct images, distinct embeddings


def test_torchscript_rejects_non_rgb_input(exported):
    model = torch.jit.load(str(exported[2].path))
    with pytest.raises(Exception, match="expected RGB images"):
        model(torch.zeros(1, 4, 20, 20, dtype=torch.uint8))


def test_torchscript_loads_without_guie_timm_open_clip(exported, tmp_path):
    code = textwrap.dedent(f"""
        import importlib.abc, sys
        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("guie", "timm", "open_clip"):
                    raise ImportError("blocked " + name)
        sys.meta_path.insert(0, Block())
        import torch
        m = torch.jit.load({str(exported[2].path)!r})
        out = m(torch.randint(0, 256, (3, 41, 77), dtype=torch.uint8))
        print(list(out.shape), out.dtype, [k for k in sys.modules if k.split(".")[0] in ("guie", "timm")])
    """)
    proc = subprocess.run([sys.executable, "-I", "-c", code], cwd=tmp_path, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "[1, 64] torch.float32 []"


def test_metadata_records_contract_and_members(exported):
    _, ckpt, result = exported
    meta = read_metadata(result.path)
    assert meta.embed_dim == 64 and meta.members[0]["checkpoint"] == str(ckpt.resolve())
    assert meta.members[0]["preprocess"]["image_size"] == 32 and "uint8" in meta.input
    assert meta.verification["torchscript_vs_eager_max_abs"] < 1e-5


def test_flip_tta_makes_the_embedding_mirror_invariant():
    emb = tiny()
    side = identity_side(emb.preprocess)  # (side - 32) is even: the centre crop itself is mirror-symmetric
    x = torch.from_numpy(synthetic_image(side, side, seed=5))[None]
    mirrored = x.flip(3)
    plain = build_exported_module([emb], TTAConfig())
    flip = build_exported_module([emb], TTAConfig(flip=True))
    with torch.no_grad():
        assert (plain(x) - plain(mirrored)).abs().max() > 1e-3  # the input is asymmetric: the net sees it
        assert torch.allclose(flip(x), flip(mirrored), atol=1e-5)
        expected = F.normalize(plain(x) + plain(mirrored), dim=-1)
        assert torch.allclose(flip(x), expected, atol=1e-5)
        symmetric = torch.cat([x[..., : side // 2], x[..., : side // 2].flip(3)], dim=3)
        assert torch.allclose(flip(symmetric), plain(symmetric), atol=1e-5)


def test_letterbox_view_only_for_elongated_images():
    emb = tiny()
    plain = build_exported_module([emb], TTAConfig())
    box = build_exported_module([emb], TTAConfig(letterbox=True, min_aspect=1.25))
    squareish = torch.from_numpy(synthetic_image(40, 48, seed=1))[None]  # 1.2 < 1.25
    wide = torch.from_numpy(synthetic_image(40, 120, seed=2))[None]
    with torch.no_grad():
        assert torch.allclose(box(squareish), plain(squareish), atol=1e-6)
        assert (box(wide) - plain(wide)).abs().max() > 1e-3
        arrays = [synthetic_image(40, 48, seed=1), synthetic_image(40, 120, seed=2)]
        ref = reference_embed([emb], [pil(a) for a in arrays], TTAConfig(letterbox=True))
        for a, r in zip(arrays, ref):
            assert cos(box(torch.from_numpy(a)[None]), r) > 0.999


def test_tta_parse():
    assert TTAConfig.parse("flip,letterbox") == TTAConfig(flip=True, letterbox=True)
    assert TTAConfig.parse("none") == TTAConfig()
    with pytest.raises(ValueError, match="unknown TTA"):
        TTAConfig.parse("rotate")


def shared_head_pair():
    """Two members that share one head but differ in backbone weights and resolution (like 224 + 280 px)."""
    a, b = tiny(seed=0), tiny(seed=1, image_size=40)
    b.head.load_state_dict(a.head.state_dict())
    return a, b


def test_ensemble_refuses_different_heads_unless_allowed():
    a, b = shared_head_pair()
    check_shared_head([a, b])
    other = tiny(seed=2)
    with pytest.raises(IncompatibleMembersError, match="different heads"):
        check_shared_head([a, other])
    with pytest.warns(UserWarning, match="averaging anyway"):
        check_shared_head([a, other], allow_different_heads=True)
    narrow = create_embedder("timm:test_efficientnet", pretrained=False, image_size=32, embed_dim=32)
    with pytest.raises(IncompatibleMembersError, match="32-d"):
        check_shared_head([a, narrow], allow_different_heads=True)


def test_load_members_checks_heads(tmp_path):
    a, b = shared_head_pair()
    paths = [save_embedder(a, tmp_path / "a.pt"), save_embedder(b, tmp_path / "b.pt"),
             save_embedder(tiny(seed=3), tmp_path / "c.pt")]
    assert len(load_members(paths[:2])) == 2
    with pytest.raises(IncompatibleMembersError, match="c.pt"):
        load_members([paths[0], paths[2]])


def test_ensemble_is_the_normalised_mean_of_members(tmp_path):
    a, b = shared_head_pair()
    x = torch.from_numpy(synthetic_image(50, 70, seed=4))[None]
    with torch.no_grad():
        ea, eb = build_exported_module([a])(x), build_exported_module([b])(x)
        both = build_exported_module([a, b])(x)
    assert torch.allclose(both, F.normalize(ea + eb, dim=-1), atol=1e-6)
    assert torch.allclose(torch.from_numpy(ensemble_embeddings([ea.numpy(), eb.numpy()])), both, atol=1e-6)
    result = export_torchscript([a, b], tmp_path / "ens.pt")
    assert torch.allclose(torch.jit.load(str(result.path))(x), both, atol=1e-5)
    assert len(read_metadata(result.path).members) == 2


def test_ensemble_embeddings_validates_shapes():
    e = np.eye(3, 4, dtype=np.float32)
    out = ensemble_embeddings([e, 2 * e], weights=[1, 3])
    np.testing.assert_allclose(out, e, atol=1e-6)
    with pytest.raises(ValueError, match="one shape"):
        ensemble_embeddings([e, e[:2]])


def test_soup_averages_float_weights(tmp_path):
    a, b = tiny(seed=0), tiny(seed=1)
    soup = soup_embedders([a, b])
    sa, sb, ss = a.state_dict(), b.state_dict(), soup.state_dict()
    for key, value in ss.items():
        if value.is_floating_point():
            assert torch.allclose(value, (sa[key] + sb[key]) / 2, atol=1e-6), key
        else:
            assert torch.equal(value, sa[key])
    weighted = soup_embedders([a, b], weights=[3, 1]).head.proj.weight
    assert torch.allclose(weighted, 0.75 * a.head.proj.weight + 0.25 * b.head.proj.weight, atol=1e-6)
    paths = [save_embedder(a, tmp_path / "a.pt"), save_embedder(b, tmp_path / "b.pt")]
    soup_checkpoints(paths, tmp_path / "soup.pt")
    loaded = load_embedder(tmp_path / "soup.pt")
    assert torch.allclose(loaded.head.proj.bias, ss["head.proj.bias"])


def test_soup_refuses_other_architectures():
    a = tiny()
    wider = create_embedder("timm:test_efficientnet", pretrained=False, image_size=32, embed_dim=32)
    with pytest.raises(IncompatibleMembersError, match="architecture"):
        soup_embedders([a, wider])
    two_layer = tiny(head_hidden=16)  # the same but for the head's hidden layer
    with pytest.raises(IncompatibleMembersError, match="architecture"):
        soup_embedders([a, two_layer])
    with pytest.raises(ValueError, match="at least two"):
        soup_embedders([a])


def test_export_refuses_outputs_over_64_dims(tmp_path):
    raw = create_embedder("timm:test_efficientnet", pretrained=False, image_size=32, embed_dim=None)
    with pytest.raises(ExportError, match="over the GUIE limit of 64"):
        export_torchscript([raw], tmp_path / "raw.pt")
    assert not (tmp_path / "raw.pt").exists()


def test_open_clip_tower_exports(tmp_path):
    register_tiny_open_clip(tmp_path, "guie-test-tiny-clip", embed_dim=32, width=64, head_width=32, layers=2)
    torch.manual_seed(0)
    emb = create_embedder("open_clip:guie-test-tiny-clip", pretrained=False, embed_dim=16).eval()
    result = export_torchscript([emb], tmp_path / "clip.pt", TTAConfig(flip=True))
    model = torch.jit.load(str(result.path))
    arrays = [synthetic_image(32, 32, seed=0), synthetic_image(37, 500, seed=1)]
    ref = reference_embed([emb], [pil(a) for a in arrays], TTAConfig(flip=True))
    with torch.no_grad():
        assert (model(torch.from_numpy(arrays[0]))[0] - torch.from_numpy(ref[0])).abs().max() < 1e-5
        assert cos(model(torch.from_numpy(arrays[1])), ref[1]) > 0.999
        assert model(torch.from_numpy(np.stack([arrays[0]] * 3))).shape == (3, 16)


# --- check-submission ---------------------------------------------------------------------------------------------

class _Wide(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 3:
            x = x.unsqueeze(0)
        return x.float().mean(dim=(1, 2))[:, :1].expand(-1, 128).double()


def test_check_submission_fails_wrong_dim_and_dtype(tmp_path):
    path = tmp_path / "wide.pt"
    torch.jit.save(torch.jit.script(_Wide()), str(path))
    report = check_submission(path, latency_runs=0)
    status = {c.name: c.status for c in report.checks}
    assert not report.ok
    assert status["output shape [B,d]"] == "FAIL" and status["dtype float32"] == "FAIL"
    assert status["parity with training-time model"] == "SKIP"


def test_check_submission_cli_passes_a_good_export_and_fails_bad_files(exported, tmp_path):
    runner = CliRunner()
    ok = runner.invoke(app, ["check-submission", str(exported[2].path), "--latency-runs", "1",
                             "--json", str(tmp_path / "r.json")])
    assert ok.exit_code == 0, ok.output
    assert "all checks passed" in ok.output
    report = json.loads((tmp_path / "r.json").read_text())
    status = {c["name"]: c["status"] for c in report["checks"]}
    assert status["loads without guie/timm/open_clip"] == "PASS"
    assert status["network parity (same pixels)"] == "PASS"  # checkpoint found through the file's metadata
    assert status["end-to-end parity (resize in model vs PIL)"] == "PASS"
    assert report["figures"]["network_max_abs"] < 1e-5 and report["figures"]["latency_ms"] > 0
    broken = tmp_path / "broken.pt"
    broken.write_bytes(b"not a model")
    bad = runner.invoke(app, ["check-submission", str(broken), "--latency-runs", "0"])
    assert bad.exit_code == 1 and "FAIL" in bad.output
    missing = runner.invoke(app, ["check-submission", str(tmp_path / "nope.pt")])
    assert missing.exit_code == 1 and "not found" in missing.output
    usage = runner.invoke(app, ["check-submission", str(exported[2].path), "--tta", "rotate"])
    assert usage.exit_code == 2 and "unknown TTA" in usage.output


def test_export_cli_refuses_different_heads_and_exports_soup(tmp_path):
    a, b = tiny(seed=0), tiny(seed=1)
    pa, pb = save_embedder(a, tmp_path / "a.pt"), save_embedder(b, tmp_path / "b.pt")
    runner = CliRunner()
    refused = runner.invoke(app, ["export", str(pa), str(pb), "-o", str(tmp_path / "e.pt"), "--no-check"])
    assert refused.exit_code == 2 and "allow_different_heads" in refused.output
    assert not (tmp_path / "e.pt").exists()
    souped = runner.invoke(app, ["soup", str(pa), str(pb), "-o", str(tmp_path / "soup.pt")])
    assert souped.exit_code == 0, souped.output
    exported = runner.invoke(app, ["export", str(tmp_path / "soup.pt"), "-o", str(tmp_path / "soup.ts.pt"),
                                   "--tta", "flip", "--no-check"])
    assert exported.exit_code == 0, exported.output
    meta = read_metadata(tmp_path / "soup.ts.pt")
    assert meta.tta["flip"] and meta.members[0]["checkpoint"].endswith("soup.pt")


def test_shared_head_with_batchnorm_ignores_the_step_counter_but_not_the_statistics():
    a = tiny(seed=0, head_norm="batchnorm")
    b = tiny(seed=1, head_norm="batchnorm")
    b.head.load_state_dict(a.head.state_dict())
    b.head.norm.num_batches_tracked += 5  # fine-tuned longer with the head frozen: same head
    check_shared_head([a, b])
    with torch.no_grad():
        b.head.norm.running_mean += 0.1  # the statistics moved: a different head
    with pytest.raises(IncompatibleMembersError, match="different heads"):
        check_shared_head([a, b])
    soup = soup_embedders([a, b])
    assert soup.spec.head_norm == "batchnorm" and torch.allclose(
        soup.head.norm.running_mean, (a.head.norm.running_mean + b.head.norm.running_mean) / 2)
