"""The GUIE metric against cases worked by hand (n_q < 5, n_q >= 5, ties, duplicates, single query) and FAISS
k-NN against brute force. mP@5 = 1/Q sum_q 1/min(n_q,5) sum_{j<=min(n_q,5)} rel_q(j)."""
import numpy as np
import pytest

from guie.metrics import knn_search, mean_precision_at_k, precision_at_k


def line(*xs):
    """Points on a line: distances from the query at 0 are just the coordinates."""
    return np.array([[x, 0.0] for x in xs], dtype=np.float32)


Q0 = np.zeros((1, 2), dtype=np.float32)


def test_nq_below_five_counts_only_first_nq_neighbours():
    # n_q = 2; ranking: A(1) B(2) A(3) B(4) B(5). Only ranks 1..2 count: [A, B] -> 1/2, although A is also at rank 3.
    index = line(1, 2, 3, 4, 5)
    labels = ["A", "B", "A", "B", "B"]
    assert mean_precision_at_k(Q0, ["A"], index, labels) == pytest.approx(0.5)
    # same index, relevant items at ranks 3 and 4 only -> 0 (not 2/5)
    assert mean_precision_at_k(Q0, ["A"], index, ["B", "B", "A", "A", "B"]) == 0.0


def test_nq_of_one_is_precision_at_one():
    index = line(1, 2, 3)
    assert mean_precision_at_k(Q0, ["A"], index, ["A", "B", "B"]) == 1.0
    assert mean_precision_at_k(Q0, ["A"], index, ["B", "A", "B"]) == 0.0


def test_nq_at_least_five_divides_by_five():
    # n_q = 7; top-5 = A B A A B -> 3/5
    index = line(1, 2, 3, 4, 5, 6, 7, 8, 9, 10)
    labels = ["A", "B", "A", "A", "B", "A", "A", "A", "B", "A"]
    assert mean_precision_at_k(Q0, ["A"], index, labels) == pytest.approx(3 / 5)


def test_nq_three_like_the_emoji_folds():
    # n_q = 3; top-3 = A, B, A -> 2/3; A at rank 4 does not count
    index = line(1, 2, 3, 4, 5)
    assert mean_precision_at_k(Q0, ["A"], index, ["A", "B", "A", "A", "C"]) == pytest.approx(2 / 3)


def test_perfect_and_zero_retrieval():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(4, 8)) * 100
    index = np.repeat(centres, 5, axis=0) + rng.normal(size=(20, 8)) * 0.01
    labels = np.repeat(np.arange(4), 5)
    queries = centres + rng.normal(size=(4, 8)) * 0.01
    assert mean_precision_at_k(queries, np.arange(4), index, labels) == 1.0
    assert mean_precision_at_k(queries, (np.arange(4) + 1) % 4, index, labels) == 0.0


def test_mean_over_queries_worked_by_hand():
    index = line(1, 2, 3, 4, 5, 6)
    labels = ["A", "A", "B", "C", "C", "C"]
    queries = np.array([[0, 0], [0, 0], [7, 0]], dtype=np.float32)
    # q1 label A, n_q=2: top-2 = A A -> 1
    # q2 label C, n_q=3: top-3 = A A B -> 0
    # q3 at 7 label C, n_q=3: neighbours 6(C) 5(C) 4(C) -> 1
    assert mean_precision_at_k(queries, ["A", "C", "C"], index, labels) == pytest.approx(2 / 3)


def test_ties_are_broken_by_index_position():
    # Two index items at the same distance (1.0) on opposite sides: the lower index position ranks first.
    index = np.array([[-1.0, 0.0], [1.0, 0.0], [5.0, 0.0]], dtype=np.float32)
    assert mean_precision_at_k(Q0, ["A"], index, ["B", "A", "C"]) == 0.0  # n_q=1: rank 1 is position 0 (B)
    assert mean_precision_at_k(Q0, ["A"], index, ["A", "B", "C"]) == 1.0
    _, nbrs = knn_search(Q0, index, k=3)
    assert nbrs.tolist() == [[0, 1, 2]]


