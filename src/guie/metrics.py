"""The GUIE competition metric, exactly: mean Precision@5 with the min(n_q, 5) normalisation.

    mP@5 = 1/Q * sum_q 1/min(n_q,5) * sum_{j <= min(n_q,5)} rel_q(j)

n_q = number of index items sharing the query's label; only the first min(n_q, 5) neighbours count. Neighbours
are found by exact Euclidean k-NN on the vectors as given (the host did not normalise them), with FAISS
`IndexFlatL2`. FAISS computes float32 distances as |q|^2 + |x|^2 - 2 q.x, whose rounding error grows with the
vectors' norms, and leaves the order of tied distances undefined (faiss #904). So FAISS only proposes a window of
candidates: they are re-ranked on exact float64 distances (from differences) by distance, then index position,
and a query falls back to an exact ranking over the whole index whenever an item outside its window could still
tie with or beat its k-th neighbour, judged with a proven bound on FAISS's float32 error (`_float_error_bound`).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import InputError

_EXTRA_CANDIDATES = 16  # window = k + this; larger windows rarely change the result and cost a slower FAISS heap
_RERANK_QUERIES = 2048  # queries per float64 re-rank chunk: [2048, 21, d] float64 is ~22 MB at d = 64
_FALLBACK_BYTES = 64 << 20  # memory for one block of float64 distances in the whole-index fallback


def _as_matrix(x, name: str) -> np.ndarray:
    """x as a 2-D real matrix [N, d] (one 1-D vector is one row); a one-line ValueError naming `name` otherwise."""
    try:
        a = np.asarray(x)
    except ValueError as e:  # ragged nested lists
        raise InputError(f"{name} is not a rectangular array ({e})") from None
    if a.ndim == 1:
        if a.size == 0:
            raise InputError(f"{name} is empty")
        a = a[None, :]
    if a.ndim != 2:
        raise InputError(f"{name} must be a 2-D array [N, d], got shape {a.shape}")
    if a.shape[0] == 0:
        raise InputError(f"{name} is empty")
    if a.dtype.kind not in "iuf":
        raise InputError(f"{name} must hold real numbers, got dtype {a.dtype}")
    if a.shape[1] == 0:
        raise InputError(f"{name} has vectors of 0 dimensions (shape {a.shape})")
    if not np.isfinite(a).all():
        raise InputError(f"{name} contains NaN or infinite values")
    return a


def _as_labels(x, name: str, n: int, what: str) -> np.ndarray:
    """x as a 1-D array of n labels, none missing; a one-line ValueError naming `name` otherwise."""
    import pandas as pd

    labels = np.asarray(x).reshape(-1)
    if len(labels) != n:
        raise InputError(f"{n} {what} embeddings but {len(labels)} {what} labels")
    as_given = np.asarray(x, dtype=object).reshape(-1)  # before NumPy turns a NaN among strings into 'nan'
    missing = np.flatnonzero(pd.isna(as_given))
    if len(missing):
        raise InputError(f"{name}[{missing[0]}] is {_plain(as_given[missing[0]])!r}: every {what} item needs a "
                         f"label ({len(missing)} missing)")
    return labels


def _plain(value):
    """A NumPy scalar as the Python value it holds (for messages: 'a', not np.str_('a'))."""
    return value.item() if isinstance(value, np.generic) else value


def _check_k(k) -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise InputError(f"k must be a whole number >= 1, got {k!r}")
    return int(k)


def _exact_sq_dists(q: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Squared Euclidean distances [nq, nx] in float64 from differences (no cancellation error)."""
    q64, x64 = q.astype(np.float64), x.astype(np.float64)
    return ((q64[:, None, :] - x64[None, :, :]) ** 2).sum(-1)


def _float_error_bound(dim: int, q_norms: np.ndarray, x_norm_max: float, unit_roundoff: float) -> np.ndarray:
    """An upper bound of |computed - exact| squared distance when |q|^2 + |x|^2 - 2 q.x is evaluated in floating
    point with the given unit roundoff, for every index item x (any summation order, FMA or not).

    Each of the three terms carries at most gamma_n = n u / (1 - n u) relative error (n = dim + 4 operations,
    Higham's bound for sums and dot products), and |q|^2 + |x|^2 + 2|q.x| <= (|q| + |x|)^2. The factor 2 covers
    the rounding of float64 inputs to float32 before FAISS sees them (2u (|q| + |x|)^2 at most) with room to spare.
    """
    n = dim + 4
    gamma = n * unit_roundoff / (1 - n * unit_roundoff)
    return 2.0 * gamma * (q_norms + x_norm_max) ** 2


