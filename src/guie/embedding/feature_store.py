"""A feature store: backbone features per (model, preprocessing, view) and image path, computed once, kept as float16.

Frozen-backbone work (zero-shot baselines, PCA, validation, training a head for thousands of steps on cached
features) only needs these. The store is keyed by image path, so any subset or superset of images reuses what was
computed before; only missing images are embedded (sharded over ranks under torchrun), then the index is updated
atomically. Undecodable images are remembered as failed (ok=False), not retried every time.
"""
from __future__ import annotations

import hashlib
import io
import json
import uuid
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from ..distributed import barrier_world
from ..models.embedder import Embedder
from ..models.preprocess import ImageTransform, PreprocessConfig
from ..pipeline.datasets import sample_seed
from ..utils import atomic_write_bytes, atomic_write_json, log, resolve_device, save_parquet_atomic
from .engine import iter_embeddings


def path_seed(seed: int, view: int, path: str) -> int:
    """Augmentation seed of one (view, image): stable across runs and image lists."""
    return sample_seed(seed * 1009 + view, 0, zlib.crc32(path.encode()))


def _save_npy(arr: np.ndarray, path: Path) -> None:
    buf = io.BytesIO()
    np.save(buf, arr)
    atomic_write_bytes(buf.getvalue(), path)


def _view_transform(preprocess: PreprocessConfig, view: int, augment: dict | None):
    if view == 0:
        return ImageTransform(preprocess)
    from ..pipeline.augment import AugmentConfig, build_train_transform

    return build_train_transform(preprocess, AugmentConfig.from_dict(augment or {}))


def _compute(embedder: Embedder, paths: list[str], transform, seeds: list[int] | None, device, batch_size: int,
             num_workers: int | None, progress: bool, desc: str, runtime, precision: str
             ) -> tuple[np.ndarray, np.ndarray]:
    """Backbone features (float16) of `paths` through the embedding engine, and the ok mask."""
    feats = np.zeros((len(paths), embedder.backbone.num_features), dtype=np.float16)
    ok = np.zeros(len(paths), dtype=bool)
    for b in iter_embeddings(embedder, paths, batch_size, num_workers, device, features=True, progress=progress,
                             report_failure=lambda msg: log.warning("skipped %s", msg), desc=desc,
                             transform=transform, seeds=seeds, runtime=runtime, precision=precision):
        feats[b.indices] = b.embeddings.astype(np.float16)
        ok[b.indices] = True
    return feats, ok


def cached_features(embedder: Embedder, paths: Sequence[str], cache_dir: str | Path, *,
                    preprocess: PreprocessConfig | None = None, view: int = 0, augment: dict | None = None,
                    seed: int = 0, batch_size: int = 64, num_workers: int | None = None, device=None,
                    progress: bool = True, rank: int = 0, world_size: int = 1, runtime: str = "auto",
                    precision: str = "fp32") -> tuple[np.ndarray, np.ndarray]:
    """Backbone features of `paths`, aligned with them: (float32 [N, F] with zero rows where decoding failed,
    ok mask [N]).

    view 0 is the clean evaluation view; view k > 0 is augmented with `augment` (AugmentConfig fields), seeded
    per (seed, k, path). With world_size > 1 (torchrun), every rank must call this; each computes a slice.
    `runtime`, `precision`: what computes missing features (`guie.embedding.runtimes`; fp32 by default, as the
    features train heads). fp32 features of every runtime share one store (they agree within ~1e-6, below the
    store's float16); features of another precision are stored apart.
    """
    from .runtimes import resolve_choice

    device = resolve_device(device)
    choice = resolve_choice(embedder, runtime, precision, device, features=True)
    paths = [str(p) for p in paths]
    preprocess = preprocess or embedder.preprocess
    saved_pre = embedder.preprocess
    embedder.preprocess = preprocess
    try:
        key = json.dumps({"model": embedder.fingerprint(True, preprocess), "view": view,
                          "augment": augment if view else None, "seed": seed if view else None,
                          **({"precision": choice.precision} if choice.precision != "fp32" else {})}, sort_keys=True)
        store = Path(cache_dir) / "features" / hashlib.sha256(key.encode()).hexdigest()[:20]
        index = _read_index(store)
        missing = sorted(set(paths) - set(index))
        if missing:
            mine = missing[rank::world_size]
            if mine:
                transform = _view_transform(preprocess, view, augment)
                seeds = [path_seed(seed, view, p) for p in mine] if view else None
                feats, ok = _compute(embedder, mine, transform, seeds, device, batch_size, num_workers,
                                     progress and rank == 0, f"features view {view}" if view else "features",
                                     choice.runtime, choice.precision)
                part = f"part-{uuid.uuid4().hex[:12]}"
                _save_npy(feats, store / f"{part}.npy")
                save_parquet_atomic(pd.DataFrame({"path": mine, "row": np.arange(len(mine)), "ok": ok,
                                                  "part": part}), store / f"{part}.rows.parquet")
            barrier_world(world_size)
            if rank == 0:
                _rebuild_index(store, key)
            barrier_world(world_size)
            index = _read_index(store)
        return _gather(store, index, paths)
    finally:
        embedder.preprocess = saved_pre


def embed_cached_features(embedder: Embedder, features: np.ndarray, device=None) -> np.ndarray:
    """The embedder's head over cached backbone features: [N, F] -> L2-normalised float32 embeddings [N, d].

    Inference only: no autograd and no dropout (the modules run in eval mode, and get their own mode back after),
    so a model that is training can be scored on cached features between steps. `device` is where the head runs.
    """
    import torch

    modes = [(m, m.training) for m in embedder.modules()]
    embedder.eval()
    try:
        with torch.no_grad():
            return embedder.embed_features(torch.as_tensor(features, device=device)).cpu().numpy()
    finally:
        for m, training in modes:
            m.training = training


def _read_index(store: Path) -> dict:
    f = store / "index.parquet"
    if not f.exists():
        return {}
    df = pd.read_parquet(f)
    return dict(zip(df["path"], zip(df["part"], df["row"], df["ok"])))


def _rebuild_index(store: Path, key: str) -> None:
    """Merge every part's row table into index.parquet (a part's rows are visible once both its files exist)."""
    frames = [pd.read_parquet(p) for p in sorted(store.glob("part-*.rows.parquet"))
              if (store / p.name.replace(".rows.parquet", ".npy")).exists()]
    df = pd.concat(frames, ignore_index=True).drop_duplicates("path", keep="last")
    save_parquet_atomic(df, store / "index.parquet")
    atomic_write_json({"key": json.loads(key), "images": int(len(df))}, store / "store.json")


def _gather(store: Path, index: dict, paths: list[str]) -> tuple[np.ndarray, np.ndarray]:
    parts: dict[str, np.ndarray] = {}
    first = next(iter(index.values()))[0]
    dim = np.load(store / f"{first}.npy", mmap_mode="r").shape[1]
    out = np.zeros((len(paths), dim), dtype=np.float32)
    ok = np.zeros(len(paths), dtype=bool)
    for i, p in enumerate(paths):
        part, row, good = index[p]
        if good:
            if part not in parts:
                parts[part] = np.load(store / f"{part}.npy", mmap_mode="r")
            out[i] = parts[part][row]
            ok[i] = True
    return out, ok
