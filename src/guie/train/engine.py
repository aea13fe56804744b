"""The training engine: runs a recipe's stages in order, resumably, on one CPU or many GPUs (DDP).

Per stage: build the stage's label space, pick what trains (backbone / head / class centres), then either train on
cached backbone features (frozen backbone: the fast path) or on images. Checkpoints (model, centres, optimizer, step,
sampler position, RNG) are written atomically every N steps, at stage ends and on SIGTERM; `resume=True` continues
from the last one and reproduces the uninterrupted run.
"""
from __future__ import annotations

import math
import os
import random
import shutil
import signal
import time
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ..data.manifest import select_rows
from ..distributed import DistInfo, barrier, init_distributed, mean_across_ranks
from ..embedding.engine import embed_images, embed_num_workers
from ..embedding.feature_store import cached_features
from ..errors import GuieError
from ..evaluate.protocol import evaluate_folds, evaluate_query_index
from ..losses import (
    LOSSES,
    MarginSchedule,
    RelationalDistillLoss,
    create_loss,
    mirror_similarity_gap,
    mirror_similarity_loss,
)
from ..models.embedder import Embedder, create_embedder, load_embedder, save_embedder
from ..models.heads import ProjectionHead
from ..models.preprocess import draft_size
from ..pipeline.augment import AugmentConfig, build_train_transform
from ..pipeline.datasets import ImageFileDataset, SeededSampler, collate_skip_failed, sample_seed
from ..pipeline.samplers import ClassBalancedSampler, ShuffleSampler
from ..runtime import intra_op_threads, tune_cpu_allocator
from ..typed_yaml import to_dict
from ..utils import atomic_save, atomic_write_text, default_cache_dir, log
from .data import StageData, build_stage_data, load_validation_frame
from .frozen_features import mirror_feature_cache, stage_feature_cache, teacher_mirror_similarity
from .logger import RunLogger
from .optim import create_optimizer, lr_multiplier, param_groups
from .recipe import RunConfig, StageConfig

CHECKPOINT_VERSION = 1


def stage_model_path(run_dir: Path, index: int, stage_name: str) -> Path:
    """Where a run keeps the model as it stood at the end of stage `index` (model.pt is always the latest)."""
    return Path(run_dir) / f"model-stage-{index:02d}-{stage_name}.pt"


class TrainingInterrupted(GuieError, RuntimeError):
    """Raised after SIGTERM/SIGINT once a checkpoint has been written; the CLI exits 143 (128 + SIGTERM)."""

    exit_code = 143


class TrainModule(nn.Module):
    """embedder head (+ backbone unless features are given) + margin loss: the module DDP wraps."""

    def __init__(self, embedder: Embedder, loss: nn.Module, distill: nn.Module | None = None,
                 distill_weight: float = 0.0, mirror_weight: float = 0.0):
        super().__init__()
        self.embedder, self.loss = embedder, loss
        self.distill, self.distill_weight, self.mirror_weight = distill, distill_weight, mirror_weight

    def forward(self, inputs: torch.Tensor, targets: torch.Tensor, features_given: bool,
                teacher: torch.Tensor | None = None, groups: torch.Tensor | None = None,
                mirror_of: torch.Tensor | None = None, mirror_target: torch.Tensor | None = None) -> torch.Tensor:
        """Rows past `targets` are mirrored copies of rows `mirror_of`, for the mirror term alone; its target is the
        teacher's embeddings (`teacher`, frozen-backbone stages) or one similarity per pair (`mirror_target`)."""
        feats = inputs if features_given else self.embedder.forward_features(inputs)
        head, n = self.embedder.head, len(targets)
        mirror_term = bool(self.mirror_weight and (teacher is not None or mirror_target is not None)
                           and mirror_of is not None and len(mirror_of))
        if mirror_term:
            # the image-mirror similarity is read without dropout: two independent dropout masks would make every
            # image look unlike its own mirror, and the term would push the clean similarities up, not down
            normed = head.norm(feats.float())
            emb, clean = head.proj(head.dropout(normed)), head.proj(normed)
        else:
            emb = head(feats.float())
        loss = self.loss(emb[:n], targets)  # rows past the targets (mirrored views) are distillation-only
        if self.distill is not None and teacher is not None:
            loss = loss + self.distill_weight * self.distill(emb, teacher, groups)
            if mirror_term:
                loss = loss + self.distill_weight * self.mirror_weight * mirror_similarity_loss(
                    clean[mirror_of], clean[n:], teacher[mirror_of], teacher[n:])
        elif mirror_term:
            loss = loss + self.distill_weight * self.mirror_weight * mirror_similarity_gap(
                clean[mirror_of], clean[n:], mirror_target)
        return loss


def _set_trainable(embedder: Embedder, loss: nn.Module, parts: list[str]) -> None:
    embedder.requires_grad_(False)
    embedder.head.requires_grad_("head" in parts)
    embedder.backbone.requires_grad_("backbone" in parts)
    loss.lock_centers("centers" not in parts)


def _set_train_mode(embedder: Embedder, stage: StageConfig) -> None:
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


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _worker_init(_):
    torch.set_num_threads(1)


