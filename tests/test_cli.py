"""`guie embed` and `guie evaluate` end to end on generated folders (a tiny saved model: no downloads)."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from guie.cli import app
from guie.embedding.files import read_embeddings
from guie.metrics import mean_precision_at_k
from guie.models import save_embedder


@pytest.fixture
def model_file(tiny_embedder, tmp_path):
    return save_embedder(tiny_embedder(embed_dim=8, image_size=32), tmp_path / "tiny.pt")


def run(*args):
    result = CliRunner().invoke(app, [str(a) for a in args])
    return result


def _emb_with_domain(labelled_folder, model_file, tmp_path):
    manifest = pd.DataFrame({"path": sorted(str(p) for p in labelled_folder.rglob("*.png"))})
    manifest["label"] = [p.split("/")[-2] for p in manifest["path"]]
    manifest["domain"] = [p.split("/")[-1].split("_")[0] for p in manifest["path"]]
    manifest.to_csv(tmp_path / "manifest.csv", index=False)
    out = tmp_path / "emb.parquet"
    r = run("embed", tmp_path / "manifest.csv", "-o", out, "--model", model_file, "--no-progress")
    assert r.exit_code == 0, r.output
    return out


def test_embed_folder(labelled_folder, model_file, tmp_path):
    out = tmp_path / "emb.parquet"
    r = run("embed", labelled_folder, "--out", out, "--model", model_file, "--no-progress", "--batch-size", "5")
    assert r.exit_code == 0, r.output
    assert f"wrote 12 embeddings of dim 8 to {out}" in r.stdout
    df, emb = read_embeddings(out)
    assert list(df.columns) == ["path", "label"] and len(df) == 12 and emb.shape == (12, 8)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1, rtol=1e-5)


def test_embed_manifest_keeps_columns_and_reports_bad_files(mode_images, bad_files, model_file, tmp_path, caplog):
    paths = [str(mode_images["rgb"]), str(bad_files["truncated"]), str(mode_images["cmyk"]), str(bad_files["bomb"])]
    pd.DataFrame({"path": paths, "label": ["a", "b", "a", "b"], "vendor": ["v1", "v2", "v3", "v4"]}).to_parquet(
        tmp_path / "m.parquet")
    out = tmp_path / "emb.parquet"
    r = run("embed", tmp_path / "m.parquet", "-o", out, "--model", model_file, "--no-progress")
    assert r.exit_code == 0, r.output
    err = caplog.messages  # each skipped file is logged (the guie command logs to stderr)
    assert sum(line.startswith(f"skipped {bad_files['truncated']}: ") for line in err) == 1
    assert sum(line.startswith(f"skipped {bad_files['bomb']}: ") for line in err) == 1
    assert f"skipped 2 unreadable images (listed in {out}.failed.csv)" in r.stderr
    df, _ = read_embeddings(out)
    assert df["vendor"].tolist() == ["v1", "v3"] and df["label"].tolist() == ["a", "a"]


def test_embed_input_errors_are_one_line(tmp_path, model_file, mode_images):
    (tmp_path / "empty").mkdir()
    r = run("embed", tmp_path / "empty", "-o", tmp_path / "o.parquet", "--model", model_file)
    assert r.exit_code == 2
    assert r.stderr.strip().count("\n") == 0 and "no images found" in r.stderr and str(tmp_path / "empty") in r.stderr
    pd.DataFrame({"file": ["a.jpg"]}).to_csv(tmp_path / "m.csv", index=False)
    r = run("embed", tmp_path / "m.csv", "-o", tmp_path / "o.parquet", "--model", model_file)
    assert r.exit_code == 2 and "m.csv: manifest has no 'path' column" in r.stderr
    r = run("embed", tmp_path / "m.csv", "-o", tmp_path / "o.parquet", "--model", tmp_path / "nope.pt")
    assert r.exit_code == 2  # unknown model name / missing file: a clean error, not a traceback
    assert "Traceback" not in r.output
    pd.DataFrame({"path": [str(mode_images["rgb"])]}).to_csv(tmp_path / "ok.csv", index=False)
    r = run("embed", tmp_path / "ok.csv", "-o", tmp_path / "o.parquet", "--model", model_file, "--embed-dim", "4")
    assert r.exit_code == 2 and "cannot be changed on a trained model" in r.stderr


def test_embed_refuses_to_mix_models(mode_images, model_file, tiny_embedder, tmp_path):
    pd.DataFrame({"path": [str(p) for p in mode_images.values()]}).to_csv(tmp_path / "m.csv", index=False)
    out = tmp_path / "emb.parquet"
    parts = tmp_path / "emb.parquet.parts"
    parts.mkdir()
    (parts / "meta.json").write_text(json.dumps({"model": "something else"}))
    (parts / "part-000000.parquet").write_bytes(b"left by another run")
    r = run("embed", tmp_path / "m.csv", "-o", out, "--model", model_file, "--no-progress", "--shard-size", "4")
    assert r.exit_code == 2 and "discard them (overwrite)" in r.stderr
    r = run("embed", tmp_path / "m.csv", "-o", out, "--model", model_file, "--no-progress", "--shard-size", "4",
            "--overwrite")
    assert r.exit_code == 0, r.output
    assert len(read_embeddings(out)[0]) == len(mode_images)


def test_evaluate_folds_by_writes_report_with_exact_score(labelled_folder, model_file, tmp_path):
    emb_file = _emb_with_domain(labelled_folder, model_file, tmp_path)
    rep = tmp_path / "rep"
    r = run("evaluate", emb_file, "--folds-by", "domain", "--out", rep)
    assert r.exit_code == 0, r.output
    for name in ("results.json", "report.html", "per_domain.png", "retrieval_random.png", "retrieval_worst.png"):
        assert (rep / name).is_file(), name
    df, emb = read_embeddings(emb_file)
    scores = [mean_precision_at_k(emb[(df["domain"] == d).to_numpy()], df["label"][df["domain"] == d],
                                  emb[(df["domain"] != d).to_numpy()], df["label"][df["domain"] != d])
              for d in sorted(df["domain"].unique())]
    res = json.loads((rep / "results.json").read_text())
    assert res["mP@5"] == pytest.approx(np.mean(scores), abs=1e-12)
    assert json.loads(r.stdout.strip().splitlines()[-1]) == {"mP@5": round(float(np.mean(scores)), 6)}
    assert "GUIE metric" in r.stdout and "per domain" in r.stdout


def test_evaluate_query_index(labelled_folder, model_file, tmp_path):
    emb_file = _emb_with_domain(labelled_folder, model_file, tmp_path)
    df, emb = read_embeddings(emb_file)
    q = (df["domain"] == "photo").to_numpy()
    from guie.embedding.files import embeddings_table
    from guie.utils import save_parquet_atomic

    save_parquet_atomic(embeddings_table(df[q], emb[q]), tmp_path / "q.parquet")
    save_parquet_atomic(embeddings_table(df[~q], emb[~q]), tmp_path / "i.parquet")
    rep = tmp_path / "rep"
    r = run("evaluate", "--query", tmp_path / "q.parquet", "--index", tmp_path / "i.parquet", "--out", rep)
    assert r.exit_code == 0, r.output
    expected = mean_precision_at_k(emb[q], df["label"][q], emb[~q], df["label"][~q])
    assert json.loads((rep / "results.json").read_text())["mP@5"] == pytest.approx(expected, abs=1e-12)
    assert (rep / "report.html").is_file() and (rep / "per_domain.png").is_file()


def test_evaluate_embeds_a_folder_on_the_fly(labelled_folder, model_file, tmp_path):
    r = run("evaluate", "--query", labelled_folder, "--index", labelled_folder, "--model", model_file,
            "--exclude-missing", "--no-progress")
    assert r.exit_code == 0, r.output
    score = json.loads(r.stdout.strip().splitlines()[-1])["mP@5"]
    assert 0 <= score <= 1


def test_evaluate_usage_errors(tmp_path, labelled_folder, model_file):
    emb_file = _emb_with_domain(labelled_folder, model_file, tmp_path)
    r = run("evaluate", emb_file)
    assert r.exit_code == 2 and "--folds-by" in r.stderr
    r = run("evaluate")
    assert r.exit_code == 2 and "--query and --index" in r.stderr
    r = run("evaluate", emb_file, "--folds-by", "vendor")
    assert r.exit_code == 2 and "no column 'vendor'" in r.stderr
    r = run("evaluate", "--query", emb_file, "--index", tmp_path / "missing.parquet")
    assert r.exit_code == 2 and "missing.parquet" in r.stderr


@pytest.mark.parametrize("case", ["empty index", "index without rows after --where", "corrupt Parquet",
                                  "embedding column of strings"])
def test_evaluate_input_errors_are_one_line_naming_the_file(case, tmp_path, labelled_folder, model_file):
    """Each was a traceback (IndexError in the metric, pyarrow's error without the file name, AttributeError)."""
    import pyarrow.parquet as pq

    emb_file = _emb_with_domain(labelled_folder, model_file, tmp_path)
    bad, extra = tmp_path / "bad.parquet", []
    if case == "empty index":
        pq.write_table(pq.read_table(emb_file).slice(0, 0), bad)
        expected = "bad.parquet: holds no embeddings (0 rows)"
    elif case == "index without rows after --where":
        bad, extra, expected = emb_file, ["--where", "domain=none"], "no rows left after filtering with domain=none"
    elif case == "corrupt Parquet":
        bad.write_bytes(b"PAR1 this is not really parquet")
        expected = "bad.parquet: cannot read Parquet"
    else:
        pd.DataFrame({"path": ["a.png"], "label": ["x"], "embedding": ["not a vector"]}).to_parquet(bad)
        expected = "bad.parquet: 'embedding' does not hold vectors"
    r = run("evaluate", "--query", emb_file, "--index", bad, *extra)
    assert r.exit_code == 2, r.output
    assert expected in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_cli_help_does_not_import_torch():
    """`guie --help` and `import guie` stay light (torch alone takes seconds to import); models load on first use."""
    import subprocess
    import sys

    code = ("import sys, guie, guie.cli; assert 'torch' not in sys.modules, 'torch imported'; "
            "guie.create_embedder; assert 'torch' in sys.modules")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-1500:]


