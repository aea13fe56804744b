"""`guie demo` end to end on a stand-in benchmark: generated images laid out as the emoji cache (no npm needed)."""
import json

import pandas as pd
import pytest

from guie.data.manifest import read_manifest
from guie.demo import run_demo
from guie.embedding.engine import embed_images
from guie.evaluate.protocol import evaluate_folds
from guie.models import load_embedder
from train_fixtures import make_labelled_images

RECIPE = """
name: demo-tiny
seed: 0
num_workers: 0
checkpoint_every_steps: 5
model: {backbone: efficientnet_lite0, embed_dim: 16, dropout: 0.0, head_norm: batchnorm, image_size: 32,
        preprocess: {crop_pct: 1.0}, backbone_kwargs: {feature_levels: [3, 4]}}
datasets:
  emoji: {manifest: emoji, where: {split: train}}
validation: {manifest: emoji, where: {split: val}, folds_by: vendor}
stages:
  - {name: head, datasets: [emoji], train: [head, centers], steps: 60, batch_size: 32, lr: {head: 0.05, centers: 0.05},
     optimizer: {name: adamw}, loss: {name: arcface, scale: 16, margin: 0.2}}
  - {name: backbone, datasets: [emoji], train: [backbone], steps: 3, batch_size: 8, lr: {backbone: 1.0e-5},
     optimizer: {name: adamw}, loss: {name: arcface, scale: 16, margin: 0.2}}
"""


@pytest.fixture(scope="module")
def fake_cache(tmp_path_factory):
    """32 classes x 4 'vendors' (a-d) in <cache>/emoji/16.0.0, where build_emoji_benchmark finds a built set."""
    cache = tmp_path_factory.mktemp("cache")
    make_labelled_images(cache / "emoji" / "16.0.0", n_classes=32, per_class=4, size=40)
    recipe = cache / "recipe.yaml"
    recipe.write_text(RECIPE)
    return cache, recipe


@pytest.mark.parametrize("full", [False, True])
def test_demo_scores_baselines_and_the_trained_model_on_test_classes(fake_cache, tmp_path, full):
    cache, recipe = fake_cache
    result = run_demo(tmp_path / "out", cache, full=full, recipe=recipe, progress=False)
    methods = [r["method"] for r in result["rows"]]
    assert methods[:2] == ["raw features (1280-d, zero-shot)", "PCA-64 (fit on train half)"]
    assert len(methods) == (4 if full else 3)
    if full:
        assert "stage 'head'" in methods[2] and "all stages" in methods[3]
    for row in result["rows"]:
        assert sorted(k for k in row if k.startswith("q=")) == ["q=a", "q=b", "q=c", "q=d"]
    # the trained row is the saved model, scored on the test classes through the public API (images, not the
    # demo's cached features): the demo scores what it trained, on the right rows
    test = read_manifest(cache / "emoji" / "16.0.0" / "manifest.csv")
    test = test[test["split"] == "test"].reset_index(drop=True)
    model = load_embedder(tmp_path / "out" / "run" / "model.pt")
    emb = embed_images(model, test["path"].tolist(), progress=False).embeddings
    assert result["rows"][-1]["mP@5 test"] == pytest.approx(evaluate_folds(test, emb, by="vendor").score, abs=0.02)
    # ... and it trained: the head stage's loss fell (a trainer that does not learn stays near its first loss)
    losses = pd.read_csv(tmp_path / "out" / "run" / "metrics.csv").query("stage == 'head'")["loss"].dropna()
    assert losses.iloc[-1] < 0.2 * losses.iloc[0], losses.tolist()
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert saved["rows"] == result["rows"] and saved["full"] is full
    reports = sorted(p.parent.name for p in (tmp_path / "out").glob("*/report.html"))
    assert len(reports) == len(methods)
    assert (tmp_path / "out" / "run" / "model.pt").is_file()
