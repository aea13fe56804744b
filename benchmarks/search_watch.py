"""What `guie index add --watch` costs per file: a sync of `--files` new images (hash, decode, embed, one commit),
a sync of as many deleted ones, and a sync of an unchanged folder (the restart's comparison), with `--model`.

    flock /tmp/guie-cpu.lock .venv/bin/python benchmarks/search_watch.py [--files 100] [--model efficientnet_lite0]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import cpu_name  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--files", type=int, default=100)
    ap.add_argument("--model", default="efficientnet_lite0")
    ap.add_argument("--image-size", type=int, default=None)
    args = ap.parse_args()

    from guie.search.encoder import describe_model, load_model
    from guie.search.image_index import ImageIndex
    from guie.search.watch import FolderWatcher

    model = load_model(args.model, image_size=args.image_size)
    print(f"# {cpu_name()}; {args.model} ({model.embed_dim}-d), {args.files} PNGs of 256x256")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "photos"
        folder.mkdir()
        rng = np.random.default_rng(0)
        with ImageIndex.create(Path(tmp) / "idx", dim=model.embed_dim, model=describe_model(model, args.model),
                               image_root=folder) as index:
            watcher = FolderWatcher(index, folder, model, runtime="auto")
            watcher.sync(None)  # runtime prepared outside the timings
            Image.fromarray(rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)).save(folder / "warm.png")
            watcher.sync(None)
            paths = []
            for i in range(args.files):
                small = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
                p = folder / f"{i}.png"
                Image.fromarray(small).resize((256, 256), Image.BICUBIC).save(p)
                paths.append(p)
            rows = []
            t0 = time.perf_counter()
            r = watcher.sync(set(paths))
            rows.append(("add (changed paths)", time.perf_counter() - t0, r.added))
            t0 = time.perf_counter()
            r = watcher.sync(None)
            rows.append(("unchanged folder (restart comparison)", time.perf_counter() - t0, len(paths) + 1))
            for p in paths:
                p.unlink()
            t0 = time.perf_counter()
            r = watcher.sync(set(paths))
            rows.append(("delete (changed paths)", time.perf_counter() - t0, r.removed))
    print("| sync | files | total s | ms per file |")
    print("|---|---|---|---|")
    for name, took, n in rows:
        print(f"| {name} | {n} | {took:.2f} | {1000 * took / max(n, 1):.1f} |")


if __name__ == "__main__":
    main()
