"""Manifests: the table every guie command reads. Columns: `path` (required), `label`, `domain`, anything else.

A manifest is a CSV or Parquet file, or a folder of images (label = the image's parent folder when nested).
Relative paths are resolved against the manifest's own folder, so a dataset folder can be moved as a whole.
A folder of tar shards written by `guie data shard` (or its `index.parquet`) is a manifest too: its `path`s are
shard references (``/abs/shard-000003.tar#<offset>:<size>:<member>``) that `load_image` reads by seeking.
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from ..errors import InputError
from ..imaging.io import IMAGE_EXTENSIONS, UNDECODABLE_FORMATS

MANIFEST_SUFFIXES = (".csv", ".parquet", ".pq", ".tsv")
SHARD_INDEX_FILE = "index.parquet"  # = guie.data.shards.INDEX_FILE
OTHER_FILES = "other_files"  # DataFrame.attrs key: a folder's files that are not images (read_manifest)


class ManifestError(InputError):
    """A manifest that cannot be used; the message names the file."""


def list_images(folder: str | Path) -> list[Path]:
    """All image files under `folder`, recursively, in a stable (sorted) order (see `folder_files`)."""
    return folder_files(folder)[0]


def folder_files(folder: str | Path) -> tuple[list[Path], list[Path]]:
    """Every file under `folder`, recursively and sorted, as (images, other files).

    Images are files named like a format guie decodes, or like an image format it does not (SVG, HEIC, JPEG XL):
    those are listed too, so that decoding reports them with the reason instead of leaving them out unnoticed.
    """
    images, others = [], []
    for p in sorted(Path(folder).rglob("*")):
        if p.is_file():
            suffix = p.suffix.lower()
            (images if suffix in IMAGE_EXTENSIONS or suffix in UNDECODABLE_FORMATS else others).append(p)
    return images, others


def read_manifest(source: str | Path, require_labels: bool = False) -> pd.DataFrame:
    """Read a folder, CSV or Parquet manifest into a DataFrame with absolute `path` strings.

    Raises ManifestError (naming the source) for missing files, empty folders, a missing `path` column, or
    missing labels when `require_labels`.
    """
    source = Path(source)
    if not source.exists():
        raise ManifestError(f"{source}: no such file or folder")
    if source.is_dir() and (source / SHARD_INDEX_FILE).is_file():
        from .shards import read_shard_index  # imported on use: shards pulls in torch

        return _check_labels(read_shard_index(source / SHARD_INDEX_FILE), source, require_labels)
    if source.is_dir():
        files, others = folder_files(source)
        if not files:
            raise ManifestError(f"{source}: no images found (extensions {', '.join(IMAGE_EXTENSIONS)})")
        df = pd.DataFrame({"path": [str(p.resolve()) for p in files]})
        labels = [str(p.parent.relative_to(source)) for p in files]
        if any(lbl != "." for lbl in labels):
            df["label"] = labels
        df.attrs[OTHER_FILES] = [str(p) for p in others]  # for summaries: every file is embedded or reported
    else:
        suffix = source.suffix.lower()
        try:
            if suffix in (".parquet", ".pq"):
                df = pd.read_parquet(source)
            elif suffix in (".csv", ".tsv"):
                df = pd.read_csv(source, sep="\t" if suffix == ".tsv" else ",", dtype={"label": str})
            else:
                raise ManifestError(f"{source}: unsupported manifest type {suffix!r}; use a folder, "
                                    f"{', '.join(MANIFEST_SUFFIXES)}")
        except ManifestError:
            raise
        except Exception as e:  # pandas/pyarrow raise many types for unreadable files
            raise ManifestError(f"{source}: cannot read manifest ({type(e).__name__}: {e})") from None
        if "path" not in df.columns and {"shard", "offset", "size", "member"} <= set(df.columns):
            from .shards import read_shard_index

            return _check_labels(read_shard_index(source, df), source, require_labels)
        if "path" not in df.columns:
            raise ManifestError(f"{source}: manifest has no 'path' column (columns: {list(df.columns)})")
        if df.empty:
            raise ManifestError(f"{source}: manifest has no rows")
        base = source.resolve().parent
        df["path"] = [str(p if Path(p).is_absolute() or "://" in p else (base / p)) for p in df["path"].astype(str)]
    return _check_labels(df, source, require_labels)


def _check_labels(df: pd.DataFrame, source: Path, require_labels: bool) -> pd.DataFrame:
    """Labels as strings; ManifestError when they are required but absent."""
    if require_labels:
        if "label" not in df.columns:
            raise ManifestError(f"{source}: a 'label' column is required here")
        if df["label"].isna().any():
            raise ManifestError(f"{source}: {int(df['label'].isna().sum())} rows have no label")
    if "label" in df.columns:
        df["label"] = df["label"].astype(str)
    return df.reset_index(drop=True)


def write_manifest(df: pd.DataFrame, out: str | Path) -> Path:
    """Write a manifest CSV/Parquet atomically, with paths under the manifest's folder stored relative to it.

    Relative paths keep a dataset folder movable as a whole (`read_manifest` resolves them back); paths elsewhere
    and shard references stay absolute.
    """
    from ..utils import atomic_write_text, save_parquet_atomic

    out = Path(out)
    base = out.resolve().parent
    df = df.copy()
    if "path" in df.columns:
        df["path"] = [_relative_if_under(p, base) for p in df["path"].astype(str)]
    suffix = out.suffix.lower()
    if suffix in (".parquet", ".pq"):
        return save_parquet_atomic(df, out)
    if suffix not in (".csv", ".tsv"):
        raise ManifestError(f"{out}: unsupported manifest type {suffix!r}; use .csv, .tsv or .parquet")
    return atomic_write_text(df.to_csv(index=False, sep="\t" if suffix == ".tsv" else ","), out)


def _relative_if_under(path: str, base: Path) -> str:
    if "#" in path or "://" in path:  # shard references and URLs stay as they are
        return path
    try:
        return Path(path).relative_to(base).as_posix()
    except ValueError:
        return path


def filter_rows(df: pd.DataFrame, where: list[str] | None) -> pd.DataFrame:
    """Keep rows matching every `column=value` (or `column=v1,v2`) condition."""
    for cond in where or []:
        col, sep, values = cond.partition("=")
        if not sep:
            raise InputError(f"filter {cond!r} must look like column=value")
        if col not in df.columns:
            raise InputError(f"filter {cond!r}: no column {col!r} (columns: {list(df.columns)})")
        df = df[df[col].astype(str).isin(values.split(","))]
    return df.reset_index(drop=True)


def select_rows(df: pd.DataFrame, where: dict, what: str, allow_empty: bool = False) -> pd.DataFrame:
    """Keep rows where each column's value is in the given value(s) (recipe `where:` mappings); `what` names
    the data in errors. An empty result is an error unless allow_empty."""
    for col, values in (where or {}).items():
        if col not in df.columns:
            raise InputError(f"{what}: filter on missing column {col!r} (columns: {list(df.columns)})")
        values = values if isinstance(values, list) else [values]
        df = df[df[col].astype(str).isin([str(v) for v in values])]
    if df.empty and not allow_empty:
        raise InputError(f"{what}: no rows left after filtering with {where}")
    return df.reset_index(drop=True)
