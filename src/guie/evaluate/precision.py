"""Accuracy checks of lower precisions: what a model loses in mP@5 when its forward runs in bf16 or int8 instead of
fp32, per domain, recorded with the model so that `--precision auto` may choose that precision for it.

`measure_precision` embeds one split (test by default: classes never trained on) of each built-in benchmark named
(emoji, glyphs, icons: one domain each) twice through the same pixels: with OpenVINO in fp32 (which equals torch within
1e-5) and at the precision under test, scores both with the exact GUIE metric (leave-one-style-out folds, as `guie
benchmark`), and reports the loss per domain (fp32 mP@5 minus the precision's: positive = worse), the vectors'
largest difference and their mean cosine. `record_precision_check` writes the result into the checkpoint's
`extra["precision_checks"]` (bf16; the weights are not touched) or into the int8 model's own record (int8, see
`guie.export.quantize`). `guie.embedding.runtimes` reads them: "auto" picks a precision only where the recorded loss is
at most `BF16_TOLERANCE` (0.002) on every domain checked, on a CPU that runs it natively.
"""
from __future__ import annotations

import datetime as dt
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ..data.benchmarks import get_benchmark
from ..embedding.engine import embed_images
from ..embedding.runtimes import BF16_TOLERANCE, InferenceRuntime, create_runtime, quantized_folder
from ..embedding.runtimes.base import QUANTIZED_RECORD
from ..errors import InputError
from ..models.embedder import Embedder, read_checkpoint, resolve_embedder
from ..utils import atomic_save, atomic_write_json, log
from .benchmarks import benchmark_frame
from .protocol import evaluate_folds

CHECKED_PRECISIONS = ("bf16", "int8")


@dataclass
class PrecisionCheck:
    """One precision's check on a model: per domain, fp32 mP@5, the precision's mP@5 and the loss between them."""

    precision: str
    split: str
    domains: dict[str, float] = field(default_factory=dict)   # mP@5 lost (fp32 - precision); what "auto" reads
    fp32: dict[str, float] = field(default_factory=dict)
    scores: dict[str, float] = field(default_factory=dict)
    images: dict[str, int] = field(default_factory=dict)
    max_abs_diff: dict[str, float] = field(default_factory=dict)
    mean_cosine: dict[str, float] = field(default_factory=dict)
    tolerance: float = BF16_TOLERANCE
    runtime: str = "openvino"
    measured: str = ""
    machine: str = ""

    @property
    def passes(self) -> bool:
        """Whether every domain lost at most `tolerance` (what lets "auto" choose the precision)."""
        return bool(self.domains) and all(v <= self.tolerance for v in self.domains.values())

    def to_record(self) -> dict:
        """The JSON-ready record stored with the model."""
        return {**asdict(self), "passes": self.passes}

    def table_rows(self) -> list[dict]:
        """One row per domain, for `guie.evaluate.report.format_table`."""
        return [{"domain": d, "images": self.images[d], "fp32": self.fp32[d], self.precision: self.scores[d],
                 "loss": self.domains[d], "max |diff|": self.max_abs_diff[d], "mean cos": self.mean_cosine[d]}
                for d in self.domains]


def _machine() -> str:
    import os

    name = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{name}, {os.cpu_count()} cores"


def measure_precision(model: str | Path | Embedder, precision: str, benchmarks: Sequence[str] = ("emoji",),
                      split: str = "test", cache_dir: str | Path | None = None, batch_size: int = 64,
                      progress: bool = True, runtime: InferenceRuntime | None = None,
                      reference: dict | None = None) -> PrecisionCheck:
    """mP@5 of `model` on each benchmark's `split` with its forward on OpenVINO fp32 and at `precision` (bf16 or
    int8), and the loss per domain.

    `runtime`: the forward under test, already created (e.g. a candidate int8 model); default
    `create_runtime(model, "openvino", precision)`. `reference`: a dict filled with (and reused for) the fp32 scores
    and vectors per benchmark, so several candidates are compared against one fp32 pass."""
    if precision not in CHECKED_PRECISIONS:
        raise InputError(f"precision {precision!r}: a check compares bf16 or int8 with fp32")
    embedder = resolve_embedder(model)
    if runtime is None:
        runtime = create_runtime(embedder, "openvino", precision, "cpu")
    fp32_rt = None
    reference = {} if reference is None else reference
    check = PrecisionCheck(precision, split, runtime=runtime.name,
                           measured=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                           machine=_machine())
    for name in benchmarks:
        bench = get_benchmark(name)
        df = benchmark_frame(name, split, cache_dir)
        paths = df["path"].astype(str).tolist()
        if name not in reference:
            fp32_rt = fp32_rt or create_runtime(embedder, "openvino", "fp32", "cpu")
            ref = embed_images(embedder, paths, batch_size, runtime=fp32_rt, progress=progress, desc=f"{name} fp32")
            ev = evaluate_folds(df[ref.ok].reset_index(drop=True), ref.embeddings, by=bench.folds_by)
            reference[name] = {"ok": ref.ok, "vectors": ref.embeddings, "score": ev.score}
        ref = reference[name]
        got = embed_images(embedder, paths, batch_size, runtime=runtime, progress=progress,
                           desc=f"{name} {precision}")
        if not np.array_equal(got.ok, ref["ok"]):
            raise RuntimeError(f"benchmark {name}: the two passes decoded different images")
        ev = evaluate_folds(df[got.ok].reset_index(drop=True), got.embeddings, by=bench.folds_by)
        diff = got.embeddings - ref["vectors"]
        cos = np.sum(got.embeddings * ref["vectors"], axis=1) / np.maximum(
            np.linalg.norm(got.embeddings, axis=1) * np.linalg.norm(ref["vectors"], axis=1), 1e-12)
        check.fp32[name] = round(float(ref["score"]), 6)
        check.scores[name] = round(float(ev.score), 6)
        check.domains[name] = round(float(ref["score"] - ev.score), 6)
        check.images[name] = int(got.ok.sum())
        check.max_abs_diff[name] = float(f"{float(np.abs(diff).max()):.3g}") if len(diff) else 0.0
        check.mean_cosine[name] = round(float(cos.mean()), 6) if len(cos) else 1.0
        log.info("precision check %s on %s (%s split, %d images): fp32 %.4f, %s %.4f, loss %+.4f", precision, name,
                 split, check.images[name], ref["score"], precision, ev.score, check.domains[name])
    return check


def record_precision_check(checkpoint: str | Path, check: PrecisionCheck) -> Path:
    """Store `check` with the model: bf16 in the checkpoint's `extra["precision_checks"]` (rewritten atomically, the
    weights as they were), int8 in the record of the int8 model beside it (`quantized.json`). Returns the file
    written."""
    checkpoint = Path(checkpoint)
    if check.precision == "int8":
        path = quantized_folder(checkpoint) / QUANTIZED_RECORD
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            raise InputError(f"{checkpoint}: no int8 model to record a check for ({path} missing or damaged); make "
                             "one with guie quantize") from None
        record["check"] = check.to_record()
        atomic_write_json(record, path)
        return path
    payload = read_checkpoint(checkpoint)
    extra = dict(payload.get("extra") or {})
    extra["precision_checks"] = {**(extra.get("precision_checks") or {}), check.precision: check.to_record()}
    payload["extra"] = extra
    return atomic_save(payload, checkpoint)
