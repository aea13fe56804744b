"""Parity and speed of exported models (TorchScript, ONNX) against the training-time Embedder on the emoji test set.

    .venv/bin/python benchmarks/export_parity.py [--manifest M]
        [--image-size 64] [--limit N] [--tta none|flip|letterbox|flip,letterbox] [--formats torchscript,onnx]
        [--speed-images 512] [--eager-cache FILE.npy]

M defaults to the emoji benchmark's manifest where `guie data emoji` writes it ($GUIE_CACHE or ~/.cache/guie).

Model: the offline default backbone (efficientnet_lite0, ImageNet weights) + a seeded random 64-d head. Prints, for
each exported format: max |exported - eager| where both get the same pixels (network parity), end to end on the raw
images (in-model torch resize vs PIL resize), the share of queries whose top-5 neighbours are identical in the emoji
protocol (4 vendor folds), mP@5 of each, and images/s on the first --speed-images images (decoded in memory), as a
ratio to the eager baseline timed on the same images in the same process. --eager-cache keeps the eager embeddings of
the whole set between runs (so that each run stays short on a shared machine).
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import DEFAULT_MANIFEST, cpu_name  # noqa: E402


def _batches(arrays: list[np.ndarray], size: int):
    """Runs of same-shaped images, at most `size` long (the exported models take one H x W per batch)."""
    start = 0
    while start < len(arrays):
        end = start + 1
        while end < len(arrays) and end - start < size and arrays[end].shape == arrays[start].shape:
            end += 1
        yield start, np.stack(arrays[start:end])
        start = end


def _top5(df, emb):
    from guie.evaluate.protocol import evaluate_folds

    ev = evaluate_folds(df, emb, by="vendor")
    return ev.score, ev.per_query.sort_values(["fold", "path"])["neighbors"].map(tuple).to_numpy()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--manifest", default=DEFAULT_MANIFEST)
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--limit", type=int, default=None, help="use the first N test images")
    ap.add_argument("--tta", default="none")
    ap.add_argument("--formats", default="torchscript,onnx", help="which exports to measure (comma-separated)")
    ap.add_argument("--speed-images", type=int, default=512, help="images timed per path")
    ap.add_argument("--eager-cache", default=None, help=".npy file for the eager embeddings of the whole set")
    args = ap.parse_args()
    if not Path(args.manifest).is_file():
        sys.exit(f"{args.manifest}: not found (build the emoji set with `guie data emoji`, or pass --manifest)")

    import torch

    from guie.data.manifest import read_manifest, select_rows
    from guie.export import TTAConfig, export_onnx, export_torchscript, reference_embed
    from guie.export.check import identity_side, synthetic_image
    from guie.imaging.io import load_image
    from guie.models import create_embedder
    from guie.models.preprocess import pil_to_uint8

    df = select_rows(read_manifest(args.manifest), ["split=test"]).reset_index(drop=True)
    if args.limit:
        df = df.head(args.limit)
    tta = TTAConfig.parse(args.tta)
    print(f"command: {' '.join([Path(sys.executable).name] + sys.argv)}")
    print(f"machine: {cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} "
          f"threads), Python {platform.python_version()}")
    torch.manual_seed(0)
    emb = create_embedder("efficientnet_lite0", image_size=args.image_size).eval()
    print(f"model: efficientnet_lite0 + random 64-d head at {args.image_size} px, TTA {args.tta}; "
          f"{len(df)} emoji test images, {df['label'].nunique()} classes x {df['vendor'].nunique()} vendors")
    images = [load_image(p) for p in df["path"]]
    arrays = [pil_to_uint8(im).numpy() for im in images]

    tmp = Path(tempfile.mkdtemp(prefix="guie-bench-"))
    formats = [f.strip() for f in args.formats.split(",") if f.strip()]
    runners = {}
    if "torchscript" in formats:
        t = time.perf_counter()
        ts = export_torchscript([emb], tmp / "m.pt", tta)
        print(f"export torchscript: {time.perf_counter() - t:.1f} s")
        runners["torchscript"] = lambda x, m=torch.jit.load(str(ts.path)): m(torch.from_numpy(x)).numpy()
    if "onnx" in formats:
        import onnxruntime as ort

        t = time.perf_counter()
        ox = export_onnx([emb], tmp / "m.onnx", tta)
        print(f"export onnx: {time.perf_counter() - t:.1f} s")
        sess = ort.InferenceSession(str(ox.path), providers=["CPUExecutionProvider"])
        runners["onnx"] = lambda x, s=sess: s.run(None, {"images": x})[0]

    side = identity_side(emb.preprocess)
    native = [synthetic_image(side, side, seed=s) for s in range(16)]
    from PIL import Image

    native_ref = reference_embed([emb], [Image.fromarray(a.transpose(1, 2, 0)) for a in native], tta)

    n_speed = min(args.speed_images, len(df))
    t = time.perf_counter()
    reference_embed([emb], images[:n_speed], tta)
    eager_speed = n_speed / (time.perf_counter() - t)
    cache = Path(args.eager_cache) if args.eager_cache else None
    if cache and cache.is_file() and np.load(cache).shape[0] == len(df):
        eager = np.load(cache)
    else:
        eager = reference_embed([emb], images, tta)
        if cache:
            np.save(cache, eager)
    score_e, nn_e = _top5(df, eager)
    rows = [("eager (PIL resize + Embedder)", "-", "-", "-", score_e, eager_speed, 1.0)]
    with torch.inference_mode():
        for name, fn in runners.items():
            for _ in range(3):  # warm-up (TorchScript's profiling executor specialises on the first calls)
                fn(np.stack(arrays[:64]))
            net = float(np.abs(np.concatenate([fn(a[None]) for a in native]) - native_ref).max())
            out = np.empty_like(eager)
            t = time.perf_counter()
            for start, batch in _batches(arrays[:n_speed], 64):
                out[start:start + len(batch)] = fn(batch)
            speed = n_speed / (time.perf_counter() - t)
            for start, batch in _batches(arrays[n_speed:], 64):
                out[n_speed + start:n_speed + start + len(batch)] = fn(batch)
            score, nn = _top5(df, out)
            same = float(np.mean([a == b for a, b in zip(nn, nn_e)]))
            rows.append((name, f"{net:.1e}", f"{np.abs(out - eager).max():.1e}", f"{same:.2%}", score, speed,
                         speed / eager_speed))
    print()
    header = ("path", "network max|diff|", "end-to-end max|diff|", "same top-5", "mP@5", "img/s", "vs eager")
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---" for _ in header) + "|")
    for r in rows:
        print(f"| {r[0]} | {r[1]} | {r[2]} | {r[3]} | {r[4]:.4f} | {r[5]:.0f} | {r[6]:.2f}x |")


if __name__ == "__main__":
    main()
