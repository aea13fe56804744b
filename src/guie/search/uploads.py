"""What the search service keeps of an upload: a harmless label for its file name, its metadata as stored
values, its format for the stored file's name, and thumbnails of indexed images."""
from __future__ import annotations

import io
import json
import re
import threading
from collections import OrderedDict
from pathlib import Path

from fastapi import HTTPException

from ..imaging.io import ImageLoadError, load_image
from .image_index import ImageIndex

HIDDEN_FIELDS = ("id", "path", "label", "content_hash", "added_seq")
MAX_METADATA_DEPTH = 8  # nesting of a POST /items metadata object (its nested values are stored as JSON text)


def safe_name(name: str | None, position: int) -> str:
    """A client's file name reduced to a harmless label: `upload 2 (cat_photo.jpg)`; never echoed raw."""
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(name or "").name)[:48].strip("._")
    return f"upload {position}" + (f" ({stem})" if stem else "")


def parse_metadata(raw: str) -> dict:
    """A POST /items `metadata` field -> the item's extra columns; nested values are kept as JSON text (never a
    Python repr). 422 for anything but a JSON object of bounded depth without the reserved names."""
    try:
        extra = json.loads(raw)
    except json.JSONDecodeError as e:
        raise HTTPException(422, f"metadata is not JSON: {e.msg}") from None
    except RecursionError:
        raise HTTPException(422, f"metadata nests deeper than {MAX_METADATA_DEPTH} levels") from None
    if not isinstance(extra, dict) or any(k in HIDDEN_FIELDS for k in extra):
        raise HTTPException(422, f"metadata must be a JSON object without {', '.join(HIDDEN_FIELDS)}")
    level, depth = list(extra.values()), 1
    while level:  # breadth first: no recursion on client input
        depth += 1
        if depth > MAX_METADATA_DEPTH:
            raise HTTPException(422, f"metadata nests deeper than {MAX_METADATA_DEPTH} levels")
        level = [v for x in level if isinstance(x, (dict, list)) for v in (x.values() if isinstance(x, dict) else x)]
    return {k: json.dumps(v, separators=(",", ":")) if isinstance(v, (dict, list)) else v for k, v in extra.items()}


def image_format(data: bytes) -> str:
    """The file extension for stored uploads, from the bytes (never from the client's name)."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            fmt = (im.format or "img").lower()
    except Exception:  # noqa: BLE001 - decoded fine a moment ago; the extension is cosmetic
        fmt = "img"
    return {"jpeg": "jpg"}.get(fmt, fmt)


class Thumbnails:
    """Small WebP renderings of indexed images, from the image root (or the index's uploads), LRU-cached."""

    def __init__(self, index: ImageIndex, size: int, capacity: int):
        self.index, self.size, self.capacity = index, size, capacity
        self._cache: OrderedDict = OrderedDict()
        self._lock = threading.Lock()

    def get(self, item: dict) -> bytes | None:
        """The thumbnail of an item (WebP bytes), or None when it has no readable image file."""
        key = (item["id"], item.get("content_hash"))
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
        path = self.index.item_file(item)
        if path is None:
            return None
        try:
            im = load_image(path, draft_size=self.size)
        except ImageLoadError:
            return None
        im.thumbnail((self.size, self.size))
        buf = io.BytesIO()
        im.save(buf, "WEBP", quality=80)
        data = buf.getvalue()
        with self._lock:
            self._cache[key] = data
            while len(self._cache) > self.capacity:
                self._cache.popitem(last=False)
        return data
