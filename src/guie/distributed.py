"""torch.distributed glue, the one home of it: one process per device under torchrun (NCCL on GPUs, gloo on CPU).

`init_distributed` joins the process group, `barrier` / `barrier_world` wait for every rank, `mean_across_ranks`
averages a logged value, `cleanup_distributed` leaves the group. The training engine, `embed_to_file` and the
feature store all synchronise through these.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .utils import resolve_device


@dataclass
class DistInfo:
    """This process's place in the job: rank, world size, local rank and its device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(device: str = "auto") -> DistInfo:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1); otherwise a single-process DistInfo."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = resolve_device(device).type == "cuda"
    if use_cuda:
        torch.cuda.set_device(local)
        dev = torch.device("cuda", local)
    else:
        dev = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    return DistInfo(rank, world, local, dev)


def barrier(info: DistInfo) -> None:
    """Wait for every rank (a no-op in a single process)."""
    barrier_world(info.world_size)


def barrier_world(world_size: int) -> None:
    """Wait for every rank when `world_size` > 1 (for code that gets rank/world_size as plain ints)."""
    if world_size > 1:
        dist.barrier()


def mean_across_ranks(value: float, info: DistInfo) -> float:
    """Average a Python float over ranks (for logging)."""
    if not info.enabled:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=info.device if info.device.type == "cuda" else "cpu")
    dist.all_reduce(t)
    return float(t.item()) / info.world_size


def cleanup_distributed() -> None:
    """Leave the process group if this process joined one."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
