"""Training recipes: a run is a model, named datasets, a validation set and a list of stages.

Written once in YAML (shipped ones in src/guie/recipes/, loadable by name), loaded into these dataclasses; a resolved
copy goes into every run folder.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import InputError
from ..losses import LOSSES, MarginSchedule
from ..models.preprocess import PreprocessConfig
from ..pipeline.augment import AugmentConfig
from ..typed_yaml import ConfigError, load_yaml_config, overrides_of

PARTS = ("backbone", "head", "centers")  # backbone | projection head ("neck") | class-centre matrix of the loss


def _check_choice(what: str, value: str, choices) -> None:
    if value not in choices:
        raise InputError(f"{what} {value!r}: choose one of {', '.join(choices)}")


def _check_dropout(p: float) -> None:
    if not 0.0 <= p < 1.0:
        raise InputError(f"dropout must be in [0, 1), got {p}")


@dataclass
class ModelConfig:
    """The embedder to train (or a guie checkpoint to start from)."""

    backbone: str = "efficientnet_lite0"
    embed_dim: int = 64
    dropout: float = 0.2
    head_norm: str = "none"                              # "batchnorm": standardise features before the projection
    head_hidden: int | None = None                       # a hidden GELU layer of this width in the head
    image_size: int | None = None
    pretrained: bool = True
    preprocess: dict[str, Any] = overrides_of(PreprocessConfig)  # overrides, e.g. {crop_pct: 1.0}
    # passed to the backbone's constructor: {keep_projection: false} (open_clip), {feature_levels: [2, 3, 4]}
    backbone_kwargs: dict[str, Any] = field(default_factory=dict)
    init_checkpoint: Path | None = None                  # start from a saved guie embedder
    # open_clip ViTs: patch-embedding stride < patch size = overlapping patches, a finer token grid from the same
    # pretrained projection (1st place: stride 12 for patch 14 at 290 px); position embeddings are resampled
    patch_stride: int | None = None
    head_multisample_dropout: int = 1                    # N dropout masks per step, margin loss averaged (3rd place)
    wide_head: bool = False                              # allow embed_dim > 64 (6th place: 256); export with a PCA

    def __post_init__(self):
        _check_dropout(self.dropout)
        if self.embed_dim < 1:
            raise InputError(f"embed_dim must be >= 1, got {self.embed_dim}")
        if self.embed_dim > 64 and not self.wide_head:
            raise InputError(f"model.embed_dim {self.embed_dim} is over the GUIE limit of 64: set model.wide_head "
                             f"to train a wider head and export it with a PCA to 64")
        if self.patch_stride is not None and self.patch_stride < 1:
            raise InputError(f"model.patch_stride must be >= 1, got {self.patch_stride}")
        if self.head_multisample_dropout < 1:
            raise InputError(f"model.head_multisample_dropout must be >= 1, got {self.head_multisample_dropout}")

    def backbone_options(self) -> dict[str, Any]:
        """The keyword arguments the backbone is built with: backbone_kwargs plus patch_stride."""
        kwargs = dict(self.backbone_kwargs)
        if self.patch_stride is not None:
            kwargs["patch_stride"] = self.patch_stride
        return kwargs


@dataclass
class DatasetConfig:
    """One source of training images, with its own label namespace and balancing."""

    manifest: str                                  # CSV/Parquet/folder/shard index, or a built-in benchmark:
                                                   # emoji | glyphs | icons
    where: dict[str, Any] = field(default_factory=dict)      # column -> value or list of values to keep
    namespace: str | None = None                   # label prefix (default: the dataset's name; "" keeps the labels
                                                   # as they are, e.g. a `guie data build` output, namespaced)
    domain: str | None = None                      # overrides the manifest's domain column
    min_images: int = 2                            # drop classes with fewer images
    max_per_class: int | None = None               # cap (2nd place: 100)
    min_per_class: int | None = None               # upsample by repetition (2nd place: 20)
    # the size of the data after the filters, for `guie train --smoke`'s cost plan when the manifest is not on
    # this machine (with min/max_per_class, classes bound the images: classes x min_per_class at least)
    expected_images: int | None = None
    expected_classes: int | None = None


@dataclass
class LossConfig:
    """Margin loss of a stage; margins in radians (ArcFace) or cosine units (CosFace)."""

    name: str = "arcface"
    scale: float = 30.0
    margin: float = 0.5
    margin_step: float = 0.0          # per-epoch ramp (2nd place: 0.3 + 0.1/epoch, max 0.8)
    margin_max: float = 0.8
    class_size_a: float | None = None  # per-class margins a + b*minmax(n^-1/4) (4th/6th place: 0.05, 0.45)
    class_size_b: float | None = None
    sub_centers: int = 1

    def __post_init__(self):
        _check_choice("loss", self.name.lower(), LOSSES)
        self.margin_schedule()  # its own checks (ramp or class-size margins, not both)

    def margin_schedule(self) -> MarginSchedule:
        """The stage's margin as a function of the epoch."""
        return MarginSchedule(start=self.margin, step=self.margin_step, max=self.margin_max,
                              class_size_a=self.class_size_a, class_size_b=self.class_size_b)


