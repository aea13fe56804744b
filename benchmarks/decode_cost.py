"""CPU time per image of turning a file into the forward's input, old path vs `ImageTransform.load`, in one process.

    .venv/bin/python benchmarks/decode_cost.py [--images 256] [--rounds 5]

Both paths run on one thread (as each of `embed_images`' forward threads does) over the same files, batch by batch
of 32, up to a channels_last batch (the layout the CPU forward takes):
(a) before: `load_image(path, draft_size)` + `ImageTransform.__call__` (Pillow's window resize, CHW copy), then
    `torch.stack` and the conversion to channels_last;
(b) now: `ImageTransform.load` (JPEGs: libjpeg-turbo at >= 15/16 of the needed side and torch's SIMD resize;
    every image stored channels-last), then `stack_images`.
Sources: generated 640x480 photo-like JPEGs (as benchmarks/cpu_embed.py) and the emoji benchmark's PNGs (skipped if
not built). The two alternate for `--rounds` rounds; medians of the per-round CPU milliseconds per image are printed,
with the largest pixel difference between the two (PNGs: must be 0).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from guie.runtime import tune_cpu_allocator  # noqa: E402

tune_cpu_allocator()  # as embed_images does on CPU, before anything starts threads
from _common import cpu_name  # noqa: E402
from cpu_embed import emoji_paths, write_jpegs  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()

    import torch

    from guie.imaging.io import load_image
    from guie.models import create_embedder
    from guie.models.preprocess import draft_size
    from guie.pipeline.datasets import stack_images

    torch.set_num_threads(1)
    transform = create_embedder().transform
    draft = draft_size(transform.cfg)
    print(f"command: {' '.join([Path(sys.executable).name] + sys.argv)}")
    print(f"machine: {cpu_name()}, torch {torch.__version__}, one thread", flush=True)
    tmp = tempfile.TemporaryDirectory(prefix="guie-decode-cost-")
    sources = {"640x480 JPEGs": write_jpegs(Path(tmp.name), args.images), "emoji PNGs": emoji_paths(args.images)}

    def before(paths):
        return torch.stack([transform(load_image(p, draft_size=draft)) for p in paths]).contiguous(
            memory_format=torch.channels_last)

    def now(paths):
        return stack_images([transform.load(p) for p in paths]).contiguous(memory_format=torch.channels_last)

    def ms_per_image(fn, paths) -> float:
        t0 = time.process_time()
        for lo in range(0, len(paths), 32):
            fn(paths[lo:lo + 32])
        return (time.process_time() - t0) / len(paths) * 1e3

    for name, paths in sources.items():
        if paths is None:
            print(f"{name}: skipped (emoji benchmark not built; `guie data emoji`)")
            continue
        diff = int((before(paths[:64]).int() - now(paths[:64]).int()).abs().max())
        times = {"before": [], "now": []}
        for _ in range(args.rounds):
            times["before"].append(ms_per_image(before, paths))
            times["now"].append(ms_per_image(now, paths))
        med = {k: float(np.median(v)) for k, v in times.items()}
        print(json.dumps({"source": name, "images": len(paths), "ms/img before": round(med["before"], 3),
                          "ms/img now": round(med["now"], 3), "now / before": round(med["now"] / med["before"], 3),
                          "rounds before": [round(x, 2) for x in times["before"]],
                          "rounds now": [round(x, 2) for x in times["now"]], "max pixel difference": diff}), flush=True)
    tmp.cleanup()


if __name__ == "__main__":
    main()
