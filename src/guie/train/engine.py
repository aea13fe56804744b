"""The training engine: runs a recipe's stages in order, resumably, on one CPU or many GPUs (DDP).

Before anything trains, every stage is checked and laid out (`plan`). Per stage: the class centres of its label
space (`centers`), what trains (backbone / head / centres), the loss terms (`objectives`, `distill`), then optimizer
steps over batches of cached backbone features (frozen backbone: the fast path, `frozen_features`) or of images
(`batches`). Checkpoints (model, centres, optimizer, step, sampler position, RNG) are written atomically every N
steps, at stage ends and on SIGTERM (`checkpoint`); `resume=True` continues from the last one and reproduces the
uninterrupted run.
"""
from __future__ import annotations

import os
import shutil
import signal
import time
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..distributed import DistInfo, barrier, init_distributed, mean_across_ranks
from ..embedding.engine import embed_num_workers
from ..errors import GuieError, InputError
from ..models.embedder import Embedder, create_embedder, embedder_from_payload, read_checkpoint, save_embedder
from ..models.heads import MAX_EMBED_DIM, ProjectionHead
from ..models.preprocess import draft_size
from ..pipeline.augment import AugmentConfig, build_train_transform
from ..pipeline.datasets import ImageFileDataset
from ..runtime import intra_op_threads, tune_cpu_allocator
from ..typed_yaml import to_dict
from ..utils import atomic_write_text, default_cache_dir, log
from .batches import Batch, feature_batches, image_batches
from .centers import ClassCenters
from .checkpoint import (
    CHECKPOINT_VERSION,
    read_last_checkpoint,
    rng_state,
    seed_everything,
    set_rng_state,
    stage_model_path,
    write_checkpoint,
)
from .distill import distill_terms, feature_distill_targets, image_mirror_targets, teacher_paths
from .frozen_features import FeatureCache, stage_feature_cache
from .logger import LossMeter, RunLogger, global_step
from .objectives import TrainModule
from .optim import create_optimizer, lr_multiplier, param_groups, set_train_mode, set_trainable
from .plan import StagePlan, plan_stage
from .recipe import RunConfig, StageConfig
from .validation import Validator


class TrainingInterrupted(GuieError, RuntimeError):
    """Raised after SIGTERM/SIGINT once a checkpoint has been written; the CLI exits 143 (128 + SIGTERM)."""

    exit_code = 143


@dataclass
class _StageRun:
    """One stage in progress: what `Trainer._setup_stage` builds and the step loop advances (step, micro)."""

    plan: StagePlan
    use_features: bool
    opt: torch.optim.Optimizer
    module: nn.Module
    ema: Any
    batches: Iterator[Batch]
    autocast: Any
    step: int
    micro: int
    t_stage: float
    margin_epoch: int = -1  # the epoch whose margin the loss holds

    @property
    def stage(self) -> StageConfig:
        return self.plan.stage

    @property
    def epoch(self) -> float:
        return round(self.micro / self.plan.micro_per_epoch, 3)


