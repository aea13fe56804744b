"""Embeddings files: `embed_to_file` writes image embeddings to Parquet through resumable parts, `read_embeddings`
reads them back (manifest columns + a fixed-size-list `embedding` column; the model's fingerprint in the file's
metadata, `embeddings_fingerprint`).

The parts of one output `OUT` live in ``OUT.parts/`` (`EmbeddingParts`): `meta.json` (model fingerprint, manifest
hash, row count, part size), `rows.parquet` (the manifest's paths, so that a merge can check every row), and per
part s (rows s*part_size ... ) `part-<s>.parquet` with the embedded rows and `part-<s>.failed.json` with the rows
that could not be read. A part's Parquet file is written last and atomically: its presence marks a finished part.
Whatever computes the vectors (this process, torchrun ranks, `--shard i/N` jobs, Ray actors) fills parts through
`PartWriter`, and `merge_parts` checks that every row is there exactly once before it writes `OUT`.

An interrupted run redoes only unfinished parts; a rerun with another model or manifest is refused
(`Embedder.fingerprint`, `ResumeError`). Reading a file needs only pyarrow/pandas: torch is imported by the functions
that run a model, so search and evaluation can read embeddings without it.
"""
from __future__ import annotations

import hashlib
import json
import shutil
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from ..errors import GuieError, InputError, MissingFileError
from ..utils import atomic_output, atomic_write_json, log, save_parquet_atomic

if TYPE_CHECKING:
    from ..models.embedder import Embedder
    from ..models.preprocess import PreprocessConfig

EMBEDDING_COLUMN = "embedding"
FINGERPRINT_KEY = b"guie.fingerprint"  # Parquet schema metadata: the model fingerprint of the vectors
PARTS_LAYOUT = 2  # meta.json's "layout": parts of older layouts (failures without row numbers) are not resumed


class ResumeError(GuieError, RuntimeError):
    """Finished shards of an earlier run that used another model or manifest are in the way."""


class IncompleteError(GuieError, RuntimeError):
    """A merge found rows missing (parts not finished yet) or present more than once."""


def embeddings_table(df: pd.DataFrame, emb: np.ndarray, schema: pa.Schema | None = None,
                     fingerprint: str | None = None) -> pa.Table:
    """Manifest columns + an `embedding` fixed-size-list float32 column (+ `fingerprint` in the metadata).

    `schema` (of the whole manifest) keeps every shard's column types equal, e.g. a text column that is empty in
    one shard would otherwise become a null column there and the shards could not be concatenated.
    """
    table = pa.Table.from_pandas(df.reset_index(drop=True), schema=schema, preserve_index=False)
    values = pa.array(np.ascontiguousarray(emb, dtype=np.float32).reshape(-1))
    table = table.append_column(EMBEDDING_COLUMN, pa.FixedSizeListArray.from_arrays(values, emb.shape[1]))
    return _with_fingerprint(table, fingerprint)


def _with_fingerprint(table: pa.Table, fingerprint: str | None) -> pa.Table:
    if fingerprint is None:
        return table
    return table.replace_schema_metadata({**(table.schema.metadata or {}), FINGERPRINT_KEY: fingerprint.encode()})


def embeddings_fingerprint(path: str | Path) -> str | None:
    """The model fingerprint (`Embedder.fingerprint`) an embeddings file or part was written with; None for files
    written before guie recorded it (or by other tools)."""
    try:
        meta = pq.read_schema(path).metadata or {}
    except Exception as e:
        raise InputError(f"{path}: cannot read Parquet ({type(e).__name__}: {e})") from None
    value = meta.get(FINGERPRINT_KEY)
    return value.decode() if value else None


