"""Shared fixtures: small generated images of every awkward kind, bad files, and a tiny random embedder.

Everything is generated here (no downloads, no cached datasets), so the core tests run anywhere in seconds.
"""
from __future__ import annotations

import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from guie.data.benchmarks.emoji import DEFAULT_VERSION
from guie.utils import default_cache_dir

# The suite asserts CPU semantics (exact equalities, fp32) on any machine; tests/test_cuda.py asks for CUDA itself.
os.environ.setdefault("GUIE_DEVICE", "cpu")
# ... and on torch: "auto" would convert each test's model for OpenVINO (seconds each); tests/test_runtimes.py asks
# for OpenVINO and ONNX Runtime explicitly, and checks what "auto" picks.
os.environ.setdefault("GUIE_RUNTIME", "torch")

# where `guie data emoji` puts the benchmark: $GUIE_CACHE (else ~/.cache/guie)/emoji/<version>/manifest.csv
EMOJI_MANIFEST = default_cache_dir() / "emoji" / DEFAULT_VERSION / "manifest.csv"


def photo(w: int, h: int, seed: int = 0) -> np.ndarray:
    """A smooth RGB test picture [h, w, 3] uint8 (gradients + a few blobs), distinct per seed."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w] / max(w, h)
    out = np.empty((h, w, 3))
    for c in range(3):
        a, b, f = rng.uniform(-1, 1, 3)
        out[..., c] = 128 + 90 * np.sin(6 * (a * xx + b * yy) + f * 3)
    for _ in range(3):
        cx, cy, r = rng.uniform(0, 1), rng.uniform(0, 1), rng.uniform(0.05, 0.2)
        out[(xx - cx) ** 2 + (yy - cy) ** 2 < r * r] = rng.integers(0, 256, 3)
    return np.clip(out, 0, 255).astype(np.uint8)


def two_colour(w: int, h: int, left=(255, 0, 0), right=(0, 0, 255)) -> Image.Image:
    """Left half one colour, right half another: shows which way an image was turned."""
    arr = np.empty((h, w, 3), np.uint8)
    arr[:, : w // 2], arr[:, w // 2:] = left, right
    return Image.fromarray(arr)


def png_header_only(path: Path, width: int, height: int) -> Path:
    """A PNG that claims width x height pixels but holds almost no data: a decompression bomb's header."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))
    return path