def test_embed_dim_heads_are_seeded_so_runs_agree_and_resume(labelled_folder, tmp_path, monkeypatch):
    """A fresh head (--embed-dim) is initialised from --seed: an interrupted run resumes (it was refused: 'parts holds
    finished shards of another model') and ends with the vectors of an uninterrupted run; another seed, another
    head."""
    import timm
    import torch

    import guie.pipeline.datasets as datasets_mod
    from guie.models import create_embedder
    from guie.pipeline.datasets import transform_file

    heads = [create_embedder("timm:test_efficientnet", pretrained=False, embed_dim=8, seed=s).head.proj.weight
             for s in (0, 0, 1)]
    assert torch.equal(heads[0], heads[1]) and not torch.equal(heads[0], heads[2])
    torch.save(timm.create_model("test_efficientnet", pretrained=False).state_dict(), tmp_path / "w.pth")
    args = ["--model", f"timm:test_efficientnet:{tmp_path / 'w.pth'}", "--embed-dim", 8, "--image-size", 32,
            "--no-progress", "--shard-size", 4, "--batch-size", 2]
    assert run("embed", labelled_folder, "-o", tmp_path / "a.parquet", *args).exit_code == 0
    paths = sorted(str(p) for p in labelled_folder.rglob("*.png"))

    def interrupt(transform, path, *args, **kwargs):
        if str(path) == paths[6]:
            raise KeyboardInterrupt
        return transform_file(transform, path, *args, **kwargs)

    monkeypatch.setattr(datasets_mod, "transform_file", interrupt)
    assert run("embed", labelled_folder, "-o", tmp_path / "b.parquet", *args).exit_code != 0
    assert list((tmp_path / "b.parquet.parts").glob("part-*.parquet"))  # finished shards were kept
    monkeypatch.setattr(datasets_mod, "transform_file", transform_file)
    r = run("embed", labelled_folder, "-o", tmp_path / "b.parquet", *args)
    assert r.exit_code == 0, r.output
    assert np.array_equal(read_embeddings(tmp_path / "b.parquet")[1], read_embeddings(tmp_path / "a.parquet")[1])


