"""Exact mP@5 at the GUIE test's scale vs a bare FAISS `IndexFlatL2` search of the same vectors, in one process.

    .venv/bin/python benchmarks/metric_speed.py [--queries 5000] [--index 200000] [--dim 64] [--rounds 3]

(a) bare: `faiss.IndexFlatL2(d)`, `add(index)`, `search(queries, 5)`: the float32 k-NN alone (ties in any order);
(b) guie: `guie.metrics.mean_precision_at_k(queries, labels, index, labels)`: validation, the exact k-NN (FAISS
    window, batched float64 re-rank, whole-index fallback where needed) and the scoring.
The vectors are random and clustered (like embeddings: classes of a few items around random centres), float32.
Measurements alternate (bare, guie) for `--rounds` rounds; the ratio uses the sums over rounds, so a load change
on a shared machine affects both sides alike, and the per-round ratios are printed with their median, as is the
ratio of process CPU time (less sensitive to other jobs than wall time).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import cpu_name  # noqa: E402


def clustered(n_queries: int, n_index: int, dim: int, per_class: int, seed: int = 0):
    """(queries, query labels, index, index labels): classes of ~per_class index items around random centres."""
    rng = np.random.default_rng(seed)
    n_cls = max(1, n_index // per_class)
    centres = rng.normal(size=(n_cls, dim)).astype(np.float32)
    x_lab = rng.integers(0, n_cls, n_index)
    x = centres[x_lab] + rng.normal(scale=0.8, size=(n_index, dim)).astype(np.float32)
    q_lab = rng.choice(np.unique(x_lab), n_queries)
    q = centres[q_lab] + rng.normal(scale=0.8, size=(n_queries, dim)).astype(np.float32)
    return q, q_lab, x, x_lab


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--queries", type=int, default=5000)
    ap.add_argument("--index", type=int, default=200_000)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--per-class", type=int, default=10, help="mean index items per class")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()

    import faiss

    from guie import metrics

    print(f"command: {' '.join([Path(sys.executable).name] + sys.argv)}")
    print(f"machine: {cpu_name()}, {os.cpu_count()} cores, faiss {faiss.__version__} "
          f"({faiss.omp_get_max_threads()} threads), load average at start {os.getloadavg()[0]:.2f}", flush=True)
    q, q_lab, x, x_lab = clustered(args.queries, args.index, args.dim, args.per_class)

    def bare():
        index = faiss.IndexFlatL2(x.shape[1])
        index.add(x)
        return index.search(q, 5)

    def guie():
        return metrics.precision_at_k(q, q_lab, x, x_lab, k=5)

    impl = sys.modules[metrics.knn_search.__module__]  # where the k-NN lives: count its whole-index fallbacks
    whole_index, fallbacks = impl._exact_knn_whole_index, []
    impl._exact_knn_whole_index = lambda qf, *a: (fallbacks.append(len(qf)), whole_index(qf, *a))[1]
    rerank, rerank_s = impl._rerank_window, [0.0]  # and the time of the batched float64 re-rank itself

    def timed_rerank(*a):
        t0 = time.perf_counter()
        out = rerank(*a)
        rerank_s[0] += time.perf_counter() - t0
        return out

    impl._rerank_window = timed_rerank
    bare()  # warm-up: thread pool, page faults
    times: dict[str, list[float]] = {"bare": [], "guie": []}
    cpu: dict[str, float] = {"bare": 0.0, "guie": 0.0}
    for r in range(args.rounds):
        for what, fn in (("bare", bare), ("guie", guie)):
            c0, t0 = time.process_time(), time.perf_counter()
            out = fn()
            times[what].append(time.perf_counter() - t0)
            cpu[what] += time.process_time() - c0
            if what == "guie":
                res = out
        print(json.dumps({"round": r, "bare_s": round(times["bare"][-1], 3), "guie_s": round(times["guie"][-1], 3),
                          "guie / bare": round(times["guie"][-1] / times["bare"][-1], 3)}), flush=True)
    _, faiss_i = bare()
    same = float((faiss_i == res.neighbors).all(1).mean())
    per_round = [g / b for g, b in zip(times["guie"], times["bare"])]
    print(f"load average at end {os.getloadavg()[0]:.2f}")
    print("summary (target guie / bare <= 1.1):")
    print(json.dumps({"queries": args.queries, "index": args.index, "dim": args.dim, "mP@5": round(res.score, 4),
                      "bare s (sum)": round(sum(times["bare"]), 3), "guie s (sum)": round(sum(times["guie"]), 3),
                      "guie / bare": round(sum(times["guie"]) / sum(times["bare"]), 3),
                      "guie / bare median of rounds": round(statistics.median(per_round), 3),
                      # CPU seconds: less sensitive than wall time to other jobs on a shared machine
                      "guie / bare (cpu time)": round(cpu["guie"] / cpu["bare"], 3),
                      "queries ranked on the whole index (per round)": sum(fallbacks) // args.rounds,
                      "float64 re-rank s (per round)": round(rerank_s[0] / args.rounds, 3),
                      "queries where FAISS's top-5 equals the exact one": same}), flush=True)


if __name__ == "__main__":
    main()
