"""`guie train RECIPE --smoke`: prove on a CPU in about a minute that every stage of a recipe runs.

The recipe is rewritten (`smoke_config`) so that each stage runs a few optimizer steps through the same code paths
as the real run, only small:

- the backbone becomes a tiny randomly initialised one of the same family: an OpenCLIP ViT with the real patch size,
  resolution and output kind (projection kept or not) but 2 blocks of width 32; a timm ViT likewise; an
  EfficientNet-Lite unchanged but without its weights. Position-embedding resampling, patch strides, locking,
  datasets added, new / kept / locked centres, resolutions and distillation all run as in the real run.
- every dataset and validation set becomes a small sample (8 classes x 4 images): of its manifest when it is on
  this machine, else generated images whose columns satisfy the recipe's filters (`where`, `folds_by`,
  `query_where` / `index_where`). A built-in benchmark is sampled only if it is already built (never fetched).
- distillation teachers that are files become tiny teachers of the same tiny backbone (a missing one is reported);
- batches shrink to a few images (a multiple of the sampler's `m_per_class`), every stage runs `steps` steps,
  validation runs at stage ends, the feature cache computes with torch.

A failure in any stage is one line naming the stage (`SmokeFailure`). The report adds the cost plan of the real
run (`guie.train.costs`).
"""
from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from ..errors import GuieError
from ..utils import log
from .data import available_manifest
from .recipe import DatasetConfig, RunConfig, ValidationSet

SMOKE_CLASSES = 8
SMOKE_PER_CLASS = 4
SMOKE_BATCH = 8
TINY_WIDTH, TINY_LAYERS, TINY_HEAD_WIDTH, TINY_EMBED = 32, 2, 16, 24
TIMM_VIT_PREFIXES = ("vit_", "deit", "eva", "beit")


class SmokeFailure(GuieError, RuntimeError):
    """A stage of a smoke run failed; the message names the recipe, the stage and the cause in one line."""


@dataclass
class SmokeStage:
    """What one stage of the smoke run did."""

    name: str
    steps: int
    seconds: float
    loss: float | None = None
    val: float | None = None


@dataclass
class SmokeReport:
    """A smoke run: the stages it ran, what it substituted, and the real run's cost plan."""

    recipe: str
    stages: list[SmokeStage]
    notes: list[str]
    costs: object = None           # guie.train.costs.CostPlan of the real recipe
    seconds: float = 0.0
    run_dir: Path | None = None

    def table(self) -> str:
        """The report as text: stages run, substitutions, then the cost plan."""
        lines = [f"smoke run of {self.recipe}: {len(self.stages)} stage(s) ran in {self.seconds:.1f} s"]
        for i, s in enumerate(self.stages):
            extra = "".join([f", loss {s.loss:.3f}" if s.loss is not None else "",
                             f", val mP@5 {s.val:.3f}" if s.val is not None else ""])
            lines.append(f"  {i + 1}. {s.name}: {s.steps} step(s) in {s.seconds:.1f} s{extra}")
        if self.notes:
            lines.append("substituted for the smoke run:")
            lines += [f"  - {n}" for n in self.notes]
        if self.costs is not None:
            lines += ["", self.costs.table()]
        return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ tiny backbones
