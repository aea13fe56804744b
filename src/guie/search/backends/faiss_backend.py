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
and `faiss-<seq>.check.json` are written before it. The check file records which index the snapshot belongs to
(the header's `uid`), its commit, size and SHA-256 (and the tombstones' SHA-256): a snapshot that does not match
its check file (damaged, truncated, another index's) is never parsed, and one that FAISS cannot read is discarded;
either way the backend reports `synced_seq() == -1` with the reason in `problem`, and the index rebuilds it from
its store. Older snapshots are deleted once a newer one is in place; temp files a killed writer left behind are
deleted by the next writer (`clean_orphans`, under the folder's writer lock, so never one a live writer writes).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

from .base import BackendError, IdSummary, Neighbours, VectorBackend, register_backend

HNSW_M = 32
HNSW_EF_SEARCH = 64
IVFPQ_MIN_TRAIN = 10_000
IVFPQ_NPROBE = 32
TOMBSTONE_REBUILD_FRACTION = 0.2
EXACT_FILTER_PER_K = 64  # hnsw: a filter allowing at most this many ids per neighbour asked for is searched exactly
_SNAPSHOT = re.compile(r"^faiss-(\d+)\.index$")
_CHECK = re.compile(r"^faiss-(\d+)\.check\.json$")
# temp files of `_atomic` (".<final name>.<random><suffix>"): what a kill -9 during a write leaves behind
_ORPHAN = re.compile(r"^\.(faiss-\d+\.index|faiss-\d+\.check\.json|tombstones-\d+\.npy)\..+\.(tmp|npy)$")
CHECK_FORMAT = 1


def ivfpq_factory(n: int, dim: int) -> str:
    """The IVF-PQ layout for n vectors of `dim`: ~4*sqrt(n) lists (at least 39 training points each, faiss's
    minimum) and one byte per 4 dimensions (16 bytes for 64-d)."""
    nlist = int(max(1, min(4 * math.sqrt(n), n // 39)))
    m = max(1, dim // 4)
    while dim % m:
        m -= 1
    return f"IVF{nlist},PQ{m}np"  # np: no polysemous training (70x slower to train, unused here)


@register_backend
class FaissBackend(VectorBackend):
    """A FAISS index in the index folder (see the module docstring). `identity` names the index a snapshot must
    belong to (the header's uid); None accepts any (a bare backend, as the benchmarks use)."""

    name = "faiss"

    def __init__(self, folder: Path, dim: int, kind: str = "flat", hnsw_m: int = HNSW_M,
                 ef_search: int = HNSW_EF_SEARCH, nprobe: int = IVFPQ_NPROBE, identity: str | None = None,
                 **unknown):
        import faiss

        if unknown:
            raise BackendError(f"faiss backend: unknown options {sorted(unknown)}")
        if kind not in self.kinds:
            raise BackendError(f"faiss backend: unknown kind {kind!r} ({', '.join(self.kinds)})")
        self.faiss, self.folder, self.dim, self.kind = faiss, Path(folder), int(dim), kind
        self.hnsw_m, self.ef_search, self.nprobe, self.identity = hnsw_m, ef_search, nprobe, identity
        self._seq, self.tombstones = -1, np.empty(0, np.int64)
        self.index = self._empty_index()
        snapshots = self._snapshots()
        if snapshots:
            self._load(max(snapshots))

    @classmethod
    def from_header(cls, folder: Path, header: dict, store_info: dict, uri: str | None = None,
                    token: str | None = None) -> FaissBackend:
        """The faiss backend of an index: its snapshot must carry the index's identity (`index_identity`)."""
        if uri:
            raise BackendError("the faiss backend takes no uri (that is for a milvus index)")
        return cls(Path(folder), int(header["dim"]), identity=index_identity(header),
                   **dict(header.get("backend_options") or {}))

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
        """Load snapshot `seq` if it matches its check file and FAISS reads it; otherwise start empty and say why
        in `problem` (the index then rebuilds from its store)."""
        path = self.folder / f"faiss-{seq}.index"
        tomb = self.folder / f"tombstones-{seq}.npy"
        problem = self._check_snapshot(seq, path, tomb)
        if problem:
            self.problem = f"{path}: {problem}"
            return
        try:
            index = self.faiss.read_index(str(path))
            tombstones = np.load(tomb) if tomb.is_file() else np.empty(0, np.int64)
        except (RuntimeError, OSError, ValueError, EOFError) as e:  # FAISS raises RuntimeError for what it rejects
            self.problem = f"{path}: unreadable FAISS snapshot ({_first_line(e)})"
            return
        if index.d != self.dim:
            self.problem = f"{path}: {index.d}-d snapshot in a {self.dim}-d index"
            return
        self.index, self.tombstones, self._seq = index, np.asarray(tombstones, np.int64), seq

    def _check_snapshot(self, seq: int, path: Path, tomb: Path) -> str | None:
        """Why snapshot `seq` does not match its check file (None: it matches, or it predates check files and is
        left to `verify`)."""
        check_path = self.folder / f"faiss-{seq}.check.json"
        if not check_path.is_file():
            return None
        try:
            check = json.loads(check_path.read_text())
        except (OSError, ValueError) as e:
            return f"its check file {check_path.name} is unreadable ({e})"
        if not isinstance(check, dict) or check.get("format") != CHECK_FORMAT:
            return f"its check file {check_path.name} is not one guie writes"
        if self.identity is not None and check.get("index") != self.identity:
            return "the snapshot of another index"
        if check.get("seq") != seq:
            return f"its check file is for commit {check.get('seq')}"
        if path.stat().st_size != check.get("bytes") or _sha256(path) != check.get("sha256"):
            return "damaged (size or SHA-256 differs from the one written with it)"
        if (_sha256(tomb) if tomb.is_file() else None) != check.get("tombstones_sha256"):
            return f"its tombstones file {tomb.name} is damaged or missing"
        return None

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

    def stored_ids(self) -> np.ndarray:
        """Every id in the FAISS index (tombstoned ones included), unsorted."""
        faiss = self.faiss
        index = faiss.downcast_index(self.index)
        if isinstance(index, faiss.IndexIDMap):
            return faiss.vector_to_array(index.id_map).astype(np.int64)
        invlists = faiss.extract_index_ivf(index).invlists
        parts = [faiss.rev_swig_ptr(invlists.get_ids(i), invlists.list_size(i)).copy()
                 for i in range(invlists.nlist) if invlists.list_size(i)]
        return np.concatenate(parts).astype(np.int64) if parts else np.empty(0, np.int64)

    def verify(self, expected: IdSummary, samples: np.ndarray,
               vectors_of: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]) -> str | None:
        """The live ids (held minus tombstones, none twice) must summarise as the store's do, and for flat/hnsw the
        sampled stored vectors must be in the index, equal."""
        where = self.folder / f"faiss-{self._seq}.index"
        held = np.sort(self.stored_ids())
        if len(held) > 1 and (held[1:] == held[:-1]).any():
            return f"{where}: holds an id twice"
        live = held[~np.isin(held, self.tombstones)] if len(self.tombstones) else held
        if len(live) != expected.count:
            return f"{where}: holds {len(live)} live vectors for {expected.count} items"
        if IdSummary.of(live) != expected:
            return f"{where}: holds other ids than the store"
        if not len(samples) or not self.exact_distances:
            return None
        ids, stored = vectors_of(samples)
        if not np.isin(ids, live).all():
            return f"{where}: holds other ids than the store"
        mine = np.stack([self.index.reconstruct(int(i)) for i in ids])
        if not np.allclose(mine, stored, atol=1e-6):
            return f"{where}: its vectors differ from the store's"
        return None

    def clean_orphans(self) -> list[Path]:
        """Delete the temp files of writes a kill interrupted and check files without their snapshot. Call only
        under the folder's writer lock (then no live writer is writing any of them). Returns what was deleted."""
        snapshots = self._snapshots()
        gone = []
        for p in self.folder.iterdir():
            m = _CHECK.match(p.name)
            if _ORPHAN.match(p.name) or (m and int(m[1]) not in snapshots):
                p.unlink(missing_ok=True)
                gone.append(p)
        return gone

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
        """Write `tombstones-<seq>.npy`, `faiss-<seq>.check.json`, then `faiss-<seq>.index` (its rename is the
        commit), then drop older snapshots and orphaned temp files. Call under the folder's writer lock."""
        self.folder.mkdir(parents=True, exist_ok=True)
        tomb = self.folder / f"tombstones-{seq}.npy"
        if len(self.tombstones):
            _atomic(lambda p: np.save(p, self.tombstones), tomb, suffix=".npy")
        else:
            tomb.unlink(missing_ok=True)

        def write(tmp: str) -> None:
            self.faiss.write_index(self.index, tmp)
            check = {"format": CHECK_FORMAT, "index": self.identity, "seq": seq, "bytes": os.path.getsize(tmp),
                     "sha256": _sha256(Path(tmp)), "tombstones_sha256": _sha256(tomb) if tomb.is_file() else None,
                     "ntotal": int(self.index.ntotal), "tombstones": int(len(self.tombstones))}
            _atomic(lambda p: Path(p).write_text(json.dumps(check)), self.folder / f"faiss-{seq}.check.json")

        _atomic(write, self.folder / f"faiss-{seq}.index")
        self._seq, self.problem = seq, None
        for old, path in self._snapshots().items():
            if old != seq:
                path.unlink(missing_ok=True)
                (self.folder / f"tombstones-{old}.npy").unlink(missing_ok=True)
        self.clean_orphans()

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
        if factory.startswith("HNSW") and allowed_ids is not None and \
                len(allowed_ids) <= max(k * EXACT_FILTER_PER_K, self.count() // 10):
            dist, ids = self._exact_on_graph_vectors(q, k, allowed_ids)  # a graph walk starves on a narrow filter
        else:
            dist, ids = self.index.search(q, k, params=params)
            if factory.startswith("HNSW"):
                dist, ids = self._fill_short_rows(q, k, dist, ids, allowed_ids)
        return Neighbours(np.sqrt(np.maximum(dist, 0)), ids)

    def _fill_short_rows(self, q: np.ndarray, k: int, dist: np.ndarray, ids: np.ndarray,
                         allowed_ids: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        """HNSW's beam search can end with fewer than k results when tombstones or a filter hide much of the graph
        near the query, or k nears the live count; such rows are searched again exactly, so a search returns
        min(k, selectable) hits."""
        short = np.flatnonzero((ids >= 0).sum(axis=1) < k)
        if not len(short):
            return dist, ids
        d2, i2 = self._exact_on_graph_vectors(q[short], k, allowed_ids)
        short_really = (ids[short] >= 0).sum(axis=1) < (i2 >= 0).sum(axis=1)
        dist, ids = dist.copy(), ids.copy()
        dist[short[short_really]], ids[short[short_really]] = d2[short_really], i2[short_really]
        return dist, ids

    def _exact_on_graph_vectors(self, q: np.ndarray, k: int,
                                allowed_ids: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        """Exact k-NN over the HNSW graph's own stored vectors (no copy), restricted to the live and allowed ids:
        (squared distances, ids), -1 past the selectable ones."""
        faiss = self.faiss
        idmap = faiss.downcast_index(self.index)
        id_map = faiss.vector_to_array(idmap.id_map).astype(np.int64)
        mask = np.ones(len(id_map), bool)
        if len(self.tombstones):
            mask &= ~np.isin(id_map, self.tombstones)
        if allowed_ids is not None:
            mask &= np.isin(id_map, np.asarray(allowed_ids, np.int64))
        storage = faiss.downcast_index(faiss.downcast_index(idmap.index).storage)
        positions = faiss.IDSelectorBatch(np.flatnonzero(mask).astype(np.int64))
        dist, pos = storage.search(q, k, params=faiss.SearchParameters(sel=positions))
        return dist, np.where(pos >= 0, id_map[np.maximum(pos, 0)], -1)

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


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _first_line(exc: BaseException) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    return (lines[-1] if lines else type(exc).__name__)[:200]


def index_identity(header: dict) -> str:
    """What a snapshot must name to belong to this index: the header's `uid` (indexes made before uids: the
    folder name and creation time)."""
    return str(header.get("uid") or f"{header.get('name')}@{header.get('created')}")
