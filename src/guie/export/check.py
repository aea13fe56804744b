"""`guie check-submission`: verify an exported model against the submission contract, in a clean process.

The model runs in a fresh interpreter (`python -I guie/export/_probe.py`) that may import torch / onnxruntime but
not guie, timm or open_clip, exactly as a consumer would load it. This process builds the test images, computes the
training-time reference (PIL resizing + eager Embedders, when checkpoints are known) and judges the results.
"""
from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from ..models.heads import MAX_EMBED_DIM
from .metadata import ExportError, ExportMetadata, read_metadata
from .module import TTAConfig

PROBE = Path(__file__).with_name("_probe.py")
PASS, FAIL, WARN, SKIP, INFO = "PASS", "FAIL", "WARN", "SKIP", "INFO"

# (name, height, width, grayscale): the odd sizes a GUIE test set holds
ODD_SIZES = [("wide 500x37", 37, 500, False), ("tall 37x500", 500, 37, False), ("photo 4000x3000", 3000, 4000, False),
             ("grayscale 320x240", 240, 320, True), ("tiny 13x9", 9, 13, False)]
BATCH_NAME = "batch 3x(160x120)"


@dataclass
class Check:
    """One line of the report."""

    name: str
    status: str
    detail: str = ""


@dataclass
class CheckReport:
    """All checks of one model, with the measured figures (parity, latency) for README tables and CI."""

    model: str
    checks: list[Check] = field(default_factory=list)
    figures: dict = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return all(c.status != FAIL for c in self.checks)

    def add(self, name: str, status: str, detail: str = "") -> None:
        self.checks.append(Check(name, status, detail))

    def table(self) -> str:
        """The checks as a console table."""
        import io

        from rich.console import Console
        from rich.table import Table

        verdict = "all checks passed" if self.ok else f"{sum(c.status == FAIL for c in self.checks)} check(s) FAILED"
        table = Table(title=f"check-submission {self.model}: {verdict}")
        for column in ("check", "status", "detail"):
            table.add_column(column)
        for c in self.checks:
            table.add_row(c.name, c.status, c.detail)
        console = Console(file=io.StringIO(), width=140, force_terminal=False)
        console.print(table)
        return console.file.getvalue()

    def to_dict(self) -> dict:
        return {"model": self.model, "ok": self.ok, "checks": [asdict(c) for c in self.checks],
                "figures": self.figures}


def synthetic_image(height: int, width: int, seed: int, grayscale: bool = False) -> np.ndarray:
    """A smooth, photo-like random RGB image as uint8 [3,H,W] (coarse colour field upsampled + fine noise).

    Pure noise would make every resize difference look large; real photos are mostly low-frequency.
    """
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8), "RGB")
    img = np.asarray(coarse.resize((width, height), Image.Resampling.BICUBIC), dtype=np.float32)
    img = np.clip(img + rng.normal(0, 8, img.shape), 0, 255).astype(np.uint8)
    if grayscale:  # what Image.open(p).convert("RGB") gives for a grey JPEG: three equal channels
        img = np.repeat(np.asarray(Image.fromarray(img, "RGB").convert("L"))[..., None], 3, axis=2)
    return np.ascontiguousarray(img.transpose(2, 0, 1))


def identity_side(preprocess) -> int:
    """Side of a square image that the member's preprocessing passes on without resampling (crop only, or nothing):
    on it, exported and training-time preprocessing give the network identical pixels."""
    if preprocess.resize_mode == "crop":
        return round(preprocess.image_size / preprocess.crop_pct)
    return preprocess.image_size


def _load_references(checkpoints: Sequence[str | Path] | None, meta: ExportMetadata | None, report: CheckReport):
    from ..models.embedder import load_embedder

    if checkpoints:
        paths = [Path(c) for c in checkpoints]
    elif meta and all(m.get("checkpoint") for m in meta.members):
        paths = [Path(m["checkpoint"]) for m in meta.members]
        missing = [str(p) for p in paths if not p.is_file()]
        if missing:
            report.add("parity with training-time model", SKIP,
                       f"recorded checkpoint(s) no longer found: {', '.join(missing)}; name the checkpoints to "
                       "compare with")
            return None
    else:
        report.add("parity with training-time model", SKIP, "no checkpoint known: pass --checkpoint")
        return None
    return [load_embedder(p) for p in paths]


