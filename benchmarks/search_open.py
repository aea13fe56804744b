"""What verifying an index on open costs: `ImageIndex.open` (check file SHA-256, FAISS read, catch-up, id summary and
spot-vector verification against the store) against the fastest way to get the same snapshot into memory, a bare
`faiss.read_index` of it.

    flock /tmp/guie-cpu.lock .venv/bin/python benchmarks/search_open.py [--n 1000000] [--dim 64] [--repeats 5]

Builds one flat index of `n` random `dim`-d vectors in a temp folder (one commit), then alternates the two ways of
opening it `repeats` times (warm page cache for both) and prints the median of each, their ratio and the share of
the open spent on the checks (SHA-256 of the snapshot, the store's id summary).
"""
from __future__ import annotations

import argparse
import hashlib
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import cpu_name  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()

    import faiss

    from guie.search.image_index import ImageIndex, NewItem

    rng = np.random.default_rng(0)
    x = rng.normal(size=(args.n, args.dim)).astype(np.float32)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "idx"
        t = time.perf_counter()
        with ImageIndex.create(folder, dim=args.dim, model={"ref": "bench", "fingerprint": "bench"}) as index:
            index.add(x, [NewItem(f"h{i}", None, None, {}) for i in range(args.n)])
        build = time.perf_counter() - t
        snap = next(folder.glob("faiss-*.index"))
        snap_mb = snap.stat().st_size / 1e6
        timings: dict[str, list[float]] = {"faiss.read_index": [], "ImageIndex.open": [], "sha256": [],
                                           "store id summary": []}
        for _ in range(args.repeats):
            t = time.perf_counter()
            faiss.read_index(str(snap))
            timings["faiss.read_index"].append(time.perf_counter() - t)
            t = time.perf_counter()
            with ImageIndex.open(folder, write=False) as index:
                timings["ImageIndex.open"].append(time.perf_counter() - t)
                t = time.perf_counter()
                index.store.id_summary()
                timings["store id summary"].append(time.perf_counter() - t)
            t = time.perf_counter()
            with open(snap, "rb") as f:
                hashlib.file_digest(f, "sha256")
            timings["sha256"].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in timings.items()}
    print(f"# {cpu_name()}; n={args.n:,} dim={args.dim}; snapshot {snap_mb:.0f} MB; "
          f"build (one commit) {build:.1f} s; medians of {args.repeats}")
    for k, v in med.items():
        print(f"{k:>18}: {v * 1000:8.1f} ms")
    print(f"open / read_index: {med['ImageIndex.open'] / med['faiss.read_index']:.2f}x "
          f"(sha256 {med['sha256'] * 1000:.0f} ms + store id summary {med['store id summary'] * 1000:.0f} ms of "
          f"{med['ImageIndex.open'] * 1000:.0f} ms)")


if __name__ == "__main__":
    main()
