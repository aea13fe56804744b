"""Embeddings files: `embed_to_file` writes image embeddings to Parquet through resumable shards, `read_embeddings`
reads them back (manifest columns + a fixed-size-list `embedding` column).

An interrupted `embed_to_file` redoes only unfinished shards; a rerun with another model or manifest is refused
(`Embedder.fingerprint`, `ResumeError`). Reading a file needs only pyarrow/pandas: torch is imported by the functions
that run a model, so search and evaluation can read embeddings without it.
"""
from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from ..errors import GuieError, InputError, MissingFileError
from ..utils import atomic_write_json, log, save_parquet_atomic

if TYPE_CHECKING:
    from ..models.embedder import Embedder
    from ..models.preprocess import PreprocessConfig

EMBEDDING_COLUMN = "embedding"


class ResumeError(GuieError, RuntimeError):
    """Finished shards of an earlier run that used another model or manifest are in the way."""


def embeddings_table(df: pd.DataFrame, emb: np.ndarray, schema: pa.Schema | None = None) -> pa.Table:
    """Manifest columns + an `embedding` fixed-size-list float32 column.

    `schema` (of the whole manifest) keeps every shard's column types equal, e.g. a text column that is empty in
    one shard would otherwise become a null column there and the shards could not be concatenated.
    """
    table = pa.Table.from_pandas(df.reset_index(drop=True), schema=schema, preserve_index=False)
    values = pa.array(np.ascontiguousarray(emb, dtype=np.float32).reshape(-1))
    return table.append_column(EMBEDDING_COLUMN, pa.FixedSizeListArray.from_arrays(values, emb.shape[1]))


