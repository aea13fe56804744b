"""The interface every vector backend implements, and the registry `open_backend` looks backends up in.

It lives in its own module (not the package's `__init__`) so that backend modules import it without importing the
package that imports them: no import cycle between files (tests/test_architecture.py checks).
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ...errors import InputError

KINDS = ("flat", "hnsw", "ivfpq")


class BackendError(InputError):
    """A backend cannot be created, opened or reached; the message names it."""


@dataclass(frozen=True)
class IdSummary:
    """What a set of item ids is checked by on open, cheap to compute in SQL and in NumPy alike: count, smallest,
    largest and sum (item ids are small non-negative integers, so the sum fits in 64 bits)."""

    count: int
    low: int
    high: int
    total: int

    @classmethod
    def of(cls, ids: np.ndarray) -> IdSummary:
        """The summary of these ids (unique)."""
        ids = np.asarray(ids, np.int64)
        if not len(ids):
            return cls(0, -1, -1, 0)
        return cls(len(ids), int(ids.min()), int(ids.max()), int(ids.sum()))


@dataclass
class Neighbours:
    """Search results: distances [Q, k] (Euclidean, ascending) and ids [Q, k] (-1 where fewer were found)."""

    distances: np.ndarray
    ids: np.ndarray


class VectorBackend(ABC):
    """A nearest-neighbour engine over (id, vector) pairs, Euclidean distance.

    A backend only ever holds a copy of what the index's store holds: when its persisted state cannot be used
    (unreadable, damaged, another index's), it says why in `problem` and reports `synced_seq() == -1`, and the index
    rebuilds it from the store."""

    name: str = ""
    kind: str = "flat"
    #: the kinds (index layouts) this backend offers
    kinds: tuple[str, ...] = KINDS
    #: True when `search` ranks by exact distances (an exact index); False for IVF-PQ style compressed codes.
    exact_distances: bool = True
    #: True when `search` applies `where` itself; else the index passes the matching ids as `allowed_ids`.
    filters_natively: bool = False
    #: why the persisted state was discarded on open (a one-line reason), or None
    problem: str | None = None
    #: how the backend lays its data out; the index records it (`backend_layout`) at every rebuild, and a backend
    #: whose stored layout is older reports itself unsynced so that the index rebuilds it
    layout: int = 1

    @classmethod
    def initial_options(cls, index_name: str, kind: str, uri: str | None) -> dict:
        """The `backend_options` a new index of this backend stores in its header."""
        if uri:
            raise BackendError(f"the {cls.name} backend takes no uri")
        return {"kind": kind}

    @classmethod
    def from_header(cls, folder: Path, header: dict, store_info: dict, uri: str | None = None,
                    token: str | None = None) -> VectorBackend:
        """Open the backend an index header describes (`dim`, `backend_options`) on the index folder."""
        return cls(Path(folder), int(header["dim"]), **dict(header.get("backend_options") or {}))

    @abstractmethod
    def synced_seq(self) -> int:
        """The store commit whose items this backend holds (-1: nothing usable yet)."""

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

    def verify(self, expected: IdSummary, samples: np.ndarray,
               vectors_of: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]) -> str | None:
        """Compare the contents with the store's: `expected` summarises the stored ids, `samples` are a few stored
        ids spread over them and `vectors_of(ids)` reads (ids, vectors) from the store. Returns why they differ
        (one line), or None when they agree."""
        held = self.count()
        return None if held == expected.count else f"holds {held} vectors for {expected.count} items"

    def clean_orphans(self) -> list[Path]:
        """Delete files a killed write left behind; call only under the folder's writer lock. Returns them."""
        return []

    def needs_rebuild(self, n_items: int) -> bool:
        """Whether the backend should be rebuilt from all vectors (e.g. an IVF-PQ index that has enough vectors to
        train now, or too many tombstones)."""
        return False

    def rebuild(self, ids: np.ndarray, vectors: np.ndarray, attrs: list[dict] | None, seq: int) -> None:
        """Replace the contents with exactly these vectors, as the state of commit `seq` (persisted)."""
        raise NotImplementedError

    def describe(self) -> dict:
        """What `guie index stats` shows about the backend."""
        return {"backend": self.name, "kind": self.kind, "vectors": self.count()}

    def close(self) -> None:  # noqa: B027 - optional: most backends hold nothing to release
        """Release files, connections and child processes."""


_REGISTRY: dict[str, type[VectorBackend]] = {}


def register_backend(cls: type[VectorBackend]) -> type[VectorBackend]:
    """Class decorator: make a backend available under its `name` (as timm's `register_model`)."""
    if not cls.name or cls.name in _REGISTRY:
        raise ValueError(f"backend {cls.__name__}: name {cls.name!r} is empty or taken")
    _REGISTRY[cls.name] = cls
    return cls


def backend_names() -> tuple[str, ...]:
    """The registered backends' names."""
    return tuple(_REGISTRY)


def backend_class(name: str) -> type[VectorBackend]:
    """The backend registered as `name` (BackendError naming the choices otherwise)."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise BackendError(f"unknown backend {name!r}; choose from {', '.join(_REGISTRY)}") from None
