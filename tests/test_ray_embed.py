"""`guie embed --ray` on a local Ray cluster (one per module, 2 CPUs): the Ray job writes local `guie embed`'s
output (same rows, metadata, failure records, fingerprint; the vectors bit for bit on CPU with one thread per
forward and batches cut alike, i.e. a batch size dividing the shard size: otherwise float sums differ, 3e-8 in a
trial), survives a killed model actor and a driver killed -9 (every row exactly once), and its output bulk-loads
into faiss and Milvus Lite with the top 5 of indexing the images directly."""
from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from conftest import write_labelled_folder
from guie.cli import app
from guie.embedding.files import embeddings_fingerprint, read_embeddings
from test_index_bulk import assert_same_top5_as_direct, milvus_imported_outside_cli_runner  # noqa: F401

ray = pytest.importorskip("ray")
KILLER = str(Path(__file__).with_name("kill_points.py"))
RAY_ARGS = ["--ray", "auto", "--actors", "1", "--cpus-per-actor", "1", "--no-progress", "--batch-size", "2",
            "--shard-size", "4"]


def patient_ray_start() -> None:
    """Give Ray's GCS server 2 minutes to start instead of 30 s: on a loaded 2-core machine it took longer."""
    os.environ.setdefault("RAY_gcs_server_port_wait_time_s", "120")


@pytest.fixture(scope="module")
def cluster():
    """One local Ray cluster for the module (2 CPUs: one decoding task and one model actor at a time)."""
    patient_ray_start()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    """36 images in class folders + 1 unreadable file, a tiny saved model, and local `guie embed` of the folder."""
    from guie.models import create_embedder, save_embedder

    root = tmp_path_factory.mktemp("ray")
    folder = write_labelled_folder(root / "imgs", classes=12)
    (folder / "class3" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    model = save_embedder(create_embedder("timm:test_efficientnet", embed_dim=8, pretrained=False, image_size=32),
                          root / "tiny.pt")
    local = root / "local.parquet"
    r = CliRunner().invoke(app, ["embed", str(folder), "-o", str(local), "--model", str(model), "--no-progress",
                                 "--batch-size", "2", "--shard-size", "4"])
    assert r.exit_code == 0, r.output
    return {"root": root, "folder": folder, "model": model, "local": local}


def assert_same_as_local(out: Path, local: Path) -> None:
    """Every row of the local output once, same order and metadata, the same vectors bit for bit, same failures."""
    df, emb = read_embeddings(out)
    ref_df, ref = read_embeddings(local)
    pd.testing.assert_frame_equal(df, ref_df)
    assert df["path"].is_unique and len(df) == 36
    np.testing.assert_array_equal(emb, ref)
    failed = pd.read_csv(out.with_name(out.name + ".failed.csv"))["error"].tolist()
    assert failed == pd.read_csv(local.with_name(local.name + ".failed.csv"))["error"].tolist()
    assert len(failed) == 1 and "broken.png" in failed[0]
    assert embeddings_fingerprint(out) == embeddings_fingerprint(local) is not None
    assert not out.with_name(out.name + ".parts").exists()


def test_ray_job_writes_the_local_output_and_bulk_loads_like_the_images(cluster, job, tmp_path):
    out = tmp_path / "ray.parquet"
    r = CliRunner().invoke(app, ["embed", str(job["folder"]), "-o", str(out), "--model", str(job["model"]),
                                 *RAY_ARGS])
    assert r.exit_code == 0, r.output
    assert "wrote 36 embeddings of dim 8" in r.stdout and "1 unreadable" in r.stderr
    assert_same_as_local(out, job["local"])
    for backend in ("faiss", "milvus"):
        assert_same_top5_as_direct(job["folder"], job["model"], out, tmp_path, backend)


def _actor_pids(since: float = 0.0) -> list[int]:
    """PIDs of the model actors (Ray names their processes after the class) started after `since` (epoch s)."""
    import psutil

    return [p.pid for p in psutil.process_iter(["cmdline", "create_time"])
            if any("EmbedBatches" in part for part in (p.info["cmdline"] or [])) and p.info["create_time"] >= since]


@pytest.mark.slow
def test_a_killed_model_actor_is_replaced_and_every_row_lands_once(cluster, job, tmp_path):
    from guie.data.manifest import read_manifest
    from guie.embedding.ray_embed import embed_with_ray
    from guie.models import load_embedder

    killed, started = [], time.time() - 1  # actors of earlier jobs may still be shutting down: only this job's

    def kill_the_actor(done: int) -> None:
        if not killed:
            pids = _actor_pids(since=started)
            assert len(pids) == 1 and done < 37, (pids, done)  # one actor, rows still to embed
            os.kill(pids[0], 9)
            killed.append((pids[0], done))

    out = tmp_path / "killed.parquet"
    df = read_manifest(job["folder"])
    embed_with_ray(load_embedder(job["model"]), df, out, batch_size=2, shard_size=4, actors=1, progress=False,
                   on_batch=kill_the_actor)
    assert killed and killed[0][0] not in _actor_pids()
    assert_same_as_local(out, job["local"])


@pytest.mark.slow
def test_a_driver_killed_9_mid_run_resumes_every_row_once(cluster, job, tmp_path, caplog):
    out = tmp_path / "driver.parquet"
    cmd = [sys.executable, KILLER, "embed", str(job["folder"]), "-o", str(out), "--model", str(job["model"]),
           *RAY_ARGS]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "RAY_ADDRESS": cluster, "KILL_AFTER_PARTS": "3"}
    killed = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert killed.returncode == -9, killed.stderr[-3000:]
    parts = out.with_name(out.name + ".parts")
    assert len(list(parts.glob("part-*.parquet"))) == 3 and not out.exists()
    caplog.set_level(logging.INFO, logger="guie")
    r = CliRunner().invoke(app, cmd[2:])  # the same command, in this process (joined to the same cluster)
    assert r.exit_code == 0, r.output
    assert any("3/10 shards already done" in m for m in caplog.messages), caplog.messages
    assert_same_as_local(out, job["local"])


def test_ray_settings_that_cannot_run_are_one_line_errors(job, tmp_path):
    base = ["embed", str(job["folder"]), "-o", str(tmp_path / "x.parquet"), "--model", str(job["model"]), "--ray",
            "auto"]
    for extra, says in ((["--actors", "0"], "actors must be >= 1"), (["--cpus-per-actor", "0"], "must be > 0"),
                        (["--decode", "gpu"], "--ray decodes in CPU tasks")):
        r = CliRunner().invoke(app, [*base, *extra])
        assert r.exit_code == 2 and r.stderr.count("\n") == 1 and says in r.stderr, r.output
    assert not (tmp_path / "x.parquet.parts").exists()
