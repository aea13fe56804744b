"""FAISS, embedded in the process: the default backend.

Kinds (all Euclidean; results are the index's stable item ids: flat and hnsw through an `IndexIDMap2`, IVF lists
store ids themselves):
    flat   exact brute force, the GUIE metric's own neighbour rule; 4*d bytes per vector
    hnsw   HNSW graph (M=32) over full vectors: sub-linear search, exact distances, 4*d + ~8*M bytes per vector;
           cannot delete in place, so removed ids become tombstones (filtered at search time) until a rebuild
    ivfpq  inverted lists + product quantisation (d/4 bytes per vector at 8 bits per 4-d sub-vector); needs
           training, so it stays a flat index until it holds `IVFPQ_MIN_TRAIN` vectors, then is rebuilt; its
           distances are approximate and `ImageIndex` re-ranks its candidates with the exact vectors of the store

Persistence: `faiss-<seq>.index` (written atomically) is the state of store commit <seq>; `tombstones-<seq>.npy`
is written before it. Older snapshots are deleted once a newer one is in place.
"""
from __future__ import annotations

import math
import os
import re
import tempfile
from pathlib import Path

import numpy as np

from . import BackendError, Neighbours, VectorBackend

HNSW_M = 32
HNSW_EF_SEARCH = 64
IVFPQ_MIN_TRAIN = 10_000
IVFPQ_NPROBE = 32
TOMBSTONE_REBUILD_FRACTION = 0.2
_SNAPSHOT = re.compile(r"^faiss-(\d+)\.index$")


