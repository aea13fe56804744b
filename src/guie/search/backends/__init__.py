"""Vector backends behind one small interface: what a named index needs from a nearest-neighbour engine.

The metadata store (`guie.search.store`) is the index's source of truth and holds every vector too, so a backend
only ever holds a *derived* copy: it reports which commit it reflects (`synced_seq`), and `ImageIndex` brings it up
to date from the store (items added after that commit, ids removed after it). That makes crash recovery the same
code path as a normal open, for every backend.

    faiss   (default) embedded in the process; exact `flat`, or `hnsw` / `ivfpq` (see docs/search.md for when)
    milvus  through pymilvus: Milvus Lite (a local file in the index folder) or a Milvus cluster (`uri`, token)
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ...errors import InputError

BACKENDS = ("faiss", "milvus")
KINDS = ("flat", "hnsw", "ivfpq")


class BackendError(InputError):
    """A backend cannot be created, opened or reached; the message names it."""


@dataclass
class Neighbours:
    """Search results: distances [Q, k] (Euclidean, ascending) and ids [Q, k] (-1 where fewer were found)."""

    distances: np.ndarray
    ids: np.ndarray


class VectorBackend(ABC):
    """A nearest-neighbour engine over (id, vector) pairs, Euclidean distance."""

    name: str = ""
    kind: str = "flat"
    #: True when `search` ranks by exact distances (an exact index); False for IVF-PQ style compressed codes.
    exact_distances: bool = True

    @abstractmethod
    def synced_seq(self) -> int:
        """The store commit whose items this backend holds (-1: nothing yet)."""

    @abstractmethod
    def add(self, ids: np.ndarray, vectors: np.ndarray, attrs: list[dict] | None = None) -> None:
        """Insert (or replace) these ids; `attrs` are per-item metadata a backend may filter on natively."""

    @abstractmethod
    def remove(self, ids: np.ndarray) -> np.ndarray:
        """Remove these ids (absent ones are ignored). Returns the ids that are gone for good; ids the backend
        can only hide (tombstones) are not returned and stay in the store's removal log until a rebuild."""

    @abstractmethod
    def persist(self, seq: int) -> None:
        """Make the current contents durable as the state of store commit `seq`."""

    @abstractmethod
    def note_applied(self, seq: int) -> None:
        """The in-memory contents now reflect commit `seq` (applied, not persisted: a reader process catching up)."""

    @abstractmethod
    def search(self, queries: np.ndarray, k: int, allowed_ids: np.ndarray | None = None,
               where: dict[str, list[str]] | None = None) -> Neighbours:
        """The k nearest ids of each query [Q, d], restricted to `allowed_ids` when given (or to items matching
        `where` for a backend with `filters_natively`)."""

    @abstractmethod
    def count(self) -> int:
        """Vectors held (tombstoned ones included)."""

    def needs_rebuild(self, n_items: int) -> bool:
        """Whether the backend should be rebuilt from all vectors (e.g. an IVF-PQ index that has enough vectors to
        train now, or too many tombstones)."""
        return False

    def rebuild(self, ids: np.ndarray, vectors: np.ndarray, attrs: list[dict] | None, seq: int) -> None:
        """Replace the contents with exactly these vectors, as the state of commit `seq` (persisted)."""
        raise NotImplementedError

    #: True when `search` applies `where` itself; else the index passes the matching ids as `allowed_ids`.
    filters_natively: bool = False

    def describe(self) -> dict:
        """What `guie index stats` shows about the backend."""
        return {"backend": self.name, "kind": self.kind, "vectors": self.count()}

    def close(self) -> None:  # noqa: B027 - optional: most backends hold nothing to release
        """Release files, connections and child processes."""


def open_backend(folder: str | Path, header: dict, store_info: dict | None = None,
                 uri: str | None = None, token: str | None = None) -> VectorBackend:
    """The backend an index header names (`backend`, `backend_options`), opened on the index folder.

    `uri`/`token` override a milvus index's connection (a cluster instead of the local Milvus Lite file)."""
    name = header.get("backend", "faiss")
    options = dict(header.get("backend_options") or {})
    dim = int(header["dim"])
    if name == "faiss":
        from .faiss_backend import FaissBackend

        return FaissBackend(Path(folder), dim, **options)
    if name == "milvus":
        from .milvus_backend import MilvusBackend

        if uri:
            options["uri"] = uri
        return MilvusBackend(Path(folder), dim, token=token, synced=(store_info or {}).get("backend_seq", -1),
                             **options)
    raise BackendError(f"unknown backend {name!r}; choose from {', '.join(BACKENDS)}")


def check_backend_options(name: str, kind: str) -> None:
    """Refuse an unknown backend or index kind with a one-line error."""
    if name not in BACKENDS:
        raise BackendError(f"unknown backend {name!r}; choose from {', '.join(BACKENDS)}")
    if kind not in KINDS:
        raise BackendError(f"unknown index kind {kind!r}; choose from {', '.join(KINDS)}")
