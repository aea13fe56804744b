"""`guie.client.Client`: the Python client of `guie serve` (what clip-retrieval's ClipClient is to its service).

    from guie.client import Client

    with Client("http://127.0.0.1:8000", api_key=KEY) as c:
        page = c.search(["photo.jpg"], k=10, max_distance=0.9)[0]      # hits of the first query, nearest first
        more = c.search(["photo.jpg"], k=10, offset=10)[0]              # the next page
        c.search(ids=[42], where=["vendor=apple"])                     # search from an indexed item
        new = c.add(["a.png", "b.png"], label="cat", metadata={"source": "scan"})
        c.item(new[0]["id"]); c.remove(new[0]["id"]); c.stats(); c.duplicates(max_distance=0.15)

Every call has a timeout (`timeout`, seconds); a 503 (the server's queue is full) is retried up to `retries` times
after the server's `Retry-After` (capped at `max_wait` seconds), and so is a connection refused (a server
restarting). Any other refusal raises `ClientError` with the server's one-line reason and the HTTP status.
Images are file paths, bytes, or PIL images (sent as PNG).
"""
from __future__ import annotations

import email.utils
import io
import json
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from .errors import GuieError

RETRY_STATUSES = (503,)


class ClientError(GuieError):
    """The server refused a request or could not be reached; `status` is the HTTP status (None: no answer)."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


def retry_after_seconds(value: str | None, default: float = 1.0) -> float:
    """A Retry-After header (seconds, or an HTTP date) as seconds to wait from now."""
    if not value:
        return default
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return default
    return max(0.0, when.timestamp() - time.time())


def _image_part(image, position: int) -> tuple[str, bytes, str]:
    """(file name, bytes, content type) of one image to upload: a path, bytes or a PIL image."""
    if isinstance(image, (bytes, bytearray, memoryview)):
        return f"image-{position}", bytes(image), "application/octet-stream"
    if isinstance(image, (str, Path)):
        path = Path(image)
        try:
            return path.name, path.read_bytes(), "application/octet-stream"
        except OSError as e:
            raise ClientError(f"{path}: cannot be read ({e.strerror})") from None
    if hasattr(image, "save"):  # a PIL image
        buf = io.BytesIO()
        image.save(buf, "PNG")
        return f"image-{position}.png", buf.getvalue(), "image/png"
    raise ClientError(f"image {position}: expected a file path, bytes or a PIL image, got {type(image).__name__}")


class Client:
    """A session with one `guie serve` (see the module docstring)."""

    def __init__(self, url: str, api_key: str | None = None, timeout: float = 30.0, retries: int = 3,
                 max_wait: float = 30.0):
        import httpx

        if retries < 0 or timeout <= 0 or max_wait < 0:
            raise ClientError(f"timeout must be > 0, retries and max_wait >= 0 (got {timeout}, {retries}, "
                              f"{max_wait})")
        self.url = url.rstrip("/") + "/"
        self.retries, self.max_wait = retries, max_wait
        headers = {"X-API-Key": api_key} if api_key else {}
        self._http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout)
        self.retried = 0  # requests sent again after a 503, in this session
        self.reconnects = 0  # ... after a refused connection

    def close(self) -> None:
        """Close the connection pool."""
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- transport ---------------------------------------------------------------------------------------------------
    def _request(self, method: str, path: str, **kwargs):
        import httpx

        for attempt in range(self.retries + 1):
            try:
                r = self._http.request(method, path, **kwargs)
            except httpx.TimeoutException:
                raise ClientError(f"{method} {self.url}{path}: no answer within {self._http.timeout.read} s") from None
            except httpx.ConnectError as e:
                if attempt == self.retries:
                    raise ClientError(f"{self.url}: cannot connect ({e})") from None
                self.reconnects += 1
                time.sleep(min(self.max_wait, 0.5 * 2 ** attempt))
                continue
            if r.status_code in RETRY_STATUSES and attempt < self.retries:
                self.retried += 1
                time.sleep(min(self.max_wait, retry_after_seconds(r.headers.get("retry-after"))))
                continue
            if r.status_code >= 400:
                try:
                    detail = r.json().get("detail", r.text)
                except (ValueError, AttributeError):
                    detail = r.text
                detail = detail if isinstance(detail, str) else json.dumps(detail)
                raise ClientError(f"{method} /{path}: {r.status_code} {detail.strip()[:300]}", r.status_code)
            return r
        raise AssertionError("unreachable")  # the loop returns or raises

    # -- reads -------------------------------------------------------------------------------------------------------
    def search(self, images: Sequence | None = None, ids: Sequence[int] | None = None, k: int = 5,
               where: Sequence[str] | None = None, max_distance: float | None = None,
               offset: int = 0) -> list[dict]:
        """The hits of each query, in order: images (paths, bytes or PIL images; sent together, one request) or
        indexed item ids (one request each). A result is the server's: {query, hits: [{id, distance, label,
        metadata, thumbnail}], more: whether a next page (offset + k) exists}."""
        if ids is not None and images is None:
            return [r for item_id in ids for r in
                    self._search_body(None, [item_id], k, where, max_distance, offset)["results"]]
        return self._search_body(images, ids, k, where, max_distance, offset)["results"]

    def _search_body(self, images, ids, k, where, max_distance, offset) -> dict:
        """One POST /search: the server's whole answer (images together, or the first of `ids`)."""
        if (images is None) == (ids is None):
            raise ClientError("search needs images or ids (one of them)")
        data: dict = {"k": str(k), "offset": str(offset)}
        if max_distance is not None:
            data["max_distance"] = repr(float(max_distance))
        if where:
            data["where"] = [str(w) for w in where]
        if images is not None:
            files = [("files", _image_part(im, i)) for i, im in enumerate(images, 1)]
            if not files:
                raise ClientError("search needs at least one image")
            return self._request("POST", "search", data=data, files=files).json()
        return self._request("POST", "search", data={**data, "item": str(int(ids[0]))}).json()

    def pages(self, images: Sequence | None = None, ids: Sequence[int] | None = None, k: int = 20,
              where: Sequence[str] | None = None, max_distance: float | None = None,
              limit: int | None = None) -> Iterator[dict]:
        """Every hit of one query (one image or one id), page after page (k per request), until the server says
        there is no more (the end of the index, the cut-off, or its paging depth) or `limit` hits."""
        offset, seen, depth = 0, 0, None
        while True:
            page = k if depth is None else min(k, depth - offset)  # the last page stops at the server's depth
            body = self._search_body(images, ids, page, where, max_distance, offset)
            depth = body.get("max_depth")
            result = body["results"][0]
            for hit in result["hits"]:
                if limit is not None and seen >= limit:
                    return
                seen += 1
                yield hit
            if not result.get("more"):
                return
            offset += page

    def item(self, item_id: int) -> dict:
        """An item's label and metadata."""
        return self._request("GET", f"items/{int(item_id)}").json()

    def thumbnail(self, item_id: int) -> bytes:
        """An item's WebP thumbnail."""
        return self._request("GET", f"items/{int(item_id)}/thumbnail").content

    def stats(self) -> dict:
        """The index's name, size, dimension, backend, commit and the batcher's counters (GET /health with the
        key)."""
        return self._request("GET", "health").json()

    def duplicates(self, max_distance: float | None = None, limit: int = 100, linkage: str = "star") -> dict:
        """Groups of near-identical items (GET /duplicates; `linkage` as `ImageIndex.duplicate_groups`)."""
        params = {"limit": str(limit), "linkage": linkage}
        if max_distance is not None:
            params["max_distance"] = repr(float(max_distance))
        return self._request("GET", "duplicates", params=params).json()

    def metrics(self) -> str:
        """The server's Prometheus metrics (text format)."""
        return self._request("GET", "metrics").text

    # -- writes ------------------------------------------------------------------------------------------------------
    def add(self, images: Sequence, label: str | None = None, metadata: dict | None = None) -> list[dict]:
        """Add images (the server's max_files per request at most); one {query, id, duplicate} per image (an image
        indexed already answers its existing id)."""
        files = [("files", _image_part(im, i)) for i, im in enumerate(images, 1)]
        if not files:
            raise ClientError("add needs at least one image")
        data = {}
        if label is not None:
            data["label"] = str(label)
        if metadata:
            data["metadata"] = json.dumps(metadata)
        return self._request("POST", "items", data=data, files=files).json()["items"]

    def remove(self, item_id: int) -> dict:
        """Remove an item: {seq, removed: [id]}."""
        return self._request("DELETE", f"items/{int(item_id)}").json()


__all__ = ["Client", "ClientError", "retry_after_seconds"]
