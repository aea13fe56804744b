"""Relational distillation: keep a universal embedding's in-batch neighbourhoods close to a specialist's.

One embedding for many domains loses a little on each domain against that domain's one-domain specialist. Multi-
teacher distillation (the universal-embedding / UNIC recipe) adds, on domain D's samples, a loss that pulls the
student's similarity structure towards the D specialist's. The loss here compares, for every anchor, the softmax over
its cosine similarities to the other samples of the same group (domain) in the batch: KL(teacher || student). Only
pairs inside one group count, because each group's teacher similarities live in that teacher's own space.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InputError


class RelationalDistillLoss(nn.Module):
    """KL divergence between the teacher's and the student's in-batch similarity distributions, per group.

    For anchor i and the other samples j of its group (same `groups` value, j != i):
    p_t(j | i) = softmax_j(cos(t_i, t_j) / T), p_s(j | i) = softmax_j(cos(s_i, s_j) / T), and the loss is the mean over
    anchors of KL(p_t || p_s). Samples whose group is negative (no teacher) and anchors without a partner are
    skipped; a batch with no valid anchor gives 0 (with a gradient path, so DDP sees every parameter used).
    `group_weights[g]` (optional) scales group g's anchors' KL terms (the mean still divides by the anchor count), so
    one domain's neighbourhoods can be held closer to its teacher than another's; without it every group weighs 1.
    """

    def __init__(self, temperature: float = 0.1, group_weights: list[float] | None = None):
        super().__init__()
        if temperature <= 0:
            raise InputError(f"distillation temperature must be > 0, got {temperature}")
        if group_weights is not None and any(not w >= 0 for w in group_weights):
            raise InputError(f"distillation group weights must be >= 0, got {list(group_weights)}")
        self.temperature = temperature
        self.group_weights = None if group_weights is None else torch.tensor(group_weights, dtype=torch.float32)

    def forward(self, student: torch.Tensor, teacher: torch.Tensor, groups: torch.Tensor | None = None
                ) -> torch.Tensor:
        """student [B, d], teacher [B, d'] (any scale: both are L2-normalised here), groups [B] int (-1: none)."""
        if student.shape[0] != teacher.shape[0]:
            raise ValueError(f"student and teacher batches differ: {student.shape[0]} vs {teacher.shape[0]}")
        n = student.shape[0]
        if groups is None:
            groups = torch.zeros(n, dtype=torch.long, device=student.device)
        s = F.normalize(student.float(), dim=-1)
        t = F.normalize(teacher.float().detach(), dim=-1)
        valid = groups >= 0
        pair = (groups[:, None] == groups[None, :]) & valid[:, None] & valid[None, :]
        pair &= ~torch.eye(n, dtype=torch.bool, device=student.device)
        anchors = pair.any(dim=1)
        if not bool(anchors.any()):
            return student.sum() * 0.0
        neg = torch.finfo(torch.float32).min
        logit_s = (s @ s.T / self.temperature).masked_fill(~pair, neg)[anchors]
        logit_t = (t @ t.T / self.temperature).masked_fill(~pair, neg)[anchors]
        mask = pair[anchors]
        log_ps = F.log_softmax(logit_s, dim=1)
        log_pt = F.log_softmax(logit_t, dim=1)
        kl = (log_pt.exp() * (log_pt - log_ps)).masked_fill(~mask, 0.0).sum(dim=1)
        if self.group_weights is not None:
            anchor_groups = groups[anchors]
            if int(anchor_groups.max()) >= len(self.group_weights):
                raise ValueError(f"group {int(anchor_groups.max())} has no weight ({len(self.group_weights)} given)")
            kl = kl * self.group_weights.to(kl.device)[anchor_groups]
        return kl.mean()


def mirror_similarity_loss(student: torch.Tensor, student_mirror: torch.Tensor, teacher: torch.Tensor,
                           teacher_mirror: torch.Tensor) -> torch.Tensor:
    """Mean squared difference between the student's and the teacher's cosine similarity of each image to its
    left-right mirror (rows paired: [M, d] each). The in-batch relational loss barely sees this pair among the
    others; this term holds it directly, so a domain where mirrors differ ("b" / "d") keeps the teacher's
    left-right sensitivity inside a head that another domain (emoji drawn facing either way) pulls towards
    mirror invariance."""
    return mirror_similarity_gap(student, student_mirror, mirror_similarity(teacher, teacher_mirror).detach())


def mirror_similarity(embeddings: torch.Tensor, mirror_embeddings: torch.Tensor) -> torch.Tensor:
    """Cosine similarity [M] of each embedding to its mirror's (rows paired: [M, d] each)."""
    return (F.normalize(embeddings.float(), dim=-1) * F.normalize(mirror_embeddings.float(), dim=-1)).sum(-1)


def mirror_similarity_gap(student: torch.Tensor, student_mirror: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared difference between the student's image-to-mirror cosine similarity and a target similarity [M]
    per pair: the teacher's, read from its embeddings (`mirror_similarity_loss`, frozen-backbone stages) or
    precomputed once per image (image stages, where the teacher would otherwise run on every batch)."""
    return (mirror_similarity(student, student_mirror) - target.float()).pow(2).mean()