def png_one_bit(path: Path, width: int, height: int) -> Path:
    """A real 1-bit PNG (diagonal stripes) written row by row, without ever holding width x height pixels."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    row_bytes = (width + 7) // 8
    z = zlib.compressobj(9)
    idat = bytearray()
    for y in range(height):
        row = bytes([0]) + bytes([0xF0 if (y // 64) % 2 else 0x0F]) * row_bytes
        idat += z.compress(row)
    idat += z.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", bytes(idat)) + chunk(b"IEND", b""))
    return path


def write_mode_images(root: Path) -> dict[str, Path]:
    """One small image per awkward kind; returns kind -> path. All are valid and must embed."""
    root.mkdir(parents=True, exist_ok=True)
    base = Image.fromarray(photo(48, 36, seed=1))
    out: dict[str, Path] = {}

    def save(name: str, im: Image.Image, **kw) -> None:
        out[name.split(".")[0]] = root / name
        im.save(root / name, **kw)

    save("rgb.jpg", base, quality=92)
    save("gray.png", base.convert("L"))
    save("cmyk.jpg", base.convert("CMYK"))
    save("rgba.png", base.convert("RGBA"))
    save("la.png", base.convert("LA"))
    save("palette.png", base.convert("P", palette=Image.Palette.ADAPTIVE, colors=16))
    pal_t = base.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    save("palette_transparent.png", pal_t, transparency=0)
    save("bw.png", base.convert("1"))
    save("gray16.png", Image.fromarray(np.asarray(base.convert("L"), np.uint16) * 257))
    save("webp.webp", base)
    save("tall.png", Image.fromarray(photo(20, 90, seed=2)))
    save("wide.jpg", Image.fromarray(photo(200, 24, seed=3)))
    save("tiny.png", Image.fromarray(photo(3, 2, seed=4)))
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    save("exif_rotated.jpg", two_colour(60, 40), exif=exif.tobytes(), quality=95)
    return out


def write_exif_orientations(root: Path, w: int, h: int, seed: int) -> list[str]:
    """The same w x h JPEG saved once per EXIF orientation 1..8 (o1.jpg ... o8.jpg); returns the paths in order."""
    paths = []
    for code in range(1, 9):
        exif = Image.Exif()
        exif[0x0112] = code
        p = root / f"o{code}.jpg"
        Image.fromarray(photo(w, h, seed=seed)).save(p, exif=exif.tobytes(), quality=95)
        paths.append(str(p))
    return paths


def write_bad_files(root: Path) -> dict[str, Path]:
    """Files with image names that cannot be decoded; returns kind -> path."""
    root.mkdir(parents=True, exist_ok=True)
    good = root / "_good.jpg"
    Image.fromarray(photo(64, 48, seed=5)).save(good, quality=90)
    data = good.read_bytes()
    good.unlink()
    files = {"empty": ("empty.png", b""), "truncated": ("truncated.jpg", data[: len(data) // 2]),
             "corrupt": ("corrupt.jpg", data[:20] + bytes(np.random.default_rng(0).integers(0, 256, 300, np.uint8))),
             "not_image": ("notes.png", b"this is a text file, not a picture\n")}
    out = {}
    for kind, (name, blob) in files.items():
        (root / name).write_bytes(blob)
        out[kind] = root / name
    out["bomb"] = png_header_only(root / "bomb.png", 40_000, 40_000)
    return out


@pytest.fixture(scope="session")
def mode_images(tmp_path_factory) -> dict[str, Path]:
    """kind -> path of one valid image per awkward mode/size (grey, CMYK, 16-bit, palette, alpha, EXIF...)."""
    return write_mode_images(tmp_path_factory.mktemp("modes"))


@pytest.fixture
def bad_files(tmp_path) -> dict[str, Path]:
    """kind -> path of an undecodable file: empty, truncated, corrupt, not_image, bomb."""
    return write_bad_files(tmp_path / "bad")


def write_labelled_folder(root: Path, classes: int = 4, domains: tuple[str, ...] = ("photo", "sketch", "render"),
                          size: int = 40) -> Path:
    """root/<class>/<domain>_<i>.png; images of one class share a base picture. Returns root."""
    for c in range(classes):
        base = photo(size, size, seed=100 + c).astype(np.int16)
        for d, dom in enumerate(domains):
            noise = np.random.default_rng(1000 * c + d).integers(-25, 26, base.shape)
            img = np.clip(base + noise, 0, 255).astype(np.uint8)
            (root / f"class{c}").mkdir(parents=True, exist_ok=True)
            Image.fromarray(img).save(root / f"class{c}" / f"{dom}_{d}.png")
    return root


@pytest.fixture(scope="session")
def labelled_folder(tmp_path_factory) -> Path:
    """A folder of 4 classes x 3 domains (12 PNGs), label = sub-folder."""
    return write_labelled_folder(tmp_path_factory.mktemp("labelled") / "imgs")


@pytest.fixture
def tiny_embedder():
    """A factory of tiny random-initialised embedders (timm test_efficientnet, 32 px, 8-d): milliseconds per batch."""
    from guie.models import create_embedder

    def make(embed_dim: int | None = 8, image_size: int = 32, seed: int = 0, **kw):
        return create_embedder("timm:test_efficientnet", embed_dim=embed_dim, pretrained=False,
                               image_size=image_size, seed=seed, **kw).eval()

    return make


@pytest.fixture(scope="session")
def emoji_manifest() -> Path:
    """The built emoji benchmark manifest when this machine has it (`guie data emoji`); tests using it skip elsewhere
    (a fresh CI machine)."""
    if not EMOJI_MANIFEST.is_file():
        pytest.skip(f"emoji benchmark not built at {EMOJI_MANIFEST}")
    return EMOJI_MANIFEST
