"""The runtime registry's base: the entry type, the registry, the runtime interface and the choice checks.

Its own module so that each runtime module registers itself by importing this one, never its package's
`__init__` (which imports the runtimes): no import cycle.
"""
from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ...errors import EnvironmentProblem, InputError

if TYPE_CHECKING:
    import numpy as np
    import torch

    from ...models.embedder import Embedder

RUNTIME_CHOICES = ("auto", "torch", "openvino", "onnxruntime")
PRECISION_CHOICES = ("auto", "fp32", "bf16", "int8")
BF16_TOLERANCE = 0.002  # mP@5 a precision may lose on any domain and still be chosen by "auto"


class RuntimeUnavailable(EnvironmentProblem):
    """The runtime asked for cannot run here (not installed, unsupported CPU, a model it cannot convert)."""


@dataclass(frozen=True)
class RuntimeEntry:
    """One registry entry: a runtime, what it serves, why it cannot run here (None: it can), how to build it."""

    name: str
    devices: tuple[str, ...]          # device types it runs on ("cpu", "cuda")
    precisions: tuple[str, ...]       # precisions it offers (never "auto")
    unavailable: Callable[[], str | None]
    build: Callable[..., InferenceRuntime]


_REGISTRY: dict[str, RuntimeEntry] = {}


def register_runtime(entry: RuntimeEntry) -> RuntimeEntry:
    """Add (or replace) a runtime in the registry."""
    _REGISTRY[entry.name] = entry
    return entry


class InferenceRuntime:
    """A model prepared for inference: call it with uint8 images [B, 3, S, S] for float32 [B, d] (a torch tensor on
    `device`). Thread-safe. `parallel` is how many callers it serves at once at full speed (the engine and the
    search server run that many forward threads), `threads_each` the torch intra-op threads each of those uses
    (None: leave torch's count alone)."""

    name: str = "?"
    precision: str = "fp32"
    parallel: int = 1
    threads_each: int | None = None

    def __init__(self, device: torch.device, features: bool):
        self.device, self.features = device, features

    def __call__(self, images: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def numpy(self, images: torch.Tensor) -> np.ndarray:
        """The forward as a float32 numpy array on the host."""
        return self(images).cpu().numpy()

    @property
    def layout(self) -> str:
        """The thread layout in words, for the log line."""
        return f"{self.parallel} forward(s) at once"

    def close(self) -> None:
        """Free the runtime's resources (idempotent)."""


def _env_choice(value: str, env: str, choices: tuple[str, ...], what: str) -> str:
    if value in (None, "auto"):
        value = os.environ.get(env) or "auto"
    value = str(value).strip().lower()
    if value not in choices:
        raise InputError(f"unknown {what} {value!r}: choose from {', '.join(choices)}")
    return value


def check_choice(runtime: str | None = "auto", precision: str | None = "auto") -> tuple[str, str]:
    """Validate runtime and precision names ("auto" resolved only later, by `create_runtime`)."""
    return (_env_choice(runtime, "GUIE_RUNTIME", RUNTIME_CHOICES, "runtime"),
            _env_choice(precision, "GUIE_PRECISION", PRECISION_CHOICES, "precision"))


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AMX-BF16 or AVX512-BF16 on x86; BF16 on ARM), from /proc/cpuinfo."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    flags = set()
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            flags.update(line.split(":", 1)[1].split())
            break
    return bool(flags & {"amx_bf16", "avx512_bf16", "bf16"})


QUANTIZED_SUFFIX = ".int8"  # `model.pt` -> `model.int8/`: the int8 model beside its checkpoint
QUANTIZED_RECORD = "quantized.json"


def quantized_folder(checkpoint: str | Path) -> Path:
    """Where a checkpoint's int8 model lives (`guie.export.quantize` writes it): beside the checkpoint, `<stem>.int8/`
    with the OpenVINO IR (`model.xml`, `model.bin`) and `quantized.json` (the model's fingerprint, the calibration,
    the measured mP@5 loss per domain). The fp32 checkpoint itself is never touched."""
    path = Path(checkpoint)
    return path.with_name(path.stem + QUANTIZED_SUFFIX)


def quantized_record(embedder: Embedder) -> dict | None:
    """The record of the int8 model beside the checkpoint `embedder` was loaded from, with its `folder`; None when
    the model has no checkpoint, there is no int8 model, or it was made from other weights or preprocessing (its
    fingerprint differs: a retrained or resized model never runs a stale int8 model)."""
    import json

    checkpoint = getattr(embedder, "checkpoint_path", None)
    if checkpoint is None:
        return None
    folder = quantized_folder(checkpoint)
    try:
        record = json.loads((folder / QUANTIZED_RECORD).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or record.get("fingerprint") != embedder.fingerprint(False):
        return None
    return {**record, "folder": str(folder)}


def precision_checks(embedder: Embedder) -> dict:
    """A model's recorded accuracy checks per precision: {"bf16": {"domains": {name: mP@5 loss}, ...}, "int8": ...}.

    bf16: from its checkpoint's `extra["precision_checks"]` (written by `guie.evaluate.precision`); int8: from the
    record of its int8 model (`quantized_record`), so the check goes with the quantized model it measured. Empty
    for a fresh model."""
    checks = dict(getattr(embedder, "precision_checks", None) or {})
    checks.pop("int8", None)  # only the int8 model's own record counts
    record = quantized_record(embedder)
    if record and record.get("check"):
        checks["int8"] = record["check"]
    return checks


def precision_passes(embedder: Embedder, precision: str, tolerance: float = BF16_TOLERANCE) -> bool:
    """Whether the model's recorded check of `precision` lost at most `tolerance` mP@5 on every domain."""
    losses = (precision_checks(embedder).get(precision) or {}).get("domains") or {}
    return bool(losses) and all(float(v) <= tolerance for v in losses.values())