def test_embed_folder_embeds_or_reports_every_file(mode_images, model_file, tmp_path, caplog):
    """An SVG in a folder used to vanish without a word; now every file is embedded or reported, and counted."""
    folder = tmp_path / "imgs"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.png").write_bytes(mode_images["rgb"].with_suffix(".jpg").read_bytes())
    (folder / "sub" / "b.jpg").write_bytes(mode_images["rgb"].read_bytes())
    (folder / "logo.svg").write_text('<svg xmlns="http://www.w3.org/2000/svg" width="8" height="8"/>')
    (folder / "notes.txt").write_text("not a picture")
    out = tmp_path / "emb.parquet"
    r = run("embed", folder, "-o", out, "--model", model_file, "--no-progress")
    assert r.exit_code == 0, r.output
    assert "wrote 2 embeddings" in r.stdout
    assert any(m.startswith(f"skipped {folder / 'logo.svg'}: SVG is a vector format") for m in caplog.messages)
    assert "left out 1 files that are not images (notes.txt)" in r.stderr
    assert f"{folder}: 4 files: 2 embedded, 1 unreadable, 1 not images" in r.stderr
    failed = pd.read_csv(f"{out}.failed.csv")["error"].tolist()
    assert len(failed) == 1 and failed[0].startswith(f"{folder / 'logo.svg'}: SVG is a vector format")


def test_svg_listed_in_a_manifest_is_reported_as_svg(tmp_path):
    from guie.imaging.io import ImageLoadError, load_image

    for name in ("drawing.svg", "drawing-without-suffix.png"):
        (tmp_path / name).write_text('<?xml version="1.0"?>\n<svg xmlns="http://www.w3.org/2000/svg"/>')
        with pytest.raises(ImageLoadError, match=f"{name}: SVG is a vector format"):
            load_image(tmp_path / name)
