"""Batch embedding of image files: DataLoader workers decode, the model runs channels_last (bf16 on CUDA).

`embed_images` returns arrays in memory; `embed_to_file` writes a Parquet file through resumable shards, so an
interrupted run redoes only the shard it was in. Undecodable images are reported one line each and counted,
never silently dropped and never fatal.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

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
from .utils import atomic_write_json, log, resolve_device, save_parquet_atomic

EMBEDDING_COLUMN = "embedding"


@dataclass
class EmbedResult:
    """Embeddings of the decodable images; `ok[i]` says whether paths[i] was embedded (row order kept)."""

    embeddings: np.ndarray            # [n_ok, d] float32, rows in the order of paths[ok]
    ok: np.ndarray                    # [N] bool
    errors: list[str] = field(default_factory=list)


def default_num_workers() -> int:
    """Decode workers: leave the model at least one core on small machines."""
    n = os.cpu_count() or 1
    return 1 if n <= 2 else min(16, n - 1)


def make_loader(paths: Sequence[str], preprocess: PreprocessConfig, batch_size: int, num_workers: int,
                pin_memory: bool = False) -> DataLoader:
    """A DataLoader yielding (indices, uint8 images [B,3,S,S] or None, failures)."""
    ds = ImageFileDataset(paths, ImageTransform(preprocess), draft_size=draft_size(preprocess))
    return DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                      collate_fn=collate_skip_failed, pin_memory=pin_memory,
                      persistent_workers=False, prefetch_factor=4 if num_workers > 0 else None)


def _model_fn(embedder: Embedder, features: bool) -> Callable[[torch.Tensor], torch.Tensor]:
    return embedder.forward_features if features else embedder.forward


def embed_images(embedder: Embedder, paths: Sequence[str], batch_size: int = 64, num_workers: int | None = None,
                 device: str | torch.device | None = None, features: bool = False, progress: bool = True,
                 preprocess: PreprocessConfig | None = None, report_failure: Callable[[str], None] | None = None,
                 desc: str = "embed") -> EmbedResult:
    """Embed image files with `embedder` (or extract backbone features when features=True).

    Args:
        preprocess: override the embedder's preprocessing (e.g. another resolution).
        report_failure: called with a one-line message per undecodable image (default: stderr).
    """
    device = resolve_device(device)
    preprocess = preprocess or embedder.preprocess
    num_workers = default_num_workers() if num_workers is None else num_workers
    report_failure = report_failure or (lambda msg: print(f"skipped {msg}", file=sys.stderr))
    # Converted outside inference mode: parameters created inside it become inference tensors, which would break
    # training the same model afterwards (e.g. validation during fine-tuning).
    embedder = embedder.to(device).eval().to(memory_format=torch.channels_last)
    with torch.inference_mode():
        return _embed_loop(embedder, paths, batch_size, num_workers, device, features, progress, preprocess,
                           report_failure, desc)


def _embed_loop(embedder, paths, batch_size, num_workers, device, features, progress, preprocess, report_failure,
                desc) -> "EmbedResult":
    fn = _model_fn(embedder, features)
    use_bf16 = device.type == "cuda"
    loader = make_loader(paths, preprocess, batch_size, num_workers, pin_memory=device.type == "cuda")
    n = len(paths)
    out: np.ndarray | None = None
    ok = np.zeros(n, dtype=bool)
    errors: list[str] = []
    with tqdm(total=n, desc=desc, unit="img", disable=not progress, dynamic_ncols=True) as bar:
        for idx, images, failed in loader:
            for _, msg in failed:
                errors.append(msg)
                report_failure(msg)
            if images is not None:
                images = images.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
                    emb = fn(images)
                emb = emb.float().cpu().numpy()
                if out is None:
                    out = np.empty((n, emb.shape[1]), dtype=np.float32)
                out[idx.numpy()] = emb
                ok[idx.numpy()] = True
            bar.update(len(idx) + len(failed))
    if out is None:
        dim = embedder.backbone.num_features if features else embedder.embed_dim
        out = np.empty((n, dim), dtype=np.float32)
    return EmbedResult(out[ok], ok, errors)


def model_fingerprint(embedder: Embedder, preprocess: PreprocessConfig, features: bool) -> str:
    """A cheap identity of (weights, preprocessing, output kind), to refuse resuming with another model."""
    h = hashlib.sha256()
    h.update(json.dumps({"spec": embedder.spec.__dict__, "pre": preprocess.to_dict(), "features": features},
                        sort_keys=True, default=str).encode())
    with torch.no_grad():
        tensors = list(embedder.state_dict().values())
        for t in tensors[:4] + tensors[-4:]:
            h.update(np.ascontiguousarray(t.detach().float().cpu().numpy()).tobytes()[:1 << 20])
    return h.hexdigest()[:16]


def embeddings_table(df: pd.DataFrame, emb: np.ndarray) -> pa.Table:
    """Manifest columns + an `embedding` fixed-size-list float32 column."""
    table = pa.Table.from_pandas(df.reset_index(drop=True), preserve_index=False)
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
                  overwrite: bool = False) -> tuple[pd.DataFrame, np.ndarray, list[str]]:
    """Embed every row of `manifest` into a Parquet file, resumably.

    Work goes to ``<out>.parts/`` one shard (of `shard_size` rows) at a time, each written atomically; a rerun
    skips finished shards if the model and manifest are the same, and refuses (unless overwrite) if not. At the end
    the shards are merged into `out_path`, failures listed in ``<out>.failed.csv``.
    Returns (kept metadata rows, embeddings, failure messages).
    """
    out_path = Path(out_path)
    parts = out_path.with_name(out_path.name + ".parts")
    preprocess = preprocess or embedder.preprocess
    paths = manifest["path"].astype(str).tolist()
    fp = {"model": model_fingerprint(embedder, preprocess, features),
          "manifest": hashlib.sha256("\n".join(paths).encode()).hexdigest()[:16], "shard_size": shard_size}
    meta_file = parts / "meta.json"
    if parts.exists():
        old = json.loads(meta_file.read_text()) if meta_file.exists() else None
        if old != fp:
            if not overwrite:
                raise RuntimeError(f"{parts} holds shards of another model or manifest; pass overwrite=True "
                                   f"(--overwrite) to discard them")
            shutil.rmtree(parts)
    parts.mkdir(parents=True, exist_ok=True)
    atomic_write_json(fp, meta_file)
    n_shards = max(1, -(-len(paths) // shard_size))
    done = sum((parts / f"part-{s:06d}.parquet").exists() for s in range(n_shards))
    if done:
        log.info("resuming %s: %d/%d shards already done", out_path, done, n_shards)
    for s in range(n_shards):
        part = parts / f"part-{s:06d}.parquet"
        if part.exists():
            continue
        lo, hi = s * shard_size, min(len(paths), (s + 1) * shard_size)
        res = embed_images(embedder, paths[lo:hi], batch_size, num_workers, device, features, progress,
                           preprocess, desc=f"embed shard {s + 1}/{n_shards}")
        rows = manifest.iloc[lo:hi][res.ok]
        save_parquet_atomic(embeddings_table(rows, res.embeddings), part)
        atomic_write_json(res.errors, parts / f"part-{s:06d}.failed.json")
    tables, errors = [], []
    for s in range(n_shards):
        tables.append(pq.read_table(parts / f"part-{s:06d}.parquet"))
        errors += json.loads((parts / f"part-{s:06d}.failed.json").read_text())
    save_parquet_atomic(pa.concat_tables(tables), out_path)
    failed_csv = out_path.with_name(out_path.name + ".failed.csv")
    if errors:
        pd.DataFrame({"error": errors}).to_csv(failed_csv, index=False)
    elif failed_csv.exists():
        failed_csv.unlink()
    shutil.rmtree(parts)
    df, emb = read_embeddings(out_path)
    return df, emb, errors
