"""Speed of the training augmentations and of one epoch of sampler indices, as ratios to in-process baselines.

    .venv/bin/python benchmarks/augment_sampler_speed.py [--manifest M]
        [--images 300] [--size 224] [--items 200000] [--classes 20000] [--batch 256] [--m 4]

M defaults to the emoji benchmark's manifest where `guie data emoji` writes it ($GUIE_CACHE or ~/.cache/guie).

Augmentations: images/s of `build_train_transform` (1st-place defaults, and a heavier variant) on decoded PIL
images, one thread (what each DataLoader worker gets), against the evaluation transform (`ImageTransform`, the
baseline: resize + to-tensor, work any pipeline does). Uses the emoji PNGs if present, else generated photos.
Samplers: seconds to build one epoch of indices for `--items` items in `--classes` classes, against
pytorch-metric-learning's MPerClassSampler (baseline) for the same length.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import DEFAULT_MANIFEST, cpu_name  # noqa: E402


def _best_of(fn, repeat: int = 3) -> float:
    """Fastest of `repeat` runs (the machine is shared; the minimum is the least disturbed)."""
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def _images(manifest: str, n: int):
    from PIL import Image

    if Path(manifest).is_file():
        from guie.data.manifest import read_manifest
        from guie.imaging.io import load_image

        paths = read_manifest(manifest)["path"].tolist()[:n]
        return [load_image(p) for p in paths], f"{len(paths)} emoji PNGs from {manifest}"
    rng = np.random.default_rng(0)
    imgs = []
    for _ in range(n):
        h, w = int(rng.integers(200, 500)), int(rng.integers(200, 500))
        yy, xx = np.mgrid[0:h, 0:w]
        arr = np.stack([xx * 255 // w, yy * 255 // h, (xx * yy) % 256], -1).astype(np.uint8)
        imgs.append(Image.fromarray(arr))
    return imgs, f"{n} generated 200-500 px images"


def bench_augment(args) -> None:
    from guie.models import ImageTransform, PreprocessConfig
    from guie.pipeline.augment import AugmentConfig, build_train_transform

    torch.set_num_threads(1)
    imgs, what = _images(args.manifest, args.images)
    print(f"augment: {what}, output {args.size} px, 1 thread")
    pre = PreprocessConfig(image_size=args.size)
    cases = [("baseline: eval ImageTransform", ImageTransform(pre)),
             ("train, all off (== eval)", build_train_transform(pre, AugmentConfig.off())),
             ("train, 1st-place defaults", build_train_transform(pre, AugmentConfig())),
             ("train, defaults + RandomResizedCrop + ColorJitter 0.8 + gray 0.2",
              build_train_transform(pre, AugmentConfig(crop_scale=(0.3, 1.0), color_jitter_p=0.8, grayscale_p=0.2))),
             ("train, affine only (p=1)", build_train_transform(pre, AugmentConfig(
                 hflip=0, jpeg_p=0, affine_p=1.0, cutout_p=0))),
             ("train, JPEG only (p=1)", build_train_transform(pre, AugmentConfig(
                 hflip=0, jpeg_p=1.0, affine_p=0, cutout_p=0)))]
    base = None
    width = max(len(n) for n, _ in cases)
    print(f"{'transform':<{width}}  {'images/s':>9}  {'vs baseline':>11}")
    for name, t in cases:
        torch.manual_seed(0)
        secs = _best_of(lambda: [t(im) for im in imgs])
        base = base or secs
        print(f"{name:<{width}}  {len(imgs) / secs:9.0f}  {base / secs:10.2f}x")


def bench_samplers(args) -> None:
    from guie.pipeline.samplers import ClassBalancedSampler, ShuffleSampler

    rng = np.random.default_rng(0)
    # long-tailed class sizes (class k has weight 1 / (k + 1) ** 0.7), like landmark / product data
    weights = 1.0 / np.arange(1, args.classes + 1) ** 0.7
    labels = rng.choice(args.classes, args.items, p=weights / weights.sum())
    domains = labels % 5
    print(f"\nsamplers: one epoch of {args.items} indices, {len(np.unique(labels))} classes, batch {args.batch}, "
          f"m {args.m}")
    cases = []
    try:
        from pytorch_metric_learning.samplers import MPerClassSampler

        pml = MPerClassSampler(labels, args.m, batch_size=args.batch, length_before_new_iter=args.items)
        cases.append(("baseline: pml MPerClassSampler", lambda: list(iter(pml))))
    except ImportError:
        print("pytorch-metric-learning not installed: ratios are against ShuffleSampler")
    cb = ClassBalancedSampler(labels, args.batch, args.m)
    cbd = ClassBalancedSampler(labels, args.batch, args.m, domains=domains)
    cb8 = ClassBalancedSampler(labels, args.batch, args.m, num_replicas=8, rank=3)
    sh = ShuffleSampler(args.items, args.batch)
    cases += [("ClassBalancedSampler", lambda: list(cb)),
              ("ClassBalancedSampler, 5 domains", lambda: list(cbd)),
              ("ClassBalancedSampler, rank 3 of 8", lambda: list(cb8)),
              ("ShuffleSampler", lambda: list(sh)),
              ("torch DistributedSampler (1 of 1)", lambda: list(torch.utils.data.DistributedSampler(
                  range(args.items), num_replicas=1, rank=0)))]
    base = None
    width = max(len(n) for n, _ in cases)
    print(f"{'sampler':<{width}}  {'s/epoch':>8}  {'vs baseline':>11}")
    for name, fn in cases:
        secs = _best_of(fn, repeat=2)
        base = base or secs
        print(f"{name:<{width}}  {secs:8.2f}  {base / secs:10.2f}x")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--manifest", default=DEFAULT_MANIFEST)
    ap.add_argument("--images", type=int, default=300)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--items", type=int, default=200_000)
    ap.add_argument("--classes", type=int, default=20_000)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--m", type=int, default=4)
    args = ap.parse_args()
    print(f"command: {' '.join([Path(sys.executable).name] + sys.argv)}")
    print(f"machine: {cpu_name()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
          f"torch {torch.__version__}")
    bench_augment(args)
    bench_samplers(args)


if __name__ == "__main__":
    main()
