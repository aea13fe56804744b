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
