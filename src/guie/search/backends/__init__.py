"""Vector backends behind one small interface (`base.VectorBackend`), looked up by name in a registry.

The metadata store (`guie.search.store`) is the index's source of truth and holds every vector too, so a backend
only ever holds a *derived* copy: it reports which commit it reflects (`synced_seq`), and `ImageIndex` brings it up
to date from the store (items added after that commit, ids removed after it), or rebuilds it from the store when
its persisted state cannot be trusted (`VectorBackend.problem`, `VectorBackend.verify`). That makes crash recovery
and repair the same code path as a normal open, for every backend.

    faiss   (default) embedded in the process; exact `flat`, or `hnsw` / `ivfpq` (see docs/search.md for when)
    milvus  through pymilvus: Milvus Lite (a local folder in the index folder) or a Milvus cluster (`uri`, token)

A new backend is a `VectorBackend` subclass decorated with `@register_backend` in a module imported below.
"""
from __future__ import annotations

from pathlib import Path

from . import faiss_backend, milvus_backend  # noqa: F401 - importing registers them
from .base import (
    KINDS,
    BackendError,
    IdSummary,
    Neighbours,
    VectorBackend,
    backend_class,
    backend_names,
    register_backend,
)

BACKENDS = backend_names()


def open_backend(folder: str | Path, header: dict, store_info: dict | None = None,
                 uri: str | None = None, token: str | None = None) -> VectorBackend:
    """The backend an index header names (`backend`, `backend_options`), opened on the index folder.

    `uri`/`token` override a milvus index's connection (a cluster instead of the local Milvus Lite file)."""
    cls = backend_class(header.get("backend", "faiss"))
    return cls.from_header(Path(folder), header, store_info or {}, uri=uri, token=token)


def check_backend_options(name: str, kind: str) -> None:
    """Refuse an unknown backend or index kind with a one-line error."""
    cls = backend_class(name)
    if kind not in cls.kinds:
        raise BackendError(f"unknown index kind {kind!r}; choose from {', '.join(cls.kinds)}")


__all__ = ["BACKENDS", "KINDS", "BackendError", "IdSummary", "Neighbours", "VectorBackend", "backend_class",
           "backend_names", "check_backend_options", "open_backend", "register_backend"]
