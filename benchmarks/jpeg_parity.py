"""What the libjpeg-turbo fast path changes in the embeddings: max |difference| and emoji mP@5 with and without it.

    .venv/bin/python benchmarks/jpeg_parity.py [--split val] [--sizes 300,800]

The emoji benchmark's images (one split, folds by vendor as in `guie evaluate --folds-by vendor`) are embedded by
the default embedder (efficientnet_lite0, 64-d head, seed 0) three times: with the fast path, with GUIE_FAST_JPEG=0
(PIL decode and its 1/2-1/4-1/8 draft: guie before the fast path), and from fully decoded images (no DCT scaling:
what both approximate), (a) as they are (PNGs: the fast path must change nothing) and
(b) re-encoded as photo-like JPEGs (on white, quality 90) at a random size per image in --sizes, so that every n/8
scale libjpeg-turbo offers and PIL does not (3/8, 5/8, 6/8, 7/8) occurs. Prints one JSON line per source.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import DEFAULT_MANIFEST, cpu_name  # noqa: E402


def jpeg_copies(df, folder: Path, sizes: tuple[int, int]):
    """The manifest's images as JPEGs at a random square size in `sizes` (seeded), paths rewritten."""
    from PIL import Image

    from guie.imaging.io import load_image

    rng = np.random.default_rng(0)
    out = df.copy()
    paths = []
    for i, p in enumerate(df["path"]):
        side = int(rng.integers(sizes[0], sizes[1] + 1))
        q = folder / f"{i:05d}.jpg"
        load_image(p).resize((side, side), Image.Resampling.LANCZOS).save(q, quality=90)
        paths.append(str(q))
    out["path"] = paths
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--manifest", default=DEFAULT_MANIFEST)
    ap.add_argument("--split", default="val", help="rows of this split (all: every row)")
    ap.add_argument("--sizes", default="300,800", help="range of JPEG sides")
    ap.add_argument("--limit", type=int, default=0, help="first N rows only (a quick check)")
    args = ap.parse_args()

    import torch

    from guie.data.manifest import read_manifest
    from guie.embedding.engine import embed_decoded, embed_images
    from guie.evaluate.protocol import evaluate_folds
    from guie.imaging.io import load_image
    from guie.models import create_embedder

    print(f"command: {' '.join([Path(sys.executable).name] + sys.argv)}")
    print(f"machine: {cpu_name()}, {os.cpu_count()} cores, load average at start {os.getloadavg()[0]:.2f}", flush=True)
    df = read_manifest(args.manifest)
    if args.split != "all":
        df = df[df["split"] == args.split].reset_index(drop=True)
    if args.limit:
        df = df.head(args.limit)
    torch.manual_seed(0)
    embedder = create_embedder().eval()
    tmp = tempfile.TemporaryDirectory(prefix="guie-jpeg-parity-")
    lo, hi = (int(s) for s in args.sizes.split(","))
    sources = {"emoji PNGs": df, f"emoji as JPEGs {lo}-{hi} px": jpeg_copies(df, Path(tmp.name), (lo, hi))}
    for name, rows in sources.items():
        result = {}
        for fast in ("1", "0"):
            os.environ["GUIE_FAST_JPEG"] = fast
            t0 = time.perf_counter()
            res = embed_images(embedder, rows["path"].tolist(), progress=False)
            result[fast] = (res, time.perf_counter() - t0)
        os.environ.pop("GUIE_FAST_JPEG")
        (a, ta), (b, tb) = result["1"], result["0"]
        assert a.ok.all() and b.ok.all()
        # every pixel decoded (no DCT scaling at all), then the same resize: what both paths approximate
        full = embed_decoded(embedder, [load_image(p) for p in rows["path"]])
        scale = float(np.abs(full).max())

        def max_diff(x):
            return f"{np.abs(x - full).max():.4f} ({np.abs(x - full).max() / scale:.1%} of max |value|)"

        print(json.dumps({
            "source": name, "images": len(rows), "model": "efficientnet_lite0 + 64-d head (seed 0), 224 px",
            "max |fast - PIL|": f"{np.abs(a.embeddings - b.embeddings).max():.4f}",
            "max |fast - full decode|": max_diff(a.embeddings), "max |PIL draft - full decode|": max_diff(b.embeddings),
            "mP@5 fast path": round(evaluate_folds(rows, a.embeddings, by="vendor").score, 4),
            "mP@5 PIL (GUIE_FAST_JPEG=0)": round(evaluate_folds(rows, b.embeddings, by="vendor").score, 4),
            "mP@5 full decode": round(evaluate_folds(rows, full, by="vendor").score, 4),
            "embed s fast / PIL": [round(ta, 1), round(tb, 1)]}), flush=True)
    print(f"load average at end {os.getloadavg()[0]:.2f}")
    tmp.cleanup()


if __name__ == "__main__":
    main()
