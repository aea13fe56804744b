"""Cached backbone features: computed once per (model, preprocessing, file list), stored as float16 .npy.

Frozen-backbone work (zero-shot baselines, PCA, training a head for hundreds of epochs) only needs these.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Sequence

import numpy as np

from .embed import embed_images, model_fingerprint
from .models.embedder import Embedder
from .models.preprocess import PreprocessConfig
from .utils import atomic_write_bytes, atomic_write_json, log


def cached_features(embedder: Embedder, paths: Sequence[str], cache_dir: str | Path,
                    preprocess: PreprocessConfig | None = None, batch_size: int = 64,
                    num_workers: int | None = None, device: str | None = None, progress: bool = True,
                    tag: str = "features") -> tuple[np.ndarray, np.ndarray]:
    """Backbone features [n_ok, F] (float32) and the ok mask [N], from the cache or computed and cached."""
    preprocess = preprocess or embedder.preprocess
    key = hashlib.sha256((model_fingerprint(embedder, preprocess, True) + "\n" + "\n".join(map(str, paths)))
                         .encode()).hexdigest()[:20]
    folder = Path(cache_dir) / "features"
    feat_file, ok_file = folder / f"{tag}-{key}.npy", folder / f"{tag}-{key}.ok.npy"
    if feat_file.exists() and ok_file.exists():
        log.info("features from cache %s", feat_file)
        return np.load(feat_file).astype(np.float32), np.load(ok_file)
    res = embed_images(embedder, paths, batch_size=batch_size, num_workers=num_workers, device=device,
                       features=True, progress=progress, preprocess=preprocess, desc=f"features {tag}")
    _save_npy(res.embeddings.astype(np.float16), feat_file)
    _save_npy(res.ok, ok_file)  # written last: its presence marks a complete cache entry
    atomic_write_json({"paths": len(paths), "ok": int(res.ok.sum()), "preprocess": preprocess.to_dict(),
                       "backbone": embedder.spec.backbone}, folder / f"{tag}-{key}.json")
    return res.embeddings.astype(np.float16).astype(np.float32), res.ok


def _save_npy(arr: np.ndarray, path: Path) -> None:
    import io

    buf = io.BytesIO()
    np.save(buf, arr)
    atomic_write_bytes(buf.getvalue(), path)