@dataclass
class OptimizerConfig:
    name: str = "adamw"               # adamw | sgd
    weight_decay: float = 1e-4
    momentum: float = 0.9             # sgd only
    betas: tuple[float, float] = (0.9, 0.999)

    def __post_init__(self):
        _check_choice("optimizer", self.name, ("adamw", "sgd"))


@dataclass
class ScheduleConfig:
    name: str = "cosine"              # cosine | step | constant
    warmup_steps: int = 0
    warmup_start: float = 0.01        # warm-up starts at this fraction of the LR
    milestones: list[float] = field(default_factory=list)  # step schedule: epochs at which LR *= gamma
    gamma: float = 0.1
    min_lr_ratio: float = 0.0

    def __post_init__(self):
        _check_choice("schedule", self.name, ("cosine", "step", "constant"))


@dataclass
class SamplerConfig:
    name: str = "shuffle"             # shuffle | class_balanced
    m_per_class: int = 2
    balance: str = "class"            # class | domain (class_balanced only)
    domain_weights: dict[str, float] = field(default_factory=dict)  # balance: domain: a domain's share of class
                                                                    # slots (default 1 each: uniform)

    def __post_init__(self):
        _check_choice("sampler", self.name, ("shuffle", "class_balanced"))
        _check_choice("sampler balance", self.balance, ("class", "domain"))


@dataclass
class DistillConfig:
    """Multi-teacher relational distillation for a frozen-backbone stage (guie.losses.distill): on each domain's
    samples, the student's in-batch similarity distribution is pulled towards that domain's teacher's. The mirror
    term (each image's similarity to its own left-right mirror held at its teacher's) also works in a stage that
    trains on images, where it is the only term: the teacher's similarity is computed once per image."""

    teachers: dict[str, str] = field(default_factory=dict)  # domain -> guie checkpoint on the same backbone features,
                                                            # or "stage:<name>": this run's model after that stage
    weight: float = 0.0               # loss = margin loss + weight * distillation loss (0: off)
    temperature: float = 0.1          # softmax temperature over cosine similarities
    domain_weights: dict[str, float] = field(default_factory=dict)  # domain -> multiplier of `weight` on that
                                                                    # domain's anchors (default 1 each)
    mirror_domains: list[str] = field(default_factory=list)  # these domains' images also enter the distillation
                                                             # mirrored (distillation only, no class), so the
                                                             # student keeps its teacher's left-right sensitivity
    mirror_weight: float = 0.0        # x weight: squared gap between student's and teacher's image-mirror similarity

    def __post_init__(self):
        bad = {d: w for d, w in self.domain_weights.items() if not float(w) >= 0}
        if bad:
            raise InputError(f"distill.domain_weights must be >= 0, got {bad}")
        if not self.mirror_weight >= 0 or (self.mirror_weight and not self.mirror_domains):
            raise InputError(f"distill.mirror_weight must be >= 0 and needs distill.mirror_domains, got "
                             f"{self.mirror_weight} with {list(self.mirror_domains)}")
        for key in ("domain_weights", "mirror_domains"):
            unknown = sorted(set(getattr(self, key)) - set(self.teachers))
            if unknown:
                raise InputError(f"distill.{key} names domain(s) {unknown} without a teacher; "
                                 f"teachers: {sorted(self.teachers)}")

    def group_weights(self) -> list[float] | None:
        """The per-teacher multipliers in teacher-group order (sorted domain names, as `teacher_embeddings` numbers
        the groups), or None when no domain weight is set (every group weighs 1)."""
        if not self.domain_weights:
            return None
        return [float(self.domain_weights.get(d, 1.0)) for d in sorted(self.teachers)]


