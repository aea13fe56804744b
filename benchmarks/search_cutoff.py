"""A `max_distance` suggestion for a model on a labelled benchmark: the largest distance at which the search hits
within it are still `--precision` (0.95) of the query's label, and what share of the queries keep a hit.

    flock /tmp/guie-cpu.lock .venv/bin/python benchmarks/search_cutoff.py \\
        --manifest ~/.cache/guie/emoji/16.0.0/manifest.csv --where split=val --model runs/my-run/model.pt \\
        [--k 5] [--precision 0.95]

Every selected row is embedded and indexed (flat, exact); each row is a query against the others (itself left out),
k hits each. For each distance D: precision = hits within D whose label is the query's / hits within D; coverage =
queries with at least one hit within D. Prints the table at a few quantiles and the suggestion.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import cpu_name  # noqa: E402


def suggestion(distances: np.ndarray, correct: np.ndarray, target: float) -> tuple[float, float]:
    """(the largest D whose hits within it are at least `target` correct, their precision), from all hits'
    distances and correctness; (0, 1) when even the nearest hits fall short."""
    order = np.argsort(distances, kind="stable")
    d, ok = distances[order], correct[order]
    precision = np.cumsum(ok) / np.arange(1, len(ok) + 1)
    good = np.flatnonzero(precision >= target)
    if not len(good):
        return 0.0, 1.0
    last = good[-1]
    return float(d[last]), float(precision[last])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--manifest", required=True)
    ap.add_argument("--where", nargs="*", default=[])
    ap.add_argument("--model", required=True)
    ap.add_argument("--image-size", type=int, default=None)
    ap.add_argument("--k", type=int, default=5)
    ap.add_argument("--precision", type=float, default=0.95)
    ap.add_argument("--limit", type=int, default=5000, help="rows at most (a seeded sample)")
    args = ap.parse_args()

    from guie.data.manifest import read_manifest, select_rows
    from guie.embedding.engine import embed_images
    from guie.search.encoder import load_model
    from guie.search.image_index import ImageIndex, NewItem

    df = select_rows(read_manifest(args.manifest, require_labels=True), args.where, args.manifest)
    if len(df) > args.limit:
        df = df.sample(args.limit, random_state=0).reset_index(drop=True)
    model = load_model(args.model, image_size=args.image_size)
    res = embed_images(model, df["path"].astype(str).tolist(), progress=False)
    labels = df["label"].astype(str).to_numpy()[res.ok]
    vecs = res.embeddings
    print(f"# {cpu_name()}; {args.manifest} {' '.join(args.where)}: {len(vecs)} rows, {args.model} "
          f"({vecs.shape[1]}-d)")
    with tempfile.TemporaryDirectory() as tmp, ImageIndex.create(Path(tmp) / "cal", dim=vecs.shape[1],
                                                                 model={"ref": "x", "fingerprint": "x"}) as index:
        ids = index.add(vecs, [NewItem(f"h{i}", None, lbl, {}) for i, lbl in enumerate(labels)]).ids
        row_of = {int(i): r for r, i in enumerate(ids)}
        dist, correct, nearest = [], [], []
        for lo in range(0, len(vecs), 1024):
            for r, hits in zip(range(lo, lo + 1024), index.search(vecs[lo:lo + 1024], args.k + 1)):
                hits = [h for h in hits if row_of[h.id] != r][:args.k]
                dist += [h.distance for h in hits]
                correct += [labels[row_of[h.id]] == labels[r] for h in hits]
                nearest.append(hits[0].distance if hits else np.inf)
    dist, correct, nearest = np.asarray(dist), np.asarray(correct), np.asarray(nearest)
    print("| max distance | hits within | precision | queries with a hit |")
    print("|---|---|---|---|")
    for q in (0.05, 0.1, 0.25, 0.5, 0.75, 1.0):
        d = float(np.quantile(dist, q))
        within = dist <= d
        print(f"| {d:.3f} | {within.mean():.2f} | {correct[within].mean():.3f} | {(nearest <= d).mean():.2f} |")
    d, p = suggestion(dist, correct, args.precision)
    print(f"suggested max_distance {d:.3f}: precision {p:.3f} of the hits within it, "
          f"{(nearest <= d).mean():.2f} of the queries keep at least one hit")


if __name__ == "__main__":
    main()
