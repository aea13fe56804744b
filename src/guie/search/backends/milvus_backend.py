"""Milvus through pymilvus: Milvus Lite (a local file, `milvus.db` in the index folder, no server to run) on one
machine, or a Milvus cluster (`uri="http://host:19530"` and a token) when the collection outgrows one machine.

One collection per index: `id` (INT64 primary key = the store's item id), `vector` (FLOAT_VECTOR, L2) and `attrs`
(JSON: the item's metadata as JSON scalars, so `where` filters run inside Milvus, next to the vectors, with the
typed meaning of `guie.search.filters`). Writes are upserts and deletes by id, both idempotent, so replaying a
commit after a crash is safe. Which commit the collection reflects is recorded in the index's store
(`backend_seq`), after Milvus has acknowledged the writes; `backend_layout` records how `attrs` are stored (1: as
text, by guie before typed filters; 2: typed), and an older layout is rebuilt from the store on open.

A Milvus Lite folder whose files Milvus cannot read (a damaged segment, manifest or schema) is moved aside to
`milvus.db.damaged` and rebuilt from the store; a Lite folder another process holds, or a cluster that fails,
gives a one-line error instead.

Milvus Lite accepts HNSW/IVF_PQ index parameters but searches small local collections by brute force; the figures
in docs/search.md say what it does at 1M vectors.
"""
from __future__ import annotations

import functools
import json
import logging
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np

from ..filters import json_scalar, milvus_expression
from .base import BackendError, IdSummary, Neighbours, VectorBackend, register_backend

LITE_FILE = "milvus.db"
LAYOUT = 2  # attrs stored as typed JSON scalars (1: as text)
_LITE_USERS: dict[str, int] = {}  # open backends per Milvus Lite folder in this process (they share one server)
INSERT_BATCH = 10_000
MAX_TOPK = 16_384  # Milvus's limit on k
_INDEX_TYPES = {"flat": ("FLAT", {}), "hnsw": ("HNSW", {"M": 32, "efConstruction": 100}),
                "ivfpq": ("IVF_PQ", {"nlist": 1024, "m": 16, "nbits": 8})}
_SEARCH_PARAMS = {"flat": {}, "hnsw": {"ef": 64}, "ivfpq": {"nprobe": 32}}


def collection_name(index_name: str) -> str:
    """A valid Milvus collection name for an index name (letters, digits and underscores, a letter first)."""
    return "guie_" + re.sub(r"[^A-Za-z0-9_]", "_", index_name)[:200]


def _quiet_milvus_logs() -> None:
    """Milvus Lite's embedded server, pymilvus and gRPC log a traceback for every error they also raise (and one for
    an RPC Milvus Lite does not implement, on every connect); the backend turns the raised ones into its own one-line
    errors, so their logs would only print tracebacks at the user."""
    for name in ("milvus_lite", "pymilvus", "grpc._server"):
        logging.getLogger(name).setLevel(logging.CRITICAL)


def where_expression(where: dict[str, list[str]]) -> str:
    """`{"vendor": ["apple", "google"]}` -> a Milvus filter expression (`guie.search.filters.milvus_expression`)."""
    return milvus_expression(where)


def _milvus_errors(method):
    """Run a backend method with Milvus's errors turned into one line naming the collection and the fix."""
    @functools.wraps(method)
    def run(self, *args, **kwargs):
        from pymilvus.exceptions import MilvusException

        try:
            return method(self, *args, **kwargs)
        except MilvusException as e:
            raise BackendError(f"{self._where()}: {_first_line(e)}; {self._fix()}") from None
    return run


