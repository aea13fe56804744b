"""Batch embedding of image files: decoding overlapped or interleaved with the model, channels_last, bf16 on CUDA.

`iter_embeddings` streams batches in file order; `embed_images` gathers them in memory; `embed_to_file` writes a
Parquet file through resumable shards, so an interrupted run redoes only unfinished shards. Undecodable images are
reported one line each and counted, never silently dropped and never fatal.

Where decoding runs matters more than anything else for throughput:
  * model on CUDA: DataLoader worker processes decode while the GPU computes (or, with decode="gpu", workers only
    read bytes and nvJPEG decodes on the GPU);
  * model on CPU: the main process decodes each batch with a thread pool *between* forwards (PIL releases the GIL).
    Worker processes would run *during* the forward and compete with its intra-op threads for the same cores; on a
    2-core machine that cost a third of the throughput. glibc's allocator is also tuned once (`guie.runtime`): by
    default it hands every activation back to the kernel, and faulting it in again each forward was the kernel
    time that equalled user time.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from .data.datasets import ImageFileDataset, collate_skip_failed
from .models.embedder import Embedder
from .models.preprocess import ImageTransform, PreprocessConfig, draft_size
from .runtime import tune_cpu_allocator
from .utils import atomic_write_json, log, resolve_device, save_parquet_atomic

EMBEDDING_COLUMN = "embedding"
DECODERS = ("cpu", "gpu")


class ResumeError(RuntimeError):
    """Finished shards of an earlier run that used another model or manifest are in the way."""


@dataclass
class EmbedResult:
    """Embeddings of the decodable images; `ok[i]` says whether paths[i] was embedded (row order kept)."""

    embeddings: np.ndarray            # [n_ok, d] float32, rows in the order of paths[ok]
    ok: np.ndarray                    # [N] bool
    errors: list[str] = field(default_factory=list)


@dataclass
class EmbeddedBatch:
    """One batch of `iter_embeddings`: positions (in `paths`) of the embedded images, their vectors, the failures.

    Batches arrive in file order and together cover every position exactly once (embedded or failed)."""

    indices: np.ndarray               # [n] int64
    embeddings: np.ndarray            # [n, d] float32
    failed: list[tuple[int, str]]     # (position, one-line message)


def default_num_workers() -> int:
    """Decode workers for training loaders: leave the model at least one core on small machines."""
    n = os.cpu_count() or 1
    return 1 if n <= 2 else min(16, n - 1)


def embed_num_workers(device: str | torch.device | None = None) -> int:
    """Decode workers for inference on `device`: 0 on CPU (the main process decodes between forwards with a thread
    pool, see the module docstring), else one per core but one, up to 16."""
    if resolve_device(device).type == "cpu":
        return 0
    return max(1, min(16, (os.cpu_count() or 1) - 1))


def make_loader(paths: Sequence[str], preprocess: PreprocessConfig, batch_size: int, num_workers: int,
                pin_memory: bool = False, decode: str = "cpu", threads: int | None = None) -> DataLoader:
    """A DataLoader over image files in order.

    decode="cpu" yields (indices, uint8 images [B,3,S,S] or None, failures); decode="gpu" yields encoded batches
    for `guie.data.gpu_decode.decode_batch`. With num_workers=0, `threads` (default: torch's intra-op thread count)
    decode each batch in parallel in the main process.
    """
    if decode not in DECODERS:
        raise ValueError(f"decode={decode!r}: choose from {DECODERS}")
    transform, draft = ImageTransform(preprocess), draft_size(preprocess)
    if decode == "gpu":
        from .data.gpu_decode import EncodedImageDataset, collate_encoded

        ds, collate = EncodedImageDataset(paths, transform, draft_size=draft), collate_encoded
    else:
        n_threads = (threads or torch.get_num_threads()) if num_workers == 0 else 1
        ds, collate = ImageFileDataset(paths, transform, draft_size=draft, threads=n_threads), collate_skip_failed
    return DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=num_workers, collate_fn=collate,
                      pin_memory=pin_memory, persistent_workers=False,
                      prefetch_factor=2 if num_workers > 0 else None)


def _model_fn(embedder: Embedder, features: bool) -> Callable[[torch.Tensor], torch.Tensor]:
    return embedder.forward_features if features else embedder.forward


def output_dim(embedder: Embedder, features: bool) -> int:
    """Width of what `iter_embeddings` returns: backbone features or the embedding."""
    return int(embedder.backbone.num_features) if features else int(embedder.embed_dim)


def iter_embeddings(embedder: Embedder, paths: Sequence[str], batch_size: int = 64, num_workers: int | None = None,
                    device: str | torch.device | None = None, features: bool = False,
                    preprocess: PreprocessConfig | None = None, decode: str = "cpu", compile: bool = False,
                    progress: bool = True, report_failure: Callable[[str], None] | None = None,
                    desc: str = "embed") -> Iterator[EmbeddedBatch]:
    """Stream embeddings (or backbone features when features=True) of image files, batch by batch, in file order.

    Args:
        num_workers: decode processes; default `embed_num_workers(device)`.
        preprocess: override the embedder's preprocessing (e.g. resize mode; see `Embedder.set_image_size` to
            change a ViT's resolution).
        decode: "cpu" (PIL) or "gpu" (JPEGs decoded on the model's device by torchvision/nvJPEG, see
            `guie.data.gpu_decode`).
        compile: run the model through `torch.compile` (the last batch is padded so only one shape is compiled).
        report_failure: called with a one-line message per undecodable image (default: stderr).
    The model is moved to `device`, put in eval mode and channels_last; its train/eval mode is restored after.
    On CPU, glibc's allocator is tuned once for the process (`guie.runtime.tune_cpu_allocator`).
    """
    device = resolve_device(device)
    preprocess = preprocess or embedder.preprocess
    num_workers = embed_num_workers(device) if num_workers is None else num_workers
    report_failure = report_failure or (lambda msg: print(f"skipped {msg}", file=sys.stderr))
    if device.type == "cpu":
        tune_cpu_allocator()  # activations are re-faulted from the kernel every forward otherwise (guie.runtime)
    loader = make_loader(paths, preprocess, batch_size, num_workers, pin_memory=device.type == "cuda",
                         decode=decode)
    was_training = embedder.training
    # Converted outside inference mode: parameters created inside it become inference tensors, which would break
    # training the same model afterwards (e.g. validation during fine-tuning).
    embedder.to(device).eval().to(memory_format=torch.channels_last)
    fn = _model_fn(embedder, features)
    if compile:
        fn = torch.compile(fn, dynamic=False)
    cuda, pending = device.type == "cuda", None
    try:
        with tqdm(total=len(paths), desc=desc, unit="img", disable=not progress, dynamic_ncols=True) as bar:
            batches = iter(loader)
            while True:
                try:
                    batch = next(batches)
                except StopIteration:
                    break
                except BaseException:  # interrupted: hand over the finished batch first (it may complete a shard)
                    if pending is not None:
                        finished, pending = pending, None
                        yield _collect(finished, bar)
                    raise
                if decode == "gpu":
                    from .data.gpu_decode import decode_batch

                    idx, images, failed = decode_batch(*batch[:2], paths, preprocess, device)
                    failed = batch[2] + failed
                else:
                    idx, images, failed = batch
                for _, msg in failed:
                    report_failure(msg)
                out, event = None, None
                if images is not None:
                    out = _forward(fn, images, device, batch_size if compile else 0)
                    if cuda:  # copy back without a sync: the GPU keeps working while the next batch is prepared
                        host = torch.empty(out.shape, dtype=torch.float32, pin_memory=True)
                        out, event = host.copy_(out, non_blocking=True), torch.cuda.Event()
                        event.record()
                current = (idx, out, failed, event)
                if pending is not None:
                    yield _collect(pending, bar)
                    pending = None
                if cuda:  # handed over after the next batch is queued, so the GPU never waits for the copy
                    pending = current
                else:
                    yield _collect(current, bar)
            if pending is not None:
                yield _collect(pending, bar)
    finally:
        embedder.train(was_training)


def _forward(fn, images: torch.Tensor, device: torch.device, pad_to: int) -> torch.Tensor:
    """float32 [B, d] from uint8 images (bf16 autocast on CUDA); pads the batch to `pad_to` rows when > 0."""
    n = images.shape[0]
    images = images.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
    if pad_to and n < pad_to:
        images = torch.cat([images, images[-1:].expand(pad_to - n, -1, -1, -1)]).contiguous(
            memory_format=torch.channels_last)
    with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        return fn(images)[:n].float()


def _collect(pending, bar) -> EmbeddedBatch:
    idx, out, failed, event = pending
    if event is not None:
        event.synchronize()
    bar.update(len(idx) + len(failed))
    emb = out.numpy() if out is not None else np.empty((0, 0), dtype=np.float32)
    return EmbeddedBatch(np.asarray(idx, dtype=np.int64), emb, failed)


def embed_images(embedder: Embedder, paths: Sequence[str], batch_size: int = 64, num_workers: int | None = None,
                 device: str | torch.device | None = None, features: bool = False, progress: bool = True,
                 preprocess: PreprocessConfig | None = None, report_failure: Callable[[str], None] | None = None,
                 desc: str = "embed", decode: str = "cpu", compile: bool = False) -> EmbedResult:
    """Embed image files with `embedder` (or extract backbone features when features=True), in memory.

    Arguments as `iter_embeddings`. Returns the vectors of the decodable images in path order, the ok mask and the
    failure messages.
    """
    n = len(paths)
    out = np.empty((n, output_dim(embedder, features)), dtype=np.float32)
    ok = np.zeros(n, dtype=bool)
    errors: list[str] = []
    for b in iter_embeddings(embedder, paths, batch_size, num_workers, device, features, preprocess, decode,
                             compile, progress, report_failure, desc):
        errors += [msg for _, msg in b.failed]
        if len(b.indices):
            out[b.indices] = b.embeddings
            ok[b.indices] = True
    return EmbedResult(out[ok], ok, errors)


def model_fingerprint(embedder: Embedder, preprocess: PreprocessConfig, features: bool) -> str:
    """A cheap identity of (weights, preprocessing, output kind), to refuse resuming with another model and to key
    feature caches. For features only the backbone counts (a new head must not invalidate cached features)."""
    spec = embedder.spec
    ident = {"backbone": spec.backbone, "backbone_kwargs": spec.backbone_kwargs, "pre": preprocess.to_dict(),
             "features": features}
    if not features:
        ident["spec"] = spec.__dict__
    h = hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode())
    module = embedder.backbone if features else embedder
    with torch.no_grad():
        # Per tensor: shape, sum, sum of squares and a few values: any weight update changes it, and it costs one
        # pass over the weights (about a second for ViT-H), not a hash of gigabytes.
        for name, t in module.state_dict().items():
            t = t.detach()
            if not t.is_floating_point():
                t = t.double()
            t64 = t.double()
            h.update(f"{name}{tuple(t.shape)}{float(t64.sum()):.10e}{float((t64 * t64).sum()):.10e}".encode())
            h.update(np.ascontiguousarray(t.reshape(-1)[:8].float().cpu().numpy()).tobytes())
    return h.hexdigest()[:16]


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
        raise FileNotFoundError(f"embeddings file not found: {path}")
    try:
        table = pq.read_table(path)
    except Exception as e:
        raise ValueError(f"{path}: cannot read Parquet ({type(e).__name__}: {e})") from None
    if EMBEDDING_COLUMN not in table.column_names:
        raise ValueError(f"{path}: no '{EMBEDDING_COLUMN}' column; is this a guie embeddings file?")
    col = table.column(EMBEDDING_COLUMN).combine_chunks()
    dim = col.type.list_size
    emb = col.values.to_numpy(zero_copy_only=False).astype(np.float32, copy=False).reshape(-1, dim)
    df = table.drop([EMBEDDING_COLUMN]).to_pandas()
    return df, emb


def embed_to_file(embedder: Embedder, manifest: pd.DataFrame, out_path: str | Path, batch_size: int = 64,
                  num_workers: int | None = None, device: str | None = None, features: bool = False,
                  shard_size: int = 4096, preprocess: PreprocessConfig | None = None, progress: bool = True,
                  overwrite: bool = False, decode: str = "cpu", compile: bool = False,
                  report_failure: Callable[[str], None] | None = None, rank: int = 0,
                  world_size: int = 1) -> tuple[pd.DataFrame, np.ndarray, list[str]]:
    """Embed every row of `manifest` into a Parquet file (its columns + `embedding`), resumably.

    Under torchrun (world_size > 1, process group initialised) every rank calls this: rank r embeds the unfinished
    shards s with s % world_size == r, rank 0 merges, and every rank returns the merged result.

    One pass streams over all unfinished rows; each shard of `shard_size` rows goes to ``<out>.parts/`` atomically
    as soon as its last row is done. A rerun skips finished shards if the model and manifest are the same, and
    refuses (ResumeError, unless overwrite) if not. At the end the shards are merged into `out_path` and failures
    listed in ``<out>.failed.csv``. Returns (kept metadata rows, embeddings, failure messages).
    """
    out_path = Path(out_path)
    if "path" not in manifest.columns:
        raise ValueError(f"the manifest has no 'path' column (columns: {list(manifest.columns)})")
    if manifest.empty:
        raise ValueError("the manifest has no rows")
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    if EMBEDDING_COLUMN in manifest.columns:  # re-embedding an embeddings file: its old vectors are replaced
        manifest = manifest.drop(columns=[EMBEDDING_COLUMN])
    manifest = manifest.reset_index(drop=True)
    try:
        schema = pa.Schema.from_pandas(manifest, preserve_index=False)
    except (pa.ArrowException, TypeError, ValueError) as e:
        raise ValueError(f"manifest columns cannot be stored in Parquet: {e}") from None
    parts = out_path.with_name(out_path.name + ".parts")
    preprocess = preprocess or embedder.preprocess
    paths = manifest["path"].astype(str).tolist()
    fp = {"model": model_fingerprint(embedder, preprocess, features), "manifest": _manifest_hash(manifest),
          "shard_size": shard_size}
    meta_file = parts / "meta.json"
    if rank == 0:
        _prepare_parts(parts, meta_file, fp, overwrite)
    _barrier(world_size)
    n_shards = -(-len(paths) // shard_size)
    part = lambda s: parts / f"part-{s:06d}.parquet"  # noqa: E731
    todo = [s for s in range(n_shards) if not part(s).exists() and s % world_size == rank]
    if len(todo) < n_shards and rank == 0 and world_size == 1:
        log.info("resuming %s: %d/%d shards already done", out_path, n_shards - len(todo), n_shards)
    _embed_shards(embedder, manifest, schema, paths, todo, parts, part, shard_size, batch_size, num_workers, device,
                  features, preprocess, decode, compile, progress and rank == 0, report_failure, n_shards)
    _barrier(world_size)
    if rank == 0:
        _merge_parts(parts, part, n_shards, out_path)
    _barrier(world_size)
    df, emb = read_embeddings(out_path)
    failed_csv = out_path.with_name(out_path.name + ".failed.csv")
    errors = pd.read_csv(failed_csv)["error"].tolist() if failed_csv.exists() else []
    return df, emb, errors


def _barrier(world_size: int) -> None:
    if world_size > 1:
        import torch.distributed as dist

        dist.barrier()


def _prepare_parts(parts: Path, meta_file: Path, fp: dict, overwrite: bool) -> None:
    if parts.exists() and any(parts.glob("part-*.parquet")):
        try:
            old = json.loads(meta_file.read_text())
        except (OSError, ValueError):
            old = None
        if old != fp:
            if not overwrite:
                raise ResumeError(f"{parts} holds finished shards of another model or manifest; pass --overwrite "
                                  "(overwrite=True) to discard them")
            shutil.rmtree(parts)
    parts.mkdir(parents=True, exist_ok=True)
    atomic_write_json(fp, meta_file)


def _embed_shards(embedder, manifest, schema, paths, todo, parts, part, shard_size, batch_size, num_workers, device,
                  features, preprocess, decode, compile, progress, report_failure, n_shards) -> None:
    if not todo:
        return
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
                             desc=f"embed {len(todo)} of {n_shards} shards")
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
