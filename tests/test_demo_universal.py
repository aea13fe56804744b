"""`guie demo --universal --full` end to end on stand-in benchmarks (generated images; no npm, no apt): the training
mix is built, the zero-shot rows, the head-stage model and the final model are scored on every benchmark's test
classes."""
import json

import pytest

from guie.data import benchmarks as benchmarks_module
from guie.data.benchmarks import Benchmark
from guie.demo import run_universal_demo
from train_fixtures import make_labelled_images

HEAD = ("{name: %s, datasets: %s, train: [head, centers], lock_kept_centers: true, steps: 20, batch_size: 32, "
        "lr: {head: 0.05, centers: 0.05}, loss: {name: arcface, scale: 16, margin: 0.2}}")
COMMON = """seed: 0
num_workers: 0
model: {backbone: efficientnet_lite0, embed_dim: 16, dropout: 0.0, head_norm: batchnorm, image_size: 32,
        preprocess: {crop_pct: 1.0}, backbone_kwargs: {feature_levels: [3, 4]}}
"""
RECIPE = """
name: universal-tiny
""" + COMMON + """datasets:
  one: {manifest: unused, where: {dataset: one}, namespace: "", domain: one}
  two: {manifest: unused, where: {dataset: two}, namespace: "", domain: two}
validation:
  sets:
    one: {manifest: one, where: {split: val}, folds_by: vendor}
    two: {manifest: two, where: {split: val}, folds_by: vendor}
stages:
  - HEAD_ONE
  - ADD_TWO
  - {name: backbone, datasets: [one, two], train: [backbone], steps: 2, batch_size: 8, lr: {backbone: 1.0e-5},
     loss: {name: arcface, scale: 16, margin: 0.2}}
""".replace("HEAD_ONE", HEAD % ("head-one", "[one]")).replace(
    "ADD_TWO", HEAD[:-1] % ("add-two", "[one, two]")
    + ", distill: {teachers: {one: 'stage:head-one', two: specialists/two.pt}, weight: 1.0}}")
SPECIALIST = """
name: specialist-tiny
""" + COMMON + """datasets: {main: {manifest: one, where: {split: train}}}
validation: {manifest: one, where: {split: val}, folds_by: vendor}
stages:
  - HEAD_MAIN
  - {name: backbone, datasets: [main], train: [backbone], steps: 2, batch_size: 8, lr: {backbone: 1.0e-5}}
""".replace("HEAD_MAIN", HEAD % ("head", "[main]"))
BUILD = """
name: mix
datasets:
  - {name: one, manifest: one, where: {split: train}, role: train}
  - {name: two, manifest: two, where: {split: train}, role: train}
leakage: {methods: []}
"""


@pytest.fixture()
def stand_ins(tmp_path, monkeypatch):
    manifests = {n: make_labelled_images(tmp_path / n, n_classes=16, per_class=4, size=36, seed=i)
                 for i, n in enumerate(("one", "two"))}
    fake = {n: Benchmark(n, lambda cache_dir=None, m=m: m, "vendor", "generated vendor") for n, m in manifests.items()}
    monkeypatch.setattr(benchmarks_module, "BENCHMARKS", fake)
    (tmp_path / "recipe.yaml").write_text(RECIPE)
    (tmp_path / "build.yaml").write_text(BUILD)
    (tmp_path / "specialist.yaml").write_text(SPECIALIST)
    return tmp_path


def test_universal_demo_scores_every_row_on_every_benchmark(stand_ins):
    out = stand_ins / "out"
    result = run_universal_demo(out, stand_ins / "cache", recipe=stand_ins / "recipe.yaml",
                                build_recipe=stand_ins / "build.yaml", full=True, progress=False,
                                specialist_recipe=stand_ins / "specialist.yaml")
    methods = [r["method"] for r in result["rows"]]
    assert methods[0].startswith("zero-shot raw") and methods[1].startswith("PCA-64")
    # the distillation teachers: benchmark two's specialist trained by the demo, one's is the run's first stage
    assert methods[2].startswith("specialist: two only")
    assert methods[3] == "specialist: one only (the run's stage 'head-one')"
    assert (out / "specialists" / "two" / "model-stage-00-head.pt").exists()
    assert "up to 'add-two'" in methods[4] and "all stages" in methods[5]
    for row in result["rows"]:
        assert 0 < row["one"] <= 1 and 0 < row["two"] <= 1
    assert [r["dim"] for r in result["rows"]] == [1280, 64, 16, 16, 16, 16]
    assert set(result["seconds"]) == {"data", "features", "training", "scoring", "total"}
    assert json.loads((out / "results.json").read_text())["rows"] == result["rows"]
    built = (out / "data" / "train.csv").read_text().splitlines()
    assert len(built) == 1 + 2 * 8 * 4 and "one/class000" in built[1]   # both train halves, namespaced
