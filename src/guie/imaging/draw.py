"""Pictures people look at: framed thumbnails of image files and grids of search results."""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from PIL import Image, ImageDraw

from .io import ImageLoadError, load_image

GREEN, RED, GREY, BLUE = (30, 160, 60), (210, 40, 40), (150, 150, 150), (70, 110, 200)


def thumbnail(path: str, size: int, border: tuple | None) -> Image.Image:
    """A size x size thumbnail of an image file in a 4-px frame (grey placeholder if it cannot be read)."""
    try:
        im = load_image(path, draft_size=size)
        im.thumbnail((size, size))
    except ImageLoadError:
        im = Image.new("RGB", (size, size), (230, 230, 230))
    cell = Image.new("RGB", (size + 8, size + 8), border or (255, 255, 255))
    inner = Image.new("RGB", (size, size), (255, 255, 255))
    inner.paste(im, ((size - im.width) // 2, (size - im.height) // 2))
    cell.paste(inner, (4, 4))
    return cell


def hits_grid(images: Sequence[str | Path], results: Sequence[Sequence[tuple]], thumb: int = 96) -> Image.Image:
    """One row per query: the query (grey frame), then its results with their distances.

    `results[q]` lists (image file or None, distance, label) per result, nearest first (`guie index search --grid`).
    """
    k = max((len(r) for r in results), default=0)
    cell = thumb + 8
    grid = Image.new("RGB", (cell * (k + 1) + 10, (cell + 14) * len(images)), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for r, (img, row) in enumerate(zip(images, results)):
        y = r * (cell + 14)
        grid.paste(thumbnail(str(img), thumb, GREY), (0, y))
        for j, (path, distance, label) in enumerate(row):
            x = cell * (j + 1) + 10
            grid.paste(thumbnail(str(path or ""), thumb, BLUE), (x, y))
            draw.text((x + 2, y + cell), f"{distance:.3f} {label or ''}"[:20], fill=(0, 0, 0))
    return grid


def picture_format(path: str | Path) -> str:
    """The image format a picture file name asks for (PIL's name, e.g. "PNG"); InputError when its suffix names
    none that PIL writes, so a command can refuse the name before doing any work."""
    from ..errors import InputError

    path = Path(path)
    fmt = Image.registered_extensions().get(path.suffix.lower())
    if fmt is None or fmt not in Image.SAVE:
        raise InputError(f"{path}: name it .png, .jpg or .webp (no image format is written as {path.suffix!r})")
    return fmt


def save_picture(image: Image.Image, path: str | Path) -> Path:
    """Save a picture atomically, creating its folder (format from the suffix, see `picture_format`)."""
    import io

    from ..utils import atomic_write_bytes

    fmt = picture_format(path)
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return atomic_write_bytes(buf.getvalue(), path)
