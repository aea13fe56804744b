"""Losses: ArcFace / CosFace with sub-centres and per-class margins, margin schedules, relational distillation."""
from .distill import RelationalDistillLoss, mirror_similarity, mirror_similarity_gap, mirror_similarity_loss
from .margin import LOSSES, ArcFaceLoss, CosFaceLoss, MarginLoss, create_loss
from .schedules import MarginSchedule, dynamic_margins

__all__ = ["LOSSES", "ArcFaceLoss", "CosFaceLoss", "MarginLoss", "create_loss", "MarginSchedule", "dynamic_margins",
           "RelationalDistillLoss", "mirror_similarity", "mirror_similarity_gap", "mirror_similarity_loss"]
