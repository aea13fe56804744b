"""Process-level tuning for CPU inference.

PyTorch on CPU allocates every activation tensor with the C library's malloc. glibc serves large blocks with mmap and
gives freed memory back to the kernel at once, so each forward pass page-faults all its activations in again: on a
2-core machine half of the CPU time of a bare efficientnet_lite0 forward was kernel time, and the bare forward ran
~1.4x (batch 32) to ~1.6x (batch 64) faster once freed memory is kept for reuse (`benchmarks/cpu_embed.py`).
PyTorch's tuning guide recommends preloading jemalloc/tcmalloc for this, which needs LD_PRELOAD before the process
starts; glibc's own `mallopt` does the same from inside a running process, so that is what is used here.

The tuning also limits glibc to one arena. Threads other than the main one otherwise get arenas of at most 64 MB
heaps, and with mmap turned off glibc still maps (and unmaps after use) every block that does not fit such a heap:
a batch-32 forward in the search server's batching thread spent 0.31 s of kernel time per second of user time;
with one arena it spends 0.01, as the main thread does. The arena limit only binds threads that allocate after it
is set, so `guie`'s command line tunes the process before anything starts a thread.

Freed memory at the top of the heap is never given back either. Two single-threaded forwards side by side (the
engine's CPU default, `forward_workers`) peak ~0.9 GB higher than one (batch 32, 224 px); with the former 1 GiB
trim threshold glibc returned that to the kernel after every run and the next one faulted it in again: 0.7 s of
kernel time per 256 images, 15-20% of the throughput (`benchmarks/cpu_embed.py`).
"""
from __future__ import annotations

import ctypes
import os
import platform
from collections.abc import Iterator
from contextlib import contextmanager

from .utils import log

_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -2, -3, -4, -8
_tuned: bool | None = None


def tune_cpu_allocator() -> bool:
    """Make glibc keep freed memory for reuse instead of returning it to the kernel (no mmap for large blocks, no
    trimming of the heap, one arena for all threads). Process-wide, idempotent; a no-op off glibc or with
    GUIE_MALLOC_TUNING=0. Call it before threads start where possible (see the module docstring).

    Cost: the process keeps its peak heap (e.g. 1.5 instead of 1.3 GB RSS for a batch-32 224-px forward of
    efficientnet_lite0; 2.2 GB with two such forwards side by side). Returns whether the tuning is active.
    """
    global _tuned
    if _tuned is not None:
        return _tuned
    _tuned = False
    if os.environ.get("GUIE_MALLOC_TUNING", "1") == "0" or platform.system() != "Linux" \
            or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        ok = all(libc.mallopt(opt, value) == 1 for opt, value in (  # trim threshold -1: SIZE_MAX to glibc, never
            (_M_ARENA_MAX, 1), (_M_MMAP_THRESHOLD, 32 << 20), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, -1),
            (_M_TOP_PAD, 256 << 20)))
    except (OSError, AttributeError):
        return False
    _tuned = ok
    if ok:
        log.debug("glibc malloc tuned for CPU inference (set GUIE_MALLOC_TUNING=0 to disable)")
    return ok


@contextmanager
def intra_op_threads(n: int | None) -> Iterator[None]:
    """Run the block with torch's intra-op thread count pinned to `n` (None: as it is), then restore it.

    Float reductions (matrix products, convolutions, their gradients) split their sums over the threads, so their
    last bits depend on the thread count: a seeded CPU run repeats bit for bit on another machine only at the same
    count (and torch build and CPU instruction set). Recipes pin it with `cpu_threads`.
    """
    if not n:
        yield
        return
    import torch

    before = torch.get_num_threads()
    if before == n:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def forward_workers(workers: int | None = None, cap: int = 4) -> tuple[int, int]:
    """How to spend this process's torch intra-op threads on a model's CPU forwards: (forwards run side by side,
    intra-op threads each).

    By default one single-threaded forward per intra-op thread, at most `cap` (each forward holds its own
    activations). A forward split over the cores with OpenMP stalls as a whole whenever anything else takes one of
    its cores, since its threads meet at a barrier after every layer; independent single-threaded forwards only lose
    the time actually taken from them (`guie.embedding.batching`, `guie.embedding.engine`). `workers` given: that
    many forwards, sharing the threads.
    """
    import torch

    threads = torch.get_num_threads()
    workers = max(1, workers or min(threads, cap))
    return workers, max(1, threads // workers)


@contextmanager
def single_intra_op_thread() -> Iterator[None]:
    """Run the block with one torch intra-op thread, restoring the previous count after.

    For many tiny tensor ops between model steps (per-sample augmentations on 224-px images): each op would
    otherwise fork-join the whole OpenMP team, and when another process holds a core the team waits for it. On a
    shared 2-core machine one v2 affine warp took 120-200 ms with two threads and 3 ms with one. Elementwise and
    warping ops give the same results whatever the thread count, so outputs do not change.
    """
    with intra_op_threads(1):
        yield


def skip_triton_without_cuda() -> bool:
    """On a machine without a CUDA device, tell torch that triton (a compiler of GPU kernels) is not installed, so that
    importing torchvision (which timm imports, and which asks `torch._dynamo` whether triton exists) does not load it:
    100 MB of RSS in every process that builds a model, a tenth of `guie embed`'s peak on a CPU
    (docs/cpu-runtime.md). Nothing on a CPU uses triton (torch.compile's CPU code is C++). Returns whether it acted;
    a no-op where triton is already imported, a CUDA device exists, or GUIE_KEEP_TRITON=1."""
    import sys

    if "triton" in sys.modules or os.environ.get("GUIE_KEEP_TRITON", "0") not in ("", "0"):
        return False
    import torch

    if torch.cuda.is_available():
        return False
    import torch.utils._triton as triton_probe

    triton_probe.has_triton_package = lambda: False  # later importers of the name get this one
    return True

