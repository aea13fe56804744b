"""Stage data: named datasets -> one namespaced label space, image/feature datasets, deterministic sampling.

Augmentation randomness is seeded per sample from (run seed, epoch, index), so a run resumed mid-epoch, or split
over DDP ranks, sees exactly the augmented images an uninterrupted single-process run would.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset, Sampler

from ..data.images import ImageLoadError, load_image
from ..data.manifest import read_manifest, select_rows
from ..models.preprocess import ImageTransform
from .config import DatasetConfig, RunConfig, StageConfig, ValidationConfig


def resolve_manifest_source(source: str, cache_dir: Path | None) -> Path:
    """A manifest path; 'emoji' means the built-in emoji benchmark (fetched on first use)."""
    if source == "emoji":
        from ..data.emoji import build_emoji_benchmark

        return build_emoji_benchmark(cache_dir)
    return Path(source).expanduser()


def load_training_dataset(name: str, cfg: DatasetConfig, cache_dir: Path | None, seed: int) -> pd.DataFrame:
    """One dataset as a manifest with a namespaced `label`, a `domain` and `dataset`, filtered/capped/upsampled."""
    from ..data import builder

    df = read_manifest(resolve_manifest_source(cfg.manifest, cache_dir), require_labels=True)
    df = select_rows(df, cfg.where, f"dataset {name!r}")
    if cfg.domain is not None or "domain" not in df.columns:
        df["domain"] = cfg.domain or name
    df = builder.namespace_labels(df, cfg.namespace or name)
    df = builder.filter_min_images(df, cfg.min_images)
    if cfg.max_per_class:
        df = builder.cap_per_class(df, cfg.max_per_class, seed)
    if cfg.min_per_class:
        df = builder.upsample_per_class(df, cfg.min_per_class, seed)
    if df.empty:
        raise ValueError(f"dataset {name!r}: no classes with >= {cfg.min_images} images")
    return df.reset_index(drop=True)


@dataclass
class StageData:
    """The training rows of a stage with integer targets."""

    df: pd.DataFrame              # path, label, domain, dataset, target
    class_names: np.ndarray       # target -> label

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def class_counts(self) -> np.ndarray:
        return np.bincount(self.df["target"].to_numpy(), minlength=self.num_classes)


def build_stage_data(run: RunConfig, stage: StageConfig) -> StageData:
    """Merge a stage's datasets into one label space (labels are namespaced per dataset, so never collide)."""
    frames = [load_training_dataset(n, run.datasets[n], run.cache_dir, run.seed) for n in stage.datasets]
    df = pd.concat(frames, ignore_index=True)
    class_names, targets = np.unique(df["label"].to_numpy(), return_inverse=True)
    df["target"] = targets
    return StageData(df, class_names)


def load_validation_frame(cfg: ValidationConfig, cache_dir: Path | None) -> pd.DataFrame:
    """The validation manifest rows (labels required)."""
    df = read_manifest(resolve_manifest_source(cfg.manifest, cache_dir), require_labels=True)
    return select_rows(df, cfg.where, "validation")


def sample_seed(run_seed: int, epoch: int, index: int) -> int:
    """A 31-bit seed per (run, epoch, sample): augmentations independent of worker count, rank and resumption."""
    x = (run_seed * 0x9E3779B1 + epoch * 0x85EBCA77 + index * 0xC2B2AE3D) & 0xFFFFFFFFFFFF
    x ^= x >> 17
    return int((x * 0x27D4EB2F) & 0x7FFFFFFF)


class SeededSampler(Sampler):
    """Wraps an index sampler to yield (index, per-sample seed) keys for SeededImageDataset."""

    def __init__(self, base: Sampler, run_seed: int):
        self.base, self.run_seed, self.epoch = base, run_seed, 0
        self.start = 0  # skip this many indices of the epoch (resuming mid-epoch)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.base.set_epoch(epoch)

    def __iter__(self):
        for pos, i in enumerate(self.base):
            if pos >= self.start:
                yield int(i), sample_seed(self.run_seed, self.epoch, int(i))

    def __len__(self) -> int:
        return len(self.base) - self.start


class SeededImageDataset(Dataset):
    """(index, seed) -> (uint8 image, target, index); a bad image yields None (dropped by the collate).

    With `threads` > 1 and no worker processes, a batch is decoded by a thread pool in the main process between
    model steps (PIL releases the GIL): on a CPU-only machine, worker processes would compete with the model's
    intra-op threads for the same cores during the step (see guie.embed).
    """

    def __init__(self, paths, targets, transform, draft_size: int | None = None, threads: int = 1):
        self.paths, self.targets = list(paths), np.asarray(targets)
        self.transform, self.draft_size, self.threads = transform, draft_size, max(1, int(threads))

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, key):
        index, seed = key
        torch.manual_seed(seed)
        try:
            image = self.transform(load_image(self.paths[index], draft_size=self.draft_size))
        except ImageLoadError as e:
            return None, int(self.targets[index]), index, str(e)
        return image, int(self.targets[index]), index, None

    def __getitems__(self, keys):
        """A batch of samples (the DataLoader calls this instead of __getitem__ when it exists).

        Only the deterministic evaluation transform is run on threads: augmentations draw from torch's global RNG,
        which is seeded per sample and is not thread-safe, so those batches are processed in order."""
        if self.threads == 1 or len(keys) == 1 or not isinstance(self.transform, ImageTransform):
            return [self[k] for k in keys]
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(min(self.threads, len(keys))) as pool:
            return list(pool.map(self._load, keys))

    def _load(self, key):
        index = key[0]
        try:
            image = self.transform(load_image(self.paths[index], draft_size=self.draft_size))
        except ImageLoadError as e:
            return None, int(self.targets[index]), index, str(e)
        return image, int(self.targets[index]), index, None


def collate_training(batch):
    """Stack good samples; return the failure messages separately."""
    good = [b for b in batch if b[0] is not None]
    errors = [b[3] for b in batch if b[0] is None]
    if not good:
        return None, None, None, errors
    images = torch.stack([b[0] for b in good])
    targets = torch.tensor([b[1] for b in good], dtype=torch.long)
    index = torch.tensor([b[2] for b in good], dtype=torch.long)
    return images, targets, index, errors
