"""Every importer on a tiny fixture tree that mimics its dataset's published layout."""
from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

import data_fixtures as fx
from guie.cli import app
from guie.data.importers import IMPORTERS, DatasetImportError, import_dataset, parse_options
from guie.data.manifest import read_manifest


def _check_manifest(df: pd.DataFrame) -> None:
    assert list(df.columns[:3]) == ["path", "label", "domain"]
    assert df["path"].map(lambda p: Path(p).is_absolute() and Path(p).is_file()).all()
    assert not df["label"].isna().any() and (df["label"] != "").all()
    assert not df["path"].duplicated().any()


def test_gldv2_clean_and_all(tmp_path):
    exp = fx.make_gldv2(tmp_path)
    res = import_dataset("gldv2", tmp_path)
    _check_manifest(res.manifest)
    assert len(res.manifest) == exp["clean_rows"]
    assert res.manifest["label"].nunique() == exp["clean_classes"]
    assert res.skipped == exp["clean_skipped"]
    assert set(res.manifest["domain"]) == {"landmark"}
    row = res.manifest[res.manifest["image_id"] == "0a1b2c3d4e5f6071"].iloc[0]
    assert row["path"].endswith("train/0/a/1/0a1b2c3d4e5f6071.jpg")
    assert row["label"] == "1" and row["category"].endswith("Category:Big_Tower")

    res_all = import_dataset("gldv2", tmp_path, subset="all")
    assert len(res_all.manifest) == exp["all_rows"]
    assert res_all.skipped == exp["all_skipped"]


def test_products10k_splits(tmp_path):
    exp = fx.make_products10k(tmp_path)
    train = import_dataset("products10k", tmp_path)
    _check_manifest(train.manifest)
    assert len(train.manifest) == exp["train_rows"] and train.skipped == exp["skipped"]
    assert set(train.manifest["group"]) == {"0", "1"}
    both = import_dataset("products10k", tmp_path, split="all")
    assert both.manifest["split"].value_counts().to_dict() == {"train": 4, "test": 2}
    assert set(both.manifest.loc[both.manifest["split"] == "test", "usage"]) == {"Public", "Private"}


def test_shopee_quoted_titles_and_shared_images(tmp_path):
    exp = fx.make_shopee(tmp_path)
    res = import_dataset("shopee", tmp_path)
    _check_manifest(res.manifest)
    assert len(res.manifest) == exp["rows"] and res.skipped == exp["skipped"]
    assert exp["title"] in set(res.manifest["title"])
    assert res.manifest["label"].str.fullmatch(r"\d+").all()


def test_met_nested_folder_and_distractors(tmp_path):
    exp = fx.make_met(tmp_path)
    res = import_dataset("met", tmp_path)
    _check_manifest(res.manifest)
    assert len(res.manifest) == exp["train_rows"] and res.manifest["label"].nunique() == exp["train_classes"]
    assert "/MET/MET/770869/" in res.manifest["path"].iloc[-1]
    val = import_dataset("met", tmp_path, split="val")
    assert len(val.manifest) == exp["val_rows"] and val.skipped == exp["val_skipped"]
    assert val.manifest["label"].tolist() == ["18344"] and set(val.manifest["domain"]) == {"artwork"}


def test_sop_header_and_malformed_line(tmp_path):
    exp = fx.make_sop(tmp_path)
    res = import_dataset("sop", tmp_path)
    _check_manifest(res.manifest)
    assert len(res.manifest) == exp["train_rows"] and res.manifest["label"].nunique() == exp["train_classes"]
    assert res.skipped == exp["skipped"]
    assert set(res.manifest["super_class"]) == {"bicycle", "kettle"}
    test = import_dataset("sop", tmp_path, split="test")
    assert test.manifest["label"].tolist() == ["11319"]


def test_sop_wrong_file_is_a_clear_error(tmp_path):
    (tmp_path / "Ebay_train.txt").write_text("id label\n1 2\n")
    with pytest.raises(DatasetImportError, match="Ebay_train.txt.*header"):
        import_dataset("sop", tmp_path)


def test_deepfashion_inshop(tmp_path):
    exp = fx.make_deepfashion_inshop(tmp_path)
    res = import_dataset("deepfashion_inshop", tmp_path)
    _check_manifest(res.manifest)
    assert len(res.manifest) == exp["rows"] and res.manifest["label"].nunique() == exp["classes"]
    assert res.manifest["split"].value_counts().to_dict() == exp["splits"]
    assert "/Img/img/WOMEN/" in res.manifest["path"].iloc[0]
    q = import_dataset("deepfashion_inshop", tmp_path, split="query")
    assert q.manifest["label"].tolist() == ["id_00000080"]


