"""Lower precisions on the CPU: bf16 (OpenVINO on a CPU with native bf16) and int8 (a checkpoint's NNCF-quantized model
beside it) are chosen by `--precision auto` only where the model's recorded mP@5 loss is within 0.002 on every domain;
the checks are measured on real forwards and recorded with the model; the int8 model never replaces the fp32
checkpoint. The bf16 forward runs for real where the CPU has native bf16 (skipped elsewhere)."""
from __future__ import annotations

import json
import types

import numpy as np
import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from guie.embedding import runtimes
from guie.embedding.runtimes import cpu_has_native_bf16, create_runtime, quantized_folder, resolve_choice
from guie.errors import InputError
from guie.models import load_embedder, save_embedder

pytest.importorskip("openvino")

CPU = torch.device("cpu")
NATIVE_BF16 = cpu_has_native_bf16()
needs_bf16 = pytest.mark.skipif(not NATIVE_BF16, reason="this CPU has no native bf16 (AMX or AVX512-BF16)")


@pytest.fixture(scope="module", autouse=True)
def own_cache(tmp_path_factory):
    """Conversions of this module go to one private cache (shared by its tests), not the user's."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("GUIE_CACHE", str(tmp_path_factory.mktemp("guie-cache")))
        yield


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny model saved as a checkpoint (its own folder: its int8 model goes beside it)."""
    from guie.models import create_embedder

    model = create_embedder("timm:test_efficientnet", embed_dim=8, pretrained=False, image_size=32, seed=0).eval()
    return save_embedder(model, tmp_path_factory.mktemp("ckpt") / "model.pt")


@pytest.fixture(scope="module")
def styles(tmp_path_factory):
    """A small labelled set: 4 classes x 3 styles (the frame a benchmark split gives), and its manifest."""
    from conftest import write_labelled_folder

    root = write_labelled_folder(tmp_path_factory.mktemp("styles") / "imgs")
    paths = sorted(root.rglob("*.png"))
    df = pd.DataFrame({"path": [str(p) for p in paths], "label": [p.parent.name for p in paths],
                       "style": [p.stem.split("_")[0] for p in paths], "split": "test"})
    df.to_csv(root.parent / "manifest.csv", index=False)
    return df, root.parent / "manifest.csv"


@pytest.fixture
def fake_benchmark(styles, monkeypatch):
    """Built-in benchmarks answer with the small labelled set (the real ones take minutes to build)."""
    from guie.evaluate import precision

    df, _ = styles
    monkeypatch.setattr(precision, "benchmark_frame", lambda name, split, cache_dir: df.copy())
    monkeypatch.setattr(precision, "get_benchmark", lambda name: types.SimpleNamespace(folds_by="style"))


def _write_int8_record(ckpt, fingerprint, domains):
    folder = quantized_folder(ckpt)
    folder.mkdir(exist_ok=True)
    (folder / "quantized.json").write_text(json.dumps({"fingerprint": fingerprint,
                                                       "check": {"domains": domains}}))
    return folder


def test_auto_picks_int8_then_bf16_only_where_every_domain_passed(checkpoint, monkeypatch, tmp_path):
    import shutil

    ckpt = shutil.copy(checkpoint, tmp_path / "m.pt")
    model = load_embedder(ckpt)
    monkeypatch.setattr(runtimes, "cpu_has_native_bf16", lambda: True)
    assert resolve_choice(model, "openvino", "auto", CPU).precision == "fp32"      # nothing measured
    model.precision_checks = {"bf16": {"domains": {"emoji": 0.0006, "glyphs": 0.0}}}
    assert resolve_choice(model, "openvino", "auto", CPU).precision == "bf16"
    folder = _write_int8_record(ckpt, model.fingerprint(False), {"emoji": 0.001, "glyphs": 0.0025})
    assert resolve_choice(model, "openvino", "auto", CPU).precision == "bf16"      # int8 lost 0.0025 on glyphs
    _write_int8_record(ckpt, model.fingerprint(False), {"emoji": 0.001, "glyphs": 0.002})
    choice = resolve_choice(model, "openvino", "auto", CPU)
    assert choice.precision == "int8" and "int8 model" in choice.reason
    assert resolve_choice(model, "openvino", "auto", CPU, features=True).precision == "bf16"  # features: never int8
    assert resolve_choice(model, "onnxruntime", "auto", CPU).precision == "fp32"   # a runtime without int8/bf16
    _write_int8_record(ckpt, "0" * 16, {"emoji": 0.0})                             # made from other weights
    assert resolve_choice(model, "openvino", "auto", CPU).precision == "bf16"
    monkeypatch.setattr(runtimes, "cpu_has_native_bf16", lambda: False)
    choice = resolve_choice(model, "openvino", "auto", CPU)
    assert choice.precision == "fp32" and "no native bf16" in choice.reason
    assert folder.is_dir()


def test_int8_without_a_quantized_model_is_one_line(checkpoint, tiny_embedder):
    with pytest.raises(InputError, match=r"has no int8 model of its weights at .*model\.int8 \(none\)") as err:
        create_runtime(load_embedder(checkpoint), "openvino", "int8", "cpu")
    assert "\n" not in str(err.value)
    with pytest.raises(InputError, match="not loaded from a checkpoint file"):
        create_runtime(tiny_embedder(), "openvino", "int8", "cpu")
    with pytest.raises(InputError, match="runtime torch does not offer precision int8.*int8 runs on openvino"):
        create_runtime(tiny_embedder(), "torch", "int8", "cpu")
    with pytest.raises(InputError, match="not backbone features"):
        create_runtime(load_embedder(checkpoint), "openvino", "int8", "cpu", features=True)


