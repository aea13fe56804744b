"""Robust image decoding: every image becomes 8-bit RGB, or raises ImageLoadError naming the file and the reason.

Handled: EXIF orientation, alpha/palette transparency (composited on white, as the emoji and product photos
expect), CMYK, 16-bit and float grey, 1-bit, truncated files, empty files and decompression bombs.

Bounded memory: at most `max_decoded_pixels` pixels are ever decoded (default 2**25, 33.5 Mpx; environment
variable GUIE_MAX_DECODED_PIXELS). Larger JPEGs are decoded at a reduced DCT scale (1/2, 1/4 or 1/8) that fits;
other formats that large are refused from their header, before any pixel is decoded. The resize that follows
(`guie.imaging.geometry`) never builds an intermediate larger than the model input needs, so one image costs at
most about 16 bytes per decoded pixel (decode, orientation, compositing on white) whatever its declared size.

A path may also be a *shard reference* ``/abs/shard-000003.tar#<offset>:<size>:<member name>`` (see
`guie.data.shards`): the image's bytes are read by seeking to `offset` in the tar file, so shards give random
access to samples (DataLoader shuffling and workers work as with loose files).
"""
from __future__ import annotations

import io
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from ..errors import GuieError, InputError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".webp", ".avif", ".bmp", ".gif", ".tif", ".tiff")
# Image formats guie does not decode: a folder's files with these names are listed (and reported with this reason)
# rather than silently left out.
UNDECODABLE_FORMATS = {
    ".svg": "SVG is a vector format; guie decodes raster images only (rasterise it to PNG first)",
    ".svgz": "SVG is a vector format; guie decodes raster images only (rasterise it to PNG first)",
    ".heic": "HEIC/HEIF needs a decoder guie does not ship (convert it to JPEG or PNG first)",
    ".heif": "HEIC/HEIF needs a decoder guie does not ship (convert it to JPEG or PNG first)",
    ".jxl": "JPEG XL needs a decoder guie does not ship (convert it to JPEG or PNG first)",
}
DEFAULT_MAX_PIXELS = 178_956_970  # PIL's own hard limit (2x MAX_IMAGE_PIXELS); larger is treated as a bomb
DEFAULT_MAX_DECODED_PIXELS = 1 << 25  # 33.5 Mpx: an 8K frame; more is decoded at a reduced scale or refused
_JPEG_SCALES = (1, 2, 4, 8)  # libjpeg's DCT scaling, as PIL's draft offers it


class ImageLoadError(GuieError):
    """An image that cannot be used; str() is a one-line '<path>: <reason>'.

    `kind` names the failure for reports: missing, empty, format, bomb, truncated, corrupt, decode.
    """

    def __init__(self, path, reason: str, kind: str = "unreadable"):
        super().__init__(f"{path}: {reason}")
        self.path, self.reason, self.kind = str(path), reason, kind


_SHARD_REF = re.compile(r"^(?P<tar>.+?\.tar)#(?P<offset>\d+):(?P<size>\d+):(?P<name>.+)$", re.DOTALL)


@dataclass(frozen=True)
class ShardRef:
    """Where one sample's bytes live inside a tar shard."""

    tar: str
    offset: int  # byte offset of the member's data (after its tar header)
    size: int
    name: str  # member name, e.g. 000000042.jpg

    def __str__(self) -> str:
        return f"{self.tar}#{self.offset}:{self.size}:{self.name}"


def parse_shard_ref(path: str | Path) -> ShardRef | None:
    """The ShardRef encoded in `path`, or None when `path` is an ordinary file path."""
    m = _SHARD_REF.match(str(path))
    if m is None:
        return None
    return ShardRef(m["tar"], int(m["offset"]), int(m["size"]), m["name"])


def read_image_bytes(path: str | Path) -> bytes:
    """The raw bytes of an image file or of a shard member (local path, or any fsspec URL for shards).

    Raises ImageLoadError (kind missing/empty) naming the path.
    """
    ref = parse_shard_ref(path)
    try:
        if ref is None:
            data = Path(path).read_bytes()
        elif "://" in ref.tar:
            import fsspec  # optional: only for remote shards

            with fsspec.open(ref.tar, "rb") as f:
                f.seek(ref.offset)
                data = f.read(ref.size)
        else:
            with open(ref.tar, "rb") as f:
                f.seek(ref.offset)
                data = f.read(ref.size)
    except FileNotFoundError:
        raise ImageLoadError(path, "file not found", "missing") from None
    except IsADirectoryError:
        raise ImageLoadError(path, "is a folder, not an image", "format") from None
    if ref is not None and len(data) != ref.size:
        raise ImageLoadError(path, f"shard ends early ({len(data)} of {ref.size} bytes)", "truncated")
    if not data:
        raise ImageLoadError(path, "empty file (0 bytes)", "empty")
    return data


