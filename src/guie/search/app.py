"""The search service: a FastAPI app over a named index and the model that built it, with a web page at /.

    GET    /                       the search page (plain HTML/JS from guie/search/static, no build step, offline)
    GET    /health                 liveness; with read access also the index's size, dim, backend, queue
    POST   /search                 multipart: `files` (images) or `item` (an indexed id), `k` (or `limit`), `offset`,
                                   `max_distance`, `where` (col=value)
    GET    /duplicates             groups of near-identical items (`max_distance`, `limit` groups)
    GET    /metrics                Prometheus text format (read access)
    GET    /items/{id}             an item's metadata (never its file path)
    GET    /items/{id}/thumbnail   a small WebP of the item, read from the image root
    POST   /items                  add uploaded images (write access)
    DELETE /items/{id}             remove an item and the uploaded bytes it was stored from (write access)
    GET    /openapi.json           the API's schema (read access)

Safe by default (`ServerSettings`): who may read and write is `guie.search.auth`'s access model (a key that is set
is needed for every read and write; without one, only loopback, reads only, and the Host header checked);
`guie.search.http_limits` bounds request bodies (size, a minimum rate, a pool of their own), and
`guie.search.decode_limits` the decoding a request and a client may cause; files per request and decoded pixels
are capped; a bounded queue answers a burst with 503 instead of swapping; client file names are never echoed; CORS
is off unless origins are given. Query images are embedded by a `DynamicBatcher`: concurrent requests share
forwards.
(No `from __future__ import annotations` here: FastAPI reads the endpoint annotations at run time.)
"""
import asyncio
import io
import re
import threading
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from importlib import resources
from typing import Protocol

from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..data.dedup import bytes_digest
from ..embedding.batching import Overloaded
from ..errors import InputError
from ..imaging.io import ImageLoadError
from .auth import MIN_KEY_CHARS, host_header_names, is_loopback, key_matches, presented_key
from .decode_limits import DecodeLane, DecodeRefused, decode_cost
from .http_limits import BodyGuard, SecurityHeaders
from .image_index import LINKAGES, UPLOADS, ImageIndex, SearchIndexError, check_max_distance
from .store import NewItem, parse_where
from .uploads import HIDDEN_FIELDS, Thumbnails, image_format, parse_metadata, safe_name

_HOST_NAME = re.compile(r"^(\*\.)?[a-z0-9_.-]+$|^\[[0-9a-f:.]+\]$|^[0-9a-f:.]+$", re.IGNORECASE)


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
    port: int | None = None                # checked when given (the app itself does not listen)
    allowed_hosts: list = field(default_factory=list)  # Host header names accepted besides the loopback ones
    max_upload_bytes: int = 8 * 2**20      # per image
    max_files: int = 8                     # images per request
    max_pixels: int = 40_000_000           # declared pixels per image (decompression bombs)
    max_query_pixels: int = 16_000_000     # decoded pixels per query image (after JPEG's reduced-scale decode)
    max_request_pixels: int = 64_000_000   # decoded pixels per search request, all its images together
    heavy_pixels: int = 4_000_000          # a request decoding more goes through the one-thread heavy lane
    heavy_per_client: int = 2              # heavy requests admitted at once per client address
    heavy_queue: int = 8                   # heavy requests admitted at once in all
    refusal_delay_s: float = 1.0           # a refusal of decode work (413/429/503) is answered after this pause
    max_k: int = 100                       # results per page (k / limit)
    max_depth: int = 1000                  # offset + limit: how deep paging may reach (the work of one request)
    max_groups: int = 1000                 # duplicate groups per answer
    max_inflight: int = 64                 # requests being decoded/embedded at once; more get 503
    max_readers: int = 256                 # request bodies arriving at once; more get 503
    body_grace_s: float = 5.0              # a body must arrive within grace + size / min rate
    body_min_rate: float = 32 * 1024       # bytes/s
    thumbnail_px: int = 160
    thumbnail_cache: int = 1024
    cors_origins: list = field(default_factory=list)

    @property
    def keyed_reads(self) -> bool:
        """Reads need the key when one is set, and always off loopback (where one must be set)."""
        return self.api_key is not None or not is_loopback(self.host)

    @property
    def host_names(self) -> list[str] | None:
        """The Host header names accepted, or None when any is (a keyed server on a public interface without
        `allowed_hosts`: clients reach it under names it cannot know, and the key guards it)."""
        if is_loopback(self.host) or self.allowed_hosts:
            return host_header_names(self.host, self.allowed_hosts)
        return None

    def check(self) -> None:
        """Refuse settings that would expose the index or not do what they say (one-line InputError)."""
        if not is_loopback(self.host) and not self.api_key:
            raise InputError(f"listening on {self.host} needs an API key (a key file or GUIE_API_KEY): only "
                             "loopback (127.0.0.1, ::1, localhost) may be served without one")
        if self.api_key is not None and len(self.api_key) < MIN_KEY_CHARS:
            raise InputError(f"the API key must be at least {MIN_KEY_CHARS} characters")
        if self.max_depth < self.max_k:
            raise InputError(f"max_depth ({self.max_depth}) must be at least max_k ({self.max_k})")
        if self.port is not None and not 1 <= self.port <= 65535:
            raise InputError(f"port {self.port} is not a TCP port (1-65535)")
        bad = [h for h in self.allowed_hosts if not _HOST_NAME.match(h.strip())]
        if bad:
            raise InputError(f"allowed host {bad[0]!r} is not a host name or address (a leading '*.' matches "
                             "subdomains)")


