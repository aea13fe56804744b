"""Inference runtimes: which engine runs a model's forward for vectors (torch, OpenVINO, ONNX Runtime), at which
precision, with which thread layout. Training always runs on torch; this is the inference side only.

A runtime is one registry entry (`register_runtime`): its name, the precisions and devices it serves, a check that
says why it cannot run here (or None), and a builder. `create_runtime(embedder, runtime, precision, device)` resolves
"auto" and returns an `InferenceRuntime`: a callable uint8 images [B, 3, S, S] (the model's input, as
`embedder.transform` makes it) -> float32 [B, d] on the runtime's device, safe to call from several threads at once.
A new runtime or precision (e.g. int8) is one more entry; nothing else changes.

Choices of "auto" (logged once per process with the reason, `guie.utils.log`):
  * runtime: OpenVINO on a CPU (2-2.5x torch's eager fp32 forward on the same numbers, benchmarks/cpu_runtimes.py);
    torch on CUDA; torch where OpenVINO is missing or cannot run (one line says why).
  * precision: on CUDA bf16 autocast (as before); on a CPU int8 where the model has an int8 model (`guie
    quantize`, `quantized_folder`) whose recorded loss is within 0.002 mP@5 on every domain; else bf16 where the CPU
    has native bf16 (AMX or AVX512-BF16) *and* the model carries a passed bf16 accuracy check (`precision_checks`,
    written by `guie precision-check`: mP@5 within 0.002 of fp32 on every domain it was checked on); else fp32.
    bf16 and int8 change the vectors (max abs ~0.01-0.05), so neither is chosen unmeasured.

The pixels are the same whatever runs the forward: preprocessing (`guie.imaging.geometry`, `ImageTransform`) happens
before the runtime; converted models take the same uint8 input and normalise inside, as the torch module does.
`GUIE_RUNTIME` / `GUIE_PRECISION` pin what "auto" means (the test suite pins torch, as `GUIE_DEVICE` pins the CPU).
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ...errors import InputError
from ...utils import log
from .base import (
    _REGISTRY,
    BF16_TOLERANCE,
    PRECISION_CHOICES,
    RUNTIME_CHOICES,
    InferenceRuntime,
    RuntimeEntry,
    RuntimeUnavailable,
    check_choice,
    cpu_has_native_bf16,
    precision_checks,
    precision_passes,
    quantized_folder,
    quantized_record,
    register_runtime,
)

if TYPE_CHECKING:
    import torch

    from ...models.embedder import Embedder

__all__ = ["BF16_TOLERANCE", "PRECISION_CHOICES", "RUNTIME_CHOICES", "Choice", "InferenceRuntime", "RuntimeEntry",
           "RuntimeUnavailable", "check_choice", "cpu_has_native_bf16", "create_runtime", "list_runtimes",
           "precision_checks", "precision_passes", "quantized_folder", "quantized_record", "register_runtime",
           "resolve_choice"]


def list_runtimes() -> list[str]:
    """Names of the registered runtimes (without "auto")."""
    _load_builtin()
    return list(_REGISTRY)


@dataclass(frozen=True)
class Choice:
    """What `resolve_choice` picked and why."""

    runtime: str
    precision: str
    reason: str


def _auto_cpu_precision(embedder: Embedder | None, entry: RuntimeEntry, features: bool) -> tuple[str, str]:
    """(precision, reason) of "auto" on a CPU: int8 where the model has an int8 model whose recorded loss is within
    `BF16_TOLERANCE` on every domain; else bf16 where the CPU has native bf16 and the model's recorded bf16 check
    passed; else fp32. Never a precision that was not measured on this model."""
    if embedder is not None and not features and "int8" in entry.precisions and precision_passes(embedder, "int8"):
        return "int8", f"its int8 model lost <= {BF16_TOLERANCE} mP@5 on every domain checked"
    native = cpu_has_native_bf16()
    if "bf16" in entry.precisions and native and embedder is not None and precision_passes(embedder, "bf16"):
        return "bf16", f"native bf16 CPU and this model's bf16 check passed (<= {BF16_TOLERANCE} mP@5 lost)"
    if not native:
        return "fp32", "fp32: this CPU has no native bf16"
    if embedder is not None and "bf16" in precision_checks(embedder):
        return "fp32", f"fp32: this model's bf16 check lost more than {BF16_TOLERANCE} mP@5 on some domain"
    return "fp32", "fp32: no bf16 check recorded for this model"


def resolve_choice(embedder: Embedder | None, runtime: str, precision: str, device: torch.device,
                   features: bool = False) -> Choice:
    """Resolve "auto" for runtime and precision on `device` (see the module docstring); explicit choices are checked
    against the registry (one-line errors). `features`: for backbone features (the feature cache), where "auto"
    never picks int8 (a quantized model is a whole model)."""
    _load_builtin()
    runtime, precision = check_choice(runtime, precision)
    why = []
    if runtime == "auto":
        if device.type != "cpu":
            runtime, reason = "torch", f"torch on {device.type}"
        else:
            problem = _REGISTRY["openvino"].unavailable()
            runtime = "torch" if problem else "openvino"
            reason = f"OpenVINO unavailable ({problem}): torch" if problem else "OpenVINO on CPU"
            if problem:
                log.warning("runtime auto: %s cannot run here (%s); using torch", "OpenVINO", problem)
        why.append(reason)
    entry = _REGISTRY[runtime]
    if device.type not in entry.devices:
        raise InputError(f"runtime {runtime} runs on {', '.join(entry.devices)}, not on {device}")
    if precision == "auto":
        if device.type == "cuda":
            precision, reason = "bf16", "bf16 autocast on CUDA"
        else:
            precision, reason = _auto_cpu_precision(embedder, entry, features)
        why.append(reason)
    if precision not in entry.precisions:
        offers = [p for p in PRECISION_CHOICES if p in entry.precisions]
        hint = " (int8 runs on openvino)" if precision == "int8" else ""
        raise InputError(f"runtime {runtime} does not offer precision {precision}: it offers {', '.join(offers)}{hint}")
    if precision == "int8" and features:
        raise InputError("precision int8 is for a whole model's embeddings (its quantized model), not backbone "
                         "features: use fp32 or bf16")
    if precision == "bf16" and device.type == "cpu" and runtime != "torch" and not cpu_has_native_bf16():
        raise InputError(f"precision bf16 with runtime {runtime} needs a CPU with native bf16 (AMX or AVX512-BF16); "
                         "this one has none: use fp32 (or runtime torch, which emulates bf16 slowly)")
    return Choice(runtime, precision, "; ".join(why) or "as asked")


_logged: set = set()
_log_lock = threading.Lock()


def _log_once(rt: InferenceRuntime, choice: Choice) -> None:
    key = (rt.name, rt.precision, rt.layout, choice.reason)
    with _log_lock:
        if key in _logged:
            return
        _logged.add(key)
    log.info("inference: %s %s on %s, %s (%s)", rt.name, rt.precision, rt.device, rt.layout, choice.reason)


def create_runtime(embedder: Embedder, runtime: str | None = "auto", precision: str | None = "auto",
                   device: str | torch.device | None = None, features: bool = False,
                   cache_dir: str | Path | None = None, forwards: int | None = None) -> InferenceRuntime:
    """The forward of `embedder` (its embedding, or backbone features with features=True) on `runtime` at
    `precision` ("auto": see the module docstring), for `device` (None/"auto": `guie.utils.resolve_device`).

    Converting runtimes keep the converted model in `cache_dir` (default `<guie cache>/runtimes`), so a second run
    starts at once. `forwards`: forwards to run at once on CPU (default one single-threaded forward per intra-op
    thread, at most 4). An explicitly asked runtime that cannot run raises `RuntimeUnavailable` (one line); with
    "auto", a model OpenVINO cannot convert falls back to torch with one warning. The embedder is put in eval mode.
    """
    from ...utils import resolve_device

    asked_runtime, _ = check_choice(runtime, precision)
    if device in (None, "auto") and asked_runtime not in ("auto", "torch"):
        _load_builtin()
        device = "cpu" if "cpu" in _REGISTRY[asked_runtime].devices else device  # a CPU runtime asked by name
    device = resolve_device(device)
    choice = resolve_choice(embedder, runtime, precision, device, features)
    entry = _REGISTRY[choice.runtime]
    problem = entry.unavailable()
    if problem:
        raise RuntimeUnavailable(f"runtime {choice.runtime} cannot run here: {problem}")
    try:
        rt = entry.build(embedder, precision=choice.precision, device=device, features=features,
                         cache_dir=cache_dir, forwards=forwards)
    except RuntimeUnavailable as e:
        if asked_runtime != "auto":
            raise
        log.warning("runtime auto: %s; using torch", e)
        choice = Choice("torch", choice.precision, f"{choice.reason}; conversion failed, torch")
        rt = _REGISTRY["torch"].build(embedder, precision=choice.precision, device=device, features=features,
                                      cache_dir=cache_dir, forwards=forwards)
    _log_once(rt, choice)
    return rt


_builtin_loaded = False


def _load_builtin() -> None:
    """Register the built-in runtimes (on first use, so importing this package stays light)."""
    global _builtin_loaded
    if _builtin_loaded:
        return
    _builtin_loaded = True
    from . import onnxruntime_runtime, openvino_runtime, torch_runtime  # noqa: F401 - they register themselves
