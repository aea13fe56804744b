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
