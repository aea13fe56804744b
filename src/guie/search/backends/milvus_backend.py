"""Milvus through pymilvus: Milvus Lite (a local file, `milvus.db` in the index folder, no server to run) on one
machine, or a Milvus cluster (`uri="http://host:19530"` and a token) when the collection outgrows one machine.

One collection per index: `id` (INT64 primary key = the store's item id), `vector` (FLOAT_VECTOR, L2) and `attrs`
(JSON: the item's metadata as text, so `where` filters run inside Milvus, next to the vectors). Writes are upserts
and deletes by id, both idempotent, so replaying a commit after a crash is safe. Which commit the collection
reflects is recorded in the index's store (`backend_seq`), after Milvus has acknowledged the writes.

Milvus Lite accepts HNSW/IVF_PQ index parameters but searches small local collections by brute force; the figures
in docs/search.md say what it does at 1M vectors.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np

from . import BackendError, Neighbours, VectorBackend

LITE_FILE = "milvus.db"
INSERT_BATCH = 10_000
MAX_TOPK = 16_384  # Milvus's limit on k
_INDEX_TYPES = {"flat": ("FLAT", {}), "hnsw": ("HNSW", {"M": 32, "efConstruction": 100}),
                "ivfpq": ("IVF_PQ", {"nlist": 1024, "m": 16, "nbits": 8})}
_SEARCH_PARAMS = {"flat": {}, "hnsw": {"ef": 64}, "ivfpq": {"nprobe": 32}}


def collection_name(index_name: str) -> str:
    """A valid Milvus collection name for an index name (letters, digits and underscores, a letter first)."""
    return "guie_" + re.sub(r"[^A-Za-z0-9_]", "_", index_name)[:200]


def _quote(value: str) -> str:
    return json.dumps(str(value))  # a double-quoted string literal with escapes, as Milvus expressions read it


def where_expression(where: dict[str, list[str]]) -> str:
    """`{"vendor": ["apple", "google"]}` -> `(attrs["vendor"] == "apple" or attrs["vendor"] == "google")`."""
    clauses = []
    for col, values in where.items():
        field = f"attrs[{_quote(col)}]"
        clauses.append("(" + " or ".join(f"{field} == {_quote(v)}" for v in values) + ")")
    return " and ".join(clauses)


class MilvusBackend(VectorBackend):
    """A Milvus collection (see the module docstring)."""

    name = "milvus"
    filters_natively = True

    def __init__(self, folder: Path, dim: int, kind: str = "flat", collection: str = "guie_index",
                 uri: str | None = None, token: str | None = None, synced: int = -1, **unknown):
        if unknown:
            raise BackendError(f"milvus backend: unknown options {sorted(unknown)}")
        if kind not in _INDEX_TYPES:
            raise BackendError(f"milvus backend: unknown kind {kind!r} ({', '.join(_INDEX_TYPES)})")
        try:
            from pymilvus import DataType, MilvusClient
        except ImportError:
            raise BackendError("the milvus backend needs pymilvus and milvus-lite: pip install "
                               "pymilvus milvus-lite") from None
        self.folder, self.dim, self.kind, self.collection = Path(folder), int(dim), kind, collection
        self.uri = uri or str(self.folder / LITE_FILE)
        if not uri:
            self.folder.mkdir(parents=True, exist_ok=True)
        self._synced = int(synced)
        token = token if token is not None else os.environ.get("GUIE_MILVUS_TOKEN", "")
        from .milvus_local import local_uri

        lite = not self.uri.startswith(("http://", "https://", "tcp://", "unix:"))
        try:  # Milvus Lite through a private unix socket, not pymilvus's open 127.0.0.1 port (`milvus_local`)
            self.client = MilvusClient(uri=(lite and local_uri(self.uri)) or self.uri, token=token)
        except Exception as e:  # pymilvus raises its own and gRPC errors
            raise BackendError(f"milvus at {self._where()}: cannot connect ({type(e).__name__}: "
                               f"{str(e).splitlines()[0][:200]})") from None
        if not self.client.has_collection(collection):
            schema = self.client.create_schema(auto_id=False, enable_dynamic_field=False)
            schema.add_field("id", DataType.INT64, is_primary=True)
            schema.add_field("vector", DataType.FLOAT_VECTOR, dim=self.dim)
            schema.add_field("attrs", DataType.JSON)
            index_type, params = _INDEX_TYPES[kind]
            ip = self.client.prepare_index_params()
            ip.add_index(field_name="vector", index_type=index_type, metric_type="L2", params=params)
            self.client.create_collection(collection, schema=schema, index_params=ip, consistency_level="Strong")
            self._synced = -1
        self.client.load_collection(collection)

    def _where(self) -> str:
        """Where the collection lives, for messages: never the credentials a URI may carry."""
        if not self.uri.startswith(("http://", "https://", "tcp://")):
            return "the local Milvus Lite file"
        from urllib.parse import urlsplit

        parts = urlsplit(self.uri)
        return f"{parts.scheme}://{parts.hostname}" + (f":{parts.port}" if parts.port else "")

    def synced_seq(self) -> int:
        """The commit recorded in the store after the last acknowledged write."""
        return self._synced

    def note_applied(self, seq: int) -> None:
        """The collection holds commit `seq` (a cluster shared with the writing process)."""
        self._synced = int(seq)

    def count(self) -> int:
        """Rows in the collection."""
        res = self.client.query(self.collection, filter="", output_fields=["count(*)"], consistency_level="Strong")
        return int(res[0]["count(*)"])

    def add(self, ids: np.ndarray, vectors: np.ndarray, attrs: list[dict] | None = None) -> None:
        """Upsert in batches (idempotent, so a replayed commit is harmless)."""
        x = np.asarray(vectors, dtype=np.float32)
        attrs = attrs or [{}] * len(ids)
        for lo in range(0, len(ids), INSERT_BATCH):
            rows = [{"id": int(i), "vector": v.tolist(), "attrs": {k: str(a) for k, a in at.items() if a is not None}}
                    for i, v, at in zip(ids[lo:lo + INSERT_BATCH], x[lo:lo + INSERT_BATCH],
                                        attrs[lo:lo + INSERT_BATCH])]
            self.client.upsert(self.collection, rows)

    def remove(self, ids: np.ndarray) -> np.ndarray:
        """Delete by primary key (Milvus deletes for good)."""
        ids = np.unique(np.asarray(ids, dtype=np.int64))
        for lo in range(0, len(ids), INSERT_BATCH):
            self.client.delete(self.collection, ids=[int(i) for i in ids[lo:lo + INSERT_BATCH]])
        return ids

    def persist(self, seq: int) -> None:
        """Flush (Milvus Lite writes its file; a cluster seals segments) and remember the commit."""
        self.client.flush(self.collection)
        self._synced = int(seq)

    def rebuild(self, ids: np.ndarray, vectors: np.ndarray, attrs: list[dict] | None, seq: int) -> None:
        """Drop and refill the collection with exactly these vectors."""
        self.client.drop_collection(self.collection)
        self.__init__(self.folder, self.dim, self.kind, self.collection, uri=self.uri, synced=-1)
        self.add(ids, vectors, attrs)
        self.persist(seq)

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
                "location": "milvus-lite" if self._where().startswith("the local") else self._where(),
                "vectors": self.count()}

    def close(self) -> None:
        """Close the client (Milvus Lite stops its local server process)."""
        try:
            self.client.close()
        except Exception:  # noqa: BLE001 - closing twice or after a failed start must not mask the real error
            pass
