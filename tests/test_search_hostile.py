"""Hostile-input corpus of the named index: damaged and foreign files, two writers at once, kill -9 during a
snapshot write, a full disk, no-op writes, tombstones and filters that starve HNSW, and `where` conditions that must
mean the same on faiss and Milvus (issue 26, items 6-10, 12, 13). Each case names the damage and the outcome it must
have: a one-line error naming the file, or a repair from the store announced in one log line; never a traceback,
never a silently wrong answer."""
from __future__ import annotations

import hashlib
import logging
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from guie.cli import app
from guie.errors import GuieError
from guie.search.backends import BackendError
from guie.search.image_index import ImageIndex, NewItem

MODEL = {"ref": "test-model", "fingerprint": "f00d", "preprocess": {"image_size": 32}}
N, DIM = 300, 16
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}


def items_for(n, start=0):
    return [NewItem(f"hash{i}", f"v{i % 2}/img{i}.png", str(i % 5), {"vendor": "ab"[i % 2]})
            for i in range(start, start + n)]


def vectors(n, dim=DIM, seed=0):
    return np.random.default_rng(seed).normal(size=(n, dim)).astype(np.float32)


def build(folder: Path, kind="flat", backend="faiss", seed=0, removed=range(0, 300, 7), model=MODEL) -> np.ndarray:
    """An index of N items (some removed: HNSW keeps them as tombstones) -> the vectors it was built from."""
    x = vectors(N, seed=seed)
    with ImageIndex.create(folder, dim=DIM, model=model, kind=kind, backend=backend) as index:
        index.add(x, items_for(N))
        index.remove(list(removed))
    return x


def assert_every_item_finds_itself(folder: Path, x: np.ndarray) -> None:
    with ImageIndex.open(folder, write=False) as index:
        live = index.store.ids()
        assert index.stats()["backend"]["vectors"] - index.stats()["backend"].get("tombstones", 0) == len(live)
        top = [row[0].id for row in index.search(x[live], 1)]
        assert top == live.tolist()


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def one_line(text: str) -> str:
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, text
    return lines[0]


# -- damaged or foreign FAISS snapshots: rebuilt from the store, one log line (item 7) ---------------------------
def _overwrite_4k(folder, tmp):
    snap = next(folder.glob("faiss-*.index"))
    data = bytearray(snap.read_bytes())
    data[8192:12288] = np.random.default_rng(1).integers(0, 256, 4096, dtype=np.uint8).tobytes()
    snap.write_bytes(bytes(data))


