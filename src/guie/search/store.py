"""The metadata store of a named index: one SQLite file that is the index's single source of truth.

Why SQLite (and not Parquet with a write-ahead step): an index is updated in small steps (add a folder, remove a
vendor, one item over HTTP) and read by id (GET /items/{id}), by content hash (dedup) and by column value
(`--where vendor=apple`). SQLite gives all three as indexed lookups, and its transaction *is* the commit protocol:
a commit (rows in, rows out, the commit counter, the removal log) is one transaction, so a kill -9 at any moment
leaves either the previous commit or the new one, never a mix, with no journal format of our own to get right.
Parquet would need a rewrite of the whole file per update plus a hand-made write-ahead log and manifest swap.

Tables:
    info     key -> JSON value: the header (model fingerprint, preprocessing, dim, backend, image root, ...),
             `seq` (the last commit) and `next_id` (ids are never reused, so an id always means the same item)
    items    id, content_hash (unique: adding the same file twice is a no-op), path (relative to the image root),
             label, meta (JSON of the other manifest columns), vector (float32 bytes), added_seq
    commits  seq, op, n, time: the history `guie index stats` prints
    removed  id, seq: the log of removals, so a backend that reflects an older commit (a snapshot written before a
             crash, another process's copy) is brought up to date by replaying what changed after it
"""
from __future__ import annotations

import functools
import json
import sqlite3
import time
from collections.abc import Iterable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import DiskFullError, InputError
from .filters import TEXT_COLUMNS, json_scalar, parse_where, sql_where

