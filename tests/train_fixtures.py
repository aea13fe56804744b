"""Generated labelled image sets for training tests: each class is a random coloured pattern, its images are
shifted / noisy / recoloured copies, so a model can learn classes in a few steps."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw


def make_labelled_images(root: Path, n_classes: int = 12, per_class: int = 4, size: int = 48, seed: int = 0,
                         vendors: tuple[str, ...] = ("a", "b", "c", "d")) -> Path:
    """Write images + manifest.csv (path,label,domain,vendor,split) and return the manifest path.

    The i-th image of a class gets vendor vendors[i % len(vendors)]; classes alternate train/val/test splits
    (train, train, val, test pattern)."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for c in range(n_classes):
        colour = tuple(int(v) for v in rng.integers(0, 255, 3))
        pts = [tuple(int(v) for v in rng.integers(4, size - 4, 2)) for _ in range(5)]
        split = ["train", "train", "val", "test"][c % 4]
        for i in range(per_class):
            img = Image.new("RGB", (size, size), (255, 255, 255))
            d = ImageDraw.Draw(img)
            dx, dy = rng.integers(-3, 4, 2)
            fill = tuple(min(255, v + int(rng.integers(0, 30))) for v in colour)
            d.polygon([(x + dx, y + dy) for x, y in pts], fill=fill)
            arr = np.asarray(img).astype(np.int16) + rng.integers(-8, 9, (size, size, 3))
            path = root / f"c{c:03d}_{i}.png"
            Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(path)
            rows.append({"path": path.name, "label": f"class{c:03d}", "domain": f"dom{c % 3}",
                         "vendor": vendors[i % len(vendors)], "split": split})
    manifest = root / "manifest.csv"
    pd.DataFrame(rows).to_csv(manifest, index=False)
    return manifest


def tiny_recipe(manifest: Path, out: Path, cache: Path, stages: str, extra: str = "") -> str:
    """YAML text of a small recipe on the generated set (lite0 at 32 px, no workers)."""
    return f"""
name: tiny
seed: 0
output_dir: {out}
cache_dir: {cache}
num_workers: 0
log_every_steps: 5
checkpoint_every_steps: 5
model: {{backbone: efficientnet_lite0, embed_dim: 16, dropout: 0.0, image_size: 32, preprocess: {{crop_pct: 1.0}}}}
datasets:
  gen: {{manifest: {manifest}, where: {{split: [train, val]}}}}
validation: {{manifest: {manifest}, where: {{split: test}}, folds_by: vendor}}
{extra}
stages:
{stages}
"""