@dataclass
class _StageRun:
    """One stage in progress: what `Trainer._setup_stage` builds and the step loop advances (step, micro)."""

    index: int
    stage: StageConfig
    data: StageData
    use_features: bool
    opt: torch.optim.Optimizer
    module: nn.Module
    ema: Any
    batches: Iterator
    autocast: Any
    total_steps: int
    micro_per_epoch: int
    accum: int
    step: int
    micro: int
    t_stage: float


class Trainer:
    """Runs a RunConfig. `Trainer(cfg).run()` returns the path of the final model checkpoint."""

    def __init__(self, cfg: RunConfig, resume: bool = False, progress: bool = True):
        self.cfg, self.resume, self.progress = cfg, resume, progress
        self.dist: DistInfo = init_distributed(cfg.device)
        self.device = self.dist.device
        if self.device.type == "cpu":
            tune_cpu_allocator()
        self.run_dir = cfg.run_dir
        self.ckpt_dir = self.run_dir / "checkpoints"
        self.logger = RunLogger(self.run_dir, enabled=self.dist.is_main)
        self._stop_signal: int | None = None
        _seed_everything(cfg.seed)
        self._init_centers: dict | None = None  # class centres stored with model.init_checkpoint, if any
        self.embedder = self._build_embedder()
        self.loss: nn.Module | None = None
        self.class_names: np.ndarray | None = None
        self._val_cache: dict = {}
        self.last_validation: dict[str, float] = {}  # per validation set, from the latest validate()
        # (row numbers on the centres' device, their values) held fixed; an index, not a boolean mask, because
        # assigning through a mask waits for the GPU at every step
        self._kept_centers: tuple[torch.Tensor, torch.Tensor] | None = None

    # ----------------------------------------------------------------------------------------------- setup
    def _build_embedder(self) -> Embedder:
        m = self.cfg.model
        if m.init_checkpoint:
            embedder = load_embedder(m.init_checkpoint)
            payload = torch.load(m.init_checkpoint, map_location="cpu", weights_only=False)
            extra = payload.get("extra", {})
            if "centers" in extra:
                self._init_centers = extra  # reused by a first stage that keeps the same label space
            return embedder
        # seed=None: the head comes from the global RNG that _seed_everything(cfg.seed) just seeded
        return create_embedder(m.backbone, m.embed_dim, m.dropout, pretrained=m.pretrained, image_size=m.image_size,
                               preprocess=m.preprocess or None, head_norm=m.head_norm,
                               head_hidden=m.head_hidden, seed=None,
                               **m.backbone_kwargs)

    def _write_resolved_config(self) -> None:
        if self.dist.is_main:
            import yaml

            atomic_write_text(yaml.safe_dump(to_dict(self.cfg), sort_keys=False), self.run_dir / "config.yaml")

    def _apply_image_size(self, stage: StageConfig) -> None:
        if stage.image_size:
            self.embedder.set_image_size(stage.image_size)

    def _setup_loss(self, stage: StageConfig, data: StageData) -> None:
        """The stage's margin loss (class centres). The previous stage's loss (or the init checkpoint's centres) is
        reused as is when the label space is unchanged; when it changed (datasets added or removed), a new matrix
        is made in which the classes known before keep their centres and new classes start random, unless the
        stage asks for `new_centers` (all random). `lock_kept_centers` then holds the kept rows fixed."""
        lc = stage.loss
        prev, prev_names = self.loss, self.class_names
        if prev is None and self._init_centers is not None and not stage.new_centers:
            init = self._init_centers
            prev = create_loss(init["loss_name"], self.embedder.embed_dim, len(init["class_names"]),
                               sub_centers=init["sub_centers"])
            prev.load_state_dict(init["centers"])
            prev_names = np.asarray(init["class_names"], dtype=object)
            if self.dist.is_main:
                log.info("class centres from %s (%d classes)", self.cfg.model.init_checkpoint, len(prev_names))
        same_space = prev_names is not None and np.array_equal(np.asarray(prev_names, dtype=str),
                                                               data.class_names.astype(str))
        self._kept_centers = None
        if (prev is not None and same_space and not stage.new_centers and prev.sub_centers == lc.sub_centers
                and type(prev) is LOSSES.get(lc.name)):
            self.loss, self.class_names = prev, np.asarray(prev_names, dtype=object)
        else:
            self.loss = create_loss(lc.name, self.embedder.embed_dim, data.num_classes, scale=lc.scale,
                                    margin=lc.margin, sub_centers=lc.sub_centers)
            self.class_names = data.class_names
            kept = None
            if prev is not None and not stage.new_centers and prev.sub_centers == lc.sub_centers:
                kept = carry_centers(prev, prev_names, self.loss, data.class_names)
            if kept is not None and self.dist.is_main:
                log.info("class centres: %d kept from the previous stage%s, %d new", int(kept.sum()),
                         " (locked)" if stage.lock_kept_centers else "", int((~kept).sum()))
            if kept is not None and stage.lock_kept_centers and kept.any():
                self._kept_centers = self._kept_rows(np.repeat(kept, self.loss.sub_centers))
        self.loss.scale = lc.scale
        self.loss.to(self.device)
        if self._kept_centers is not None:
            self._kept_centers = tuple(t.to(self.device) for t in self._kept_centers)

    def _kept_rows(self, row_mask) -> tuple[torch.Tensor, torch.Tensor]:
        """(row numbers, row values) of the centre matrix's rows where `row_mask` is true, on its device."""
        weight = self.loss.weight.detach()
        rows = torch.as_tensor(np.flatnonzero(np.asarray(row_mask)), device=weight.device)
        return rows, weight[rows].clone()

    def _kept_row_mask(self) -> torch.Tensor:
        """The kept rows as the boolean row mask checkpoints store (CPU)."""
        mask = torch.zeros(self.loss.weight.shape[0], dtype=torch.bool)
        mask[self._kept_centers[0].cpu()] = True
        return mask

    def _restore_kept_centers(self) -> None:
        """Put the locked kept centres back after an optimizer step (exact, whatever the optimizer's momentum or
        weight decay did to them)."""
        if self._kept_centers is not None:
            rows, values = self._kept_centers
            with torch.no_grad():
                self.loss.weight.index_copy_(0, rows, values)

    def _teacher_paths(self, index: int, stage: StageConfig) -> dict[str, Path]:
        """The stage's distillation teachers as existing checkpoint paths (`distill_teacher_path`)."""
        paths = {}
        for domain, ref in stage.distill.teachers.items():
            paths[domain] = distill_teacher_path(self.run_dir, self.cfg.stages[:index], stage.name, ref)
            if not paths[domain].exists():
                raise FileNotFoundError(f"stage {stage.name!r}: distill teacher for {domain!r} not found: "
                                        f"{paths[domain]}")
        return paths

    def _margin_for_epoch(self, stage: StageConfig, epoch: int, data: StageData):
        lc = stage.loss
        sched = MarginSchedule(start=lc.margin, step=lc.margin_step, max=lc.margin_max,
                               class_size_a=lc.class_size_a, class_size_b=lc.class_size_b)
        return sched.margin(epoch, data.class_counts)

    def _make_sampler(self, stage: StageConfig, data: StageData, local_batch: int):
        df = data.df
        common = dict(num_replicas=self.dist.world_size, rank=self.dist.rank, seed=self.cfg.seed)
        if stage.sampler.name == "class_balanced":
            domains = df["domain"].to_numpy() if stage.sampler.balance == "domain" else None
            return ClassBalancedSampler(df["target"].to_numpy(), batch_size=stage.batch_size,
                                        m_per_class=stage.sampler.m_per_class, domains=domains,
                                        domain_weights=stage.sampler.domain_weights,
                                        **common)
        if stage.sampler.name == "shuffle":
            return ShuffleSampler(len(df), batch_size=stage.batch_size, **common)
        raise ValueError(f"stage {stage.name!r}: sampler {stage.sampler.name!r}: choose shuffle or class_balanced")

    # ------------------------------------------------------------------------------------------ checkpoints
    def _checkpoint(self, stage_index: int, stage: StageConfig, step: int, micro: int, opt, ema, done: bool,
                    tag: str | None = None) -> None:
        if not self.dist.is_main:
            return
        state = {"version": CHECKPOINT_VERSION, "stage_index": stage_index, "stage_name": stage.name,
                 "step": step, "micro_step": micro, "stage_done": done,
                 "image_size": self.embedder.preprocess.image_size,
                 "model": self.embedder.state_dict(), "loss": self.loss.state_dict(),
                 "loss_name": stage.loss.name, "sub_centers": self.loss.sub_centers,
                 "class_names": list(map(str, self.class_names)),
                 "kept_centers_mask": None if self._kept_centers is None else self._kept_row_mask(),
                 "optimizer": opt.state_dict() if opt is not None else None,
                 "ema": ema.state_dict() if ema is not None else None, "rng": _rng_state(),
                 "config": to_dict(self.cfg)}
        atomic_save(state, self.ckpt_dir / "last.pt")
        if tag:
            atomic_save(state, self.ckpt_dir / f"{tag}.pt")

    def _load_last(self) -> dict | None:
        path = self.ckpt_dir / "last.pt"
        if not path.exists():
            return None
        state = torch.load(path, map_location="cpu", weights_only=False)
        if state.get("version") != CHECKPOINT_VERSION:
            raise RuntimeError(f"{path}: checkpoint version {state.get('version')} is not {CHECKPOINT_VERSION}")
        names = [s.name for s in self.cfg.stages]
        if state["stage_name"] not in names or names.index(state["stage_name"]) != state["stage_index"]:
            raise RuntimeError(f"{path}: checkpoint is from stage {state['stage_name']!r}, which is not stage "
                               f"{state['stage_index']} of this recipe {names}; use a new output_dir")
        return state

    def _save_model(self, path: Path, ema, extra_name: str) -> None:
        if not self.dist.is_main:
            return
        model = self.embedder
        if ema is not None:
            model = _ema_embedder(self.embedder, ema)
        extra = {"centers": self.loss.state_dict(), "class_names": list(map(str, self.class_names)),
                 "loss_name": type(self.loss).__name__.removesuffix("Loss").lower(),
                 "sub_centers": self.loss.sub_centers, "stage": extra_name, "run": self.cfg.name}
        save_embedder(model, path, extra=extra)

    # --------------------------------------------------------------------------------------------- signals
    def _on_signal(self, signum, frame):
        self._stop_signal = signum

    # ------------------------------------------------------------------------------------------- validation
    @torch.no_grad()
    def validate(self, stage: StageConfig, use_features: bool) -> float | None:
        """GUIE mP@5 on the validation set(s) with the current (eval-mode) model: the mean over the named sets (each
        set's score is kept in `last_validation`); rank 0 computes."""
        vcfg = self.cfg.validation
        sets = vcfg.all_sets() if vcfg is not None else {}
        if not sets:
            return None
        score = None
        if self.dist.is_main:
            self.embedder.eval()
            scores = {name: self._validate_set(name, vset, vcfg.batch_size, use_features)
                      for name, vset in sets.items()}
            self.last_validation = scores
            score = float(np.mean(list(scores.values())))
            _set_train_mode(self.embedder, stage)
        if self.dist.enabled:
            obj = [score]
            torch.distributed.broadcast_object_list(obj, src=0)
            score = obj[0]
        return score

    def _val_fields(self, val: float | None) -> dict:
        """Log fields of a validation result: the mean, and each set's score when there are several."""
        if val is None:
            return {}
        fields = {"val_mP@5": val}
        if len(self.last_validation) > 1:
            fields["val_sets"] = " ".join(f"{k}={v:.4f}" for k, v in self.last_validation.items())
            fields.update({f"val_mP@5/{k}": v for k, v in self.last_validation.items()})
        return fields

    def _validate_set(self, name: str, vset, batch_size: int, use_features: bool) -> float:
        if name not in self._val_cache:
            self._val_cache[name] = load_validation_frame(vset, self.cfg.cache_dir)
        df = self._val_cache[name]
        if use_features:
            feats, ok = cached_features(self.embedder, df["path"].tolist(), self.cfg.cache_dir or default_cache_dir(),
                                        batch_size=batch_size, num_workers=self.cfg.num_workers,
                                        device=self.device, progress=False, runtime=self.cfg.runtime,
                                        precision=self.cfg.precision)
            emb = self.embedder.embed_features(torch.as_tensor(feats[ok], device=self.device)).cpu().numpy()
        else:
            res = embed_images(self.embedder, df["path"].tolist(), batch_size=batch_size,  # weights change: torch
                               num_workers=self.cfg.num_workers, device=self.device, progress=False, runtime="torch",
                               precision="fp32" if self.device.type == "cpu" else "auto")
            emb, ok = res.embeddings, res.ok
        vdf = df[ok].reset_index(drop=True)
        if vset.folds_by:
            return evaluate_folds(vdf, emb, by=vset.folds_by, missing="exclude").score
        qmask = vdf.index.isin(select_rows(vdf.reset_index(), vset.query_where, f"validation {name} query")["index"])
        imask = vdf.index.isin(select_rows(vdf.reset_index(), vset.index_where, f"validation {name} index")["index"])
        return evaluate_query_index(vdf[qmask], emb[qmask], vdf[imask], emb[imask], missing="exclude").score

    # -------------------------------------------------------------------------------------------------- run
    def run(self) -> Path:
        """Run (or resume) every stage; returns run_dir/model.pt."""
        with intra_op_threads(self.cfg.cpu_threads if self.device.type == "cpu" else None):
            return self._run()

    def _run(self) -> Path:
        self._write_resolved_config()
        state = self._load_last() if self.resume else None
        if self.resume and state is None and self.dist.is_main:
            log.info("no checkpoint in %s: starting from scratch", self.ckpt_dir)
        start = 0
        if state is not None:
            start = state["stage_index"] + (1 if state["stage_done"] else 0)
            for s in self.cfg.stages[:state["stage_index"] + 1]:
                self._apply_image_size(s)
            self.embedder.load_state_dict(state["model"])
            self.logger.truncate_after(state["stage_name"], state["step"])
            if state["stage_done"]:
                self._restore_loss_from_state(state)
                _set_rng_state(state["rng"])
                state = None
        old_handlers = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            for i in range(start, len(self.cfg.stages)):
                self._run_stage(i, self.cfg.stages[i], state)
                state = None
        finally:
            for s, h in old_handlers.items():
                signal.signal(s, h)
            self.logger.close()
        final = self.run_dir / "model.pt"
        barrier(self.dist)
        return final

    def _restore_loss_from_state(self, state: dict) -> None:
        self.loss = create_loss(state["loss_name"], self.embedder.embed_dim, len(state["class_names"]),
                                sub_centers=state["sub_centers"])
        self.loss.load_state_dict(state["loss"])
        self.loss.to(self.device)
        self.class_names = np.asarray(state["class_names"], dtype=object)

    def _run_stage(self, index: int, stage: StageConfig, state: dict | None) -> None:
        """One stage: set it up (or restore it from `state`), run its optimizer steps, finish it."""
        run = self._setup_stage(index, stage, state)
        self._train_steps(run)
        self._finish_stage(run)

    def _setup_stage(self, index: int, stage: StageConfig, state: dict | None) -> _StageRun:
        """Data, class centres, trainable parts, optimizer, DDP wrapper, EMA and the batch feed of a stage."""
        cfg, dist = self.cfg, self.dist
        t_stage = time.time()
        data = build_stage_data(cfg, stage)
        if stage.dropout is not None:
            self.embedder.head.dropout.p = stage.dropout
        self._apply_image_size(stage)
        if state is not None:
            self._restore_loss_from_state(state)
            if not np.array_equal(np.asarray(self.class_names, dtype=str), data.class_names.astype(str)):
                raise RuntimeError(f"stage {stage.name!r}: the data's classes changed since the checkpoint")
            self.class_names = data.class_names
            self.loss.scale = stage.loss.scale
            mask = state.get("kept_centers_mask")
            self._kept_centers = None if mask is None else self._kept_rows(mask)
        else:
            self._setup_loss(stage, data)
        # Always channels_last (faster on CPU and GPU); also keeps a resumed run numerically identical to an
        # uninterrupted one, whose model embed_images has already converted.
        self.embedder.to(self.device, memory_format=torch.channels_last)
        _set_trainable(self.embedder, self.loss, stage.train)
        use_features = stage.uses_feature_cache
        if stage.grad_checkpointing and not use_features:
            self.embedder.backbone.set_grad_checkpointing(True)
        if dist.is_main:
            log.info("stage %d/%d %r: %d images, %d classes, training %s on %s", index + 1, len(cfg.stages),
                     stage.name, len(data.df), data.num_classes, "+".join(stage.train),
                     "cached features" if use_features else "images")

        if stage.batch_size % dist.world_size:
            raise ValueError(f"stage {stage.name!r}: batch_size {stage.batch_size} is not divisible by "
                             f"{dist.world_size} processes")
        local_batch = stage.batch_size // dist.world_size
        sampler = self._make_sampler(stage, data, local_batch)
        micro_per_epoch = len(sampler) // local_batch
        if micro_per_epoch < 1:
            raise ValueError(f"stage {stage.name!r}: fewer samples per epoch ({len(sampler)}) than one batch")
        accum = stage.accumulation_steps
        total_steps = stage.steps or max(1, math.ceil(stage.epochs * micro_per_epoch / accum))

        groups = param_groups(self.embedder, self.loss, stage.lr, stage.train, stage.layer_decay,
                              stage.optimizer.weight_decay)
        opt = create_optimizer(groups, stage.optimizer)
        distill = (RelationalDistillLoss(stage.distill.temperature, stage.distill.group_weights())
                   if stage.distill.weight and use_features else None)
        if stage.distill.mirror_weight and not isinstance(self.embedder.head, ProjectionHead):
            raise ValueError(f"stage {stage.name!r}: distill.mirror_weight needs a projection head (model.embed_dim)")
        module: nn.Module = TrainModule(self.embedder, self.loss, distill, stage.distill.weight,
                                        stage.distill.mirror_weight)
        if dist.enabled:
            module = nn.parallel.DistributedDataParallel(
                module, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                broadcast_buffers=False)
        ema = None
        if stage.ema_decay:
            from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

            ema = AveragedModel(self.embedder, multi_avg_fn=get_ema_multi_avg_fn(stage.ema_decay), use_buffers=True)

        step, micro = 0, 0
        if state is not None:
            step, micro = state["step"], state["micro_step"]
            opt.load_state_dict(state["optimizer"])
            if ema is not None and state.get("ema"):
                ema.load_state_dict(state["ema"])
            _set_rng_state(state["rng"])
            if dist.is_main:
                log.info("resuming stage %r at step %d/%d", stage.name, step, total_steps)

        if use_features:
            feats = stage_feature_cache(self, stage, data)  # [V, N, F] float16 on CPU
            teach = mirror = None
            if stage.distill.weight:
                mirror_feats = mirror_rows = None
                if stage.distill.mirror_domains:
                    mirror_feats, mirror_rows = mirror_feature_cache(self, data, stage.distill.mirror_domains)
                views = feats if mirror_feats is None else torch.cat([feats, mirror_feats])  # teachers load once
                teachers = self._teacher_paths(index, stage)
                embedded, groups = teacher_embeddings(self.embedder, stage, data, views, teachers)
                teach = (embedded[:len(feats)], groups)
                if mirror_feats is not None:
                    mirror = (mirror_feats[0], embedded[len(feats)], mirror_rows)
            batches = self._feature_batches(sampler, data, feats, local_batch, micro, micro_per_epoch, teach, mirror)
        else:
            mirror_targets = None
            if stage.distill.weight:  # image stages: the mirror term alone (StageConfig checks)
                mirror_targets = teacher_mirror_similarity(self, data, self._teacher_paths(index, stage),
                                                           stage.distill.mirror_domains)
            batches = self._image_batches(sampler, stage, data, local_batch, micro, micro_per_epoch, mirror_targets)
        precision = stage.precision if stage.precision != "auto" else ("bf16" if self.device.type == "cuda" else "fp32")
        autocast = (torch.autocast(self.device.type, dtype=torch.bfloat16) if precision == "bf16" else nullcontext())
        return _StageRun(index, stage, data, use_features, opt, module, ema, batches, autocast, total_steps,
                         micro_per_epoch, accum, step, micro, t_stage)

    def _train_steps(self, run: _StageRun) -> None:
        """The step loop: LR schedule, margin per epoch, accumulation, logging, validation, checkpoints, signals."""
        cfg, dist, stage, opt, ema = self.cfg, self.dist, run.stage, run.opt, run.ema
        _set_train_mode(self.embedder, stage)
        last_epoch = -1
        bar = tqdm(total=run.total_steps, initial=run.step, desc=f"stage {stage.name}",
                   disable=not (self.progress and dist.is_main), dynamic_ncols=True)
        t0, seen, loss_sum, loss_n = time.time(), 0, 0.0, 0
        while run.step < run.total_steps:
            for g in opt.param_groups:
                g["lr"] = g["base_lr"] * lr_multiplier(run.step, run.total_steps,
                                                       max(1, run.micro_per_epoch // run.accum), stage.schedule)
            opt.zero_grad(set_to_none=True)
            for a in range(run.accum):
                epoch = run.micro // run.micro_per_epoch
                if epoch != last_epoch:
                    self.loss.set_margin(self._margin_for_epoch(stage, epoch, run.data))
                    last_epoch = epoch
                inputs, targets, *teacher = next(run.batches)
                sync = a == run.accum - 1 or not dist.enabled
                with (nullcontext() if sync else run.module.no_sync()), run.autocast:
                    loss = run.module(inputs, targets, run.use_features, *teacher) / run.accum
                loss.backward()
                run.micro += 1
                seen += len(targets)
                # summed on the device: a float() here would wait for the GPU every step and leave it idle while
                # the next step's kernels are launched
                loss_sum = loss_sum + loss.detach().float() * run.accum
                loss_n += 1
            if stage.max_grad_norm:
                torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]],
                                               stage.max_grad_norm)
            opt.step()
            self._restore_kept_centers()
            if ema is not None:
                ema.update_parameters(self.embedder)
            run.step += 1
            step = run.step
            bar.update(1)
            stop = self._stop_signal is not None
            if dist.enabled:
                flag = torch.tensor([1.0 if stop else 0.0])
                torch.distributed.all_reduce(flag)
                stop = bool(flag.item())
            val_due = (cfg.validation is not None and cfg.validation.every_steps
                       and step % cfg.validation.every_steps == 0)
            if step % cfg.log_every_steps == 0 or step == run.total_steps or val_due:
                mean_loss = mean_across_ranks(float(loss_sum) / max(1, loss_n), dist)
                rate = seen * dist.world_size / max(1e-9, time.time() - t0)
                val = self.validate(stage, run.use_features) if (val_due and step != run.total_steps) else None
                margin = self.loss.margins.mean().item()
                self.logger.log(self._global_step(run.index, step), stage=stage.name, step=step,
                                epoch=round(run.micro / run.micro_per_epoch, 3), loss=mean_loss,
                                lr=opt.param_groups[0]["lr"], margin=margin, images_per_s=round(rate, 1),
                                **self._val_fields(val))
                bar.set_postfix(loss=f"{mean_loss:.3f}", **({"val": f"{val:.3f}"} if val is not None else {}))
                t0, seen, loss_sum, loss_n = time.time(), 0, 0.0, 0
            if stop:
                self._checkpoint(run.index, stage, step, run.micro, opt, ema, done=False)
                bar.close()
                raise TrainingInterrupted(f"stopped by signal at stage {stage.name!r} step {step}/{run.total_steps}; "
                                          f"checkpoint written, continue with --resume")
            if step % cfg.checkpoint_every_steps == 0 and step < run.total_steps:
                self._checkpoint(run.index, stage, step, run.micro, opt, ema, done=False)
        bar.close()

    def _finish_stage(self, run: _StageRun) -> None:
        """EMA weights in, final validation, the stage-end checkpoint and model files, the loss plot."""
        cfg, dist, stage, index = self.cfg, self.dist, run.stage, run.index
        if stage.grad_checkpointing and not run.use_features:
            self.embedder.backbone.set_grad_checkpointing(False)
        if run.ema is not None:
            self.embedder.load_state_dict(_ema_embedder(self.embedder, run.ema).state_dict())
        val = self.validate(stage, run.use_features)
        self.embedder.eval()
        self.logger.log(self._global_step(index, run.step), stage=stage.name, step=run.step,
                        epoch=round(run.micro / run.micro_per_epoch, 3), **self._val_fields(val))
        self._checkpoint(index, stage, run.step, run.micro, None, None, done=True,
                         tag=f"stage-{index:02d}-{stage.name}")
        self._save_model(stage_model_path(self.run_dir, index, stage.name), None, stage.name)
        self._save_model(self.run_dir / "model.pt", None, stage.name)
        self.logger.plot(f"{cfg.name}")
        if dist.is_main:
            msg = f"stage {stage.name!r} done in {time.time() - run.t_stage:.0f} s"
            if val is not None:
                msg += f", validation mP@5 {val:.4f}"
                if len(self.last_validation) > 1:
                    msg += " (" + ", ".join(f"{k} {v:.4f}" for k, v in self.last_validation.items()) + ")"
            log.info(msg)
        barrier(dist)

    def _global_step(self, stage_index: int, step: int) -> int:
        return stage_index * 10_000_000 + step

    # ------------------------------------------------------------------------------------------ batch feeds
    def _feature_batches(self, sampler, data: StageData, feats: torch.Tensor, local_batch: int, micro: int,
                         micro_per_epoch: int, teach: tuple[torch.Tensor, torch.Tensor] | None = None,
                         mirror: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None):
        """Endless (inputs, targets) from cached features; one deterministic view per (epoch, sample). With
        `teach` = (teacher embeddings [V, N, d], group per row [N]) each batch also carries its rows' of both. With
        `mirror` = (mirrored features [N, F], their teacher embeddings [N, d], mask [N]) the batch's masked rows are
        appended again mirrored, as inputs past the targets, for the distillation alone."""
        targets_all = torch.as_tensor(data.df["target"].to_numpy().copy())
        n_views = feats.shape[0]
        epoch, skip = micro // micro_per_epoch, micro % micro_per_epoch
        while True:
            sampler.set_epoch(epoch)
            idx_all = np.fromiter(iter(sampler), dtype=np.int64)
            for b in range(skip, micro_per_epoch):
                idx = idx_all[b * local_batch:(b + 1) * local_batch]
                views = np.array([sample_seed(self.cfg.seed, epoch, int(i)) % n_views for i in idx])
                rows, cols = torch.as_tensor(views), torch.as_tensor(idx)
                x = feats[rows, cols].float().to(self.device)
                if teach is None:
                    yield x, targets_all[idx].to(self.device)
                    continue
                t, groups = teach[0][rows, cols], teach[1][cols]
                if mirror is None:
                    yield x, targets_all[idx].to(self.device), t.to(self.device), groups.to(self.device)
                    continue
                keep = mirror[2][cols]
                extra = cols[keep]
                x = torch.cat([x, mirror[0][extra].float().to(self.device)])
                t, groups = torch.cat([t, mirror[1][extra]]), torch.cat([groups, teach[1][extra]])
                yield (x, targets_all[idx].to(self.device), t.to(self.device), groups.to(self.device),
                       torch.nonzero(keep).flatten().to(self.device))
            epoch, skip = epoch + 1, 0

    def _image_batches(self, sampler, stage: StageConfig, data: StageData, local_batch: int, micro: int,
                       micro_per_epoch: int, mirror_targets: torch.Tensor | None = None):
        """Endless (uint8 images, targets) through DataLoader workers; resumes mid-epoch. With `mirror_targets`
        (one teacher image-to-mirror similarity per row, NaN where none) the batch's rows that have one are appended
        again, left-right mirrored after augmentation, and each batch also carries (None, None, their positions,
        their targets) for the mirror term."""
        transform = build_train_transform(self.embedder.preprocess, AugmentConfig.from_dict(stage.augment))
        # On a CPU-only machine decoding runs in the main process between steps (see guie.pipeline.datasets).
        workers = embed_num_workers(self.device) if self.cfg.num_workers is None else self.cfg.num_workers
        ds = ImageFileDataset(data.df["path"].tolist(), transform, draft_size=draft_size(self.embedder.preprocess),
                              threads=torch.get_num_threads() if workers == 0 else 1)
        targets_all = torch.as_tensor(data.df["target"].to_numpy().copy())
        seeded = SeededSampler(sampler, self.cfg.seed)
        epoch, skip = micro // micro_per_epoch, micro % micro_per_epoch
        reported = 0
        while True:
            seeded.set_epoch(epoch)
            seeded.start = skip * local_batch
            loader = DataLoader(ds, batch_size=local_batch, sampler=seeded, num_workers=workers,
                                collate_fn=collate_skip_failed, drop_last=True, worker_init_fn=_worker_init,
                                pin_memory=self.device.type == "cuda", generator=torch.Generator().manual_seed(0),
                                prefetch_factor=4 if workers else None, persistent_workers=False)
            for b, (idx, images, failed) in enumerate(loader, start=skip):
                if b >= micro_per_epoch:
                    break
                for _, e in failed:
                    if reported < 20:
                        log.warning("skipped %s", e)
                    reported += 1
                if images is None:
                    continue
                targets = targets_all[idx].to(self.device, non_blocking=True)
                if mirror_targets is not None:
                    wanted = mirror_targets[idx]
                    keep = ~torch.isnan(wanted)
                    images = torch.cat([images, images[keep].flip(-1)])
                images = images.to(self.device, non_blocking=True).contiguous(memory_format=torch.channels_last)
                if mirror_targets is None:
                    yield images, targets
                else:
                    yield (images, targets, None, None, torch.nonzero(keep).flatten().to(self.device),
                           wanted[keep].to(self.device))
            epoch, skip = epoch + 1, 0


