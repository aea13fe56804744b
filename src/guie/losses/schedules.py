"""Margin settings used by GUIE winners: fixed, an epoch ramp (2nd place), per-class from class size (4th/6th)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..errors import InputError


def dynamic_margins(class_counts, a: float = 0.05, b: float = 0.45) -> torch.Tensor:
    """Per-class margins m_c = a + b * minmax(n_c ** -1/4) (4th/6th place), as float32 [C].

    Rare classes get the largest margin (a + b), the most frequent the smallest (a): a large margin on a class with
    few images would otherwise be fitted by memorising them. All counts equal -> every margin is a.
    """
    n = np.asarray(class_counts, dtype=np.float64)
    if n.ndim != 1 or n.size == 0:
        raise ValueError(f"class counts must be a non-empty 1-D sequence, got shape {n.shape}")
    if (n <= 0).any():
        raise ValueError(f"class counts must be positive; class(es) {np.flatnonzero(n <= 0)[:5].tolist()} have "
                         f"{n[n <= 0][:5].tolist()}")
    x = n ** -0.25
    span = x.max() - x.min()
    norm = (x - x.min()) / span if span > 0 else np.zeros_like(x)
    return torch.tensor(a + b * norm, dtype=torch.float32)


@dataclass
class MarginSchedule:
    """Margin as a function of the epoch: `start` (fixed, step=0) or min(max, start + step * epoch) (a ramp; the
    2nd place used 0.3, +0.1 per epoch, capped at 0.8).

    With class_size_a/b set, per-class dynamic margins (`dynamic_margins`) are used instead. A ramp of per-class
    margins is not a published recipe, so the two are kept exclusive. `max` caps only the ramp: a fixed margin
    above it is used as given, never silently lowered.
    """

    start: float = 0.5
    step: float = 0.0
    max: float = 0.8
    class_size_a: float | None = None
    class_size_b: float | None = None

    def __post_init__(self):
        if (self.class_size_a is None) != (self.class_size_b is None):
            raise InputError("class_size_a and class_size_b must be given together")
        if self.class_size_a is not None and self.step:
            raise InputError("choose either an epoch ramp (step) or class-size margins, not both")
        if self.step < 0:
            raise InputError(f"margin step must be >= 0, got {self.step}")
        if self.step and self.start > self.max:
            raise InputError(f"margin ramp starts at {self.start}, above its cap max={self.max}")

    def margin(self, epoch: int, class_counts=None) -> float | torch.Tensor:
        """Margin(s) for this (0-based) epoch: a float, or a per-class tensor [C] for class-size margins."""
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        if self.class_size_a is not None:
            if class_counts is None:
                raise ValueError("class-size margins need the class counts")
            return dynamic_margins(class_counts, self.class_size_a, self.class_size_b)
        if not self.step:
            return self.start
        # round() keeps 0.3 + 0.1 * 5 from landing a hair above 0.8 (or below a target) in binary floating point
        return min(self.max, round(self.start + self.step * epoch, 12))
