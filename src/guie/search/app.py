"""The search service: a FastAPI app over a named index and the model that built it, with a web page at /.

    GET    /                       the search page (plain HTML/JS from guie/search/static, no build step, offline)
    GET    /health                 liveness; with read access also the index's size, dim, backend, queue
    POST   /search                 multipart: `files` (images) or `item` (an indexed id), `k`, `where` (col=value)
    GET    /items/{id}             an item's metadata (never its file path)
    GET    /items/{id}/thumbnail   a small WebP of the item, read from the image root
    POST   /items                  add uploaded images (write access)
    DELETE /items/{id}             remove an item (write access)

Safe by default (`ServerSettings`): writes always need the API key; reads need it too unless the server is bound to
127.0.0.1; uploads are capped in bytes (the request body is counted as it arrives), files per request and decoded
pixels; a bounded queue answers a burst with 503 instead of swapping; client file names are never echoed; CORS is
off unless origins are given. Query images are embedded by a `DynamicBatcher`: concurrent requests share forwards.
(No `from __future__ import annotations` here: FastAPI reads the endpoint annotations at run time.)
"""
import asyncio
import hmac
import io
import json
import re
import threading
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Protocol

from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from ..data.dedup import bytes_digest
from ..embedding.batching import Overloaded
from ..imaging.io import ImageLoadError, load_image
from .image_index import UPLOADS, ImageIndex, SearchIndexError
from .store import NewItem, parse_where

LOOPBACK = ("127.0.0.1", "localhost", "::1")
HIDDEN_FIELDS = ("id", "path", "label", "content_hash", "added_seq")


class QueryEncoder(Protocol):
    """What the server needs from the model: its preprocessing and a batched, queued forward."""

    fingerprint: str

    def transform(self, image) -> "object":
        """PIL image -> the model's uint8 [3, S, S] input."""

    def expect(self) -> "object":
        """A context manager announcing a request still being received; it yields the ticket for `submit`."""

    def submit(self, images, prepare=None, finish=None, ticket=None) -> Future:
        """Queue uint8 [n, 3, S, S] images; the Future resolves to float32 [n, d]. Raises Overloaded when full.
        With `prepare`, `images` is a count and `prepare()` makes the images in the encoder's worker; with
        `finish`, the Future resolves to `finish(embeddings)` run there (`DynamicBatcher.submit`); `ticket` from
        `expect` when the request was announced."""


@dataclass
class ServerSettings:
    """Limits and access rules; the defaults are the safe ones."""

    api_key: str | None = None
    host: str = "127.0.0.1"
    max_upload_bytes: int = 8 * 2**20      # per image
    max_files: int = 8                     # images per request
    max_pixels: int = 40_000_000           # decoded pixels per image (decompression bombs)
    max_k: int = 100
    max_inflight: int = 64                 # requests being decoded/embedded at once; more get 503
    thumbnail_px: int = 160
    thumbnail_cache: int = 1024
    cors_origins: list = field(default_factory=list)

    @property
    def keyed_reads(self) -> bool:
        """Reads need the key unless the server listens on loopback only."""
        return self.host not in LOOPBACK

    def check(self) -> None:
        """Refuse to expose an index without a key."""
        if self.keyed_reads and not self.api_key:
            raise ValueError(f"listening on {self.host} needs an API key (--api-key or GUIE_API_KEY): "
                             "only 127.0.0.1 may be served without one")
        if self.api_key is not None and len(self.api_key) < 8:
            raise ValueError("the API key must be at least 8 characters")


def safe_name(name: str | None, position: int) -> str:
    """A client's file name reduced to a harmless label: `upload 2 (cat_photo.jpg)`; never echoed raw."""
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(name or "").name)[:48].strip("._")
    return f"upload {position}" + (f" ({stem})" if stem else "")


class _BodyTooLarge(Exception):
    pass


