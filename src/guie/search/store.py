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

import json
import math
import sqlite3
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import InputError

STORE_FILE = "index.sqlite"
SCHEMA_VERSION = 1
ITEM_COLUMNS = ("path", "label")  # stored in their own columns; every other manifest column goes into `meta`

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


def parse_where(conditions: Sequence[str] | dict | None) -> dict[str, list[str]]:
    """`["vendor=apple,google", "split=test"]` (or a dict) -> {"vendor": ["apple", "google"], "split": ["test"]}.

    Values are compared as text, like `guie embed --where`."""
    if not conditions:
        return {}
    if isinstance(conditions, dict):
        return {str(k): [str(x) for x in (v if isinstance(v, (list, tuple)) else [v])] for k, v in conditions.items()}
    out: dict[str, list[str]] = {}
    for cond in conditions:
        col, sep, values = str(cond).partition("=")
        if not sep or not col:
            raise InputError(f"filter {cond!r} must look like column=value")
        out.setdefault(col.strip(), []).extend(values.split(","))
    return out


def _json_cell(value):
    """A manifest cell as a JSON value: numpy scalars to Python, NaN/NaT to null."""
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        try:
            value = value.item()
        except (ValueError, AttributeError):
            value = str(value)
    if isinstance(value, float) and math.isnan(value):
        return None
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return str(value)


