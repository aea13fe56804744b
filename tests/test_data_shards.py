"""Tar shards: atomic/resumable writing, random access through shard references, streaming, CLI use."""
from __future__ import annotations

import json
import os
import tarfile

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader
from typer.testing import CliRunner

import data_fixtures as fx
from guie.cli import app
from guie.data.dedup import file_digests
from guie.data.manifest import read_manifest
from guie.data.shards import INDEX_FILE, ShardConfig, ShardError, ShardStream, list_shards, scan_shard, write_shards
from guie.data.validate import check_manifest
from guie.imaging.io import ImageLoadError, load_image, parse_shard_ref


@pytest.fixture()
def manifest(tmp_path):
    rows = []
    for i in range(11):
        p = fx.make_image(tmp_path / "src" / f"c{i % 3}" / f"{i}.{'png' if i % 2 else 'jpg'}", seed=i, size=(48, 40))
        rows.append((str(p), f"c{i % 3}", "toys" if i < 6 else "cars", i * 10))
    return pd.DataFrame(rows, columns=["path", "label", "domain", "extra"])


def test_write_and_random_access(manifest, tmp_path):
    out = tmp_path / "shards"
    res = write_shards(manifest, out, ShardConfig(shard_size=4), workers=2, progress=False)
    assert res.written == 3 and res.resumed == 0 and not res.errors
    assert sorted(p.name for p in out.glob("*.tar")) == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    assert not list(out.glob(".*.tmp"))
    # index offsets are the real tar data offsets
    scanned = {name: (off, size) for sh in out.glob("*.tar") for name, off, size in scan_shard(sh)}
    for row in res.index.itertuples():
        assert scanned[row.member] == (row.offset, row.size)
    df = read_manifest(out)
    assert len(df) == 11 and df["label"].tolist() == manifest["label"].tolist()
    assert df["source"].tolist() == manifest["path"].tolist() and df["extra"].tolist() == manifest["extra"].tolist()
    for ref, src in zip(df["path"], manifest["path"]):
        assert parse_shard_ref(ref) is not None
        assert np.array_equal(np.asarray(load_image(ref)), np.asarray(load_image(src)))  # bytes copied as they were
    assert len(read_manifest(out / INDEX_FILE)) == 11                                     # the index file itself
    # members are <key>.<ext> + <key>.json with the manifest's columns
    with tarfile.open(out / "shard-000000.tar") as tar:
        names = tar.getnames()
        meta = json.loads(tar.extractfile("000000001.json").read())
    assert names[:4] == ["000000000.jpg", "000000000.json", "000000001.png", "000000001.json"]
    assert meta == {"label": "c1", "domain": "toys", "extra": 10, "source": manifest["path"][1]}


def test_shard_refs_work_for_check_and_dedup(manifest, tmp_path):
    write_shards(manifest, tmp_path / "s", ShardConfig(shard_size=5), workers=1, progress=False)
    df = read_manifest(tmp_path / "s")
    assert check_manifest(df, workers=1, progress=False).n_bad == 0
    assert file_digests(df["path"], workers=1) == file_digests(manifest["path"], workers=1)


def test_bad_shard_ref_is_a_clear_error(manifest, tmp_path):
    write_shards(manifest, tmp_path / "s", ShardConfig(shard_size=50), workers=1, progress=False)
    ref = parse_shard_ref(read_manifest(tmp_path / "s")["path"].iloc[-1])
    size = os.path.getsize(ref.tar)
    with pytest.raises(ImageLoadError, match="shard ends early"):
        load_image(f"{ref.tar}#{size - 10}:{ref.size}:{ref.name}")
    with pytest.raises(ImageLoadError, match="file not found"):
        load_image(f"{tmp_path}/nope.tar#0:10:x.jpg")


def test_resume_after_interruption(manifest, tmp_path):
    out = tmp_path / "shards"
    cfg = ShardConfig(shard_size=4)
    write_shards(manifest, out, cfg, workers=1, progress=False)
    first = out / "shard-000000.tar"
    stamp = first.stat().st_mtime_ns
    # as if killed while writing the last shard: no final shard, a temp file, no index
    (out / "shard-000002.tar").rename(out / ".shard-000002.tar.tmp")
    (out / INDEX_FILE).unlink()
    res = write_shards(manifest, out, cfg, workers=1, progress=False)
    assert res.written == 1 and res.resumed == 2
    assert first.stat().st_mtime_ns == stamp and not list(out.glob(".*.tmp"))
    assert len(read_manifest(out)) == 11
    with pytest.raises(ShardError, match="another manifest"):
        write_shards(manifest.iloc[:5], out, cfg, workers=1, progress=False)
    res = write_shards(manifest.iloc[:5], out, cfg, workers=1, progress=False, overwrite=True)
    assert res.written == 2 and len(read_manifest(out)) == 5 and not (out / "shard-000002.tar").exists()


