"""The torch runtime: the model's own eager forward (channels_last, inference_mode), as training runs it.

fp32 everywhere; bf16 as `torch.autocast` (on CUDA the default, as before; on a CPU only when asked: without native
bf16 it is emulated and slow). On a CPU the engine runs `parallel` single-threaded forwards side by side
(`guie.runtime.forward_workers`): see `guie.embedding.engine`.
"""
from __future__ import annotations

import torch

from ...runtime import forward_workers, tune_cpu_allocator
from .base import InferenceRuntime, RuntimeEntry, register_runtime


def prepare_model(embedder, device: torch.device) -> None:
    """Move the model to `device` in eval mode and channels_last; tune glibc's allocator once on CPU."""
    if device.type == "cpu":
        tune_cpu_allocator()  # activations are re-faulted from the kernel every forward otherwise (guie.runtime)
    # Converted outside inference mode: parameters created inside it become inference tensors, which would break
    # training the same model afterwards (e.g. validation during fine-tuning).
    embedder.to(device).eval().to(memory_format=torch.channels_last)


def torch_forward(fn, images: torch.Tensor, device: torch.device, pad_to: int = 0,
                  autocast: bool | None = None) -> torch.Tensor:
    """float32 [B, d] from uint8 images (bf16 autocast on CUDA unless `autocast` says otherwise); pads the batch to
    `pad_to` rows when > 0 (one shape for torch.compile)."""
    n = images.shape[0]
    images = images.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
    if pad_to and n < pad_to:
        images = torch.cat([images, images[-1:].expand(pad_to - n, -1, -1, -1)]).contiguous(
            memory_format=torch.channels_last)
    enabled = device.type == "cuda" if autocast is None else autocast
    with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled):
        return fn(images)[:n].float()


class TorchRuntime(InferenceRuntime):
    """The embedder's eager forward; `compile` wraps it in torch.compile (batches padded to `pad_to`)."""

    name = "torch"

    def __init__(self, embedder, precision: str, device: torch.device, features: bool, forwards: int | None = None,
                 compile: bool = False, pad_to: int = 0):
        super().__init__(device, features)
        self.precision, self.embedder = precision, embedder
        prepare_model(embedder, device)
        fn = embedder.forward_features if features else embedder.forward
        self.fn = torch.compile(fn, dynamic=False) if compile else fn
        self.pad_to = pad_to if compile else 0
        self.autocast = precision == "bf16"
        if device.type == "cpu" and not compile:
            self.parallel, each = forward_workers(forwards)
            self.threads_each = each if self.parallel > 1 else None
        else:
            self.parallel, self.threads_each = 1, None

    @property
    def layout(self) -> str:
        if self.device.type != "cpu":
            return "one forward"
        each = self.threads_each or torch.get_num_threads()
        return f"{self.parallel} forward thread(s) x {each} intra-op thread(s)"

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return torch_forward(self.fn, images, self.device, self.pad_to, self.autocast)


def _build(embedder, precision: str, device: torch.device, features: bool, forwards: int | None = None,
           **_) -> TorchRuntime:
    return TorchRuntime(embedder, precision, device, features, forwards)


register_runtime(RuntimeEntry("torch", devices=("cpu", "cuda", "mps"), precisions=("fp32", "bf16"),
                              unavailable=lambda: None, build=_build))
