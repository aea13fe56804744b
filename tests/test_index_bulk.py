"""`guie index add NAME --embeddings OUT`: precomputed vectors bulk-loaded into faiss and Milvus Lite give the same
top-5 as indexing the images directly; vectors of another model are refused in one line; a reload adds nothing."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from conftest import write_labelled_folder
from guie.cli import app
from guie.embedding.files import read_embeddings
from guie.search.image_index import ImageIndex


def cli(*args, code: int = 0) -> str:
    r = CliRunner().invoke(app, [str(a) for a in args])
    assert r.exit_code == code, r.output
    return r.output


@pytest.fixture(scope="module", autouse=True)
def milvus_imported_outside_cli_runner():
    """Import pymilvus before any CliRunner call: it attaches logging handlers to sys.stderr when imported, and
    imported inside CliRunner they would keep its stream, closed after the call ("I/O operation on closed file")."""
    pytest.importorskip("pymilvus")
    from guie.search.backends import milvus_backend, milvus_local  # noqa: F401


@pytest.fixture(scope="module")
def embedded(tmp_path_factory):
    """A folder of 18 images in class folders, a tiny saved model and `guie embed` of the folder."""
    from guie.models import create_embedder, save_embedder

    root = tmp_path_factory.mktemp("bulk")
    folder = write_labelled_folder(root / "imgs", classes=6)
    model = save_embedder(create_embedder("timm:test_efficientnet", embed_dim=8, pretrained=False, image_size=32),
                          root / "tiny.pt")
    out = root / "emb.parquet"
    cli("embed", folder, "-o", out, "--model", model, "--no-progress")
    return {"root": root, "folder": folder, "model": model, "out": out}


def top5(name: Path, queries: np.ndarray) -> list:
    """Each query's top 5 as (path, label, distance rounded)."""
    with ImageIndex.open(name, write=False) as index:
        return [[(h.item["path"], h.item["label"], round(h.distance, 5)) for h in hits]
                for hits in index.search(queries, 5)]


def assert_same_top5_as_direct(folder: Path, model: Path, out: Path, tmp: Path, backend: str) -> None:
    """Index `folder` directly and `out` (its embeddings) in bulk, both with `backend`: the same top 5."""
    direct, bulk = tmp / f"direct-{backend}", tmp / f"bulk-{backend}"
    for name in (direct, bulk):
        cli("index", "create", name, "--model", model, "--backend", backend)
    cli("index", "add", direct, folder, "--no-progress")
    said = cli("index", "add", bulk, "--embeddings", out)
    n = len(read_embeddings(out)[0])
    assert f"added {n} of {n} embedded images (0 already indexed, 0 unreadable) in commit 1" in said
    queries = read_embeddings(out)[1][::3]
    expected = top5(direct, queries)
    assert top5(bulk, queries) == expected and len(expected[0]) == 5
    again = cli("index", "add", bulk, "--embeddings", out)  # same content, same items: nothing new
    assert f"added 0 of {n} embedded images ({n} already indexed" in again


@pytest.mark.parametrize("backend", ["faiss", "milvus"])
def test_bulk_load_gives_the_same_top5_as_indexing_the_images(embedded, tmp_path, backend):
    assert_same_top5_as_direct(embedded["folder"], embedded["model"], embedded["out"], tmp_path, backend)


def test_vectors_of_another_model_are_refused_in_one_line(embedded, tmp_path):
    cli("index", "create", tmp_path / "ix", "--model", embedded["model"])
    features = tmp_path / "features.parquet"  # backbone features: another output of the same weights
    cli("embed", embedded["folder"], "-o", features, "--model", embedded["model"], "--features", "--no-progress")
    r = CliRunner().invoke(app, ["index", "add", str(tmp_path / "ix"), "--embeddings", str(features)])
    assert r.exit_code == 2 and r.stderr.count("\n") == 1, r.output
    assert "features.parquet: embeddings of model fingerprint" in r.stderr
    assert "embed with the index's model" in r.stderr
    with ImageIndex.open(tmp_path / "ix", write=False) as index:
        assert len(index) == 0 and index.seq == 0
    r = CliRunner().invoke(app, ["index", "add", str(tmp_path / "ix")])
    assert r.exit_code == 2 and "give SOURCE" in r.stderr
    r = CliRunner().invoke(app, ["index", "add", str(tmp_path / "ix"), "--embeddings", str(embedded["out"]),
                                 "--where", "label=class1"])
    assert r.exit_code == 2 and "select them when embedding" in r.stderr


def test_unusable_embeddings_are_one_line_errors(embedded, tmp_path):
    cli("index", "create", tmp_path / "ix", "--model", embedded["model"])
    (tmp_path / "junk.parquet").write_bytes(b"PAR1 not really")
    for target, says in ((tmp_path / "junk.parquet", "junk.parquet: cannot read Parquet"),
                         (tmp_path / "none.parquet", "none.parquet: embeddings file (or finished parts) not found")):
        r = CliRunner().invoke(app, ["index", "add", str(tmp_path / "ix"), "--embeddings", str(target)])
        assert r.exit_code == 2 and r.stderr.count("\n") == 1 and says in r.stderr, r.output
