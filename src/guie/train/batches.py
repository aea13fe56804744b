"""Training batches: the typed `Batch` one step consumes, the sampler that orders a stage's rows, and the two endless
feeds that make batches, from cached backbone features (frozen backbone) or from image files (DataLoader workers).

Both feeds are deterministic in (run seed, epoch, row) and start mid-epoch at any micro-batch, so a resumed run sees
the batches an uninterrupted one would.
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader

from ..errors import InputError
from ..pipeline.datasets import ImageFileDataset, SeededSampler, collate_skip_failed, sample_seed
from ..pipeline.samplers import ClassBalancedSampler, ShuffleSampler
from ..utils import log
from .recipe import SamplerConfig


@dataclass
class Batch:
    """One micro-batch: B labelled rows, optionally followed by M mirrored copies that only distillation reads.

    inputs:        [B + M, F] cached backbone features, or [B + M, 3, S, S] uint8 images.
    targets:       [B] class ids of the labelled rows (the mirrored rows have none).
    teacher:       [B + M, d] the teacher's embedding of every row (frozen-backbone distillation), else None.
    groups:        [B + M] each row's teacher group (-1: no teacher), with `teacher`.
    mirror_of:     [M] the position (0..B-1) of the row each mirrored row copies, else None.
    mirror_target: [M] the teacher's image-to-mirror similarity of those rows (image stages), else None.
    """

    inputs: torch.Tensor
    targets: torch.Tensor
    teacher: torch.Tensor | None = None
    groups: torch.Tensor | None = None
    mirror_of: torch.Tensor | None = None
    mirror_target: torch.Tensor | None = None

    @property
    def size(self) -> int:
        """B: the labelled rows."""
        return len(self.targets)

    @property
    def mirrored(self) -> int:
        """M: the mirrored rows past the labelled ones."""
        return 0 if self.mirror_of is None else len(self.mirror_of)


@dataclass
class DistillTargets:
    """Per row N of a frozen-backbone stage's data, what its distillation terms read (see `guie.train.distill`).

    teacher:         [V, N, d] the teacher's embedding of each cached view (zero where a row has no teacher).
    groups:          [N] each row's teacher group (-1: none).
    mirror_features: [N, F] features of each row's mirrored clean view (zero outside `mirror_rows`), or None.
    mirror_teacher:  [N, d] the teacher's embedding of those mirrored views, with `mirror_features`.
    mirror_rows:     [N] bool: the rows that also enter the batch mirrored, with `mirror_features`.
    """

    teacher: torch.Tensor
    groups: torch.Tensor
    mirror_features: torch.Tensor | None = None
    mirror_teacher: torch.Tensor | None = None
    mirror_rows: torch.Tensor | None = None


def make_sampler(cfg: SamplerConfig, df: pd.DataFrame, batch_size: int, world_size: int, rank: int, seed: int):
    """The stage's sampler over the rows of `df` (columns target, domain): shuffle or class-balanced batches of the
    global `batch_size`, this rank's share of each."""
    common = dict(num_replicas=world_size, rank=rank, seed=seed)
    if cfg.name == "class_balanced":
        domains = df["domain"].to_numpy() if cfg.balance == "domain" else None
        return ClassBalancedSampler(df["target"].to_numpy(), batch_size=batch_size, m_per_class=cfg.m_per_class,
                                    domains=domains, domain_weights=cfg.domain_weights, **common)
    if cfg.name == "shuffle":
        return ShuffleSampler(len(df), batch_size=batch_size, **common)
    raise InputError(f"sampler {cfg.name!r}: choose shuffle or class_balanced")


def _start(micro: int, micro_per_epoch: int) -> tuple[int, int]:
    """(epoch, micro-batches of it already done) at micro-batch `micro`."""
    return micro // micro_per_epoch, micro % micro_per_epoch