def read_embeddings(path: str | Path) -> tuple[pd.DataFrame, np.ndarray]:
    """Read a guie embeddings Parquet file -> (metadata DataFrame, float32 [N, d])."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(path, "embeddings file")
    try:
        table = pq.read_table(path)
    except Exception as e:
        raise InputError(f"{path}: cannot read Parquet ({type(e).__name__}: {e})") from None
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


def embed_to_file(embedder: Embedder, manifest: pd.DataFrame, out_path: str | Path, batch_size: int = 64,
                  num_workers: int | None = None, device: str | None = None, features: bool = False,
                  shard_size: int = 4096, preprocess: PreprocessConfig | None = None, progress: bool = True,
                  overwrite: bool = False, decode: str = "cpu", compile: bool = False,
                  report_failure: Callable[[str], None] | None = None, rank: int = 0,
                  world_size: int = 1, paths: list[str] | None = None, runtime="auto", precision: str = "auto",
                  cache_dir=None) -> tuple[pd.DataFrame, np.ndarray, list[str]]:
    """Embed every row of `manifest` into a Parquet file (its columns + `embedding`), resumably.

    Under torchrun (world_size > 1, process group initialised) every rank calls this: rank r embeds the unfinished
    shards s with s % world_size == r, rank 0 merges, and every rank returns the merged result.

    One pass streams over all unfinished rows; each shard of `shard_size` rows goes to ``<out>.parts/`` atomically
    as soon as its last row is done. A rerun skips finished shards if the model and manifest are the same, and
    refuses (ResumeError, unless overwrite) if not. At the end the shards are merged into `out_path` and failures
    listed in ``<out>.failed.csv``. Returns (kept metadata rows, embeddings, failure messages).

    `paths`: the files to read, one per row, when the manifest's `path` column is not directly readable (relative
    paths kept as listed: `guie.data.manifest.resolved_paths`); the output keeps the manifest's own column.
    `runtime`, `precision`, `cache_dir`: what runs the forward (`guie.embedding.engine.iter_embeddings`).
    """
    from ..distributed import barrier_world

    out_path = Path(out_path)
    if "path" not in manifest.columns:
        raise InputError(f"the manifest has no 'path' column (columns: {list(manifest.columns)})")
    if manifest.empty:
        raise InputError("the manifest has no rows")
    if shard_size < 1:
        raise InputError(f"shard_size must be >= 1, got {shard_size}")
    if EMBEDDING_COLUMN in manifest.columns:  # re-embedding an embeddings file: its old vectors are replaced
        manifest = manifest.drop(columns=[EMBEDDING_COLUMN])
    manifest = manifest.reset_index(drop=True)
    try:
        schema = pa.Schema.from_pandas(manifest, preserve_index=False)
    except (pa.ArrowException, TypeError, ValueError) as e:
        raise InputError(f"manifest columns cannot be stored in Parquet: {e}") from None
    parts = out_path.with_name(out_path.name + ".parts")
    preprocess = preprocess or embedder.preprocess
    paths = manifest["path"].astype(str).tolist() if paths is None else [str(p) for p in paths]
    if len(paths) != len(manifest):
        raise InputError(f"{len(paths)} paths for a manifest of {len(manifest)} rows")
    fp = {"model": embedder.fingerprint(features, preprocess), "manifest": _manifest_hash(manifest),
          "shard_size": shard_size}
    meta_file = parts / "meta.json"
    if rank == 0:
        _prepare_parts(parts, meta_file, fp, overwrite)
    barrier_world(world_size)
    n_shards = -(-len(paths) // shard_size)
    part = lambda s: parts / f"part-{s:06d}.parquet"  # noqa: E731
    todo = [s for s in range(n_shards) if not part(s).exists() and s % world_size == rank]
    if len(todo) < n_shards and rank == 0 and world_size == 1:
        log.info("resuming %s: %d/%d shards already done", out_path, n_shards - len(todo), n_shards)
    _embed_shards(embedder, manifest, schema, paths, todo, parts, part, shard_size, batch_size, num_workers, device,
                  features, preprocess, decode, compile, progress and rank == 0, report_failure, n_shards,
                  {"runtime": runtime, "precision": precision, "cache_dir": cache_dir})
    barrier_world(world_size)
    if rank == 0:
        _merge_parts(parts, part, n_shards, out_path)
    barrier_world(world_size)
    df, emb = read_embeddings(out_path)
    failed_csv = out_path.with_name(out_path.name + ".failed.csv")
    errors = pd.read_csv(failed_csv)["error"].tolist() if failed_csv.exists() else []
    return df, emb, errors


def _prepare_parts(parts: Path, meta_file: Path, fp: dict, overwrite: bool) -> None:
    if parts.exists() and any(parts.glob("part-*.parquet")):
        try:
            old = json.loads(meta_file.read_text())
        except (OSError, ValueError):
            old = None
        if old != fp:
            if not overwrite:
                raise ResumeError(f"{parts} holds finished shards of another model or manifest; discard them "
                                  "(overwrite) or write to another file")
            shutil.rmtree(parts)
    parts.mkdir(parents=True, exist_ok=True)
    atomic_write_json(fp, meta_file)


def _embed_shards(embedder, manifest, schema, paths, todo, parts, part, shard_size, batch_size, num_workers, device,
                  features, preprocess, decode, compile, progress, report_failure, n_shards, inference: dict) -> None:
    if not todo:
        return
    import time

    from .engine import _runtime_for, iter_embeddings, output_dim

    was_training = embedder.training
    # the runtime first (a converting one may take a while the first time), so the rate below is the embedding's
    inference["runtime"] = _runtime_for(embedder, inference["runtime"], inference["precision"], device, features,
                                        inference.pop("cache_dir"), None, compile, batch_size)
    embedder.train(was_training)
    started = time.perf_counter()

    ranges = [(s * shard_size, min(len(paths), (s + 1) * shard_size)) for s in todo]
    starts = np.cumsum([0] + [hi - lo for lo, hi in ranges])
    todo_paths = [p for lo, hi in ranges for p in paths[lo:hi]]
    dim = output_dim(embedder, features)
    open_shards: dict[int, dict] = {}

    def shard_state(k: int) -> dict:
        if k not in open_shards:
            n = int(starts[k + 1] - starts[k])
            open_shards[k] = {"emb": np.empty((n, dim), np.float32), "ok": np.zeros(n, bool), "errors": [], "left": n}
        return open_shards[k]

    stream = iter_embeddings(embedder, todo_paths, batch_size, num_workers, device, features, preprocess, decode,
                             compile, progress, report_failure,
                             desc=f"embed {len(todo)} of {n_shards} shards", **inference)
    for b in stream:
        touched = set()
        ks = np.searchsorted(starts, b.indices, side="right") - 1
        for k in np.unique(ks):
            st, sel = shard_state(int(k)), ks == k
            local = b.indices[sel] - starts[k]
            st["emb"][local], st["ok"][local] = b.embeddings[sel], True
            st["left"] -= int(sel.sum())
            touched.add(int(k))
        for i, msg in b.failed:
            k = int(np.searchsorted(starts, i, side="right") - 1)
            st = shard_state(k)
            st["errors"].append(msg)
            st["left"] -= 1
            touched.add(k)
        for k in sorted(touched):
            st = open_shards[k]
            if st["left"] == 0:
                lo, hi = ranges[k]
                rows = manifest.iloc[lo:hi][st["ok"]]
                atomic_write_json(st["errors"], parts / f"part-{todo[k]:06d}.failed.json")
                # The Parquet file is written last: its presence marks a finished shard.
                save_parquet_atomic(embeddings_table(rows, st["emb"][st["ok"]], schema), part(todo[k]))
                del open_shards[k]
    if open_shards:  # pragma: no cover - iter_embeddings covers every position
        raise RuntimeError(f"internal error: shards {sorted(open_shards)} did not complete")
    took = time.perf_counter() - started
    log.info("embedded %d images in %.1f s (%.1f images/s)", len(todo_paths), took, len(todo_paths) / max(took, 1e-9))


def _merge_parts(parts: Path, part, n_shards: int, out_path: Path) -> None:
    tables, errors = [], []
    for s in range(n_shards):
        tables.append(pq.read_table(part(s)))
        failed_json = parts / f"part-{s:06d}.failed.json"
        errors += json.loads(failed_json.read_text()) if failed_json.exists() else []
    save_parquet_atomic(pa.concat_tables(tables), out_path)
    failed_csv = out_path.with_name(out_path.name + ".failed.csv")
    if errors:
        pd.DataFrame({"error": errors}).to_csv(failed_csv, index=False)
    elif failed_csv.exists():
        failed_csv.unlink()
    shutil.rmtree(parts)


def _manifest_hash(manifest: pd.DataFrame) -> str:
    """Identity of the manifest's content (all columns), so a resumed run never mixes rows of two manifests."""
    h = hashlib.sha256(json.dumps([str(c) for c in manifest.columns]).encode())
    try:
        h.update(pd.util.hash_pandas_object(manifest, index=False).to_numpy().tobytes())
    except TypeError:  # unhashable cells (lists): the paths still identify the rows
        h.update("\n".join(manifest["path"].astype(str)).encode())
    return h.hexdigest()[:16]