class Trainer:
    """Runs a RunConfig. `Trainer(cfg).run()` returns the path of the final model checkpoint.

    Construction checks every stage that will run (`plan_stage`), so a bad option of any stage fails before the
    model is built or anything trains.
    """

    def __init__(self, cfg: RunConfig, resume: bool = False, progress: bool = True):
        self.cfg, self.resume, self.progress = cfg, resume, progress
        self.dist: DistInfo = init_distributed(cfg.device)
        self.device = self.dist.device
        if self.device.type == "cpu":
            tune_cpu_allocator()
        self.run_dir = cfg.run_dir
        self.ckpt_dir = self.run_dir / "checkpoints"
        self._state = read_last_checkpoint(self.ckpt_dir, [s.name for s in cfg.stages]) if resume else None
        start = 0 if self._state is None else self._state["stage_index"] + (1 if self._state["stage_done"] else 0)
        self.plans = [plan_stage(cfg, i, self.dist) for i in range(start, len(cfg.stages))]
        self.logger = RunLogger(self.run_dir, enabled=self.dist.is_main)
        self._stop_signal: int | None = None
        self.current_plan: StagePlan | None = None   # the stage in progress (a failure names it)
        self.stage_seconds: dict[str, float] = {}    # wall time of each stage run by this process
        seed_everything(cfg.seed)
        self.embedder, init_centers = self._build_embedder()
        for plan in self.plans:
            if plan.stage.distill.mirror_weight and not isinstance(self.embedder.head, ProjectionHead):
                raise InputError(f"stage {plan.stage.name!r}: distill.mirror_weight needs a projection head "
                                 f"(model.embed_dim)")
        self.centers = ClassCenters(self.device, self.embedder.embed_dim, init_centers, cfg.model.init_checkpoint,
                                    verbose=self.dist.is_main)
        self.feature_cache = FeatureCache(cfg.cache_dir or default_cache_dir(), cfg.seed, cfg.num_workers, self.device,
                                          progress, self.dist.rank, self.dist.world_size, cfg.runtime, cfg.precision)
        self.validator = Validator(cfg.validation, cfg.cache_dir, self.feature_cache, self.device, self.dist)

    @property
    def loss(self) -> nn.Module | None:
        """The current stage's margin loss (its class-centre matrix)."""
        return self.centers.loss

    @property
    def last_validation(self) -> dict[str, float]:
        """Each validation set's score from the latest validation."""
        return self.validator.last

    # ----------------------------------------------------------------------------------------------- setup
    def _build_embedder(self) -> tuple[Embedder, dict | None]:
        """The model to train, and the class centres its init checkpoint stored (None if none: the checkpoint is
        read once)."""
        m = self.cfg.model
        if m.init_checkpoint:
            payload = read_checkpoint(m.init_checkpoint)
            extra = payload.get("extra", {})
            # the centres are reused by a first stage that keeps the same label space
            return embedder_from_payload(payload), (extra if "centers" in extra else None)
        # seed=None: the head comes from the global RNG that seed_everything(cfg.seed) just seeded
        return create_embedder(m.backbone, m.embed_dim, m.dropout, pretrained=m.pretrained, image_size=m.image_size,
                               preprocess=m.preprocess or None, head_norm=m.head_norm, head_hidden=m.head_hidden,
                               seed=None, max_embed_dim=None if m.wide_head else MAX_EMBED_DIM,
                               **m.backbone_options()), None

    def _write_resolved_config(self) -> None:
        if self.dist.is_main:
            import yaml

            atomic_write_text(yaml.safe_dump(to_dict(self.cfg), sort_keys=False), self.run_dir / "config.yaml")

    def _apply_image_size(self, stage: StageConfig) -> None:
        """The stage's resolution and patch stride (open_clip ViTs), when it sets them."""
        if stage.image_size or stage.patch_stride:
            self.embedder.set_image_size(stage.image_size or self.embedder.preprocess.image_size, stage.patch_stride)

    # ------------------------------------------------------------------------------------------ checkpoints
    def _checkpoint(self, run: _StageRun, done: bool, tag: str | None = None) -> None:
        if not self.dist.is_main:
            return
        stage = run.stage
        state = {"version": CHECKPOINT_VERSION, "stage_index": run.plan.index, "stage_name": stage.name,
                 "step": run.step, "micro_step": run.micro, "stage_done": done,
                 "image_size": self.embedder.preprocess.image_size, "model": self.embedder.state_dict(),
                 **self.centers.state_dict(stage.loss.name),
                 "optimizer": None if done else run.opt.state_dict(),
                 "ema": None if done or run.ema is None else run.ema.state_dict(), "rng": rng_state(),
                 "config": to_dict(self.cfg)}
        write_checkpoint(state, self.ckpt_dir, tag)

    def _save_model(self, path: Path, stage_name: str) -> None:
        if self.dist.is_main:
            save_embedder(self.embedder, path, extra={**self.centers.model_extra(), "stage": stage_name,
                                                       "run": self.cfg.name})

    def _on_signal(self, signum, frame):
        self._stop_signal = signum

    # ------------------------------------------------------------------------------------------- validation
    def validate(self, stage: StageConfig, use_features: bool) -> float | None:
        """GUIE mP@5 on the validation set(s) with the current model in eval mode: the mean over the named sets
        (each set's score is kept in `last_validation`); rank 0 computes. The stage's train mode comes back."""
        if not self.validator.sets:
            return None
        if self.dist.is_main:
            self.embedder.eval()
        score = self.validator.score(self.embedder, use_features)
        if self.dist.is_main:
            set_train_mode(self.embedder, stage)
        return score

    # -------------------------------------------------------------------------------------------------- run
    def run(self) -> Path:
        """Run (or resume) every stage; returns run_dir/model.pt."""
        with intra_op_threads(self.cfg.cpu_threads if self.device.type == "cpu" else None):
            return self._run()

    def _run(self) -> Path:
        self._write_resolved_config()
        state, self._state = self._state, None  # the checkpoint (optimizer state included) is not kept after
        if self.resume and state is None and self.dist.is_main:
            log.info("no checkpoint in %s: starting from scratch", self.ckpt_dir)
        if state is not None:
            for s in self.cfg.stages[:state["stage_index"] + 1]:
                self._apply_image_size(s)
            self.embedder.load_state_dict(state["model"])
            self.logger.truncate_after(state["stage_name"], state["step"])
            if state["stage_done"]:
                self.centers.restore(state)
                set_rng_state(state["rng"])
                state = None
        old_handlers = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            for plan in self.plans:
                self.current_plan, t_stage = plan, time.time()
                run = self._setup_stage(plan, state)
                self._train_steps(run)
                self._finish_stage(run)
                self.stage_seconds[plan.stage.name] = time.time() - t_stage
                state = None
            self.current_plan = None
        finally:
            for s, h in old_handlers.items():
                signal.signal(s, h)
            self.logger.close()
        final = self.run_dir / "model.pt"
        barrier(self.dist)
        return final

    def _setup_stage(self, plan: StagePlan, state: dict | None) -> _StageRun:
        """Class centres, trainable parts, optimizer, loss terms, DDP wrapper, EMA and the batch feed of a stage;
        from `state` when the stage resumes mid-way."""
        stage, data, t_stage = plan.stage, plan.data, time.time()
        if stage.dropout is not None:
            self.embedder.head.dropout.p = stage.dropout
        self._apply_image_size(stage)
        if state is not None:
            self.centers.resume_stage(stage, data, state)
        else:
            self.centers.start_stage(stage, data)
        # Always channels_last (faster on CPU and GPU); also keeps a resumed run numerically identical to an
        # uninterrupted one, whose model embed_images has already converted.
        self.embedder.to(self.device, memory_format=torch.channels_last)
        set_trainable(self.embedder, self.loss, stage.train)
        use_features = stage.uses_feature_cache
        if stage.grad_checkpointing and not use_features:
            self.embedder.backbone.set_grad_checkpointing(True)
        if self.dist.is_main:
            log.info("stage %d/%d %r: %d images, %d classes, training %s on %s", plan.index + 1, len(self.cfg.stages),
                     stage.name, len(data.df), data.num_classes, "+".join(stage.train),
                     "cached features" if use_features else "images")
        opt = create_optimizer(param_groups(self.embedder, self.loss, stage.lr, stage.train, stage.layer_decay,
                                            stage.optimizer.weight_decay), stage.optimizer)
        module = self._train_module(stage, use_features)
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
            set_rng_state(state["rng"])
            if self.dist.is_main:
                log.info("resuming stage %r at step %d/%d", stage.name, step, plan.total_steps)
        batches = (self._feature_batches(plan, micro) if use_features else self._image_batches(plan, micro))
        precision = stage.precision if stage.precision != "auto" else ("bf16" if self.device.type == "cuda" else "fp32")
        autocast = torch.autocast(self.device.type, dtype=torch.bfloat16) if precision == "bf16" else nullcontext()
        return _StageRun(plan, use_features, opt, module, ema, batches, autocast, step, micro, t_stage)

    def _train_module(self, stage: StageConfig, use_features: bool) -> nn.Module:
        """The stage's objective (margin loss + its terms) over the model, DDP-wrapped under torchrun."""
        module = TrainModule(self.embedder, self.loss, distill_terms(stage.distill, use_features),
                             samples=self.cfg.model.head_multisample_dropout)
        if not self.dist.enabled:
            return module
        return nn.parallel.DistributedDataParallel(
            module, device_ids=[self.device.index] if self.device.type == "cuda" else None, broadcast_buffers=False)

    def _feature_batches(self, plan: StagePlan, micro: int) -> Iterator[Batch]:
        """The stage's cached features (computed now where missing), its teachers' targets, and the feed."""
        stage, df = plan.stage, plan.data.df
        feats = stage_feature_cache(self.embedder, df, stage.augment, stage.cache_views, self.feature_cache)
        distill = None
        if stage.distill.weight:
            teachers = teacher_paths(self.run_dir, self.cfg.stages, plan.index)
            distill = feature_distill_targets(self.embedder, stage, df, feats, teachers, self.feature_cache)
        return feature_batches(plan.sampler, _targets(df), feats, seed=self.cfg.seed, device=self.device,
                               local_batch=plan.local_batch, micro=micro, micro_per_epoch=plan.micro_per_epoch,
                               distill=distill)

    def _image_batches(self, plan: StagePlan, micro: int) -> Iterator[Batch]:
        """The stage's augmented images through DataLoader workers (+ the mirror term's teacher targets)."""
        stage, df = plan.stage, plan.data.df
        mirror_targets = None
        if stage.distill.weight:  # image stages: the mirror term alone (StageConfig checks)
            teachers = teacher_paths(self.run_dir, self.cfg.stages, plan.index)
            mirror_targets = image_mirror_targets(stage, df, teachers, self.feature_cache)
        transform = build_train_transform(self.embedder.preprocess, AugmentConfig.from_dict(stage.augment))
        # On a CPU-only machine decoding runs in the main process between steps (see guie.pipeline.datasets).
        workers = embed_num_workers(self.device) if self.cfg.num_workers is None else self.cfg.num_workers
        dataset = ImageFileDataset(df["path"].tolist(), transform, draft_size=draft_size(self.embedder.preprocess),
                                   threads=torch.get_num_threads() if workers == 0 else 1)
        return image_batches(plan.sampler, dataset, _targets(df), seed=self.cfg.seed, device=self.device,
                             workers=workers, local_batch=plan.local_batch, micro=micro,
                             micro_per_epoch=plan.micro_per_epoch, mirror_targets=mirror_targets)

    # ------------------------------------------------------------------------------------------- step loop
    def _train_steps(self, run: _StageRun) -> None:
        """The step loop: LR schedule, margin per epoch, accumulation, logging, validation, checkpoints, signals."""
        plan, stage = run.plan, run.stage
        set_train_mode(self.embedder, stage)
        bar = tqdm(total=plan.total_steps, initial=run.step, desc=f"stage {stage.name}",
                   disable=not (self.progress and self.dist.is_main), dynamic_ncols=True)
        meter = LossMeter()
        while run.step < plan.total_steps:
            for g in run.opt.param_groups:
                g["lr"] = g["base_lr"] * lr_multiplier(run.step, plan.total_steps, plan.steps_per_epoch,
                                                       stage.schedule)
            self._optimizer_step(run, meter)
            bar.update(1)
            stop = self._stop_requested()
            self._report(run, meter, bar)
            if stop:
                self._checkpoint(run, done=False)
                bar.close()
                raise TrainingInterrupted(f"stopped by signal at stage {stage.name!r} step {run.step}/"
                                          f"{plan.total_steps}; checkpoint written: resume the run to continue")
            if run.step % self.cfg.checkpoint_every_steps == 0 and run.step < plan.total_steps:
                self._checkpoint(run, done=False)
        bar.close()

    def _optimizer_step(self, run: _StageRun, meter: LossMeter) -> None:
        """One optimizer step over `accumulation_steps` micro-batches (gradients synchronised on the last one)."""
        plan, stage, opt = run.plan, run.stage, run.opt
        accum = stage.accumulation_steps
        opt.zero_grad(set_to_none=True)
        for a in range(accum):
            epoch = run.micro // plan.micro_per_epoch
            if epoch != run.margin_epoch:
                self.loss.set_margin(stage.loss.margin_schedule().margin(epoch, plan.data.class_counts))
                run.margin_epoch = epoch
            batch = next(run.batches)
            sync = a == accum - 1 or not self.dist.enabled
            with (nullcontext() if sync else run.module.no_sync()), run.autocast:
                loss = run.module(batch, run.use_features) / accum
            loss.backward()
            run.micro += 1
            meter.add(loss, accum, batch.size)
        if stage.max_grad_norm:
            torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], stage.max_grad_norm)
        opt.step()
        self.centers.restore_kept()
        if run.ema is not None:
            run.ema.update_parameters(self.embedder)
        run.step += 1

    def _stop_requested(self) -> bool:
        """Whether a signal asked to stop (on any rank: every rank then stops at the same step)."""
        stop = self._stop_signal is not None
        if self.dist.enabled:
            flag = torch.tensor([1.0 if stop else 0.0])
            torch.distributed.all_reduce(flag)
            stop = bool(flag.item())
        return stop

    def _report(self, run: _StageRun, meter: LossMeter, bar) -> None:
        """Every log_every_steps (and at validation steps and the stage's end): mean loss, rate, validation."""
        cfg, step, total = self.cfg, run.step, run.plan.total_steps
        val_due = bool(cfg.validation is not None and cfg.validation.every_steps
                       and step % cfg.validation.every_steps == 0)
        if not (step % cfg.log_every_steps == 0 or step == total or val_due):
            return
        mean_loss = mean_across_ranks(meter.mean_loss(), self.dist)
        rate = meter.rate(self.dist.world_size)
        val = self.validate(run.stage, run.use_features) if (val_due and step != total) else None
        self.logger.log(global_step(run.plan.index, step), stage=run.stage.name, step=step, epoch=run.epoch,
                        loss=mean_loss, lr=run.opt.param_groups[0]["lr"], margin=self.loss.margins.mean().item(),
                        images_per_s=round(rate, 1), **self.validator.fields(val))
        bar.set_postfix(loss=f"{mean_loss:.3f}", **({"val": f"{val:.3f}"} if val is not None else {}))
        meter.reset()

    def _finish_stage(self, run: _StageRun) -> None:
        """EMA weights in, final validation, the stage-end checkpoint and model files, the loss plot."""
        stage, index = run.stage, run.plan.index
        if stage.grad_checkpointing and not run.use_features:
            self.embedder.backbone.set_grad_checkpointing(False)
        if run.ema is not None:
            self.embedder.load_state_dict(run.ema.module.state_dict())
        val = self.validate(stage, run.use_features)
        self.embedder.eval()
        self.logger.log(global_step(index, run.step), stage=stage.name, step=run.step, epoch=run.epoch,
                        **self.validator.fields(val))
        self._checkpoint(run, done=True, tag=f"stage-{index:02d}-{stage.name}")
        self._save_model(stage_model_path(self.run_dir, index, stage.name), stage.name)
        self._save_model(self.run_dir / "model.pt", stage.name)
        self.logger.plot(f"{self.cfg.name}")
        if self.dist.is_main:
            log.info(f"stage {stage.name!r} done in {time.time() - run.t_stage:.0f} s{self.validator.summary(val)}")
        barrier(self.dist)


def _targets(df) -> torch.Tensor:
    return torch.as_tensor(df["target"].to_numpy().copy())


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
