"""Distillation: a stage's teachers, the targets they give its rows, and the loss terms that read them.

A stage's `distill` section names one teacher per domain: a guie checkpoint, or `stage:<name>`, this run's model as
it stood after an earlier stage (e.g. a one-domain head: that domain's specialist). In a frozen-backbone stage the
teachers embed the student's cached features once; the relational term pulls the student's in-batch similarity
distribution on each domain's rows towards its teacher's, and the mirror term holds each image's similarity to its
own left-right mirror at the teacher's. In a stage that trains on images the mirror term alone applies, against one
teacher similarity per image computed once (`frozen_features.teacher_mirror_similarity`).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch

from ..errors import InputError, MissingFileError
from ..losses import RelationalDistillLoss, mirror_similarity_gap, mirror_similarity_loss
from ..models.embedder import Embedder, load_embedder
from .batches import Batch, DistillTargets
from .checkpoint import stage_model_path
from .frozen_features import FeatureCache, mirror_feature_cache, teacher_mirror_similarity
from .objectives import HeadOutput, Objective
from .recipe import DistillConfig, StageConfig


def distill_teacher_path(run_dir: Path, earlier_stages: list[StageConfig], stage_name: str, ref: str) -> Path:
    """A distillation teacher reference as a checkpoint path: `stage:<name>` is this run's model as it stood after
    that earlier stage (e.g. the first stage's one-domain head, which is that domain's specialist); anything else is
    a checkpoint file."""
    if not str(ref).startswith("stage:"):
        return Path(ref).expanduser()
    names = [s.name for s in earlier_stages]
    name = str(ref).removeprefix("stage:")
    if name not in names:
        raise InputError(f"stage {stage_name!r}: distill teacher {ref!r}: no earlier stage named {name!r} "
                         f"(earlier stages: {names})")
    return stage_model_path(run_dir, names.index(name), name)


def check_teachers(run_dir: Path, stages: list[StageConfig], index: int) -> None:
    """Before any stage runs: stage `index`'s teachers name earlier stages or checkpoint files that exist."""
    stage = stages[index]
    for domain, ref in stage.distill.teachers.items():
        path = distill_teacher_path(run_dir, stages[:index], stage.name, ref)
        if not str(ref).startswith("stage:") and not path.is_file():
            raise MissingFileError(path, f"distill teacher for {domain!r} of stage {stage.name!r}")


def teacher_paths(run_dir: Path, stages: list[StageConfig], index: int) -> dict[str, Path]:
    """Stage `index`'s teachers as existing checkpoint paths, domain -> path (`distill_teacher_path`)."""
    stage = stages[index]
    paths = {}
    for domain, ref in stage.distill.teachers.items():
        paths[domain] = distill_teacher_path(run_dir, stages[:index], stage.name, ref)
        if not paths[domain].exists():
            raise MissingFileError(paths[domain], f"distill teacher for {domain!r} of stage {stage.name!r}")
    return paths


@torch.no_grad()
def teacher_embeddings(student: Embedder, stage_name: str, domains: np.ndarray, feats: torch.Tensor,
                       teachers: dict[str, Path]) -> tuple[torch.Tensor, torch.Tensor]:
    """The distillation targets of a frozen-backbone stage: every cached feature row (`feats` [V, N, F], rows of
    `domains` [N]) embedded by the teacher (`teachers`: domain -> checkpoint) of its row's domain ([V, N, d],
    float32, zero where no teacher), and each row's group (teacher index in sorted domain order; -1: none). Teachers
    of domains the stage has no rows of are skipped; a stage with no teacher for any row is refused.

    A teacher must read the same features as the student (same backbone, its settings and preprocessing), since it
    is applied to the student's feature cache; anything else is refused with the checkpoint named."""
    groups = torch.full((len(domains),), -1, dtype=torch.long)
    out = None
    for g, (domain, path) in enumerate(sorted(teachers.items())):
        rows = torch.as_tensor(np.flatnonzero(domains == domain))
        if len(rows) == 0:
            continue  # a teacher of a domain this stage does not train on (one teacher map serves every stage)
        teacher = load_embedder(path).eval()
        same = (teacher.spec.backbone == student.spec.backbone
                and teacher.spec.backbone_kwargs == student.spec.backbone_kwargs
                and teacher.preprocess == student.preprocess)
        if not same:
            raise InputError(f"stage {stage_name!r}: distill teacher {path} ({teacher.spec.backbone}) does not "
                             f"read the student's features ({student.spec.backbone}, same preprocessing needed)")
        emb = torch.stack([teacher.embed_features(feats[v, rows].float()) for v in range(feats.shape[0])])
        if out is None:
            out = torch.zeros(feats.shape[0], feats.shape[1], emb.shape[-1])
        elif emb.shape[-1] != out.shape[-1]:
            raise InputError(f"stage {stage_name!r}: distill teachers differ in dimension ({path}: {emb.shape[-1]})")
        out[:, rows] = emb
        groups[rows] = g
    if out is None:
        raise InputError(f"stage {stage_name!r}: no distill teacher for any of its domains {sorted(set(domains))}")
    return out, groups


