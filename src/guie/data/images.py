"""Robust image decoding: every image becomes 8-bit RGB, or raises ImageLoadError naming the file and the reason.

Handled: EXIF orientation, alpha/palette transparency (composited on white, as the emoji and product photos
expect), CMYK, 16-bit and float grey, 1-bit, truncated files, empty files and decompression bombs.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
DEFAULT_MAX_PIXELS = 178_956_970  # PIL's own hard limit (2x MAX_IMAGE_PIXELS); larger is treated as a bomb


class ImageLoadError(Exception):
    """An image that cannot be used; str() is a one-line '<path>: <reason>'."""

    def __init__(self, path, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path, self.reason = str(path), reason


def to_rgb(image: Image.Image, background=(255, 255, 255)) -> Image.Image:
    """Convert any PIL mode to RGB; transparent pixels are composited onto `background`."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
        mode = image.mode
        if mode == "RGB":
            return image
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, background + (255,))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    if mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(image, dtype=np.float64)
        hi = 65535.0 if mode.startswith("I;16") or arr.max() > 255 else 255.0
        arr = np.clip(arr / hi * 255.0, 0, 255).astype(np.uint8)
        return Image.fromarray(arr, "L").convert("RGB")
    return image.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV


def load_image(path: str | Path, draft_size: int | None = None, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Open an image file as 8-bit RGB with EXIF orientation applied.

    Args:
        draft_size: for JPEGs, let libjpeg decode at a reduced scale whose short side stays >= draft_size
            (DCT scaling: several times faster on large photos, no visible loss after the resize that follows).
        max_pixels: refuse images with more pixels than this (decompression bombs).
    Raises:
        ImageLoadError: with the file name and a one-line reason.
    """
    path = Path(path)
    try:
        if path.stat().st_size == 0:
            raise ImageLoadError(path, "empty file (0 bytes)")
    except FileNotFoundError:
        raise ImageLoadError(path, "file not found") from None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                w, h = im.size
                if w * h > max_pixels:
                    raise ImageLoadError(path, f"too large ({w}x{h} = {w * h:,} pixels > {max_pixels:,}); "
                                               "possible decompression bomb")
                if draft_size and im.format == "JPEG" and im.mode in ("RGB", "L"):
                    im.draft("RGB", _draft_request(w, h, draft_size))
                im.load()
                im = ImageOps.exif_transpose(im)
                return to_rgb(im)
    except ImageLoadError:
        raise
    except UnidentifiedImageError:
        raise ImageLoadError(path, "not a recognised image format") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageLoadError(path, f"decompression bomb: {e}") from None
    except OSError as e:
        raise ImageLoadError(path, f"corrupt or truncated image ({e})") from None
    except (ValueError, SyntaxError, EOFError) as e:
        raise ImageLoadError(path, f"cannot decode ({type(e).__name__}: {e})") from None


def _draft_request(w: int, h: int, short_side: int) -> tuple[int, int]:
    """draft() keeps the scale whose result is >= the requested size; request the box that keeps the short side."""
    scale = short_side / min(w, h)
    return max(1, int(w * scale)), max(1, int(h * scale))
