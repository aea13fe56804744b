"""Local `guie embed` vs the same job on Ray (`guie embed --ray`) with 1 and 2 CPU model actors, on this machine.

    .venv/bin/python benchmarks/ray_embed.py [--images 128,384] [--rounds 2] [--model efficientnet_lite0]

The same files (generated 640x480 JPEGs), the same model (the offline default, EfficientNet-Lite0 at 224 px, a 64-d
head) and the same output kind, through `embed_to_file` (local: guie's CPU runtime, parallel single-threaded
forwards, each thread decoding its own batches) and `embed_with_ray` on a local Ray cluster of this machine's cores
(decoding in Ray tasks of half a CPU, each model actor one thread). The cluster is started once before timing; each
measurement is one whole job into a fresh output (plan, pipeline start, actors loading the model, every batch,
parts, merge), so Ray's fixed costs are in its numbers. Configurations alternate in ABBA order for `--rounds`
rounds. Prints one JSON line per measurement and, per job size, a summary with img/s, ratios to local, and Ray's
overhead per image: (Ray's seconds - local seconds) / images. With two job sizes it also splits each
configuration's time into a fixed cost per job and a marginal cost per image (the line through both sizes), and
Ray's marginal overhead per image (its marginal cost less local's).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import cpu_name  # noqa: E402


def write_jpegs(folder: Path, n: int) -> list[str]:
    """n generated 640x480 JPEGs (smooth colour fields with noise, like photos to a decoder)."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:480, 0:640]
    paths = []
    for i in range(n):
        a, b, c = rng.uniform(0.005, 0.03, 3)
        img = np.stack([np.sin(xx * a + i), np.cos(yy * b), np.sin((xx + yy) * c)], -1) * 100 + 128
        img = np.clip(img + rng.normal(0, 12, img.shape), 0, 255).astype(np.uint8)
        path = folder / f"img{i:05d}.jpg"
        Image.fromarray(img).save(path, quality=90)
        paths.append(str(path))
    return paths


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", default="128,384", help="job sizes, comma-separated")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--model", default="efficientnet_lite0")
    ap.add_argument("--batch-size", type=int, default=32)
    args = ap.parse_args()

    import pandas as pd
    import ray

    from guie.embedding.files import embed_to_file
    from guie.embedding.ray_embed import embed_with_ray
    from guie.models.embedder import resolve_embedder

    sizes = [int(v) for v in args.images.split(",")]
    work = Path(tempfile.mkdtemp(prefix="guie-ray-bench-"))
    try:
        all_paths = write_jpegs(work / "imgs", max(sizes))
        embedder = resolve_embedder(args.model)
        embedder.eval()
        cores = os.cpu_count() or 1
        ray.init(num_cpus=cores, include_dashboard=False, log_to_driver=False)

        def local(manifest, out):
            embed_to_file(embedder, manifest, out, batch_size=args.batch_size, progress=False)

        def on_ray(actors):
            def run(manifest, out):
                embed_with_ray(embedder, manifest, out, batch_size=args.batch_size, actors=actors,
                               cpus_per_actor=1.0, decode_cpus=0.5, progress=False)
            return run

        configs = {"local": local, "ray 1 actor": on_ray(1), "ray 2 actors": on_ray(2)}
        warm = pd.DataFrame({"path": all_paths[:2 * args.batch_size]})
        for name, fn in configs.items():  # warm-up: runtime conversion, Ray worker processes, page cache
            fn(warm, work / f"warm-{name.replace(' ', '-')}.parquet")
        total = {(n, name): 0.0 for n in sizes for name in configs}
        order = [(n, name) for n in sizes for name in configs]
        for r in range(args.rounds):
            for n, name in (order if r % 2 == 0 else order[::-1]):
                out = work / f"r{r}-{n}-{name.replace(' ', '-')}.parquet"
                load = os.getloadavg()[0]
                t0 = time.perf_counter()
                configs[name](pd.DataFrame({"path": all_paths[:n]}), out)
                took = time.perf_counter() - t0
                total[n, name] += took
                print(json.dumps({"round": r, "config": name, "images": n, "seconds": round(took, 3),
                                  "img/s": round(n / took, 2), "load1": round(load, 2)}), flush=True)
        summary = {"step": "summary", "machine": f"{cpu_name()}, {cores} cores", "model": args.model,
                   "sizes": sizes, "rounds": args.rounds, "batch_size": args.batch_size, "ray": ray.__version__}
        for n in sizes:
            seconds = {name: total[n, name] / args.rounds for name in configs}
            for name in configs:
                summary[f"{n}: {name} img/s"] = round(n / seconds[name], 2)
                if name != "local":
                    summary[f"{n}: {name} / local"] = round(seconds["local"] / seconds[name], 3)
                    summary[f"{n}: {name} overhead ms/img"] = round(1000 * (seconds[name] - seconds["local"]) / n, 2)
        if len(sizes) >= 2:
            lo, hi = min(sizes), max(sizes)
            marginal = {name: (total[hi, name] - total[lo, name]) / args.rounds / (hi - lo) for name in configs}
            for name in configs:
                summary[f"{name} fixed s/job"] = round(total[lo, name] / args.rounds - marginal[name] * lo, 2)
                summary[f"{name} marginal ms/img"] = round(1000 * marginal[name], 2)
                if name != "local":
                    summary[f"{name} marginal overhead ms/img"] = round(1000 * (marginal[name] - marginal["local"]), 2)
        print(json.dumps(summary), flush=True)
    finally:
        if ray.is_initialized():
            ray.shutdown()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
