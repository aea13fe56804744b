"""Decode JPEGs on the model's device (nvJPEG through `torchvision.io.decode_jpeg` on CUDA) and resize them there.

DataLoader workers then only read file bytes and parse headers, which frees the CPU when it, not the GPU, limits
throughput (PIL decodes ~160 640x480 JPEGs/s per core; nvJPEG ~7,700/s on an H100). Other formats, CMYK JPEGs and
JPEGs the device decoder rejects go through the ordinary PIL path (`load_image`), so results and error messages stay
those of the CPU path. Resizing is `guie.imaging.geometry.resize_tensor`: the geometry and the resampling arithmetic of
the PIL path, so for the same decoded pixels it gives the same model input; only the decoders differ (nvJPEG's IDCT
vs libjpeg's, about one level on some pixels, and PIL's reduced-scale `draft` decode of large JPEGs).
"""
from __future__ import annotations

import io
import warnings
from collections.abc import Sequence

import torch
from PIL import Image
from torch.utils.data import Dataset

from ..imaging.geometry import resize_tensor
from ..imaging.io import DEFAULT_MAX_PIXELS, ImageLoadError, load_image, max_decoded_pixels, read_image_bytes
from ..models.preprocess import PreprocessConfig

JPEG_MAGIC = b"\xff\xd8\xff"
EXIF_ORIENTATION = 0x0112


def _orient(x: torch.Tensor, code: int) -> torch.Tensor:
    """Apply EXIF orientation `code` to [3,H,W] as PIL's ImageOps.exif_transpose does (nvJPEG ignores EXIF)."""
    t = x.transpose(-1, -2) if code >= 5 else x
    flips = {1: (), 2: (-1,), 3: (-1, -2), 4: (-2,), 5: (), 6: (-1,), 7: (-1, -2), 8: (-2,)}[code]
    return t.flip(flips) if flips else t


ORIENT = range(1, 9)
RESIZE_ELEMENTS = 1 << 27  # source values resized per call (<= 64 images): bounds resize_tensor's float64 temporaries


class EncodedImageDataset(Dataset):
    """paths[i] -> (i, payload, error). payload is ("jpeg", uint8 byte tensor, EXIF orientation) for RGB/grey
    JPEGs, to be decoded on the device, or ("pixels", uint8 [3,S,S]) for everything else, decoded and resized here
    by PIL."""

    def __init__(self, paths: Sequence[str], transform, draft_size: int | None = None,
                 max_pixels: int = DEFAULT_MAX_PIXELS):
        self.paths, self.transform, self.draft_size, self.max_pixels = list(paths), transform, draft_size, max_pixels

    def __len__(self) -> int:
        return len(self.paths)

    def _pil(self, i: int):
        try:
            return i, ("pixels", self.transform(load_image(self.paths[i], draft_size=self.draft_size))), None
        except ImageLoadError as e:
            return i, None, str(e)
        except Exception as e:  # same policy as ImageFileDataset: one bad image never ends the run
            return i, None, f"{self.paths[i]}: {type(e).__name__}: {e}"

    def __getitem__(self, i: int):
        try:
            data = read_image_bytes(self.paths[i])
        except ImageLoadError as e:
            return i, None, str(e)
        if data[:3] != JPEG_MAGIC:
            return self._pil(i)
        try:  # header only: size (decompression bombs), colour mode (CMYK needs PIL), EXIF orientation
            with Image.open(io.BytesIO(data)) as im:
                w, h, mode = im.size[0], im.size[1], im.mode
                orientation = int(im.getexif().get(EXIF_ORIENTATION, 1))
        except Exception:
            return self._pil(i)  # PIL then names the problem
        if mode not in ("RGB", "L") or w * h > min(self.max_pixels, max_decoded_pixels()) or orientation not in ORIENT:
            return self._pil(i)  # PIL decodes it at a reduced scale, or refuses it with its reason
        return i, ("jpeg", torch.frombuffer(bytearray(data), dtype=torch.uint8), orientation), None


