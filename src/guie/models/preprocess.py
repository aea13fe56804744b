"""Image preprocessing that travels with a model: PIL image -> uint8 tensor at the model's resolution.

Normalisation (mean/std) is *not* done here but inside the model (`ImageNormalize`), so data loaders ship uint8
(4x less memory and transfer than float) and an exported model takes raw pixels, as the GUIE competition expected.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

import numpy as np
import torch
from PIL import Image
from torch import nn

from ..errors import InputError
from ..imaging.geometry import INTERPOLATIONS, RESIZE_MODES, resize_array, resize_pil, short_side_ratio
from ..imaging.io import DEFAULT_MAX_PIXELS, load_pixels


@dataclass(frozen=True)
class PreprocessConfig:
    """How raw images become model input; every backbone returns one of these with its module."""

    image_size: int = 224
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    interpolation: str = "bicubic"
    crop_pct: float = 0.875  # "crop" mode: resize the short side to image_size / crop_pct, then centre-crop
    resize_mode: str = "crop"  # crop | squash (ignore aspect) | pad (letterbox on white)

    def __post_init__(self):
        if self.interpolation not in INTERPOLATIONS:
            raise InputError(f"interpolation {self.interpolation!r}: choose from {sorted(INTERPOLATIONS)}")
        if self.resize_mode not in RESIZE_MODES:
            raise InputError(f"resize_mode {self.resize_mode!r}: choose from {RESIZE_MODES}")
        if not 0 < self.crop_pct <= 1:
            raise InputError(f"crop_pct must be in (0, 1], got {self.crop_pct}")
        if self.image_size < 8:
            raise InputError(f"image_size must be >= 8, got {self.image_size}")

    @property
    def short_side(self) -> tuple[int, int]:
        """crop mode's short side before the centre crop, image_size / crop_pct, as an exact fraction (num, den)."""
        return short_side_ratio(self.image_size, self.crop_pct)

    def replace(self, **changes) -> PreprocessConfig:
        """A copy with some fields changed (None values are ignored)."""
        return replace(self, **{k: v for k, v in changes.items() if v is not None})

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict) -> PreprocessConfig:
        d = dict(d)
        for key in ("mean", "std"):
            if key in d:
                d[key] = tuple(float(x) for x in d[key])
        return cls(**d)


def resize_image(image: Image.Image, cfg: PreprocessConfig) -> Image.Image:
    """Resize an RGB PIL image to cfg.image_size x cfg.image_size following cfg.resize_mode, in bounded memory.

    The geometry (`guie.imaging.geometry`) is the one the device decoder and exported models use too.
    """
    return resize_pil(image, cfg.image_size, cfg.resize_mode, *cfg.short_side, cfg.interpolation)


def draft_size(cfg: PreprocessConfig) -> int:
    """Smallest side a JPEG may be decoded at (DCT scaling via PIL's draft) without losing resolution."""
    if cfg.resize_mode == "crop":
        return math.ceil(cfg.image_size / cfg.crop_pct)
    return cfg.image_size


def pil_to_uint8(image: Image.Image) -> torch.Tensor:
    """RGB PIL image -> contiguous uint8 tensor [3, H, W].

    The HWC -> CHW transpose is done by numpy: a torch copy op here would start an OpenMP thread team in every
    thread that decodes (guie decodes with a thread pool on CPU): decoding an emoji PNG took 10-16 ms instead of 2.
    """
    import numpy as np

    return torch.from_numpy(np.ascontiguousarray(np.asarray(image, dtype=np.uint8).transpose(2, 0, 1)))


def pil_to_channels_last(image: Image.Image) -> torch.Tensor:
    """RGB PIL image -> uint8 tensor [3, H, W] stored channels-last (a view of an [H, W, 3] array): the values of
    `pil_to_uint8` without its transposing copy. Batches of these stack straight into the channels_last layout the
    CPU forward wants (`guie.pipeline.datasets.stack_images`); the evaluation path (`ImageTransform.load`) uses it."""
    return torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1)


class ImageTransform:
    """Callable PIL (RGB) -> uint8 tensor [3, S, S]; picklable, so DataLoader workers can run it."""

    def __init__(self, cfg: PreprocessConfig):
        self.cfg = cfg

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return pil_to_uint8(resize_image(image, self.cfg))

    def load(self, path, max_pixels: int = DEFAULT_MAX_PIXELS) -> torch.Tensor:
        """Decode the image file (or file-like) `path` and transform it: the values of
        `self(load_image(path, draft_size(cfg)))`, stored channels-last (`pil_to_channels_last`), except that a JPEG
        on the libjpeg-turbo fast path goes from its decoded array straight to the model input
        (`guie.imaging.io.load_pixels`, `guie.imaging.geometry.resize_array`: no PIL image, no GIL, about 2 instead
        of 3.5 ms for a 640x480 photo). Files, shards and uploads all come here, so a query image gets the pixels it
        got when it was indexed. Errors as `load_image`."""
        cfg = self.cfg
        pixels = load_pixels(path, draft_size=draft_size(cfg), max_pixels=max_pixels)
        if isinstance(pixels, np.ndarray):
            out = resize_array(pixels, cfg.image_size, cfg.resize_mode, *cfg.short_side, cfg.interpolation)
            if out is not None:
                return out
            pixels = Image.fromarray(pixels, "RGB")
        return pil_to_channels_last(resize_image(pixels, cfg))

    def __repr__(self) -> str:
        return f"ImageTransform({self.cfg})"


class ImageNormalize(nn.Module):
    """uint8 [0,255] or float [0,1] images -> (x - mean) / std, in one fused multiply-add."""

    def __init__(self, mean, std):
        super().__init__()
        mean_t = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
        std_t = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
        self.register_buffer("scale", 1.0 / std_t, persistent=False)
        self.register_buffer("shift", mean_t / std_t, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.uint8:
            return x.float() * (self.scale / 255.0) - self.shift
        return x.float() * self.scale - self.shift
