"""int8: a checkpoint's post-training quantized model (OpenVINO's NNCF), kept beside the checkpoint with its measured
mP@5 loss per domain, so `--precision int8` runs it and `--precision auto` may choose it.

`quantize_checkpoint` converts the model once (the runtime cache's fp32 OpenVINO IR, uint8 input), calibrates NNCF's
post-training quantization on the model's own training images (the recipe it was trained with, `config.yaml` beside
the checkpoint: its datasets' rows) or on a manifest given, and writes `<stem>.int8/` next to the checkpoint
(`guie.embedding.runtimes.quantized_folder`): the IR and `quantized.json` (the model's fingerprint, the calibration
and settings, NNCF's and OpenVINO's versions). The fp32 checkpoint is never touched; an existing int8 model is
replaced only when asked. `guie.evaluate.precision.measure_precision(..., "int8")` then measures its loss on the
benchmarks' test classes and records it in the same file (`guie quantize` does both).

What lowers the loss (measured in docs/cpu-runtime.md): more calibration images, NNCF's full bias correction, and
keeping sensitive layers unquantized (`keep`: the head's projection and the stem convolution by default; the layers
left unquantized run in fp32, or in bf16 with `rest_precision="bf16"` on a CPU with native bf16).
"""
from __future__ import annotations

import datetime as dt
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..embedding.runtimes import quantized_folder
from ..embedding.runtimes.base import QUANTIZED_RECORD
from ..errors import InputError, MissingFileError
from ..models.embedder import Embedder, load_embedder
from ..utils import atomic_write_json, log

# Layers kept out of int8 by default (regular expressions over the converted model's node names): the head's
# projection to the 64-d embedding and the first convolution of the backbone, on the raw pixels.
KEEP_DEFAULT = ("head", "stem")
KEEP_PATTERNS = {
    "head": r".*head.*",
    "stem": r".*(conv_stem|stem\.|_conv_stem|patch_embed).*",
}


@dataclass
class QuantizeSettings:
    """How the int8 model is made: calibration size and seed, NNCF's options, what stays unquantized."""

    images: int = 300
    seed: int = 0
    keep: tuple[str, ...] = KEEP_DEFAULT        # names of KEEP_PATTERNS, or regular expressions
    fast_bias_correction: bool = False
    preset: str = "performance"                   # NNCF preset: performance (symmetric) | mixed (asymmetric acts)
    rest_precision: str = "fp32"                  # the layers left unquantized: fp32 | bf16


@dataclass
class QuantizeResult:
    """What `quantize_checkpoint` wrote."""

    folder: Path
    record: dict = field(default_factory=dict)


def calibration_paths(checkpoint: str | Path, manifest: str | Path | None = None, where: Sequence[str] | None = None,
                      images: int = 300, seed: int = 0) -> tuple[list[str], str]:
    """(image paths to calibrate on, where they came from): `images` rows drawn at random (seeded) from `manifest`
    (filtered by `where`, column=value), or by default from the training datasets of the recipe the checkpoint was
    trained with (`config.yaml` beside it, as the trainer writes it)."""
    from ..data.manifest import read_manifest, select_rows

    checkpoint = Path(checkpoint)
    if manifest is not None:
        df = select_rows(read_manifest(manifest), list(where or []), str(manifest))
        source = str(manifest)
    else:
        config = checkpoint.with_name("config.yaml")
        if not config.is_file():
            raise InputError(f"{checkpoint}: no training recipe beside it ({config.name}) to take calibration images "
                             "from; give a manifest of images like the model's training images")
        import pandas as pd

        from ..train.data import load_training_dataset
        from ..train.recipe import load_run_config

        run = load_run_config(config)
        names = sorted({n for s in run.stages for n in s.datasets})
        df = pd.concat([load_training_dataset(n, run.datasets[n], run.cache_dir, run.seed) for n in names],
                       ignore_index=True).drop_duplicates("path")
        source = f"{config} (datasets {', '.join(names)})"
    if df.empty:
        raise InputError(f"calibration: no images in {source}")
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(len(df), size=min(images, len(df)), replace=False))
    return df["path"].astype(str).iloc[rows].tolist(), source


