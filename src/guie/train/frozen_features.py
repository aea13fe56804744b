"""Frozen-backbone fast path: a stage's images as cached backbone features, one clean view + augmented views
(+ mirrored views for distillation).

The head then trains for thousands of steps without running the backbone; features come from the shared feature
store (`guie.embedding.feature_store`), so validation, the demo and later stages reuse them.
"""
from __future__ import annotations

from dataclasses import asdict

import numpy as np
import torch

from ..embedding.feature_store import cached_features
from ..losses import mirror_similarity
from ..models.embedder import load_embedder
from ..pipeline.augment import AugmentConfig
from ..utils import default_cache_dir


def _view_features(trainer, paths: np.ndarray, view: int, augment: dict | None, embedder=None) -> torch.Tensor:
    """Features [len(paths), F] (float16, CPU) of one cached view of `paths` by `embedder`'s backbone (default: the
    trainer's); each distinct file is computed once."""
    cfg, dist = trainer.cfg, trainer.dist
    uniq, inverse = np.unique(paths, return_inverse=True)
    feats, _ = cached_features(embedder or trainer.embedder, list(uniq), cfg.cache_dir or default_cache_dir(),
                               view=view, augment=augment, seed=cfg.seed, num_workers=cfg.num_workers,
                               device=trainer.device, progress=trainer.progress, rank=dist.rank,
                               world_size=dist.world_size, runtime=cfg.runtime, precision=cfg.precision)
    return torch.from_numpy(feats.astype(np.float16))[torch.as_tensor(inverse)]


def stage_feature_cache(trainer, stage, data) -> torch.Tensor:
    """Features [V, N, F] (float16, CPU) for the rows of data.df: view 0 clean, views 1.. augmented."""
    paths = data.df["path"].astype(str).to_numpy()
    return torch.stack([_view_features(trainer, paths, v, stage.augment) for v in range(max(1, stage.cache_views))])


MIRROR_AUGMENT = {**asdict(AugmentConfig.off()), "hflip": 1.0}  # the evaluation view, always mirrored


def mirror_feature_cache(trainer, data, domains: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Features [1, N, F] (float16, CPU) of the left-right mirrored clean view of the rows of data.df whose domain is
    in `domains` (zero rows elsewhere), and the boolean mask [N] of those rows.

    Distillation compares the student's similarity of an image to its mirror with the teacher's: a glyph specialist
    keeps "b" and "d" apart, while emoji, whose vendors draw figures facing either way, teach the shared head to
    treat mirrors as the same object."""
    mask = data.df["domain"].astype(str).isin(list(domains)).to_numpy()
    out = torch.zeros(1, len(mask), trainer.embedder.backbone.num_features, dtype=torch.float16)
    if mask.any():
        paths = data.df["path"].astype(str).to_numpy()[mask]
        out[0, torch.as_tensor(np.flatnonzero(mask))] = _view_features(trainer, paths, 1, MIRROR_AUGMENT)
    return out, torch.from_numpy(mask.copy())


@torch.no_grad()
def teacher_mirror_similarity(trainer, data, teachers: dict, domains: list[str]) -> torch.Tensor:
    """Per row of data.df [N] (float32): the cosine similarity between the embedding of its clean view and of its
    mirrored clean view by its domain's teacher (`teachers`: domain -> checkpoint path), for the rows whose domain
    is in `domains`; NaN elsewhere.

    The targets of the mirror term in an image stage: there the student's backbone trains, so its features cannot be
    cached, but the teacher's can, and one similarity per image is all the term needs (computed once, not per step).
    Any teacher works here, whatever its backbone: it reads its own features."""
    domain_of = data.df["domain"].astype(str).to_numpy()
    paths = data.df["path"].astype(str).to_numpy()
    out = torch.full((len(paths),), float("nan"))
    for domain in sorted(set(domains)):
        rows = np.flatnonzero(domain_of == domain)
        if len(rows) == 0:
            continue
        teacher = load_embedder(teachers[domain]).eval()
        clean, mirrored = (teacher.embed_features(_view_features(trainer, paths[rows], view, augment, teacher).float())
                           for view, augment in ((0, None), (1, MIRROR_AUGMENT)))
        out[torch.as_tensor(rows)] = mirror_similarity(clean, mirrored)
    return out
