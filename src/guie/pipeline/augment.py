"""Training augmentations: PIL RGB image -> uint8 tensor [3, S, S], built from torchvision.transforms.v2.

Defaults are the 1st GUIE place's albumentations pipeline (HorizontalFlip 0.5; ImageCompression quality 99-100 at
albumentations' default p=0.5; ShiftScaleRotate shift 0.2, scale 0.2, rotate 10 deg, p=0.7; Cutout one hole of 40%
of the side, p=0.5), re-expressed with torchvision v2 on uint8 tensors. Pixels stay uint8 end to end: normalisation
happens inside the model, as for evaluation (`guie.models.ImageTransform`).

Differences from that pipeline, on purpose:
- the image is first brought to S x S exactly as at evaluation (`PreprocessConfig`: crop / squash / pad), then
  augmented: the affine warp runs on S x S pixels instead of the full-size photo (much cheaper), and with every
  probability at 0 the output equals the evaluation transform bit for bit;
- borders uncovered by the affine warp and the Cutout hole are filled white (255) by default, where the reference
  used black. White is what the evaluation 'pad' mode letterboxes with and the background of most product, emoji and
  artwork images in GUIE's domains, so training does not teach the model a black frame it never sees at test time.
  `fill: 0` reproduces the reference.

Randomness comes only from torch's global generator, so `torch.manual_seed(s)` before the call (as
`guie.pipeline.datasets.ImageFileDataset` does per (index, seed) key) makes the output reproducible in any worker
process.
"""
from __future__ import annotations

import difflib
import io
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
from PIL import Image
from torch import nn
from torchvision.transforms import InterpolationMode, v2

from ..errors import InputError
from ..models.preprocess import PreprocessConfig, pil_to_uint8, resize_image

Fill = int | tuple[int, int, int]
_PROBABILITIES = ("hflip", "jpeg_p", "affine_p", "cutout_p", "color_jitter_p", "grayscale_p")
_RANGES = {"shift": 1.0, "scale": 0.99, "rotate": 180.0, "cutout_size": 1.0}  # field -> largest allowed value