class BodyLimit:
    """ASGI middleware: 413 when a request body (declared or streamed) exceeds `limit` bytes, before parsing."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, int(limit)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.limit):
            return await _plain_413(send, self.limit)
        received, started = 0, False

        async def counting_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    raise _BodyTooLarge()
            return message

        async def tracking_send(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except _BodyTooLarge:
            if not started:
                await _plain_413(send, self.limit)


SECURITY_HEADERS = [(b"x-content-type-options", b"nosniff"), (b"referrer-policy", b"no-referrer"),
                    (b"content-security-policy",
                     b"default-src 'self'; img-src 'self' blob: data:; frame-ancestors 'none'")]


class SecurityHeaders:
    """ASGI middleware adding `SECURITY_HEADERS` to every response (plain ASGI: Starlette's `BaseHTTPMiddleware`
    runs each request through an extra task and stream, a measurable share of a small request's CPU)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *SECURITY_HEADERS]}
            await send(message)

        await self.app(scope, receive, send_with_headers)


async def _plain_413(send, limit: int) -> None:
    body = json.dumps({"detail": f"request body larger than {limit:,} bytes"}).encode()
    await send({"type": "http.response.start", "status": 413,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


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


def create_app(index: ImageIndex, encoder: QueryEncoder, settings: ServerSettings | None = None,
               on_close: Callable[[], None] | None = None) -> FastAPI:
    """The search app over an open `index`, embedding queries with `encoder` (the index's model: its fingerprint
    is checked here)."""
    settings = settings or ServerSettings()
    settings.check()
    index.check_model(encoder.fingerprint)
    thumbs = Thumbnails(index, settings.thumbnail_px, settings.thumbnail_cache)
    inflight = {"n": 0}
    app = FastAPI(title="guie image search", version="2", docs_url=None, redoc_url=None)
    if on_close is not None:
        app.router.on_shutdown.append(on_close)
    app.add_middleware(BodyLimit, limit=settings.max_files * settings.max_upload_bytes + 64 * 1024)
    if settings.cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(settings.cors_origins), allow_methods=["GET", "POST",
                           "DELETE"], allow_headers=["X-API-Key", "Authorization"])

    app.add_middleware(SecurityHeaders)

    def presented_key(request: Request) -> str | None:
        key = request.headers.get("x-api-key")
        auth = request.headers.get("authorization", "")
        if key is None and auth.lower().startswith("bearer "):
            key = auth[7:].strip()
        return key

    def key_ok(request: Request) -> bool:
        key = presented_key(request)
        return bool(settings.api_key) and key is not None and hmac.compare_digest(key.encode(),
                                                                                  settings.api_key.encode())

    def require_read(request: Request) -> None:
        if settings.keyed_reads and not key_ok(request):
            raise HTTPException(401, "an API key is required (header X-API-Key)")

    def require_write(request: Request) -> None:
        if not settings.api_key:
            raise HTTPException(403, "writes are disabled: start the server with --api-key (or GUIE_API_KEY)")
        if not key_ok(request):
            raise HTTPException(401, "an API key is required for writes (header X-API-Key)")

    class Admission:
        """A slot among `max_inflight` requests doing real work; 503 when none is free."""

        def __enter__(self):
            if inflight["n"] >= settings.max_inflight:
                raise HTTPException(503, "busy: too many requests in flight; retry shortly",
                                    headers={"Retry-After": "1"})
            inflight["n"] += 1

        def __exit__(self, *exc):
            inflight["n"] -= 1

    async def read_uploads(form, field_name: str = "files") -> list[tuple[str, bytes]]:
        uploads = [f for f in form.getlist(field_name) if hasattr(f, "read")]
        if len(uploads) > settings.max_files:
            raise HTTPException(413, f"{len(uploads)} files; at most {settings.max_files} per request")
        out = []
        for i, f in enumerate(uploads, 1):
            name = safe_name(getattr(f, "filename", None), i)
            data = await f.read(settings.max_upload_bytes + 1)
            if len(data) > settings.max_upload_bytes:
                raise HTTPException(413, f"{name}: larger than {settings.max_upload_bytes:,} bytes")
            if not data:
                raise HTTPException(400, f"{name}: empty upload")
            out.append((name, data))
        return out

    def decode(uploads: list[tuple[str, bytes]]):
        from ..pipeline.datasets import stack_images, transform_file

        pixels, formats = [], []
        for name, data in uploads:
            try:
                pixels.append(transform_file(encoder.transform, io.BytesIO(data), max_pixels=settings.max_pixels))
            except ImageLoadError as e:
                raise HTTPException(400, f"{name}: {e.reason}") from None
            formats.append(_image_format(data))
        return stack_images(pixels), formats

    async def embed(images, prepare=None, finish=None, ticket=None):
        try:
            future = encoder.submit(images, prepare, finish, ticket)
        except Overloaded as e:
            raise HTTPException(503, str(e), headers={"Retry-After": "1"}) from None
        return await asyncio.wrap_future(future)

    def hit_json(hit) -> dict:
        meta = {k: v for k, v in hit.item.items() if k not in HIDDEN_FIELDS}
        return {"id": hit.id, "distance": round(hit.distance, 6), "label": hit.item.get("label"),
                "metadata": meta, "thumbnail": f"items/{hit.id}/thumbnail"}

    def form_int(form, name: str, default: int, lo: int, hi: int) -> int:
        raw = form.get(name)
        if raw is None or raw == "":
            return default
        try:
            value = int(str(raw))
        except ValueError:
            raise HTTPException(422, f"{name} must be an integer") from None
        if not lo <= value <= hi:
            raise HTTPException(422, f"{name} must be between {lo} and {hi}")
        return value

    @app.get("/", include_in_schema=False)
    def page():
        """The search page."""
        return HTMLResponse(_static("index.html"))

    @app.get("/static/{name}", include_in_schema=False)
    def static(name: str):
        """The page's script and style sheet."""
        kinds = {"app.js": "text/javascript", "style.css": "text/css"}
        if name not in kinds:
            raise HTTPException(404, "no such file")
        return Response(_static(name), media_type=kinds[name], headers={"Cache-Control": "no-cache"})

    @app.get("/health")
    def health(request: Request):
        """Liveness; the index's figures for callers with read access."""
        if settings.keyed_reads and not key_ok(request):
            return {"status": "ok"}
        return {"status": "ok", "index": index.name, "items": len(index), "dim": index.dim,
                "backend": index.header.get("backend"), "seq": index.seq, "writes": bool(settings.api_key),
                "batching": getattr(encoder, "stats", None)}

    @app.post("/search")
    async def search(request: Request):
        """Nearest indexed images of each uploaded image (`files`) or of an indexed item (`item`)."""
        require_read(request)
        # Announced to the batcher while the body arrives: a forward being gathered waits for this request.
        with Admission(), encoder.expect() as ticket:
            form = await request.form(max_files=settings.max_files, max_fields=32, max_part_size=64 * 1024)
            try:
                k = form_int(form, "k", 5, 1, settings.max_k)
                where = parse_where([str(w) for w in form.getlist("where") if str(w).strip()])
            except ValueError as e:
                raise HTTPException(422, str(e)) from None
            uploads = await read_uploads(form)
            item = form.get("item")
            if bool(uploads) == (item is not None):
                raise HTTPException(400, "send image files (field 'files') or one indexed item (field 'item')")

            def answer(vectors, queries) -> bytes:
                index.refresh()
                hits = index.search(vectors, k, where=where)
                return JSONResponse({"index": index.name, "k": k, "results": [
                    {"query": q, "hits": [hit_json(h) for h in row]} for q, row in zip(queries, hits)]}).body

            if item is not None:
                item_id = form_int(form, "item", 0, 0, 2**62)
                _, vectors = await run_in_threadpool(index.vectors, [item_id])
                if not len(vectors):
                    raise HTTPException(404, f"no item {item_id}")
                body = await run_in_threadpool(answer, vectors, [f"item {item_id}"])
            else:
                # Decoded, embedded, searched and encoded as JSON in the encoder's worker: the event loop only
                # parses and answers, and each request crosses threads once.
                queries = [name for name, _ in uploads]
                body = await embed(len(uploads), lambda: decode(uploads)[0], lambda v: answer(v, queries), ticket)
        return Response(body, media_type="application/json")

    def get_item(item_id: int) -> dict:
        item = index.items([item_id]).get(item_id)
        if item is None:
            raise HTTPException(404, f"no item {item_id}")
        return item

    @app.get("/items/{item_id}")
    def item_metadata(item_id: int, request: Request):
        """An item's label and metadata."""
        require_read(request)
        item = get_item(item_id)
        return {"id": item_id, "label": item.get("label"), "added_seq": item.get("added_seq"),
                "metadata": {k: v for k, v in item.items() if k not in HIDDEN_FIELDS},
                "thumbnail": f"items/{item_id}/thumbnail"}

    @app.get("/items/{item_id}/thumbnail")
    def item_thumbnail(item_id: int, request: Request):
        """A WebP thumbnail of the item."""
        require_read(request)
        data = thumbs.get(get_item(item_id))
        if data is None:
            raise HTTPException(404, f"item {item_id} has no readable image file under the image root")
        return Response(data, media_type="image/webp", headers={"Cache-Control": "private, max-age=3600"})

    @app.post("/items")
    async def add_items(request: Request):
        """Add uploaded images (`files`, with optional `label` and `metadata` JSON object); duplicates (same
        content) answer the existing id."""
        require_write(request)
        with Admission():
            form = await request.form(max_files=settings.max_files, max_fields=32, max_part_size=64 * 1024)
            uploads = await read_uploads(form)
            if not uploads:
                raise HTTPException(400, "no image files (field 'files')")
            label = form.get("label")
            try:
                extra = json.loads(str(form.get("metadata") or "{}"))
            except json.JSONDecodeError as e:
                raise HTTPException(422, f"metadata is not JSON: {e.msg}") from None
            if not isinstance(extra, dict) or any(k in HIDDEN_FIELDS for k in extra):
                raise HTTPException(422, f"metadata must be a JSON object without {', '.join(HIDDEN_FIELDS)}")
            images, formats = await run_in_threadpool(decode, uploads)
            vectors = await embed(images)
            hashes = [bytes_digest(data) for _, data in uploads]  # the same identity `guie index add` uses

            def commit():
                folder = index.folder / "uploads"
                folder.mkdir(exist_ok=True)
                items = []
                for (_, data), h, fmt in zip(uploads, hashes, formats):
                    target = folder / f"{h}.{fmt}"
                    if not target.exists():
                        from ..utils import atomic_write_bytes

                        atomic_write_bytes(data, target)
                    items.append(NewItem(h, f"{UPLOADS}{h}.{fmt}", None if label is None else str(label),
                                         {"source": "upload", **extra}))
                result = index.add(vectors, items, op="add (http)")
                existing = index.ids_for_hashes(hashes)
                return result, existing

            try:
                result, existing = await run_in_threadpool(commit)
            except SearchIndexError as e:
                raise HTTPException(400, str(e)) from None
        return {"seq": result.seq, "items": [
            {"query": name, "id": int(existing.get(h, -1)), "duplicate": bool(i < 0)}
            for (name, _), h, i in zip(uploads, hashes, result.ids)]}

    @app.delete("/items/{item_id}")
    def delete_item(item_id: int, request: Request):
        """Remove an item from the index."""
        require_write(request)
        seq, removed = index.remove([item_id], op="remove (http)")
        if not len(removed):
            raise HTTPException(404, f"no item {item_id}")
        return {"seq": seq, "removed": [int(i) for i in removed]}

    @app.exception_handler(SearchIndexError)
    async def index_error(request: Request, exc: SearchIndexError):
        return JSONResponse({"detail": str(exc)}, status_code=400)

    return app


def _image_format(data: bytes) -> str:
    """The file extension for stored uploads, from the bytes (never from the client's name)."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            fmt = (im.format or "img").lower()
    except Exception:  # noqa: BLE001 - decoded fine a moment ago; the extension is cosmetic
        fmt = "img"
    return {"jpeg": "jpg"}.get(fmt, fmt)


def _static(name: str) -> bytes:
    return resources.files("guie.search").joinpath("static", name).read_bytes()
