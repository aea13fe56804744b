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

from ..errors import InputError


class MarginLoss(nn.Module):
    """Shared machinery: normalised class centres, optional sub-centres (max-pooled), scaled cross-entropy."""

    max_margin: float = math.inf
    margin_unit: str = ""

    def __init__(self, embed_dim: int, num_classes: int, scale: float = 30.0, margin: float | torch.Tensor = 0.5,
                 sub_centers: int = 1):
        super().__init__()
        if num_classes < 2:
            raise InputError(f"a margin loss needs at least 2 classes, got {num_classes}")
        if sub_centers < 1:
            raise InputError(f"sub_centers must be >= 1, got {sub_centers}")
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
            raise InputError(f"per-class margins must have shape ({self.num_classes},), got {tuple(m.shape)}")
        if not torch.isfinite(m).all() or (m < 0).any() or (m > self.max_margin).any():
            raise InputError(f"{type(self).__name__}: margins must be in [0, {self.max_margin:.4g}] "
                             f"({self.margin_unit}), got values in [{m.min().item():.4g}, {m.max().item():.4g}]")
        self.margins.copy_(m)

    def lock_centers(self, locked: bool = True) -> None:
        """Freeze (or unfreeze) the class centres: training then moves embeddings, not the class geometry."""
        self.weight.requires_grad_(not locked)

    def cosine(self, embeddings: torch.Tensor) -> torch.Tensor:
        """cos(embedding, class centre) [B, C]; with sub-centres, the closest sub-centre of each class.

        Computed in float32 (float64 if the embeddings are float64) with autocast off: under bf16 autocast the
        cosines would keep ~3 significant digits, which a scale of 30-64 turns into logit noise of ~0.1-0.5.
        """
        if embeddings.ndim != 2 or embeddings.shape[1] != self.embed_dim:
            raise ValueError(f"{type(self).__name__}: embeddings must be [B, {self.embed_dim}], "
                             f"got {list(embeddings.shape)}")
        dtype = torch.float64 if embeddings.dtype == torch.float64 else torch.float32
        with torch.autocast(embeddings.device.type, enabled=False):
            cos = F.linear(F.normalize(embeddings.to(dtype), dim=-1), F.normalize(self.weight.to(dtype), dim=-1))
        if self.sub_centers > 1:
            cos = cos.view(-1, self.num_classes, self.sub_centers).amax(dim=-1)
        return cos

    def target_logit(self, cos_target: torch.Tensor, margin: torch.Tensor) -> torch.Tensor:
        """The own-class logit before scaling, from cos(theta) [B, 1] and that class's margin [B, 1]."""
        raise NotImplementedError

    def logits(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Scaled logits [B, C] with the margin applied to each sample's own class."""
        if labels.shape != (embeddings.shape[0],):
            raise ValueError(f"{type(self).__name__}: labels must be [{embeddings.shape[0]}] (one per embedding), "
                             f"got {list(labels.shape)}")
        cos = self.cosine(embeddings)
        labels = labels.long().view(-1, 1)
        target = cos.gather(1, labels)
        with torch.autocast(embeddings.device.type, enabled=False):
            new_target = self.target_logit(target, self.margins[labels].to(cos.dtype))
        return self.scale * cos.scatter(1, labels, new_target)

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy over the batch. embeddings [B, d] (need not be normalised), labels [B] in [0, C)."""
        logits = self.logits(embeddings, labels)
        with torch.autocast(embeddings.device.type, enabled=False):
            return F.cross_entropy(logits, labels.long())


class ArcFaceLoss(MarginLoss):
    """ArcFace (Deng et al. 2019): target logit s*cos(theta + m), m in radians.

    Where theta + m would pass pi, cos(theta + m) stops decreasing; there the target logit continues as
    cos(theta) - m*sin(m) (the insightface convention), which keeps the loss monotonic in theta.
    """

    # pytorch-metric-learning's ArcFaceLoss takes degrees (default 28.6): refuse such values instead of training
    # with a margin of 28.6 rad.
    max_margin, margin_unit = math.pi / 2, "radians"

    def target_logit(self, cos_target, margin):
        cos_target = cos_target.clamp(-1 + 1e-7, 1 - 1e-7)
        sin_target = torch.sqrt(1.0 - cos_target * cos_target)
        phi = cos_target * torch.cos(margin) - sin_target * torch.sin(margin)
        return torch.where(cos_target > torch.cos(math.pi - margin), phi, cos_target - margin * torch.sin(margin))


class CosFaceLoss(MarginLoss):
    """CosFace / AM-softmax (Wang et al. 2018): target logit s*(cos(theta) - m); the 1st GUIE place's
    `AddMarginProduct` with s=30, m=0.55-0.65."""

    max_margin, margin_unit = 2.0, "cosine units"

    def target_logit(self, cos_target, margin):
        return cos_target - margin


LOSSES = {"arcface": ArcFaceLoss, "cosface": CosFaceLoss}


def create_loss(name: str, embed_dim: int, num_classes: int, **kwargs) -> MarginLoss:
    """Build a margin loss by name ('arcface' or 'cosface'); kwargs: scale, margin, sub_centers."""
    key = name.lower()
    if key not in LOSSES:
        raise InputError(f"unknown loss {name!r}; choose from {sorted(LOSSES)}")
    unknown = set(kwargs) - {"scale", "margin", "sub_centers"}
    if unknown:
        raise InputError(f"loss {name!r}: unknown option(s) {sorted(unknown)}; valid: scale, margin, sub_centers")
    return LOSSES[key](embed_dim, num_classes, **kwargs)
