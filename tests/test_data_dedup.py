"""Duplicates and leakage: exact, perceptual-hash and embedding detectors, within a set and train vs eval."""
from __future__ import annotations

import shutil

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from typer.testing import CliRunner

import data_fixtures as fx
from guie.cli import app
from guie.data.dedup import (
    DedupConfig,
    drop_duplicates,
    drop_leaks,
    duplicate_groups,
    embedding_pairs,
    exact_pairs,
    file_digests,
    find_duplicates,
    find_leaks,
    perceptual_hashes,
    phash_pairs,
)


@pytest.fixture()
def images(tmp_path):
    """5 distinct photos-like images, an exact copy, a re-encoded/resized copy, and an unreadable file."""
    d = tmp_path / "img"
    paths = [fx.make_image(d / f"orig{i}.png", seed=i, size=(96, 80)) for i in range(5)]
    shutil.copy(paths[0], d / "copy0.png")
    Image.open(paths[1]).resize((61, 50), Image.Resampling.BILINEAR).save(d / "small1.jpg", quality=70)
    (d / "broken.jpg").write_bytes(b"nope")
    files = paths + [d / "copy0.png", d / "small1.jpg", d / "broken.jpg"]
    return pd.DataFrame({"path": [str(p) for p in files], "label": ["a", "b", "c", "d", "e", "a", "x", "y"]})


def test_exact_pairs_pure():
    assert exact_pairs(["h1", "h2", "h1", None, "h1"]).values.tolist() == [
        [0, 2, "exact", 1.0], [0, 4, "exact", 1.0], [2, 4, "exact", 1.0]]
    cross = exact_pairs(["h2", "h9"], ["h1", "h2", "h2"])
    assert cross[["i", "j"]].values.tolist() == [[0, 1], [0, 2]]


def test_phash_pairs_pure_hamming_threshold():
    codes = np.zeros((3, 8), dtype=np.uint8)
    codes[1, 0] = 0b0000_0111           # 3 bits from row 0
    codes[2, :2] = 0xFF                 # 16 bits from row 0
    p = phash_pairs(codes, max_distance=3)
    assert p[["i", "j", "score"]].values.tolist() == [[0, 1, 3.0]]
    assert phash_pairs(codes, max_distance=2).empty
    ok = np.array([True, False, True])
    assert phash_pairs(codes, max_distance=3, ok_a=ok).empty   # undecodable rows never match


def test_embedding_pairs_inclusive_threshold():
    e = np.array([[1, 0], [0.8, 0.6], [0, 1], [1, 0]], dtype=np.float32)
    p = embedding_pairs(e, min_cosine=0.8)
    assert p[["i", "j"]].values.tolist() == [[0, 1], [0, 3], [1, 3]]
    assert np.allclose(p["score"], [0.8, 1.0, 0.8])
    cross = embedding_pairs(e[:1], e[2:], min_cosine=0.99)
    assert cross[["i", "j"]].values.tolist() == [[0, 1]]


def test_find_duplicates_exact_and_phash(images):
    rep = find_duplicates(images, DedupConfig(methods=("exact", "phash"), max_distance=6), workers=1)
    pairs = set(map(tuple, rep.pairs[["i", "j", "method"]].values.tolist()))
    assert (0, 5, "exact") in pairs and (0, 5, "phash") in pairs
    assert (1, 6, "phash") in pairs and (1, 6, "exact") not in pairs      # re-encoded copy: near, not exact
    assert {(i, j) for i, j, _ in pairs} == {(0, 5), (1, 6)}
    assert rep.unreadable == {"exact": 0, "phash": 1} or rep.unreadable == {"phash": 1}
    assert rep.pairs.loc[rep.pairs["i"] == 1, "label_j"].iloc[0] == "x"   # label conflict is visible
    kept = drop_duplicates(images, rep)
    assert kept["path"].tolist() == images["path"].drop([5, 6]).tolist()


def test_groups_are_transitive():
    pairs = pd.DataFrame({"i": [0, 1, 4], "j": [1, 2, 5], "method": "exact", "score": 1.0})
    g = duplicate_groups(6, pairs)
    assert g[0] == g[1] == g[2] and g[4] == g[5] and len({g[0], g[3], g[4]}) == 3


def test_leaks_between_eval_and_train(images):
    train = images.iloc[[0, 1, 2]]
    evaluation = images.iloc[[3, 4, 5, 6]]
    rep = find_leaks(evaluation, train, DedupConfig(methods=("exact", "phash"), max_distance=6), workers=1)
    leaked = sorted(set(rep.pairs["i"]))
    assert leaked == [2, 3]                                 # copy0 and small1 (positions in the eval set)
    clean = drop_leaks(evaluation, rep)
    assert clean["path"].tolist() == images["path"].iloc[[3, 4]].tolist()
    only_exact = find_leaks(evaluation, train, DedupConfig(methods=("exact",)), workers=1)
    assert sorted(set(only_exact.pairs["i"])) == [2]


def test_digests_and_hashes_in_parallel_match_serial(images):
    paths = images["path"].tolist()
    assert file_digests(paths, workers=2) == file_digests(paths, workers=1)
    c1, ok1 = perceptual_hashes(paths, workers=1)
    c2, ok2 = perceptual_hashes(paths, workers=2)
    assert np.array_equal(c1, c2) and ok1.tolist() == [True] * 7 + [False]


def test_embedding_method_end_to_end(images):
    from guie.embedding.engine import path_embedder
    from guie.models.embedder import create_embedder

    tiny = create_embedder("timm:resnet18", embed_dim=None, pretrained=False, image_size=64)
    cfg = DedupConfig(methods=("embedding",), min_cosine=0.999, embed=path_embedder(tiny))
    rep = find_duplicates(images.iloc[:6], cfg)
    assert (0, 5) in set(map(tuple, rep.pairs[["i", "j"]].values.tolist()))  # identical pixels: cosine 1


def test_config_validation():
    with pytest.raises(ValueError, match="subset"):
        DedupConfig(methods=("md5",))
    with pytest.raises(ValueError, match="max_distance"):
        DedupConfig(max_distance=40)


def test_cli_dedup_within_and_against(images, tmp_path):
    m = tmp_path / "all.csv"
    images.to_csv(m, index=False)
    clean = tmp_path / "clean.csv"
    r = CliRunner().invoke(app, ["data", "dedup", str(m), "--method", "exact", "--write-clean", str(clean),
                                 "--workers", "1", "--no-progress"])
    assert r.exit_code == 0, r.output
    assert "1 duplicate images" in r.output and len(pd.read_csv(clean)) == len(images) - 1
    assert len(pd.read_csv(tmp_path / "all.dups.csv")) == 1
    ev, tr = tmp_path / "eval.csv", tmp_path / "train.csv"
    images.iloc[[3, 5]].to_csv(ev, index=False)
    images.iloc[[0]].to_csv(tr, index=False)
    r = CliRunner().invoke(app, ["data", "dedup", str(ev), "--against", str(tr), "--method", "exact",
                                 "--workers", "1", "--no-progress"])
    assert r.exit_code == 0, r.output
    assert "1 of 2 images also in" in r.output