def read_embeddings(path: str | Path) -> tuple[pd.DataFrame, np.ndarray]:
    """Read a guie embeddings Parquet file -> (metadata DataFrame, float32 [N, d])."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(path, "embeddings file")
    try:
        table = pq.read_table(path)
    except Exception as e:
        raise InputError(f"{path}: cannot read Parquet ({type(e).__name__}: {e})") from None
    return embeddings_from_table(table, path)


def embeddings_from_table(table: pa.Table, path) -> tuple[pd.DataFrame, np.ndarray]:
    """A guie embeddings table (read from `path`, named in errors) -> (metadata DataFrame, float32 [N, d])."""
    if EMBEDDING_COLUMN not in table.column_names:
        raise InputError(f"{path}: no '{EMBEDDING_COLUMN}' column; is this a guie embeddings file?")
    col = table.column(EMBEDDING_COLUMN).combine_chunks()
    df = table.drop([EMBEDDING_COLUMN]).to_pandas()
    if table.num_rows == 0:
        return df, np.zeros((0, getattr(col.type, "list_size", 0)), np.float32)
    if not hasattr(col.type, "list_size"):  # guie writes fixed-size lists; accept equal-length lists too
        try:
            return df, np.stack([np.asarray(v, dtype=np.float32) for v in col.to_pylist()])
        except (ValueError, TypeError) as e:
            raise InputError(f"{path}: '{EMBEDDING_COLUMN}' does not hold vectors of one length ({e})") from None
    emb = col.values.to_numpy(zero_copy_only=False).astype(np.float32, copy=False).reshape(-1, col.type.list_size)
    return df, emb


# --- the parts of one output ----------------------------------------------------------------------------------

def parts_folder(out_path: str | Path) -> Path:
    """Where the resumable parts of the embeddings file `out_path` are kept: ``<out>.parts/``."""
    out_path = Path(out_path)
    return out_path.with_name(out_path.name + ".parts")


@dataclass
class EmbeddingParts:
    """The resumable parts of one embeddings file (see the module docstring): which rows each part holds, which are
    finished, and the writing of one. Made by `plan_parts`; every engine that embeds uses it."""

    out_path: Path
    manifest: pd.DataFrame            # the rows, as written to the output (path as listed)
    schema: pa.Schema                 # of the manifest columns, the same in every part
    paths: list[str]                  # the files to read, one per row
    part_size: int
    fingerprint: str                  # `Embedder.fingerprint(features, preprocess)`

    @property
    def folder(self) -> Path:
        """``<out>.parts/``."""
        return parts_folder(self.out_path)

    @property
    def n_parts(self) -> int:
        """How many parts the rows make."""
        return -(-len(self.paths) // self.part_size)

    def part(self, s: int) -> Path:
        """The Parquet file of part `s` (present = finished)."""
        return self.folder / f"part-{s:06d}.parquet"

    def rows(self, s: int) -> tuple[int, int]:
        """The row range [lo, hi) of part `s`."""
        return s * self.part_size, min(len(self.paths), (s + 1) * self.part_size)

    def todo(self, index: int = 0, count: int = 1) -> list[int]:
        """The unfinished parts among those of shard `index` of `count` (parts s with s % count == index): a
        deterministic partition, so `count` jobs on the same manifest write disjoint parts."""
        return [s for s in range(index, self.n_parts, count) if not self.part(s).exists()]

    def write_part(self, s: int, embedded: np.ndarray, vectors: np.ndarray,
                   failures: Sequence[tuple[int, str]]) -> None:
        """Write part `s`: `embedded` (bool per row of the part) rows with their `vectors`, and the `failures`
        (row number in the manifest, one-line message). The failures first, the Parquet file last (atomically)."""
        lo, hi = self.rows(s)
        records = [{"row": int(i), "error": msg} for i, msg in sorted(failures)]
        atomic_write_json(records, self.folder / f"part-{s:06d}.failed.json")
        rows = self.manifest.iloc[lo:hi][embedded]
        save_parquet_atomic(embeddings_table(rows, vectors, self.schema, self.fingerprint), self.part(s))


def plan_parts(embedder: Embedder, manifest: pd.DataFrame, out_path: str | Path, part_size: int = 4096,
               features: bool = False, preprocess: PreprocessConfig | None = None, paths: list[str] | None = None,
               overwrite: bool = False, prepare: bool = True) -> EmbeddingParts:
    """Check a manifest for embedding into `out_path` and describe its parts; with `prepare`, make ``<out>.parts/``
    (refusing, ResumeError, finished parts of another model or manifest unless `overwrite` discards them).

    `paths`: the files to read, one per row, when the manifest's `path` column is not directly readable; the
    output keeps the manifest's own column."""
    out_path = Path(out_path)
    if "path" not in manifest.columns:
        raise InputError(f"the manifest has no 'path' column (columns: {list(manifest.columns)})")
    if manifest.empty:
        raise InputError("the manifest has no rows")
    if part_size < 1:
        raise InputError(f"shard_size must be >= 1, got {part_size}")
    if EMBEDDING_COLUMN in manifest.columns:  # re-embedding an embeddings file: its old vectors are replaced
        manifest = manifest.drop(columns=[EMBEDDING_COLUMN])
    manifest = manifest.reset_index(drop=True)
    try:
        schema = pa.Schema.from_pandas(manifest, preserve_index=False)
    except (pa.ArrowException, TypeError, ValueError) as e:
        raise InputError(f"manifest columns cannot be stored in Parquet: {e}") from None
    paths = manifest["path"].astype(str).tolist() if paths is None else [str(p) for p in paths]
    if len(paths) != len(manifest):
        raise InputError(f"{len(paths)} paths for a manifest of {len(manifest)} rows")
    plan = EmbeddingParts(out_path, manifest, schema, paths, part_size,
                          embedder.fingerprint(features, preprocess or embedder.preprocess))
    if prepare:
        meta = {"model": plan.fingerprint, "manifest": _manifest_hash(manifest), "shard_size": part_size,
                "rows": len(manifest), "layout": PARTS_LAYOUT}
        _prepare_parts(plan.folder, meta, overwrite)
        rows_file = plan.folder / "rows.parquet"
        if not rows_file.exists():  # the paths as listed: what `merge_parts` checks the parts against
            save_parquet_atomic(pa.table({"path": manifest["path"].astype(str).tolist()}), rows_file)
    return plan