@dataclass(frozen=True)
class AugmentConfig:
    """Augmentation probabilities and ranges (keys of a recipe's `augment:` mapping).

    Geometry: `hflip` (probability), `affine_p` with `shift` (max |translation| as a fraction of the side),
    `scale` (zoom factor in [1 - scale, 1 + scale]) and `rotate` (max |angle| in degrees); `crop_scale` (area
    range of a RandomResizedCrop replacing the evaluation resize; None = evaluation resize) with `crop_ratio`.
    Photometric: `jpeg_p` with `jpeg_quality` (inclusive range), `color_jitter_p` with `color_jitter`
    (brightness, contrast, saturation, hue), `grayscale_p`. Occlusion: `cutout_p` with `cutout_size` (the hole's
    side as a fraction of the image side; holes are centred anywhere and clipped at the border).
    `fill`: colour of uncovered borders and of the hole, one 0-255 value or (r, g, b).
    """

    hflip: float = 0.5
    jpeg_p: float = 0.5
    jpeg_quality: tuple[int, int] = (99, 100)
    affine_p: float = 0.7
    shift: float = 0.2
    scale: float = 0.2
    rotate: float = 10.0
    cutout_p: float = 0.5
    cutout_size: float = 0.4
    fill: Fill = 255
    color_jitter_p: float = 0.0
    color_jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.4, 0.1)
    grayscale_p: float = 0.0
    crop_scale: tuple[float, float] | None = None
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)

    def __post_init__(self):
        def bad(name: str, expected: str):
            raise InputError(f"augment: {name} must be {expected}, got {getattr(self, name)!r}")

        for name in _PROBABILITIES:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= v <= 1.0:
                bad(name, "a probability in [0, 1]")
        q = self.jpeg_quality
        if not (len(q) == 2 and all(isinstance(x, int) and not isinstance(x, bool) for x in q)
                and 1 <= q[0] <= q[1] <= 100):
            bad("jpeg_quality", "two integers lo <= hi in [1, 100]")
        for name, hi in _RANGES.items():
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= v <= hi:
                bad(name, f"a number in [0, {hi}]")
        f = self.fill
        channels = (f,) if isinstance(f, int) else f
        if not (len(channels) in (1, 3) and all(isinstance(c, int) and not isinstance(c, bool) and 0 <= c <= 255
                                                for c in channels)):
            bad("fill", "an integer 0-255 or three of them (r, g, b)")
        cj = self.color_jitter
        if not (len(cj) == 4 and all(isinstance(x, (int, float)) and x >= 0 for x in cj) and cj[3] <= 0.5):
            bad("color_jitter", "(brightness, contrast, saturation, hue), all >= 0 and hue <= 0.5")
        if self.crop_scale is not None:
            lo, hi = self.crop_scale
            if not 0 < lo <= hi <= 1:
                bad("crop_scale", "None or (lo, hi) with 0 < lo <= hi <= 1")
        lo, hi = self.crop_ratio
        if not 0 < lo <= hi:
            bad("crop_ratio", "(lo, hi) with 0 < lo <= hi")

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> AugmentConfig:
        """Build from a recipe mapping (YAML lists become tuples); unknown keys are an error naming the key."""
        d = dict(d or {})
        valid = [f.name for f in fields(cls)]
        unknown = [k for k in d if k not in valid]
        if unknown:
            hints = []
            for k in unknown:
                close = difflib.get_close_matches(str(k), valid, n=1)
                hints.append(f"{k!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
            raise InputError(f"augment: unknown option(s) {', '.join(hints)}; valid options: {', '.join(valid)}")
        for k, v in d.items():
            if isinstance(v, list):
                d[k] = tuple(v)
            if (k in _PROBABILITIES or k in _RANGES) and isinstance(v, int) and not isinstance(v, bool):
                d[k] = float(v)
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        """Plain mapping (tuples as lists) that `from_dict` reads back: for recipes and checkpoints."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def off(cls) -> AugmentConfig:
        """Every augmentation disabled: the training transform then equals the evaluation transform."""
        return cls(hflip=0.0, jpeg_p=0.0, affine_p=0.0, cutout_p=0.0, color_jitter_p=0.0, grayscale_p=0.0)


class Cutout(nn.Module):
    """One square hole of `size` x the image side, centred uniformly over the image and clipped at its border, so
    the visible hole is up to that size (albumentations' Cutout, which the reference used, with symmetric clipping).

    Written here because v2.RandomErasing samples an area and aspect ratio and always keeps the hole inside the
    image, a different distribution. Works on uint8 (or float) [..., C, H, W] tensors; torch's global RNG.
    """

    def __init__(self, size: float, fill: Fill):
        super().__init__()
        self.size, self.fill = size, fill

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        h, w = image.shape[-2:]
        hole_h, hole_w = int(self.size * h), int(self.size * w)
        cy = int(torch.randint(0, h + 1, ()))
        cx = int(torch.randint(0, w + 1, ()))
        y1, x1 = max(0, cy - hole_h // 2), max(0, cx - hole_w // 2)
        y2, x2 = min(h, cy - hole_h // 2 + hole_h), min(w, cx - hole_w // 2 + hole_w)
        out = image.clone()
        fill = torch.as_tensor(self.fill, dtype=image.dtype).reshape(-1, 1, 1)
        out[..., y1:y2, x1:x2] = fill
        return out

    def extra_repr(self) -> str:
        return f"size={self.size}, fill={self.fill}"


class JpegRecompress(nn.Module):
    """JPEG-encode and decode a uint8 [3, H, W] image at a quality drawn uniformly from `quality` (inclusive).

    Pillow's codec rather than v2.JPEG: v2.JPEG goes through torchvision.io's image codecs, deprecated since
    torchvision 0.29 (superseded by TorchCodec, which guie does not depend on).
    """

    def __init__(self, quality: tuple[int, int]):
        super().__init__()
        self.quality = tuple(quality)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        q = int(torch.randint(self.quality[0], self.quality[1] + 1, ()))
        buf = io.BytesIO()
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(buf, "JPEG", quality=q)
        buf.seek(0)
        with Image.open(buf) as im:
            return pil_to_uint8(im.convert("RGB"))

    def extra_repr(self) -> str:
        return f"quality={self.quality}"


class TrainTransform:
    """Callable PIL image -> augmented uint8 tensor [3, S, S]; picklable (DataLoader workers)."""

    def __init__(self, preprocess: PreprocessConfig, cfg: AugmentConfig):
        self.preprocess, self.cfg = preprocess, cfg
        self.crop = None
        if cfg.crop_scale is not None:
            self.crop = v2.RandomResizedCrop(preprocess.image_size, scale=cfg.crop_scale, ratio=cfg.crop_ratio,
                                             interpolation=InterpolationMode(preprocess.interpolation))
        steps: list[nn.Module] = []
        if cfg.hflip:
            steps.append(v2.RandomHorizontalFlip(cfg.hflip))
        if cfg.jpeg_p:
            steps.append(v2.RandomApply([JpegRecompress(cfg.jpeg_quality)], p=cfg.jpeg_p))
        if cfg.affine_p:
            affine = v2.RandomAffine(degrees=cfg.rotate, translate=(cfg.shift, cfg.shift),
                                     scale=(1 - cfg.scale, 1 + cfg.scale),
                                     interpolation=InterpolationMode.BILINEAR, fill=_v2_fill(cfg.fill))
            steps.append(v2.RandomApply([affine], p=cfg.affine_p))
        if cfg.color_jitter_p:
            b, c, s, h = cfg.color_jitter
            steps.append(v2.RandomApply([v2.ColorJitter(b, c, s, h)], p=cfg.color_jitter_p))
        if cfg.grayscale_p:
            steps.append(v2.RandomGrayscale(cfg.grayscale_p))
        if cfg.cutout_p:
            steps.append(v2.RandomApply([Cutout(cfg.cutout_size, cfg.fill)], p=cfg.cutout_p))
        self.augment = v2.Compose(steps) if steps else None

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return self.finish(self.prepare(image))

    def prepare(self, image: Image.Image) -> Image.Image | torch.Tensor:
        """The part that draws no random numbers: RGB, and the evaluation resize to uint8 unless a random crop
        replaces it. Safe to run on several threads at once (PIL releases the GIL; no torch RNG is touched)."""
        if image.mode != "RGB":
            image = image.convert("RGB")
        return image if self.crop is not None else pil_to_uint8(resize_image(image, self.preprocess))

    def finish(self, prepared: Image.Image | torch.Tensor) -> torch.Tensor:
        """The random part (crop, augmentations), drawing from torch's global RNG: run it in sample order, after
        seeding, for reproducible output. `finish(prepare(image))` is `self(image)`."""
        x = pil_to_uint8(self.crop(prepared)) if self.crop is not None else prepared
        return self.augment(x) if self.augment is not None else x

    def __repr__(self) -> str:
        return f"TrainTransform(crop={self.crop}, augment={self.augment}, preprocess={self.preprocess})"


def _v2_fill(fill: Fill) -> int | list[int]:
    return fill if isinstance(fill, int) else list(fill)


def build_train_transform(preprocess: PreprocessConfig, cfg: AugmentConfig | None = None) -> TrainTransform:
    """The training transform for a model's preprocessing: PIL RGB image -> uint8 tensor [3, S, S].

    cfg defaults to the 1st-place augmentations (`AugmentConfig()`); `AugmentConfig.off()` gives exactly the
    evaluation transform. Seed torch (`torch.manual_seed`) per sample for reproducible output.
    """
    return TrainTransform(preprocess, cfg if cfg is not None else AugmentConfig())


__all__ = ["AugmentConfig", "Cutout", "JpegRecompress", "TrainTransform", "build_train_transform"]