class MetadataStore:
    """The SQLite file of one index (see the module docstring). Not shared between threads without a lock:
    `ImageIndex` serialises writers; readers may use their own `MetadataStore` on the same file."""

    def __init__(self, path: str | Path, readonly: bool = False):
        self.path = Path(path)
        if not self.path.is_file():
            raise StoreError(f"{self.path.parent}: not a guie index (no {self.path.name})")
        self._db = self._connect(self.path, readonly)
        version = self.get_info("schema_version")
        if version != SCHEMA_VERSION:
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

    @classmethod
    def create(cls, path: str | Path, header: dict) -> MetadataStore:
        """A new store at `path` holding `header` (refuses to overwrite an existing one)."""
        path = Path(path)
        if path.exists():
            raise StoreError(f"{path.parent}: an index already exists there")
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.creating")
        tmp.unlink(missing_ok=True)
        db = sqlite3.connect(tmp, isolation_level=None)
        db.executescript(_SCHEMA)
        rows = {**header, "schema_version": SCHEMA_VERSION, "seq": 0, "next_id": 0}
        db.execute("BEGIN")
        db.executemany("INSERT INTO info VALUES (?, ?)", [(k, json.dumps(v)) for k, v in rows.items()])
        db.execute("INSERT INTO commits VALUES (0, 'create', 0, ?)", (time.time(),))
        db.execute("COMMIT")
        db.close()
        tmp.replace(path)  # a half-created store is never mistaken for an index
        return cls(path)

    def close(self) -> None:
        """Close the connection."""
        self._db.close()

    # -- header and counters -------------------------------------------------------------------------------------
    def get_info(self, key: str, default=None):
        """One header value (JSON-decoded), or `default`."""
        row = self._db.execute("SELECT value FROM info WHERE key = ?", (key,)).fetchone()
        return json.loads(row[0]) if row else default

    def header(self) -> dict:
        """Every header value, counters included."""
        return {k: json.loads(v) for k, v in self._db.execute("SELECT key, value FROM info")}

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

    def __len__(self) -> int:
        return int(self._db.execute("SELECT COUNT(*) FROM items").fetchone()[0])

    # -- commits ---------------------------------------------------------------------------------------------------
    def commit_add(self, items: Sequence[NewItem], vectors: np.ndarray, op: str = "add") -> tuple[int, np.ndarray]:
        """Add `items` with their `vectors` [n, dim] in one transaction; items whose content hash is already stored
        are skipped. Returns (the new commit's seq, the ids of the added items, in input order; -1 for skipped)."""
        vectors = np.ascontiguousarray(vectors, dtype="<f4")
        dim = int(self.get_info("dim"))
        if len(items) != len(vectors) or (len(vectors) and vectors.shape[1] != dim):
            raise StoreError(f"{len(items)} items and vectors of shape {vectors.shape}; the index is {dim}-d")
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            seq, next_id = self.seq + 1, self.next_id
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
                             json.dumps({k: _json_cell(x) for k, x in it.meta.items()}), v.tobytes(), seq))
                next_id += 1
            db.executemany("INSERT INTO items VALUES (?, ?, ?, ?, ?, ?, ?)", rows)
            self._bump(seq, op, len(rows), next_id)
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        return seq, ids

    def commit_remove(self, ids: Iterable[int], op: str = "remove") -> tuple[int, np.ndarray]:
        """Remove the stored items among `ids` in one transaction, logging each removal with the commit's seq.
        Returns (the new commit's seq, the ids actually removed)."""
        wanted = json.dumps(sorted({int(i) for i in ids}))
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            found = [i for (i,) in db.execute("SELECT id FROM items WHERE id IN (SELECT value FROM json_each(?))",
                                              (wanted,))]
            seq = self.seq + 1
            db.execute("DELETE FROM items WHERE id IN (SELECT value FROM json_each(?))", (json.dumps(found),))
            db.executemany("INSERT OR REPLACE INTO removed VALUES (?, ?)", [(i, seq) for i in found])
            self._bump(seq, op, len(found), self.next_id)
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        return seq, np.asarray(found, dtype=np.int64)

    def _bump(self, seq: int, op: str, n: int, next_id: int) -> None:
        self._db.executemany("INSERT OR REPLACE INTO info VALUES (?, ?)",
                             [("seq", json.dumps(seq)), ("next_id", json.dumps(next_id))])
        self._db.execute("INSERT INTO commits VALUES (?, ?, ?, ?)", (seq, op, n, time.time()))

    def changes_after(self, seq: int) -> tuple[int, np.ndarray, np.ndarray, np.ndarray, list[dict]]:
        """What a backend that reflects commit `seq` lacks, read in one consistent snapshot:
        (the last commit, ids removed after `seq`, then ids, vectors and filter attributes of items added after it).
        """
        db = self._db
        db.execute("BEGIN")  # one read transaction: no commit of another process lands half-way through
        try:
            last = self.seq
            removed = np.asarray([i for (i,) in db.execute("SELECT id FROM removed WHERE seq > ? ORDER BY id",
                                                           (seq,))], dtype=np.int64)
            ids, vectors, attrs = self._rows("WHERE added_seq > ?", (seq,))
        finally:
            db.execute("COMMIT")
        return last, removed, ids, vectors, attrs

    def all_rows(self) -> tuple[np.ndarray, np.ndarray, list[dict]]:
        """(ids, vectors, filter attributes) of every item, ascending id: what a backend is rebuilt from."""
        return self._rows("", ())

    def _rows(self, where_sql: str, args: tuple, batch: int = 65536):
        dim = int(self.get_info("dim"))
        cur = self._db.execute(f"SELECT id, vector, path, label, meta FROM items {where_sql} ORDER BY id", args)
        ids, chunks, attrs = [], [], []
        while rows := cur.fetchmany(batch):
            ids.extend(r[0] for r in rows)
            chunks.append(np.frombuffer(b"".join(r[1] for r in rows), dtype="<f4").reshape(-1, dim))
            attrs.extend({"path": r[2], "label": r[3], **json.loads(r[4])} for r in rows)
        vecs = np.concatenate(chunks).astype(np.float32) if chunks else np.empty((0, dim), np.float32)
        return np.asarray(ids, dtype=np.int64), vecs, attrs

    def data_version(self) -> int:
        """Changes whenever another connection commits to the file (SQLite's `PRAGMA data_version`)."""
        return int(self._db.execute("PRAGMA data_version").fetchone()[0])

    def commits(self, last: int = 10) -> list[dict]:
        """The last `last` commits, newest first."""
        cur = self._db.execute("SELECT seq, op, n, time FROM commits ORDER BY seq DESC LIMIT ?", (last,))
        return [{"seq": s, "op": op, "n": n, "time": t} for s, op, n, t in cur]

    # -- reads -----------------------------------------------------------------------------------------------------
    def ids(self) -> np.ndarray:
        """Every stored id, ascending."""
        return np.asarray([i for (i,) in self._db.execute("SELECT id FROM items ORDER BY id")], dtype=np.int64)

    def vectors(self, ids: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """(ids, float32 [n, dim]) of the stored items among `ids`, ascending id (exact re-ranking reads these)."""
        ids_, vecs, _ = self._rows("WHERE id IN (SELECT value FROM json_each(?))", (json.dumps([int(i) for i in ids]),))
        return ids_, vecs

    def items(self, ids: Sequence[int]) -> dict[int, dict]:
        """id -> {id, path, label, content_hash, added_seq, **meta} for the stored ones among `ids`."""
        cur = self._db.execute("SELECT id, content_hash, path, label, meta, added_seq FROM items "
                               "WHERE id IN (SELECT value FROM json_each(?))", (json.dumps([int(i) for i in ids]),))
        out = {}
        for i, h, path, label, meta, seq in cur:
            out[i] = {"id": i, "path": path, "label": label, **json.loads(meta), "content_hash": h, "added_seq": seq}
        return out

    def known_hashes(self, hashes: Sequence[str]) -> set[str]:
        """The content hashes among `hashes` that are already stored."""
        cur = self._db.execute("SELECT content_hash FROM items WHERE content_hash IN (SELECT value FROM json_each(?))",
                               (json.dumps(list(hashes)),))
        return {h for (h,) in cur}

    def ids_for_hashes(self, hashes: Sequence[str]) -> dict[str, int]:
        """content hash -> id of the stored items among `hashes`."""
        cur = self._db.execute("SELECT content_hash, id FROM items WHERE content_hash IN (SELECT value FROM "
                               "json_each(?))", (json.dumps(list(hashes)),))
        return {h: i for h, i in cur}

    def ids_where(self, where: dict[str, list[str]] | Sequence[str]) -> np.ndarray:
        """Ids of the items matching every condition (`parse_where` form; values compared as text)."""
        clauses, args = [], []
        for col, values in parse_where(where).items():
            if col in ("id", *ITEM_COLUMNS):
                expr = f"CAST({col} AS TEXT)"
            else:
                expr = "CAST(json_extract(meta, ?) AS TEXT)"
                args.append(f'$."{col}"')
            clauses.append(f"{expr} IN (SELECT value FROM json_each(?))")
            args.append(json.dumps([str(v) for v in values]))
        sql = "SELECT id FROM items" + (" WHERE " + " AND ".join(clauses) if clauses else "") + " ORDER BY id"
        return np.asarray([i for (i,) in self._db.execute(sql, args)], dtype=np.int64)

    def columns(self) -> list[str]:
        """The metadata columns items have (path, label and the keys of `meta`)."""
        keys = {k for (k,) in self._db.execute("SELECT DISTINCT j.key FROM items, json_each(items.meta) AS j")}
        return ["path", "label", *sorted(keys)]

    def value_counts(self, column: str, top: int = 20) -> list[tuple[str, int]]:
        """The most frequent values of one metadata column, for `stats`."""
        expr = column if column in ITEM_COLUMNS else "json_extract(meta, ?)"
        args = [] if column in ITEM_COLUMNS else [f'$."{column}"']
        cur = self._db.execute(f"SELECT CAST({expr} AS TEXT) AS v, COUNT(*) FROM items GROUP BY v "
                               "ORDER BY COUNT(*) DESC, v LIMIT ?", (*args, top))
        return [(v, n) for v, n in cur]
