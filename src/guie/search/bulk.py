"""`guie index add NAME --embeddings OUT`: vectors computed elsewhere (`guie embed`, its `--shard` jobs, a Ray
cluster) bulk-loaded into a named index, without running a model.

    1. the embeddings' model fingerprint (in each Parquet file's metadata) must be the index's: vectors of another
       model, another preprocessing or backbone features are refused in one line
    2. every row's content hash: the file's `content_hash` column when it has one, else the SHA-1 of the image file
       its path names (as `guie index add` hashes a source); rows already indexed, or repeated, are skipped
    3. one commit (`ImageIndex.add`: a kill -9 leaves the previous commit or the new one, never a part)

OUT is a merged embeddings file, or an output whose `--shard` jobs are not merged yet (its finished parts are
loaded; a later load of the same output adds only what is new).
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from ..embedding.files import embeddings_fingerprint, embeddings_from_table, parts_folder
from ..errors import InputError, MissingFileError
from .image_index import ImageIndex, SearchIndexError
from .ingest import AddReport, add_lock, items_from_rows, source_root, unreadable_files

log = logging.getLogger(__name__)


def embeddings_files(out: str | Path) -> list[Path]:
    """The Parquet files of an embeddings output: the merged file, else its finished parts (in part order)."""
    out = Path(out)
    if out.is_file():
        return [out]
    parts = out if out.is_dir() else parts_folder(out)
    found = sorted(parts.glob("part-*.parquet")) if parts.is_dir() else []
    if not found:
        raise MissingFileError(out, "embeddings file (or finished parts)")
    return found


def add_embeddings(index: ImageIndex, out: str | Path, image_root: str | Path | None = None,
                   report: Callable[[str], None] | None = None) -> AddReport:
    """Commit the rows of the embeddings output `out` that the index lacks (same content = same item), in one
    commit. Relative paths in it are taken relative to `image_root` (default: the index's image root, else the
    current folder). Returns an AddReport (rows read, added, duplicates, unreadable files)."""
    files = embeddings_files(out)
    expected = index.header["model"]["fingerprint"]
    for f in files:
        found = embeddings_fingerprint(f)
        if found != expected:
            what = f"model fingerprint {found}" if found else "no model fingerprint (written by an older guie?)"
            raise SearchIndexError(f"{f}: embeddings of {what}; index {index.name!r} holds model "
                                   f"{index.header['model'].get('ref')!r} (fingerprint {expected}): embed with "
                                   "the index's model or create another index")
    df, vectors = _read_all(files)
    if vectors.shape[1] != index.dim:
        raise SearchIndexError(f"{out}: {vectors.shape[1]}-d vectors for the {index.dim}-d index {index.name!r}")
    base = Path(image_root) if image_root else index.image_root or Path.cwd()
    paths = [p if Path(p).is_absolute() or "://" in p or "#" in p else str(base / p)
             for p in df["path"].astype(str)]
    errors: list[str] = []
    if "content_hash" in df.columns and df["content_hash"].notna().all():
        hashes = df["content_hash"].astype(str).tolist()
    else:
        from ..data.dedup import file_digests

        hashes = file_digests(paths, workers=1 if len(paths) < 4096 else None, images_only=True)
        errors = unreadable_files([p for p, h in zip(paths, hashes) if h is None])
        for msg in errors:
            (report or log.warning)(f"skipped {msg}")
    keep = np.array([h is not None for h in hashes], bool)
    df = df.assign(path=paths, content_hash=hashes)[keep].reset_index(drop=True)
    vectors = vectors[keep]
    with add_lock(index):
        root = index.set_image_root(source_root(Path(out), df["path"].tolist()))
        known = index.ids_for_hashes(df["content_hash"].tolist())
        new = (~df["content_hash"].isin(known) & ~df["content_hash"].duplicated()).to_numpy()
        duplicates = int(len(df) - new.sum())
        if not new.any():
            return AddReport(index.seq, len(keep), 0, duplicates, errors)
        rows = df[new].reset_index(drop=True)
        result = index.add(vectors[new], items_from_rows(rows, rows["content_hash"].tolist(), root),
                           op=f"add --embeddings {Path(out).name}")
    return AddReport(result.seq, len(keep), result.added, duplicates + int((result.ids < 0).sum()), errors)


def _read_all(files: list[Path]) -> tuple[pd.DataFrame, np.ndarray]:
    """All rows of the files, one table (their columns must agree)."""
    import pyarrow as pa

    try:
        tables = [pq.read_table(f) for f in files]
        table = pa.concat_tables(tables, promote_options="default") if len(tables) > 1 else tables[0]
    except (OSError, pa.ArrowException) as e:
        raise InputError(f"{files[0].parent}: cannot read the embeddings ({type(e).__name__}: {e})") from None
    if "path" not in table.column_names:
        raise InputError(f"{files[0]}: no 'path' column; is this a guie embeddings file?")
    return embeddings_from_table(table, files[0])
