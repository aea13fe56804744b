"""What a recipe will cost on a GPU, before it runs: images, backbone forward / forward+backward passes and
H100-hours per stage (`guie train RECIPE --smoke` prints it).

Sizes come from the datasets' manifests when they are on this machine, else from the recipe's `expected_images` /
`expected_classes` hints; a stage whose size is unknown says so. Speeds are measured ones (`THROUGHPUT`), scaled to
the stage's resolution by token count (ViTs; pixels for CNNs). Data loading, the head and the class centres are not
counted: the backbone dominates, and a data pipeline that keeps up is assumed (benchmarks/gpu_train.py measured the
engine at 0.997x a bare forward+backward+step of ViT-H-14).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

from .recipe import RunConfig, StageConfig

# img/s on one NVIDIA H100 80GB HBM3, torch 2.11, timm 1.0.29, from benchmarks/results/h100-backbones.jsonl:
# infer = forward under bf16 autocast (fp32 for infer_fp32), train = forward + backward + step in bf16, batch 64-128.
THROUGHPUT: dict[str, dict] = {
    "vit_huge_patch14_clip_224": {"infer": 1203, "infer_fp32": 577, "train": 336, "patch": 14, "size": 224},
    "vit_large_patch14_clip_224": {"infer": 2294, "infer_fp32": 1092, "train": 665, "patch": 14, "size": 224},
    "vit_base_patch16_clip_224": {"infer": 8854, "infer_fp32": 4352, "train": 2447, "patch": 16, "size": 224},
    "efficientnet_lite0": {"infer": 14517, "infer_fp32": 11339, "train": 2012, "patch": None, "size": 224},
}
OPEN_CLIP_ARCHS = {"ViT-H-14": "vit_huge_patch14_clip_224", "ViT-L-14": "vit_large_patch14_clip_224",
                   "ViT-B-16": "vit_base_patch16_clip_224"}
GRAD_CHECKPOINT_SLOWDOWN = 0.75   # one more forward: (1 + 2) / (2 + 2) of the speed
GPU = "H100"


def throughput_key(backbone: str) -> str | None:
    """The THROUGHPUT entry measured for a backbone name, or None when none was."""
    family, _, rest = backbone.partition(":")
    arch = rest.partition(":")[0]
    if family == "open_clip":
        return OPEN_CLIP_ARCHS.get(arch)
    if family == "timm":
        return next((k for k in THROUGHPUT if arch.split(".")[0] == k), None)
    return backbone if backbone in THROUGHPUT else None


def images_per_second(key: str | None, size: int, stride: int | None, mode: str, precision: str = "bf16",
                      grad_checkpointing: bool = False) -> float | None:
    """Estimated img/s of backbone `key` at `size` px (and patch stride) for mode infer | train."""
    if key is None:
        return None
    t = THROUGHPUT[key]
    rate = float(t["infer_fp32"] if mode == "infer" and precision == "fp32" else t[mode])
    if mode == "train" and precision == "fp32":
        rate *= t["infer_fp32"] / t["infer"]
    if t["patch"]:
        p = t["patch"]

        def tokens(s: int, st: int) -> int:
            return ((s - p) // st + 1) ** 2 + 1

        rate *= tokens(t["size"], p) / tokens(size, stride or p)
    else:
        rate *= (t["size"] / size) ** 2
    if mode == "train" and grad_checkpointing:
        rate *= GRAD_CHECKPOINT_SLOWDOWN
    return rate


@dataclass
class DatasetSize:
    images: int | None
    classes: int | None
    source: str            # "manifest" | "hint" | "unknown"


@dataclass
class StageCost:
    """One stage's work: images seen, backbone passes, estimated GPU seconds (None: unknown)."""

    name: str
    size: int
    stride: int | None
    trains: str
    images: int | None
    forward: int | None            # backbone forward passes without backward (frozen: features, or cache off)
    forward_backward: int | None   # backbone forward + backward passes (backbone trains)
    seconds: float | None
    unknown: list[str] = field(default_factory=list)


@dataclass
class CostPlan:
    recipe: str
    backbone: str
    throughput_key: str | None
    stages: list[StageCost]
    notes: list[str]

    @property
    def gpu_hours(self) -> float | None:
        """Sum of the stages' estimated hours (over the stages whose cost is known)."""
        known = [s.seconds for s in self.stages if s.seconds is not None]
        return sum(known) / 3600 if known else None

    def table(self) -> str:
        """The plan as a text table."""
        src = (f"throughput of {self.throughput_key} measured on one {GPU} (benchmarks/results/h100-backbones.jsonl), "
               f"scaled by tokens" if self.throughput_key else f"no throughput measured for {self.backbone}")
        lines = [f"cost plan of the real run ({self.recipe}, {self.backbone}; {src}):",
                 f"  {'stage':<22} {'px':>6} {'trains':<24} {'images':>12} {'fwd':>12} {'fwd+bwd':>12} "
                 f"{GPU + ' h':>9}"]

        def n(v):
            return "?" if v is None else f"{v:,}"

        for s in self.stages:
            px = f"{s.size}" + (f"/{s.stride}" if s.stride else "")
            hours = "?" if s.seconds is None else f"{s.seconds / 3600:.2f}"
            lines.append(f"  {s.name:<22} {px:>6} {s.trains:<24} {n(s.images):>12} {n(s.forward):>12} "
                         f"{n(s.forward_backward):>12} {hours:>9}")
        total = self.gpu_hours
        partial = any(s.seconds is None for s in self.stages)
        lines.append(f"  total: {'>= ' if partial else ''}{'?' if total is None else f'{total:.1f}'} {GPU}-hours "
                     f"(GPU-hours: N GPUs under DDP take 1/N of it in wall time)")
        lines += [f"  - {x}" for x in self.notes]
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return json.loads(json.dumps({"recipe": self.recipe, "backbone": self.backbone, "gpu_hours": self.gpu_hours,
                                      "stages": [s.__dict__ for s in self.stages], "notes": self.notes}))


