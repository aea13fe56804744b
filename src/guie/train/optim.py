"""Which parts of the model train (backbone / head / class centres) and how: per-part learning rates, layer-wise
decay over backbone depth, optimizers, LR schedules, train/eval mode per part."""
from __future__ import annotations

import math

import torch
from torch import nn

from ..errors import InputError
from ..models.embedder import Embedder
from .recipe import OptimizerConfig, ScheduleConfig, StageConfig


def param_groups(embedder, loss_module, lrs: dict, train_parts: list[str], layer_decay: float = 1.0,
                 weight_decay: float = 0.0) -> list[dict]:
    """Parameter groups: head and centres at their LRs; backbone blocks at lr * layer_decay**(depth from top).

    Norm/bias/embedding-token parameters get no weight decay, as in timm and open_clip.
    """
    groups: list[dict] = []
    if "head" in train_parts:
        groups += _split_decay(list(embedder.head.named_parameters()), lrs["head"], weight_decay, "head")
    if "centers" in train_parts:
        groups.append({"params": [loss_module.weight], "lr": lrs["centers"], "weight_decay": weight_decay,
                       "name": "centers"})
    if "backbone" in train_parts:
        ids, n_layers = embedder.backbone.param_layer_ids()
        by_layer: dict[int, list] = {}
        for name, p in embedder.backbone.named_parameters():
            by_layer.setdefault(ids.get(name, n_layers - 1), []).append((name, p))
        for layer, named in sorted(by_layer.items()):
            scale = layer_decay ** (n_layers - 1 - layer)
            groups += _split_decay(named, lrs["backbone"] * scale, weight_decay, f"backbone.{layer}")
    for g in groups:
        g["base_lr"] = g["lr"]
    return [g for g in groups if g["params"]]


def _split_decay(named, lr, wd, name):
    decay = [p for n, p in named if p.ndim > 1 and not n.endswith(("class_embedding", "positional_embedding"))]
    no_decay = [p for n, p in named if not (p.ndim > 1 and not n.endswith(("class_embedding", "positional_embedding")))]
    return [{"params": decay, "lr": lr, "weight_decay": wd, "name": name},
            {"params": no_decay, "lr": lr, "weight_decay": 0.0, "name": f"{name}.no_decay"}]


def create_optimizer(groups: list[dict], cfg: OptimizerConfig) -> torch.optim.Optimizer:
    """AdamW or SGD (with momentum) over prepared parameter groups."""
    if cfg.name == "adamw":
        return torch.optim.AdamW(groups, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    raise InputError(f"optimizer {cfg.name!r}: choose adamw or sgd")


def lr_multiplier(step: int, total_steps: int, steps_per_epoch: int, cfg: ScheduleConfig) -> float:
    """LR factor at optimizer step `step`: linear warm-up, then cosine / step / constant."""
    if step < cfg.warmup_steps:
        return cfg.warmup_start + (1 - cfg.warmup_start) * step / max(1, cfg.warmup_steps)
    if cfg.name == "constant":
        return 1.0
    if cfg.name == "step":
        epoch = step / max(1, steps_per_epoch)
        return cfg.gamma ** sum(epoch >= m for m in cfg.milestones)
    if cfg.name == "cosine":
        progress = min(1.0, (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps))
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    raise InputError(f"schedule {cfg.name!r}: choose cosine, step or constant")


def set_trainable(embedder: Embedder, loss: nn.Module, parts: list[str]) -> None:
    """Gradients for the stage's parts only (backbone / head / class centres)."""
    embedder.requires_grad_(False)
    embedder.head.requires_grad_("head" in parts)
    embedder.backbone.requires_grad_("backbone" in parts)
    loss.lock_centers("centers" not in parts)


def set_train_mode(embedder: Embedder, stage: StageConfig) -> None:
    """Head in train mode (dropout); a frozen backbone fully in eval mode; BN statistics fixed if freeze_bn; a locked
    head keeps its feature standardisation (BatchNorm running statistics) fixed too."""
    embedder.train()
    if "head" not in stage.train:
        for m in embedder.head.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()
    if "backbone" not in stage.train:
        embedder.backbone.eval()
    elif stage.freeze_bn:
        for m in embedder.backbone.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()