STORE_FILE = "index.sqlite"
SCHEMA_VERSION = 1
ITEM_COLUMNS = TEXT_COLUMNS  # stored in their own columns; every other manifest column goes into `meta`
SQLITE_MAGIC = b"SQLite format 3\x00"
SPOT_CHECKS = 16  # stored ids whose vectors are compared with a backend's on open
DAMAGED_FIX = "guie leaves the file as it is: restore it from a backup, or create the index again"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS info (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS items (
    id INTEGER PRIMARY KEY,
    content_hash TEXT NOT NULL UNIQUE,
    path TEXT,
    label TEXT,
    meta TEXT NOT NULL DEFAULT '{}',
    vector BLOB NOT NULL,
    added_seq INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS items_label ON items(label);
CREATE TABLE IF NOT EXISTS commits (seq INTEGER PRIMARY KEY, op TEXT NOT NULL, n INTEGER NOT NULL, time REAL);
CREATE TABLE IF NOT EXISTS removed (id INTEGER PRIMARY KEY, seq INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS items_seq ON items(added_seq);
CREATE INDEX IF NOT EXISTS removed_seq ON removed(seq);
"""


class StoreError(InputError):
    """The store file is missing, of another version, or asked for something it does not hold."""


@dataclass
class NewItem:
    """One item to add: its content hash, path (relative to the image root where possible), label and the other
    manifest columns."""

    content_hash: str
    path: str | None
    label: str | None
    meta: dict


def _guarded(method):
    """Run a store method with SQLite's errors turned into one line naming the file (`MetadataStore.error`)."""
    @functools.wraps(method)
    def run(self, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except sqlite3.DatabaseError as e:
            raise self.error(e) from None
    return run


class MetadataStore:
    """The SQLite file of one index (see the module docstring). Not shared between threads without a lock:
    `ImageIndex` serialises writers; readers may use their own `MetadataStore` on the same file.

    A file that is not a SQLite database (emptied, overwritten) is refused before SQLite opens it, so it is never
    turned into a fresh empty database; SQLite's own errors (a damaged page, a full disk, a lock held too long)
    become one `StoreError`/`DiskFullError` line naming the file."""

    def __init__(self, path: str | Path, readonly: bool = False):
        self.path = Path(path)
        if not self.path.is_file():
            raise StoreError(f"{self.path.parent}: not a guie index (no {self.path.name})")
        check_sqlite_file(self.path)
        try:
            self._db = self._connect(self.path, readonly)
        except sqlite3.DatabaseError as e:
            raise self.error(e) from None
        try:
            version = self.get_info("schema_version")
        except BaseException:
            self._db.close()
            raise
        if version != SCHEMA_VERSION:
            self._db.close()
            raise StoreError(f"{self.path}: index format version {version}, this guie reads {SCHEMA_VERSION}")

    @staticmethod
    def _connect(path: Path, readonly: bool) -> sqlite3.Connection:
        uri = f"file:{path}?mode={'ro' if readonly else 'rw'}"
        db = sqlite3.connect(uri, uri=True, isolation_level=None, check_same_thread=False, timeout=30)
        db.execute("PRAGMA busy_timeout = 30000")
        if not readonly:
            db.execute("PRAGMA journal_mode = WAL")  # readers never block the writer nor see half a commit
            db.execute("PRAGMA synchronous = FULL")  # a commit survives power loss, not only kill -9
        return db

    def error(self, e: sqlite3.DatabaseError) -> Exception:
        """The one-line error for a SQLite error on this file (disk full, damaged, locked, not an index); an
        error that points at guie's own SQL is returned unchanged (a bug keeps its traceback)."""
        name = getattr(e, "sqlite_errorname", "") or ""
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        if name == "SQLITE_FULL" or "disk is full" in msg or (name.startswith("SQLITE_IOERR") and _nearly_full(
                self.path.parent)):  # a full file system can also surface as an I/O error growing -wal or -shm
            return DiskFullError(f"{self.path}: disk full ({msg}); nothing was committed: free some space and run "
                                 "it again")
        if name in ("SQLITE_CORRUPT", "SQLITE_NOTADB") or "malformed" in msg or "not a database" in msg:
            return StoreError(f"{self.path}: damaged SQLite file ({msg}); {DAMAGED_FIX}")
        if name.startswith(("SQLITE_BUSY", "SQLITE_LOCKED")):
            return StoreError(f"{self.path}: locked by another process for over 30 s ({msg}); try again later")
        if name.startswith(("SQLITE_IOERR", "SQLITE_CANTOPEN", "SQLITE_READONLY", "SQLITE_PERM")):
            return StoreError(f"{self.path}: cannot be read or written ({msg})")
        if msg.startswith(("no such table", "no such column")):
            return StoreError(f"{self.path}: not a guie index store, or a damaged one ({msg}); {DAMAGED_FIX}")
        return e

    @classmethod
    def create(cls, path: str | Path, header: dict) -> MetadataStore:
        """A new store at `path` holding `header` (refuses to overwrite an existing one)."""
        path = Path(path)
        if path.exists():
            raise StoreError(f"{path.parent}: an index already exists there")
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.creating")
        tmp.unlink(missing_ok=True)
        try:
            db = sqlite3.connect(tmp, isolation_level=None)
            try:
                db.executescript(_SCHEMA)
                rows = {**header, "schema_version": SCHEMA_VERSION, "seq": 0, "next_id": 0}
                db.execute("BEGIN")
                db.executemany("INSERT INTO info VALUES (?, ?)", [(k, json.dumps(v)) for k, v in rows.items()])
                db.execute("INSERT INTO commits VALUES (0, 'create', 0, ?)", (time.time(),))
                db.execute("COMMIT")
            finally:
                db.close()
            tmp.replace(path)  # a half-created store is never mistaken for an index
        except sqlite3.DatabaseError as e:
            tmp.unlink(missing_ok=True)
            err = cls.__new__(cls)
            err.path = path
            raise err.error(e) from None
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return cls(path)

    def close(self) -> None:
        """Close the connection."""
        self._db.close()

    # -- header and counters -------------------------------------------------------------------------------------
    @_guarded
    def get_info(self, key: str, default=None):
        """One header value (JSON-decoded), or `default`."""
        row = self._db.execute("SELECT value FROM info WHERE key = ?", (key,)).fetchone()
        return json.loads(row[0]) if row else default

    @_guarded
    def header(self) -> dict:
        """Every header value, counters included."""
        return {k: json.loads(v) for k, v in self._db.execute("SELECT key, value FROM info")}

    @_guarded
    def set_info(self, key: str, value) -> None:
        """Set one header value (its own transaction)."""
        self._db.execute("INSERT OR REPLACE INTO info VALUES (?, ?)", (key, json.dumps(value)))

    @property
    def seq(self) -> int:
        """The last committed commit's number."""
        return int(self.get_info("seq"))

    @property
    def next_id(self) -> int:
        """The id the next added item gets (ids are never reused)."""
        return int(self.get_info("next_id"))

    @_guarded
    def __len__(self) -> int:
        return int(self._db.execute("SELECT COUNT(*) FROM items").fetchone()[0])

    # -- commits ---------------------------------------------------------------------------------------------------
    @contextmanager
    def _transaction(self):
        """BEGIN IMMEDIATE ... COMMIT, rolled back on any error; when SQLite has already rolled back itself (a full
        disk does that), the original error is what surfaces, not "cannot rollback - no transaction is active"."""
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            yield db
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise

    @_guarded
    def commit_add(self, items: Sequence[NewItem], vectors: np.ndarray, op: str = "add") -> tuple[int, np.ndarray]:
        """Add `items` with their `vectors` [n, dim] in one transaction; items whose content hash is already stored
        are skipped. Returns (the new commit's seq, the ids of the added items, in input order; -1 for skipped).
        When every item is stored already nothing is committed and the seq is the last commit's."""
        vectors = self._checked_vectors(items, vectors)
        with self._transaction() as db:
            seq = self.seq + 1
            ids, next_id = self._insert_new(db, items, vectors, seq)
            if next_id == self.next_id:
                return seq - 1, ids
            self._bump(seq, op, next_id - self.next_id, next_id)
        return seq, ids

    def _checked_vectors(self, items: Sequence[NewItem], vectors: np.ndarray) -> np.ndarray:
        """`vectors` as little-endian float32 rows, one per item, of the index's dimension (else a StoreError)."""
        vectors = np.ascontiguousarray(vectors, dtype="<f4")
        dim = int(self.get_info("dim"))
        if len(items) != len(vectors) or (len(vectors) and vectors.shape[1] != dim):
            raise StoreError(f"{len(items)} items and vectors of shape {vectors.shape}; the index is {dim}-d")
        return vectors

    def _insert_new(self, db, items: Sequence[NewItem], vectors: np.ndarray, seq: int) -> tuple[np.ndarray, int]:
        """Insert the items whose content is not stored yet (nor earlier in `items`) under commit `seq`, with ids
        from `next_id` on. Returns (the ids in input order, -1 for content stored already; the next free id)."""
        next_id = self.next_id
        ids = np.full(len(items), -1, dtype=np.int64)
        seen = {h for (h,) in db.execute("SELECT content_hash FROM items WHERE content_hash IN (SELECT value FROM "
                                         "json_each(?))", (json.dumps([it.content_hash for it in items]),))}
        rows = []
        for i, (it, v) in enumerate(zip(items, vectors)):
            if it.content_hash in seen:
                continue
            seen.add(it.content_hash)
            ids[i] = next_id
            rows.append((next_id, it.content_hash, it.path, it.label,
                         json.dumps({k: json_scalar(x) for k, x in it.meta.items()}), v.tobytes(), seq))
            next_id += 1
        db.executemany("INSERT INTO items VALUES (?, ?, ?, ?, ?, ?, ?)", rows)
        return ids, next_id

    @staticmethod
    def _delete_stored(db, ids: Iterable[int], seq: int) -> list[int]:
        """Delete the stored items among `ids`, logging each removal under commit `seq`; the ids deleted."""
        wanted = json.dumps(sorted({int(i) for i in ids}))
        found = [i for (i,) in db.execute("SELECT id FROM items WHERE id IN (SELECT value FROM json_each(?))",
                                          (wanted,))]
        if found:
            db.execute("DELETE FROM items WHERE id IN (SELECT value FROM json_each(?))", (json.dumps(found),))
            db.executemany("INSERT OR REPLACE INTO removed VALUES (?, ?)", [(i, seq) for i in found])
        return found

    @_guarded
    def commit_remove(self, ids: Iterable[int], op: str = "remove") -> tuple[int, np.ndarray]:
        """Remove the stored items among `ids` in one transaction, logging each removal with the commit's seq.
        Returns (the new commit's seq, the ids actually removed). When none of `ids` is stored nothing is
        committed and the seq is the last commit's."""
        with self._transaction() as db:
            seq = self.seq + 1
            found = self._delete_stored(db, ids, seq)
            if not found:
                return seq - 1, np.empty(0, np.int64)
            self._bump(seq, op, len(found), self.next_id)
        return seq, np.asarray(found, dtype=np.int64)

    @_guarded
    def commit_changes(self, remove: Iterable[int], items: Sequence[NewItem], vectors: np.ndarray,
                       op: str = "sync") -> tuple[int, np.ndarray, np.ndarray]:
        """Remove the stored items among `remove` and add `items` with their `vectors`, in ONE transaction (a
        watched folder's batch: a renamed or changed file is never half-applied). Removals come first, so content
        removed here may be added back under another path. Returns (the commit's seq, the removed ids, the added
        ids in input order, -1 for content stored already); when nothing changes nothing is committed."""
        vectors = self._checked_vectors(items, vectors)
        with self._transaction() as db:
            seq = self.seq + 1
            found = self._delete_stored(db, remove, seq)
            ids, next_id = self._insert_new(db, items, vectors, seq)
            added = next_id - self.next_id
            if not added and not found:
                return seq - 1, np.empty(0, np.int64), ids
            self._bump(seq, op, added + len(found), next_id)
        return seq, np.asarray(found, dtype=np.int64), ids

    def _bump(self, seq: int, op: str, n: int, next_id: int) -> None:
        self._db.executemany("INSERT OR REPLACE INTO info VALUES (?, ?)",
                             [("seq", json.dumps(seq)), ("next_id", json.dumps(next_id))])
        self._db.execute("INSERT INTO commits VALUES (?, ?, ?, ?)", (seq, op, n, time.time()))

    @contextmanager
    def _reading(self):
        """One read transaction: no commit of another process lands half-way through."""
        db = self._db
        db.execute("BEGIN")
        try:
            yield db
        finally:
            if db.in_transaction:
                db.execute("COMMIT")

    @_guarded
    def changes_after(self, seq: int) -> tuple[int, np.ndarray, np.ndarray, np.ndarray, list[dict]]:
        """What a backend that reflects commit `seq` lacks, read in one consistent snapshot:
        (the last commit, ids removed after `seq`, then ids, vectors and filter attributes of items added after it).
        """
        with self._reading() as db:
            last = self.seq
            removed = np.asarray([i for (i,) in db.execute("SELECT id FROM removed WHERE seq > ? ORDER BY id",
                                                           (seq,))], dtype=np.int64)
            ids, vectors, attrs = self._rows("WHERE added_seq > ?", (seq,))
        return last, removed, ids, vectors, attrs

    @_guarded
    def id_summary(self, samples: int = SPOT_CHECKS) -> tuple[int, tuple[int, int, int, int], np.ndarray]:
        """(the last commit, (count, min, max, sum) of the stored ids, up to `samples` stored ids spread evenly
        between min and max), read in one consistent snapshot, by SQL aggregates and index seeks (no scan in
        Python): what a backend is verified against on open."""
        with self._reading() as db:  # SQLite scans the small added_seq index for these, not the vectors
            last = self.seq
            n, low, high, total = db.execute("SELECT COUNT(*), MIN(id), MAX(id), SUM(id) FROM items").fetchone()
            picks: list[int] = []
            if n:
                for target in np.linspace(low, high, min(samples, n)).astype(np.int64):
                    seek = "SELECT id FROM items WHERE id >= ? ORDER BY id LIMIT 1"
                    picks.append(db.execute(seek, (int(target),)).fetchone()[0])
        summary = (int(n), int(low), int(high), int(total)) if n else (0, -1, -1, 0)
        return last, summary, np.unique(np.asarray(picks, np.int64))

    @_guarded
    def all_rows(self) -> tuple[np.ndarray, np.ndarray, list[dict]]:
        """(ids, vectors, filter attributes) of every item, ascending id: what a backend is rebuilt from."""
        return self._rows("", ())

    def _rows(self, where_sql: str, args: tuple, batch: int = 65536):
        dim = int(self.get_info("dim"))
        cur = self._db.execute(f"SELECT id, vector, path, label, meta FROM items {where_sql} ORDER BY id", args)
        ids, chunks, attrs = [], [], []
        while rows := cur.fetchmany(batch):
            ids.extend(r[0] for r in rows)
            blob = b"".join(r[1] for r in rows)
            if len(blob) != len(rows) * dim * 4:
                raise StoreError(f"{self.path}: stored vectors are not {dim}-d float32; {DAMAGED_FIX}")
            chunks.append(np.frombuffer(blob, dtype="<f4").reshape(-1, dim))
            attrs.extend({"path": r[2], "label": r[3], **json.loads(r[4])} for r in rows)
        vecs = np.concatenate(chunks).astype(np.float32) if chunks else np.empty((0, dim), np.float32)
        return np.asarray(ids, dtype=np.int64), vecs, attrs

    @_guarded
    def data_version(self) -> int:
        """Changes whenever another connection commits to the file (SQLite's `PRAGMA data_version`)."""
        return int(self._db.execute("PRAGMA data_version").fetchone()[0])

    @_guarded
    def commits(self, last: int = 10) -> list[dict]:
        """The last `last` commits, newest first."""
        cur = self._db.execute("SELECT seq, op, n, time FROM commits ORDER BY seq DESC LIMIT ?", (last,))
        return [{"seq": s, "op": op, "n": n, "time": t} for s, op, n, t in cur]

    # -- reads -----------------------------------------------------------------------------------------------------
    @_guarded
    def ids(self) -> np.ndarray:
        """Every stored id, ascending."""
        return np.asarray([i for (i,) in self._db.execute("SELECT id FROM items ORDER BY id")], dtype=np.int64)

    @_guarded
    def vectors(self, ids: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """(ids, float32 [n, dim]) of the stored items among `ids`, ascending id (exact re-ranking reads these)."""
        ids_, vecs, _ = self._rows("WHERE id IN (SELECT value FROM json_each(?))", (json.dumps([int(i) for i in ids]),))
        return ids_, vecs

    @_guarded
    def items(self, ids: Sequence[int]) -> dict[int, dict]:
        """id -> {id, path, label, content_hash, added_seq, **meta} for the stored ones among `ids`."""
        cur = self._db.execute("SELECT id, content_hash, path, label, meta, added_seq FROM items "
                               "WHERE id IN (SELECT value FROM json_each(?))", (json.dumps([int(i) for i in ids]),))
        out = {}
        for i, h, path, label, meta, seq in cur:
            out[i] = {"id": i, "path": path, "label": label, **json.loads(meta), "content_hash": h, "added_seq": seq}
        return out

    @_guarded
    def known_hashes(self, hashes: Sequence[str]) -> set[str]:
        """The content hashes among `hashes` that are already stored."""
        cur = self._db.execute("SELECT content_hash FROM items WHERE content_hash IN (SELECT value FROM json_each(?))",
                               (json.dumps(list(hashes)),))
        return {h for (h,) in cur}

    @_guarded
    def ids_for_hashes(self, hashes: Sequence[str]) -> dict[str, int]:
        """content hash -> id of the stored items among `hashes`."""
        cur = self._db.execute("SELECT content_hash, id FROM items WHERE content_hash IN (SELECT value FROM "
                               "json_each(?))", (json.dumps(list(hashes)),))
        return {h: i for h, i in cur}

    @_guarded
    def ids_where(self, where: dict[str, list[str]] | Sequence[str]) -> np.ndarray:
        """Ids of the items matching every condition (`parse_where` form, typed as `guie.search.filters` says)."""
        clause, args = sql_where(parse_where(where))
        sql = f"SELECT id FROM items WHERE {clause} ORDER BY id"
        return np.asarray([i for (i,) in self._db.execute(sql, args)], dtype=np.int64)

    @_guarded
    def path_items(self, paths: Sequence[str] | None = None, prefix: str | None = None) -> dict[int, tuple[str, str]]:
        """id -> (path, content hash) of the items stored under one of `paths`, or under the folder `prefix`
        (relative paths only: `""` is the whole image root), ascending id: what a watched folder is compared with."""
        if paths is not None:
            cur = self._db.execute("SELECT id, path, content_hash FROM items WHERE path IN (SELECT value FROM "
                                   "json_each(?)) ORDER BY id", (json.dumps(list(paths)),))
        else:
            low = prefix.rstrip("/") + "/" if prefix else ""
            cur = self._db.execute("SELECT id, path, content_hash FROM items WHERE path >= ? AND path < ? ORDER BY id",
                                   (low, low + "\U0010ffff"))
        return {i: (p, h) for i, p, h in cur}

    @_guarded
    def columns(self) -> list[str]:
        """The metadata columns items have (path, label and the keys of `meta`)."""
        keys = {k for (k,) in self._db.execute("SELECT DISTINCT j.key FROM items, json_each(items.meta) AS j")}
        return ["path", "label", *sorted(keys)]

    @_guarded
    def value_counts(self, column: str, top: int = 20) -> list[tuple[str, int]]:
        """The most frequent values of one metadata column, for `stats`."""
        expr = column if column in ITEM_COLUMNS else "json_extract(meta, ?)"
        args = [] if column in ITEM_COLUMNS else [f'$."{column}"']
        cur = self._db.execute(f"SELECT CAST({expr} AS TEXT) AS v, COUNT(*) FROM items GROUP BY v "
                               "ORDER BY COUNT(*) DESC, v LIMIT ?", (*args, top))
        return [(v, n) for v, n in cur]


def _nearly_full(folder: Path, margin: int = 16 << 20) -> bool:
    """Whether the file system holding `folder` has less than `margin` bytes free."""
    import shutil

    try:
        return shutil.disk_usage(folder).free < margin
    except OSError:
        return False


def check_sqlite_file(path: Path) -> None:
    """Refuse a store file that is not a SQLite database (emptied, truncated, overwritten) before SQLite opens it:
    SQLite would treat an empty file as a new database and write one into it."""
    try:
        with open(path, "rb") as f:
            magic = f.read(len(SQLITE_MAGIC))
    except OSError as e:
        raise StoreError(f"{path}: cannot be read ({e.strerror})") from None
    if not magic:
        raise StoreError(f"{path}: empty file (0 bytes), not an index store; {DAMAGED_FIX}")
    if magic != SQLITE_MAGIC:
        raise StoreError(f"{path}: not a SQLite file (damaged or replaced); {DAMAGED_FIX}")


__all__ = ["ITEM_COLUMNS", "STORE_FILE", "MetadataStore", "NewItem", "StoreError", "check_sqlite_file",
           "parse_where"]
