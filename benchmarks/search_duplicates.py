"""Near-duplicate groups (`ImageIndex.duplicate_groups`, `guie index duplicates`): precision and recall on a planted
set, and memory on a large index.

    flock /tmp/guie-cpu.lock .venv/bin/python benchmarks/search_duplicates.py [--originals 240]
        [--model efficientnet_lite0] [--distances 0.05 0.1 0.15 0.2 0.3] [--flat-n 100000]

Planted set: `originals` generated emoji-like pictures (a face disc of a random colour with random eyes, mouth and
marks, 128 px); a third of them each get a re-encoded copy (JPEG quality 60), a resized copy (64 px) or a lightly
cropped copy (6% off each side). Everything is embedded with `--model` (unit-length embeddings), added to a flat
faiss index, and grouped at each distance; a predicted pair is any two items of one group, a true pair an original
and its copy. Precision = true predicted pairs / predicted pairs, recall = true predicted pairs / planted pairs.

Memory: `--flat-n` random unit 64-d vectors (1% of them with a planted near-copy) in a flat index; the peak RSS
growth while grouping them, next to the size of the vectors themselves.
"""
from __future__ import annotations

import argparse
import hashlib
import io
import sys
import tempfile
import threading
import time
from itertools import combinations
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import cpu_name  # noqa: E402


