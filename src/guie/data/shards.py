"""WebDataset-style tar shards: write them from a manifest, read them back randomly or as a stream.

Layout of a shard folder::

    shard-000000.tar        members <key>.<jpg|png|webp|...> + <key>.json ({"label", "domain", ..., "source"})
    shard-000001.tar        ...
    index.parquet           one row per sample: key, shard, offset, size, member, label, domain, ..., source
    shards.json             what was written (manifest fingerprint, settings), to resume or refuse safely

Each shard is written under a temporary name and renamed when complete, so a crashed or interrupted run leaves only
whole shards; rerunning the same command skips them. `read_manifest(folder)` turns the index into rows whose
`path` is a shard reference (``/abs/shard-000003.tar#<offset>:<size>:<member>``) that `load_image` decodes by
seeking: random access, so DataLoader shuffling and workers behave as with loose files. `ShardStream` reads shards
sequentially instead (local files, fsspec URLs such as ``s3://bucket/shard-000000.tar``, or ``pipe:<command>``).

Why tarfile rather than webdataset's TarWriter: the index needs each member's byte offset, which TarWriter does
not expose; the tars are plain POSIX tars that webdataset reads as they are.
"""
from __future__ import annotations

import glob
import hashlib
import io
import json
import os
import random
import subprocess
import tarfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pandas as pd
from PIL import Image, UnidentifiedImageError
from torch.utils.data import IterableDataset, get_worker_info
from tqdm.auto import tqdm

from ..errors import InputError
from ..imaging.io import ImageLoadError, ShardRef, load_image, read_image_bytes
from ..utils import atomic_write_json, log, save_parquet_atomic

INDEX_FILE = "index.parquet"
META_FILE = "shards.json"
INDEX_COLUMNS = ("key", "shard", "offset", "size", "member")
IMAGE_FORMATS = ("keep", "jpg", "webp", "png")
_PIL_EXT = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp", "GIF": "gif", "BMP": "bmp", "TIFF": "tif", "MPO": "jpg"}
_SAVE_FORMAT = {"jpg": "JPEG", "webp": "WEBP", "png": "PNG"}


class ShardError(InputError):
    """A shard folder that cannot be used or resumed; the message names it."""


def shard_name(i: int) -> str:
    """File name of shard number i."""
    return f"shard-{i:06d}.tar"


@dataclass
class ShardConfig:
    """How `write_shards` packs images."""

    shard_size: int = 1000          # samples per shard (~100-500 MB per shard is a good target)
    image_format: str = "keep"      # keep (copy the bytes) | jpg | webp | png (decode + re-encode)
    max_side: int | None = None     # re-encode only: shrink so the longer side is at most this
    quality: int = 90               # jpg/webp quality
    shuffle: bool = False           # shuffle rows before packing (streamed training then sees mixed classes)
    seed: int = 0

    def __post_init__(self):
        if self.image_format not in IMAGE_FORMATS:
            raise InputError(f"image_format must be one of {IMAGE_FORMATS}, got {self.image_format!r}")
        if self.shard_size < 1:
            raise InputError(f"shard_size must be >= 1, got {self.shard_size}")
        if self.max_side is not None and self.image_format == "keep":
            raise InputError("max_side needs re-encoding: set image_format to jpg, webp or png")


@dataclass
class ShardWriteResult:
    """What `write_shards` did."""

    out_dir: Path
    index: pd.DataFrame                 # the index.parquet rows
    written: int                        # shards written by this call
    resumed: int                        # complete shards found and kept
    errors: list[str] = field(default_factory=list)


def _encode_sample(args: tuple[str, ShardConfig]) -> tuple[str | None, bytes | None, str | None]:
    """(extension, bytes, None) for one image, or (None, None, error message)."""
    path, cfg = args
    try:
        if cfg.image_format == "keep":
            data = read_image_bytes(path)
            with Image.open(io.BytesIO(data)) as im:  # header only: catches non-images, names the real format
                ext = _PIL_EXT.get(im.format or "", (im.format or "bin").lower())
            return ext, data, None
        image = load_image(path, draft_size=cfg.max_side)
        if cfg.max_side and max(image.size) > cfg.max_side:
            image.thumbnail((cfg.max_side, cfg.max_side), Image.Resampling.BICUBIC)
        buf = io.BytesIO()
        kwargs = {"quality": cfg.quality} if cfg.image_format in ("jpg", "webp") else {}
        image.save(buf, _SAVE_FORMAT[cfg.image_format], **kwargs)
        return cfg.image_format, buf.getvalue(), None
    except ImageLoadError as e:
        return None, None, str(e)
    except UnidentifiedImageError:
        return None, None, f"{path}: not a recognised image format"
    except Exception as e:  # PIL raises many types for odd files; one bad image must not stop a long run
        return None, None, f"{path}: {type(e).__name__}: {e}"