def image_source(path: str | Path):
    """What PIL.Image.open should read: the file path itself, a BytesIO of a shard member, or `path` unchanged
    when it is already a binary file object (e.g. bytes streamed from a shard).

    Raises ImageLoadError (kind missing/empty) before any decoding is attempted.
    """
    if hasattr(path, "read"):
        return path
    if parse_shard_ref(path) is not None:
        return io.BytesIO(read_image_bytes(path))
    path = Path(path)
    try:
        if path.stat().st_size == 0:
            raise ImageLoadError(path, "empty file (0 bytes)", "empty")
    except FileNotFoundError:
        raise ImageLoadError(path, "file not found", "missing") from None
    if path.is_dir():
        raise ImageLoadError(path, "is a folder, not an image", "format")
    return path


def check_image_header(path: str | Path) -> str:
    """The format of an image file judged by its header alone (PIL reads a few bytes, decodes no pixels), so that
    a stray non-image is refused before anything reads it whole. Raises ImageLoadError (missing, empty, format)."""
    source = image_source(path)
    try:
        with Image.open(source) as im:
            return str(im.format)
    except UnidentifiedImageError:
        raise ImageLoadError(path, _unidentified_reason(path, source), "format") from None
    except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as e:
        raise ImageLoadError(path, f"unreadable image header ({type(e).__name__}: {e})", "format") from None


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


def max_decoded_pixels() -> int:
    """The decode limit in force: GUIE_MAX_DECODED_PIXELS when set, else DEFAULT_MAX_DECODED_PIXELS."""
    value = os.environ.get("GUIE_MAX_DECODED_PIXELS", "").strip()
    try:
        return int(value) if value else DEFAULT_MAX_DECODED_PIXELS
    except ValueError:
        raise InputError(f"GUIE_MAX_DECODED_PIXELS={value!r} is not a whole number of pixels") from None


def load_image(path: str | Path, draft_size: int | None = None, max_pixels: int = DEFAULT_MAX_PIXELS,
               max_decoded: int | None = None) -> Image.Image:
    """Open an image file as 8-bit RGB with EXIF orientation applied, in bounded memory.

    `path` may be a shard reference (``shard.tar#offset:size:name``); its bytes are read by seeking into the tar.

    Args:
        draft_size: for JPEGs, let libjpeg decode at a reduced scale whose short side stays >= draft_size
            (DCT scaling: several times faster on large photos, no visible loss after the resize that follows).
        max_pixels: refuse images that declare more pixels than this (decompression bombs); PIL itself refuses
            anything above its hard limit (DEFAULT_MAX_PIXELS) whatever this says.
        max_decoded: decode at most this many pixels (default: `max_decoded_pixels()`): larger JPEGs are decoded at
            the DCT scale that fits, larger images of other formats are refused (kind "too_large").
    Raises:
        ImageLoadError: with the file name and a one-line reason.
    """
    return _load(path, draft_size, max_pixels, max_decoded, as_array=False)


def load_pixels(path: str | Path, draft_size: int | None = None, max_pixels: int = DEFAULT_MAX_PIXELS,
                max_decoded: int | None = None) -> Image.Image | np.ndarray:
    """`load_image`, except that a JPEG the libjpeg-turbo fast path decodes (`guie.imaging.jpeg`) comes back as its
    RGB uint8 array [H, W, 3], EXIF orientation applied, instead of a PIL image, decoded at the n/8 scale that keeps
    its short side >= 15/16 of draft_size (`guie.imaging.jpeg.resize_short_side`: the pixels only feed a resize).

    For callers that only want the pixels resized (`guie.models.preprocess.ImageTransform.load`): they skip the
    PIL round trip and resize the array with `guie.imaging.geometry.resize_array`, which holds no GIL. Same
    arguments, limits and errors as `load_image`.
    """
    return _load(path, draft_size, max_pixels, max_decoded, as_array=True)