def distill_teacher_path(run_dir: Path, earlier_stages: list[StageConfig], stage_name: str, ref: str) -> Path:
    """A distillation teacher reference as a checkpoint path: `stage:<name>` is this run's model as it stood after
    that earlier stage (e.g. the first stage's one-domain head, which is that domain's specialist); anything else is
    a checkpoint file."""
    if not str(ref).startswith("stage:"):
        return Path(ref).expanduser()
    names = [s.name for s in earlier_stages]
    name = str(ref).removeprefix("stage:")
    if name not in names:
        raise ValueError(f"stage {stage_name!r}: distill teacher {ref!r}: no earlier stage named {name!r} "
                         f"(earlier stages: {names})")
    return stage_model_path(run_dir, names.index(name), name)


@torch.no_grad()
def teacher_embeddings(student: Embedder, stage: StageConfig, data: StageData, feats: torch.Tensor,
                       teachers: dict[str, Path]) -> tuple[torch.Tensor, torch.Tensor]:
    """The distillation targets of a frozen-backbone stage: every cached feature row embedded by the teacher
    (`teachers`: domain -> checkpoint) of its row's domain ([V, N, d], float32, zero where no teacher), and each
    row's group (teacher index; -1: none). Teachers of domains the stage has no rows of are skipped; a stage with no
    teacher for any row is refused.

    A teacher must read the same features as the student (same backbone, its settings and preprocessing), since it
    is applied to the student's feature cache; anything else is refused with the checkpoint named."""
    domains = data.df["domain"].astype(str).to_numpy()
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
            raise ValueError(f"stage {stage.name!r}: distill teacher {path} ({teacher.spec.backbone}) does not "
                             f"read the student's features ({student.spec.backbone}, same preprocessing needed)")
        emb = torch.stack([teacher.embed_features(feats[v, rows].float()) for v in range(feats.shape[0])])
        if out is None:
            out = torch.zeros(feats.shape[0], feats.shape[1], emb.shape[-1])
        elif emb.shape[-1] != out.shape[-1]:
            raise ValueError(f"stage {stage.name!r}: distill teachers differ in dimension ({path}: {emb.shape[-1]})")
        out[:, rows] = emb
        groups[rows] = g
    if out is None:
        raise ValueError(f"stage {stage.name!r}: no distill teacher for any of its domains {sorted(set(domains))}")
    return out, groups