@dataclass
class StageConfig:
    """One stage: which data, which parts train, how long and how fast."""

    name: str
    datasets: list[str]
    train: list[str] = field(default_factory=lambda: ["head", "centers"])
    new_centers: bool = False         # a fresh class-centre matrix for every class; otherwise classes the previous
                                      # stage (or init checkpoint) knew keep their centres, new ones start random
    lock_kept_centers: bool = False   # train only the new classes' centres: the kept ones stay exactly as they were
                                      # (the 1st place's "add a dataset with its own centres while the old stay")
    image_size: int | None = None     # change resolution (ViT position embeddings are resampled)
    patch_stride: int | None = None   # change the open_clip patch stride (model.patch_stride) from this stage on
    epochs: float | None = None       # length in epochs, or
    steps: int | None = None          # in optimizer steps
    batch_size: int = 64              # global batch (split over DDP ranks)
    accumulation_steps: int = 1
    lr: dict[str, float] = field(default_factory=lambda: {"head": 0.01, "centers": 0.01, "backbone": 1e-4})  # per part
    layer_decay: float = 1.0          # backbone LR *= layer_decay ** (depth from the top) ("stratified LR")
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    augment: dict[str, Any] = overrides_of(AugmentConfig)  # AugmentConfig fields (the others keep their defaults)
    dropout: float | None = None      # change the head's dropout for this stage
    feature_cache: str = "auto"       # auto (when the backbone is frozen) | on | off
    cache_views: int = 1              # frozen path: clean view + (cache_views - 1) augmented views per image
    freeze_bn: bool = True            # keep backbone BatchNorm statistics fixed while fine-tuning
    grad_checkpointing: bool = False
    ema_decay: float | None = None
    precision: str = "auto"           # auto (bf16 on CUDA, fp32 on CPU) | bf16 | fp32
    max_grad_norm: float | None = None

    def __post_init__(self):
        if self.dropout is not None:
            _check_dropout(self.dropout)
        if self.patch_stride is not None and self.patch_stride < 1:
            raise InputError(f"stage {self.name!r}: patch_stride must be >= 1, got {self.patch_stride}")
        bad = sorted(set(self.train) - set(PARTS))
        if bad:
            raise InputError(f"stage {self.name!r}: unknown part(s) {bad} in 'train'; parts are {list(PARTS)}")
        if not self.train:
            raise InputError(f"stage {self.name!r}: 'train' lists no part")
        if (self.epochs is None) == (self.steps is None):
            raise InputError(f"stage {self.name!r}: give exactly one of 'epochs' or 'steps'")
        if self.feature_cache not in ("auto", "on", "off"):
            raise InputError(f"stage {self.name!r}: feature_cache must be auto, on or off")
        if self.feature_cache == "on" and "backbone" in self.train:
            raise InputError(f"stage {self.name!r}: the feature cache needs a frozen backbone")
        if self.precision not in ("auto", "bf16", "fp32"):
            raise InputError(f"stage {self.name!r}: precision must be auto, bf16 or fp32")
        unknown_lr = sorted(set(self.lr) - set(PARTS))
        if unknown_lr:
            raise InputError(f"stage {self.name!r}: unknown part(s) {unknown_lr} in 'lr'; parts are {list(PARTS)}")
        missing_lr = [p for p in self.train if p not in self.lr]
        if missing_lr:
            raise InputError(f"stage {self.name!r}: no lr for trained part(s) {missing_lr}")
        if self.distill.weight and not self.uses_feature_cache and not self.distill.mirror_weight:
            raise InputError(f"stage {self.name!r}: in a stage that trains on images (not cached features) distill "
                             f"has the mirror term alone: set distill.mirror_domains and distill.mirror_weight")
        if self.distill.weight and not self.distill.teachers:
            raise InputError(f"stage {self.name!r}: distill.weight > 0 needs distill.teachers (domain -> checkpoint)")

    @property
    def uses_feature_cache(self) -> bool:
        return "backbone" not in self.train and self.feature_cache != "off"


