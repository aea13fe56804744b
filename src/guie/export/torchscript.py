"""TorchScript export: `torch.jit.script` of the exported module around members traced at their fixed resolution.

The file loads with `torch.jit.load` alone (no guie, timm or open_clip) — the PyTorch form the GUIE competition took.
Tracing is safe because the in-module resize makes each network's input shape fixed; the dynamic parts (input size,
[3,H,W] vs [B,3,H,W], dtype, TTA branches) live in the scripted wrapper.
"""
from __future__ import annotations

import io
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from ..models.embedder import Embedder
from ..models.heads import MAX_EMBED_DIM
from ..utils import atomic_write_bytes, log
from .metadata import METADATA_NAME, ExportError, ExportMetadata, build_metadata, validate_members
from .module import ExportedEmbedder, MemberPipeline, TTAConfig

TRACE_ATOL = 1e-4  # traced vs eager network on a batch size it was not traced with


@dataclass
class ExportResult:
    """Where an export went and what its self-check measured."""

    path: Path
    metadata: ExportMetadata
    max_abs_diff: float  # exported vs eager exported-module, on random images of odd sizes


def random_images(shapes: Sequence[tuple[int, ...]], seed: int = 0) -> list[torch.Tensor]:
    """Deterministic random uint8 tensors of the given shapes (test input for self-checks)."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, tuple(s), dtype=torch.uint8, generator=gen) for s in shapes]


def trace_network(embedder: Embedder, device: str | torch.device = "cpu") -> torch.jit.ScriptModule:
    """Trace an Embedder (uint8 [B,3,S,S] -> [B,d]) at its resolution S and check the trace on another batch size."""
    size = embedder.preprocess.image_size
    example, probe = random_images([(2, 3, size, size), (3, 3, size, size)], seed=1)
    embedder = embedder.eval().to(device)
    with torch.no_grad(), warnings.catch_warnings():
        # TracerWarnings flag Python values frozen into the graph (e.g. timm's dynamic SAME padding computed from the
        # input size): harmless at a fixed input size, and the comparison below catches any that is not.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", FutureWarning)  # TorchScript's deprecation notice: the format is the point
        traced = torch.jit.trace(embedder, example.to(device), check_trace=False)
        diff = float((traced(probe.to(device)) - embedder(probe.to(device))).abs().max())
    if not diff <= TRACE_ATOL:
        raise ExportError(f"the traced {embedder.spec.backbone} differs from the eager model by {diff:.3g} on a "
                          "batch of 3 (traced with 2): its forward depends on the batch size in a way tracing froze")
    return traced


def build_exported_module(embedders: Sequence[Embedder], tta: TTAConfig | None = None, trace: bool = False,
                          device: str | torch.device = "cpu", projection=None) -> ExportedEmbedder:
    """The ExportedEmbedder for these members: eager networks (trace=False, for ONNX and parity) or traced ones;
    `projection` (a ConcatPCA) concatenates and projects the members instead of averaging them."""
    tta = tta or TTAConfig()
    members = []
    for e in embedders:
        net = trace_network(e, device) if trace else e.eval().to(device)
        members.append(MemberPipeline(net, e.preprocess, tta))
    return ExportedEmbedder(members, projection).eval().to(device)


def _self_check(exported, reference: ExportedEmbedder, device) -> float:
    """Max abs difference between the exported and the eager module on odd-sized single and batched images."""
    diff = 0.0
    # optimized_execution(False): skip the profiling executor's per-shape specialisation, slow on first calls
    with torch.no_grad(), torch.jit.optimized_execution(False):
        for x in random_images([(3, 37, 91), (2, 3, 120, 80), (1, 3, 19, 19)], seed=2):
            x = x.to(device)
            diff = max(diff, float((exported(x) - reference(x)).abs().max()))
    return diff


def export_torchscript(embedders: Sequence[Embedder], path: str | Path, tta: TTAConfig | None = None,
                       checkpoints: Sequence[str | None] | None = None, device: str | torch.device = "cpu",
                       max_dim: int | None = MAX_EMBED_DIM, atol: float = TRACE_ATOL,
                       projection=None) -> ExportResult:
    """Export one model, or a shared-head ensemble, as a self-contained TorchScript file (written atomically).

    Args:
        embedders: the members (one for a single model); for several, check them with `check_shared_head` first.
        tta: views averaged inside the module (flip, letterbox).
        checkpoints: their checkpoint files, recorded in the metadata for later parity checks.
        device: where to trace (the file can be loaded elsewhere with torch.jit.load(map_location=...)).
        max_dim: refuse outputs wider than this (the GUIE limit, 64); None to allow any.
        projection: a `guie.export.projection.ConcatPCA`: concatenate the members and project (4th / 6th place).
    Raises:
        ExportError: invalid members, or the scripted module disagrees with the eager one by more than `atol`.
    """
    tta = tta or TTAConfig()
    validate_members(embedders, max_dim, projection)
    path = Path(path)
    log.info("tracing %d member(s) for TorchScript", len(embedders))
    module = build_exported_module(embedders, tta, trace=True, device=device, projection=projection)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        scripted = torch.jit.script(module)
    diff = _self_check(scripted, build_exported_module(embedders, tta, trace=False, device=device,
                                                       projection=projection), device)
    if not diff <= atol:
        raise ExportError(f"the scripted module differs from the eager one by {diff:.3g} (> {atol})")
    meta = build_metadata(embedders, tta, checkpoints, {"torchscript_vs_eager_max_abs": diff}, projection)
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.save(scripted, buf, _extra_files={METADATA_NAME: meta.to_json()})
    atomic_write_bytes(buf.getvalue(), path)
    log.info("wrote %s (%d-d, %d member(s), scripted vs eager max |diff| %.2g)", path, meta.embed_dim,
             len(embedders), diff)
    return ExportResult(path, meta, diff)
