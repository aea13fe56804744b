"""Samplers: P x K structure, class/domain balance, DDP slices whose union is the single-process sequence, set_epoch
determinism, exact resume (also across world sizes), lengths, DataLoader use, and clear errors."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from guie.pipeline.samplers import ClassBalancedSampler, ShuffleSampler


def labels_of(counts) -> np.ndarray:
    """Item labels 'c0', 'c0', ..., 'c1', ... interleaved by a fixed shuffle (labels need not be sorted)."""
    lab = np.concatenate([[f"c{i}"] * n for i, n in enumerate(counts)])
    return lab[np.random.default_rng(123).permutation(len(lab))]


COUNTS = [1, 2, 3, 5, 8, 13, 21, 34, 7, 9, 4, 6]  # 113 items, 12 classes, some smaller than m


def make(kind: str, **kw):
    if kind == "balanced":
        args = dict(labels=labels_of(COUNTS), batch_size=12, m_per_class=3)
    else:
        args = dict(num_items=113, batch_size=12)
    args.update(kw)
    return ClassBalancedSampler(**args) if kind == "balanced" else ShuffleSampler(**args)


def epoch_list(s, epoch: int) -> list[int]:
    s.set_epoch(epoch)
    return list(s)


def test_pk_batches_have_m_images_of_distinct_classes():
    lab = labels_of(COUNTS)
    # 5 classes per batch out of 12: batches straddle the passes over the classes, yet never repeat a class
    assert len(ClassBalancedSampler(lab, batch_size=15, m_per_class=3)) == 120  # ceil(113 / 15) batches of 15
    s = ClassBalancedSampler(lab, batch_size=15, m_per_class=3, num_samples=1500, seed=1)  # ~40 pass boundaries
    idx = np.array(list(s))
    for batch in idx.reshape(-1, 15):
        groups = lab[batch].reshape(5, 3)
        assert (groups == groups[:, :1]).all()            # 3 consecutive items of one class
        assert len(set(groups[:, 0])) == 5                 # 5 different classes
        for g, items in zip(groups[:, 0], batch.reshape(5, 3)):
            n = COUNTS[int(g[1:])]
            assert len(set(items.tolist())) == min(3, n)   # distinct images unless the class is smaller than m


def test_classes_are_drawn_evenly_and_images_cycle():
    lab = labels_of(COUNTS)
    s = ClassBalancedSampler(lab, batch_size=12, m_per_class=3, num_samples=12 * 30, seed=2)
    idx = np.array(list(s))
    picks = np.unique(lab[idx[::3]], return_counts=True)[1]
    assert len(picks) == 12 and picks.max() - picks.min() <= 1  # 120 class slots over 12 classes: 10 each
    # class c7 (34 images) drawn 10 times x 3 = 30 images: all different (a shuffled cycle, not random choice)
    c = lab[idx] == "c7"
    assert len(idx[c]) == 30 and len(set(idx[c].tolist())) == 30


def test_more_slots_than_classes_repeats_classes_evenly():
    lab = labels_of([4, 4, 4])
    s = ClassBalancedSampler(lab, batch_size=14, m_per_class=2, seed=0)  # 7 slots, 3 classes
    for batch in np.array(list(s)).reshape(-1, 14):
        per_class = np.unique(lab[batch], return_counts=True)[1]
        assert sorted(per_class.tolist()) == [4, 4, 6]  # each class twice, one of them a third time
        for c in set(lab[batch]):  # a class drawn twice in one batch brings 4 different images (all it has)
            assert len(set(batch[lab[batch] == c].tolist())) == 4


def test_domain_balance():
    # domain "big": 40 classes; domain "small": 2 classes. Balancing by class gives "small" ~2/42 of the slots,
    # balancing by domain ~1/2.
    counts = [5] * 42
    lab = labels_of(counts)
    dom = np.where(np.isin(lab, ["c0", "c1"]), "small", "big")
    by_class = ClassBalancedSampler(lab, batch_size=16, m_per_class=2, num_samples=16 * 200, seed=3)
    by_domain = ClassBalancedSampler(lab, batch_size=16, m_per_class=2, domains=dom, num_samples=16 * 200, seed=3)
    assert by_domain.num_domains == 2 and by_class.num_domains == 1
    frac_class = (dom[np.array(list(by_class))] == "small").mean()
    frac_domain = (dom[np.array(list(by_domain))] == "small").mean()
    assert frac_class < 0.08
    assert 0.45 < frac_domain < 0.55
    # groups stay whole and a domain's 2 classes are not doubled inside a batch when avoidable
    idx = np.array(list(by_domain)).reshape(-1, 8, 2)
    assert (lab[idx][..., 0] == lab[idx][..., 1]).all()
    # weighted: "small" gets 1/(3+1) of the class slots; weights need domains and name known domains only
    weighted = ClassBalancedSampler(lab, batch_size=16, m_per_class=2, domains=dom, domain_weights={"big": 3},
                                    num_samples=16 * 200, seed=3)
    assert 0.2 < (dom[np.array(list(weighted))] == "small").mean() < 0.3
    with pytest.raises(ValueError, match=r"unknown domain\(s\) \['tiny'\]; the data has \['big', 'small'\]"):
        ClassBalancedSampler(lab, batch_size=16, domains=dom, domain_weights={"tiny": 2})
    with pytest.raises(ValueError, match="need domains"):
        ClassBalancedSampler(lab, batch_size=16, domain_weights={"big": 2})
    with pytest.raises(ValueError, match="finite, >= 0"):
        ClassBalancedSampler(lab, batch_size=16, domains=dom, domain_weights={"big": -1})


@pytest.mark.parametrize("kind", ["balanced", "shuffle"])
@pytest.mark.parametrize("epoch", [0, 3])
def test_ddp_union_of_ranks_is_the_single_process_sequence(kind, epoch):
    single = np.array(epoch_list(make(kind, seed=5), epoch)).reshape(-1, 12)
    ranks = [np.array(epoch_list(make(kind, seed=5, num_replicas=2, rank=r), epoch)).reshape(-1, 6) for r in (0, 1)]
    assert all(len(make(kind, num_replicas=2, rank=r)) == 60 for r in (0, 1))
    # each rank gets a disjoint half of every global batch; together, exactly the single-process batch
    np.testing.assert_array_equal(np.concatenate(ranks, axis=1), single)
    if kind == "shuffle":  # one pass over 113 items + 7 top-up: ranks share no item within the first pass
        first_pass = single.reshape(-1)[:113]
        assert sorted(first_pass.tolist()) == list(range(113))


@pytest.mark.parametrize("kind", ["balanced", "shuffle"])
def test_set_epoch_reshuffles_deterministically(kind):
    a, b = make(kind, seed=7), make(kind, seed=7)
    e0, e1 = epoch_list(a, 0), epoch_list(a, 1)
    assert e0 != e1
    assert epoch_list(b, 1) == e1 and epoch_list(b, 0) == e0
    assert epoch_list(a, 1) == e1  # iterating twice gives the same epoch
    assert epoch_list(make(kind, seed=8), 0) != e0


@pytest.mark.parametrize("kind", ["balanced", "shuffle"])
def test_exact_resume_mid_epoch(kind):
    full = make(kind, seed=9)
    uninterrupted = [epoch_list(full, e) for e in range(3)]

    s = make(kind, seed=9)
    epoch_list(s, 0)
    s.set_epoch(1)
    it = iter(s)
    consumed = [next(it) for _ in range(4 * 12 + 5)]  # 4 whole batches + part of the 5th
    state = s.state_dict()
    assert state == {"epoch": 1, "batches_done": 4}
    assert consumed[:48] == uninterrupted[1][:48]

    r = make(kind, seed=9)
    r.load_state_dict(state)
    r.set_epoch(1)  # the usual loop calls set_epoch(epoch) first: the loaded position is kept
    assert len(r) == len(full)
    assert list(r) == uninterrupted[1][48:]
    assert epoch_list(r, 2) == uninterrupted[2]


def test_resume_across_world_sizes_and_explicit_batches_done():
    single = make("balanced", seed=4)
    epoch_list(single, 2)
    whole = np.array(single.global_batches(2))
    state = single.state_dict(batches_done=3)  # e.g. what a prefetching DataLoader's loop really consumed
    assert state == {"epoch": 2, "batches_done": 3}
    parts = []
    for r in range(3):
        s = make("balanced", seed=4, num_replicas=3, rank=r)
        s.load_state_dict(state)
        parts.append(np.array(list(s)).reshape(-1, 4))
    np.testing.assert_array_equal(np.concatenate(parts, axis=1), whole[3:])


def test_set_epoch_to_another_epoch_drops_a_loaded_position():
    s = make("shuffle", seed=1)
    s.load_state_dict({"epoch": 0, "batches_done": 5})
    s.set_epoch(1)
    assert list(s) == epoch_list(make("shuffle", seed=1), 1)


def test_num_samples_sets_epoch_length():
    s = make("balanced", num_samples=30)
    assert s.batches_per_epoch == 3 and len(s) == 36 == len(list(s))
    s = make("shuffle", num_samples=250, num_replicas=2, rank=1)
    assert len(s) == 21 * 6 == len(list(s))


def test_works_as_a_dataloader_sampler():
    s = make("balanced", seed=2, num_replicas=2, rank=1)
    s.set_epoch(1)
    expected = s.local_indices().reshape(-1, 6)
    ds = torch.arange(113)
    batches = [b.numpy() for b in DataLoader(ds, batch_size=s.local_batch, sampler=s, drop_last=True)]
    np.testing.assert_array_equal(np.stack(batches), expected)


def test_defaults_from_torch_distributed(monkeypatch):
    monkeypatch.setattr(torch.distributed, "is_available", lambda: True)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda: 4)
    monkeypatch.setattr(torch.distributed, "get_rank", lambda: 3)
    s = make("shuffle")
    assert (s.num_replicas, s.rank, s.local_batch) == (4, 3, 3)


def test_errors_are_clear():
    with pytest.raises(ValueError, match="not a multiple of m_per_class"):
        ClassBalancedSampler(labels_of([4, 4]), batch_size=10, m_per_class=4)
    with pytest.raises(ValueError, match="not divisible by 5 processes"):
        ShuffleSampler(10, batch_size=12, num_replicas=5, rank=0)
    with pytest.raises(ValueError, match=r"rank must be in \[0, 2\)"):
        ShuffleSampler(10, batch_size=12, num_replicas=2, rank=2)
    with pytest.raises(ValueError, match="non-empty"):
        ClassBalancedSampler([], batch_size=4)
    with pytest.raises(ValueError, match="empty"):
        ShuffleSampler(0, batch_size=4)
    with pytest.raises(ValueError, match="one value per item"):
        ClassBalancedSampler(labels_of([2, 2]), batch_size=4, domains=["a"])
    with pytest.raises(ValueError, match="batch size or dataset changed"):
        make("shuffle").load_state_dict({"epoch": 0, "batches_done": 99})
    with pytest.raises(ValueError, match="lacks"):
        make("shuffle").load_state_dict({"epoch": 0})