def _json_value(v):
    """Manifest cell -> JSON value (NaN -> None, numpy scalars -> Python)."""
    if v is None or (isinstance(v, float) and v != v):
        return None
    if hasattr(v, "item"):
        return v.item()
    return v


def _fingerprint(df: pd.DataFrame, cfg: ShardConfig) -> dict:
    h = hashlib.sha256()
    h.update("\n".join(df["path"].astype(str)).encode())
    if "label" in df.columns:
        h.update("\n".join(df["label"].astype(str)).encode())
    return {"format": "guie-shards/1", "rows": len(df), "manifest": h.hexdigest()[:16], "config": asdict(cfg)}


def _write_one_shard(tar_path: Path, keys: Sequence[str], rows: pd.DataFrame,
                     encoded: Iterable[tuple]) -> tuple[list[tuple[str, int, int]], list[str]]:
    """Write one shard to a hidden temp file, fsync, rename: a shard file either is complete or does not exist.

    `encoded` may be a lazy iterator (samples are written while the pool encodes the next ones). Failures are saved
    to `<shard>.failed.json` before the rename, so a resumed run still reports them.
    Returns (member name, data offset, size) of the image members, for the index, and the failure messages.
    """
    tmp = tar_path.with_name(f".{tar_path.name}.tmp")
    failed_path = tar_path.with_name(tar_path.name.removesuffix(".tar") + ".failed.json")
    failed_path.unlink(missing_ok=True)  # left by an attempt that died before its rename
    records = rows.drop(columns=["path"]).to_dict("records")
    written, errors = [], []
    with open(tmp, "wb") as f:
        with tarfile.open(fileobj=f, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for key, meta, source, (ext, data, err) in zip(keys, records, rows["path"], encoded):
                if err is not None:
                    errors.append(err)
                    continue
                meta = {c: _json_value(v) for c, v in meta.items()}
                meta["source"] = str(source)
                for name, payload in ((f"{key}.{ext}", data), (f"{key}.json", json.dumps(meta, default=str).encode())):
                    info = tarfile.TarInfo(name)
                    info.size, info.mtime, info.mode = len(payload), 0, 0o644
                    if payload is data:  # the data starts right after this member's header block(s)
                        header = len(info.tobuf(tar.format, tar.encoding, tar.errors))
                        written.append((name, tar.offset + header, len(payload)))
                    tar.addfile(info, io.BytesIO(payload))
        f.flush()
        os.fsync(f.fileno())
    if errors:
        atomic_write_json(errors, failed_path)
    os.replace(tmp, tar_path)
    return written, errors


def write_shards(manifest: pd.DataFrame, out_dir: str | Path, cfg: ShardConfig | None = None,
                 workers: int | None = None, progress: bool = True, overwrite: bool = False) -> ShardWriteResult:
    """Pack the images of `manifest` into tar shards under `out_dir`, plus `index.parquet`; resumable.

    Rows are packed in manifest order (or shuffled with cfg.shuffle); sample keys are the row numbers. Unreadable
    images are left out and reported (also listed in `<shard>.failed.json`). A rerun with the same manifest and
    settings keeps finished shards; different ones are refused unless `overwrite`.
    """
    cfg = cfg or ShardConfig()
    if "path" not in manifest.columns:
        raise ShardError("manifest has no 'path' column")
    if manifest.empty:
        raise ShardError("manifest has no rows")
    df = manifest.reset_index(drop=True)
    if "source" in df.columns:
        df = df.drop(columns=["source"])  # re-sharding shards: the previous source is replaced by the current path
    order = list(range(len(df)))
    if cfg.shuffle:
        random.Random(cfg.seed).shuffle(order)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    fp = _fingerprint(df, cfg)
    meta_path = out_dir / META_FILE
    if meta_path.exists():
        old = json.loads(meta_path.read_text())
        if old != fp:
            if not overwrite:
                raise ShardError(f"{out_dir} holds shards of another manifest or other settings; replace them "
                                 "(overwrite) or choose another folder")
            for p in list(out_dir.glob("shard-*.tar")) + list(out_dir.glob("shard-*.failed.json")):
                p.unlink()
            (out_dir / INDEX_FILE).unlink(missing_ok=True)
    elif any(out_dir.glob("shard-*.tar")):
        raise ShardError(f"{out_dir} holds shards not written by guie (no {META_FILE}); choose an empty folder")
    atomic_write_json(fp, meta_path)
    for stale in out_dir.glob(".shard-*.tmp"):  # left by a killed run
        stale.unlink()

    n_shards = -(-len(df) // cfg.shard_size)
    done = [s for s in range(n_shards) if (out_dir / shard_name(s)).exists()]
    if done:
        log.info("resuming %s: %d/%d shards already written", out_dir, len(done), n_shards)
    errors: list[str] = []
    written = 0
    members: dict[int, list[tuple[str, int, int]]] = {}
    workers = workers or min(8, os.cpu_count() or 1)
    pool_cls = ThreadPoolExecutor
    if cfg.image_format != "keep" and workers > 1:
        from concurrent.futures import ProcessPoolExecutor  # re-encoding is CPU-bound: processes, not threads

        pool_cls = ProcessPoolExecutor
    bar = tqdm(total=len(df), desc="shard", unit="img", disable=not progress, dynamic_ncols=True)
    bar.update(min(len(df), len(done) * cfg.shard_size))
    with pool_cls(max_workers=max(1, workers)) as pool:
        for s in range(n_shards):
            tar_path = out_dir / shard_name(s)
            failed_path = out_dir / f"shard-{s:06d}.failed.json"
            if tar_path.exists():
                if failed_path.exists():
                    errors += json.loads(failed_path.read_text())
                members[s] = [m for m in scan_shard(tar_path) if not m[0].endswith(".json")]
                continue
            idx = order[s * cfg.shard_size:(s + 1) * cfg.shard_size]
            rows = df.iloc[idx]
            encoded = pool.map(_encode_sample, [(p, cfg) for p in rows["path"].astype(str)], chunksize=8)
            keys = [f"{i:09d}" for i in idx]
            members[s], shard_errors = _write_one_shard(tar_path, keys, rows, encoded)
            for msg in shard_errors:
                log.warning("skipped %s", msg)
            errors += shard_errors
            written += 1
            bar.update(len(idx))
    bar.close()
    index = build_index(df, members)
    save_parquet_atomic(index, out_dir / INDEX_FILE)
    return ShardWriteResult(out_dir, index, written, len(done), errors)


def scan_shard(tar_path: str | Path) -> list[tuple[str, int, int]]:
    """(member name, data offset, size) of every file in a tar, reading headers only."""
    with tarfile.open(tar_path, "r:") as tar:
        return [(m.name, m.offset_data, m.size) for m in tar if m.isfile()]


def build_index(df: pd.DataFrame, members: dict[int, list[tuple[str, int, int]]]) -> pd.DataFrame:
    """Index rows from each shard's image members (name, offset, size), joined to the manifest's columns by key
    (= row number)."""
    recs = []
    for s in sorted(members):
        for member, offset, size in members[s]:
            key = member.partition(".")[0]
            recs.append((key, shard_name(s), offset, size, member, int(key)))
    idx = pd.DataFrame(recs, columns=[*INDEX_COLUMNS, "_row"])
    meta = df.iloc[idx["_row"].to_numpy()].reset_index(drop=True).rename(columns={"path": "source"})
    return pd.concat([idx.drop(columns="_row"), meta], axis=1)


def is_shard_index(df: pd.DataFrame) -> bool:
    """Whether a table is a shard index (has key/shard/offset/size/member columns)."""
    return all(c in df.columns for c in INDEX_COLUMNS)


def read_shard_index(source: str | Path, df: pd.DataFrame | None = None) -> pd.DataFrame:
    """A shard folder's index (or the index file) as a manifest: `path` = shard reference, other columns kept."""
    source = Path(source)
    index_path = source / INDEX_FILE if source.is_dir() else source
    if df is None:
        if not index_path.is_file():
            raise ShardError(f"{source}: no {INDEX_FILE}; is this a folder written by `guie data shard`?")
        df = pd.read_parquet(index_path)
    if not is_shard_index(df):
        raise ShardError(f"{index_path}: not a shard index (needs columns {list(INDEX_COLUMNS)})")
    base = index_path.resolve().parent
    paths = [str(ShardRef(str(base / sh) if "://" not in sh else sh, int(o), int(n), m))
             for sh, o, n, m in zip(df["shard"], df["offset"], df["size"], df["member"])]
    out = df.drop(columns=["offset", "size", "member"]).copy()
    out.insert(0, "path", paths)
    return out.reset_index(drop=True)


def list_shards(source: str | Path | Sequence[str]) -> list[str]:
    """Shard URLs from a folder (its shard-*.tar, sorted), a glob pattern, a single path/URL, or a list."""
    if isinstance(source, (list, tuple)):
        return [str(s) for s in source]
    s = str(source)
    if "://" in s or s.startswith("pipe:"):
        return [s]
    p = Path(s)
    if p.is_dir():
        found = sorted(str(x) for x in p.glob("shard-*.tar"))
        if not found:
            found = sorted(str(x) for x in p.glob("*.tar"))
        if not found:
            raise ShardError(f"{p}: no .tar shards in this folder")
        return found
    if any(ch in s for ch in "*?["):
        found = sorted(glob.glob(s))
        if not found:
            raise ShardError(f"{s}: no shards match this pattern")
        return found
    if not p.is_file():
        raise ShardError(f"{s}: no such shard")
    return [s]


def _open_stream(url: str):
    """A readable binary stream for a local path, `pipe:<command>` or an fsspec URL."""
    if url.startswith("pipe:"):
        proc = subprocess.Popen(url[5:], shell=True, stdout=subprocess.PIPE)
        return proc.stdout
    if "://" in url and not url.startswith("file://"):
        import fsspec  # optional dependency, only for remote shards

        return fsspec.open(url, "rb").open()
    return open(url.removeprefix("file://"), "rb")


def iter_tar_samples(url: str) -> Iterator[dict]:
    """Stream one tar shard: yields {"__key__", "__url__", "<ext>": bytes, ...} per key, in file order."""
    stream = _open_stream(url)
    try:
        with tarfile.open(fileobj=stream, mode="r|*") as tar:
            sample: dict = {}
            for member in tar:
                if not member.isfile():
                    continue
                key, _, ext = member.name.partition(".")
                if sample and key != sample["__key__"]:
                    yield sample
                    sample = {}
                if not sample:
                    sample = {"__key__": key, "__url__": url}
                sample[ext] = tar.extractfile(member).read()
            if sample:
                yield sample
    finally:
        stream.close()


class ShardStream(IterableDataset):
    """Sequential reading of tar shards for training/embedding at scale: yields dicts with `image` + metadata.

    Shards are divided between DDP ranks and DataLoader workers (each shard read by exactly one of them); optional
    shard shuffling per epoch and a sample shuffle buffer. An undecodable image is reported on stderr and skipped.

    Args:
        shards: folder, glob, path/URL, or a list of them (see `list_shards`).
        transform: applied to the PIL RGB image (e.g. `embedder.transform`).
        shuffle_buffer: 0 = file order; else a reservoir of this many samples.
    """

    def __init__(self, shards, transform: Callable | None = None, shuffle_shards: bool = False,
                 shuffle_buffer: int = 0, seed: int = 0, draft_size: int | None = None):
        self.urls = list_shards(shards)
        self.transform, self.shuffle_shards, self.shuffle_buffer = transform, shuffle_shards, shuffle_buffer
        self.seed, self.epoch, self.draft_size = seed, 0, draft_size

    def set_epoch(self, epoch: int) -> None:
        """Reshuffle differently next epoch (call it like DistributedSampler.set_epoch)."""
        self.epoch = epoch

    def _my_urls(self) -> list[str]:
        urls = list(self.urls)
        if self.shuffle_shards:
            random.Random(self.seed * 1_000_003 + self.epoch).shuffle(urls)
        rank, world = 0, 1
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            rank, world = dist.get_rank(), dist.get_world_size()
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info else (0, 1)
        return urls[rank * nw + wid::world * nw]

    def _decode(self, sample: dict) -> dict | None:
        image_ext = next((e for e in sample if e not in ("json", "__key__", "__url__")), None)
        meta = json.loads(sample["json"]) if "json" in sample else {}
        where = f"{sample['__url__']}#{sample['__key__']}"
        if image_ext is None:
            log.warning("skipped %s: no image member", where)
            return None
        try:
            image = load_image(io.BytesIO(sample[image_ext]), draft_size=self.draft_size)
        except ImageLoadError as e:
            log.warning("skipped %s: %s", where, e.reason)
            return None
        out = {**meta, "key": sample["__key__"], "url": sample["__url__"]}
        out["image"] = self.transform(image) if self.transform else image
        return out

    def __iter__(self):
        rng = random.Random(self.seed * 7919 + self.epoch)
        buffer: list[dict] = []
        for url in self._my_urls():
            for raw in iter_tar_samples(url):
                sample = self._decode(raw)
                if sample is None:
                    continue
                if self.shuffle_buffer <= 0:
                    yield sample
                    continue
                buffer.append(sample)
                if len(buffer) >= self.shuffle_buffer:
                    yield buffer.pop(rng.randrange(len(buffer)))
        rng.shuffle(buffer)
        yield from buffer