class PartWriter:
    """Collects embedded rows and failures arriving in any order and writes each part of `todo` as soon as its
    last row is in. A row that arrives twice (a retried task) counts once: the first arrival is kept."""

    def __init__(self, plan: EmbeddingParts, todo: Sequence[int], dim: int):
        self.plan, self.dim = plan, dim
        self.pending = {s: None for s in todo}
        self.written = 0

    def _state(self, s: int) -> dict:
        st = self.pending[s]
        if st is None:
            lo, hi = self.plan.rows(s)
            st = self.pending[s] = {"emb": np.empty((hi - lo, self.dim), np.float32), "ok": np.zeros(hi - lo, bool),
                                    "done": np.zeros(hi - lo, bool), "failures": []}
        return st

    def add(self, rows: np.ndarray, vectors: np.ndarray, failures: Sequence[tuple[int, str]] = ()) -> None:
        """Embedded `rows` (manifest row numbers) with their `vectors`, and `failures` (row, message)."""
        rows = np.asarray(rows, dtype=np.int64)
        touched = set()
        for s in np.unique(rows // self.plan.part_size):
            s = int(s)
            if s not in self.pending:  # a part finished already (a retried task's late copy)
                continue
            st, sel = self._state(s), rows // self.plan.part_size == s
            local = rows[sel] - self.plan.rows(s)[0]
            fresh = ~st["done"][local]
            st["emb"][local[fresh]], st["ok"][local[fresh]], st["done"][local[fresh]] = vectors[sel][fresh], True, True
            touched.add(s)
        for i, msg in failures:
            s = int(i) // self.plan.part_size
            if s not in self.pending:
                continue
            st, local = self._state(s), int(i) - self.plan.rows(s)[0]
            if not st["done"][local]:
                st["done"][local] = True
                st["failures"].append((int(i), msg))
            touched.add(s)
        for s in sorted(touched):
            st = self.pending[s]
            if st["done"].all():
                self.plan.write_part(s, st["ok"], st["emb"][st["ok"]], st["failures"])
                del self.pending[s]
                self.written += 1

    def unfinished(self) -> list[int]:
        """The parts of `todo` not written yet."""
        return sorted(self.pending)


# --- one process (or torchrun ranks) ------------------------------------------------------------------------------

def embed_to_file(embedder: Embedder, manifest: pd.DataFrame, out_path: str | Path, batch_size: int = 64,
                  num_workers: int | None = None, device: str | None = None, features: bool = False,
                  shard_size: int = 4096, preprocess: PreprocessConfig | None = None, progress: bool = True,
                  overwrite: bool = False, decode: str = "cpu", compile: bool = False,
                  report_failure: Callable[[str], None] | None = None, rank: int = 0,
                  world_size: int = 1, paths: list[str] | None = None, runtime="auto", precision: str = "auto",
                  cache_dir=None, shard: tuple[int, int] | None = None
                  ) -> tuple[pd.DataFrame, np.ndarray, list[str]] | None:
    """Embed every row of `manifest` into a Parquet file (its columns + `embedding`), resumably.

    Under torchrun (world_size > 1, process group initialised) every rank calls this: rank r embeds the unfinished
    shards s with s % world_size == r, rank 0 merges, and every rank returns the merged result.

    `shard` = (i, n): one of n independent jobs (a Slurm array, n machines) on the same manifest and output: this
    one embeds the unfinished shards s with s % n == i, merges nothing and returns None; `merge_parts` joins them
    once all n are done.

    One pass streams over all unfinished rows; each shard of `shard_size` rows goes to ``<out>.parts/`` atomically
    as soon as its last row is done. A rerun skips finished shards if the model and manifest are the same, and
    refuses (ResumeError, unless overwrite) if not. At the end the shards are merged into `out_path` and failures
    listed in ``<out>.failed.csv``. Returns (kept metadata rows, embeddings, failure messages).

    `paths`: the files to read, one per row, when the manifest's `path` column is not directly readable (relative
    paths kept as listed: `guie.data.manifest.resolved_paths`); the output keeps the manifest's own column.
    `runtime`, `precision`, `cache_dir`: what runs the forward (`guie.embedding.engine.iter_embeddings`).
    """
    from ..distributed import barrier_world

    if shard is not None:
        index, count = check_shard(shard)
        if world_size > 1:
            raise InputError("a shard job runs in one process (not under torchrun)")
        rank, world_size = index, count
    preprocess = preprocess or embedder.preprocess
    plan = plan_parts(embedder, manifest, out_path, shard_size, features, preprocess, paths, overwrite,
                      prepare=rank == 0 or shard is not None)
    sync = 1 if shard is not None else world_size
    barrier_world(sync)
    todo = plan.todo(rank, world_size)
    done = len(range(rank, plan.n_parts, world_size)) - len(todo)
    if done and (rank == 0 and world_size == 1 or shard is not None):
        log.info("resuming %s: %d/%d shards already done", plan.out_path, done, done + len(todo))
    _embed_parts(embedder, plan, todo, batch_size, num_workers, device, features, preprocess, decode, compile,
                 progress and (rank == 0 or shard is not None), report_failure,
                 {"runtime": runtime, "precision": precision, "cache_dir": cache_dir})
    if shard is not None:
        return None
    barrier_world(sync)
    if rank == 0:
        merge_parts(plan.out_path)
    barrier_world(sync)
    df, emb = read_embeddings(plan.out_path)
    failed_csv = failed_file(plan.out_path)
    errors = pd.read_csv(failed_csv)["error"].tolist() if failed_csv.exists() else []
    return df, emb, errors


def check_shard(shard: tuple[int, int]) -> tuple[int, int]:
    """A valid (index, count) shard: 0 <= index < count."""
    index, count = (int(v) for v in shard)
    if count < 1 or not 0 <= index < count:
        raise InputError(f"shard {index}/{count}: expected i/N with 0 <= i < N")
    return index, count


def parse_shard(text: str) -> tuple[int, int]:
    """'i/N' -> (i, N), checked."""
    head, sep, tail = text.partition("/")
    if not sep or not head.strip().isdecimal() or not tail.strip().isdecimal():
        raise InputError(f"shard {text!r}: expected i/N, e.g. 0/4")
    return check_shard((int(head), int(tail)))


def failed_file(out_path: str | Path) -> Path:
    """``<out>.failed.csv``: the rows of `out_path` that could not be read, one message each."""
    out_path = Path(out_path)
    return out_path.with_name(out_path.name + ".failed.csv")


def _prepare_parts(parts: Path, meta: dict, overwrite: bool) -> None:
    meta_file = parts / "meta.json"
    if parts.exists() and any(parts.glob("part-*.parquet")):
        try:
            old = json.loads(meta_file.read_text())
        except (OSError, ValueError):
            old = None
        if old != meta:
            if not overwrite:
                raise ResumeError(f"{parts} holds finished shards of another model or manifest; discard them "
                                  "(overwrite) or write to another file")
            shutil.rmtree(parts)
    parts.mkdir(parents=True, exist_ok=True)
    atomic_write_json(meta, meta_file)


def _embed_parts(embedder, plan: EmbeddingParts, todo, batch_size, num_workers, device, features, preprocess,
                 decode, compile, progress, report_failure, inference: dict) -> None:
    if not todo:
        return
    import time

    from .engine import _runtime_for, iter_embeddings, output_dim

    was_training = embedder.training
    try:
        # the runtime first (a converting one may take a while the first time), so the rate below is the
        # embedding's; it puts the model in eval mode, which must hold until the last batch (a model handed over
        # in train mode would otherwise run its forwards with batch statistics)
        inference["runtime"] = _runtime_for(embedder, inference["runtime"], inference["precision"], device,
                                            features, inference.pop("cache_dir"), None, compile, batch_size)
        started = time.perf_counter()
        rows = np.concatenate([np.arange(*plan.rows(s)) for s in todo])
        writer = PartWriter(plan, todo, output_dim(embedder, features))
        stream = iter_embeddings(embedder, [plan.paths[i] for i in rows], batch_size, num_workers, device,
                                 features, preprocess, decode, compile, progress, report_failure,
                                 desc=f"embed {len(todo)} of {plan.n_parts} shards", **inference)
        for b in stream:
            writer.add(rows[b.indices], b.embeddings, [(int(rows[i]), msg) for i, msg in b.failed])
    finally:
        embedder.train(was_training)
    if writer.unfinished():  # pragma: no cover - iter_embeddings covers every position
        raise RuntimeError(f"internal error: shards {writer.unfinished()} did not complete")
    took = time.perf_counter() - started
    log.info("embedded %d images in %.1f s (%.1f images/s)", len(rows), took, len(rows) / max(took, 1e-9))


# --- merge ------------------------------------------------------------------------------------------------------

@dataclass
class MergeReport:
    """What `merge_parts` found: rows of the manifest, embedded, unreadable (listed in ``<out>.failed.csv``)."""

    rows: int
    embedded: int
    failed: int


def merge_parts(out_path: str | Path) -> MergeReport:
    """Check that the parts in ``<out>.parts/`` hold every manifest row exactly once (embedded, or listed as
    unreadable), then write `out_path` and ``<out>.failed.csv`` and delete the parts.

    Raises IncompleteError (one line: rows missing and duplicated, and which parts) when they do not; nothing is
    written then, so the jobs that own the missing parts can be rerun and the merge tried again."""
    out_path = Path(out_path)
    parts = parts_folder(out_path)
    meta_file = parts / "meta.json"
    if not meta_file.is_file():
        raise MissingFileError(meta_file, "embedding parts (nothing was embedded into this output yet?)")
    try:
        meta = json.loads(meta_file.read_text())
        size, model = int(meta["shard_size"]), str(meta["model"])
        listed = pq.read_table(parts / "rows.parquet").column("path").to_pylist()
    except (OSError, ValueError, KeyError, TypeError, pa.ArrowException) as e:
        raise InputError(f"{parts}: not readable embedding parts ({type(e).__name__}: {e})") from None
    n = len(listed)
    n_parts = -(-n // size)
    found, errors, missing, duplicated, bad_parts, foreign = [], [], 0, 0, [], []
    for s in range(n_parts):
        lo, hi = s * size, min(n, (s + 1) * size)
        part = parts / f"part-{s:06d}.parquet"
        if not part.exists():
            missing += hi - lo
            bad_parts.append(s)
            continue
        table = pq.read_table(part, columns=["path"])  # the check reads the paths only; the copy streams below
        if (pq.read_schema(part).metadata or {}).get(FINGERPRINT_KEY, b"").decode() != model:
            foreign.append(s)
        failed_json = parts / f"part-{s:06d}.failed.json"
        records = json.loads(failed_json.read_text()) if failed_json.exists() else []
        failed_rows = Counter(int(r["row"]) for r in records)
        expected = Counter(listed[i] for i in range(lo, hi) if i not in failed_rows)
        got = Counter(table.column("path").to_pylist())
        lost = sum((expected - got).values())
        extra = sum((got - expected).values()) + sum(c - 1 for c in failed_rows.values())
        extra += sum(c for i, c in failed_rows.items() if not lo <= i < hi)
        if lost or extra:
            missing, duplicated = missing + lost, duplicated + extra
            bad_parts.append(s)
        found.append(part)
        errors += [r["error"] for r in records]
    strays = [p.name for p in parts.glob("part-*.parquet") if not _part_number(p.name, n_parts)]
    if missing or duplicated or strays or foreign:
        shown = ", ".join(str(s) for s in bad_parts[:8]) + (" ..." if len(bad_parts) > 8 else "")
        problems = [f"{missing} of {n} rows missing", f"{duplicated} duplicated"]
        if bad_parts:
            problems.append(f"in shards {shown}")
        if strays:
            problems.append(f"unexpected files {', '.join(sorted(strays)[:3])}")
        if foreign:
            problems.append(f"shards {', '.join(map(str, foreign[:8]))} of another model")
        fix = ("delete those shards' part files, " if duplicated or strays or foreign else "") + "rerun the embedding"
        raise IncompleteError(f"{out_path}: not merged: " + ", ".join(problems) + f"; {fix} (it redoes only "
                              "unfinished shards) and merge again")
    written = _concat_parts(found, out_path, model)
    failed_csv = failed_file(out_path)
    if errors:
        pd.DataFrame({"error": errors}).to_csv(failed_csv, index=False)
    elif failed_csv.exists():
        failed_csv.unlink()
    shutil.rmtree(parts)
    return MergeReport(n, written, len(errors))


def _concat_parts(parts: list[Path], out_path: Path, fingerprint: str) -> int:
    """Copy the parts, in order, into one Parquet file written atomically (a temp file renamed), one part in memory
    at a time. Returns the rows written."""
    schema = _with_fingerprint(pq.read_table(parts[0]).slice(0, 0), fingerprint).schema
    rows = 0
    with atomic_output(out_path) as tmp, pq.ParquetWriter(tmp, schema) as writer:
        for part in parts:
            table = pq.read_table(part).replace_schema_metadata(schema.metadata)
            writer.write_table(table)
            rows += table.num_rows
    return rows


def _part_number(name: str, n_parts: int) -> bool:
    """Whether `name` is the file name of one of the parts 0 .. n_parts-1."""
    stem = name.removeprefix("part-").removesuffix(".parquet")
    return stem.isdecimal() and len(stem) == 6 and int(stem) < n_parts


def _manifest_hash(manifest: pd.DataFrame) -> str:
    """Identity of the manifest's content (all columns), so a resumed run never mixes rows of two manifests."""
    h = hashlib.sha256(json.dumps([str(c) for c in manifest.columns]).encode())
    try:
        h.update(pd.util.hash_pandas_object(manifest, index=False).to_numpy().tobytes())
    except TypeError:  # unhashable cells (lists): the paths still identify the rows
        h.update("\n".join(manifest["path"].astype(str)).encode())
    return h.hexdigest()[:16]
