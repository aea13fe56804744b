"""Angular/cosine margin classification losses (margins in radians for ArcFace, cosine units for CosFace).

Each loss owns its class-centre matrix W [C * sub_centers, d] (as pytorch-metric-learning's losses do), so
"locking the class centres" (the 1st place's frozen last FC) is `loss.lock_centers()`, and a fresh head for a new
dataset is a new loss module. Margins may be a float or a per-class tensor [C] (dynamic margins).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class MarginLoss(nn.Module):
    """Shared machinery: normalised class centres, optional sub-centres (max-pooled), scaled cross-entropy."""

    def __init__(self, embed_dim: int, num_classes: int, scale: float = 30.0, margin: float | torch.Tensor = 0.5,
                 sub_centers: int = 1):
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"a margin loss needs at least 2 classes, got {num_classes}")
        if sub_centers < 1:
            raise ValueError(f"sub_centers must be >= 1, got {sub_centers}")
        self.embed_dim, self.num_classes, self.sub_centers, self.scale = embed_dim, num_classes, sub_centers, scale
        self.weight = nn.Parameter(torch.empty(num_classes * sub_centers, embed_dim))
        nn.init.xavier_uniform_(self.weight)
        self.register_buffer("margins", torch.zeros(num_classes))
        self.set_margin(margin)

    def set_margin(self, margin: float | torch.Tensor) -> None:
        """Set one margin for all classes, or a per-class tensor [C]."""
        m = torch.as_tensor(margin, dtype=torch.float32)
        if m.ndim == 0:
            m = m.expand(self.num_classes)
        if m.shape != (self.num_classes,):
            raise ValueError(f"per-class margins must have shape ({self.num_classes},), got {tuple(m.shape)}")
        self.margins.copy_(m)

    def lock_centers(self, locked: bool = True) -> None:
        """Freeze (or unfreeze) the class centres: training then moves embeddings, not the class geometry."""
        self.weight.requires_grad_(not locked)

    def cosine(self, embeddings: torch.Tensor) -> torch.Tensor:
        """cos(embedding, class centre) [B, C]; with sub-centres, the closest sub-centre of each class."""
        cos = F.linear(F.normalize(embeddings.float(), dim=-1), F.normalize(self.weight.float(), dim=-1))
        if self.sub_centers > 1:
            cos = cos.view(-1, self.num_classes, self.sub_centers).amax(dim=-1)
        return cos

    def target_logit(self, cos_target: torch.Tensor, margin: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def logits(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Scaled logits [B, C] with the margin applied to each sample's own class."""
        cos = self.cosine(embeddings)
        labels = labels.long().view(-1, 1)
        target = cos.gather(1, labels)
        new_target = self.target_logit(target, self.margins[labels])
        return self.scale * cos.scatter(1, labels, new_target)

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy over the batch. embeddings [B, d] (need not be normalised), labels [B] in [0, C)."""
        return F.cross_entropy(self.logits(embeddings, labels), labels.long())


class ArcFaceLoss(MarginLoss):
    """ArcFace (Deng et al. 2019): target logit s*cos(theta + m), m in radians.

    Where theta + m would pass pi, cos(theta + m) stops decreasing; there the target logit continues as
    cos(theta) - m*sin(m) (the insightface convention), which keeps the loss monotonic in theta.
    """

    def target_logit(self, cos_target, margin):
        cos_target = cos_target.clamp(-1 + 1e-7, 1 - 1e-7)
        sin_target = torch.sqrt(1.0 - cos_target * cos_target)
        phi = cos_target * torch.cos(margin) - sin_target * torch.sin(margin)
        return torch.where(cos_target > torch.cos(math.pi - margin), phi, cos_target - margin * torch.sin(margin))


class CosFaceLoss(MarginLoss):
    """CosFace / AM-softmax (Wang et al. 2018): target logit s*(cos(theta) - m); the 1st GUIE place's
    `AddMarginProduct` with s=30, m=0.55-0.65."""

    def target_logit(self, cos_target, margin):
        return cos_target - margin


LOSSES = {"arcface": ArcFaceLoss, "cosface": CosFaceLoss}


def create_loss(name: str, embed_dim: int, num_classes: int, **kwargs) -> MarginLoss:
    """Build a margin loss by name ('arcface' or 'cosface'); kwargs: scale, margin, sub_centers."""
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; choose from {sorted(LOSSES)}")
    return LOSSES[name](embed_dim, num_classes, **kwargs)