def emoji_like(seed: int, size: int = 128) -> Image.Image:
    """A generated emoji-like picture: a disc of a random colour with random eyes, mouth and marks."""
    rng = np.random.default_rng(seed)
    im = Image.new("RGB", (size, size), (255, 255, 255))
    d = ImageDraw.Draw(im)
    colour = tuple(int(c) for c in rng.integers(40, 256, 3))
    m = int(size * rng.uniform(0.04, 0.12))
    d.ellipse((m, m, size - m, size - m), fill=colour, outline=(0, 0, 0), width=2)
    for _ in range(2):  # eyes
        x, y, r = rng.uniform(0.3, 0.7) * size, rng.uniform(0.3, 0.45) * size, rng.uniform(0.04, 0.1) * size
        d.ellipse((x - r, y - r, x + r, y + r), fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
    pts = [(float(rng.uniform(0.25, 0.75) * size), float(rng.uniform(0.6, 0.8) * size)) for _ in range(3)]
    d.polygon(pts, fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
    for _ in range(int(rng.integers(1, 4))):  # marks
        x0, y0 = rng.uniform(0, size, 2)
        d.line((float(x0), float(y0), float(x0 + rng.uniform(-30, 30)), float(y0 + rng.uniform(-30, 30))),
               fill=tuple(int(c) for c in rng.integers(0, 256, 3)), width=int(rng.integers(2, 6)))
    return im


def photo_like(seed: int, size: int = 128) -> Image.Image:
    """A generated photo-like picture: smooth colour gradients and a few blobs (as the tests' `photo`)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    out = np.empty((size, size, 3))
    for c in range(3):
        a, b, f = rng.uniform(-1, 1, 3)
        out[..., c] = 128 + 90 * np.sin(6 * (a * xx + b * yy) + f * 3)
    for _ in range(3):
        cx, cy, r = rng.uniform(0, 1), rng.uniform(0, 1), rng.uniform(0.05, 0.2)
        out[(xx - cx) ** 2 + (yy - cy) ** 2 < r * r] = rng.integers(0, 256, 3)
    return Image.fromarray(np.clip(out, 0, 255).astype(np.uint8))


def real_emoji(manifest: str, n: int) -> list[Image.Image]:
    """`n` emoji images of the `guie data emoji` benchmark (a seeded sample over all vendors), on white, 128 px."""
    import pandas as pd

    m = pd.read_csv(manifest).sample(n, random_state=0)
    out = []
    for p in m["path"]:
        im = Image.open(Path(manifest).parent / p).convert("RGBA")
        white = Image.new("RGBA", im.size, (255, 255, 255, 255))
        out.append(Image.alpha_composite(white, im).convert("RGB").resize((128, 128), Image.LANCZOS))
    return out


def planted(originals: int, kind: str = "emoji", manifest: str | None = None
            ) -> tuple[list[bytes], list[tuple[int, int]], list[str]]:
    """(PNG/JPEG bytes of every image, the planted (original, copy) index pairs, the kind of each copy)."""
    blobs, pairs, kinds = [], [], []
    draw = emoji_like if kind == "emoji" else photo_like
    real = real_emoji(manifest, originals) if kind == "real-emoji" else None
    for i in range(originals):
        im = real[i] if real else draw(1000 + i)
        buf = io.BytesIO()
        im.save(buf, "PNG")
        blobs.append(buf.getvalue())
        orig = len(blobs) - 1
        buf = io.BytesIO()
        kind = ("re-encoded", "resized", "cropped")[i % 3]
        if kind == "re-encoded":
            im.save(buf, "JPEG", quality=60)
        elif kind == "resized":
            im.resize((64, 64), Image.BILINEAR).save(buf, "PNG")
        else:
            w = im.width
            im.crop((int(0.06 * w), int(0.06 * w), w - int(0.06 * w), w - int(0.06 * w))).save(buf, "PNG")
        blobs.append(buf.getvalue())
        pairs.append((orig, len(blobs) - 1))
        kinds.append(kind)
    return blobs, pairs, kinds


THUMBNAIL_MODEL = "grey8x8"


def grey_thumbnail(im: Image.Image) -> np.ndarray:
    """A perceptual-hash-like 64-d embedding: the 8x8 grey thumbnail, mean removed, unit length."""
    g = np.asarray(im.convert("L").resize((8, 8), Image.BOX), np.float32).ravel()
    g -= g.mean()
    return g / max(float(np.linalg.norm(g)), 1e-6)


def peak_rss_during(fn):
    """(fn(), peak RSS growth in MB while it ran), sampled every 10 ms."""
    import psutil

    proc = psutil.Process()
    base = proc.memory_info().rss
    peak, done = [base], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss)
            time.sleep(0.01)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    try:
        out = fn()
    finally:
        done.set()
        t.join()
    return out, (peak[0] - base) / 2**20


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--originals", type=int, default=240)
    ap.add_argument("--model", default="efficientnet_lite0", help=f"a backbone or checkpoint; {THUMBNAIL_MODEL}: an "
                    "8x8 grey thumbnail (a perceptual-hash-like 64-d baseline, no model)")
    ap.add_argument("--image-size", type=int, default=None)
    ap.add_argument("--distances", type=float, nargs="+", default=[0.05, 0.1, 0.15, 0.2, 0.3, 0.4])
    ap.add_argument("--flat-n", type=int, default=100_000)
    ap.add_argument("--pictures", choices=["emoji", "photo", "real-emoji"], default="emoji",
                    help="the originals: generated emoji-like or photo-like pictures, or real-emoji (--manifest)")
    ap.add_argument("--manifest", default=None, help="real-emoji: the emoji benchmark's manifest.csv")
    ap.add_argument("--linkage", choices=["star", "single"], default="star")
    args = ap.parse_args()

    print(f"# {cpu_name()}")
    if args.originals:
        planted_table(args)
    if args.flat_n:
        flat_memory(args.flat_n)


def planted_table(args) -> None:
    """Precision and recall of the groups on the planted set, at each distance (a Markdown table)."""
    from guie.embedding.engine import embed_decoded
    from guie.search.encoder import load_model
    from guie.search.image_index import ImageIndex, NewItem

    blobs, pairs, kinds = planted(args.originals, args.pictures, args.manifest)
    t0 = time.perf_counter()
    if args.model == THUMBNAIL_MODEL:
        vecs = np.stack([grey_thumbnail(Image.open(io.BytesIO(b))) for b in blobs])
    else:
        model = load_model(args.model, image_size=args.image_size)
        vecs = embed_decoded(model, [Image.open(io.BytesIO(b)).convert("RGB") for b in blobs], runtime="torch")
    print(f"# {args.pictures}-like originals, {args.linkage} linkage; embedded {len(blobs)} images with "
          f"{args.model} ({vecs.shape[1]}-d) in {time.perf_counter() - t0:.1f} s")
    truth = {tuple(sorted(p)) for p in pairs}
    kind_of = {tuple(sorted(p)): k for p, k in zip(pairs, kinds)}
    with tempfile.TemporaryDirectory() as tmp:
        with ImageIndex.create(Path(tmp) / "planted", dim=vecs.shape[1], model={"ref": "x", "fingerprint": "x"}) \
                as index:
            res = index.add(vecs, [NewItem(hashlib.sha1(b).hexdigest(), f"{i}.img", None, {})
                                   for i, b in enumerate(blobs)])
            pos = {int(item_id): i for i, item_id in enumerate(res.ids)}
            d_true = [float(np.linalg.norm(vecs[a] - vecs[b])) for a, b in pairs]
            nearest_other = []
            for i in range(0, len(blobs), 2):
                row = index.search(vecs[i:i + 1], 3)[0]
                nearest_other.append(min(h.distance for h in row if pos[h.id] not in (i, i + 1)))
            print(f"# planted pair distances: median {np.median(d_true):.3f}, max {max(d_true):.3f}; "
                  f"nearest other original: min {min(nearest_other):.3f}, 5th pct "
                  f"{np.percentile(nearest_other, 5):.3f}")
            print("| max distance | groups | predicted pairs | precision | recall | re-encoded | resized | cropped |")
            print("|---|---|---|---|---|---|---|---|")
            for dist in args.distances:
                groups = index.duplicate_groups(dist, linkage=args.linkage)
                predicted = {tuple(sorted((pos[a.id], pos[b.id]))) for g in groups for a, b in combinations(g, 2)}
                hit = predicted & truth
                by_kind = {k: sum(1 for p in hit if kind_of[p] == k) / max(1, kinds.count(k))
                           for k in ("re-encoded", "resized", "cropped")}
                precision = len(hit) / len(predicted) if predicted else 1.0
                print(f"| {dist:g} | {len(groups)} | {len(predicted)} | {precision:.3f} | {len(hit) / len(truth):.3f} "
                      f"| {by_kind['re-encoded']:.2f} | {by_kind['resized']:.2f} | {by_kind['cropped']:.2f} |")


def flat_memory(n: int) -> None:
    """Peak RSS growth while grouping `n` random unit 64-d vectors (1% with a planted near-copy), flat index."""
    from guie.search.image_index import ImageIndex, NewItem

    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, 64)).astype(np.float32)
    n_copies = n // 100
    x[-n_copies:] = x[:n_copies] + rng.normal(scale=0.01, size=(n_copies, 64)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    with tempfile.TemporaryDirectory() as tmp:
        with ImageIndex.create(Path(tmp) / "big", dim=64, model={"ref": "x", "fingerprint": "x"}) as index:
            index.add(x, [NewItem(f"h{i}", None, None, {}) for i in range(n)])
            del x
            t0 = time.perf_counter()
            groups, grew = peak_rss_during(lambda: index.duplicate_groups(0.15))
            took = time.perf_counter() - t0
            rss = psutil_rss()
    print(f"# {n:,} random unit 64-d vectors ({n * 256 / 2**20:.1f} MB of vectors), {n_copies:,} planted copies: "
          f"{len(groups):,} groups found in {took:.1f} s; peak RSS growth while grouping {grew:.1f} MB "
          f"(process RSS {rss:.0f} MB)")


def psutil_rss() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


if __name__ == "__main__":
    main()