def test_deepfashion_inshop_count_line_mismatch_is_noted(tmp_path):
    fx.make_deepfashion_inshop(tmp_path)
    txt = tmp_path / "Eval" / "list_eval_partition.txt"
    txt.write_text(txt.read_text().replace("4\n", "5\n", 1))
    res = import_dataset("deepfashion_inshop", tmp_path)
    assert any("announces 5 rows" in n for n in res.notes)


def test_deepfashion_c2s_one_row_per_image(tmp_path):
    exp = fx.make_deepfashion_c2s(tmp_path)
    res = import_dataset("deepfashion_c2s", tmp_path)
    _check_manifest(res.manifest)
    df = res.manifest
    assert len(df) == exp["rows"] and df["label"].nunique() == exp["classes"]
    assert df["view"].value_counts().to_dict() == {"consumer": exp["consumer"], "shop": exp["shop"]}
    assert res.skipped == {}
    test = import_dataset("deepfashion_c2s", tmp_path, split="test")
    assert set(test.manifest["label"]) == {"id_00000005"}


def test_stanford_cars_devkit(tmp_path):
    pytest.importorskip("scipy")
    exp = fx.make_stanford_cars_devkit(tmp_path)
    res = import_dataset("stanford_cars", tmp_path)
    _check_manifest(res.manifest)
    df = res.manifest
    assert len(df) == exp["train_rows"] and df["label"].nunique() == exp["train_classes"]
    assert df.loc[df["label"] == "14", "class_name"].iloc[0] == exp["class_14"]
    assert df["bbox"].iloc[0] == "39,116,569,375"
    both = import_dataset("stanford_cars", tmp_path, split="all")
    test = both.manifest[both.manifest["split"] == "test"]
    assert len(test) == exp["test_rows"] and "/cars_test/" in test["path"].iloc[0]


def test_stanford_cars_csv_copy(tmp_path):
    exp = fx.make_stanford_cars_csv(tmp_path)
    res = import_dataset("stanford_cars", tmp_path)
    _check_manifest(res.manifest)
    assert len(res.manifest) == exp["train_rows"]
    assert res.manifest.set_index("label").loc["14", "class_name"] == "Model 14"


def test_food101(tmp_path):
    exp = fx.make_food101(tmp_path)
    res = import_dataset("food101", tmp_path)
    _check_manifest(res.manifest)
    assert len(res.manifest) == exp["train_rows"] and res.manifest["label"].nunique() == exp["train_classes"]
    assert set(res.manifest["domain"]) == {"dishes"}
    assert len(import_dataset("food101", tmp_path / "food-101", split="test").manifest) == exp["test_rows"]


def test_hm_zero_padding_and_missing_images(tmp_path):
    exp = fx.make_hm(tmp_path)
    res = import_dataset("hm", tmp_path)
    _check_manifest(res.manifest)
    df = res.manifest
    assert len(df) == exp["rows"] and df["label"].nunique() == exp["classes"] and res.skipped == exp["skipped"]
    assert "0108775044" in set(df["article_id"])          # the id written without its leading zero was found
    assert set(df["label"]) == {"0108775", "0110065"}
    by_article = import_dataset("hm", tmp_path, label_by="article_id")
    assert by_article.manifest["label"].nunique() == 3


def test_gpr1200_domains_from_class_blocks(tmp_path):
    exp = fx.make_gpr1200(tmp_path)
    res = import_dataset("gpr1200", tmp_path)
    _check_manifest(res.manifest)
    assert len(res.manifest) == exp["rows"] and res.skipped == exp["skipped"]
    assert res.manifest.drop_duplicates("label").set_index("label")["domain"].to_dict() == exp["domains"]


def test_imagefolder_with_split_folders(tmp_path):
    exp = fx.make_imagefolder(tmp_path)
    res = import_dataset("imagefolder", tmp_path)
    _check_manifest(res.manifest)
    df = res.manifest
    assert len(df) == exp["rows"] and df["label"].nunique() == exp["classes"] and res.skipped == exp["skipped"]
    assert df.groupby("split")["label"].apply(set).to_dict() == {"train": {"cat", "dog"}, "val": {"dog"}}
    no_split = import_dataset("imagefolder", tmp_path / "train")
    assert "split" not in no_split.manifest.columns and len(no_split.manifest) == 3


def test_csv_importer_renames_and_resolves(tmp_path):
    fx.make_image(tmp_path / "imgs" / "a.jpg", seed=1)
    fx.make_image(tmp_path / "imgs" / "b.jpg", seed=2)
    table = tmp_path / "list.csv"
    table.write_text("file,cls,source\na.jpg,x,web\nb.jpg,y,web\nc.jpg,y,web\nb.jpg,,web\n")
    res = import_dataset("csv", table, path_column="file", label_column="cls", image_root="imgs", domain="toys")
    _check_manifest(res.manifest)
    assert res.manifest["label"].tolist() == ["x", "y"] and set(res.manifest["domain"]) == {"toys"}
    assert res.skipped == {"bad label": 1, "missing file": 1}
    assert "source" in res.manifest.columns


