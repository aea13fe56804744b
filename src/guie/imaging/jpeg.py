"""JPEG decoding straight to a reduced size: libjpeg-turbo's n/8 DCT scaling, through simplejpeg.

libjpeg can emit a JPEG at any scale n/8 (n = 1..8) while decoding it, skipping most of the inverse-DCT and
colour-conversion work. PIL's `draft` exposes only 1/2, 1/4 and 1/8: a 640x480 photo that a 224-px model with
crop 0.875 needs at >= 256 px on its short side cannot be halved (240 px), so PIL decodes all 640x480 pixels and the
resize reads them all. At 5/8 libjpeg emits 400x300 directly, and the resize that follows reads 2.6x fewer pixels.

simplejpeg ships its own libjpeg-turbo in its wheel (no system library), decodes without holding the GIL (guie
decodes with a thread pool), and picks the largest reduction that keeps both sides >= a minimum. It is optional:
without it, or for anything but a YCbCr or greyscale JPEG (CMYK/YCCK, whose Adobe inversion PIL handles), or
whenever simplejpeg rejects the data (truncated, corrupt), `decode_jpeg_scaled` returns None and the caller decodes
with PIL as before, with PIL's limits and error messages. GUIE_FAST_JPEG=0 turns the fast path off (PIL only).
"""
from __future__ import annotations

import os

import numpy as np

try:  # optional accelerator
    import simplejpeg
except ImportError:  # pragma: no cover - exercised only where the wheel is missing
    simplejpeg = None

JPEG_MAGIC = b"\xff\xd8\xff"
_COLOURSPACES = ("YCbCr", "Gray")  # what the fast path decodes; others go to PIL


def fast_jpeg_available() -> bool:
    """Whether the scaled libjpeg-turbo decoder is in use: simplejpeg installed and GUIE_FAST_JPEG not 0."""
    return simplejpeg is not None and os.environ.get("GUIE_FAST_JPEG", "1") != "0"


def resize_short_side(short_side: int) -> int:
    """The short side to decode a JPEG at when its pixels only feed a resize to `short_side` (`load_pixels`):
    15/16 of it, rounded up, so that the resize enlarges by at most 1/15.

    640x480, 1280x960 and 2560x1920 photos for a 224-px model with crop 0.875 (256 px) then decode at 1/2, 1/4 and
    1/8 instead of 5/8, 5/16 and 5/32: libjpeg-turbo's 4x4, 2x2 and 1x1 inverse DCTs cost less than its 5x5 one
    (640x480: 1.1 instead of 1.6 ms), and the embeddings move no further from a full decode's
    (`benchmarks/jpeg_parity.py --sizes 480,511`, every image affected: max |difference| 0.044 instead of 0.051,
    mP@5 0.4266 instead of 0.4239; full decode 0.4252).
    """
    return -(-short_side * 15 // 16)


def decode_jpeg_scaled(data: bytes, short_side: int, max_pixels: int | None = None) -> np.ndarray | None:
    """RGB uint8 [H, W, 3] of the JPEG `data` at the smallest n/8 scale whose short side stays >= short_side (the
    full size if it is already smaller), or None when this decoder does not apply (see the module docstring) or
    when that scale would decode more than `max_pixels` pixels (the caller's bounded decode takes over).

    EXIF orientation is not applied here: the caller reads it from the header it has already parsed.
    """
    if not fast_jpeg_available() or not data.startswith(JPEG_MAGIC):
        return None
    try:
        h, w, colourspace, _ = simplejpeg.decode_jpeg_header(data, min_height=short_side, min_width=short_side)
        if colourspace not in _COLOURSPACES or (max_pixels is not None and h * w > max_pixels):
            return None
        return simplejpeg.decode_jpeg(data, colorspace="RGB", min_height=short_side, min_width=short_side)
    except ValueError:  # simplejpeg's error for anything libjpeg refuses, recoverable warnings included
        return None
