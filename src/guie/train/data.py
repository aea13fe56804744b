"""Stage data: a recipe's named datasets -> one namespaced label space with integer targets, and the validation
rows. (The images themselves are read by `guie.pipeline.datasets`.)
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from ..data.manifest import read_manifest, select_rows
from ..errors import InputError
from .recipe import DatasetConfig, RunConfig, StageConfig, ValidationSet


def resolve_manifest_source(source: str, cache_dir: Path | None) -> Path:
    """A manifest path; a built-in benchmark's name (emoji, glyphs, icons) means its manifest, built on first use."""
    from ..data.benchmarks import BENCHMARKS, benchmark_manifest

    if source in BENCHMARKS:
        return benchmark_manifest(source, cache_dir)
    return Path(source).expanduser()


def available_manifest(source: str, cache_dir: Path | None) -> Path | None:
    """The manifest of `source` if it is on this machine, without building anything (a built-in benchmark counts
    only when already built); None otherwise. (`guie train --smoke` samples it, the cost plan counts it.)"""
    from ..data.benchmarks import BENCHMARKS
    from ..utils import default_cache_dir

    if source in BENCHMARKS:
        found = sorted((Path(cache_dir or default_cache_dir()) / source).glob("*/manifest.csv"))
        return found[0] if found else None
    path = Path(source).expanduser()
    return path if path.exists() else None


def load_training_dataset(name: str, cfg: DatasetConfig, cache_dir: Path | None, seed: int) -> pd.DataFrame:
    """One dataset as a manifest with a namespaced `label`, a `domain` and `dataset`, filtered/capped/upsampled."""
    from ..data import builder

    df = read_manifest(resolve_manifest_source(cfg.manifest, cache_dir), require_labels=True)
    df = select_rows(df, cfg.where, f"dataset {name!r}")
    if cfg.domain is not None or "domain" not in df.columns:
        df["domain"] = cfg.domain or name
    if cfg.namespace != "":  # "": the labels are namespaced already (a `guie data build` output)
        df = builder.namespace_labels(df, cfg.namespace or name)
    df = builder.filter_min_images(df, cfg.min_images)
    if cfg.max_per_class:
        df = builder.cap_per_class(df, cfg.max_per_class, seed)
    if cfg.min_per_class:
        df = builder.upsample_per_class(df, cfg.min_per_class, seed)
    if df.empty:
        raise InputError(f"dataset {name!r}: no classes with >= {cfg.min_images} images")
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


def load_validation_frame(cfg: ValidationSet, cache_dir: Path | None) -> pd.DataFrame:
    """The validation manifest rows (labels required)."""
    df = read_manifest(resolve_manifest_source(cfg.manifest, cache_dir), require_labels=True)
    return select_rows(df, cfg.where, "validation")
