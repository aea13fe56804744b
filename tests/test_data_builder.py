"""Dataset builder: namespaces, filtering, caps/upsampling, class splits, query/index disjointness, recipes."""
from __future__ import annotations

import shutil

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

import data_fixtures as fx
from guie.cli import app
from guie.data.builder import (
    BuildRecipe,
    SourceConfig,
    build_dataset,
    cap_per_class,
    check_query_index,
    filter_min_images,
    load_recipe,
    merge_manifests,
    namespace_labels,
    split_classes,
    split_query_index,
    upsample_per_class,
)
from guie.data.manifest import read_manifest
from guie.typed_yaml import ConfigError


def _table(sizes: dict[str, int], prefix: str = "img") -> pd.DataFrame:
    rows = [(f"/x/{prefix}_{lbl}_{i}.jpg", lbl) for lbl, n in sizes.items() for i in range(n)]
    return pd.DataFrame(rows, columns=["path", "label"])


def test_namespaces_keep_datasets_apart():
    a = _table({"1": 2, "2": 3}, "a").assign(domain="landmark")
    b = _table({"1": 4}, "b")
    merged = merge_manifests([(a, "gld", None), (b, "p10k", "packaged")])
    assert set(merged["label"]) == {"gld/1", "gld/2", "p10k/1"}
    assert merged.groupby("dataset")["domain"].first().to_dict() == {"gld": "landmark", "p10k": "packaged"}
    assert (merged["orig_label"] == merged["label"].str.split("/").str[1]).all()
    assert namespace_labels(a, "x")["label"].tolist()[0] == "x/1" and "label" in a and a["label"][0] == "1"
    with pytest.raises(ValueError, match="unique"):
        merge_manifests([(a, "gld", None), (b, "gld", None)])
    with pytest.raises(ValueError, match="'/'"):
        namespace_labels(a, "a/b")


def test_filter_cap_and_upsample():
    df = _table({"a": 1, "b": 2, "c": 7, "d": 30})
    assert set(filter_min_images(df, 2)["label"]) == {"b", "c", "d"}
    capped = cap_per_class(df, 5, seed=1)
    assert capped["label"].value_counts().to_dict() == {"d": 5, "c": 5, "b": 2, "a": 1}
    assert capped.equals(cap_per_class(df, 5, seed=1))
    assert set(capped["path"]) != set(cap_per_class(df, 5, seed=2)["path"])
    up = upsample_per_class(df, 5, seed=0)
    counts = up["label"].value_counts()
    assert counts["a"] == 5 and counts["b"] == 5 and counts["c"] == 7 and counts["d"] == 30
    per_image = up[up["label"] == "b"]["path"].value_counts()
    assert sorted(per_image.tolist()) == [2, 3]                 # floor/ceil of 5/2: no image favoured
    assert up.drop_duplicates("path").shape[0] == len(df)       # nothing invented


def test_split_classes_is_class_disjoint_deterministic_and_per_dataset():
    a = _table({f"a{i}": 3 for i in range(40)}).assign(dataset="A")
    b = _table({f"b{i}": 2 for i in range(10)} | {"single": 1}).assign(dataset="B")
    df = pd.concat([a, b], ignore_index=True)
    train, val = split_classes(df, 0.2, seed=3)
    assert not set(train["label"]) & set(val["label"])
    assert len(train) + len(val) == len(df)
    assert val.groupby("dataset")["label"].nunique().to_dict() == {"A": 8, "B": 2}
    assert "single" not in set(val["label"])                     # cannot give a query plus an index image
    shuffled = df.sample(frac=1.0, random_state=0)
    assert set(split_classes(shuffled, 0.2, seed=3)[1]["label"]) == set(val["label"])
    assert set(split_classes(df, 0.2, seed=4)[1]["label"]) != set(val["label"])


def test_split_query_index_guie_rules():
    df = _table({"a": 1, "b": 2, "c": 5, "d": 12})
    q, idx = split_query_index(df, queries_per_class=3, seed=0)
    assert not set(q["path"]) & set(idx["path"])
    assert q["label"].value_counts().to_dict() == {"c": 3, "d": 3, "b": 1}
    assert q["label"].isin(set(idx["label"])).all()             # n_q >= 1 for every query
    assert idx["label"].value_counts().to_dict() == {"d": 9, "c": 2, "b": 1, "a": 1}
    assert check_query_index(q, idx) == {"shared_images": 0, "queries_without_index": 0}
    _, capped = split_query_index(df, 1, seed=0, max_index_per_class=4)
    assert capped["label"].value_counts().max() == 4


def _image_manifest(folder, name, sizes, seed0):
    rows, k = [], seed0
    for lbl, n in sizes.items():
        for i in range(n):
            p = fx.make_image(folder / name / lbl / f"{i}.png", seed=k, size=(16, 16))
            rows.append((str(p), lbl))
            k += 1
    df = pd.DataFrame(rows, columns=["path", "label"])
    out = folder / f"{name}.csv"
    df.to_csv(out, index=False)
    return out, df


