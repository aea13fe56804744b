"""Frozen-backbone fast path: train the 64-d head + margin loss on cached backbone features.

Hundreds of epochs cost seconds here (the 5th GUIE place trained 1,000 epochs on embeddings this way).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..losses import MarginSchedule, create_loss
from ..models.heads import ProjectionHead


@dataclass
class HeadTrainingConfig:
    """Settings of a head trained on cached features."""

    embed_dim: int = 64
    dropout: float = 0.5
    head_norm: str = "none"             # "batchnorm": standardise features first
    loss: str = "arcface"
    scale: float = 30.0
    margin: float = 0.5
    sub_centers: int = 1
    class_size_a: float | None = None   # per-class margins a + b * minmax(n^-1/4) when both are set
    class_size_b: float | None = None
    optimizer: str = "adamw"
    lr: float = 0.1
    weight_decay: float = 1e-4
    steps: int = 3200
    batch_size: int = 256
    warmup_steps: int = 100
    seed: int = 0


@dataclass
class TrainedHead:
    """A trained projection head and its class-centre loss (centres kept for later fine-tuning stages)."""

    head: ProjectionHead
    loss: torch.nn.Module
    class_names: np.ndarray
    history: list

    @torch.no_grad()
    def embed_numpy(self, features: np.ndarray) -> np.ndarray:
        """L2-normalised head outputs for a feature matrix (eval mode: no dropout)."""
        self.head.eval()
        out = self.head(torch.as_tensor(features, dtype=torch.float32))
        return F.normalize(out, dim=-1).numpy()


def cosine_lr(step: int, total: int, warmup: int) -> float:
    """Linear warm-up then cosine decay to 0, as a multiplier of the base LR."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def train_head_on_features(features: np.ndarray, labels: np.ndarray, cfg: HeadTrainingConfig,
                           progress: bool = True, view_groups: np.ndarray | None = None) -> TrainedHead:
    """Train ProjectionHead + margin loss on features [N, F] with string/int labels [N].

    Batches are sampled uniformly with replacement each step (seeded).
    """
    gen = torch.Generator().manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    class_names, y = np.unique(np.asarray(labels), return_inverse=True)
    x = torch.as_tensor(features, dtype=torch.float32)
    y = torch.as_tensor(y, dtype=torch.long)
    head = ProjectionHead(x.shape[1], cfg.embed_dim, cfg.dropout, norm=cfg.head_norm)
    loss_fn = create_loss(cfg.loss, cfg.embed_dim, len(class_names), scale=cfg.scale, margin=cfg.margin,
                          sub_centers=cfg.sub_centers)
    sched = MarginSchedule(start=cfg.margin, class_size_a=cfg.class_size_a, class_size_b=cfg.class_size_b)
    loss_fn.set_margin(sched.margin(0, np.bincount(y.numpy())))
    params = list(head.parameters()) + list(loss_fn.parameters())
    if cfg.optimizer == "adamw":
        opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    elif cfg.optimizer == "sgd":
        opt = torch.optim.SGD(params, lr=cfg.lr, momentum=0.9, weight_decay=cfg.weight_decay)
    else:
        raise ValueError(f"optimizer {cfg.optimizer!r}: choose adamw or sgd")
    history = []
    head.train()
    for step in tqdm(range(cfg.steps), desc="head", disable=not progress, dynamic_ncols=True):
        for g in opt.param_groups:
            g["lr"] = cfg.lr * cosine_lr(step, cfg.steps, cfg.warmup_steps)
        idx = torch.randint(0, len(x), (cfg.batch_size,), generator=gen)
        loss = loss_fn(head(x[idx]), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 50 == 0 or step == cfg.steps - 1:
            history.append((step, float(loss.detach())))
    head.eval()
    return TrainedHead(head, loss_fn, class_names, history)
