"""Frozen-backbone fast path: backbone features of a stage's images, computed once and cached as float16.

View 0 is the clean evaluation view; views 1..V-1 are augmented with per-(view, image) seeds, so the head sees
augmentation without running the backbone every step. Under DDP each rank computes a slice (sharded embedding),
rank 0 merges, every rank loads the merged file.
"""
from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler
from tqdm.auto import tqdm

from ..data.augment import AugmentConfig, build_train_transform
from ..embed import default_num_workers, model_fingerprint
from ..models.preprocess import ImageTransform, draft_size
from ..utils import atomic_write_bytes, default_cache_dir, log
from .data import SeededImageDataset, collate_training, sample_seed
from .distributed import barrier


class _KeySampler(Sampler):
    def __init__(self, keys):
        self.keys = keys

    def __iter__(self):
        return iter(self.keys)

    def __len__(self):
        return len(self.keys)


def _save_npy(arr: np.ndarray, path: Path) -> None:
    buf = io.BytesIO()
    np.save(buf, arr)
    atomic_write_bytes(buf.getvalue(), path)


@torch.inference_mode()
def _extract(embedder, paths, transform, view_seed: int, rows: np.ndarray, device, batch_size, workers, progress,
             desc) -> np.ndarray:
    ds = SeededImageDataset(paths, np.zeros(len(paths), dtype=np.int64), transform,
                            draft_size=draft_size(embedder.preprocess))
    keys = [(int(i), sample_seed(view_seed, 0, int(i))) for i in rows]
    loader = DataLoader(ds, batch_size=batch_size, sampler=_KeySampler(keys), num_workers=workers,
                        collate_fn=collate_training)
    out = np.zeros((len(paths), embedder.backbone.num_features), dtype=np.float16)
    use_bf16 = device.type == "cuda"
    with tqdm(total=len(rows), desc=desc, disable=not progress, dynamic_ncols=True) as bar:
        for images, _, index, errors in loader:
            for e in errors:
                log.warning("skipped %s (its cached features are zeros)", e)
            if images is not None:
                images = images.to(device).contiguous(memory_format=torch.channels_last)
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
                    f = embedder.forward_features(images)
                out[index.numpy()] = f.float().cpu().numpy().astype(np.float16)
            bar.update(len(errors) + (0 if index is None else len(index)))
    return out


def stage_feature_cache(trainer, stage, data) -> torch.Tensor:
    """Features [V, N, F] (float16, CPU) for the rows of data.df, from the cache or computed (sharded over ranks)."""
    embedder, dist, cfg = trainer.embedder, trainer.dist, trainer.cfg
    paths_all = data.df["path"].astype(str).to_numpy()
    uniq, inverse = np.unique(paths_all, return_inverse=True)
    aug = AugmentConfig.from_dict(stage.augment)
    views = max(1, stage.cache_views)
    key_src = json.dumps({"model": model_fingerprint(embedder, embedder.preprocess, True), "views": views,
                          "augment": stage.augment, "seed": cfg.seed}, sort_keys=True, default=str)
    key = hashlib.sha256((key_src + "\n".join(uniq)).encode()).hexdigest()[:20]
    folder = Path(cfg.cache_dir or default_cache_dir()) / "features"
    final = folder / f"train-{key}.npy"
    if not final.exists():
        embedder.eval()
        workers = default_num_workers() if cfg.num_workers is None else cfg.num_workers
        rows = np.arange(dist.rank, len(uniq), dist.world_size)
        for v in range(views):
            part = folder / f"train-{key}.v{v}.r{dist.rank}of{dist.world_size}.npy"
            if part.exists():
                continue
            transform = ImageTransform(embedder.preprocess) if v == 0 else build_train_transform(embedder.preprocess, aug)
            feats = _extract(embedder, list(uniq), transform, cfg.seed * 1000 + v, rows, trainer.device,
                             batch_size=64, workers=workers, progress=trainer.progress and dist.is_main,
                             desc=f"features view {v + 1}/{views}")
            _save_npy(feats[rows], part)  # resumable: finished (view, rank) parts are kept
        barrier(dist)
        if dist.is_main:
            merged = np.zeros((views, len(uniq), embedder.backbone.num_features), dtype=np.float16)
            for v in range(views):
                for r in range(dist.world_size):
                    p = folder / f"train-{key}.v{v}.r{r}of{dist.world_size}.npy"
                    merged[v, np.arange(r, len(uniq), dist.world_size)] = np.load(p)
            _save_npy(merged, final)
            for p in folder.glob(f"train-{key}.v*.r*of*.npy"):
                p.unlink()
        barrier(dist)
    feats = torch.from_numpy(np.load(final))
    return feats[:, torch.as_tensor(inverse)]