def _load(path, draft_size: int | None, max_pixels: int, max_decoded: int | None, as_array: bool):
    """`load_image` (as_array=False) and `load_pixels` (as_array=True)."""
    max_decoded = max_decoded_pixels() if max_decoded is None else max_decoded
    source = image_source(path)
    if isinstance(source, Path):
        path = source
    try:
        with warnings.catch_warnings():
            # `max_pixels` is the limit: PIL's warning at half its hard limit would otherwise print for every
            # large-but-legal image (escalating it instead would refuse images below max_pixels).
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(source) as im:
                w, h = im.size
                if w * h > max_pixels:
                    raise ImageLoadError(path, f"too large ({w}x{h} = {w * h:,} pixels > {max_pixels:,}); "
                                               "possible decompression bomb", "bomb")
                if im.format == "JPEG":
                    if draft_size and im.mode in ("RGB", "L"):
                        fast = _load_jpeg_scaled(source, im, draft_size, max_decoded, as_array)
                        if fast is not None:
                            return fast
                    _draft(im, draft_size, max_decoded)
                dw, dh = im.size
                if dw * dh > max_decoded:
                    raise ImageLoadError(path, f"too large to decode ({w}x{h} = {w * h:,} pixels > "
                                               f"{max_decoded:,}; raise GUIE_MAX_DECODED_PIXELS to allow it)",
                                         "too_large")
                im.load()
                im = ImageOps.exif_transpose(im)
                return to_rgb(im)
    except ImageLoadError:
        raise
    except UnidentifiedImageError:
        raise ImageLoadError(path, _unidentified_reason(path, source), "format") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageLoadError(path, f"decompression bomb: {e}", "bomb") from None
    except OSError as e:
        kind = "truncated" if "truncat" in str(e).lower() else "corrupt"
        raise ImageLoadError(path, f"corrupt or truncated image ({e})", kind) from None
    except (ValueError, SyntaxError, EOFError) as e:
        kind = "truncated" if isinstance(e, EOFError) or "truncat" in str(e).lower() else "decode"
        raise ImageLoadError(path, f"cannot decode ({type(e).__name__}: {e})", kind) from None


def _unidentified_reason(path, source) -> str:
    """Why PIL could not open a file: a known format guie does not decode (by name, or SVG by content), or none."""
    name = str(parse_shard_ref(path).name if parse_shard_ref(path) else path)
    reason = UNDECODABLE_FORMATS.get(Path(name).suffix.lower())
    if reason is None:
        try:
            if hasattr(source, "seek"):
                source.seek(0)
                head = source.read(1024)
            else:
                with open(source, "rb") as f:
                    head = f.read(1024)
        except OSError:
            head = b""
        if b"<svg" in head.lower():
            reason = UNDECODABLE_FORMATS[".svg"]
    return reason or "not a recognised image format"


def _draft(im: Image.Image, draft_size: int | None, max_decoded: int) -> None:
    """Choose a JPEG's DCT scale: the coarsest that keeps the short side >= draft_size (RGB and grey JPEGs, when
    asked), and at least the finest whose decoded size fits max_decoded (any JPEG)."""
    w, h = im.size
    request = None
    if draft_size and im.mode in ("RGB", "L"):
        request = _draft_request(w, h, draft_size)
    coarsest = 1 if request is None else min(w // request[0], h // request[1])
    wanted = max([s for s in _JPEG_SCALES if s <= coarsest], default=1)
    fits = [s for s in _JPEG_SCALES if s <= min(w, h) and -(-w // s) * -(-h // s) <= max_decoded]
    if fits and fits[0] > wanted:
        request = (w // fits[0], h // fits[0])  # PIL's draft then picks exactly this scale
    if request is not None:
        im.draft("RGB" if im.mode in ("RGB", "L") else None, request)


# EXIF orientation -> the transposition that undoes it (as ImageOps.exif_transpose)
_EXIF_TRANSPOSE = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
                   4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270,
                   7: Image.Transpose.TRANSVERSE, 8: Image.Transpose.ROTATE_90}


def _load_jpeg_scaled(source, im: Image.Image, short_side: int, max_decoded: int,
                      as_array: bool = False) -> Image.Image | np.ndarray | None:
    """The JPEG behind `im` (header already parsed by PIL) decoded by libjpeg-turbo at a reduced n/8 scale for a
    short side of short_side (`guie.imaging.jpeg.decode_jpeg_scaled`), EXIF orientation applied, as a PIL image or
    (as_array) an RGB uint8 array; None where `guie.imaging.jpeg` does not apply or that scale would decode more
    than max_decoded pixels (the caller then decodes with PIL, `_draft`)."""
    from .jpeg import decode_jpeg_scaled, fast_jpeg_available, resize_short_side

    if not fast_jpeg_available():
        return None
    if isinstance(source, Path):
        data = source.read_bytes()
    elif isinstance(source, io.BytesIO):
        data = source.getvalue()
    else:
        return None
    arr = decode_jpeg_scaled(data, resize_short_side(short_side) if as_array else short_side, max_decoded)
    if arr is None:
        return None
    method = _EXIF_TRANSPOSE.get(im.getexif().get(0x0112, 1))
    if as_array and method is None:
        return arr
    out = Image.fromarray(arr, "RGB")
    out = out.transpose(method) if method is not None else out
    return np.array(out) if as_array else out


def _draft_request(w: int, h: int, short_side: int) -> tuple[int, int]:
    """draft() keeps the scale whose result is >= the requested size; request the box that keeps the short side."""
    scale = short_side / min(w, h)
    return max(1, int(w * scale)), max(1, int(h * scale))
