"""A named, updatable image index: a folder holding the metadata store and a vector backend, with one commit
protocol for every write.

Folder layout (`NAME/`):
    index.sqlite         the truth: header (model fingerprint, preprocessing, dim, backend, image root), items
                         (stable integer ids, content hash, path relative to the image root, label, other manifest
                         columns, the vector), the commit history and the removal log (`guie.search.store`)
    faiss-<seq>.index    faiss backend: the snapshot of commit <seq> (+ tombstones-<seq>.npy for hnsw)
    milvus.db            milvus backend without --uri: the Milvus Lite file
    pending/             an unfinished `guie index add`: its resumable embedding parts (`guie.search.ingest`)
    .writer.lock         held (flock) by the one process committing at a time (`guie.search.folder`)
    .add.lock            held by the one `guie index add` running (`guie.search.ingest`)

Commit protocol, for add and remove alike:
    1. the store commits (one SQLite transaction: rows, removal log, commit counter)  <- the commit point
    2. the backend applies the same change in memory and persists it as the state of that commit
A kill -9 before 1 leaves the previous commit (the backend was not touched on disk); a kill -9 between 1 and 2
leaves the new commit in the store and an older backend state, which the next open brings up to date from the
store (items added and ids removed after the backend's commit). So an opened index always holds exactly the items
of the last completed commit. A write that changes nothing (every item indexed already, no id found) commits
nothing.

Integrity on open: the backend's persisted state is checked (a FAISS snapshot against the check file written with
it: index identity, commit, size, SHA-256), brought up to date, then verified against the store (the live ids'
count, min, max and sum equal to the store's, 16 stored vectors spread over the ids equal to the backend's; for
Milvus the row count and the same spot checks).
Whatever disagrees is rebuilt from the store, which holds every vector, with one warning line saying why.
"""
from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import InputError
from ..utils import disk_full_as_error
from .backends import BackendError, IdSummary, VectorBackend, backend_class, check_backend_options, open_backend
from .folder import LOCK_FILE, index_home, resolve_index, writer_lock
from .store import STORE_FILE, MetadataStore, NewItem, StoreError, parse_where

log = logging.getLogger(__name__)

UPLOADS = "@index/uploads/"  # item paths of images added over HTTP: kept in the index folder, not the image root
RERANK_FACTOR = 8  # candidates per requested neighbour re-ranked with exact vectors when the backend is approximate
MAX_TIED_FETCH = 16_384  # neighbours a search fetches at most to resolve ties at a page's edge (Milvus's top-k limit)
DISTANCE_SLACK = 1e-6  # a cut-off keeps hits this far past it: a distance shown rounded to 6 places is kept by itself
DUPLICATE_DISTANCE = 0.15  # default cut-off of `duplicate_groups` (docs/search.md: measured on a planted set)


class SearchIndexError(InputError):
    """An index cannot be created or opened, or refuses an operation (another model, a bad filter ...)."""


@dataclass
class AddResult:
    """What an add committed: the commit's seq, one id per input item (-1: already indexed, same content)."""

    seq: int
    ids: np.ndarray

    @property
    def added(self) -> int:
        """Items that are new in the index."""
        return int((self.ids >= 0).sum())


@dataclass
class Hit:
    """One search result: the item's id, its Euclidean distance to the query and its metadata."""

    id: int
    distance: float
    item: dict


