"""The GUIE winners' head tricks against the same baseline on the emoji benchmark (CPU, EfficientNet-Lite0).

Every variant is the `emoji-lite0-cpu` recipe's head stage (3,200 steps on cached frozen features) with one change;
each model is scored on the val classes (for choosing) and the test classes (looked at once), leave-one-vendor-out
mP@5. PCA variants fit their PCA on the models' embeddings of the training images (never val or test).

    python benchmarks/tricks_emoji.py --out benchmarks/results/tricks-emoji.jsonl [--steps 3200] [--variants a,b]

Variants: baseline; msd4 / msd8 (model.head_multisample_dropout 4 / 8); wide256 (a 256-d head, scored as it is:
not a GUIE-valid model); wide256-pca64 (the 6th place: the same head, PCA to 64); seed1 (the baseline at seed 1);
concat-pca64 (the 4th place's combination on CPU: baseline + seed1 concatenated, 128-d, PCA to 64).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

VARIANTS = {
    "baseline": [],
    "msd4": ["model.head_multisample_dropout=4"],
    "msd8": ["model.head_multisample_dropout=8"],
    "wide256": ["model.wide_head=true", "model.embed_dim=256"],
    "seed1": ["seed=1"],
}
DERIVED = {"wide256-pca64": ["wide256"], "concat-pca64": ["baseline", "seed1"]}


def train_variant(name: str, overrides: list[str], steps: int, runs: Path) -> Path:
    """The head stage of emoji-lite0-cpu with `overrides`; returns its model (reused when already trained)."""
    from guie.train.engine import train
    from guie.train.recipe import load_run_config

    out = runs / name
    if (out / "model.pt").exists():
        return out / "model.pt"
    cfg = load_run_config("emoji-lite0-cpu", [*overrides, f"stages.0.steps={steps}", f"output_dir={out}"])
    cfg.select_stages(["head"])
    return train(cfg, progress=False)


def embeddings(model_path: Path, df) -> np.ndarray:
    """The model's embeddings of `df`'s images through the feature cache (the backbone is the recipe's, frozen)."""
    from guie.embedding.feature_store import cached_features, embed_cached_features
    from guie.models import load_embedder
    from guie.utils import default_cache_dir

    model = load_embedder(model_path)
    feats, ok = cached_features(model, df["path"].tolist(), default_cache_dir() / "features", progress=False,
                                runtime="torch")
    assert ok.all(), "some benchmark images did not decode"
    return embed_cached_features(model, feats)


def score(df, emb) -> float:
    from guie.evaluate.protocol import evaluate_folds

    return float(evaluate_folds(df.reset_index(drop=True), emb, by="vendor").score)


def main() -> None:
    """Train the variants, score them on val and test, append one JSON line per variant to --out."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--steps", type=int, default=3200)
    ap.add_argument("--runs", type=Path, default=Path("runs/tricks"))
    ap.add_argument("--variants", default="baseline,msd8,wide256,wide256-pca64,seed1,concat-pca64")
    args = ap.parse_args()
    from guie.data.benchmarks import benchmark_manifest
    from guie.data.manifest import read_manifest
    from guie.models.heads import fit_pca

    df = read_manifest(benchmark_manifest("emoji"))
    parts = {s: df[df["split"] == s].reset_index(drop=True) for s in ("train", "val", "test")}
    wanted = args.variants.split(",")
    needed = sorted({v for v in wanted if v in VARIANTS} | {m for v in wanted for m in DERIVED.get(v, [])})
    models, seconds = {}, {}
    for name in needed:
        t = time.time()
        models[name] = train_variant(name, VARIANTS[name], args.steps, args.runs)
        seconds[name] = round(time.time() - t, 1)
    emb = {(name, s): embeddings(path, parts[s]) for name, path in models.items() for s in parts}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "a") as f:
        for v in wanted:
            if v in VARIANTS:
                row = {s: score(parts[s], emb[(v, s)]) for s in ("val", "test")}
                row["dim"] = int(emb[(v, "val")].shape[1])
            else:
                members = DERIVED[v]
                train_x = np.concatenate([emb[(m, "train")] for m in members], axis=1)
                mean, comps = fit_pca(train_x, 64)
                row = {"dim": 64}
                for s in ("val", "test"):
                    y = (np.concatenate([emb[(m, s)] for m in members], axis=1) - mean) @ comps.T
                    row[s] = score(parts[s], y / np.linalg.norm(y, axis=1, keepdims=True))
            row.update(variant=v, steps=args.steps, train_seconds={m: seconds.get(m) for m in
                                                                   DERIVED.get(v, [v]) if m in seconds})
            f.write(json.dumps(row) + "\n")
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