@register_backend
class MilvusBackend(VectorBackend):
    """A Milvus collection (see the module docstring)."""

    name = "milvus"
    kinds = tuple(_INDEX_TYPES)
    filters_natively = True
    layout = LAYOUT

    def __init__(self, folder: Path, dim: int, kind: str = "flat", collection: str = "guie_index",
                 uri: str | None = None, token: str | None = None, synced: int = -1, **unknown):
        if unknown:
            raise BackendError(f"milvus backend: unknown options {sorted(unknown)}")
        if kind not in _INDEX_TYPES:
            raise BackendError(f"milvus backend: unknown kind {kind!r} ({', '.join(_INDEX_TYPES)})")
        try:
            import pymilvus  # noqa: F401
        except ImportError:
            raise BackendError("the milvus backend needs pymilvus and milvus-lite: pip install "
                               "pymilvus milvus-lite") from None
        from pymilvus.exceptions import MilvusException

        self.folder, self.dim, self.kind, self.collection = Path(folder), int(dim), kind, collection
        self.uri = uri or str(self.folder / LITE_FILE)
        self.local = not uri
        if self.local:
            self.folder.mkdir(parents=True, exist_ok=True)
        self._synced = int(synced)
        self._token = token if token is not None else os.environ.get("GUIE_MILVUS_TOKEN", "")
        self.client = self._connect()
        try:
            self._open_collection()
        except MilvusException as e:
            if not self.local or _LITE_USERS.get(self.uri, 0) > 1:  # a cluster, or another user in this process
                raise BackendError(f"{self._where()}: {_first_line(e)}; {self._fix()}") from None
            self.close()  # we held the Lite folder (connected), so no other process has it open: safe to move
            damaged = self.folder / f"{LITE_FILE}.damaged"
            if damaged.is_dir():
                shutil.rmtree(damaged)
            Path(self.uri).replace(damaged)
            self.problem = f"{self.uri}: damaged Milvus Lite data ({_first_line(e)}); moved to {damaged.name}"
            self._synced = -1
            self.client = self._connect()
            self._open_collection()

    @classmethod
    def initial_options(cls, index_name: str, kind: str, uri: str | None) -> dict:
        """kind, the collection's name, and the cluster's uri when not Milvus Lite."""
        return {"kind": kind, "collection": collection_name(index_name), **({"uri": uri} if uri else {})}

    @classmethod
    def from_header(cls, folder: Path, header: dict, store_info: dict, uri: str | None = None,
                    token: str | None = None) -> MilvusBackend:
        """The collection of an index (`uri`/`token` override a stored cluster address); a collection in an older
        layout reports itself unsynced, so the index rebuilds it."""
        options = dict(header.get("backend_options") or {})
        if uri:
            options["uri"] = uri
        synced = int(store_info.get("backend_seq", -1))
        stale = "backend_seq" in store_info and int(store_info.get("backend_layout", 1)) < LAYOUT  # not a new one
        backend = cls(Path(folder), int(header["dim"]), token=token, synced=-1 if stale else synced, **options)
        if stale and backend.problem is None:
            backend.problem = f"{backend._where()}: metadata stored as text by an older guie (filters need it typed)"
        return backend

    def _connect(self):
        from pymilvus import MilvusClient

        from .milvus_local import local_uri

        _quiet_milvus_logs()
        try:
            # Milvus Lite through a private unix socket, not pymilvus's open 127.0.0.1 port (`milvus_local`)
            client = MilvusClient(uri=(self.local and local_uri(self.uri)) or self.uri, token=self._token)
        except Exception as e:  # pymilvus raises its own and gRPC errors
            busy = " (another process may have it open)" if self.local else ""
            raise BackendError(f"{self._where()}: cannot connect{busy} ({type(e).__name__}: {_first_line(e)})") \
                from None
        if self.local:
            _LITE_USERS[self.uri] = _LITE_USERS.get(self.uri, 0) + 1
            self._holds_lite = True
        return client

    def _open_collection(self) -> None:
        from pymilvus import DataType

        collection = self.collection
        if not self.client.has_collection(collection):
            schema = self.client.create_schema(auto_id=False, enable_dynamic_field=False)
            schema.add_field("id", DataType.INT64, is_primary=True)
            schema.add_field("vector", DataType.FLOAT_VECTOR, dim=self.dim)
            schema.add_field("attrs", DataType.JSON)
            index_type, params = _INDEX_TYPES[self.kind]
            ip = self.client.prepare_index_params()
            ip.add_index(field_name="vector", index_type=index_type, metric_type="L2", params=params)
            self.client.create_collection(collection, schema=schema, index_params=ip, consistency_level="Strong")
            self._synced = -1
        self.client.load_collection(collection)

    def _where(self) -> str:
        """Where the collection lives, for messages: never the credentials a URI may carry."""
        if self.local:
            return self.uri
        from urllib.parse import urlsplit

        parts = urlsplit(self.uri)
        return f"milvus at {parts.scheme}://{parts.hostname}" + (f":{parts.port}" if parts.port else "")

    def _fix(self) -> str:
        if self.local:
            return (f"if it is damaged, delete {self.uri} and open the index again: it is rebuilt from the index's "
                    "store")
        return "check the cluster; the index's store holds every vector, so a reindex rebuilds the collection"

    def synced_seq(self) -> int:
        """The commit recorded in the store after the last acknowledged write."""
        return self._synced

    def note_applied(self, seq: int) -> None:
        """The collection holds commit `seq` (a cluster shared with the writing process)."""
        self._synced = int(seq)

    @_milvus_errors
    def count(self) -> int:
        """Rows in the collection."""
        res = self.client.query(self.collection, filter="", output_fields=["count(*)"], consistency_level="Strong")
        return int(res[0]["count(*)"])

    @_milvus_errors
    def verify(self, expected: IdSummary, samples: np.ndarray,
               vectors_of: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]) -> str | None:
        """The row count must be the store's, and the sampled stored vectors must be in the collection, equal."""
        held = self.count()
        if held != expected.count:
            return f"{self._where()}: holds {held} vectors for {expected.count} items"
        if not len(samples):
            return None
        ids, stored = vectors_of(samples)
        rows = {int(r["id"]): r["vector"] for r in self.client.get(self.collection, ids=[int(i) for i in ids],
                                                                     output_fields=["vector"])}
        if set(rows) != set(ids.tolist()):
            return f"{self._where()}: holds other ids than the store"
        if not np.allclose(np.asarray([rows[int(i)] for i in ids], np.float32), stored, atol=1e-6):
            return f"{self._where()}: its vectors differ from the store's"
        return None

    @_milvus_errors
    def add(self, ids: np.ndarray, vectors: np.ndarray, attrs: list[dict] | None = None) -> None:
        """Upsert in batches (idempotent, so a replayed commit is harmless); metadata as typed JSON scalars."""
        x = np.asarray(vectors, dtype=np.float32)
        attrs = attrs or [{}] * len(ids)
        for lo in range(0, len(ids), INSERT_BATCH):
            rows = [{"id": int(i), "vector": v.tolist(),
                     "attrs": {k: a for k, a in ((k, json_scalar(a)) for k, a in at.items()) if a is not None}}
                    for i, v, at in zip(ids[lo:lo + INSERT_BATCH], x[lo:lo + INSERT_BATCH],
                                        attrs[lo:lo + INSERT_BATCH])]
            self.client.upsert(self.collection, rows)

    @_milvus_errors
    def remove(self, ids: np.ndarray) -> np.ndarray:
        """Delete by primary key (Milvus deletes for good)."""
        ids = np.unique(np.asarray(ids, dtype=np.int64))
        for lo in range(0, len(ids), INSERT_BATCH):
            self.client.delete(self.collection, ids=[int(i) for i in ids[lo:lo + INSERT_BATCH]])
        return ids

    @_milvus_errors
    def persist(self, seq: int) -> None:
        """Flush (Milvus Lite writes its file; a cluster seals segments) and remember the commit."""
        self.client.flush(self.collection)
        self._synced = int(seq)

    @_milvus_errors
    def rebuild(self, ids: np.ndarray, vectors: np.ndarray, attrs: list[dict] | None, seq: int) -> None:
        """Drop and refill the collection with exactly these vectors."""
        self.client.drop_collection(self.collection)
        self._open_collection()
        self.add(ids, vectors, attrs)
        self.persist(seq)

    @_milvus_errors
    def search(self, queries: np.ndarray, k: int, allowed_ids: np.ndarray | None = None,
               where: dict[str, list[str]] | None = None) -> Neighbours:
        """k nearest by Euclidean distance (Milvus reports squared L2), filtered inside Milvus."""
        q = np.atleast_2d(np.asarray(queries, dtype=np.float32))
        if q.shape[1] != self.dim:
            raise BackendError(f"query dim {q.shape[1]} != index dim {self.dim}")
        k = max(1, min(int(k), MAX_TOPK))
        expr = where_expression(where) if where else ""
        if allowed_ids is not None:
            id_expr = f"id in {json.dumps([int(i) for i in allowed_ids])}"
            expr = f"({expr}) and {id_expr}" if expr else id_expr
        res = self.client.search(self.collection, data=[v.tolist() for v in q], limit=k, filter=expr,
                                 anns_field="vector", output_fields=[],
                                 search_params={"metric_type": "L2", "params": _SEARCH_PARAMS[self.kind]},
                                 consistency_level="Strong")
        dist = np.full((len(q), k), np.inf, np.float32)
        ids = np.full((len(q), k), -1, np.int64)
        for r, hits in enumerate(res):
            for j, h in enumerate(hits[:k]):
                ids[r, j], dist[r, j] = int(h["id"]), float(h["distance"])
        return Neighbours(np.sqrt(np.maximum(dist, 0)), ids)

    def describe(self) -> dict:
        """Kind, where the collection lives (never the token) and its row count."""
        return {"backend": self.name, "kind": self.kind, "collection": self.collection,
                "location": "milvus-lite" if self.local else self._where(),
                "vectors": self.count()}

    def close(self) -> None:
        """Close the client; the last user in this process of a Milvus Lite folder stops its embedded server, which
        releases the folder (another process may open it then)."""
        try:
            self.client.close()
        except Exception:  # noqa: BLE001 - closing twice or after a failed start must not mask the real error
            pass
        if getattr(self, "_holds_lite", False):
            self._holds_lite = False
            _LITE_USERS[self.uri] -= 1
            if not _LITE_USERS[self.uri]:
                del _LITE_USERS[self.uri]
                from milvus_lite.server_manager import server_manager_instance

                server_manager_instance.release_server(self.uri)
                from .milvus_local import release

                release(self.uri)


def _first_line(exc: BaseException) -> str:
    """A pymilvus error's message without its repr wrapping, one line."""
    text = getattr(exc, "message", None) or str(exc)
    lines = [ln.strip() for ln in str(text).splitlines() if ln.strip()]
    return (lines[0] if lines else type(exc).__name__)[:200]