def test_duplicate_vectors_rank_in_index_order_even_beyond_faiss_window():
    # 40 identical index vectors (more than the re-ranking window): the first 5 positions must come back in order.
    index = np.ones((40, 4), dtype=np.float32)
    labels = ["B"] * 39 + ["A"]
    _, nbrs = knn_search(np.ones((1, 4)), index, k=5)
    assert nbrs.tolist() == [[0, 1, 2, 3, 4]]
    assert mean_precision_at_k(np.ones((1, 4)), ["A"], index, labels) == 0.0
    labels = ["A"] + ["B"] * 39
    assert mean_precision_at_k(np.ones((1, 4)), ["A"], index, labels) == 1.0


def test_single_query_and_plain_lists():
    assert mean_precision_at_k([[0.0, 0.0]], [3], [[1.0, 0.0], [2.0, 0.0]], [3, 4]) == 1.0


def test_euclidean_on_raw_vectors_not_cosine():
    # By cosine, [10, 0] equals the query direction; by Euclidean distance [0.9, 0.1] is much closer.
    q = np.array([[1.0, 0.0]])
    index = np.array([[10.0, 0.0], [0.9, 0.1]])
    assert mean_precision_at_k(q, ["A"], index, ["B", "A"]) == 1.0


def test_queries_without_relevant_index_items():
    index = line(1, 2)
    with pytest.raises(ValueError, match="n_q = 0"):
        mean_precision_at_k(np.zeros((2, 2)), ["A", "Z"], index, ["A", "B"])
    res = precision_at_k(np.zeros((2, 2)), ["A", "Z"], index, ["A", "B"], missing="exclude")
    assert res.score == 1.0 and res.kept.tolist() == [True, False]


def test_fewer_index_items_than_k():
    assert mean_precision_at_k(Q0, ["A"], line(1, 2), ["B", "A"]) == 0.0  # n_q=1, rank 1 is B


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="dim"):
        mean_precision_at_k(np.zeros((1, 3)), ["A"], np.zeros((2, 2)), ["A", "B"])
    with pytest.raises(ValueError, match="labels"):
        mean_precision_at_k(np.zeros((2, 2)), ["A"], np.zeros((2, 2)), ["A", "B"])
    with pytest.raises(ValueError, match="NaN"):
        mean_precision_at_k(np.full((1, 2), np.nan), ["A"], np.zeros((2, 2)), ["A", "B"])


X3, L3 = np.eye(3, dtype=np.float32), ["A", "B", "C"]


@pytest.mark.parametrize("args, kwargs, message", [
    (([], [], [], []), {}, r"^query_embeddings is empty$"),  # was '1 query embeddings but 0 query labels'
    ((X3, L3, np.zeros((0, 3)), []), {}, r"^index_embeddings is empty$"),  # was an IndexError
    ((X3, L3, X3, L3), {"k": 2.5}, r"^k must be a whole number >= 1, got 2\.5$"),  # was a TypeError
    ((X3, L3, X3, L3), {"k": True}, r"^k must be a whole number >= 1, got True$"),
    ((X3, ["A", None, "C"], X3, L3), {}, r"^query_labels\[1\] is None: every query item needs a label"),
    ((X3, L3, X3, ["A", float("nan"), "C"]), {}, r"^index_labels\[1\] is nan: every index item needs a label"),
    ((X3, np.array(["A", 1, "C"], dtype=object), X3, np.array([1, "B", "C"], dtype=object)), {},
     r"^labels of different types cannot be matched"),  # was numpy's comparison error
    ((X3 * 1j, L3, X3, L3), {}, r"^query_embeddings must hold real numbers, got dtype complex"),  # was accepted
    ((X3, L3, X3 > 0, L3), {}, r"^index_embeddings must hold real numbers, got dtype bool$"),
    ((np.zeros((3, 0)), L3, np.zeros((3, 0)), L3), {}, r"^query_embeddings has vectors of 0 dimensions"),
    (([[1.0, 2.0], [3.0]], L3[:2], X3, L3), {}, r"^query_embeddings is not a rectangular array"),
    ((X3, L3, X3, L3), {"missing": "drop"}, r"^missing must be 'error' or 'exclude', got 'drop'$"),
])
def test_metric_input_errors_are_one_line_and_name_the_input(args, kwargs, message):
    with pytest.raises(ValueError, match=message) as info:
        mean_precision_at_k(*args, **kwargs)
    assert "\n" not in str(info.value)


