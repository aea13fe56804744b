"""`guie index add`: images (a folder, a manifest or shards) into a named index, through guie's resumable
embedding path, in one commit.

    1. read the source (`read_manifest`) and hash every file's bytes (`file_digests`): files already indexed, or
       repeated within the source, are skipped (adding the same file twice is a no-op)
    2. embed the new rows with `embed_to_file` into `NAME/pending/embeddings.parquet`: finished shards are kept,
       so a run killed here redoes only unfinished shards when it is run again (same source, same model)
    3. one commit (`ImageIndex.add`), then `pending/` is deleted

A kill -9 at any point leaves the index at its previous commit (or, past step 3's commit point, the new one); a
rerun of the same command finishes the work.

One add runs at a time per index: steps 1-3 hold the folder's `.add.lock` (an flock, released by the kernel even
on kill -9), because `pending/` is the running add's. A second `guie index add` logs that it waits for the first,
then finds the first one's images indexed already (same content, same item): both adds land, every image once.
Hashing reads files in chunks after a header check, so a stray huge non-image is refused without being read.
"""
from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from ..utils import disk_full_as_error
from .folder import file_lock
from .image_index import ImageIndex
from .store import ITEM_COLUMNS, NewItem

PENDING = "pending"
ADD_LOCK = ".add.lock"
SKIP_COLUMNS = {"embedding", "content_hash"}
log = logging.getLogger(__name__)


@dataclass
class AddReport:
    """What `add_source` did: rows read, new items committed, duplicates skipped, unreadable files."""

    seq: int
    rows: int
    added: int
    duplicates: int
    errors: list[str] = field(default_factory=list)


def source_root(source: str | Path, paths: Sequence[str]) -> Path:
    """The image root a source suggests: the folder itself, else the deepest folder holding all of the manifest's
    image files (all rows, before any --where, so a later add of other rows still lies under it)."""
    source = Path(source).resolve()
    if source.is_dir():
        return source
    files = [p for p in paths if "#" not in p]  # shard references: the shard folder is the manifest's
    if not files:
        return source.parent
    return Path(os.path.commonpath([str(Path(p).resolve().parent) for p in files]))


def relative_path(path: str, root: Path | None) -> str:
    """`path` relative to the image root (POSIX separators) when it lies under it; else as given (such items get
    no thumbnail)."""
    if root is None or "#" in path:  # shard references stay as they are
        return path
    try:
        return Path(path).resolve().relative_to(root).as_posix()
    except ValueError:
        return path


def items_from_rows(df: pd.DataFrame, hashes: Sequence[str], root: Path | None) -> list[NewItem]:
    """NewItems from manifest rows: path relative to `root`, label, and every other column as metadata."""
    meta_cols = [c for c in df.columns if c not in ITEM_COLUMNS and c not in SKIP_COLUMNS]
    labels = df["label"].astype(str).tolist() if "label" in df.columns else [None] * len(df)
    metas = df[meta_cols].to_dict(orient="records") if meta_cols else [{}] * len(df)
    return [NewItem(h, relative_path(str(p), root), lbl, meta)
            for p, h, lbl, meta in zip(df["path"].astype(str), hashes, labels, metas)]


def add_lock(index: ImageIndex):
    """Hold the index's add lock (`ADD_LOCK`): the one running `add_source` owns `pending/`. A second caller logs
    that it waits (naming the holder's pid) and blocks until the first is done (or killed)."""
    def say(pid: str) -> None:
        log.warning("%s: another add to this index is running (pid %s); waiting for it to finish", index.folder, pid)

    return file_lock(index.folder / ADD_LOCK, on_wait=say)


def unreadable_files(paths: Sequence[str]) -> list[str]:
    """Why each of these files could not be hashed (re-checked one by one: only the failures pay for it)."""
    from ..data.dedup import file_digest
    from ..imaging.io import ImageLoadError, check_image_header

    out = []
    for p in paths:
        try:
            check_image_header(p)
            file_digest(p)
            out.append(f"{p}: cannot be read")
        except ImageLoadError as e:
            out.append(str(e))
        except OSError as e:
            out.append(f"{p}: cannot be read ({e.strerror})")
    return out


def add_source(index: ImageIndex, source: str | Path, embedder, where: Sequence[str] | None = None,
               batch_size: int = 64, shard_size: int = 1024, progress: bool = True, workers: int | None = None,
               report: Callable[[str], None] | None = None, device=None, runtime: str = "auto",
               precision: str = "auto") -> AddReport:
    """Embed and commit the images of `source` (folder, manifest or shard folder) that the index lacks.

    `embedder` must be the index's model (its fingerprint is checked); `device`, `runtime`, `precision`: where and
    how its forward runs (`guie.embedding.runtimes`). Returns an AddReport."""
    from ..data.dedup import file_digests
    from ..data.manifest import read_manifest, select_rows
    from ..embedding.files import embed_to_file

    say = report or log.warning
    index.check_model(embedder.fingerprint())
    everything = read_manifest(source)
    df = select_rows(everything, list(where or []), str(source))
    n_rows = len(df)
    if workers is None and len(df) < 4096:
        workers = 1  # hashing a few thousand files is quicker than starting a process pool
    digests = file_digests(df["path"].astype(str).tolist(), workers=workers, progress=progress, images_only=True)
    errors = unreadable_files([p for p, d in zip(df["path"].astype(str), digests) if d is None])
    df = df.assign(content_hash=digests)[[d is not None for d in digests]]
    with add_lock(index):
        root = index.set_image_root(source_root(source, everything["path"].astype(str).tolist()))
        known = index.ids_for_hashes(df["content_hash"].tolist())
        new = df[~df["content_hash"].isin(known) & ~df["content_hash"].duplicated()].reset_index(drop=True)
        duplicates = len(df) - len(new)
        pending = index.folder / PENDING
        if new.empty:
            shutil.rmtree(pending, ignore_errors=True)
            return AddReport(index.seq, n_rows, 0, duplicates, errors)
        # overwrite=True: finished shards of the same rows and model are resumed, anything else is discarded
        with disk_full_as_error(pending, "nothing was committed; free some space and run the same add again (it "
                                         "resumes the finished shards)"):
            kept, vectors, failed = embed_to_file(embedder, new, pending / "embeddings.parquet",
                                                  batch_size=batch_size, shard_size=shard_size, progress=progress,
                                                  overwrite=True, report_failure=lambda msg: say(f"skipped {msg}"),
                                                  device=device, runtime=runtime, precision=precision)
        errors += failed
        result = index.add(vectors, items_from_rows(kept, kept["content_hash"].tolist(), root),
                           op=f"add {Path(source).name}")
        shutil.rmtree(pending, ignore_errors=True)
    return AddReport(result.seq, n_rows, result.added, duplicates + int((result.ids < 0).sum()), errors)