def ivfpq_factory(n: int, dim: int) -> str:
    """The IVF-PQ layout for n vectors of `dim`: ~4*sqrt(n) lists (at least 39 training points each, faiss's
    minimum) and one byte per 4 dimensions (16 bytes for 64-d)."""
    nlist = int(max(1, min(4 * math.sqrt(n), n // 39)))
    m = max(1, dim // 4)
    while dim % m:
        m -= 1
    return f"IVF{nlist},PQ{m}np"  # np: no polysemous training (70x slower to train, unused here)


class FaissBackend(VectorBackend):
    """A FAISS index in the index folder (see the module docstring)."""

    name = "faiss"

    def __init__(self, folder: Path, dim: int, kind: str = "flat", hnsw_m: int = HNSW_M,
                 ef_search: int = HNSW_EF_SEARCH, nprobe: int = IVFPQ_NPROBE, **unknown):
        import faiss

        if unknown:
            raise BackendError(f"faiss backend: unknown options {sorted(unknown)}")
        if kind not in ("flat", "hnsw", "ivfpq"):
            raise BackendError(f"faiss backend: unknown kind {kind!r} (flat, hnsw, ivfpq)")
        self.faiss, self.folder, self.dim, self.kind = faiss, Path(folder), int(dim), kind
        self.hnsw_m, self.ef_search, self.nprobe = hnsw_m, ef_search, nprobe
        self._seq, self.tombstones = -1, np.empty(0, np.int64)
        self.index = self._empty_index()
        snapshots = self._snapshots()
        if snapshots:
            self._load(max(snapshots))

    # -- construction -------------------------------------------------------------------------------------------
    def _empty_index(self, factory: str | None = None):
        faiss = self.faiss
        if factory is None:
            factory = f"HNSW{self.hnsw_m}" if self.kind == "hnsw" else "Flat"
        index = faiss.index_factory(self.dim, factory, faiss.METRIC_L2)
        # IVF lists hold ids natively; an IDMap over IVF would mis-map ids after remove_ids (IVF does not shift)
        return index if factory.startswith("IVF") else faiss.IndexIDMap2(index)

    @property
    def factory(self) -> str:
        """The FAISS layout now in use (an `ivfpq` index is `Flat` until it has enough vectors to train)."""
        index = self.faiss.downcast_index(self.index)
        inner = self.faiss.downcast_index(index.index) if isinstance(index, self.faiss.IndexIDMap) else index
        if isinstance(inner, self.faiss.IndexIVFPQ):
            return f"IVF{inner.nlist},PQ{inner.pq.M}"
        if isinstance(inner, self.faiss.IndexHNSW):
            return f"HNSW{self.hnsw_m}"
        return "Flat"

    @property
    def exact_distances(self) -> bool:  # type: ignore[override]
        """IVF-PQ ranks by compressed codes; the others by exact distances."""
        return not self.factory.startswith("IVF")

    def _snapshots(self) -> dict[int, Path]:
        return {int(m[1]): p for p in self.folder.glob("faiss-*.index") if (m := _SNAPSHOT.match(p.name))}

    def _load(self, seq: int) -> None:
        path = self.folder / f"faiss-{seq}.index"
        try:
            self.index = self.faiss.read_index(str(path))
        except RuntimeError as e:
            raise BackendError(f"{path}: unreadable FAISS snapshot ({str(e).splitlines()[0]})") from None
        if self.index.d != self.dim:
            raise BackendError(f"{path}: {self.index.d}-d snapshot in a {self.dim}-d index")
        tomb = self.folder / f"tombstones-{seq}.npy"
        self.tombstones = np.load(tomb) if tomb.is_file() else np.empty(0, np.int64)
        self._seq = seq

    # -- the interface ----------------------------------------------------------------------------------------------
    def synced_seq(self) -> int:
        """The commit of the loaded snapshot plus what was applied since (see `persist`)."""
        return self._seq

    def note_applied(self, seq: int) -> None:
        """In memory only; the snapshot on disk is still the older one."""
        self._seq = int(seq)

    def count(self) -> int:
        """Vectors in the FAISS index, tombstoned ones included."""
        return int(self.index.ntotal)

    def add(self, ids: np.ndarray, vectors: np.ndarray, attrs: list[dict] | None = None) -> None:
        """Append vectors under their ids (ids are never reused by the store, so no id is added twice)."""
        if len(ids):
            self.index.add_with_ids(np.ascontiguousarray(vectors, dtype=np.float32),
                                    np.ascontiguousarray(ids, dtype=np.int64))

    def remove(self, ids: np.ndarray) -> np.ndarray:
        """Delete in place (flat, ivfpq) or tombstone (hnsw: FAISS cannot delete from a graph)."""
        ids = np.unique(np.asarray(ids, dtype=np.int64))
        if not len(ids):
            return ids
        if self.factory.startswith("HNSW"):
            self.tombstones = np.union1d(self.tombstones, ids)
            return np.empty(0, np.int64)
        self.index.remove_ids(self.faiss.IDSelectorBatch(ids))
        return ids

    def needs_rebuild(self, n_items: int) -> bool:
        """ivfpq: train once there are enough vectors; hnsw: drop tombstones once they are a fifth of the graph."""
        if self.kind == "ivfpq" and self.factory == "Flat" and n_items >= IVFPQ_MIN_TRAIN:
            return True
        return len(self.tombstones) > TOMBSTONE_REBUILD_FRACTION * max(1, self.count())

    def rebuild(self, ids: np.ndarray, vectors: np.ndarray, attrs: list[dict] | None, seq: int) -> None:
        """A fresh index over exactly these vectors (trained first for ivfpq), persisted as commit `seq`."""
        x = np.ascontiguousarray(vectors, dtype=np.float32)
        factory = None
        if self.kind == "ivfpq" and len(x) >= IVFPQ_MIN_TRAIN:
            factory = ivfpq_factory(len(x), self.dim)
        index = self._empty_index(factory)
        if not index.is_trained:
            rng = np.random.default_rng(0)
            sample = x if len(x) <= 256 * 1024 else x[rng.choice(len(x), 256 * 1024, replace=False)]
            index.train(sample)
        index.add_with_ids(x, np.ascontiguousarray(ids, dtype=np.int64))
        self.index, self.tombstones = index, np.empty(0, np.int64)
        self.persist(seq)

    def persist(self, seq: int) -> None:
        """Write `tombstones-<seq>.npy`, then `faiss-<seq>.index` (its rename is the commit), then drop older ones."""
        self.folder.mkdir(parents=True, exist_ok=True)
        tomb = self.folder / f"tombstones-{seq}.npy"
        if len(self.tombstones):
            _atomic(lambda p: np.save(p, self.tombstones), tomb, suffix=".npy")
        else:
            tomb.unlink(missing_ok=True)
        _atomic(lambda p: self.faiss.write_index(self.index, p), self.folder / f"faiss-{seq}.index")
        self._seq = seq
        for old, path in self._snapshots().items():
            if old != seq:
                path.unlink(missing_ok=True)
                (self.folder / f"tombstones-{old}.npy").unlink(missing_ok=True)

    def search(self, queries: np.ndarray, k: int, allowed_ids: np.ndarray | None = None,
               where: dict[str, list[str]] | None = None) -> Neighbours:
        """k nearest by Euclidean distance; `allowed_ids` and tombstones become a FAISS id selector."""
        faiss = self.faiss
        q = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
        if q.shape[1] != self.dim:
            raise BackendError(f"query dim {q.shape[1]} != index dim {self.dim}")
        k = max(1, min(int(k), self.count()))
        if self.count() == 0:
            return Neighbours(np.full((len(q), 0), np.inf, np.float32), np.full((len(q), 0), -1, np.int64))
        selectors = []  # kept referenced until the search returns (FAISS holds raw pointers)
        if allowed_ids is not None:
            selectors.append(faiss.IDSelectorBatch(np.ascontiguousarray(allowed_ids, dtype=np.int64)))
        if len(self.tombstones):
            selectors.append(faiss.IDSelectorBatch(self.tombstones))
            selectors.append(faiss.IDSelectorNot(selectors[-1]))
        sel = None
        if allowed_ids is not None and len(self.tombstones):
            sel = faiss.IDSelectorAnd(selectors[0], selectors[-1])
            selectors.append(sel)
        elif selectors:
            sel = selectors[-1]
        factory = self.factory
        if factory.startswith("HNSW"):
            params = faiss.SearchParametersHNSW(sel=sel, efSearch=max(self.ef_search, k))
        elif factory.startswith("IVF"):
            params = faiss.SearchParametersIVF(sel=sel, nprobe=self.nprobe)
        else:
            params = faiss.SearchParameters(sel=sel) if sel is not None else None
        dist, ids = self.index.search(q, k, params=params)
        return Neighbours(np.sqrt(np.maximum(dist, 0)), ids)

    def describe(self) -> dict:
        """Kind, FAISS layout, vectors, tombstones and the snapshot's size on disk."""
        snap = self.folder / f"faiss-{self._seq}.index"
        return {"backend": self.name, "kind": self.kind, "factory": self.factory, "vectors": self.count(),
                "tombstones": int(len(self.tombstones)),
                "snapshot_bytes": snap.stat().st_size if snap.is_file() else 0}


def _atomic(write, path: Path, suffix: str = ".tmp") -> None:
    """Call write(tmp_path) for a temp file beside `path`, fsync it, rename it over `path`."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