def _keep_scope(model, keep: Sequence[str]):
    """NNCF's IgnoredScope of the nodes whose names match `keep` (names of KEEP_PATTERNS or expressions)."""
    import re

    import nncf

    patterns = [KEEP_PATTERNS.get(k, k) for k in keep]
    for p in patterns:
        try:
            re.compile(p)
        except re.error as e:
            raise InputError(f"layers to keep: {p!r} is not a regular expression ({e})") from None
    names = [op.get_friendly_name() for op in model.get_ops()]
    matched = sorted({n for n in names for p in patterns if re.fullmatch(p, n)})
    return nncf.IgnoredScope(names=matched, validate=False) if matched else None


def _calibration_items(embedder: Embedder, paths: Sequence[str]) -> list[np.ndarray]:
    """The calibration images as the model's input: uint8 [1, 3, S, S], decoded by the one geometry."""
    from ..imaging.io import load_image

    transform, items, bad = embedder.transform, [], 0
    for p in paths:
        try:
            items.append(transform(load_image(p)).numpy()[None])
        except Exception:  # noqa: BLE001 - an unreadable calibration image is skipped and counted
            bad += 1
    if bad:
        log.warning("calibration: skipped %d unreadable image(s) of %d", bad, len(paths))
    if not items:
        raise InputError("calibration: none of the images could be read")
    return items


def quantize_embedder(embedder: Embedder, paths: Sequence[str], settings: QuantizeSettings | None = None,
                      cache_dir: str | Path | None = None):
    """The int8 `ov.Model` of `embedder` calibrated on `paths` (NNCF post-training quantization of the fp32 IR)."""
    import nncf

    from ..embedding.runtimes.openvino_runtime import openvino_model

    settings = settings or QuantizeSettings()
    if settings.preset not in ("performance", "mixed"):
        raise InputError(f"quantization preset {settings.preset!r}: choose performance or mixed")
    model = openvino_model(embedder.eval(), False, cache_dir)
    items = _calibration_items(embedder, paths)
    preset = nncf.QuantizationPreset.PERFORMANCE if settings.preset == "performance" else \
        nncf.QuantizationPreset.MIXED
    scope = _keep_scope(model, settings.keep)
    kwargs = {"ignored_scope": scope} if scope is not None else {}
    return nncf.quantize(model, nncf.Dataset(items), subset_size=len(items), preset=preset,
                         fast_bias_correction=settings.fast_bias_correction, **kwargs)


def quantize_checkpoint(checkpoint: str | Path, manifest: str | Path | None = None,
                        where: Sequence[str] | None = None, settings: QuantizeSettings | None = None,
                        overwrite: bool = False, cache_dir: str | Path | None = None) -> QuantizeResult:
    """Make the int8 model of a checkpoint and write it beside it (see the module docstring). An existing int8
    model is an error unless `overwrite`; the fp32 checkpoint is never changed."""
    import nncf
    import openvino as ov

    settings = settings or QuantizeSettings()
    if settings.rest_precision not in ("fp32", "bf16"):
        raise InputError(f"precision of the unquantized layers {settings.rest_precision!r}: choose fp32 or bf16")
    checkpoint = Path(checkpoint)
    if not checkpoint.is_file():
        raise MissingFileError(checkpoint, "model file")
    folder = quantized_folder(checkpoint)
    if folder.exists() and not overwrite:
        raise InputError(f"{folder} exists: {checkpoint} has an int8 model already; replacing it must be asked for "
                         "(the fp32 checkpoint itself is never replaced)")
    embedder = load_embedder(checkpoint)
    paths, source = calibration_paths(checkpoint, manifest, where, settings.images, settings.seed)
    t0 = time.perf_counter()
    model = quantize_embedder(embedder, paths, settings, cache_dir)
    took = time.perf_counter() - t0
    record = {"fingerprint": embedder.fingerprint(False), "checkpoint": checkpoint.name,
              "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
              "openvino": ov.get_version().split("-")[0], "nncf": nncf.__version__,
              "calibration": {"source": source, "images": len(paths), "seed": settings.seed},
              "settings": {"keep": list(settings.keep), "fast_bias_correction": settings.fast_bias_correction,
                           "preset": settings.preset},
              "rest_precision": settings.rest_precision, "quantize_seconds": round(took, 1), "check": None}
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}."))
    try:
        ov.save_model(model, tmp / "model.xml", compress_to_fp16=False)
        atomic_write_json(record, tmp / QUANTIZED_RECORD)
        if folder.exists():
            shutil.rmtree(folder)
        tmp.rename(folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("quantized %s on %d calibration images in %.0f s -> %s", checkpoint, len(paths), took, folder)
    return QuantizeResult(folder, record)
