"""The GUIE competition metric, exactly: mean Precision@5 with the min(n_q, 5) normalisation.

    mP@5 = 1/Q * sum_q 1/min(n_q,5) * sum_{j <= min(n_q,5)} rel_q(j)

n_q = number of index items sharing the query's label; only the first min(n_q, 5) neighbours count. Neighbours
are found by exact Euclidean k-NN on the vectors as given (the host did not normalise them), with FAISS
`IndexFlatL2`. FAISS leaves the order of tied distances undefined (faiss #904), so ties are broken here by index
position: candidates are re-ranked with a stable sort on exact float64 distances, and any query whose k-th
distance is tied beyond the candidate window falls back to a brute-force ranking.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

_EXTRA_CANDIDATES = 16


def _as_matrix(x, name: str) -> np.ndarray:
    a = np.asarray(x)
    if a.ndim == 1:
        a = a[None, :]
    if a.ndim != 2:
        raise ValueError(f"{name} must be a 2-D array [N, d], got shape {a.shape}")
    if not np.issubdtype(a.dtype, np.number):
        raise ValueError(f"{name} must be numeric, got dtype {a.dtype}")
    if not np.isfinite(a).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    return a


def _exact_sq_dists(q: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Squared Euclidean distances [nq, nx] in float64 from differences (no cancellation error)."""
    q64, x64 = q.astype(np.float64), x.astype(np.float64)
    return ((q64[:, None, :] - x64[None, :, :]) ** 2).sum(-1)


def knn_search(query_embeddings, index_embeddings, k: int = 5, batch_size: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """Exact Euclidean k-NN with deterministic tie-breaking (lower index position first).

    Returns (distances [Q, k] float64 Euclidean, indices [Q, k] int64). If the index has fewer than k items,
    k is reduced to its size.
    """
    import faiss

    q = _as_matrix(query_embeddings, "query_embeddings")
    x = _as_matrix(index_embeddings, "index_embeddings")
    if q.shape[1] != x.shape[1]:
        raise ValueError(f"query dim {q.shape[1]} != index dim {x.shape[1]}")
    if len(x) == 0:
        raise ValueError("index_embeddings is empty")
    k = min(k, len(x))
    window = min(len(x), k + _EXTRA_CANDIDATES)
    index = faiss.IndexFlatL2(x.shape[1])
    index.add(np.ascontiguousarray(x, dtype=np.float32))
    out_d = np.empty((len(q), k), dtype=np.float64)
    out_i = np.empty((len(q), k), dtype=np.int64)
    for start in range(0, len(q), batch_size):
        qb = q[start:start + batch_size]
        approx_d, cand = index.search(np.ascontiguousarray(qb, dtype=np.float32), window)
        for row in range(len(qb)):
            ids = cand[row]
            ids = ids[ids >= 0]
            d = _exact_sq_dists(qb[row:row + 1], x[ids])[0]
            order = np.lexsort((ids, d))  # by distance, then by index position
            ids, d = ids[order], d[order]
            # If everything in the window is within float32 noise of the k-th distance, items outside the window
            # could tie with it: rank this query against the whole index instead.
            if window < len(x) and approx_d[row, -1] <= approx_d[row, k - 1] * (1 + 1e-5) + 1e-12:
                d_all = _exact_sq_dists(qb[row:row + 1], x)[0] if len(x) <= 50_000 else \
                    _blocked_sq_dists(qb[row], x)
                ids = np.lexsort((np.arange(len(x)), d_all))[:k]
                d = d_all[ids]
            out_d[start + row], out_i[start + row] = np.sqrt(d[:k]), ids[:k]
    return out_d, out_i


def _blocked_sq_dists(qrow: np.ndarray, x: np.ndarray, block: int = 50_000) -> np.ndarray:
    return np.concatenate([_exact_sq_dists(qrow[None], x[s:s + block])[0] for s in range(0, len(x), block)])


@dataclass
class RetrievalResult:
    """Per-query outcome of mP@k: score, n_q, neighbour indices and their relevance."""

    score: float
    per_query: np.ndarray      # [Q] precision of each (kept) query
    n_relevant: np.ndarray     # [Q] n_q
    neighbors: np.ndarray      # [Q, k] index positions, nearest first
    distances: np.ndarray      # [Q, k] Euclidean distances
    relevant: np.ndarray       # [Q, k] bool
    kept: np.ndarray           # [Q_all] bool: queries scored (False where n_q = 0 and excluded)


def precision_at_k(query_embeddings, query_labels, index_embeddings, index_labels, k: int = 5,
                   missing: str = "error") -> RetrievalResult:
    """GUIE precision@k for each query plus the neighbours behind it (see `mean_precision_at_k`)."""
    q_labels = np.asarray(query_labels).reshape(-1)
    x_labels = np.asarray(index_labels).reshape(-1)
    q = _as_matrix(query_embeddings, "query_embeddings")
    x = _as_matrix(index_embeddings, "index_embeddings")
    if len(q_labels) != len(q):
        raise ValueError(f"{len(q)} query embeddings but {len(q_labels)} query labels")
    if len(x_labels) != len(x):
        raise ValueError(f"{len(x)} index embeddings but {len(x_labels)} index labels")
    if len(q) == 0:
        raise ValueError("no queries")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    uniq, inverse = np.unique(x_labels, return_inverse=True)
    counts = np.bincount(inverse, minlength=len(uniq))
    pos = np.searchsorted(uniq, q_labels)
    pos_clipped = np.minimum(pos, len(uniq) - 1)
    found = (pos < len(uniq)) & (uniq[pos_clipped] == q_labels)
    n_q = np.where(found, counts[pos_clipped], 0)
    kept = n_q > 0
    if not kept.all():
        n_missing = int((~kept).sum())
        example = q_labels[~kept][0]
        if missing == "error":
            raise ValueError(f"{n_missing} queries have no relevant index item (n_q = 0), e.g. label {example!r}; "
                             "the GUIE metric requires n_q > 0 (pass missing='exclude' to drop them)")
        if missing != "exclude":
            raise ValueError(f"missing must be 'error' or 'exclude', got {missing!r}")
    q, q_labels, n_q = q[kept], q_labels[kept], n_q[kept]
    if len(q) == 0:
        raise ValueError("no query has a relevant index item")
    dist, nbrs = knn_search(q, x, k=k)
    rel = x_labels[nbrs] == q_labels[:, None]
    cutoff = np.minimum(n_q, k)
    ranks = np.arange(nbrs.shape[1])[None, :]
    per_query = (rel & (ranks < cutoff[:, None])).sum(1) / cutoff
    return RetrievalResult(float(per_query.mean()), per_query, n_q, nbrs, dist, rel, kept)


def mean_precision_at_k(query_embeddings, query_labels, index_embeddings, index_labels, k: int = 5,
                        missing: str = "error") -> float:
    """The GUIE leaderboard metric, mP@k (k=5 on Kaggle).

    Args:
        query_embeddings: [Q, d] array-like (NumPy array or nested lists).
        query_labels: [Q] labels (any hashable scalars; compared by equality).
        index_embeddings: [N, d] array-like.
        index_labels: [N] labels.
        k: neighbours retrieved per query.
        missing: what to do with queries whose label has no index item (n_q = 0): 'error' (the competition
            guarantees n_q > 0) or 'exclude' (drop them from the mean).
    Returns:
        mean over queries of (relevant among the first min(n_q, k) neighbours) / min(n_q, k).
    """
    return precision_at_k(query_embeddings, query_labels, index_embeddings, index_labels, k, missing).score