def _run_probe(model: Path, inputs: dict[str, np.ndarray], device: str, latency_runs: int, timeout: float,
               workdir: Path) -> tuple[dict, dict[str, np.ndarray], str]:
    np.savez(workdir / "inputs.npz", **inputs)
    cmd = [sys.executable, "-I", str(PROBE), "--model", str(model.resolve()), "--inputs", str(workdir / "inputs.npz"),
           "--out", str(workdir), "--device", device, "--latency-runs", str(latency_runs)]
    # cwd outside any source tree, -I: no user site, no PYTHONPATH, no script folder on sys.path
    proc = subprocess.run(cmd, cwd=workdir, capture_output=True, text=True, timeout=timeout)
    results_file = workdir / "results.json"
    if not results_file.is_file():
        tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise ExportError(f"{model}: the probe process exited with {proc.returncode}: {tail}")
    outputs = dict(np.load(workdir / "outputs.npz")) if (workdir / "outputs.npz").is_file() else {}
    return json.loads(results_file.read_text()), outputs, proc.stderr


def _top5_agreement(a: np.ndarray, b: np.ndarray, k: int = 5) -> float:
    """Share of rows whose k nearest other rows (Euclidean) are the same, in the same order, under a and b."""
    def knn(x):
        x = x.astype(np.float64)
        sq = (x * x).sum(1)
        d = sq[:, None] + sq[None, :] - 2 * x @ x.T
        np.fill_diagonal(d, np.inf)
        return np.argsort(d, axis=1, kind="stable")[:, :k]

    return float((knn(a) == knn(b)).all(axis=1).mean())


def check_submission(model: str | Path, checkpoints: Sequence[str | Path] | None = None,
                     references: Sequence | None = None, images: Sequence[str | Path] | None = None,
                     tta: TTAConfig | None = None,
                     max_dim: int = MAX_EMBED_DIM, device: str = "cpu", latency_runs: int = 5,
                     network_atol: float = 1e-4, min_cosine: float = 0.99, timeout: float = 600) -> CheckReport:
    """Check an exported TorchScript (.pt) or ONNX (.onnx) model against the GUIE submission contract.

    Args:
        checkpoints: the guie checkpoints it was exported from, for parity (default: those recorded in the file).
        references: the Embedders themselves, instead of checkpoints (e.g. a soup that exists only in memory).
        images: real image files to add to the synthetic odd-sized ones (end-to-end parity, top-5 agreement).
        tta: the TTA the model was exported with, for models without guie metadata.
        network_atol: max abs difference allowed where both paths feed the network identical pixels.
        min_cosine: min cosine similarity allowed end to end (PIL vs in-model resizing differ slightly).
    """
    from ..imaging.io import ImageLoadError, load_image
    from ..models.preprocess import pil_to_uint8

    model = Path(model)
    report = CheckReport(str(model))
    if not model.is_file():
        report.add("model file", FAIL, f"not found: {model}")
        return report
    if model.suffix != ".onnx" and not zipfile.is_zipfile(model):
        report.add("model file", FAIL, f"{model} is neither a TorchScript archive (a zip) nor a .onnx file")
        return report
    try:
        meta = read_metadata(model)
    except Exception as e:  # a foreign or damaged file: the probe still judges it
        meta = None
        report.add("guie metadata", WARN, f"unreadable ({type(e).__name__}: {e})")
    if meta is not None:
        tta = TTAConfig(**meta.tta)
        report.add("guie metadata", INFO, f"{meta.embed_dim}-d, {len(meta.members)} member(s), TTA "
                                          f"{','.join(k for k in ('flip', 'letterbox') if meta.tta.get(k)) or 'none'}")
    tta = tta or TTAConfig()
    if references is None:
        references = _load_references(checkpoints, meta, report)
    projection = None
    if meta is not None and meta.projection:
        from .projection import ConcatPCA

        projection = ConcatPCA.from_dict(meta.projection)
        report.add("members concatenated + PCA", INFO, f"{projection.member_dims} -> {projection.dim} dims, fitted "
                                                       f"on {projection.fitted_on.get('images', '?')} images")

    inputs: dict[str, np.ndarray] = {}
    native = None
    if references:
        sides = {identity_side(e.preprocess) for e in references}
        if len(sides) == 1:
            side = sides.pop()
            native = f"native {side}x{side}"
            inputs[native] = synthetic_image(side, side, seed=0)
    for i, (name, h, w, gray) in enumerate(ODD_SIZES):
        inputs[name] = synthetic_image(h, w, seed=10 + i, grayscale=gray)
    inputs[BATCH_NAME] = np.stack([synthetic_image(120, 160, seed=20 + i) for i in range(3)])
    real_names = []
    for p in images or []:
        try:
            arr = pil_to_uint8(load_image(p)).numpy()
        except ImageLoadError as e:
            report.add("read test image", WARN, str(e))
            continue
        name = f"image {len(real_names)}: {Path(str(p)).name}"
        inputs[name] = arr
        real_names.append(name)

    with tempfile.TemporaryDirectory(prefix="guie-check-") as tmp:
        try:
            res, outputs, _ = _run_probe(model, inputs, device, latency_runs, timeout, Path(tmp))
        except (RuntimeError, subprocess.TimeoutExpired) as e:
            report.add("runs in a clean process", FAIL, str(e))
            return report
    _judge_probe(report, res, outputs, inputs, max_dim)
    if references and not res.get("load_error"):
        _judge_parity(report, references, tta, inputs, outputs, native, real_names, network_atol, min_cosine,
                      projection)
    return report