def carry_centers(old_loss: nn.Module, old_names, new_loss: nn.Module, new_names) -> np.ndarray | None:
    """Copy the centres of classes present in both label spaces (matched by namespaced label) from old_loss into
    new_loss, sub-centres included. Returns the boolean mask of new classes that got an old centre, or None when
    the two spaces share no class (or their sub-centre counts differ)."""
    if old_loss.sub_centers != new_loss.sub_centers or old_loss.embed_dim != new_loss.embed_dim:
        return None
    index = {str(n): i for i, n in enumerate(old_names)}
    pairs = [(j, index[str(n)]) for j, n in enumerate(new_names) if str(n) in index]
    if not pairs:
        return None
    k = new_loss.sub_centers
    new_rows = torch.as_tensor([j * k + s for j, _ in pairs for s in range(k)])
    old_rows = torch.as_tensor([i * k + s for _, i in pairs for s in range(k)])
    with torch.no_grad():
        new_loss.weight[new_rows] = old_loss.weight.detach().to(new_loss.weight.device)[old_rows]
    kept = np.zeros(len(new_names), dtype=bool)
    kept[[j for j, _ in pairs]] = True
    return kept


def _ema_embedder(embedder: Embedder, ema) -> Embedder:
    import copy

    model = copy.deepcopy(embedder)
    model.load_state_dict(ema.module.state_dict())
    return model


def train(cfg: RunConfig, resume: bool = False, progress: bool = True) -> Path:
    """Run a training recipe; returns the final model checkpoint (run_dir/model.pt).

    A run that fails before logging its first step removes the run folder it created (it would hold only an empty
    metrics.csv, TensorBoard file and config.yaml); a folder that existed before, or holds progress, is kept.
    """
    run_dir = cfg.run_dir
    created = not run_dir.exists()
    try:
        return Trainer(cfg, resume=resume, progress=progress).run()
    except BaseException:
        if created and int(os.environ.get("RANK", "0")) == 0 and not _has_progress(run_dir):
            shutil.rmtree(run_dir, ignore_errors=True)
        raise


def _has_progress(run_dir: Path) -> bool:
    """Whether a run folder holds anything worth keeping: a checkpoint, a model or a logged step."""
    if any((run_dir / "checkpoints").glob("*")) or (run_dir / "model.pt").exists():
        return True
    metrics = run_dir / "metrics.csv"
    if metrics.exists():
        with open(metrics) as f:
            return sum(1 for _ in f) > 1  # more than the header
    return False