def feature_batches(sampler, targets: torch.Tensor, feats: torch.Tensor, *, seed: int, device: torch.device,
                    local_batch: int, micro: int, micro_per_epoch: int,
                    distill: DistillTargets | None = None) -> Iterator[Batch]:
    """Endless batches of cached features `feats` [V, N, F] (float16, CPU) with `targets` [N]: one deterministic
    view per (epoch, row). With `distill` each batch carries its rows' teacher embeddings and groups, and, when
    `distill` has mirror rows, the batch's mirror rows appended again mirrored (`Batch.mirror_of`)."""
    n_views = feats.shape[0]
    epoch, skip = _start(micro, micro_per_epoch)
    while True:
        sampler.set_epoch(epoch)
        idx_all = np.fromiter(iter(sampler), dtype=np.int64)
        for b in range(skip, micro_per_epoch):
            idx = idx_all[b * local_batch:(b + 1) * local_batch]
            views = np.array([sample_seed(seed, epoch, int(i)) % n_views for i in idx])
            rows, cols = torch.as_tensor(views), torch.as_tensor(idx)
            x = feats[rows, cols].float().to(device)
            y = targets[idx].to(device)
            if distill is None:
                yield Batch(x, y)
                continue
            t, groups = distill.teacher[rows, cols], distill.groups[cols]
            if distill.mirror_features is None:
                yield Batch(x, y, t.to(device), groups.to(device))
                continue
            keep = distill.mirror_rows[cols]
            extra = cols[keep]
            x = torch.cat([x, distill.mirror_features[extra].float().to(device)])
            t, groups = torch.cat([t, distill.mirror_teacher[extra]]), torch.cat([groups, distill.groups[extra]])
            yield Batch(x, y, t.to(device), groups.to(device), torch.nonzero(keep).flatten().to(device))
        epoch, skip = epoch + 1, 0


def _worker_init(_):
    torch.set_num_threads(1)


def image_batches(sampler, dataset: ImageFileDataset, targets: torch.Tensor, *, seed: int, device: torch.device,
                  workers: int, local_batch: int, micro: int, micro_per_epoch: int,
                  mirror_targets: torch.Tensor | None = None) -> Iterator[Batch]:
    """Endless batches of uint8 images from `dataset` (augmented, seeded per sample) with `targets` [N], through
    `workers` DataLoader processes; resumes mid-epoch. Unreadable images are left out and logged (the first 20).
    With `mirror_targets` [N] (the teacher's image-to-mirror similarity, NaN where none) the batch's rows that have
    one are appended again, left-right mirrored after augmentation, for the mirror term (`Batch.mirror_target`)."""
    seeded = SeededSampler(sampler, seed)
    epoch, skip = _start(micro, micro_per_epoch)
    reported = 0
    while True:
        seeded.set_epoch(epoch)
        seeded.start = skip * local_batch
        loader = DataLoader(dataset, batch_size=local_batch, sampler=seeded, num_workers=workers,
                            collate_fn=collate_skip_failed, drop_last=True, worker_init_fn=_worker_init,
                            pin_memory=device.type == "cuda", generator=torch.Generator().manual_seed(0),
                            prefetch_factor=4 if workers else None, persistent_workers=False)
        for b, (idx, images, failed) in enumerate(loader, start=skip):
            if b >= micro_per_epoch:
                break
            for _, e in failed:
                if reported < 20:
                    log.warning("skipped %s", e)
                reported += 1
            if images is None:
                continue
            y = targets[idx].to(device, non_blocking=True)
            if mirror_targets is None:
                yield Batch(_to_device(images, device), y)
                continue
            wanted = mirror_targets[idx]
            keep = ~torch.isnan(wanted)
            images = torch.cat([images, images[keep].flip(-1)])
            yield Batch(_to_device(images, device), y, mirror_of=torch.nonzero(keep).flatten().to(device),
                        mirror_target=wanted[keep].to(device))
        epoch, skip = epoch + 1, 0


def _to_device(images: torch.Tensor, device: torch.device) -> torch.Tensor:
    return images.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
