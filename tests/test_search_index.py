"""The named index without a model: store, commit protocol, crash recovery, backends (faiss and Milvus Lite)."""
import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from guie.search.image_index import ImageIndex, NewItem, SearchIndexError
from guie.search.store import parse_where

MODEL = {"ref": "test-model", "fingerprint": "f00d", "preprocess": {"image_size": 32}}


def items_for(n, start=0):
    """n items with distinct content hashes, labels 0..4 and a vendor column."""
    return [NewItem(f"hash{i}", f"v{i % 2}/img{i}.png", str(i % 5), {"vendor": ["a", "b"][i % 2], "n": i})
            for i in range(start, start + n)]


def vectors(n, dim=16, seed=0):
    return np.random.default_rng(seed).normal(size=(n, dim)).astype(np.float32)


def brute_force(x, ids, q, k):
    d = np.linalg.norm(x[None] - q[:, None], axis=-1)
    return ids[np.argsort(d, axis=1, kind="stable")[:, :k]]


def test_ids_are_stable_duplicates_are_no_ops_and_filters_work(tmp_path):
    x = vectors(60)
    with ImageIndex.create(tmp_path / "idx", dim=16, model=MODEL) as index:
        first = index.add(x[:40], items_for(40))
        assert first.seq == 1 and first.added == 40 and first.ids.tolist() == list(range(40))
        again = index.add(x[30:60], items_for(30, start=30))  # 10 already indexed (same content hash)
        assert again.ids[:10].tolist() == [-1] * 10 and again.ids[10:].tolist() == list(range(40, 60))
        seq, removed = index.remove_where(["vendor=a"])
        assert seq == 3 and sorted(removed.tolist()) == list(range(0, 60, 2))
        new = index.add(x[:1] + 100, [NewItem("fresh", "x.png", "9", {})])
        assert new.ids.tolist() == [60]  # ids are never reused
        hits = index.search(x[[3, 5]], k=3, where={"label": ["3", "0"]})
        for row in hits:
            assert all(h.item["label"] in ("3", "0") and h.item["vendor"] == "b" for h in row)
        assert hits[0][0].id == 3 and hits[0][0].distance == pytest.approx(0, abs=1e-5)
        assert index.search(x[:1], 5, where=["vendor=a"]) == [[]]
        stats = index.stats()
        assert stats["items"] == 31 and stats["seq"] == 4 and stats["columns"] == ["path", "label", "n", "vendor"]
        with pytest.raises(SearchIndexError, match="query dim 8"):
            index.search(np.zeros((1, 8)))
        with pytest.raises(SearchIndexError, match="shape"):
            index.add(np.zeros((1, 8)), [NewItem("z", None, None, {})])
        with pytest.raises(SearchIndexError, match="fingerprint"):
            index.check_model("another")
    with pytest.raises(SearchIndexError, match="already exists"):
        ImageIndex.create(tmp_path / "idx", dim=16, model=MODEL)
    with pytest.raises(SearchIndexError, match="not a guie index"):
        ImageIndex.open(tmp_path / "nothing")
    with pytest.raises(ValueError, match="column=value"):
        parse_where(["vendor"])


@pytest.mark.parametrize("kind", ["flat", "hnsw", "ivfpq"])
def test_faiss_kinds_survive_reopen_and_removals(tmp_path, kind, monkeypatch):
    from guie.search.backends import faiss_backend

    monkeypatch.setattr(faiss_backend, "IVFPQ_MIN_TRAIN", 1000)  # train the IVF-PQ layout on a small index
    x = vectors(1500, dim=32, seed=1)
    ids = np.arange(1500)
    with ImageIndex.create(tmp_path / kind, dim=32, model=MODEL, kind=kind) as index:
        index.add(x, items_for(1500))
        index.remove(range(0, 100))  # hnsw: 100 tombstones (under the rebuild fraction); others delete
        desc = index.stats()["backend"]
        assert desc["factory"] == {"flat": "Flat", "hnsw": "HNSW32", "ivfpq": "IVF38,PQ8"}[kind]
        assert desc["tombstones"] == (100 if kind == "hnsw" else 0)
    with ImageIndex.open(tmp_path / kind) as index:
        q = x[100:150] + np.random.default_rng(2).normal(scale=0.3, size=(50, 32)).astype(np.float32)
        got = np.array([[h.id for h in row] for row in index.search(q, 5)])
        want = brute_force(x[100:], ids[100:], q, 5)
        recall = np.mean([len(set(g) & set(w)) / 5 for g, w in zip(got, want)])
        assert (got >= 100).all()  # removed items never come back
        assert recall >= (1.0 if kind == "flat" else 0.9)


