"""`guie embed --shard i/N` as N independent processes writing one output, and `guie embed --merge`: a killed
shard is rerun, the merge finds every row exactly once (and refuses while rows are missing)."""
from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from guie.cli import app
from guie.embedding.files import (
    EmbeddingParts,
    IncompleteError,
    embeddings_fingerprint,
    merge_parts,
    parse_shard,
    read_embeddings,
)
from guie.models import load_embedder, save_embedder
from train_fixtures import make_labelled_images

KILLER = str(Path(__file__).with_name("kill_points.py"))


@pytest.fixture(scope="module")
def shard_job(tmp_path_factory):
    """18 images + 1 unreadable row, a tiny saved model, and the single-process `guie embed` of them."""
    from guie.models import create_embedder

    root = tmp_path_factory.mktemp("shards")
    manifest = make_labelled_images(root / "imgs", n_classes=6, per_class=3, size=40)
    df = pd.read_csv(manifest)
    df["path"] = [str(root / "imgs" / p) for p in df["path"]]
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    df = pd.concat([df.iloc[:7], pd.DataFrame([{"path": str(root / "broken.png"), "label": "x", "domain": "d",
                                                "vendor": "v", "split": "test"}]), df.iloc[7:]], ignore_index=True)
    df.to_csv(root / "m.csv", index=False)
    model = save_embedder(create_embedder("timm:test_efficientnet", embed_dim=8, pretrained=False, image_size=32),
                          root / "tiny.pt")
    local = root / "local.parquet"
    r = CliRunner().invoke(app, ["embed", str(root / "m.csv"), "-o", str(local), "--model", str(model),
                                 "--no-progress", "--shard-size", "2"])
    assert r.exit_code == 0, r.output
    return {"root": root, "manifest": root / "m.csv", "model": model, "local": local, "df": df}


def _shard_cmd(job, out, shard):
    return [sys.executable, KILLER, "embed", str(job["manifest"]), "-o", str(out), "--model", str(job["model"]),
            "--no-progress", "--shard-size", "2", "--batch-size", "2", "--shard", shard]


@pytest.mark.slow
def test_three_shard_processes_one_killed_and_rerun_merge_every_row_once(shard_job, tmp_path, caplog):
    out = tmp_path / "sharded.parquet"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    # shard 1/3 owns parts 1, 4, 7 (rows 2-3, 8-9, 14-15): killed -9 right after it wrote part 1
    procs = [subprocess.Popen(_shard_cmd(shard_job, out, f"{i}/3"), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env={**env, "KILL_AFTER_PARTS": "1"} if i == 1 else env) for i in range(3)]
    results = [(p.wait(timeout=300), *p.communicate()) for p in procs]
    assert results[0][0] == 0 and results[2][0] == 0, results[0][2][-2000:] + results[2][2][-2000:]
    assert results[1][0] == -9
    parts = out.with_name(out.name + ".parts")
    assert sorted(p.name for p in parts.glob("part-*.parquet")) == [
        f"part-{s:06d}.parquet" for s in (0, 1, 2, 3, 5, 6, 8, 9)]

    r = CliRunner().invoke(app, ["embed", "--merge", str(out)])  # refused: rows 8-9 and 14-15 are missing
    assert r.exit_code != 0 and not out.exists()
    assert r.stderr.count("\n") == 1 and "4 of 19 rows missing, 0 duplicated, in shards 4, 7" in r.stderr

    caplog.set_level(logging.INFO, logger="guie")
    rerun = CliRunner().invoke(app, _shard_cmd(shard_job, out, "1/3")[2:])  # the same command, in this process
    assert rerun.exit_code == 0, rerun.output
    assert any("1/3 shards already done" in m for m in caplog.messages), caplog.messages  # part 1 was kept
    r = CliRunner().invoke(app, ["embed", "--merge", str(out)])
    assert r.exit_code == 0, r.output
    assert "merged" in r.stdout and "19 rows, 18 embedded, 1 unreadable" in r.stdout
    assert not parts.exists()

    df, emb = read_embeddings(out)
    ref_df, ref = read_embeddings(shard_job["local"])
    pd.testing.assert_frame_equal(df, ref_df)  # every row once, in manifest order, with its metadata
    assert df["path"].is_unique and len(df) == 18
    np.testing.assert_allclose(emb, ref, atol=1e-6)
    failed = pd.read_csv(out.with_name(out.name + ".failed.csv"))["error"].tolist()
    assert len(failed) == 1 and failed[0].startswith(str(shard_job["root"] / "broken.png"))
    assert embeddings_fingerprint(out) == load_embedder(shard_job["model"]).fingerprint()


