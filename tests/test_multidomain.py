"""Multi-domain training: adding a dataset keeps (and can lock) the known classes' centres, several validation sets."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from guie.data.builder import load_recipe
from guie.losses import create_loss
from guie.train.centers import carry_centers
from guie.train.checkpoint import stage_model_path
from guie.train.data import load_training_dataset
from guie.train.engine import Trainer
from guie.train.recipe import DatasetConfig, load_run_config
from train_fixtures import make_labelled_images, tiny_recipe

TWO_DATASETS = """
datasets:
  a: {{manifest: {m}, where: {{split: train}}}}
  b: {{manifest: {m}, where: {{split: val}}}}
"""
STAGES = """  - name: head-a
    datasets: [a]
    train: [head, centers]
    steps: 12
    batch_size: 16
    lr: {{head: 0.05, centers: 0.05}}
  - name: add-b
    datasets: [a, b]
    train: [head, centers]
    lock_kept_centers: {lock}
    steps: 12
    batch_size: 16
    lr: {{head: 0.05, centers: 0.05}}
"""


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    return make_labelled_images(tmp_path_factory.mktemp("gen"), n_classes=16, per_class=4)


def _recipe(tmp_path, manifest, lock: bool, validation: str | None = None):
    text = tiny_recipe(manifest, tmp_path / "run", tmp_path / "cache", STAGES.format(lock=str(lock).lower()))
    text = text.replace(f"datasets:\n  gen: {{manifest: {manifest}, where: {{split: [train, val]}}}}\n",
                        TWO_DATASETS.format(m=manifest))
    if validation is not None:
        text = text.replace(f"validation: {{manifest: {manifest}, where: {{split: test}}, folds_by: vendor}}",
                            validation)
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return load_run_config(path)


def _centres(path):
    extra = torch.load(path, weights_only=False)["extra"]
    return dict(zip(extra["class_names"], extra["centers"]["weight"]))


@pytest.mark.parametrize("lock", [True, False])
def test_added_dataset_keeps_the_known_centres(tmp_path, manifest, lock):
    cfg = _recipe(tmp_path, manifest, lock)
    trainer = Trainer(cfg, progress=False)
    final = trainer.run()
    before = _centres(stage_model_path(cfg.run_dir, 0, "head-a"))
    after = _centres(final)
    assert set(before) < set(after)
    assert {n.split("/")[0] for n in set(after) - set(before)} == {"b"}
    moved = [not torch.equal(before[n], after[n]) for n in before]
    if lock:
        assert not any(moved)        # the old classes' centres stayed exactly where stage 1 put them
        # the checkpoint stores the kept rows as a mask (those of stage 1's classes); resuming rebuilds the same rows
        state = torch.load(trainer.ckpt_dir / "last.pt", weights_only=False)
        rows_of = np.repeat(np.asarray(state["class_names"]), state["sub_centers"])
        assert state["kept_centers_mask"].tolist() == [n in before for n in rows_of]
        rows, values = trainer.centers.kept_rows(state["kept_centers_mask"])
        assert torch.equal(rows, trainer.centers.kept[0]) and torch.equal(values, trainer.centers.kept[1])
    else:
        assert all(moved)            # trained on, from where stage 1 left them (see the carry test below)


def test_carry_centers_copies_rows_by_label_with_sub_centres():
    old = create_loss("arcface", 4, 3, sub_centers=2)
    new = create_loss("cosface", 4, 4, sub_centers=2)
    fresh = new.weight.detach().clone()
    kept = carry_centers(old, ["x/1", "x/2", "x/3"], new, ["x/3", "y/9", "x/1", "y/8"])
    assert kept.tolist() == [True, False, True, False]
    w_old, w_new = old.weight.detach().view(3, 2, 4), new.weight.detach().view(4, 2, 4)
    torch.testing.assert_close(w_new[0], w_old[2])
    torch.testing.assert_close(w_new[2], w_old[0])
    torch.testing.assert_close(w_new[1], fresh.view(4, 2, 4)[1])   # new classes keep their random start
    assert carry_centers(old, ["x/1", "x/2", "x/3"], new, ["z/1", "z/2"]) is None
    assert carry_centers(old, ["x/1", "x/2", "x/3"], create_loss("arcface", 4, 3), ["x/1", "x/2", "x/3"]) is None


def test_several_validation_sets_are_scored_and_averaged(tmp_path, manifest):
    validation = (f"validation:\n  sets:\n    test: {{manifest: {manifest}, where: {{split: test}}, folds_by: vendor}}"
                  f"\n    val: {{manifest: {manifest}, where: {{split: val}}, folds_by: vendor}}")
    cfg = _recipe(tmp_path, manifest, True, validation)
    trainer = Trainer(cfg, progress=False)
    trainer.run()
    assert set(trainer.last_validation) == {"test", "val"}
    metrics = pd.read_csv(cfg.run_dir / "metrics.csv")
    last = metrics.dropna(subset=["val_mP@5"]).iloc[-1]
    parts = dict(item.split("=") for item in last["val_sets"].split())
    assert set(parts) == {"test", "val"}
    assert last["val_mP@5"] == pytest.approx(np.mean([float(v) for v in parts.values()]), abs=1e-4)


def test_validation_takes_one_manifest_or_named_sets(tmp_path, manifest):
    both = (f"validation:\n  manifest: {manifest}\n  folds_by: vendor\n  sets:\n"
            f"    val: {{manifest: {manifest}, folds_by: vendor}}")
    with pytest.raises(ValueError, match="either one manifest or named sets"):
        _recipe(tmp_path, manifest, True, both)


def test_multi_domain_recipes_add_one_dataset_per_stage_then_the_backbone():
    build = load_recipe("data-multi-domain")
    assert [(d.name, d.manifest, d.role) for d in build.datasets] == [
        ("emoji", "emoji", "train"), ("glyphs", "glyphs", "train"), ("icons", "icons", "train")]
    cfg = load_run_config("multi-domain-lite0-cpu")
    assert [s.datasets for s in cfg.stages] == [["emoji"], ["emoji", "glyphs"], ["emoji", "glyphs", "icons"],
                                                ["emoji", "glyphs", "icons"]]
    assert [(s.sampler.balance, s.sampler.domain_weights) for s in cfg.stages[1:3]] == [
        ("domain", {"emoji": 5}), ("domain", {"emoji": 6})]
    # the last head stage weights emoji's and icons' distillation terms; stage 2 keeps the shared block unweighted
    assert [s.distill.domain_weights for s in cfg.stages[1:3]] == [{}, {"emoji": 2, "icons": 3}]
    # stages 2-3 distil from the specialists: emoji's is the run's own first stage, the others are trained first
    assert all(s.distill.weight > 0 and s.distill.teachers["emoji"] == "stage:head-emoji" for s in cfg.stages[1:3])
    assert {d for s in cfg.stages[1:3] for d in s.distill.teachers} == {"emoji", "glyphs", "icons"}
    assert not cfg.stages[0].distill.weight and not cfg.stages[3].distill.weight
    assert {name: d.domain for name, d in cfg.datasets.items()} == {n: n for n in ("emoji", "glyphs", "icons")}
    assert cfg.stages[-1].train == ["backbone"]
    assert {k: (v.manifest, v.folds_by) for k, v in cfg.validation.sets.items()} == {
        "emoji": ("emoji", "vendor"), "glyphs": ("glyphs", "font"), "icons": ("icons", "theme")}
    assert all(d.namespace == "" and d.where == {"dataset": name} for name, d in cfg.datasets.items())
    specialist = load_run_config("specialist-lite0-cpu")
    assert [s.train for s in specialist.stages] == [["head", "centers"], ["backbone"]]


def test_empty_namespace_keeps_built_labels(tmp_path, manifest):
    df = pd.read_csv(manifest)
    df["label"] = "built/" + df["label"]
    df["path"] = [str(manifest.parent / p) for p in df["path"]]
    df.to_csv(tmp_path / "built.csv", index=False)
    kept = load_training_dataset("x", DatasetConfig(manifest=str(tmp_path / "built.csv"), namespace=""), None, 0)
    prefixed = load_training_dataset("x", DatasetConfig(manifest=str(tmp_path / "built.csv")), None, 0)
    assert kept["label"].str.startswith("built/").all() and prefixed["label"].str.startswith("x/built/").all()