def test_verify_skips_unreadable_images(tmp_path):
    fx.make_food101(tmp_path)
    bad = tmp_path / "food-101" / "images" / "apple_pie" / "1014775.jpg"
    bad.write_bytes(b"<html>not found</html>")
    res = import_dataset("food101", tmp_path, verify=True)
    assert res.skipped == {"unreadable image": 1} and len(res.manifest) == 2
    assert res.examples["unreadable image"] == [str(bad)]
    assert len(import_dataset("food101", tmp_path).manifest) == 3  # without verify only existence is checked


def test_unknown_kind_and_option_errors(tmp_path):
    with pytest.raises(DatasetImportError, match="unknown dataset kind 'nope'"):
        import_dataset("nope", tmp_path)
    with pytest.raises(DatasetImportError, match="unknown option"):
        import_dataset("sop", tmp_path, colour="red")
    with pytest.raises(DatasetImportError, match="no Ebay_train.txt found"):
        import_dataset("sop", tmp_path)
    assert parse_options("hm", ["label_by=article_id"]) == {"label_by": "article_id"}
    assert parse_options("met", ["mini=true"]) == {"mini": True}
    with pytest.raises(DatasetImportError, match="true/false"):
        parse_options("met", ["mini=maybe"])


def _csv_fixture(root: Path) -> Path:
    fx.make_image(root / "a.jpg", seed=1)
    (root / "list.csv").write_text("path,label\na.jpg,x\n")
    return root / "list.csv"


# kind -> (writes the fixture under a folder and returns what to import: the folder, or a file in it)
FIXTURES = {kind: (lambda root, make=getattr(fx, f"make_{kind}"): (make(root), root)[1])
            for kind in ("gldv2", "products10k", "shopee", "met", "sop", "deepfashion_inshop", "deepfashion_c2s",
                         "food101", "hm", "gpr1200", "imagefolder")}
FIXTURES["stanford_cars"] = lambda root: (fx.make_stanford_cars_devkit(root), root)[1]
FIXTURES["csv"] = _csv_fixture


@pytest.mark.parametrize("kind", sorted(IMPORTERS))
def test_every_registered_importer_reads_its_fixture(kind, tmp_path):
    """Each importer in the registry turns a tree of its dataset's published layout into a usable manifest: a new
    importer without a fixture, or one that no longer reads its layout, fails here."""
    assert kind in FIXTURES, f"importer {kind!r} has no fixture in tests/data_fixtures.py"
    res = import_dataset(kind, FIXTURES[kind](tmp_path))
    assert len(res.manifest) > 0, res.summary()
    _check_manifest(res.manifest)


def test_cli_import_writes_a_relative_manifest(tmp_path):
    fx.make_sop(tmp_path)
    out = tmp_path / "sop.csv"
    r = CliRunner().invoke(app, ["data", "import", "sop", str(tmp_path), "--out", str(out), "--opt", "split=all"])
    assert r.exit_code == 0, r.output
    assert "skipped 1: malformed line 1" in r.output
    raw = pd.read_csv(out)
    assert not raw["path"].str.startswith("/").any()           # stored relative to the manifest's folder
    df = read_manifest(out)
    assert len(df) == 4 and df["path"].map(lambda p: Path(p).is_file()).all()
    r = CliRunner().invoke(app, ["data", "import", "sop", str(tmp_path / "nothing"), "--out", str(out)])
    assert r.exit_code == 2 and "no such file or folder" in r.output


def test_cli_lists_importers_with_options():
    r = CliRunner().invoke(app, ["data", "importers"])
    assert r.exit_code == 0
    for kind in IMPORTERS:
        assert kind in r.output
    assert "label_by='product_code'" in r.output


def test_folder_importers_given_a_file_say_so_in_one_line(tmp_path):
    """`guie data import imagefolder FILE` ended in a NotADirectoryError traceback."""
    from guie.data.importers import FILE_IMPORTERS

    a_file = tmp_path / "m.csv"
    a_file.write_text("path,label\n")
    r = CliRunner().invoke(app, ["data", "import", "imagefolder", str(a_file), "--out", str(tmp_path / "o.csv")])
    assert r.exit_code == 2 and f"{a_file}: is a file; the imagefolder importer reads a dataset folder" in r.output
    assert r.exception is None or isinstance(r.exception, SystemExit)
    for kind in set(IMPORTERS) - set(FILE_IMPORTERS):
        with pytest.raises(DatasetImportError, match="is a file"):
            import_dataset(kind, a_file)