def _judge_probe(report: CheckReport, res: dict, outputs: dict, inputs: dict, max_dim: int) -> None:
    if res.get("load_error"):
        blocked = res.get("blocked_imports") or []
        extra = f" (it tried to import {', '.join(sorted(set(blocked)))})" if blocked else ""
        report.add("loads without guie/timm/open_clip", FAIL, res["load_error"] + extra)
        return
    backend = res["backend"]
    report.add("loads without guie/timm/open_clip", PASS, f"{backend}, {res['load_seconds']:.1f} s, python "
                                                          f"{res['python']}, device {res['device']}")
    runs = res["runs"]
    failed = {n: r["error"] for n, r in runs.items() if r["error"]}
    odd = [n for n, *_ in ODD_SIZES]
    for name in odd + [BATCH_NAME]:
        if name in failed:
            report.add(f"input {name}", FAIL, failed[name])
    if not any(n in failed for n in odd + [BATCH_NAME]):
        report.add("odd sizes and grayscale", PASS, ", ".join(odd) + f", {BATCH_NAME}")
    others = {n: e for n, e in failed.items() if n not in odd and n != BATCH_NAME}
    if others:
        report.add("other inputs", FAIL, "; ".join(f"{n}: {e}" for n, e in list(others.items())[:3]))
    ok = {n: r for n, r in runs.items() if not r["error"]}
    if not ok:
        return
    bad_shape = [f"{n}: {r['shape']} for input {r['input_shape']}" for n, r in ok.items()
                 if len(r["shape"]) != 2 or r["shape"][0] != (r["input_shape"][0] if len(r["input_shape"]) == 4 else 1)]
    dims = sorted({r["shape"][-1] for r in ok.values()})
    if bad_shape:
        report.add("output shape [B,d]", FAIL, "; ".join(bad_shape[:3]))
    elif len(dims) != 1 or dims[0] > max_dim:
        report.add("output shape [B,d]", FAIL, f"d = {dims}: must be one value <= {max_dim}")
    else:
        report.add("output shape [B,d]", PASS, f"d = {dims[0]} <= {max_dim}")
    report.figures["embed_dim"] = dims[0] if len(dims) == 1 else dims
    dtypes = sorted({r["dtype"] for r in ok.values()})
    report.add("dtype float32", PASS if dtypes == ["float32"] else FAIL, ", ".join(dtypes))
    nonfinite = [n for n, r in ok.items() if not r["finite"]]
    report.add("finite values", FAIL if nonfinite else PASS,
               ("NaN/inf for " + ", ".join(nonfinite)) if nonfinite else "")
    norms = np.concatenate([np.linalg.norm(outputs[n].reshape(-1, outputs[n].shape[-1]), axis=1) for n in ok])
    off = float(np.abs(norms - 1).max())
    report.add("L2-normalised", PASS if off < 1e-3 else WARN,
               f"max | |e| - 1 | = {off:.1e}" + ("" if off < 1e-3 else " (k-NN works, but cosine != Euclidean order)"))
    if backend == "torchscript":
        if "rank4_error" in res:
            report.add("single image [3,H,W] and [1,3,H,W]", FAIL, res["rank4_error"])
        else:
            d = res.get("rank4_vs_rank3_max_abs", float("nan"))
            report.add("single image [3,H,W] and [1,3,H,W]", PASS if d <= 1e-6 else FAIL, f"max |diff| {d:.1e}")
        if "float_input_error" in res:
            report.add("float input in [0,1]", WARN, res["float_input_error"])
        elif "float_input_max_abs" in res:
            d = res["float_input_max_abs"]
            report.add("float input in [0,1]", PASS if d <= 1e-2 else WARN, f"max |diff| vs uint8 {d:.1e}")
    else:
        report.add("single image", INFO, "ONNX input is rank 4: pass one image as [1,3,H,W]")
    if "batch_error" in res:
        report.add("batch rows == single images", FAIL, res["batch_error"])
    elif "batch_vs_single_max_abs" in res:
        d = res["batch_vs_single_max_abs"]
        report.add("batch rows == single images", PASS if d <= 1e-4 else FAIL, f"max |diff| {d:.1e}")
        report.figures["batch_vs_single_max_abs"] = d
    if "determinism_error" in res:
        report.add("deterministic", FAIL, res["determinism_error"])
    elif "determinism_max_abs" in res:
        d = res["determinism_max_abs"]
        report.add("deterministic", PASS if d <= 1e-6 else FAIL, f"max |diff| between two runs {d:.1e}")
    if "latency" in res:
        lat = res["latency"]
        threads = f", {lat['threads']} threads" if lat.get("threads") else ""
        report.add(f"latency ({res['device']})", INFO, f"{lat['median_ms']:.1f} ms/image (median of {lat['runs']}, "
                                                       f"{lat['image']}, batch 1{threads})")
        report.figures["latency_ms"] = lat["median_ms"]
    elif "latency_error" in res:
        report.add("latency", FAIL, res["latency_error"])


