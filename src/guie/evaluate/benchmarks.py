"""Score models on the built-in cross-style benchmarks (emoji, glyphs, icons): the transfer table.

Each benchmark is evaluated leave-one-style-out on one split's classes (test by default: classes never trained on
and never used to choose settings). Backbone features come from the feature cache, so scoring another head on the
same backbone costs seconds, and a model is only run over images it has not seen before.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from ..data.benchmarks import BENCHMARKS, benchmark_manifest, get_benchmark
from ..data.manifest import read_manifest
from ..embedding.feature_store import cached_features, embed_cached_features
from ..errors import InputError
from ..models.embedder import Embedder, resolve_embedder
from ..utils import default_cache_dir
from .protocol import Evaluation, evaluate_folds


def benchmark_frame(name: str, split: str = "test", cache_dir: str | Path | None = None) -> pd.DataFrame:
    """The rows of one split of a built-in benchmark (built on first use)."""
    df = read_manifest(benchmark_manifest(name, cache_dir), require_labels=True)
    if split != "all":
        df = df[df["split"] == split]
    if df.empty:
        raise InputError(f"benchmark {name!r} has no rows with split={split!r}")
    return df.reset_index(drop=True)


@torch.no_grad()
def score_on_benchmark(model: str | Path | Embedder, name: str, split: str = "test",
                       cache_dir: str | Path | None = None, device=None, progress: bool = True,
                       batch_size: int = 64, runtime: str = "auto", precision: str = "auto") -> Evaluation:
    """GUIE mP@5 of `model` (checkpoint, Embedder, or backbone name = raw features) on one benchmark split; the
    backbone features run on `runtime` at `precision` (`guie.embedding.runtimes`)."""
    embedder = resolve_embedder(model)
    bench = get_benchmark(name)
    df = benchmark_frame(name, split, cache_dir)
    feats, ok = cached_features(embedder, df["path"].tolist(), cache_dir or default_cache_dir(), device=device,
                                progress=progress, batch_size=batch_size, runtime=runtime, precision=precision)
    emb = embed_cached_features(embedder, feats[ok])
    return evaluate_folds(df[ok].reset_index(drop=True), emb, by=bench.folds_by)


def transfer_table(models: dict[str, str | Path | Embedder], benchmarks: Sequence[str] = tuple(BENCHMARKS),
                   split: str = "test", cache_dir: str | Path | None = None, device=None,
                   progress: bool = True, image_size: int | None = None, crop_pct: float | None = None,
                   batch_size: int = 64, runtime: str = "auto", precision: str = "auto") -> pd.DataFrame:
    """mP@5 of every model (rows, by display name) on every benchmark (columns), plus their mean. `image_size`,
    `crop_pct` adapt every model (`resolve_embedder`); `runtime`, `precision`: what runs the forward."""
    rows = []
    for label, model in models.items():
        embedder = resolve_embedder(model, image_size=image_size, crop_pct=crop_pct)
        row = {"model": label, "dim": embedder.embed_dim}
        for name in benchmarks:
            row[name] = score_on_benchmark(embedder, name, split, cache_dir, device, progress, batch_size, runtime,
                                           precision).score
        row["mean"] = float(np.mean([row[b] for b in benchmarks]))
        rows.append(row)
    return pd.DataFrame(rows)