def collate_encoded(batch):
    """-> (indices list, payloads list, failures [(index, message)])."""
    ok = [(i, p) for i, p, err in batch if err is None]
    failed = [(i, err) for i, p, err in batch if err is not None]
    return [i for i, _ in ok], [p for _, p in ok], failed


def resize_batch(x: torch.Tensor, cfg: PreprocessConfig) -> torch.Tensor:
    """uint8 [n,3,H,W] (one size) -> uint8 [n,3,S,S]: the model input `models.preprocess.resize_image` gives."""
    step = max(1, min(64, RESIZE_ELEMENTS // max(1, x[0].numel())))
    parts = [resize_tensor(x[i:i + step], cfg.image_size, cfg.resize_mode, *cfg.short_side, cfg.interpolation)
             for i in range(0, x.shape[0], step)]
    return torch.cat(parts)


def decode_batch(indices: list[int], payloads: list, paths: Sequence[str], cfg: PreprocessConfig,
                 device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None, list[tuple[int, str]]]:
    """Decode a collated batch on `device` -> (indices [n], uint8 images [n,3,S,S] on device or None, failures)."""
    from torchvision.io import ImageReadMode, decode_jpeg

    images: dict[int, torch.Tensor] = {}
    failed: list[tuple[int, str]] = []
    jpeg_pos = [k for k, p in enumerate(payloads) if p[0] == "jpeg"]
    for k, p in enumerate(payloads):
        if p[0] == "pixels":
            images[k] = p[1].to(device, non_blocking=True)
    decoded: list[torch.Tensor | None] = [None] * len(jpeg_pos)
    if jpeg_pos:
        data = [payloads[k][1] for k in jpeg_pos]
        with warnings.catch_warnings():
            # torchvision 0.29 deprecates its image codecs in favour of TorchCodec; they remain the installed,
            # working batched nvJPEG entry point, so the per-batch warning is silenced here.
            warnings.simplefilter("ignore", DeprecationWarning)
            try:
                decoded = list(decode_jpeg(data, mode=ImageReadMode.RGB, device=device))
            except RuntimeError:  # one bad file fails the whole batched call: retry one by one
                for j, d in enumerate(data):
                    try:
                        decoded[j] = decode_jpeg(d, mode=ImageReadMode.RGB, device=device)
                    except RuntimeError:
                        decoded[j] = None
        # decode_jpeg's apply_exif_orientation only works on CPU; the orientation read from the header is applied
        # here on every device alike.
        decoded = [d if d is None else _orient(d, payloads[k][2]) for d, k in zip(decoded, jpeg_pos)]
    by_size: dict[tuple[int, int], list[int]] = {}
    for j, k in enumerate(jpeg_pos):
        if decoded[j] is None:  # the device decoder refused it: PIL decides (decodes it, or names the problem)
            try:
                fallback = EncodedImageDataset([paths[indices[k]]], _transform(cfg))._pil(0)
            except Exception as e:  # pragma: no cover - _pil already catches everything it can
                fallback = (0, None, f"{paths[indices[k]]}: {type(e).__name__}: {e}")
            if fallback[2] is not None:
                failed.append((indices[k], fallback[2]))
            else:
                images[k] = fallback[1][1].to(device)
            continue
        by_size.setdefault(tuple(decoded[j].shape[-2:]), []).append(j)
    for js in by_size.values():  # one resize call per distinct source size
        batch = resize_batch(torch.stack([decoded[j] for j in js]), cfg)
        for j, img in zip(js, batch):
            images[jpeg_pos[j]] = img
    keep = sorted(images)
    idx = torch.tensor([indices[k] for k in keep], dtype=torch.long)
    stacked = torch.stack([images[k] for k in keep]) if keep else None
    return idx, stacked, failed


def _transform(cfg: PreprocessConfig):
    from ..models.preprocess import ImageTransform

    return ImageTransform(cfg)
