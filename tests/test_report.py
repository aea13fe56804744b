"""Evaluation reports: results.json, per-domain chart, retrieval grids with relevant neighbours marked, HTML."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from guie.data.manifest import read_manifest
from guie.evaluate import evaluate_folds, evaluate_query_index, format_table, write_report
from guie.evaluate.report import retrieval_grid
from guie.imaging.draw import GREEN, GREY, RED
from guie.metrics import mean_precision_at_k


@pytest.fixture(scope="module")
def evaluation(labelled_folder):
    """4 classes x 3 domains; embeddings = class one-hot + noise, one image deliberately off-class."""
    df = read_manifest(labelled_folder)
    df["domain"] = [p.split("/")[-1].split("_")[0] for p in df["path"]]
    rng = np.random.default_rng(0)
    classes = sorted(df["label"].unique())
    emb = np.eye(8)[[classes.index(lbl) for lbl in df["label"]]] + rng.normal(0, 0.05, (len(df), 8))
    emb[0] = np.eye(8)[3]  # class0's first image sits with class3
    return df, emb.astype(np.float32)


def test_report_files_and_scores(evaluation, tmp_path):
    df, emb = evaluation
    ev = evaluate_folds(df, emb, by="domain")
    report = write_report(ev, tmp_path / "rep", title="unit test", extra={"model": "toy"})
    out = tmp_path / "rep"
    assert report == out / "report.html"
    for name in ("results.json", "per_query.csv", "per_domain.png", "retrieval_random.png", "retrieval_worst.png"):
        assert (out / name).stat().st_size > 0, name
    res = json.loads((out / "results.json").read_text())
    folds = sorted(df["domain"].unique())
    expected = [mean_precision_at_k(emb[(df["domain"] == d).to_numpy()], df["label"][df["domain"] == d],
                                    emb[(df["domain"] != d).to_numpy()], df["label"][df["domain"] != d])
                for d in folds]
    assert res["mP@5"] == pytest.approx(np.mean(expected), abs=1e-12)
    assert [f["fold"] for f in res["folds"]] == folds
    assert [f["score"] for f in res["folds"]] == pytest.approx(expected, abs=1e-12)
    assert res["queries"] == len(df) and res["model"] == "toy" and res["title"] == "unit test"
    assert 0 < res["mP@5"] < 1  # the off-class image costs precision
    per_query = pd.read_csv(out / "per_query.csv")
    assert len(per_query) == len(df) and set(per_query["n_q"]) == {2}
    page = report.read_text()
    assert f"mP@5 = {ev.score:.4f}" in page and page.count("data:image/png;base64,") == 3
    assert "<td>toy</td>" in page
    with Image.open(out / "per_domain.png") as chart:
        assert chart.size[0] > 300 and chart.size[1] > 100


def test_retrieval_grid_marks_relevant_neighbours(evaluation):
    df, emb = evaluation
    ev = evaluate_folds(df, emb, by="domain")
    pq = ev.per_query
    rows = list(range(len(pq)))
    thumb, cell, label_w = 40, 48, 170
    grid = np.asarray(retrieval_grid(ev, rows, thumb=thumb))
    assert grid.shape[0] == cell * len(rows) + 4 and grid.shape[1] == label_w + cell * (ev.k + 1) + 10
    for r, q in pq.iterrows():
        y = 2 + r * cell + 1
        assert tuple(grid[y, label_w + 1]) == GREY
        for j, rel in enumerate(q["relevant"]):
            assert tuple(grid[y, label_w + cell * (j + 1) + 6 + 1]) == (GREEN if rel else RED), (r, j)
    assert any(not all(q["relevant"][:2]) for _, q in pq.iterrows())  # the test really has red frames


def test_report_without_domains_and_with_missing_images(evaluation, tmp_path):
    df, emb = evaluation
    q = df.iloc[:4].drop(columns=["domain"]).copy()
    q.loc[0, "path"] = str(tmp_path / "deleted.png")  # pictures of vanished files become blank tiles
    ev = evaluate_query_index(q, emb[:4], df.drop(columns=["domain"]), emb)
    write_report(ev, tmp_path / "rep")
    assert not (tmp_path / "rep" / "per_domain.png").exists()
    assert (tmp_path / "rep" / "retrieval_random.png").exists()
    page = (tmp_path / "rep" / "report.html").read_text()
    assert "per_domain.png" not in page
    res = json.loads((tmp_path / "rep" / "results.json").read_text())
    assert res["mP@5"] == pytest.approx(mean_precision_at_k(emb[:4], q["label"], emb, df["label"]), abs=1e-12)


def test_format_table():
    text = format_table([{"fold": "a", "queries": 3, "mP@5": 0.123456}, {"fold": "mean", "queries": 3,
                                                                         "mP@5": 0.5}],
                        ["fold", "queries", "mP@5"], title="GUIE metric")
    assert "GUIE metric" in text and "0.1235" in text and "0.5000" in text and "mean" in text