def knn_search(query_embeddings, index_embeddings, k: int = 5,
               batch_size: int = 16384) -> tuple[np.ndarray, np.ndarray]:
    """Exact Euclidean k-NN with deterministic tie-breaking (lower index position first).

    FAISS proposes k + 16 candidates per query; one batched float64 computation re-ranks them, and only the
    queries whose window cannot prove the answer (exact ties or float32 noise reaching past it) are ranked against
    the whole index. `batch_size` queries go to FAISS at a time (FAISS blocks its work itself; the re-rank runs
    in chunks of 2,048). Returns (distances [Q, k] float64 Euclidean, indices [Q, k] int64). If the index has fewer
    than k items, k is reduced to its size.
    """
    import faiss

    k = _check_k(k)
    q = _as_matrix(query_embeddings, "query_embeddings")
    x = _as_matrix(index_embeddings, "index_embeddings")
    if q.shape[1] != x.shape[1]:
        raise InputError(f"query dim {q.shape[1]} != index dim {x.shape[1]}")
    if len(x) == 0:
        raise InputError("index_embeddings is empty")
    k = min(k, len(x))
    window = min(len(x), k + _EXTRA_CANDIDATES)
    x32 = np.ascontiguousarray(x, dtype=np.float32)
    index = faiss.IndexFlatL2(x.shape[1])
    index.add(x32)
    # largest |x| (float32 sums: their relative error, < 1e-5, is covered by the 1e-3 added here)
    x_norm_max = float(np.sqrt(float(np.einsum("ij,ij->i", x32, x32).max()) * 1.001)) if window < len(x) else 0.0
    out_d = np.empty((len(q), k), dtype=np.float64)
    out_i = np.empty((len(q), k), dtype=np.int64)
    fallback = []
    for start in range(0, len(q), batch_size):
        qb = q[start:start + batch_size]
        approx_d, cand = index.search(np.ascontiguousarray(qb, dtype=np.float32), window)
        for s in range(0, len(qb), _RERANK_QUERIES):
            chunk = slice(s, min(len(qb), s + _RERANK_QUERIES))
            rows = slice(start + chunk.start, start + chunk.stop)
            need = _rerank_window(qb[chunk], x, cand[chunk], approx_d[chunk], k, window < len(x), x_norm_max,
                                  out_d[rows], out_i[rows])
            fallback.append(rows.start + np.flatnonzero(need))
    fallback = np.concatenate(fallback) if fallback else np.empty(0, dtype=np.int64)
    if len(fallback):
        out_d[fallback], out_i[fallback] = _exact_knn_whole_index(q[fallback], x, k)
    return out_d, out_i


def _rerank_window(q, x, cand, approx_d, k, partial, x_norm_max, out_d, out_i) -> np.ndarray:
    """Write the exact top-k of each query's candidate window into out_d / out_i; return the mask of queries whose
    window does not prove the answer (some item outside it could rank within the top k)."""
    invalid = cand < 0  # FAISS pads with -1 when it finds fewer results than asked (not expected here)
    ids = np.where(invalid, 0, cand)
    d = ((q.astype(np.float64)[:, None, :] - x[ids].astype(np.float64)) ** 2).sum(-1)
    d[invalid] = np.inf
    order = np.lexsort((ids, d), axis=-1)  # by distance, then by index position
    ids, d = np.take_along_axis(ids, order, 1)[:, :k], np.take_along_axis(d, order, 1)[:, :k]
    out_d[:], out_i[:] = np.sqrt(d), ids
    need = invalid.any(1)
    if partial:
        # Every item outside the window has a FAISS distance >= the window's last one, hence an exact distance
        # >= that minus FAISS's error bound; unless this stays above the exact k-th distance, it might tie or win.
        q_norms = np.sqrt(np.einsum("ij,ij->i", q, q, dtype=np.float64))
        bound = _float_error_bound(q.shape[1], q_norms, x_norm_max, np.finfo(np.float32).eps / 2)
        need |= approx_d[:, -1].astype(np.float64) - bound <= d[:, k - 1]
    return need