def dataset_size(name: str, cfg: RunConfig) -> DatasetSize:
    """A dataset's images and classes after its filters: from its manifest when it is here (a built-in benchmark
    only when built), else from the recipe's hints."""
    from .data import available_manifest, load_training_dataset

    ds = cfg.datasets[name]
    if available_manifest(ds.manifest, cfg.cache_dir) is not None:
        df = load_training_dataset(name, ds, cfg.cache_dir, cfg.seed)
        return DatasetSize(len(df), int(df["label"].nunique()), "manifest")
    images, classes = ds.expected_images, ds.expected_classes
    if classes is not None and ds.min_per_class:
        images = max(images or 0, classes * ds.min_per_class)
    if classes is not None and ds.max_per_class and images is not None:
        images = min(images, classes * ds.max_per_class)
    return DatasetSize(images, classes, "hint" if images is not None else "unknown")


def cost_plan(cfg: RunConfig) -> CostPlan:
    """The cost plan of every stage of `cfg` (see the module docstring)."""
    m = cfg.model
    key = throughput_key(m.backbone)
    sizes = {name: dataset_size(name, cfg) for name in {d for s in cfg.stages for d in s.datasets}}
    notes = _size_notes(sizes)
    size = m.image_size or (THROUGHPUT[key]["size"] if key else 224)
    stride = m.patch_stride
    weights_version, cached = 0, set()
    stages = []
    for stage in cfg.stages:
        size = stage.image_size or size
        stride = stage.patch_stride or stride
        per_epoch = [sizes[d].images for d in stage.datasets]
        n = None if any(v is None for v in per_epoch) else sum(per_epoch)
        stages.append(_stage_cost(stage, n, key, size, stride, weights_version, cached,
                                  [d for d in stage.datasets if sizes[d].images is None]))
        if "backbone" in stage.train:
            weights_version += 1
    return CostPlan(cfg.name, m.backbone, key, stages, notes)


def _size_notes(sizes: dict[str, DatasetSize]) -> list[str]:
    """What the plan's sizes rest on, in words."""
    notes = []
    unknown = sorted(n for n, s in sizes.items() if s.images is None)
    if unknown:
        notes.append(f"size unknown for {unknown}: their manifests are not here; set datasets.<name>."
                     f"expected_images (or expected_classes with min_per_class)")
    hinted = sorted(n for n, s in sizes.items() if s.source == "hint")
    if hinted:
        notes.append(f"sizes from the recipe's expected_images / expected_classes hints: {hinted}")
    notes.append("validation passes, data loading and the head are not counted")
    return notes


def _stage_cost(stage: StageConfig, n: int | None, key: str | None, size: int, stride: int | None,
                weights_version: int, cached: set, unknown: list[str]) -> StageCost:
    precision = "bf16" if stage.precision in ("auto", "bf16") else "fp32"
    if stage.steps is not None:
        images = stage.steps * stage.batch_size * stage.accumulation_steps
    else:
        images = None if n is None else int(math.ceil(stage.epochs * n))
    fwd = fwd_bwd = 0
    seconds: float | None = 0.0
    if "backbone" in stage.train:
        fwd_bwd = images
        rate = images_per_second(key, size, stride, "train", precision, stage.grad_checkpointing)
    elif stage.uses_feature_cache:
        views_key = (weights_version, size, stride, stage.cache_views,
                     json.dumps(stage.augment, sort_keys=True) if stage.cache_views > 1 else None,
                     tuple(sorted(stage.datasets)))
        fwd = 0 if views_key in cached else (None if n is None else n * stage.cache_views)
        cached.add(views_key)
        rate = images_per_second(key, size, stride, "infer", precision)
    else:
        fwd = images
        rate = images_per_second(key, size, stride, "infer", precision)
    work = fwd_bwd if "backbone" in stage.train else fwd
    seconds = None if work is None or rate is None else work / rate
    return StageCost(stage.name, size, stride, "+".join(stage.train), images, fwd, fwd_bwd, seconds, unknown)


__all__ = ["CostPlan", "StageCost", "THROUGHPUT", "cost_plan", "images_per_second", "throughput_key"]