@dataclass
class ValidationSet:
    """One held-out evaluation set (never the test classes): a manifest and how to split it into queries/index."""

    manifest: str | None = None       # a manifest, or a built-in benchmark: emoji | glyphs | icons
    where: dict[str, Any] = field(default_factory=dict)
    folds_by: str | None = None       # leave-one-group-out folds (emoji: vendor, glyphs: font, icons: theme), or
    query_where: dict[str, Any] = field(default_factory=dict)   # explicit query/index subsets of the manifest
    index_where: dict[str, Any] = field(default_factory=dict)


@dataclass
class ValidationConfig(ValidationSet):
    """Periodic GUIE mP@5 on held-out data: one set (the fields above), or several named `sets` (one per domain),
    whose mean is the validation score (each set's score is logged too)."""

    sets: dict[str, ValidationSet] = field(default_factory=dict)
    every_steps: int = 0              # 0: only at stage ends
    batch_size: int = 64

    def __post_init__(self):
        if self.sets and self.manifest:
            raise InputError("validation: give either one manifest or named sets, not both")

    def all_sets(self) -> dict[str, ValidationSet]:
        """The named sets, or the single set as {"val": ...}; empty when nothing is configured."""
        if self.sets:
            return dict(self.sets)
        return {"val": self} if self.manifest else {}


@dataclass
class RunConfig:
    """A whole training run."""

    name: str
    stages: list[StageConfig]
    datasets: dict[str, DatasetConfig]
    model: ModelConfig = field(default_factory=ModelConfig)
    validation: ValidationConfig | None = None
    seed: int = 0
    output_dir: Path | None = None     # default runs/<name>
    checkpoint_every_steps: int = 500
    log_every_steps: int = 20
    num_workers: int | None = None
    # torch's intra-op threads on a CPU, pinned for the whole run: float sums then run in the same order on every
    # machine, so a seeded run is bit-reproducible (same torch build and CPU instruction set); None: all cores
    cpu_threads: int | None = None
    device: str = "auto"
    cache_dir: Path | None = None      # feature caches / benchmark data (default $GUIE_CACHE)
    # what computes the frozen backbone's cached features (head stages, validation on features): auto (OpenVINO on
    # a CPU, torch on CUDA), torch, openvino, onnxruntime; at `precision` (fp32: the features train heads). The
    # backbone's own training always runs on torch.
    runtime: str = "auto"
    precision: str = "fp32"

    def __post_init__(self):
        if not self.stages:
            raise InputError("a run needs at least one stage")
        from ..embedding.runtimes import check_choice

        check_choice(self.runtime, self.precision)
        if self.cpu_threads is not None and self.cpu_threads < 1:
            raise InputError(f"cpu_threads must be >= 1 (or null for all cores), got {self.cpu_threads}")
        names = [s.name for s in self.stages]
        if len(set(names)) != len(names):
            raise InputError(f"stage names must be unique, got {names}")
        for s in self.stages:
            unknown = [d for d in s.datasets if d not in self.datasets]
            if unknown:
                raise InputError(f"stage {s.name!r} uses undefined dataset(s) {unknown}; "
                                 f"defined: {sorted(self.datasets)}")

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) if self.output_dir else Path("runs") / self.name

    def select_stages(self, names: list[str]) -> RunConfig:
        """Keep only the named stages (in recipe order), e.g. to run a recipe's head stage alone."""
        wanted = [n.strip() for n in names if n.strip()]
        known = [s.name for s in self.stages]
        unknown = [n for n in wanted if n not in known]
        if unknown or not wanted:
            raise ConfigError(f"unknown stage(s) {unknown or wanted}; this recipe has {known}")
        self.stages = [s for s in self.stages if s.name in wanted]
        return self


def load_run_config(path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    """Load a YAML training recipe (with optional `a.b=value` overrides)."""
    return load_yaml_config(RunConfig, path, overrides)


__all__ = ["ConfigError", "DatasetConfig", "LossConfig", "ModelConfig", "OptimizerConfig", "RunConfig",
           "SamplerConfig", "ScheduleConfig", "StageConfig", "ValidationConfig", "ValidationSet", "load_run_config",
           "PARTS"]