class ImageIndex:
    """A named index (see the module docstring). Thread-safe: one lock serialises store and backend access; a
    second process writing the same index waits for the folder's writer lock."""

    def __init__(self, folder: Path, store: MetadataStore, backend: VectorBackend):
        self.folder, self.store, self.backend = folder, store, backend
        self.header = store.header()
        self._lock = threading.RLock()
        self._flock_depth = 0
        self._data_version = store.data_version()

    # -- lifecycle ------------------------------------------------------------------------------------------------
    @classmethod
    def create(cls, name: str | Path, *, dim: int, model: dict, backend: str = "faiss", kind: str = "flat",
               image_root: str | Path | None = None, uri: str | None = None, token: str | None = None,
               extra: dict | None = None) -> ImageIndex:
        """A new empty index at `name` (see `resolve_index`).

        `model` identifies the embedder: {"ref": what to load, "fingerprint": `Embedder.fingerprint()`,
        "preprocess": PreprocessConfig.to_dict()}; every later add and search must use a model with the same
        fingerprint. `uri` puts a milvus index on a cluster instead of the local Milvus Lite file (the token is
        never stored: pass it, or set GUIE_MILVUS_TOKEN, each time)."""
        folder = resolve_index(name)
        check_backend_options(backend, kind)
        if (folder / STORE_FILE).exists():
            raise SearchIndexError(f"{folder}: an index already exists there (remove the folder to start again)")
        if not 1 <= int(dim) <= 65536:
            raise SearchIndexError(f"dimension {dim} is not a vector size")
        for key in ("ref", "fingerprint"):
            if not model.get(key):
                raise SearchIndexError(f"model description lacks {key!r}")
        options = backend_class(backend).initial_options(folder.name, kind, uri)
        header = {"name": folder.name, "uid": uuid.uuid4().hex, "created": time.time(), "dim": int(dim),
                  "model": model, "backend": backend, "backend_options": options,
                  "image_root": str(Path(image_root).resolve()) if image_root else None, **(extra or {})}
        folder.mkdir(parents=True, exist_ok=True)
        with writer_lock(folder):
            store = MetadataStore.create(folder / STORE_FILE, header)
            try:
                be = open_backend(folder, store.header(), store.header(), token=token)
                with disk_full_as_error(folder, "nothing was created: free some space and create it again"):
                    be.persist(0)
                store.set_info("backend_seq", 0)
                store.set_info("backend_layout", be.layout)
            except BaseException:
                store.close()
                (folder / STORE_FILE).unlink(missing_ok=True)
                raise
        return cls(folder, store, be)

    @classmethod
    def open(cls, name: str | Path, *, uri: str | None = None, token: str | None = None,
             write: bool = True) -> ImageIndex:
        """Open an index and bring its backend up to the store's last commit (after a crash, that persists the
        recovered state when `write`; a read-only open recovers in memory only)."""
        folder = resolve_index(name)
        try:
            store = MetadataStore(folder / STORE_FILE)
        except StoreError as e:
            raise SearchIndexError(str(e)) from None
        try:
            backend = open_backend(folder, store.header(), store.header(), uri=uri, token=token)
        except BaseException:
            store.close()
            raise
        index = cls(folder, store, backend)
        try:
            index._catch_up(persist=write)
            index._verify()
            index._clean_orphans()
        except BaseException:
            index.close()
            raise
        return index

    def close(self) -> None:
        """Close the backend and the store."""
        with self._lock:
            self.backend.close()
            self.store.close()

    def __enter__(self) -> ImageIndex:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- properties ---------------------------------------------------------------------------------------------
    @property
    def name(self) -> str:
        """The index's name (its folder's name)."""
        return self.folder.name

    @property
    def dim(self) -> int:
        """Vector dimension."""
        return int(self.header["dim"])

    @property
    def model(self) -> dict:
        """{"ref", "fingerprint", "preprocess", ...}: the embedder every add and search must use."""
        return dict(self.header["model"])

    @property
    def image_root(self) -> Path | None:
        """The folder item paths are relative to (thumbnails are served from it), or None."""
        root = self.store.get_info("image_root")
        return Path(root) if root else None

    def set_image_root(self, root: str | Path) -> Path:
        """Set the image root once (the first add does it when `create` was given none)."""
        with self._lock:
            current = self.image_root
            if current is None:
                current = Path(root).resolve()
                self.store.set_info("image_root", str(current))
            return current

    def __len__(self) -> int:
        with self._lock:
            return len(self.store)

    def item_file(self, item: dict) -> Path | None:
        """The image file of an item, only if it lies inside the image root (or the index's uploads folder):
        a stored path can never reach elsewhere (`../`, absolute paths, symlinks out are refused)."""
        stored = item.get("path")
        if not stored:
            return None
        if stored.startswith(UPLOADS):
            base, rel = self.folder / "uploads", stored[len(UPLOADS):]
        else:
            base, rel = self.image_root, stored
        if base is None or Path(rel).is_absolute():
            return None
        base = base.resolve()
        path = (base / rel).resolve()
        return path if path.is_relative_to(base) and path.is_file() else None

    @property
    def seq(self) -> int:
        """The last committed commit."""
        with self._lock:
            return self.store.seq

    def check_model(self, fingerprint: str) -> None:
        """Refuse a model whose fingerprint differs from the one the index was built with."""
        expected = self.header["model"]["fingerprint"]
        if fingerprint != expected:
            raise SearchIndexError(f"index {self.name!r} was built with model {self.header['model'].get('ref')!r} "
                              f"(fingerprint {expected}); this model's fingerprint is {fingerprint}: use the same "
                              "model (weights and preprocessing) or create another index")

    # -- writes -------------------------------------------------------------------------------------------------
    @contextmanager
    def writing(self):
        """Hold this index for writing: the in-process lock and the folder's writer lock, and bring the backend up
        to any commit another process made meanwhile."""
        with self._lock, self._folder_lock():
            self._catch_up(persist=False)
            yield

    @contextmanager
    def _folder_lock(self):
        """The folder's writer lock, re-entrant within this object (flock is not, across file descriptions)."""
        with self._lock:
            if self._flock_depth:
                self._flock_depth += 1
                try:
                    yield
                finally:
                    self._flock_depth -= 1
                return
            with writer_lock(self.folder):
                self._flock_depth = 1
                try:
                    yield
                finally:
                    self._flock_depth = 0

    def add(self, vectors: np.ndarray, items: Sequence[NewItem], op: str = "add") -> AddResult:
        """Commit `items` with their `vectors` [n, dim]; items whose content hash is indexed already are skipped
        (ids -1). One commit, whatever the size."""
        vectors = np.asarray(vectors, dtype=np.float32)
        if vectors.ndim != 2 or vectors.shape[1] != self.dim:
            raise SearchIndexError(f"vectors of shape {vectors.shape} for a {self.dim}-d index")
        if len(items) != len(vectors):
            raise SearchIndexError(f"{len(items)} items but {len(vectors)} vectors")
        if not np.isfinite(vectors).all():
            raise SearchIndexError("vectors hold NaN or infinite values")
        with self.writing():
            seq, ids = self.store.commit_add(items, vectors, op=op)
            fresh = ids >= 0
            if fresh.any():
                attrs = [{"path": it.path, "label": it.label, **it.meta} for it, f in zip(items, fresh) if f]
                self.backend.add(ids[fresh], vectors[fresh], attrs)
                self._persist(seq)
        return AddResult(seq, ids)

    def remove(self, ids: Sequence[int] | np.ndarray, op: str = "remove") -> tuple[int, np.ndarray]:
        """Commit the removal of the indexed items among `ids`. Returns (the commit's seq, the removed ids); when
        none of them is indexed, nothing is committed (the seq is the last commit's)."""
        with self.writing():
            seq, removed = self.store.commit_remove(ids, op=op)
            if len(removed):
                self.backend.remove(removed)
                self._persist(seq)
        return seq, removed

    def replace(self, remove: Sequence[int] | np.ndarray, vectors: np.ndarray, items: Sequence[NewItem],
                op: str = "sync") -> tuple[int, np.ndarray, AddResult]:
        """Remove the indexed items among `remove` and add `items` with their `vectors` [n, dim] in one commit
        (`MetadataStore.commit_changes`). Returns (the commit's seq, the removed ids, the AddResult)."""
        vectors = np.asarray(vectors, dtype=np.float32).reshape(-1, self.dim)
        if len(items) != len(vectors):
            raise SearchIndexError(f"{len(items)} items but {len(vectors)} vectors")
        if not np.isfinite(vectors).all():
            raise SearchIndexError("vectors hold NaN or infinite values")
        with self.writing():
            seq, removed, ids = self.store.commit_changes(remove, items, vectors, op=op)
            if len(removed):
                self.backend.remove(removed)
            fresh = ids >= 0
            if fresh.any():
                attrs = [{"path": it.path, "label": it.label, **it.meta} for it, f in zip(items, fresh) if f]
                self.backend.add(ids[fresh], vectors[fresh], attrs)
            if len(removed) or fresh.any():
                self._persist(seq)
        return seq, removed, AddResult(seq, ids)

    def remove_where(self, where: Sequence[str] | dict) -> tuple[int, np.ndarray]:
        """Remove every item matching the metadata conditions (`col=value`, as `parse_where`)."""
        conditions = parse_where(where)
        if not conditions:
            raise SearchIndexError("remove needs at least one condition (col=value) or a list of ids")
        with self.writing():
            return self.remove(self.store.ids_where(conditions), op="remove " + _describe_where(conditions))

    def reindex(self, kind: str) -> None:
        """Rebuild the backend as another kind (e.g. flat -> hnsw once the index is large)."""
        check_backend_options(self.header["backend"], kind)
        with self.writing():
            options = {**self.header["backend_options"], "kind": kind}
            self.store.set_info("backend_options", options)
            self.header = self.store.header()
            self.backend.close()
            for p in [*self.folder.glob("faiss-*.index"), *self.folder.glob("faiss-*.check.json")]:
                p.unlink()
            self.backend = open_backend(self.folder, self.header, {"backend_seq": -1})
            self._rebuild(None)

    def _persist(self, seq: int) -> None:
        """Make the backend durable as commit `seq` (rebuilding it first when it asks to be)."""
        rebuild = self.backend.needs_rebuild(len(self.store))
        try:
            with disk_full_as_error(self.folder, f"commit {seq} is safe in {STORE_FILE}; free some space: the next "
                                                 "write or open brings the vector backend up to it"):
                if rebuild:
                    ids, vectors, attrs = self.store.all_rows()
                    self.backend.rebuild(ids, vectors, attrs, seq)
                else:
                    self.backend.persist(seq)
        except BaseException:
            # the change is applied in memory, only its snapshot is missing (a failed rebuild: nothing is certain)
            self.backend.note_applied(-1 if rebuild else seq)
            raise
        self.store.set_info("backend_seq", seq)
        self._data_version = self.store.data_version()

    def _rebuild(self, reason: str | None) -> None:
        """Rebuild the backend from every item of the store (under the folder's writer lock, so that the rows and
        the commit they are read at agree); `reason` (why the backend could not be used) is logged as one line."""
        with self._lock, self._folder_lock():
            ids, vectors, attrs = self.store.all_rows()
            seq = self.store.seq
            with disk_full_as_error(self.folder, f"the index is intact in {STORE_FILE}; free some space and open it "
                                                 "again"):
                self.backend.rebuild(ids, vectors, attrs, seq)
            self.store.set_info("backend_seq", seq)
            self.store.set_info("backend_layout", self.backend.layout)
            self._data_version = self.store.data_version()
        if reason:
            log.warning("%s; rebuilt it from %s (%d items)", reason, self.folder / STORE_FILE, len(ids))

    def _catch_up(self, persist: bool) -> None:
        """Bring the backend to the store's last commit by replaying what changed after the backend's commit (or
        by a rebuild when it holds nothing usable)."""
        with self._lock:
            base = self.backend.synced_seq()
            if base == self.store.seq:
                return
            if base < 0 or base > self.store.seq:  # nothing usable (or a store restored from an older copy)
                reason = self.backend.problem
                if base > self.store.seq:
                    reason = f"{self.folder}: the vector backend is at commit {base}, the store at {self.store.seq}"
                self.backend.problem = None
                self._rebuild(reason)
                return
            last, removed, ids, vectors, attrs = self.store.changes_after(base)
            self.backend.remove(removed)
            self.backend.add(ids, vectors, attrs)
            if persist:
                with self._folder_lock():
                    self._persist(last)
            else:
                self.backend.note_applied(last)  # in memory only: this process does not write

    def _verify(self) -> None:
        """Compare the (caught-up) backend with the store's items and rebuild it when they differ. The ids are read
        at one commit; if another process committed meanwhile, catch up to it and compare again."""
        with self._lock:
            for _ in range(5):
                seq, summary, samples = self.store.id_summary()
                if seq != self.backend.synced_seq():
                    self._catch_up(persist=False)
                    continue
                problem = self.backend.verify(IdSummary(*summary), samples, self.store.vectors)
                if problem:
                    self._rebuild(problem)
                return

    def _clean_orphans(self) -> None:
        """Delete what killed writes left in the folder, unless a writer holds the folder now (it may be writing
        those very files; it cleans them itself when it persists)."""
        with self._lock, writer_lock(self.folder, blocking=False) as held:
            if held:
                gone = self.backend.clean_orphans()
                if gone:
                    log.info("%s: deleted %d temp files of an interrupted write (%s)", self.folder, len(gone),
                             ", ".join(p.name for p in gone[:3]) + (" ..." if len(gone) > 3 else ""))

    def refresh(self) -> bool:
        """Pick up commits another process made since (cheap when there are none). Returns whether any were."""
        with self._lock:
            version = self.store.data_version()
            if version == self._data_version:
                return False
            self._data_version = version
            self.header = self.store.header()
            before = self.backend.synced_seq()
            self._catch_up(persist=False)
            return self.backend.synced_seq() != before

    # -- reads --------------------------------------------------------------------------------------------------
    def search(self, queries: np.ndarray, k: int = 5, where: Sequence[str] | dict | None = None,
               max_distance: float | None = None, offset: int = 0) -> list[list[Hit]]:
        """The k nearest items of each query vector [Q, dim] (Euclidean, nearest first, ties by id), optionally
        only among items matching `where` (col=value conditions), only those within `max_distance` (give or take
        DISTANCE_SLACK), and skipping the `offset` nearest (paging: while the index does not change, the pages of
        one query are consecutive slices of one ranking)."""
        q = np.atleast_2d(np.asarray(queries, dtype=np.float32))
        if q.shape[1] != self.dim:
            raise SearchIndexError(f"query dim {q.shape[1]} != index dim {self.dim} (was it embedded with this "
                              "index's model?)")
        if k < 1:
            raise SearchIndexError(f"k must be >= 1, got {k}")
        if offset < 0:
            raise SearchIndexError(f"offset must be >= 0, got {offset}")
        max_distance = check_max_distance(max_distance)
        conditions = parse_where(where)
        depth = offset + k
        with self._lock:
            allowed = None
            if conditions and not self.backend.filters_natively:
                allowed = self.store.ids_where(conditions)
                if not len(allowed):
                    return [[] for _ in q]
            exact = self.backend.exact_distances
            fetch = depth + 1 if exact else max(depth * RERANK_FACTOR, 32)
            while True:
                nb = self.backend.search(q, fetch, allowed_ids=allowed, where=conditions or None)
                # Ties at the page's edge (vectors at exactly the same distance) continue past what was fetched:
                # fetch until all of them are in, so that sorting by (distance, id) gives every page the same order.
                if not exact or nb.ids.shape[1] < fetch or fetch >= min(self.backend.count(), MAX_TIED_FETCH):
                    break
                edge = nb.distances[:, depth - 1]
                if not ((nb.ids[:, -1] >= 0) & (nb.distances[:, -1] == edge)).any():
                    break
                fetch = min(fetch * 2, MAX_TIED_FETCH)
            keep = nb.ids >= 0
            if max_distance is not None and exact:
                keep &= nb.distances <= max_distance + DISTANCE_SLACK
            found = np.unique(nb.ids[keep])
            items = self.store.items(found)
            if not exact:  # IVF-PQ: re-rank the candidates by their exact vectors from the store
                vid, vecs = self.store.vectors(found)
                lookup = dict(zip(vid.tolist(), range(len(vid))))
        out = []
        for r in range(len(q)):
            row = [(int(i), float(d)) for i, d in zip(nb.ids[r], nb.distances[r]) if i >= 0 and int(i) in items]
            if not exact:
                row = [(i, float(np.linalg.norm(vecs[lookup[i]] - q[r]))) for i, _ in row]
            row.sort(key=lambda t: (t[1], t[0]))
            if max_distance is not None:
                row = [t for t in row if t[1] <= max_distance + DISTANCE_SLACK]
            out.append([Hit(i, d, items[i]) for i, d in row[offset:depth]])
        return out

    def duplicate_groups(self, max_distance: float, neighbours: int = 16, chunk: int = 1024,
                         linkage: str = "star") -> list[list[Hit]]:
        """Groups of near-identical items. Every item is searched (with this index's backend) for its `neighbours`
        nearest within `max_distance`; the pairs found (both ways) are then grouped:

        * `star` (default): from the lowest id up, an item not yet grouped becomes a group's first, with every
          ungrouped item paired with it: each member lies within `max_distance` of the group's first, so a dense
          collection does not chain distinct pictures into one group;
        * `single`: connected components of the pairs (union-find): a group may hold items far apart, linked
          through others (a re-encode of a resize of a crop).

        Vectors are read `chunk` at a time: memory grows with the pairs found, not with the index. Each group is a
        list of Hits (distance: to the group's first, lowest, id), groups largest first."""
        max_distance = check_max_distance(max_distance)
        if max_distance is None:
            raise SearchIndexError("duplicates need a max_distance")
        if neighbours < 1 or chunk < 1:
            raise SearchIndexError(f"neighbours and chunk must be >= 1, got {neighbours}, {chunk}")
        if linkage not in LINKAGES:
            raise SearchIndexError(f"linkage {linkage!r}: choose from {', '.join(LINKAGES)}")
        with self._lock:
            ids = self.store.ids()
        paired: dict[int, set[int]] = {}
        for start in range(0, len(ids), chunk):
            with self._lock:
                vid, vecs = self.store.vectors(ids[start:start + chunk])
            if not len(vid):
                continue
            for i, row in zip(vid.tolist(), self.search(vecs, neighbours + 1, max_distance=max_distance)):
                for hit in row:
                    if hit.id != i:
                        paired.setdefault(i, set()).add(hit.id)
                        paired.setdefault(hit.id, set()).add(i)
        members = _star_groups(paired) if linkage == "star" else _components(paired)
        groups = []
        for group in members:
            gid, gvec = self.vectors(sorted(group))
            items = self.items(gid.tolist())
            dist = np.linalg.norm(gvec - gvec[0], axis=1)
            groups.append([Hit(int(i), float(d), items[int(i)]) for i, d in zip(gid, dist) if int(i) in items])
        groups = [g for g in groups if len(g) > 1]
        groups.sort(key=lambda g: (-len(g), g[0].id))
        return groups

    def items(self, ids: Sequence[int]) -> dict[int, dict]:
        """id -> metadata of the indexed items among `ids`."""
        with self._lock:
            return self.store.items(ids)

    def vectors(self, ids: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """(ids, vectors) of the indexed items among `ids`: "search from this result" needs no image decoding."""
        with self._lock:
            return self.store.vectors(ids)

    def ids_for_hashes(self, hashes: Sequence[str]) -> dict[str, int]:
        """content hash -> id of the indexed items among `hashes`."""
        with self._lock:
            return self.store.ids_for_hashes(hashes)

    def path_items(self, paths: Sequence[str] | None = None, prefix: str | None = None) -> dict[int, tuple[str, str]]:
        """id -> (path, content hash) of the items at `paths`, or under the relative folder `prefix`."""
        with self._lock:
            return self.store.path_items(paths, prefix)

    def ids_where(self, where: Sequence[str] | dict) -> np.ndarray:
        """Ids of the items matching the conditions."""
        with self._lock:
            return self.store.ids_where(where)

    def stats(self, top: int = 10) -> dict:
        """Size, model, backend, commits and the most frequent labels: `guie index stats`."""
        with self._lock:
            h = self.store.header()
            n = len(self.store)
            return {"name": self.name, "folder": str(self.folder), "items": n, "dim": int(h["dim"]),
                    "model": h["model"], "image_root": h.get("image_root"), "seq": int(h["seq"]),
                    "next_id": int(h["next_id"]), "backend": self.backend.describe(),
                    "vector_bytes": n * int(h["dim"]) * 4, "columns": self.store.columns() if n else [],
                    "labels": self.store.value_counts("label", top) if n else [],
                    "commits": self.store.commits(top)}


LINKAGES = ("star", "single")


def _star_groups(paired: dict[int, set[int]]) -> list[list[int]]:
    """From the lowest id up: an ungrouped item and its ungrouped partners form a group."""
    grouped: set[int] = set()
    out = []
    for i in sorted(paired):
        if i in grouped:
            continue
        group = [i, *sorted(j for j in paired[i] if j not in grouped and j > i)]
        if len(group) > 1:
            grouped.update(group)
            out.append(group)
    return out


def _components(paired: dict[int, set[int]]) -> list[list[int]]:
    """The connected components of the pairs."""
    seen: set[int] = set()
    out = []
    for i in sorted(paired):
        if i in seen:
            continue
        stack, group = [i], []
        seen.add(i)
        while stack:
            j = stack.pop()
            group.append(j)
            for n in paired[j]:
                if n not in seen:
                    seen.add(n)
                    stack.append(n)
        out.append(sorted(group))
    return out


def check_max_distance(value) -> float | None:
    """A distance cut-off as a float (None: no cut-off); NaN, infinite or negative values are refused."""
    if value is None:
        return None
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise SearchIndexError(f"max_distance must be a number, got {value!r}") from None
    if not np.isfinite(value) or value < 0:
        raise SearchIndexError(f"max_distance must be a finite number >= 0, got {value}")
    return value


def _describe_where(conditions: dict[str, list[str]]) -> str:
    return " ".join(f"{c}={','.join(v)}" for c, v in conditions.items())


__all__ = ["LOCK_FILE", "AddResult", "BackendError", "Hit", "ImageIndex", "NewItem", "SearchIndexError",
           "check_max_distance", "index_home", "resolve_index"]
