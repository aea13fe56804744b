"""`guie demo`: the emoji benchmark end to end on the default backbone, on a CPU, in a few minutes.

Steps: fetch/build the benchmark -> backbone features of all 7,428 images (cached) -> zero-shot raw features and
PCA-64 (fitted on train-half images only) -> a 64-d head trained on the frozen features of train classes ->
test-class mP@5 table, results.json and an HTML report with retrieval grids.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pandas as pd

from .data.emoji import build_emoji_benchmark
from .data.manifest import read_manifest
from .evaluate.protocol import evaluate_folds
from .evaluate.report import format_table, write_report
from .features import cached_features
from .models.embedder import create_embedder
from .models.heads import fit_pca
from .utils import atomic_write_json, default_cache_dir


def l2n(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def run_demo(out_dir: str | Path = "outputs/demo", cache_dir: str | Path | None = None, image_size: int = 224,
             train_head: bool = True, head_steps: int = 3200, device: str | None = None, progress: bool = True) -> dict:
    """Run the demo and return its results (also written to out_dir/results.json and out_dir/*/report.html)."""
    t0 = time.time()
    cache_dir = Path(cache_dir or default_cache_dir())
    out_dir = Path(out_dir)
    manifest = build_emoji_benchmark(cache_dir)
    df = read_manifest(manifest)
    embedder = create_embedder("efficientnet_lite0", embed_dim=None, image_size=image_size,
                               preprocess={"crop_pct": 1.0}).eval()
    feats, ok = cached_features(embedder, df["path"].tolist(), cache_dir, device=device, progress=progress,
                                tag="emoji")
    df = df[ok].reset_index(drop=True)
    train_half = df["split"].isin(["train", "val"]).to_numpy()
    test = (df["split"] == "test").to_numpy()
    rows, evals = [], {}

    def score(name, emb):
        ev = evaluate_folds(df[test].reset_index(drop=True), emb[test], by="vendor")
        evals[name] = ev
        rows.append({"method": name, "dim": emb.shape[1], "mP@5 (test classes)": ev.score,
                     **{f"q={f['fold']}": f["score"] for f in ev.folds}})

    score("raw features (L2-normalised)", l2n(feats))
    mean, comps = fit_pca(feats[train_half], 64)
    score("PCA-64 (fit on train half)", l2n((feats - mean) @ comps.T))
    if train_head:
        from .train.head import HeadTrainingConfig, train_head_on_features

        cfg = HeadTrainingConfig(steps=head_steps)
        tr = df["split"] == "train"
        head = train_head_on_features(feats[tr.to_numpy()], df.loc[tr, "label"].to_numpy(), cfg,
                                      progress=progress)
        score("64-d ArcFace head (frozen backbone)", head.embed_numpy(feats))
    cols = ["method", "dim", "mP@5 (test classes)"] + [f"q={v}" for v in sorted(df["vendor"].unique())]
    table = format_table(rows, cols, title=f"emoji benchmark, efficientnet_lite0 @ {image_size}px, "
                                             f"{int(test.sum()) // 4} test classes, 4 vendor folds")
    print(table)
    for name, ev in evals.items():
        slug = "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-")[:40]
        write_report(ev, out_dir / slug, title=f"emoji benchmark: {name}",
                     extra={"backbone": "efficientnet_lite0", "image_size": image_size})
    result = {"image_size": image_size, "rows": rows, "seconds": round(time.time() - t0, 1)}
    atomic_write_json(result, out_dir / "results.json")
    print(f"reports: {out_dir}/*/report.html  ({result['seconds']} s)")
    return result
