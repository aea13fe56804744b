"""Margin settings used by GUIE winners: fixed, an epoch ramp (2nd place), per-class from class size (4th/6th)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


def dynamic_margins(class_counts, a: float = 0.05, b: float = 0.45) -> torch.Tensor:
    """Per-class margins m_c = a + b * minmax(n_c ** -1/4): rare classes get larger margins (4th/6th place)."""
    n = np.asarray(class_counts, dtype=np.float64)
    if (n <= 0).any():
        raise ValueError("class counts must be positive")
    x = n ** -0.25
    span = x.max() - x.min()
    norm = (x - x.min()) / span if span > 0 else np.zeros_like(x)
    return torch.tensor(a + b * norm, dtype=torch.float32)


@dataclass
class MarginSchedule:
    """Margin as a function of the epoch: start + step * epoch, capped at max (2nd place: 0.3, +0.1, 0.8).

    step=0 gives a fixed margin. With class_size_a/b set, per-class dynamic margins are used instead (and scaled
    by the ramp's progress if step != 0 is also given: not a published recipe, so the two are kept exclusive).
    """

    start: float = 0.5
    step: float = 0.0
    max: float = 0.8
    class_size_a: float | None = None
    class_size_b: float | None = None

    def __post_init__(self):
        if (self.class_size_a is None) != (self.class_size_b is None):
            raise ValueError("class_size_a and class_size_b must be given together")
        if self.class_size_a is not None and self.step:
            raise ValueError("choose either an epoch ramp (step) or class-size margins, not both")

    def margin(self, epoch: int, class_counts=None) -> float | torch.Tensor:
        """Margin(s) for this (0-based) epoch."""
        if self.class_size_a is not None:
            if class_counts is None:
                raise ValueError("class-size margins need the class counts")
            return dynamic_margins(class_counts, self.class_size_a, self.class_size_b)
        return min(self.max, self.start + self.step * epoch)