def test_build_recipe_end_to_end_with_leak_removal(tmp_path):
    _image_manifest(tmp_path, "shop", {f"p{i}": 4 for i in range(6)} | {"tiny": 1}, seed0=0)
    _, bench = _image_manifest(tmp_path, "bench", {"q1": 3, "q2": 2}, seed0=100)
    # training-only web data secretly contains a copy of one benchmark image
    _, web = _image_manifest(tmp_path, "web", {"w0": 2}, seed0=200)
    leaked = bench["path"].iloc[0]
    shutil.copy(leaked, web["path"].iloc[0])
    recipe_path = tmp_path / "mix.yaml"
    recipe_path.write_text(f"""
name: mix
output: {tmp_path / "out"}
seed: 1
datasets:
  - name: shop
    manifest: shop.csv
    domain: products
    where: {{label: [p0, p1, p2, p3, p4, tiny]}}
    min_images: 2
    max_per_class: 3
    min_per_class: 4
  - name: bench
    manifest: bench.csv
    domain: mixed
    role: eval
  - name: web
    manifest: web.csv
    role: train
split:
  val_fraction: 0.34
leakage:
  methods: [exact]
""")
    recipe = load_recipe(recipe_path)
    assert isinstance(recipe, BuildRecipe) and isinstance(recipe.datasets[0], SourceConfig)
    res = build_dataset(recipe, progress=False)
    # namespaces and roles
    assert set(res.train["dataset"]) == {"shop", "web"} and "web" not in set(res.val["dataset"])
    assert set(res.queries["dataset"]) <= {"shop", "bench"} and "bench" in set(res.index["dataset"])
    assert not {"shop/tiny", "shop/p5"} & (set(res.train["label"]) | set(res.val["label"]))
    # class-disjoint train/eval; caps then upsampling on training only
    assert not set(res.train["label"]) & set(res.val["label"])
    shop_train = res.train[res.train["dataset"] == "shop"]
    assert shop_train["label"].nunique() == 3 and (shop_train["label"].value_counts() == 4).all()
    assert shop_train.groupby("label")["path"].nunique().max() == 3
    # the leaked benchmark image is gone from evaluation, and the rest is a valid GUIE split
    assert res.leaks == 1
    assert leaked not in set(res.queries["path"]) | set(res.index["path"])
    assert check_query_index(res.queries, res.index) == {"shared_images": 0, "queries_without_index": 0}
    # written files
    for name in ("train", "val", "queries", "index"):
        assert len(read_manifest(res.out_dir / f"{name}.csv")) == len(getattr(res, name))
    summary = pd.read_csv(res.out_dir / "summary.csv")
    assert set(summary["part"]) == {"train", "queries", "index"}
    assert summary.set_index(["part", "domain"]).loc[("train", "products"), "classes"] == shop_train["label"].nunique()
    assert (res.out_dir / "summary.png").stat().st_size > 1000
    # deterministic
    again = build_dataset(load_recipe(recipe_path, ["plot=false"]), progress=False)
    assert again.queries["path"].tolist() == res.queries["path"].tolist()


def test_recipe_errors_name_the_key_and_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\ndatasets:\n  - name: a\n    manifest: a.csv\n    max_per_clas: 3\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml\.datasets\[0\].*max_per_clas"):
        load_recipe(bad)
    bad.write_text("name: x\ndatasets:\n  - name: a\n    manifest: a.csv\n    role: test\n")
    with pytest.raises(ConfigError, match="role must be"):
        load_recipe(bad)


def test_cli_build(tmp_path):
    _image_manifest(tmp_path, "a", {f"c{i}": 3 for i in range(5)}, seed0=0)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"name: r\noutput: {tmp_path / 'out'}\ndatasets:\n  - name: a\n    manifest: a.csv\n"
                      "split:\n  val_fraction: 0.4\nleakage:\n  methods: []\nplot: false\n")
    r = CliRunner().invoke(app, ["data", "build", str(recipe), "--no-progress"])
    assert r.exit_code == 0, r.output
    assert "queries" in r.output and (tmp_path / "out" / "queries.csv").is_file()
    q = pd.read_csv(tmp_path / "out" / "queries.csv")
    assert len(q) == 2 and np.all(q["label"].str.startswith("a/"))


def test_example_recipe_is_valid():
    from pathlib import Path

    recipe = load_recipe("data-mix")  # a shipped recipe, by name: its manifests are relative to the current folder
    assert recipe.datasets[-1].role == "eval" and recipe.leakage.methods == ["exact", "phash"]
    assert all(Path(ds.manifest).is_absolute() for ds in recipe.datasets)
    assert recipe.datasets[0].manifest == str(Path.cwd() / "manifests" / "gldv2.clean.csv")