def test_knn_search_checks_k():
    with pytest.raises(ValueError, match="k must be a whole number"):
        knn_search(X3, X3, k=0)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_faiss_knn_equals_brute_force(seed):
    rng = np.random.default_rng(seed)
    q = rng.normal(size=(200, 16)).astype(np.float32)
    x = rng.normal(size=(1000, 16)).astype(np.float32)
    x[500] = x[10]  # an exact duplicate pair
    dist, nbrs = knn_search(q, x, k=5)
    d2 = ((q[:, None, :].astype(np.float64) - x[None, :, :]) ** 2).sum(-1)
    brute = np.stack([np.lexsort((np.arange(len(x)), row))[:5] for row in d2])
    assert (nbrs == brute).all()
    np.testing.assert_allclose(dist, np.sqrt(np.take_along_axis(d2, brute, 1)), rtol=1e-6)


def test_metric_equals_naive_reference_on_random_clusters():
    rng = np.random.default_rng(3)
    n_cls = 30
    centres = rng.normal(size=(n_cls, 8))
    idx_lab = rng.integers(0, n_cls, 300)
    index = centres[idx_lab] + rng.normal(size=(300, 8)) * 0.8
    q_lab = rng.choice(np.unique(idx_lab), 100)
    queries = centres[q_lab] + rng.normal(size=(100, 8)) * 0.8
    expected = []
    for qv, ql in zip(queries, q_lab):
        d = ((index - qv) ** 2).sum(1)
        order = np.lexsort((np.arange(len(index)), d))
        n_q = int((idx_lab == ql).sum())
        m = min(n_q, 5)
        expected.append(sum(idx_lab[order[j]] == ql for j in range(m)) / m)
    assert mean_precision_at_k(queries, q_lab, index, idx_lab) == pytest.approx(np.mean(expected), abs=1e-12)


# --- the batched re-rank of FAISS's candidate window and its whole-index fallback, against the naive definition ---

def naive_knn(q, x, k):
    """Rank every index item by exact float64 squared distance, then index position."""
    d2 = ((np.asarray(q, np.float64)[:, None, :] - np.asarray(x, np.float64)[None, :, :]) ** 2).sum(-1)
    nbrs = np.stack([np.lexsort((np.arange(len(x)), row))[:k] for row in d2])
    return np.sqrt(np.take_along_axis(d2, nbrs, 1)), nbrs


def metric_module():
    """The module that implements knn_search (its window size and fallback are patched below)."""
    import sys

    return sys.modules[knn_search.__module__]


def spy_fallback(monkeypatch):
    """Record how many queries each call of the whole-index fallback receives."""
    mod, calls = metric_module(), []
    real = mod._exact_knn_whole_index
    monkeypatch.setattr(mod, "_exact_knn_whole_index", lambda q, *a: (calls.append(len(q)), real(q, *a))[1])
    return calls


