"""Image search: index an embeddings file, query with images (CLI) and vectors (API)."""
import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from guie.search import EmbeddingIndex
from train_fixtures import make_labelled_images


def test_flat_index_returns_exact_neighbours_and_metadata(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(50, 8)).astype(np.float32)
    meta = pd.DataFrame({"path": [f"img{i}.png" for i in range(50)], "label": [str(i % 5) for i in range(50)]})
    index = EmbeddingIndex.build(x, meta)
    index.save(tmp_path / "idx")
    loaded = EmbeddingIndex.load(tmp_path / "idx")
    hits = loaded.search(x[[3, 7]], k=4)
    brute = np.argsort(((x[[3, 7], None] - x[None]) ** 2).sum(-1), axis=1)[:, :4]
    assert (hits.positions == brute).all()
    assert hits.rows[0]["path"].iloc[0] == "img3.png" and hits.rows[0]["distance"].iloc[0] == pytest.approx(0, abs=1e-3)
    with pytest.raises(ValueError, match="dim"):
        loaded.search(np.zeros((1, 4)))
    with pytest.raises(FileNotFoundError, match="not a guie search index"):
        EmbeddingIndex.load(tmp_path)
    with pytest.raises(ValueError, match="FAISS cannot build"):
        EmbeddingIndex.build(x, meta, factory="NoSuchIndex")


def test_cli_build_and_query_with_a_grid(tmp_path):
    manifest = make_labelled_images(tmp_path / "imgs", n_classes=6, per_class=3)
    run = lambda *a: subprocess.run([sys.executable, "-m", "guie.cli", *a], capture_output=True, text=True)  # noqa
    r = run("embed", str(manifest), "-o", str(tmp_path / "e.parquet"), "--image-size", "32", "--no-progress")
    assert r.returncode == 0, r.stderr[-2000:]
    r = run("search", "build", str(tmp_path / "e.parquet"), "-o", str(tmp_path / "idx"))
    assert r.returncode == 0 and "indexed 18 embeddings" in r.stdout, r.stderr[-2000:]
    query = tmp_path / "imgs" / "c002_1.png"
    # the index holds the default backbone's raw features at 32 px: query with that same model
    from guie.models import create_embedder, save_embedder

    save_embedder(create_embedder(embed_dim=None, image_size=32), tmp_path / "m32.pt")
    r = run("search", "query", str(tmp_path / "idx"), str(query), "--model", str(tmp_path / "m32.pt"), "--json",
            "--grid", str(tmp_path / "g.png"), "-k", "3")
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout.splitlines()[0])
    assert out["results"][0]["path"].endswith("c002_1.png") and out["results"][0]["distance"] < 1e-3
    assert (tmp_path / "g.png").stat().st_size > 1000


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """An index of 12 generated images embedded with the default backbone's raw features at 32 px, and that model."""
    from guie.embedding.engine import embed_images
    from guie.models import create_embedder

    tmp = tmp_path_factory.mktemp("serve")
    manifest = make_labelled_images(tmp / "imgs", n_classes=4, per_class=3)
    df = pd.read_csv(manifest)
    df["path"] = [str(tmp / "imgs" / p) for p in df["path"]]
    model = create_embedder(embed_dim=None, image_size=32).eval()
    res = embed_images(model, df["path"].tolist(), progress=False)
    return tmp, df, model, EmbeddingIndex.build(res.embeddings, df)


def test_http_search_returns_the_image_itself_first_and_rejects_bad_uploads(served):
    from fastapi.testclient import TestClient

    from guie.search.server import create_app

    tmp, df, model, index = served
    client = TestClient(create_app(index, model, max_k=4))
    assert client.get("/health").json()["size"] == 12
    query = df["path"].iloc[4]
    with open(query, "rb") as f:
        r = client.post("/search", params={"k": 10}, files=[("files", ("q.png", f.read(), "image/png"))])
    assert r.status_code == 200, r.text
    hits = r.json()["results"][0]["hits"]
    assert len(hits) == 4  # k is capped at max_k
    assert hits[0]["path"] == query and hits[0]["distance"] < 1e-3 and hits[0]["label"] == df["label"].iloc[4]
    assert [h["distance"] for h in hits] == sorted(h["distance"] for h in hits)
    r = client.post("/embed", files=[("files", ("a.png", open(query, "rb").read(), "image/png")),
                                     ("files", ("b.png", open(df["path"].iloc[0], "rb").read(), "image/png"))])
    vectors = np.array([e["vector"] for e in r.json()["embeddings"]])
    assert vectors.shape == (2, index.dim) and np.allclose(vectors[0], index.index.reconstruct(4), atol=1e-4)
    r = client.post("/search", files=[("files", ("broken.jpg", b"\xff\xd8\xff\xe0 not really a jpeg", "image/jpeg"))])
    assert r.status_code == 400 and "broken.jpg" in r.json()["detail"]


def test_http_server_refuses_a_model_of_another_dimension(served):
    from guie.models import create_embedder
    from guie.search.server import create_app

    _, _, _, index = served
    with pytest.raises(ValueError, match="1280-d"):
        create_app(index, create_embedder(embed_dim=16, image_size=32))


def test_cli_serve_answers_over_http(served):
    import socket
    import time
    import urllib.request

    from guie.models import save_embedder

    tmp, df, model, index = served
    index.save(tmp / "idx")
    save_embedder(model, tmp / "m.pt")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "guie.cli", "search", "serve", str(tmp / "idx"), "--model",
                             str(tmp / "m.pt"), "--port", str(port)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        for _ in range(120):
            try:
                health = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1))
                break
            except OSError:
                assert proc.poll() is None, proc.stdout.read().decode()[-2000:]
                time.sleep(0.5)
        assert health["size"] == 12 and health["dim"] == index.dim
    finally:
        proc.terminate()
        proc.wait(10)