def test_faiss_and_milvus_lite_return_identical_top5_on_the_same_vectors(tmp_path):
    x = vectors(2000, dim=64, seed=3)
    q = vectors(20, dim=64, seed=4)
    results = {}
    for backend in ("faiss", "milvus"):
        with ImageIndex.create(tmp_path / backend, dim=64, model=MODEL, backend=backend) as index:
            index.add(x, items_for(2000))
            index.remove([5, 6, 7])
            top = index.search(q, 5)
            filtered = index.search(q, 5, where=["vendor=b", "label=1,2"])
            results[backend] = ([[h.id for h in r] for r in top], [[round(h.distance, 4) for h in r] for r in top],
                                [[h.id for h in r] for r in filtered])
    assert results["faiss"] == results["milvus"]
    assert results["faiss"][0] == brute_force(np.delete(x, [5, 6, 7], 0), np.delete(np.arange(2000), [5, 6, 7]),
                                              q, 5).tolist()
    with ImageIndex.open(tmp_path / "milvus") as index:  # the Milvus Lite file reopens with its contents
        assert len(index) == 1997 and index.stats()["backend"]["vectors"] == 1997


CRASH = textwrap.dedent("""
    import os, signal, sys
    import numpy as np
    from guie.search.image_index import ImageIndex, NewItem
    from guie.search.backends.faiss_backend import FaissBackend
    from guie.search.store import MetadataStore
    folder, where, op = sys.argv[1:4]
    die = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)
    if where == "before-commit":
        MetadataStore.commit_add = MetadataStore.commit_remove = die
    else:
        FaissBackend.persist = die
    index = ImageIndex.open(folder)
    x = np.random.default_rng(9).normal(size=(50, 16)).astype(np.float32)
    if op == "add":
        index.add(x, [NewItem(f"new{i}", f"n{i}.png", "new", {}) for i in range(50)])
    else:
        index.remove(range(0, 40))
    print("not killed")
""")


@pytest.mark.parametrize("where", ["before-commit", "after-commit"])
@pytest.mark.parametrize("op", ["add", "remove"])
def test_kill_9_during_a_write_leaves_a_complete_commit(tmp_path, where, op):
    """A real SIGKILL inside `add`/`remove`: before the store commits -> the previous commit; after it but before
    the backend's snapshot -> the new commit, recovered from the store on the next open."""
    x = vectors(100)
    with ImageIndex.create(tmp_path / "idx", dim=16, model=MODEL) as index:
        index.add(x, items_for(100))
    script = tmp_path / "crash.py"
    script.write_text(CRASH)
    r = subprocess.run([sys.executable, str(script), str(tmp_path / "idx"), where, op], capture_output=True,
                       text=True, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert r.returncode == -signal.SIGKILL, r.stdout + r.stderr[-2000:]
    committed = where == "after-commit"
    expected = {("add", False): 100, ("add", True): 150, ("remove", False): 100, ("remove", True): 60}[op, committed]
    with ImageIndex.open(tmp_path / "idx") as index:
        assert len(index) == expected and index.seq == (2 if committed else 1)
        assert index.stats()["backend"]["vectors"] == expected  # the backend holds exactly the store's items
        hits = index.search(x[:1], 1)[0]
        nearest_removed = op == "remove" and committed
        assert (hits[0].id == 0) != nearest_removed
    with ImageIndex.open(tmp_path / "idx") as index:  # the recovery was persisted: a second open has nothing to do
        assert index.backend.synced_seq() == index.seq


def test_a_reader_picks_up_another_writers_commits(tmp_path):
    x = vectors(30)
    writer = ImageIndex.create(tmp_path / "idx", dim=16, model=MODEL)
    writer.add(x[:10], items_for(10))
    reader = ImageIndex.open(tmp_path / "idx", write=False)
    assert not reader.refresh()
    writer.add(x[10:], items_for(20, start=10))
    writer.remove([0])
    assert reader.refresh() and len(reader) == 29
    assert reader.search(x[15:16], 1)[0][0].id == 15 and reader.search(x[:1], 1)[0][0].id != 0
    writer.close()
    reader.close()