def test_merge_reports_duplicated_and_foreign_rows(shard_job, tmp_path):
    out = tmp_path / "dup.parquet"
    for i in range(2):
        r = CliRunner().invoke(app, ["embed", str(shard_job["manifest"]), "-o", str(out), "--model",
                                     str(shard_job["model"]), "--no-progress", "--shard-size", "5",
                                     "--shard", f"{i}/2"])
        assert r.exit_code == 0, r.output
    parts = out.with_name(out.name + ".parts")
    first = (parts / "part-000000.parquet").read_bytes()
    (parts / "part-000001.parquet").write_bytes(first)  # part 1 holds part 0's rows
    # part 1 should hold rows 5-9: 4 embedded (row 7 is unreadable, in its failure records) are missing, and part
    # 0's 5 rows are there twice
    with pytest.raises(IncompleteError, match=r"4 of 19 rows missing, 5 duplicated, in shards 1;"):
        merge_parts(out)
    assert not out.exists() and parts.exists()  # nothing merged, nothing deleted


def test_shard_option_is_checked():
    assert parse_shard("2/3") == (2, 3)
    for bad in ("3/3", "1", "-1/2", "a/b", "1/0"):
        with pytest.raises(ValueError, match="shard"):
            parse_shard(bad)
    assert EmbeddingParts.todo.__doc__  # the partition is documented where it is defined


def test_merge_of_nothing_names_the_output(tmp_path):
    r = CliRunner().invoke(app, ["embed", "--merge", str(tmp_path / "none.parquet")])
    assert r.exit_code == 2 and "none.parquet.parts/meta.json: embedding parts" in r.stderr


def test_part_writer_keeps_the_first_copy_of_a_row_and_writes_each_part_once(tiny_embedder, tmp_path):
    from guie.embedding.files import PartWriter, plan_parts

    df = pd.DataFrame({"path": [f"img{i}.png" for i in range(5)]})
    plan = plan_parts(tiny_embedder(), df, tmp_path / "o.parquet", part_size=2)
    writer = PartWriter(plan, plan.todo(), dim=2)
    vec = lambda *v: np.array(v, np.float32)  # noqa: E731
    writer.add(np.array([0]), vec([1, 1]))
    writer.add(np.array([0, 1]), vec([9, 9], [2, 2]))  # row 0 again (a retried batch): the first copy stays
    assert plan.part(0).exists() and writer.unfinished() == [1, 2]
    writer.add(np.array([1, 2]), vec([7, 7], [3, 3]))  # part 0 is written: its late copy is ignored
    writer.add(np.array([3]), vec([4, 4]), failures=[(4, "img4.png: unreadable"), (3, "img3.png: twice")])
    assert writer.unfinished() == [] and writer.written == 3
    rep = merge_parts(plan.out_path)
    assert (rep.rows, rep.embedded, rep.failed) == (5, 4, 1)
    out, emb = read_embeddings(plan.out_path)
    assert out["path"].tolist() == [f"img{i}.png" for i in range(4)]
    np.testing.assert_array_equal(emb, vec([1, 1], [2, 2], [3, 3], [4, 4]))
