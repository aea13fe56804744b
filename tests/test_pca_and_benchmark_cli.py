"""`guie fit-pca` writes a normal checkpoint (embed, evaluate, export and search take it) whose head is the PCA of
the backbone features; `guie benchmark` scores models on built-in benchmarks as `guie evaluate` would; the data
commands report what they built."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from guie.cli import app
from guie.data import benchmarks as benchmarks_module
from guie.data.benchmarks import Benchmark
from guie.embedding.files import read_embeddings
from guie.models import create_embedder, load_embedder
from guie.models.heads import fit_pca
from train_fixtures import make_labelled_images


def run(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return make_labelled_images(tmp_path_factory.mktemp("pca"), n_classes=8, per_class=4)


@pytest.fixture(scope="module")
def pca_model(images, tmp_path_factory):
    out = tmp_path_factory.mktemp("pca_model") / "pca.pt"
    r = run("fit-pca", images, "--model", "efficientnet_lite0", "--image-size", "32", "--dim", "8", "-o", out,
            "--where", "split=train", "--cache", out.parent / "cache", "--no-progress")
    assert r.exit_code == 0, r.output
    assert "PCA 1280 -> 8" in r.stdout
    return out


def test_fit_pca_head_is_the_pca_of_the_backbone_features(images, pca_model):
    model = load_embedder(pca_model)
    assert model.embed_dim == 8 and model.preprocess.image_size == 32
    df = pd.read_csv(images)
    paths = [str(images.parent / p) for p in df["path"]]
    base = create_embedder("efficientnet_lite0", embed_dim=None, image_size=32).eval()
    x = torch.stack([base.transform(Image.open(p).convert("RGB")) for p in paths])
    with torch.no_grad():
        feats = base.forward_features(x).numpy()
        emb = model(x).numpy()
    train = (df["split"] == "train").to_numpy()
    mean, comps = fit_pca(feats[train].astype(np.float64), 8)
    ref = (feats - mean) @ comps.T
    ref /= np.linalg.norm(ref, axis=1, keepdims=True)
    np.testing.assert_allclose(np.abs((emb * ref).sum(1)), 1.0, atol=2e-3)  # same directions (PCA signs are free)


def test_fit_pca_checkpoint_goes_through_embed_evaluate_export_search(images, pca_model, tmp_path):
    emb_file = tmp_path / "e.parquet"
    r = run("embed", images, "--model", pca_model, "-o", emb_file, "--no-progress")
    assert r.exit_code == 0, r.output
    df, emb = read_embeddings(emb_file)
    assert emb.shape == (32, 8)
    r = run("evaluate", emb_file, "--folds-by", "vendor", "--where", "split=test")
    assert r.exit_code == 0 and '"mP@5"' in r.stdout, r.output
    r = run("export", pca_model, "-o", tmp_path / "pca.ts.pt", "--no-check")
    assert r.exit_code == 0, r.output
    index = tmp_path / "idx"
    r = run("index", "create", index, "--model", pca_model, "--image-size", "32")
    assert r.exit_code == 0, r.output
    r = run("index", "add", index, images, "--no-progress")
    assert r.exit_code == 0, r.output
    query = images.parent / df["path"].iloc[5]  # embed keeps the manifest's relative paths
    r = run("index", "search", index, query, "--json", "-k", "2")
    assert r.exit_code == 0, r.output
    hit = json.loads(r.stdout.splitlines()[0])["results"][0]
    assert hit["path"].endswith(query.name) and hit["distance"] < 1e-3


def test_fit_pca_refuses_bad_input_in_one_line(images, tmp_path):
    r = run("fit-pca", images, "--model", "efficientnet_lite0", "--dim", "65", "-o", tmp_path / "x.pt",
            "--image-size", "32", "--no-progress")
    assert r.exit_code == 2 and "PCA dim must be in 1..64" in r.output
    r = run("fit-pca", images, "--where", "split=nothing", "-o", tmp_path / "x.pt", "--no-progress")
    assert r.exit_code == 2 and "no rows left" in r.output


def test_benchmark_command_matches_evaluate(images, pca_model, tmp_path, monkeypatch):
    fake = {"gen": Benchmark("gen", lambda cache_dir=None: images, "vendor", "generated vendor")}
    monkeypatch.setattr(benchmarks_module, "BENCHMARKS", fake)
    out = tmp_path / "table.json"
    r = run("benchmark", pca_model, "--benchmarks", "gen", "--names", "pca", "--out", out,
            "--cache", tmp_path / "cache", "--no-progress")
    assert r.exit_code == 0, r.output
    row = json.loads(out.read_text())["rows"][0]
    emb_file = tmp_path / "e.parquet"
    assert run("embed", images, "--model", pca_model, "-o", emb_file, "--where", "split=test",
               "--no-progress").exit_code == 0
    r = run("evaluate", emb_file, "--folds-by", "vendor")
    assert row["model"] == "pca" and row["gen"] == pytest.approx(json.loads(r.stdout.splitlines()[-1])["mP@5"],
                                                                  abs=1e-6)
    r = run("benchmark", pca_model, "--benchmarks", "logos")
    assert r.exit_code == 2 and "unknown benchmark 'logos'" in r.output


def test_guie_data_has_one_command_per_registered_benchmark(tmp_path, monkeypatch):
    """A new benchmark is one registry entry: `guie data <name>` appears with its builder's options and report."""
    import typer

    from guie.cli import data as data_cli
    from guie.data.benchmarks import BENCHMARKS, BuildOption

    assert set(BENCHMARKS) <= {c.name for c in next(g for g in app.registered_groups
                                                      if g.name == "data").typer_instance.registered_commands}
    images = make_labelled_images(tmp_path / "gen", n_classes=4, per_class=4)
    calls = []

    def build(cache_dir=None, force=False, size=64):
        calls.append((cache_dir, force, size))
        return images

    fake = {"gen": Benchmark("gen", build, "vendor", "generated vendor", "vendors", "Make the generated set.",
                             (BuildOption("size", 64, "image side in pixels"),))}
    monkeypatch.setattr(benchmarks_module, "BENCHMARKS", fake)
    fresh = typer.Typer()
    data_cli.register(fresh)
    r = CliRunner().invoke(fresh, ["data", "gen", "--cache", str(tmp_path / "c"), "--size", "7", "--force"])
    assert r.exit_code == 0, r.output
    assert calls == [(tmp_path / "c", True, 7)]
    assert f"{images}: 16 images, 4 classes x 4 vendors" in r.output
    assert "Make the generated set." in CliRunner().invoke(fresh, ["data", "--help"]).output