@pytest.mark.parametrize("extra", [0, 1, 3])
def test_ties_at_the_window_edge_match_the_naive_ranking(monkeypatch, extra):
    # Small integer coordinates: many exactly tied distances, so the k-th neighbour's tie group often straddles the
    # edge of a (deliberately tiny) FAISS window and FAISS's own order among the ties is arbitrary.
    monkeypatch.setattr(metric_module(), "_EXTRA_CANDIDATES", extra)
    rng = np.random.default_rng(extra)
    x = rng.integers(-2, 3, size=(400, 3)).astype(np.float32)
    q = rng.integers(-2, 3, size=(60, 3)).astype(np.float32)
    for k in (1, 5, 7):
        dist, nbrs = knn_search(q, x, k=k, batch_size=16)
        ref_d, ref_i = naive_knn(q, x, k)
        assert (nbrs == ref_i).all()
        np.testing.assert_array_equal(dist, ref_d)


def test_duplicates_send_only_their_queries_to_the_whole_index(monkeypatch):
    rng = np.random.default_rng(7)
    x = rng.normal(size=(3000, 8)).astype(np.float32)
    dup_positions = rng.choice(3000, 40, replace=False)  # 40 copies (more than the window) spread over the index
    x[dup_positions] = x[dup_positions[0]]
    q = rng.normal(size=(50, 8)).astype(np.float32)
    q[[3, 17, 41]] = x[dup_positions[0]] + np.float32(1e-3)  # three queries whose top 5 lie among the copies
    calls = spy_fallback(monkeypatch)
    dist, nbrs = knn_search(q, x, k=5, batch_size=8)  # several FAISS batches, one fallback call for all
    ref_d, ref_i = naive_knn(q, x, 5)
    assert (nbrs == ref_i).all()
    np.testing.assert_allclose(dist, ref_d, rtol=1e-12)
    assert nbrs[3].tolist() == sorted(dup_positions)[:5]  # the copies in index order
    assert calls == [3]


@pytest.mark.parametrize("offset,spread", [(1000, 0.01), (100, 0.05)])
def test_large_norms_fall_back_to_the_exact_ranking(monkeypatch, offset, spread):
    # Points close together far from the origin: FAISS's float32 |q|^2 + |x|^2 - 2 q.x (its BLAS path, which it
    # picks by problem size; forced here) loses most or all of their differences, so its window cannot be trusted.
    # At (100, 0.05) the float32 distances still differ, only wrongly: a tie test on them (the previous rule) missed
    # this and got a fifth of the queries wrong; the error bound sends them to the whole-index ranking.
    import faiss

    monkeypatch.setattr(faiss.cvar, "distance_compute_blas_threshold", 1)
    rng = np.random.default_rng(11)
    x = (offset + rng.normal(scale=spread, size=(2000, 16))).astype(np.float32)
    q = (offset + rng.normal(scale=spread, size=(100, 16))).astype(np.float32)
    index = faiss.IndexFlatL2(16)
    index.add(x)
    ref_d, ref_i = naive_knn(q, x, 5)
    assert (index.search(q, 5)[1] != ref_i).any()  # the premise: FAISS alone gets these wrong
    calls = spy_fallback(monkeypatch)
    dist, nbrs = knn_search(q, x, k=5)
    assert (nbrs == ref_i).all()
    np.testing.assert_allclose(dist, ref_d, rtol=1e-9)
    assert calls == [100]


def test_clustered_vectors_need_no_fallback_and_match_naive(monkeypatch):
    rng = np.random.default_rng(5)
    centres = rng.normal(size=(40, 32))
    x = (centres[rng.integers(0, 40, 2000)] + rng.normal(scale=0.5, size=(2000, 32))).astype(np.float32)
    q = (centres[rng.integers(0, 40, 300)] + rng.normal(scale=0.5, size=(300, 32))).astype(np.float64)
    calls = spy_fallback(monkeypatch)
    dist, nbrs = knn_search(q, x, k=5)
    ref_d, ref_i = naive_knn(q, x, 5)
    assert (nbrs == ref_i).all()
    np.testing.assert_allclose(dist, ref_d, rtol=1e-12)
    assert calls == []  # the batched window re-rank proves every answer
