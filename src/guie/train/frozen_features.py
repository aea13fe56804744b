"""Frozen-backbone fast path: a stage's images as cached backbone features, one clean view + augmented views
(+ mirrored views for distillation).

The head then trains for thousands of steps without running the backbone; features come from the shared feature
store (`guie.embedding.feature_store`), so validation, the demo and later stages reuse them.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from ..embedding.feature_store import cached_features
from ..losses import mirror_similarity
from ..models.embedder import Embedder, load_embedder
from ..pipeline.augment import AugmentConfig


@dataclass(frozen=True)
class FeatureCache:
    """Where a run's backbone features are cached and how missing ones are computed.

    `seed` seeds the augmented views (per view and image); with `world_size` > 1 (DDP) every rank computes a slice.
    """

    cache_dir: Path
    seed: int = 0
    num_workers: int | None = None
    device: torch.device | str | None = None
    progress: bool = False
    rank: int = 0
    world_size: int = 1
    runtime: str = "auto"  # what runs the frozen backbone's forward (`guie.embedding.runtimes`)
    precision: str = "fp32"


def view_features(embedder: Embedder, paths: np.ndarray, view: int, augment: dict | None,
                  cache: FeatureCache) -> torch.Tensor:
    """Features [len(paths), F] (float16, CPU) of one cached view of `paths` by `embedder`'s backbone; each distinct
    file is computed once."""
    uniq, inverse = np.unique(paths, return_inverse=True)
    feats, _ = cached_features(embedder, list(uniq), cache.cache_dir, view=view, augment=augment, seed=cache.seed,
                               num_workers=cache.num_workers, device=cache.device, progress=cache.progress,
                               rank=cache.rank, world_size=cache.world_size, runtime=cache.runtime,
                               precision=cache.precision)
    return torch.from_numpy(feats.astype(np.float16))[torch.as_tensor(inverse)]


def stage_feature_cache(embedder: Embedder, df: pd.DataFrame, augment: dict | None, views: int,
                        cache: FeatureCache) -> torch.Tensor:
    """Features [V, N, F] (float16, CPU) for the rows of `df` (a `path` column): view 0 clean, views 1..V-1
    augmented with `augment` (AugmentConfig fields); V = max(1, views)."""
    paths = df["path"].astype(str).to_numpy()
    return torch.stack([view_features(embedder, paths, v, augment, cache) for v in range(max(1, views))])


MIRROR_AUGMENT = {**asdict(AugmentConfig.off()), "hflip": 1.0}  # the evaluation view, always mirrored


def mirror_feature_cache(embedder: Embedder, df: pd.DataFrame, domains: list[str],
                         cache: FeatureCache) -> tuple[torch.Tensor, torch.Tensor]:
    """Features [1, N, F] (float16, CPU) of the left-right mirrored clean view of the rows of `df` (columns path,
    domain) whose domain is in `domains` (zero rows elsewhere), and the boolean mask [N] of those rows.

    Distillation compares the student's similarity of an image to its mirror with the teacher's: a glyph specialist
    keeps "b" and "d" apart, while emoji, whose vendors draw figures facing either way, teach the shared head to
    treat mirrors as the same object."""
    mask = df["domain"].astype(str).isin(list(domains)).to_numpy()
    out = torch.zeros(1, len(mask), embedder.backbone.num_features, dtype=torch.float16)
    if mask.any():
        paths = df["path"].astype(str).to_numpy()[mask]
        out[0, torch.as_tensor(np.flatnonzero(mask))] = view_features(embedder, paths, 1, MIRROR_AUGMENT, cache)
    return out, torch.from_numpy(mask.copy())


@torch.no_grad()
def teacher_mirror_similarity(df: pd.DataFrame, teachers: dict[str, Path], domains: list[str],
                              cache: FeatureCache) -> torch.Tensor:
    """Per row of `df` (columns path, domain) [N] (float32): the cosine similarity between the embedding of its clean
    view and of its mirrored clean view by its domain's teacher (`teachers`: domain -> checkpoint path), for the rows
    whose domain is in `domains`; NaN elsewhere.

    The targets of the mirror term in an image stage: there the student's backbone trains, so its features cannot be
    cached, but the teacher's can, and one similarity per image is all the term needs (computed once, not per step).
    Any teacher works here, whatever its backbone: it reads its own features."""
    domain_of = df["domain"].astype(str).to_numpy()
    paths = df["path"].astype(str).to_numpy()
    out = torch.full((len(paths),), float("nan"))
    for domain in sorted(set(domains)):
        rows = np.flatnonzero(domain_of == domain)
        if len(rows) == 0:
            continue
        teacher = load_embedder(teachers[domain]).eval()
        clean, mirrored = (teacher.embed_features(view_features(teacher, paths[rows], view, augment, cache).float())
                           for view, augment in ((0, None), (1, MIRROR_AUGMENT)))
        out[torch.as_tensor(rows)] = mirror_similarity(clean, mirrored)
    return out