def _exact_knn_whole_index(q: np.ndarray, x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k of each query over the whole index, ties by index position (the queries FAISS's window leaves
    undecided: exact duplicates, or vectors whose norms drown float32 distances).

    float64 matrix products (fast, in blocks of bounded memory) give distances within a proven bound of the exact
    ones; every item within twice that bound of the k-th is then re-ranked on exact distances from differences.
    """
    q64 = q.astype(np.float64)
    q_sq = np.einsum("ij,ij->i", q64, q64)
    x_sq = np.einsum("ij,ij->i", x, x, dtype=np.float64)
    bound = _float_error_bound(x.shape[1], np.sqrt(q_sq), float(np.sqrt(x_sq.max())), np.finfo(np.float64).eps / 2)
    out_d = np.empty((len(q), k), dtype=np.float64)
    out_i = np.empty((len(q), k), dtype=np.int64)
    rows_per_block = max(1, _FALLBACK_BYTES // (8 * len(x)))
    x_block = max(1, _FALLBACK_BYTES // (8 * x.shape[1]))
    for r0 in range(0, len(q), rows_per_block):
        r1 = min(len(q), r0 + rows_per_block)
        approx = np.empty((r1 - r0, len(x)), dtype=np.float64)
        for c0 in range(0, len(x), x_block):
            xb = x[c0:c0 + x_block].astype(np.float64)
            approx[:, c0:c0 + len(xb)] = q_sq[r0:r1, None] + x_sq[None, c0:c0 + len(xb)] - 2.0 * (q64[r0:r1] @ xb.T)
        for r in range(r0, r1):
            row = approx[r - r0]
            kth = np.partition(row, k - 1)[k - 1]
            # the true k-th distance is <= kth + bound, and anything that close has a computed distance <= kth + 2 bound
            ids = np.flatnonzero(row <= kth + 2.0 * bound[r])
            d = np.concatenate([_exact_sq_dists(q64[r:r + 1], x[ids[s:s + x_block]])[0]
                                for s in range(0, len(ids), x_block)])
            order = np.lexsort((ids, d))[:k]
            out_d[r], out_i[r] = np.sqrt(d[order]), ids[order]
    return out_d, out_i


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
    k = _check_k(k)
    if missing not in ("error", "exclude"):
        raise InputError(f"missing must be 'error' or 'exclude', got {missing!r}")
    q = _as_matrix(query_embeddings, "query_embeddings")
    x = _as_matrix(index_embeddings, "index_embeddings")
    if q.shape[1] != x.shape[1]:
        raise InputError(f"query dim {q.shape[1]} != index dim {x.shape[1]}")
    q_labels = _as_labels(query_labels, "query_labels", len(q), "query")
    x_labels = _as_labels(index_labels, "index_labels", len(x), "index")
    try:
        uniq, inverse = np.unique(x_labels, return_inverse=True)
        pos = np.searchsorted(uniq, q_labels)
    except TypeError as e:
        raise InputError(f"labels of different types cannot be matched ({e}); give query and index labels of one "
                         "type, e.g. all strings") from None
    counts = np.bincount(inverse, minlength=len(uniq))
    pos_clipped = np.minimum(pos, len(uniq) - 1)
    found = (pos < len(uniq)) & (uniq[pos_clipped] == q_labels)
    n_q = np.where(found, counts[pos_clipped], 0)
    kept = n_q > 0
    if not kept.all():
        n_missing = int((~kept).sum())
        example = _plain(q_labels[~kept][0])
        if missing == "error":
            raise InputError(f"{n_missing} queries have no relevant index item (n_q = 0), e.g. label {example!r}; "
                             "the GUIE metric requires n_q > 0 (pass missing='exclude' to drop them)")
    q, q_labels, n_q = q[kept], q_labels[kept], n_q[kept]
    if len(q) == 0:
        raise InputError("no query has a relevant index item")
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