def feature_distill_targets(student: Embedder, stage: StageConfig, df: pd.DataFrame, feats: torch.Tensor,
                            teachers: dict[str, Path], cache: FeatureCache) -> DistillTargets:
    """Everything the distillation terms of a frozen-backbone stage read, for the rows of `df` (path, domain) whose
    cached features are `feats` [V, N, F]: teacher embeddings of every view, and with `mirror_domains` the mirrored
    clean view's features and teacher embeddings (teachers load once for both)."""
    mirror_feats = mirror_rows = None
    if stage.distill.mirror_domains:
        mirror_feats, mirror_rows = mirror_feature_cache(student, df, stage.distill.mirror_domains, cache)
    views = feats if mirror_feats is None else torch.cat([feats, mirror_feats])
    embedded, groups = teacher_embeddings(student, stage.name, df["domain"].astype(str).to_numpy(), views, teachers)
    if mirror_feats is None:
        return DistillTargets(embedded[:len(feats)], groups)
    return DistillTargets(embedded[:len(feats)], groups, mirror_feats[0], embedded[len(feats)], mirror_rows)


def image_mirror_targets(stage: StageConfig, df: pd.DataFrame, teachers: dict[str, Path],
                         cache: FeatureCache) -> torch.Tensor:
    """The mirror term's targets in a stage that trains on images: one teacher similarity per row [N] (NaN outside
    the mirror domains)."""
    return teacher_mirror_similarity(df, teachers, stage.distill.mirror_domains, cache)


class RelationalDistillTerm(Objective):
    """weight x relational distillation (`guie.losses.RelationalDistillLoss`) against the batch's teacher."""

    def __init__(self, cfg: DistillConfig):
        super().__init__()
        self.weight = cfg.weight
        self.distill = RelationalDistillLoss(cfg.temperature, cfg.group_weights())

    def applies(self, batch: Batch) -> bool:
        return batch.teacher is not None

    def forward(self, out: HeadOutput, batch: Batch) -> torch.Tensor:
        return self.weight * self.distill(out.embeddings, batch.teacher, batch.groups)


class FeatureMirrorTerm(Objective):
    """weight x mirror_weight x the squared gap between the student's and the teacher's similarity of each image to
    its mirror, both read from the batch's embeddings (frozen-backbone stages)."""

    needs_clean = True

    def __init__(self, cfg: DistillConfig):
        super().__init__()
        self.weight = cfg.weight * cfg.mirror_weight

    def applies(self, batch: Batch) -> bool:
        return batch.teacher is not None and batch.mirrored > 0

    def forward(self, out: HeadOutput, batch: Batch) -> torch.Tensor:
        n, of = batch.size, batch.mirror_of
        return self.weight * mirror_similarity_loss(out.clean[of], out.clean[n:], batch.teacher[of],
                                                    batch.teacher[n:])


class ImageMirrorTerm(Objective):
    """weight x mirror_weight x the squared gap between the student's image-to-mirror similarity and the teacher's,
    given per image (stages that train on images)."""

    needs_clean = True

    def __init__(self, cfg: DistillConfig):
        super().__init__()
        self.weight = cfg.weight * cfg.mirror_weight

    def applies(self, batch: Batch) -> bool:
        return batch.mirror_target is not None and batch.mirrored > 0

    def forward(self, out: HeadOutput, batch: Batch) -> torch.Tensor:
        n, of = batch.size, batch.mirror_of
        return self.weight * mirror_similarity_gap(out.clean[of], out.clean[n:], batch.mirror_target)


def distill_terms(cfg: DistillConfig, use_features: bool) -> list[Objective]:
    """The distillation terms of a stage: none without a weight; relational (+ mirror) on cached features; the
    mirror term alone on images (`StageConfig` refuses distillation on images without it)."""
    if not cfg.weight:
        return []
    if not use_features:
        return [ImageMirrorTerm(cfg)] if cfg.mirror_weight else []
    return [RelationalDistillTerm(cfg)] + ([FeatureMirrorTerm(cfg)] if cfg.mirror_weight else [])