def create_app(index: ImageIndex, encoder: QueryEncoder, settings: ServerSettings | None = None,
               on_close: Callable[[], None] | None = None) -> FastAPI:
    """The search app over an open `index`, embedding queries with `encoder` (the index's model: its fingerprint
    is checked here)."""
    settings = settings or ServerSettings()
    settings.check()
    index.check_model(encoder.fingerprint)
    thumbs = Thumbnails(index, settings.thumbnail_px, settings.thumbnail_cache)
    lane = DecodeLane(settings.heavy_pixels, settings.heavy_per_client, settings.heavy_queue)
    draft = _draft_size(encoder)
    inflight = {"n": 0}
    uploads_lock = threading.Lock()  # an upload's bytes are written and deleted together with its item
    app = FastAPI(title="guie image search", version="2", docs_url=None, redoc_url=None, openapi_url=None)
    app.router.on_shutdown.append(lane.close)
    if on_close is not None:
        app.router.on_shutdown.append(on_close)
    app.add_middleware(BodyGuard, limit=settings.max_files * settings.max_upload_bytes + 64 * 1024,
                       grace_s=settings.body_grace_s, min_rate=settings.body_min_rate, max_readers=settings.max_readers)
    if settings.cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(settings.cors_origins), allow_methods=["GET", "POST",
                           "DELETE"], allow_headers=["X-API-Key", "Authorization"])
    if settings.host_names is not None:
        from starlette.middleware.trustedhost import TrustedHostMiddleware

        app.add_middleware(TrustedHostMiddleware, allowed_hosts=settings.host_names, www_redirect=False)
    app.add_middleware(SecurityHeaders)
    from .service_metrics import ServiceMetrics

    metrics = ServiceMetrics(index, encoder, inflight)
    app.add_middleware(metrics.middleware)  # outermost: every answer is counted, refusals of the layers inside too

    def key_ok(request: Request) -> bool:
        return key_matches(settings.api_key, presented_key(request.headers))

    def require_read(request: Request) -> None:
        if settings.keyed_reads and not key_ok(request):
            raise HTTPException(401, "an API key is required (header X-API-Key)")

    def require_write(request: Request) -> None:
        if not settings.api_key:
            raise HTTPException(403, "writes are disabled: start the server with an API key (a key file or "
                                     "GUIE_API_KEY)")
        if not key_ok(request):
            raise HTTPException(401, "an API key is required for writes (header X-API-Key)")

    class Admission:
        """A slot among `max_inflight` requests doing real work (taken once the body has arrived); 503 when none
        is free."""

        def __enter__(self):
            if inflight["n"] >= settings.max_inflight:
                raise HTTPException(503, "busy: too many requests in flight; retry shortly",
                                    headers={"Retry-After": "1"})
            inflight["n"] += 1

        def __exit__(self, *exc):
            inflight["n"] -= 1

    async def read_form(request: Request):
        try:
            return await request.form(max_files=settings.max_files, max_fields=32, max_part_size=64 * 1024)
        except StarletteHTTPException as e:  # Starlette's multipart limits answer 400; too many files is a size limit
            if "Too many files" in str(e.detail):
                raise HTTPException(413, f"Too many files: at most {settings.max_files} per request") from None
            raise

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

    def decode_work(uploads: list[tuple[str, bytes]], query: bool) -> int:
        """The pixels decoding `uploads` will produce; 413 past the query caps (searches only)."""
        costs = [decode_cost(data, draft) for _, data in uploads]
        if query:
            for (name, _), cost in zip(uploads, costs):
                if cost > settings.max_query_pixels:
                    raise DecodeRefused(413, f"{name}: decodes to {cost:,} pixels, over the "
                                             f"{settings.max_query_pixels:,} a query image may have (send it smaller)")
            if sum(costs) > settings.max_request_pixels:
                raise DecodeRefused(413, f"these {len(uploads)} images decode to {sum(costs):,} pixels, over the "
                                         f"{settings.max_request_pixels:,} one search may decode (send fewer)")
        return sum(costs)

    def decode(uploads: list[tuple[str, bytes]]):
        from ..pipeline.datasets import stack_images, transform_file

        pixels, formats = [], []
        for name, data in uploads:
            try:
                pixels.append(transform_file(encoder.transform, io.BytesIO(data), max_pixels=settings.max_pixels))
            except ImageLoadError as e:
                raise HTTPException(400, f"{name}: {e.reason}") from None
            formats.append(image_format(data))
        return stack_images(pixels), formats

    async def embed(images, prepare=None, finish=None, ticket=None):
        try:
            future = encoder.submit(images, prepare, finish, ticket)
        except Overloaded as e:
            raise HTTPException(503, str(e), headers={"Retry-After": "1"}) from None
        return await asyncio.wrap_future(future)

    async def embed_uploads(request: Request, uploads, query: bool, finish=None, ticket=None):
        """Embed uploads (and `finish` in the batcher's worker); a heavy request is decoded in the lane first.
        Returns (finish(embeddings) or embeddings, formats)."""
        work = decode_work(uploads, query)
        if not lane.is_heavy(work):
            if finish is None:
                images, formats = await run_in_threadpool(decode, uploads)
                return await embed(images, ticket=ticket), formats
            return await embed(len(uploads), lambda: decode(uploads)[0], finish, ticket), None
        with lane.admit(request.client.host if request.client else "?"):
            images, formats = await lane.run(lambda: decode(uploads))
        return await embed(images, finish=finish, ticket=ticket), formats

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

    def form_distance(form) -> float | None:
        raw = form.get("max_distance")
        if raw is None or str(raw).strip() == "":
            return None
        try:
            return check_max_distance(str(raw))
        except SearchIndexError as e:
            raise HTTPException(422, str(e)) from None

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

    @app.get("/openapi.json", include_in_schema=False)
    def openapi(request: Request):
        """The API's OpenAPI schema (read access: it names the index's endpoints and limits)."""
        require_read(request)
        return app.openapi()

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
        # Announced to the batcher while the body arrives: a forward being gathered waits (at most its wait time)
        # for this request. The in-flight slot is taken only once the body is here (`BodyGuard` bounds that).
        with encoder.expect() as ticket:
            form = await read_form(request)
            with Admission():
                try:
                    if form.get("k") not in (None, "") and form.get("limit") not in (None, ""):
                        raise HTTPException(422, "send k or limit, not both (they are the same: results per page)")
                    k = form_int(form, "limit" if form.get("limit") not in (None, "") else "k", 5, 1, settings.max_k)
                    offset = form_int(form, "offset", 0, 0, settings.max_depth)
                    if offset + k > settings.max_depth:
                        raise HTTPException(422, f"offset + k is {offset + k}; this server pages at most "
                                                 f"{settings.max_depth} results deep (max_depth)")
                    max_distance = form_distance(form)
                    where = parse_where([str(w) for w in form.getlist("where") if str(w).strip()])
                except ValueError as e:
                    raise HTTPException(422, str(e)) from None
                uploads = await read_uploads(form)
                item = form.get("item")
                if bool(uploads) == (item is not None):
                    raise HTTPException(400, "send image files (field 'files') or one indexed item (field 'item')")
                metrics.queries.observe(len(uploads) or 1)

                def answer(vectors, queries) -> bytes:
                    index.refresh()
                    # one more than asked: whether a next page exists (within max_depth)
                    hits = index.search(vectors, k + 1, where=where, max_distance=max_distance, offset=offset)
                    return JSONResponse({"index": index.name, "seq": index.seq, "k": k, "offset": offset,
                                         "max_distance": max_distance, "max_depth": settings.max_depth, "results": [
                        {"query": q, "hits": [hit_json(h) for h in row[:k]],
                         "more": len(row) > k and offset + k < settings.max_depth}
                        for q, row in zip(queries, hits)]}).body

                if item is not None:
                    if not str(item).strip():
                        raise HTTPException(400, "item is empty: send an indexed item's id")
                    item_id = form_int(form, "item", 0, 0, 2**62)
                    _, vectors = await run_in_threadpool(index.vectors, [item_id])
                    if not len(vectors):
                        raise HTTPException(404, f"no item {item_id}")
                    body = await run_in_threadpool(answer, vectors, [f"item {item_id}"])
                else:
                    # Decoded, embedded, searched and encoded as JSON in the encoder's worker: the event loop only
                    # parses and answers, and each request crosses threads once.
                    queries = [name for name, _ in uploads]
                    body, _ = await embed_uploads(request, uploads, True, lambda v: answer(v, queries), ticket)
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
        form = await read_form(request)
        with Admission():
            uploads = await read_uploads(form)
            if not uploads:
                raise HTTPException(400, "no image files (field 'files')")
            label = form.get("label")
            extra = parse_metadata(str(form.get("metadata") or "{}"))
            vectors, formats = await embed_uploads(request, uploads, False)
            hashes = [bytes_digest(data) for _, data in uploads]  # the same identity `guie index add` uses

            def commit():
                from ..utils import atomic_write_bytes

                folder = index.folder / "uploads"
                folder.mkdir(exist_ok=True)
                with uploads_lock:
                    known = index.ids_for_hashes(hashes)
                    items = []
                    for (_, data), h, fmt in zip(uploads, hashes, formats):
                        target = folder / f"{h}.{fmt}"
                        if h not in known and not target.exists():  # a duplicate keeps its own file, if any
                            atomic_write_bytes(data, target)
                        items.append(NewItem(h, f"{UPLOADS}{h}.{fmt}", None if label is None else str(label),
                                             {"source": "upload", **extra}))
                    result = index.add(vectors, items, op="add (http)")
                    return result, index.ids_for_hashes(hashes)

            try:
                result, existing = await run_in_threadpool(commit)
            except SearchIndexError as e:
                raise HTTPException(400, str(e)) from None
        return {"seq": result.seq, "items": [
            {"query": name, "id": int(existing.get(h, -1)), "duplicate": bool(i < 0)}
            for (name, _), h, i in zip(uploads, hashes, result.ids)]}

    @app.delete("/items/{item_id}")
    def delete_item(item_id: int, request: Request):
        """Remove an item from the index, and the image bytes the server stored when it was uploaded."""
        require_write(request)
        with uploads_lock:
            item = index.items([item_id]).get(item_id)
            if item is None:
                raise HTTPException(404, f"no item {item_id}")
            seq, removed = index.remove([item_id], op="remove (http)")
            stored = index.item_file(item) if str(item.get("path") or "").startswith(UPLOADS) else None
            if stored is not None and not index.ids_for_hashes([item["content_hash"]]):
                stored.unlink(missing_ok=True)
        return {"seq": seq, "removed": [int(i) for i in removed]}

    duplicates_lock = threading.Lock()
    duplicates_cache: dict = {}

    @app.get("/duplicates")
    def duplicates(request: Request, max_distance: str = "", limit: str = "100", linkage: str = "star"):
        """Groups of near-identical items within `max_distance` of each other (largest groups first, at most
        `limit`); computed once per commit and distance, one computation at a time."""
        require_read(request)
        from .image_index import DUPLICATE_DISTANCE

        form = {"max_distance": max_distance or str(DUPLICATE_DISTANCE), "limit": limit}
        distance = form_distance(form)
        top = form_int(form, "limit", 100, 1, settings.max_groups)
        if linkage not in LINKAGES:
            raise HTTPException(422, f"linkage must be one of {', '.join(LINKAGES)}")
        with Admission(), duplicates_lock:
            index.refresh()
            key = (index.seq, distance, linkage)
            if key not in duplicates_cache:
                duplicates_cache.clear()
                duplicates_cache[key] = index.duplicate_groups(distance, linkage=linkage)
            groups = duplicates_cache[key]
        return {"index": index.name, "seq": key[0], "max_distance": distance, "linkage": linkage,
                "groups_total": len(groups),
                "items_in_groups": sum(len(g) for g in groups),
                "groups": [[hit_json(h) for h in g] for g in groups[:top]]}

    @app.get("/metrics", include_in_schema=False)
    def prometheus_metrics(request: Request):
        """Counters, latencies, batching, queue depth and the index's size and commit, in Prometheus text format
        (read access)."""
        require_read(request)
        body, content_type = metrics.exposition()
        return Response(body, media_type=content_type)

    @app.exception_handler(SearchIndexError)
    async def index_error(request: Request, exc: SearchIndexError):
        return JSONResponse({"detail": str(exc)}, status_code=400)

    @app.exception_handler(DecodeRefused)
    async def decode_refused(request: Request, exc: DecodeRefused):
        # Answered after a pause, every slot already released: a client that keeps sending what it is refused
        # (decode-heavy images, back to back) gets through a request a second instead of hundreds.
        await asyncio.sleep(settings.refusal_delay_s)
        return JSONResponse({"detail": str(exc)}, status_code=exc.status, headers={"Retry-After": "1"})

    return app


def _draft_size(encoder) -> int | None:
    """The short side the encoder's transform decodes JPEGs at (None: full size, for decode-cost estimates)."""
    cfg = getattr(encoder.transform, "cfg", None)
    if cfg is None:
        return None
    from ..models.preprocess import draft_size

    return draft_size(cfg)


def _static(name: str) -> bytes:
    return resources.files("guie.search").joinpath("static", name).read_bytes()