@needs_bf16
def test_openvino_bf16_really_runs_in_bf16_close_to_fp32(checkpoint, styles):
    """The real bf16 forward (AMX / AVX512-BF16): vectors move (bf16 arithmetic ran) but stay close to fp32."""
    from guie.embedding.engine import embed_images

    model = load_embedder(checkpoint)
    paths = styles[0]["path"].tolist()
    fp32 = embed_images(model, paths, runtime="openvino", precision="fp32", progress=False)  # the default cache:
    rt = create_runtime(model, "openvino", "bf16", "cpu")  # one conversion for the tests of this module
    assert rt.precision == "bf16" and rt.compiled.get_property("INFERENCE_PRECISION_HINT").to_string() == "bf16"
    bf16 = embed_images(model, paths, runtime=rt, progress=False)
    diff = np.abs(bf16.embeddings - fp32.embeddings).max()
    cosine = np.sum(bf16.embeddings * fp32.embeddings, axis=1)
    assert 1e-5 < diff < 0.1 and cosine.min() > 0.99, (diff, cosine.min())


@needs_bf16
def test_check_precision_measures_records_and_auto_follows_it(checkpoint, fake_benchmark, tmp_path, monkeypatch):
    """`guie check-precision MODEL bf16` measures per domain with real forwards, stores the check in the checkpoint
    (weights unchanged) and `auto` then follows the recorded verdict."""
    import shutil

    from guie.cli import app

    ckpt = shutil.copy(checkpoint, tmp_path / "m.pt")
    before = load_embedder(ckpt).state_dict()
    r = CliRunner().invoke(app, ["check-precision", str(ckpt), "bf16", "--benchmarks", "emoji,icons",
                                 "--no-progress", "--out", str(tmp_path / "check.json")])
    assert r.exit_code == 0, r.output
    assert "recorded in" in r.output and "loss" in r.output
    check = json.loads((tmp_path / "check.json").read_text())
    assert set(check["domains"]) == {"emoji", "icons"} and check["images"]["emoji"] == 12
    assert abs(check["domains"]["emoji"] - (check["fp32"]["emoji"] - check["scores"]["emoji"])) < 1e-6
    model = load_embedder(ckpt)
    assert model.precision_checks["bf16"]["domains"] == check["domains"]
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    monkeypatch.setattr(runtimes, "cpu_has_native_bf16", lambda: True)
    assert resolve_choice(model, "openvino", "auto", CPU).precision == ("bf16" if check["passes"] else "fp32")
    r = CliRunner().invoke(app, ["check-precision", str(ckpt), "fp16", "--benchmarks", "emoji", "--no-record"])
    assert r.exit_code == 2 and "bf16 or int8" in r.output


@pytest.mark.slow
def test_quantize_writes_an_int8_model_beside_the_checkpoint_and_int8_runs_it(checkpoint, styles, fake_benchmark,
                                                                               tmp_path):
    """`guie quantize` calibrates on the images given, writes <stem>.int8/ beside the checkpoint (which stays byte
    for byte), records the measured loss per domain there, refuses to replace it unasked; --precision int8 runs it."""
    import shutil

    from guie.cli import app
    from guie.embedding.engine import embed_images

    ckpt = shutil.copy(checkpoint, tmp_path / "m.pt")
    original = ckpt.read_bytes()
    _, manifest = styles
    args = ["quantize", str(ckpt), "--calibration", str(manifest), "--images", "8", "--benchmarks", "emoji",
            "--no-progress", "--fast-bias-correction"]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    folder = quantized_folder(ckpt)
    record = json.loads((folder / "quantized.json").read_text())
    assert record["calibration"]["images"] == 8 and set(record["check"]["domains"]) == {"emoji"}
    assert (folder / "model.xml").is_file() and ckpt.read_bytes() == original
    model = load_embedder(ckpt)
    assert runtimes.precision_checks(model)["int8"]["domains"] == record["check"]["domains"]
    paths = styles[0]["path"].tolist()
    rt = create_runtime(model, "openvino", "int8", "cpu")
    got = embed_images(model, paths, runtime=rt, progress=False).embeddings
    ref = embed_images(model, paths, runtime="torch", progress=False).embeddings
    assert rt.precision == "int8" and np.sum(got * ref, axis=1).min() > 0.9
    r = CliRunner().invoke(app, args)  # a second run must not replace it silently
    assert r.exit_code == 2 and "has an int8 model already" in r.output and "\n" not in r.output.strip()
    r = CliRunner().invoke(app, ["quantize", str(tmp_path / "none.pt")])
    assert r.exit_code == 2 and "not found" in r.output


def test_calibration_defaults_to_the_recipe_beside_the_checkpoint(checkpoint, tmp_path):
    from guie.export.quantize import calibration_paths

    with pytest.raises(InputError, match="no training recipe beside it"):
        calibration_paths(checkpoint)