def _truncate(folder, tmp):
    snap = next(folder.glob("faiss-*.index"))
    snap.write_bytes(snap.read_bytes()[: snap.stat().st_size // 2])


def _empty(folder, tmp):
    next(folder.glob("faiss-*.index")).write_bytes(b"")


def _foreign(with_check: bool):
    def damage(folder, tmp):
        other = tmp / "other"
        build(other, seed=5, removed=range(0, 300, 3))  # another index: other vectors, other ids
        snap = next(folder.glob("faiss-*.index"))
        for p in folder.glob("faiss-*"):
            p.unlink()
        shutil.copy(next(other.glob("faiss-*.index")), snap)
        if with_check:
            shutil.copy(next(other.glob("faiss-*.check.json")), snap.with_name(snap.stem + ".check.json"))
    return damage


def _check_garbage(folder, tmp):
    next(folder.glob("faiss-*.check.json")).write_text("{not json")


def _tombstones_damaged(folder, tmp):
    tomb = next(folder.glob("tombstones-*.npy"))
    tomb.write_bytes(tomb.read_bytes()[:-16] + b"\x00" * 16)


SNAPSHOT_DAMAGE = {
    "4 KB overwritten inside": ("flat", _overwrite_4k, "damaged"),
    "truncated to half": ("flat", _truncate, "damaged"),
    "emptied": ("flat", _empty, "damaged"),
    "another index's, with its check file": ("flat", _foreign(True), "another index"),
    "another index's, no check file": ("flat", _foreign(False), "live vectors for"),
    "check file unreadable": ("flat", _check_garbage, "check file"),
    "hnsw tombstones damaged": ("hnsw", _tombstones_damaged, "tombstones"),
}


@pytest.mark.parametrize("case", list(SNAPSHOT_DAMAGE))
def test_a_damaged_or_foreign_snapshot_is_rebuilt_from_the_store(tmp_path, case, caplog):
    kind, damage, reason = SNAPSHOT_DAMAGE[case]
    folder = tmp_path / "idx"
    x = build(folder, kind=kind)
    damage(folder, tmp_path)
    caplog.set_level(logging.INFO, logger="guie")
    assert_every_item_finds_itself(folder, x)
    said = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(said) == 1 and reason in said[0] and "rebuilt it from" in said[0] and "\n" not in said[0], said
    caplog.clear()
    assert_every_item_finds_itself(folder, x)  # the repair was persisted: the next open has nothing to say
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


# -- a damaged index.sqlite: named, refused, never rewritten (item 8) ----------------------------------------------
def _store_emptied(store):
    store.write_bytes(b"")


def _store_header(store):
    store.write_bytes(b"\x5a" * 16 + store.read_bytes()[16:])


def _store_pages(store):
    data = bytearray(store.read_bytes())
    data[4096:len(data) - 4096] = b"\x5a" * (len(data) - 8192)
    store.write_bytes(bytes(data))


@pytest.mark.parametrize("damage, says", [(_store_emptied, "empty file"), (_store_header, "not a SQLite file"),
                                          (_store_pages, "damaged SQLite file")])
def test_a_damaged_store_is_named_and_left_untouched(tmp_path, damage, says):
    folder = tmp_path / "idx"
    build(folder)
    store = folder / "index.sqlite"
    with ImageIndex.open(folder):  # checkpoint the WAL into the file, so the damage hits the data
        pass
    for extra in folder.glob("index.sqlite-*"):
        extra.unlink()
    damage(store)
    before = sha(store)
    r = CliRunner().invoke(app, ["index", "stats", str(folder)])
    assert r.exit_code == 2 and says in r.output and str(store) in r.output, r.output
    assert one_line(r.output).startswith("error: ")
    with pytest.raises(GuieError, match=says):
        ImageIndex.open(folder)
    assert sha(store) == before  # never rewritten (an emptied file stays empty)


# -- damaged Milvus Lite data: moved aside and rebuilt, or silently short: rebuilt (item 7) -----------------------
def _milvus_segment(folder):
    seg = next((folder / "milvus.db").rglob("data_*.parquet"))
    data = bytearray(seg.read_bytes())
    data[100:600] = b"\x00" * 500
    seg.write_bytes(bytes(data))


def _milvus_manifest(folder):
    next((folder / "milvus.db").rglob("manifest.json")).write_text("{}")


CHECK_IN_A_FRESH_PROCESS = textwrap.dedent("""
    import logging, sys
    from pathlib import Path
    sys.path.insert(0, sys.argv[2])
    logging.basicConfig(level=logging.INFO, format="%(message)s")  # as the CLI logs
    logging.getLogger("faiss").setLevel(logging.WARNING)
    from test_search_hostile import assert_every_item_finds_itself, vectors
    assert_every_item_finds_itself(Path(sys.argv[1]), vectors(300))
""")


@pytest.mark.parametrize("damage", [_milvus_segment, _milvus_manifest], ids=["segment", "manifest"])
def test_damaged_milvus_lite_data_is_rebuilt_from_the_store(tmp_path, damage):
    """Milvus Lite reads its files when a process first opens them, so the damaged folder is opened by a fresh
    process: a segment Milvus cannot read, and a manifest that silently lists no rows; both rebuilt, one line said,
    no traceback (Milvus Lite's own logs of the error are kept quiet)."""
    folder = tmp_path / "idx"
    build(folder, backend="milvus")
    damage(folder)
    r = subprocess.run([sys.executable, "-c", CHECK_IN_A_FRESH_PROCESS, str(folder), str(Path(__file__).parent)],
                       env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    said = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(said) == 1 and "milvus.db" in said[0] and "rebuilt it from" in said[0], r.stderr[-3000:]


# -- two `guie index add` at once (item 6) ---------------------------------------------------------------------------
@pytest.mark.slow
def test_two_index_adds_at_once_both_land_every_image_once(tmp_path, tiny_embedder):
    """Two real `guie index add` processes on one index, started together, with overlapping sources. The test holds
    the folder's commit lock until one of them has said that it waits, so the other is sure to be mid-add (about to
    commit) meanwhile. Both exit 0, and the index holds every distinct image exactly once."""
    import fcntl
    import threading

    from conftest import write_labelled_folder
    from guie.models import save_embedder

    root = write_labelled_folder(tmp_path / "imgs", classes=4, domains=("a", "b", "c"))
    first, second = tmp_path / "first", tmp_path / "second"
    for k, p in enumerate(sorted(root.rglob("*.png"))):  # 8 images each, 4 in both
        for dest, keep in ((first, k < 8), (second, k >= 4)):
            if keep:
                (dest / p.parent.name).mkdir(parents=True, exist_ok=True)
                shutil.copy(p, dest / p.parent.name / p.name)
    model = save_embedder(tiny_embedder(embed_dim=8, image_size=32), tmp_path / "tiny.pt")
    folder = tmp_path / "idx"
    assert CliRunner().invoke(app, ["index", "create", str(folder), "--model", str(model)]).exit_code == 0
    cmd = [sys.executable, "-m", "guie.cli", "index", "add", str(folder)]
    opts = ["--shard-size", "2", "--no-progress"]
    commit_lock = os.open(folder / ".writer.lock", os.O_RDWR)
    fcntl.flock(commit_lock, fcntl.LOCK_EX)
    procs, said = [], {}
    try:
        for source in (first, second):  # started together: whichever takes the add lock first runs, the other waits
            proc = subprocess.Popen(cmd + [str(source)] + opts, env=ENV, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True)
            said[proc.pid] = lines = []
            threading.Thread(target=lambda f=proc.stderr, out=lines: out.extend(f), daemon=True).start()
            procs.append(proc)
        deadline = time.time() + 300
        while time.time() < deadline and all(p.poll() is None for p in procs) and \
                not any("waiting" in ln for lines in said.values() for ln in lines):
            time.sleep(0.05)
    finally:
        fcntl.flock(commit_lock, fcntl.LOCK_UN)  # the first commits, then the second runs
        os.close(commit_lock)
    outs = [p.communicate(timeout=300)[0] for p in procs]
    time.sleep(0.2)
    errs = ["".join(said[p.pid]) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errs
    waited = ["another add to this index is running" in e and "waiting" in e for e in errs]
    assert sorted(waited) == [False, True], errs
    ran_first, ran_second = (outs[1], outs[0]) if waited[0] else (outs[0], outs[1])
    assert "added 8 of 8" in ran_first and "added 4 of 8 images (4 already indexed" in ran_second, outs
    with ImageIndex.open(folder) as index:
        assert len(index) == 12 and index.stats()["backend"]["vectors"] == 12 and index.seq == 2
        assert len({it["content_hash"] for it in index.items(index.store.ids()).values()}) == 12
        assert not (folder / "pending").exists()


# -- kill -9 while a snapshot is written: its temp file is cleaned up, never a live writer's (item 9) ------------
KILL_IN_WRITE_INDEX = textwrap.dedent("""
    import os, signal, sys
    import faiss, numpy as np
    from guie.search.image_index import ImageIndex, NewItem
    def die(index, path):
        with open(path, "wb") as f:
            f.write(b"half a snapshot" * 1000)
        os.kill(os.getpid(), signal.SIGKILL)
    faiss.write_index = die
    with ImageIndex.open(sys.argv[1]) as index:
        index.add(np.ones((1, 16), np.float32), [NewItem("one-more", "x.png", "x", {})])
""")

HOLD_LOCK = "import fcntl, os, sys, time\nfd = os.open(sys.argv[1], os.O_RDWR)\nfcntl.flock(fd, fcntl.LOCK_EX)\n" \
            "print('held', flush=True)\ntime.sleep(60)\n"


def test_kill_9_during_a_snapshot_write_leaves_no_orphan_temp_file(tmp_path):
    folder = tmp_path / "idx"
    x = build(folder)
    r = subprocess.run([sys.executable, "-c", KILL_IN_WRITE_INDEX, str(folder)], env=ENV, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == -signal.SIGKILL, r.stderr[-1500:]
    orphans = list(folder.glob(".faiss-*.index.*.tmp"))
    assert len(orphans) == 1  # what the kill left
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(folder / ".writer.lock")],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with ImageIndex.open(folder, write=False) as index:  # a writer holds the folder: its files stay
            assert len(index) == N - 43 + 1
        assert orphans[0].exists()
    finally:
        holder.kill()
        holder.wait()
    with ImageIndex.open(folder, write=False):  # nobody writes now: the open deletes what the kill left
        pass
    assert not list(folder.glob(".*.tmp"))
    with ImageIndex.open(folder) as index:  # and a writing open persists the recovered commit
        assert len(index) == N - 43 + 1 and index.backend.synced_seq() == index.seq == 3
    assert [p.name for p in folder.glob("faiss-*")] == ["faiss-3.check.json", "faiss-3.index"] or \
        sorted(p.name for p in folder.glob("faiss-*")) == ["faiss-3.check.json", "faiss-3.index"]
    assert_every_item_finds_itself(folder, np.vstack([x, np.ones((1, DIM), np.float32)]))


# -- a remove or DELETE that matches nothing commits nothing (item 10) ------------------------------------------
def test_a_remove_or_delete_that_matches_nothing_commits_nothing(tmp_path):
    from fastapi.testclient import TestClient

    from guie.search.app import ServerSettings, create_app
    from test_search_server import PixelEncoder

    folder = tmp_path / "idx"
    build(folder, model={**MODEL, "fingerprint": PixelEncoder.fingerprint})
    snap = next(folder.glob("faiss-*.index"))
    stamp = (snap.name, snap.stat().st_mtime_ns, snap.stat().st_ino)
    r = CliRunner().invoke(app, ["index", "remove", str(folder), "--where", "vendor=nobody"])
    assert r.exit_code == 0 and "removed 0 items in commit 2" in r.output, r.output
    encoder = PixelEncoder()
    try:
        with ImageIndex.open(folder) as index:
            client = TestClient(create_app(index, encoder, ServerSettings(api_key="a-key-for-tests")),
                                base_url="http://127.0.0.1")  # a Host the loopback server accepts
            for _ in range(6):
                assert client.delete("/items/9999", headers={"X-API-Key": "a-key-for-tests"}).status_code == 404
            assert index.seq == 2 and len(index.store.commits(100)) == 3  # create, add, remove
            assert index.add(vectors(1), items_for(1, start=1)).seq == 2  # an indexed image: no commit either
    finally:
        encoder.batcher.close()
    snap = next(folder.glob("faiss-*.index"))
    assert (snap.name, snap.stat().st_mtime_ns, snap.stat().st_ino) == stamp  # the snapshot was never rewritten


# -- disk full: one line naming the index, nothing half-done (item 13) ------------------------------------------
@pytest.fixture
def small_disk(tmp_path):
    """A 2 MiB tmpfs (root where mounts are allowed) -> (folder on it, fill(free_bytes)); else None."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)], capture_output=True).returncode:
        yield None
        return

    def fill(free: int) -> None:
        st = os.statvfs(mnt)
        with open(mnt / "blob", "ab", buffering=0) as f:
            f.write(b"\0" * max(0, st.f_bavail * st.f_frsize - free))

    try:
        yield mnt, fill
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_disk_full_is_one_line_naming_the_index(tmp_path, small_disk, monkeypatch):
    """A real full file system where the machine allows a tmpfs mount (else injected ENOSPC errors): a remove
    (SQLite rolls back by itself: no "cannot rollback"), an add whose SQLite commit fails, and an add whose commit
    lands but whose snapshot cannot be written; each a one-line DiskFullError, and the index intact after."""
    import sqlite3

    import faiss

    from guie.errors import DiskFullError

    x = vectors(1000, dim=64)
    folder = (small_disk[0] if small_disk else tmp_path) / "idx"
    with ImageIndex.create(folder, dim=64, model=MODEL) as index:
        index.add(x[:600], items_for(600))

    def no_room(free: int) -> None:
        if small_disk:
            (small_disk[0] / "blob").unlink(missing_ok=True)
            small_disk[1](free)
            return
        monkeypatch.undo()
        if free < 16384:  # nothing fits: the store's commit fails
            def sqlite_full(*a, **k):
                e = sqlite3.OperationalError("database or disk is full")
                e.sqlite_errorname = "SQLITE_FULL"
                raise e
            monkeypatch.setattr("guie.search.store.MetadataStore._bump", sqlite_full)
        elif free < 2**20:  # the commit fits, the snapshot does not
            def faiss_full(index_, path):
                raise RuntimeError(f"Error in faiss::write_index: write error in {path}: 1 != 2 (No space left on "
                                   "device)")
            monkeypatch.setattr(faiss, "write_index", faiss_full)

    with ImageIndex.open(folder) as index:  # open before the disk fills (an open needs room for SQLite's -shm)
        no_room(8 * 1024)
        r = CliRunner().invoke(app, ["index", "remove", str(folder), "--where", "vendor=a"])
        assert r.exit_code == 2 and "disk full" in one_line(r.output) and "index.sqlite" in r.output, r.output
        with pytest.raises(DiskFullError, match="disk full") as e:
            index.add(x[600:700], items_for(100, start=600))
        assert "\n" not in str(e.value) and index.seq == 1
        no_room(100 * 1024)  # room for a 100-item commit, not for a 700 x 64-d snapshot
        with pytest.raises(DiskFullError, match="commit 2 is safe") as e:
            index.add(x[600:700], items_for(100, start=600))
        assert "\n" not in str(e.value) and index.seq == 2
        no_room(2**30)
        assert len(index.remove(range(600, 610))[1]) == 10  # the same object writes on, with no duplicate vectors
        assert index.stats()["backend"]["vectors"] == 690
    with ImageIndex.open(folder) as index:
        assert len(index) == 690 and index.backend.synced_seq() == 3
    assert_every_item_finds_itself(folder, x)


# -- HNSW: tombstones and filters never give fewer than k hits (item 7) -----------------------------------------
def test_hnsw_returns_k_hits_despite_tombstones_and_filters(tmp_path):
    rng = np.random.default_rng(0)
    groups = rng.normal(size=(10, DIM))  # near-duplicates, as one emoji drawn by several vendors
    x = (groups[np.arange(N) % 10] + rng.normal(size=(N, DIM)) * 1e-4).astype(np.float32)
    removed = rng.choice(N, N // 5, replace=False)
    with ImageIndex.create(tmp_path / "idx", dim=DIM, model=MODEL, kind="hnsw") as index:
        index.add(x, [NewItem(f"h{i}", None, str(i % 25), {}) for i in range(N)])
        index.remove(removed)
        assert index.stats()["backend"]["tombstones"] == len(removed)
        live = np.setdiff1d(np.arange(N), removed)
        for row in index.search(groups.astype(np.float32), len(live)):
            assert sorted(h.id for h in row) == live.tolist()
        labelled = np.intersect1d(live, np.arange(3, N, 25))
        for row, q in zip(index.search(x[:50], 5, where=["label=3"]), x[:50]):
            want = labelled[np.argsort(np.linalg.norm(x[labelled] - q, axis=1), kind="stable")[:5]]
            assert [h.id for h in row] == want.tolist()


# -- one typed `where` on faiss and Milvus (item 12) -----------------------------------------------------------------
TYPED = [{"flag": True, "n": 2, "x": 0.5, "s": "apple", "code": "2"},
         {"flag": False, "n": 3, "x": 2.0, "s": "2", "code": "02"},
         {"flag": True, "n": 0, "x": -1.25, "s": "Apple", "code": None},
         {"n": 1, "x": 1e10, "s": "true"},
         {"flag": False, "n": 2.0, "s": "a,b"}]
CONDITIONS = [["flag=true"], ["flag=True"], ["flag=1"], ["flag=false"], ["flag=0"], ["n=2"], ["n=2.0"], ["n=1"],
              ["x=.5"], ["x=0.50"], ["x=2"], ["x=1e10"], ["x=-1.25"], ["s=apple"], ["s=2"], ["s=true"], ["code=2"],
              ["code=02"], ["id=3"], ["id=1,4"], ["label=1"], ["n=2", "flag=false"], ["s=Apple,apple", "n=0"],
              ["missing=1"], ["n=two"]]


def test_where_means_the_same_on_faiss_and_milvus(tmp_path):
    x = vectors(len(TYPED))
    items = [NewItem(f"t{i}", f"p{i}.png", str(i % 2), meta) for i, meta in enumerate(TYPED)]
    got = {}
    for backend in ("faiss", "milvus"):
        with ImageIndex.create(tmp_path / backend, dim=DIM, model=MODEL, backend=backend) as index:
            index.add(x, items)
            got[backend] = [sorted(h.id for h in index.search(x[:1], len(TYPED), where=c)[0]) for c in CONDITIONS]
            with pytest.raises(GuieError, match="item ids are integers"):
                index.search(x[:1], 5, where=["id=x"])

    def expected(cond):
        where = {}
        for c in cond:
            col, _, values = c.partition("=")
            where[col] = values.split(",")
        return [i for i, it in enumerate(items)
                if all(any(_matches(_stored(it, i, col), v) for v in vals) for col, vals in where.items())]

    want = [expected(c) for c in CONDITIONS]
    assert got["faiss"] == want and got["milvus"] == want, {str(c): (f, m, w) for c, f, m, w in
                                                           zip(CONDITIONS, got["faiss"], got["milvus"], want)
                                                           if not f == m == w}
    assert want[:5] == [[0, 2], [0, 2], [0, 2], [1, 4], [1, 4]] and want[5] == [0, 4] and want[14] == [1]


def _stored(item: NewItem, i: int, col: str):
    return {"id": i, "path": item.path, "label": item.label}.get(col, item.meta.get(col))


def _matches(value, text: str) -> bool:
    """The documented rule (docs/search.md), written out independently of guie's code: text compares as text,
    numbers as numbers, booleans as 1/0 (true/false typed in any case), null never."""
    if value is None:
        return False
    if isinstance(value, str):
        return value == text
    t = {"true": "1", "false": "0"}.get(text.strip().lower(), text.strip())
    try:
        return float(t) == float(value)
    except ValueError:
        return False


# -- backends are a registry (issue 28 item 3) ---------------------------------------------------------------------
def test_a_new_backend_is_one_registry_entry(tmp_path):
    from guie.search.backends import VectorBackend, backend_names, base, register_backend

    @register_backend
    class Brute(VectorBackend):
        """Exact search in plain NumPy, in memory only."""

        name = "brute-test"

        def __init__(self, folder, dim, kind="flat"):
            self.ids, self.x, self.seq = np.empty(0, np.int64), np.empty((0, dim), np.float32), -1

        def synced_seq(self):
            return self.seq

        def add(self, ids, vectors, attrs=None):
            self.ids, self.x = np.concatenate([self.ids, ids]), np.vstack([self.x, vectors])

        def remove(self, ids):
            keep = ~np.isin(self.ids, ids)
            self.ids, self.x = self.ids[keep], self.x[keep]
            return np.asarray(ids)

        def persist(self, seq):
            self.seq = seq

        note_applied = persist

        def rebuild(self, ids, vectors, attrs, seq):
            self.ids, self.x, self.seq = ids, vectors, seq

        def search(self, queries, k, allowed_ids=None, where=None):
            from guie.search.backends import Neighbours

            d = np.linalg.norm(self.x[None] - queries[:, None], axis=-1)
            if allowed_ids is not None:
                d[:, ~np.isin(self.ids, allowed_ids)] = np.inf
            order = np.argsort(d, axis=1)[:, :k]
            return Neighbours(np.take_along_axis(d, order, 1), self.ids[order])

        def count(self):
            return len(self.ids)

    try:
        assert {"faiss", "milvus", "brute-test"} <= set(backend_names())
        x = vectors(20)
        with ImageIndex.create(tmp_path / "idx", dim=DIM, model=MODEL, backend="brute-test") as index:
            index.add(x, items_for(20))
            assert [h.id for h in index.search(x[3:4], 2, where=["vendor=b"])[0]][0] == 3
        with ImageIndex.open(tmp_path / "idx") as index:  # nothing persisted: rebuilt from the store on open
            assert index.search(x[7:8], 1)[0][0].id == 7
    finally:
        base._REGISTRY.pop("brute-test", None)
    with pytest.raises(BackendError, match="unknown backend 'nope'; choose from faiss, milvus"):
        ImageIndex.create(tmp_path / "other", dim=DIM, model=MODEL, backend="nope")