def test_reencode_shuffle_and_unreadable(manifest, tmp_path):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8 not really")
    df = pd.concat([manifest, pd.DataFrame([{"path": str(bad), "label": "c0", "domain": "toys", "extra": 0}])],
                   ignore_index=True)
    res = write_shards(df, tmp_path / "s", ShardConfig(shard_size=5, image_format="webp", max_side=24,
                                                       shuffle=True, seed=3), workers=2, progress=False)
    assert len(res.errors) == 1 and str(bad) in res.errors[0]
    failed = [json.loads(p.read_text()) for p in (tmp_path / "s").glob("*.failed.json")]
    assert failed == [res.errors]                                        # kept for a resumed run's report
    got = read_manifest(tmp_path / "s")
    assert len(got) == 11 and set(got["source"]) == set(manifest["path"])
    assert got["source"].tolist() != manifest["path"].tolist()          # shuffled
    im = load_image(got["path"].iloc[0])
    assert max(im.size) == 24 and got["path"].iloc[0].endswith(".webp")
    with pytest.raises(ValueError, match="re-encoding"):
        ShardConfig(max_side=100)


def test_stream_reads_every_sample_once(manifest, tmp_path):
    write_shards(manifest, tmp_path / "s", ShardConfig(shard_size=3), workers=1, progress=False)
    urls = list_shards(tmp_path / "s")
    assert len(urls) == 4 and list_shards(str(tmp_path / "s" / "shard-00000[01].tar")) == urls[:2]
    plain = list(ShardStream(tmp_path / "s"))
    assert [s["key"] for s in plain] == [f"{i:09d}" for i in range(11)]
    assert isinstance(plain[0]["image"], Image.Image) and plain[1]["label"] == "c1"
    tf = lambda im: torch.from_numpy(np.array(im.resize((8, 8)))).permute(2, 0, 1)  # noqa: E731
    ds = ShardStream(urls, transform=tf, shuffle_buffer=4, seed=1)
    loader = DataLoader(ds, batch_size=None, num_workers=2)
    keys = [s["key"] for s in loader]
    assert sorted(keys) == [f"{i:09d}" for i in range(11)]          # shards split across workers, no repeats
    ds.set_epoch(1)
    assert [s["key"] for s in ds] != [s["key"] for s in ShardStream(urls, shuffle_buffer=4, seed=1)]


def test_webdataset_reads_our_shards(manifest, tmp_path):
    wds = pytest.importorskip("webdataset")
    write_shards(manifest, tmp_path / "s", ShardConfig(shard_size=6), workers=1, progress=False)
    samples = list(wds.WebDataset(list_shards(tmp_path / "s"), shardshuffle=False).decode("pil"))
    assert len(samples) == 11 and samples[0]["json"]["label"] == "c0"


def test_guie_embed_accepts_a_shard_folder(manifest, tmp_path):
    from guie.embedding.engine import embed_images
    from guie.embedding.files import read_embeddings
    from guie.models.embedder import create_embedder, save_embedder

    tiny = create_embedder("timm:resnet18", embed_dim=16, pretrained=False, image_size=32).eval()
    ckpt = save_embedder(tiny, tmp_path / "tiny.pt")
    write_shards(manifest, tmp_path / "s", ShardConfig(shard_size=4), workers=1, progress=False)
    out = tmp_path / "from_shards.parquet"
    r = CliRunner().invoke(app, ["embed", str(tmp_path / "s"), "--out", str(out), "--model", str(ckpt),
                                 "--workers", "1"])
    assert r.exit_code == 0, r.output
    meta, emb = read_embeddings(out)
    assert len(meta) == 11 and meta["path"].str.contains(r"\.tar#").all()
    assert meta["source"].tolist() == manifest["path"].tolist()
    ref = embed_images(tiny, manifest["path"].tolist(), num_workers=0, progress=False).embeddings
    assert np.allclose(emb, ref, atol=1e-5)                 # same pixels from the tar as from the files


def test_cli_shard(manifest, tmp_path):
    m = tmp_path / "m.csv"
    manifest.to_csv(m, index=False)
    r = CliRunner().invoke(app, ["data", "shard", str(m), str(tmp_path / "s"), "--shard-size", "5", "--no-progress",
                                 "--workers", "1"])
    assert r.exit_code == 0, r.output
    assert "11 images in 3 shards (3 written, 0 already done)" in r.output
    r = CliRunner().invoke(app, ["data", "shard", str(m), str(tmp_path / "s"), "--shard-size", "5", "--no-progress",
                                 "--workers", "1"])
    assert "(0 written, 3 already done)" in r.output
    r = CliRunner().invoke(app, ["data", "shard", str(m), str(tmp_path / "s2"), "--format", "gif"])
    assert r.exit_code == 2 and "image_format" in r.output


def test_training_data_reads_a_shard_folder(manifest, tmp_path):
    from guie.train.data import load_training_dataset
    from guie.train.recipe import DatasetConfig

    write_shards(manifest, tmp_path / "s", ShardConfig(shard_size=4), workers=1, progress=False)
    df = load_training_dataset("toys", DatasetConfig(manifest=str(tmp_path / "s")), None, 0)
    assert len(df) == 11 and df["label"].str.startswith("toys/").all()
    images = [load_image(p) for p in df["path"]]                    # what the training dataset decodes
    assert all(im.size == (48, 40) for im in images)
