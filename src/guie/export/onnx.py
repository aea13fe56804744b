"""ONNX export of the same module, with dynamic batch, height and width, checked in onnxruntime.

`torch.export` traces the eager module with symbolic B, H and W (so the resize geometry of `guie.imaging.geometry`
stays in the graph, as float64 products whose weights are computed from the input's shape), then torch's ONNX
exporter (onnxscript) translates it at opset >= 18. Input "images": uint8 [B,3,H,W]; output "embeddings": float32
[B,d].
"""
from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from ..models.embedder import Embedder
from ..models.heads import MAX_EMBED_DIM
from ..utils import log
from .metadata import ONNX_METADATA_KEY, ExportError, build_metadata, validate_members
from .module import TTAConfig
from .torchscript import ExportResult, build_exported_module, random_images

ONNX_OPSET = 18          # the oldest opset guie's exports are verified with
ONNX_ATOL = 5e-3         # onnxruntime's float kernels vs torch's (the resized pixels are identical)
EXTERNAL_DATA_BYTES = 1_500_000_000  # protobuf's 2 GiB limit: larger weights go to a side file


@contextlib.contextmanager
def _quiet_exporter_logs():
    """The exporter's libraries log every graph pass at INFO; keep guie's own log readable."""
    loggers = [logging.getLogger(n) for n in ("onnx_ir", "onnxscript", "torch.onnx", "torch.export")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _session(path: Path, device: str = "cpu"):
    import onnxruntime as ort

    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if device.startswith("cuda") else \
        ["CPUExecutionProvider"]
    return ort.InferenceSession(str(path), providers=providers)


def onnx_embed(session, images: torch.Tensor) -> np.ndarray:
    """Run an exported ONNX model on uint8 [B,3,H,W] (or [3,H,W]) images."""
    x = images.unsqueeze(0) if images.dim() == 3 else images
    return session.run(None, {session.get_inputs()[0].name: x.cpu().numpy()})[0]


def export_onnx(embedders: Sequence[Embedder], path: str | Path, tta: TTAConfig | None = None,
                checkpoints: Sequence[str | None] | None = None, opset: int = ONNX_OPSET,
                max_dim: int | None = MAX_EMBED_DIM, atol: float = ONNX_ATOL, projection=None) -> ExportResult:
    """Export one model or a shared-head ensemble to ONNX (dynamic B, H, W) and verify it in onnxruntime.

    The file (and, for models over ~1.5 GB, its `<name>.data` weights file) appears only once verified.
    Raises:
        ExportError: invalid members, an export failure, or onnxruntime disagreeing with PyTorch by more than `atol`.
    """
    if opset < ONNX_OPSET:
        raise ExportError(f"opset {opset} is older than {ONNX_OPSET}, the oldest guie's ONNX export is verified with")
    tta = tta or TTAConfig()
    validate_members(embedders, max_dim, projection)
    path = Path(path)
    module = build_exported_module(embedders, tta, trace=False, device="cpu", projection=projection)
    size = max(e.preprocess.image_size for e in embedders)
    # H != W and both unlike any constant in the code, so that no symbolic size gets specialised to the example's
    (example,) = random_images([(2, 3, size + 13, size + 29)], seed=3)
    dims = {0: torch.export.Dim("batch", min=1), 2: torch.export.Dim("height", min=2),
            3: torch.export.Dim("width", min=2)}
    log.info("exporting %d member(s) to ONNX (opset %d)", len(embedders), opset)
    try:
        with torch.no_grad(), warnings.catch_warnings(), _quiet_exporter_logs():
            warnings.simplefilter("ignore", UserWarning)
            program = torch.export.export(module, (example,), dynamic_shapes=(dims,), strict=False)
            onnx_program = torch.onnx.export(program, (example,), dynamo=True, opset_version=opset,
                                             input_names=["images"], output_names=["embeddings"], verbose=False)
    except Exception as e:  # the exporters raise many types; name the step and keep the cause
        raise ExportError(f"ONNX export failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from e
    n_bytes = sum(p.numel() * p.element_size() for p in module.parameters())
    external = n_bytes > EXTERNAL_DATA_BYTES
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}."))
    try:
        tmp = tmp_dir / path.name
        with _quiet_exporter_logs():
            onnx_program.save(tmp, external_data=external)
        diff = _verify(tmp, module)
        if not diff <= atol:
            raise ExportError(f"onnxruntime differs from PyTorch by {diff:.3g} (> {atol}) on odd-sized test images")
        meta = build_metadata(embedders, tta, checkpoints, {"onnx_vs_eager_max_abs": diff, "opset": opset},
                              projection)
        _write_metadata(tmp, meta.to_json())
        for f in tmp_dir.iterdir():
            os.replace(f, path.parent / f.name)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    log.info("wrote %s (%d-d, %d member(s), onnxruntime vs eager max |diff| %.2g)", path, meta.embed_dim,
             len(embedders), diff)
    return ExportResult(path, meta, diff)


def _verify(path: Path, module) -> float:
    session = _session(path)
    diff = 0.0
    with torch.no_grad():
        for x in random_images([(1, 3, 37, 91), (2, 3, 120, 80), (1, 3, 19, 19)], seed=2):
            diff = max(diff, float(np.abs(onnx_embed(session, x) - module(x).numpy()).max()))
    return diff


def _write_metadata(path: Path, text: str) -> None:
    """Add the guie metadata to an ONNX file in place (external weight files, if any, are left untouched)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    entry = next((p for p in model.metadata_props if p.key == ONNX_METADATA_KEY), None) or model.metadata_props.add()
    entry.key, entry.value = ONNX_METADATA_KEY, text
    onnx.save(model, str(path))
