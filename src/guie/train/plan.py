"""A run's stages checked and laid out before the first one trains: a bad option of the last stage fails in a
second, not after hours of the stages before it.

Per stage: its data (one namespaced label space), its sampler over this rank's share of the batch, how many
micro-batches make an epoch and how many optimizer steps the stage runs; plus what cannot be told from the recipe
file alone (divisibility by the process count, the sampler on the data, distillation teachers).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from ..distributed import DistInfo
from ..errors import InputError
from .batches import make_sampler
from .data import StageData, build_stage_data
from .distill import check_teachers
from .recipe import RunConfig, StageConfig


@dataclass
class StagePlan:
    """One stage as it will run: index in the recipe, config, data, sampler, batch split and length."""

    index: int
    stage: StageConfig
    data: StageData
    sampler: Any
    local_batch: int          # this rank's micro-batch (the global batch_size / processes)
    micro_per_epoch: int      # micro-batches per epoch on this rank
    total_steps: int          # optimizer steps of the stage

    @property
    def steps_per_epoch(self) -> int:
        """Optimizer steps per epoch (micro-batches / accumulation), at least 1."""
        return max(1, self.micro_per_epoch // self.stage.accumulation_steps)


def plan_stage(cfg: RunConfig, index: int, dist: DistInfo) -> StagePlan:
    """Check stage `index` of `cfg` against its data and the process count, and lay it out (no model needed)."""
    stage = cfg.stages[index]
    where = f"stage {stage.name!r}"
    if stage.batch_size % dist.world_size:
        raise InputError(f"{where}: batch_size {stage.batch_size} is not divisible by {dist.world_size} processes")
    check_teachers(cfg.run_dir, cfg.stages, index)
    data = build_stage_data(cfg, stage)
    local_batch = stage.batch_size // dist.world_size
    try:
        sampler = make_sampler(stage.sampler, data.df, stage.batch_size, dist.world_size, dist.rank, cfg.seed)
    except InputError as e:
        raise InputError(f"{where}: sampler: {e}") from None
    micro_per_epoch = len(sampler) // local_batch
    if micro_per_epoch < 1:
        raise InputError(f"{where}: fewer samples per epoch ({len(sampler)}) than one batch ({local_batch})")
    total_steps = stage.steps or max(1, math.ceil(stage.epochs * micro_per_epoch / stage.accumulation_steps))
    return StagePlan(index, stage, data, sampler, local_batch, micro_per_epoch, total_steps)
