"""Nearest-neighbour backends on synthetic 64-d embeddings: faiss Flat vs HNSW vs IVF-PQ vs Milvus Lite.

    flock /tmp/guie-cpu.lock .venv/bin/python benchmarks/search_ann.py [--n 1000000] [--queries 1000] \
        [--sizes 100000,1000000] [--skip-milvus] [--json out.json]

Data: `n` unit-length 64-d vectors drawn around 20,000 random centres (embeddings of a catalogue cluster by object;
uniform random vectors would be the hardest case for any ANN index and unlike real embeddings), and `queries` fresh
points from the same mixture (not in the index). Ground truth: exact top-5 by brute force.
Per backend (guie's own backend classes, `guie.search.backends`): build time (add + train + persist), query latency
p50/p95 at k=5 for one query at a time on one thread (what a server request costs), recall@5 against the exact
top-5, and memory: the index's serialized size and the process's (Milvus Lite: its server process's) RSS growth.
IVF-PQ is measured as it ranks (approximate PQ distances) and with guie's exact re-rank of 8k candidates
(`ImageIndex` re-ranks with the vectors in its store). `--sizes` also measures flat and HNSW at smaller sizes,
for the size above which docs/search.md recommends an ANN index.
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
from _common import cpu_name  # noqa: E402

K = 5


def clustered(n: int, dim: int, centres: np.ndarray, rng: np.random.Generator, spread: float = 0.6) -> np.ndarray:
    """n unit vectors around unit-length random centres: a point lies ~`spread` from its centre, random centres
    lie ~1.41 apart, so each query's exact top-5 are near-equals among its cluster's points (a hard, realistic
    case: ranking must be right within a cluster, not only find it)."""
    c = centres / np.linalg.norm(centres, axis=1, keepdims=True)
    x = c[rng.integers(0, len(c), n)] + spread * rng.normal(size=(n, dim)).astype(np.float32) / np.sqrt(dim)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def exact_topk(x: np.ndarray, q: np.ndarray, k: int) -> np.ndarray:
    import faiss

    index = faiss.IndexFlatL2(x.shape[1])
    index.add(x)
    return index.search(q, k)[1]


def rss(pid: int | None = None) -> int:
    """Resident bytes of a process and its children (Milvus Lite runs a server child)."""
    import psutil

    p = psutil.Process(pid or os.getpid())
    return p.memory_info().rss + sum(c.memory_info().rss for c in p.children(recursive=True))


def timed_build(build) -> tuple[float, int]:
    """Run build() with every core; returns (seconds, RSS growth in bytes)."""
    import faiss

    faiss.omp_set_num_threads(os.cpu_count() or 1)
    before, t0 = rss(), time.perf_counter()
    build()
    return time.perf_counter() - t0, rss() - before


def measure(name: str, backend, x: np.ndarray, q: np.ndarray, truth: np.ndarray, build_s: float, grown: int,
            rerank: bool = False, disk_bytes: int | None = None) -> dict:
    """Query one at a time on one thread; returns the figures."""
    import faiss

    faiss.omp_set_num_threads(1)  # one query at a time on one thread, as a server request
    lat, found = [], []
    fetch = max(K * 8, 32) if rerank else K
    for v in q[:, None]:
        t = time.perf_counter()
        nb = backend.search(v, fetch)
        cand = nb.ids[0][nb.ids[0] >= 0]
        if rerank:  # guie's ImageIndex re-ranks approximate candidates with their exact vectors
            cand = cand[np.argsort(np.linalg.norm(x[cand] - v[0], axis=1), kind="stable")]
        lat.append(time.perf_counter() - t)
        found.append(cand[:K])
    recall = float(np.mean([len(set(f.tolist()) & set(t.tolist())) / K for f, t in zip(found, truth)]))
    if disk_bytes is None:
        disk_bytes = int(backend.describe().get("snapshot_bytes", 0))
    row = {"backend": name, "n": len(x), "build_s": round(build_s, 2),
           "p50_ms": round(1000 * float(np.percentile(lat, 50)), 3),
           "p95_ms": round(1000 * float(np.percentile(lat, 95)), 3), "recall@5": round(recall, 4),
           "disk_bytes": disk_bytes, "bytes_per_vector": round(disk_bytes / len(x), 1),
           "rss_growth_bytes": int(grown)}
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--sizes", default="100000", help="extra sizes for flat and hnsw (comma-separated)")
    ap.add_argument("--skip-milvus", action="store_true")
    ap.add_argument("--json", type=Path, help="write all rows here")
    args = ap.parse_args()

    from guie.search.backends.faiss_backend import FaissBackend

    rng = np.random.default_rng(0)
    centres = rng.normal(size=(20_000, args.dim)).astype(np.float32)
    x = clustered(args.n, args.dim, centres, rng)
    q = clustered(args.queries, args.dim, centres, rng)
    print(f"# {cpu_name()}, {os.cpu_count()} cores; n={args.n:,} dim={args.dim} queries={args.queries}", flush=True)
    rows = []
    sizes = sorted({int(s) for s in args.sizes.split(",") if s} - {args.n}) + [args.n]
    with tempfile.TemporaryDirectory() as tmp:
        for n in sizes:
            xs = x[:n]
            truth = exact_topk(xs, q, K)
            kinds = ["flat", "hnsw"] + (["ivfpq"] if n == args.n else [])
            for kind in kinds:
                backend = FaissBackend(Path(tmp) / f"{kind}-{n}", args.dim, kind=kind)
                if kind == "ivfpq":  # trained on the whole set, as `ImageIndex` does once it is large enough
                    build_s, grown = timed_build(lambda: backend.rebuild(np.arange(n), xs, None, 1))
                else:
                    build_s, grown = timed_build(lambda: (backend.add(np.arange(n), xs), backend.persist(1)))
                for rerank in ((False, True) if kind == "ivfpq" else (False,)):
                    rows.append(measure(f"faiss {backend.factory}" + (" + exact re-rank" if rerank else ""),
                                        backend, xs, q, truth, build_s, grown, rerank=rerank))
                del backend
        if not args.skip_milvus:
            from guie.search.backends.milvus_backend import MilvusBackend

            truth = exact_topk(x, q, K)
            backend = MilvusBackend(Path(tmp) / "milvus", args.dim, kind="flat", collection="bench")
            build_s, grown = timed_build(lambda: (backend.add(np.arange(len(x)), x), backend.persist(1)))
            db = Path(tmp) / "milvus" / "milvus.db"
            size = sum(f.stat().st_size for f in db.rglob("*") if f.is_file()) if db.is_dir() else db.stat().st_size
            rows.append(measure("milvus-lite FLAT", backend, x, q, truth, build_s, grown, disk_bytes=size))
            backend.close()
    print("\n| backend | n | build s | p50 ms | p95 ms | recall@5 | bytes/vector on disk | RSS growth MB |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['backend']} | {r['n']:,} | {r['build_s']} | {r['p50_ms']} | {r['p95_ms']} | {r['recall@5']} | "
              f"{r['bytes_per_vector']} | {r['rss_growth_bytes'] / 2**20:.0f} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