def tiny_backbone(name: str, kwargs: dict, work: Path) -> tuple[str, dict, str]:
    """The smoke stand-in of backbone `name` (with its `backbone_kwargs`): (name, kwargs, what was done)."""
    from ..models.backbones import _split_name

    family, arch, source = _split_name(name)
    kwargs = dict(kwargs)
    if family == "open_clip":
        return _tiny_open_clip(arch, kwargs, work)
    if family == "timm":
        kwargs.pop("checkpoint", None)
        if arch.startswith(TIMM_VIT_PREFIXES):
            kwargs["model_args"] = dict(embed_dim=TINY_WIDTH, depth=TINY_LAYERS,
                                        num_heads=TINY_WIDTH // TINY_HEAD_WIDTH)
            return f"timm:{arch}", kwargs, f"timm:{arch} with {TINY_LAYERS} blocks of width {TINY_WIDTH}, random"
        return f"timm:{arch}", kwargs, f"timm:{arch} with random weights"
    return family, kwargs, f"{family} with random weights"


def _tiny_open_clip(arch: str, kwargs: dict, work: Path) -> tuple[str, dict, str]:
    """Register an OpenCLIP config like `arch` (same patch size, resolution, pooling) with a tiny tower."""
    import open_clip

    from ..errors import InputError

    cfg = open_clip.get_model_config(arch)
    if cfg is None:
        raise InputError(f"unknown open_clip architecture {arch!r}; see open_clip.list_models()")
    vision = dict(cfg["vision_cfg"])
    if not isinstance(vision.get("layers", 0), int) or "timm_model_name" in vision:
        raise InputError(f"open_clip:{arch} is not a ViT tower; a smoke run knows OpenCLIP ViTs")
    vision.update(layers=TINY_LAYERS, width=TINY_WIDTH, head_width=TINY_HEAD_WIDTH)
    tiny = f"guie-smoke-{arch}"
    folder = work / "open_clip_configs"
    folder.mkdir(parents=True, exist_ok=True)
    text = {"context_length": 8, "vocab_size": 100, "width": 32, "heads": 2, "layers": 1}
    (folder / f"{tiny}.json").write_text(json.dumps({"embed_dim": TINY_EMBED, "vision_cfg": vision,
                                                     "text_cfg": text}))
    open_clip.add_model_config(folder)
    what = (f"open_clip:{arch} -> a {TINY_LAYERS}-block width-{TINY_WIDTH} ViT, patch {vision.get('patch_size')}, "
            f"{vision.get('image_size')} px, random")
    return f"open_clip:{tiny}", kwargs, what


# ------------------------------------------------------------------------------------------------ data
def _first(value):
    return value[0] if isinstance(value, (list, tuple)) and value else value


def _draw(root: Path, stem: str, colour, pts, rng, size=(64, 48)) -> str:
    from PIL import Image, ImageDraw

    img = Image.new("RGB", size, (255, 255, 255))
    dx, dy = (int(v) for v in rng.integers(-3, 4, 2))
    ImageDraw.Draw(img).polygon([(x + dx, y + dy) for x, y in pts], fill=colour)
    arr = np.asarray(img).astype(np.int16) + rng.integers(-8, 9, (size[1], size[0], 3))
    path = root / f"{stem}.png"
    Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(path)
    return str(path)


def generate_images(root: Path, prefix: str, classes: int = SMOKE_CLASSES, per_class: int = SMOKE_PER_CLASS,
                    seed: int = 0) -> pd.DataFrame:
    """`classes` x `per_class` small generated images (a coloured polygon per class, shifted and noisy per image):
    a manifest frame with path, label (`<prefix>/cNN`) and `image` (its number within the class)."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for c in range(classes):
        colour = tuple(int(v) for v in rng.integers(0, 220, 3))
        pts = [tuple(int(v) for v in rng.integers(4, 44, 2)) for _ in range(5)]
        for i in range(per_class):
            rows.append({"path": _draw(root, f"c{c:02d}_{i}", colour, pts, rng), "label": f"{prefix}/c{c:02d}",
                         "image": i})
    return pd.DataFrame(rows)


def _sample_manifest(path: Path, where: dict, what: str, seed: int, min_images: int = 2) -> pd.DataFrame:
    """Up to SMOKE_CLASSES classes (with >= min_images rows after `where`) of a real manifest, SMOKE_PER_CLASS
    rows each."""
    from ..data.manifest import read_manifest, select_rows

    df = select_rows(read_manifest(path, require_labels=True), where, what)
    counts = df["label"].value_counts()
    labels = counts[counts >= max(2, min_images)].index.to_numpy()
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.sort(labels.astype(str)))[:SMOKE_CLASSES]
    df = df[df["label"].astype(str).isin(labels)]
    return df.groupby("label", group_keys=False).head(SMOKE_PER_CLASS).reset_index(drop=True)


def _training_frame(name: str, ds: DatasetConfig, cache_dir: Path | None, work: Path, seed: int,
                    notes: list[str]) -> pd.DataFrame:
    found = available_manifest(ds.manifest, cache_dir)
    if found is not None:
        df = _sample_manifest(found, ds.where, f"dataset {name!r}", seed, ds.min_images)
        if df["label"].nunique() >= 2:
            notes.append(f"dataset {name!r}: {df['label'].nunique()} classes sampled from {found}")
            return df
    df = generate_images(work / "data" / name, name, seed=seed)
    for column, value in ds.where.items():
        df[column] = _first(value)
    if "domain" not in ds.where:
        df["domain"] = ds.domain or name
    why = "built-in benchmark not built here" if found is None and ds.manifest in _benchmark_names() else \
        "manifest not on this machine" if found is None else "too few classes in its sample"
    notes.append(f"dataset {name!r}: generated images ({why}: {ds.manifest})")
    return df.drop(columns=["image"])


def _validation_frame(name: str, vset: ValidationSet, cache_dir: Path | None, work: Path, seed: int,
                      notes: list[str]) -> pd.DataFrame:
    found = available_manifest(vset.manifest, cache_dir)
    if found is not None:
        df = _sample_manifest(found, vset.where, f"validation {name!r}", seed)
        if df["label"].nunique() >= 2:
            notes.append(f"validation {name!r}: {df['label'].nunique()} classes sampled from {found}")
            return df
    df = generate_images(work / "data" / f"val-{name}", f"val-{name}", seed=seed + 1)
    for column, value in vset.where.items():
        df[column] = _first(value)
    if vset.folds_by:
        df[vset.folds_by] = [f"style{i}" for i in df["image"]]
    query = df["image"] == 0
    for column, value in vset.index_where.items():
        df.loc[~query, column] = _first(value)
    for column, value in vset.query_where.items():
        df.loc[query, column] = _first(value)
    notes.append(f"validation {name!r}: generated images ({vset.manifest} not on this machine)")
    return df.drop(columns=["image"])


def _benchmark_names():
    from ..data.benchmarks import BENCHMARKS

    return BENCHMARKS


# ------------------------------------------------------------------------------------------------ the config
def _smoke_batch(batch: int, m_per_class: int, sampler: str) -> int:
    """A few images per batch, still a multiple of m_per_class (a real batch that is not stays, to fail as it
    would)."""
    m = m_per_class if sampler == "class_balanced" else 1
    if m < 1 or batch % m:
        return batch
    return min(batch, m * max(2, math.ceil(SMOKE_BATCH / m)))


def smoke_config(cfg: RunConfig, work: Path, steps: int = 2) -> tuple[RunConfig, list[str]]:
    """A copy of `cfg` that runs every stage for `steps` steps on tiny data with a tiny backbone of the same family
    (see the module docstring), writing under `work`; and the list of what was substituted, in words."""
    from ..models.embedder import create_embedder, save_embedder

    work = Path(work)
    smoke = copy.deepcopy(cfg)
    notes: list[str] = []
    m = smoke.model
    m.backbone, m.backbone_kwargs, what = tiny_backbone(m.backbone, m.backbone_kwargs, work)
    m.pretrained = False
    notes.append(f"backbone: {what}")
    if m.init_checkpoint is not None:
        notes.append(f"model.init_checkpoint {m.init_checkpoint} not read (the tiny backbone starts from random)")
        m.init_checkpoint = None
    smoke.output_dir = work / "run"
    smoke.cache_dir = work / "cache"
    smoke.num_workers = 0
    smoke.log_every_steps = 1
    smoke.checkpoint_every_steps = 10**9
    smoke.runtime, smoke.precision = "torch", "fp32"
    if smoke.runtime != cfg.runtime:
        notes.append(f"feature cache computed with torch (runtime {cfg.runtime} in the real run)")
    for name, ds in smoke.datasets.items():
        df = _training_frame(name, ds, cfg.cache_dir, work, cfg.seed, notes)
        path = work / "manifests" / f"{name}.csv"
        path.parent.mkdir(parents=True, exist_ok=True)
        df.to_csv(path, index=False)
        ds.manifest = str(path)
        ds.where = {}
        ds.expected_images = ds.expected_classes = None
    if smoke.validation is not None:
        v = smoke.validation
        sets = v.sets if v.sets else {"val": v}
        for name, vset in sets.items():
            df = _validation_frame(name, vset, cfg.cache_dir, work, cfg.seed, notes)
            path = work / "manifests" / f"val-{name}.csv"
            path.parent.mkdir(parents=True, exist_ok=True)
            df.to_csv(path, index=False)
            vset.manifest, vset.where = str(path), {}
        v.every_steps = 0
        v.batch_size = SMOKE_BATCH
    teachers: dict[str, str] = {}
    for stage in smoke.stages:
        batch = _smoke_batch(stage.batch_size, stage.sampler.m_per_class, stage.sampler.name)
        stage.batch_size = batch
        stage.steps, stage.epochs = steps, None
        stage.schedule.warmup_steps = min(stage.schedule.warmup_steps, 1)
        for domain, ref in list(stage.distill.teachers.items()):
            if str(ref).startswith("stage:"):
                continue
            if str(ref) not in teachers:
                if not Path(ref).expanduser().is_file():
                    notes.append(f"stage {stage.name!r}: distill teacher {ref} is missing here (the real run needs it)")
                path = work / "teachers" / f"teacher{len(teachers)}.pt"
                teacher = create_embedder(m.backbone, m.embed_dim, m.dropout, pretrained=False,
                                          image_size=m.image_size, preprocess=m.preprocess or None,
                                          head_norm=m.head_norm, head_hidden=m.head_hidden,
                                          seed=len(teachers) + 1, **m.backbone_options())
                save_embedder(teacher, path)
                teachers[str(ref)] = str(path)
            stage.distill.teachers[domain] = teachers[str(ref)]
    if teachers:
        notes.append(f"{len(teachers)} distillation teacher file(s) -> tiny teachers of the tiny backbone")
    return smoke, notes


# ------------------------------------------------------------------------------------------------ the run
def run_smoke(cfg: RunConfig, work: Path, steps: int = 2, costs: bool = True) -> SmokeReport:
    """Smoke-run every stage of `cfg` (see the module docstring) under `work`; raises SmokeFailure naming the stage
    that failed. The report carries the real run's cost plan (`costs`)."""
    from .engine import Trainer

    t0 = time.time()
    plan = None
    if costs:
        from .costs import cost_plan

        plan = cost_plan(cfg)
    smoke, notes = smoke_config(cfg, work, steps)
    try:
        trainer = Trainer(smoke, progress=False)
    except GuieError as e:
        raise SmokeFailure(f"smoke run of {cfg.name}: {first_line(e)}") from e
    try:
        trainer.run()
    except Exception as e:  # noqa: BLE001 - any failure of a stage is reported as that stage's, in one line
        current = trainer.current_plan
        where = (f"stage {current.index + 1}/{len(cfg.stages)} {current.stage.name!r}" if current is not None
                 else "before the first stage")
        cause = first_line(e) if isinstance(e, GuieError) else f"{type(e).__name__}: {first_line(e)}"
        log.debug("smoke failure", exc_info=True)
        raise SmokeFailure(f"smoke run of {cfg.name}: {where} failed: {cause}") from e
    stages = _stage_results(smoke, trainer.stage_seconds)
    return SmokeReport(cfg.name, stages, notes, plan, time.time() - t0, smoke.run_dir)


def first_line(exc: BaseException) -> str:
    """The first non-empty line of an exception's message (a traceback-free one-line cause)."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    return (lines[0] if lines else type(exc).__name__)[:300]


def _stage_results(smoke: RunConfig, seconds: dict[str, float]) -> list[SmokeStage]:
    """Steps, last loss and validation of each stage, from the run's metrics.csv."""
    path = smoke.run_dir / "metrics.csv"
    metrics = pd.read_csv(path) if path.exists() else pd.DataFrame()
    out = []
    for s in smoke.stages:
        rows = metrics[metrics["stage"] == s.name] if "stage" in metrics else metrics
        loss = rows["loss"].dropna() if "loss" in rows else pd.Series(dtype=float)
        val = rows["val_mP@5"].dropna() if "val_mP@5" in rows else pd.Series(dtype=float)
        secs = seconds.get(s.name, 0.0)
        out.append(SmokeStage(s.name, s.steps or 0, secs, float(loss.iloc[-1]) if len(loss) else None,
                              float(val.iloc[-1]) if len(val) else None))
    return out


__all__ = ["SmokeFailure", "SmokeReport", "SmokeStage", "generate_images", "run_smoke", "smoke_config",
           "tiny_backbone"]
