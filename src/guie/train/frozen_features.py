"""Frozen-backbone fast path: a stage's images as cached backbone features, one clean view + augmented views.

The head then trains for thousands of steps without running the backbone; features come from the shared feature
store (`guie.embedding.feature_store`), so validation, the demo and later stages reuse them.
"""
from __future__ import annotations

import numpy as np
import torch

from ..embedding.feature_store import cached_features
from ..utils import default_cache_dir


def stage_feature_cache(trainer, stage, data) -> torch.Tensor:
    """Features [V, N, F] (float16, CPU) for the rows of data.df: view 0 clean, views 1.. augmented."""
    cfg, dist = trainer.cfg, trainer.dist
    paths = data.df["path"].astype(str).to_numpy()
    uniq, inverse = np.unique(paths, return_inverse=True)
    views = []
    for v in range(max(1, stage.cache_views)):
        feats, _ = cached_features(trainer.embedder, list(uniq), cfg.cache_dir or default_cache_dir(), view=v,
                                   augment=stage.augment, seed=cfg.seed, num_workers=cfg.num_workers,
                                   device=trainer.device, progress=trainer.progress, rank=dist.rank,
                                   world_size=dist.world_size)
        views.append(torch.from_numpy(feats.astype(np.float16)))
    return torch.stack(views)[:, torch.as_tensor(inverse)]
