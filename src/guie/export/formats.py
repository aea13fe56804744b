"""One entry point for both export formats: the file's suffix (or `format`) picks TorchScript or ONNX."""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from ..errors import InputError
from ..models.embedder import Embedder
from ..models.heads import MAX_EMBED_DIM
from .module import TTAConfig
from .torchscript import ExportResult

FORMATS = ("auto", "torchscript", "onnx")


def format_for(out: str | Path, format: str = "auto") -> str:
    """The export format for output file `out`: `format` itself, or for "auto" onnx if it ends in .onnx, else
    torchscript."""
    if format not in FORMATS:
        raise InputError(f"format {format!r}: choose from {', '.join(FORMATS)}")
    if format == "auto":
        return "onnx" if Path(out).suffix == ".onnx" else "torchscript"
    return format


def export_model(members: Embedder | Sequence[Embedder | str | Path], out: str | Path, tta: TTAConfig | None = None,
                 format: str = "auto", checkpoints: Sequence[str | None] | None = None, device: str = "auto",
                 max_dim: int | None = MAX_EMBED_DIM, projection=None) -> ExportResult:
    """Export a model, or a shared-head ensemble (several members), as a competition-format TorchScript (.pt) or
    ONNX (.onnx) file: raw uint8 RGB images of any size in, float32 [B, d] L2-normalised embeddings out.

    `members` are Embedders or guie checkpoint files (loaded with `load_members`, which refuses members without a
    shared head; their paths are recorded as `checkpoints`). `device` is where TorchScript traces ("auto":
    `guie.utils.resolve_device`). `projection` (a `guie.export.projection.ConcatPCA`) concatenates the members and
    projects them instead of averaging (they need no shared head then).
    """
    from ..utils import resolve_device
    from .ensemble import load_members

    device = resolve_device(device)

    if isinstance(members, Embedder):
        members = [members]
    members = list(members)
    if members and not isinstance(members[0], Embedder):
        checkpoints = checkpoints or [str(m) for m in members]
        if projection is None:
            members = load_members(members)
        else:  # concatenated, not averaged: no shared head needed
            from ..models.embedder import load_embedder

            members = [load_embedder(m) for m in members]
    if format_for(out, format) == "onnx":
        from .onnx import export_onnx

        return export_onnx(members, out, tta, checkpoints, max_dim=max_dim, projection=projection)
    from .torchscript import export_torchscript

    return export_torchscript(members, out, tta, checkpoints, device=device, max_dim=max_dim, projection=projection)