def _judge_parity(report, references, tta, inputs, outputs, native, real_names, network_atol, min_cosine,
                  projection=None) -> None:
    from .reference import reference_embed

    singles = [n for n, x in inputs.items() if x.ndim == 3 and n in outputs]
    pil = [Image.fromarray(np.ascontiguousarray(inputs[n].transpose(1, 2, 0)), "RGB") for n in singles]
    ref = dict(zip(singles, reference_embed(references, pil, tta, projection=projection)))
    if native in outputs:
        d = float(np.abs(outputs[native][0] - ref[native]).max())
        report.add("network parity (same pixels)", PASS if d <= network_atol else FAIL,
                   f"max |exported - eager| = {d:.1e} on {native} (limit {network_atol:.0e})")
        report.figures["network_max_abs"] = d
    else:
        report.add("network parity (same pixels)", SKIP, "members need different input sizes for a resample-free "
                                                          "comparison; see end-to-end parity")
    e2e = [n for n in singles if n != native]
    if not e2e:
        return
    a = np.stack([outputs[n][0] for n in e2e])
    b = np.stack([ref[n] for n in e2e])
    cos = (a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-12)
    worst = e2e[int(np.argmin(cos))]
    d = float(np.abs(a - b).max())
    report.add("end-to-end parity (resize in model vs PIL)", PASS if cos.min() >= min_cosine else FAIL,
               f"max |diff| {d:.1e}, min cosine {cos.min():.5f} ({worst}) over {len(e2e)} images")
    report.figures.update({"end_to_end_max_abs": d, "end_to_end_min_cosine": float(cos.min())})
    if len(real_names) > 5:
        idx = [e2e.index(n) for n in real_names if n in e2e]
        agree = _top5_agreement(a[idx], b[idx])
        report.add("same top-5 neighbours as eager", INFO, f"{agree:.1%} of {len(idx)} images")
        report.figures["top5_agreement"] = agree
