"""Batch embedding: pipeline equals the model, bad files skipped and counted, resumable sharded output."""
from __future__ import annotations

import io
import os
import platform
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import guie.pipeline.datasets as datasets_mod
from guie.embedding.engine import _forward, embed_images, iter_embeddings
from guie.embedding.files import EMBEDDING_COLUMN, ResumeError, embed_to_file, read_embeddings
from guie.imaging.io import load_image
from guie.pipeline.datasets import transform_file


class Interrupted(BaseException):
    """Stands for Ctrl-C / a killed job (BaseException: the dataset's per-image error handling must not eat it)."""


def _quiet(_msg):
    pass


def test_pipeline_equals_the_model_on_every_mode(tiny_embedder, mode_images):
    e = tiny_embedder()
    paths = [str(p) for p in mode_images.values()]
    res = embed_images(e, paths, batch_size=4, progress=False)
    assert res.ok.all() and res.errors == []
    assert res.embeddings.shape == (len(paths), 8) and res.embeddings.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(res.embeddings, axis=1), 1.0, rtol=1e-5)
    x = torch.stack([e.transform.load(p) for p in paths])
    with torch.inference_mode():
        expected = e(x).numpy()
    np.testing.assert_allclose(res.embeddings, expected, atol=1e-5)


def test_bad_files_are_skipped_one_line_each_and_counted(tiny_embedder, mode_images, bad_files, caplog):
    paths = [str(mode_images["rgb"])] + [str(p) for p in bad_files.values()] + [str(mode_images["gray"])]
    res = embed_images(tiny_embedder(), paths, batch_size=3, progress=False)
    assert res.ok.tolist() == [True] + [False] * len(bad_files) + [True]
    assert len(res.embeddings) == 2 and len(res.errors) == len(bad_files)
    lines = [r.getMessage() for r in caplog.records if r.name == "guie"]  # logged, one line each
    assert len(lines) == len(bad_files) and all("\n" not in line for line in lines)
    for path in bad_files.values():
        assert sum(line.startswith(f"skipped {path}: ") for line in lines) == 1
    assert any("decompression bomb" in line for line in lines)


def test_decoders_and_worker_layouts_agree(tiny_embedder, mode_images, bad_files):
    paths = [str(p) for p in mode_images.values()] + [str(bad_files["truncated"]), str(bad_files["bomb"])]
    e = tiny_embedder()
    ref = embed_images(e, paths, batch_size=5, progress=False, report_failure=_quiet)
    for kw in ({"num_workers": 2}, {"num_workers": 2, "batch_size": 4}, {"num_workers": 0, "batch_size": 1},
               {"decode": "gpu"}, {"decode": "gpu", "num_workers": 2, "batch_size": 2}):
        kw = {"batch_size": 5, **kw}
        got = embed_images(e, paths, progress=False, report_failure=_quiet, **kw)
        assert (got.ok == ref.ok).all(), kw
        # decode="gpu" (on this CPU: torchvision's decoder and tensor resize) matches PIL closely, not bitwise
        tol = 2e-2 if kw.get("decode") == "gpu" else 1e-6
        np.testing.assert_allclose(got.embeddings, ref.embeddings, atol=tol, err_msg=str(kw))


def test_loader_split_divides_the_model_batch_among_workers():
    from guie.embedding.engine import loader_split

    assert loader_split(256, 16) == 8 and loader_split(256, 3) == 2 and loader_split(64, 0) == 1
    assert loader_split(5, 4) == 1 and loader_split(6, 4) == 3 and loader_split(1, 8) == 1


def test_iter_embeddings_covers_every_position_in_order(tiny_embedder, mode_images, bad_files):
    paths = [str(bad_files["empty"])] + [str(p) for p in mode_images.values()] + [str(bad_files["corrupt"])]
    seen = []
    for b in iter_embeddings(tiny_embedder(), paths, batch_size=4, progress=False, report_failure=_quiet):
        seen += sorted(list(b.indices) + [i for i, _ in b.failed])
        assert b.embeddings.shape[0] == len(b.indices)
    assert seen == list(range(len(paths)))


def test_features_mode_empty_input_and_mode_restored(tiny_embedder, mode_images, bad_files):
    e = tiny_embedder().train()
    res = embed_images(e, [str(mode_images["rgb"])], features=True, progress=False)
    assert res.embeddings.shape == (1, e.backbone.num_features)
    assert e.training  # embed_images evaluates in eval mode but gives the model back as it was
    empty = embed_images(e, [], progress=False)
    assert empty.embeddings.shape == (0, 8) and empty.ok.shape == (0,)
    failed = embed_images(e, [str(bad_files["empty"])], progress=False, report_failure=_quiet)
    assert failed.embeddings.shape == (0, 8) and failed.ok.tolist() == [False]


def test_cpu_decodes_in_the_main_process(tiny_embedder, mode_images, tmp_path, monkeypatch):
    """On a CPU, worker processes would fight the forward's threads for the cores: by default every image is
    decoded in the calling process, between forwards."""
    record = tmp_path / "pids.txt"

    def recording(transform, path, *a, **kw):
        with open(record, "a") as f:  # a file: a worker process's list would never reach this one
            f.write(f"{os.getpid()}\n")
        return transform_file(transform, path, *a, **kw)

    monkeypatch.setattr(datasets_mod, "transform_file", recording)
    paths = [str(p) for p in mode_images.values()]
    res = embed_images(tiny_embedder(), paths, batch_size=2, device="cpu", progress=False)
    assert res.ok.all()
    assert record.read_text().split() == [str(os.getpid())] * len(paths)


def test_padding_for_compiled_batches_does_not_change_outputs(tiny_embedder):
    e = tiny_embedder()
    x = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8)
    torch.testing.assert_close(_forward(e, x, torch.device("cpu"), 8), _forward(e, x, torch.device("cpu"), 0))
    assert _forward(e, x, torch.device("cpu"), 8).shape == (3, 8)


# --- embed_to_file ---------------------------------------------------------------------------------------------

def _manifest(mode_images, bad_files=None, n=None) -> pd.DataFrame:
    paths = [str(p) for p in mode_images.values()][:n]
    if bad_files:
        paths.insert(2, str(bad_files["truncated"]))
    return pd.DataFrame({"path": paths, "label": [f"c{i % 3}" for i in range(len(paths))],
                         "domain": ["photo", "art"] * (len(paths) // 2) + ["photo"] * (len(paths) % 2),
                         "score": np.arange(len(paths), dtype=float),
                         "note": [None] * 4 + ["x"] * (len(paths) - 4)})  # null in the first shard only


def test_embed_to_file_keeps_columns_and_lists_failures(tiny_embedder, mode_images, bad_files, tmp_path):
    df = _manifest(mode_images, bad_files)
    out = tmp_path / "emb.parquet"
    kept, emb, errors = embed_to_file(tiny_embedder(), df, out, batch_size=3, shard_size=4, progress=False,
                                      report_failure=_quiet)
    assert len(errors) == 1 and errors[0].startswith(str(bad_files["truncated"]))
    good = df[df["path"] != str(bad_files["truncated"])].reset_index(drop=True)
    back_df, back_emb = read_embeddings(out)
    assert list(back_df.columns) == ["path", "label", "domain", "score", "note"]
    pd.testing.assert_frame_equal(back_df, good, check_dtype=False)
    np.testing.assert_array_equal(back_emb, emb)
    assert back_emb.shape == (len(good), 8)
    ref = embed_images(tiny_embedder(), good["path"].tolist(), progress=False).embeddings
    np.testing.assert_allclose(back_emb, ref, atol=1e-6)
    failed_csv = pd.read_csv(tmp_path / "emb.parquet.failed.csv")
    assert failed_csv["error"].tolist() == errors
    assert not (tmp_path / "emb.parquet.parts").exists()


def test_interrupted_run_resumes_without_redoing_finished_shards(tiny_embedder, mode_images, tmp_path,
                                                                 monkeypatch):
    df = _manifest(mode_images, n=9)
    out = tmp_path / "emb.parquet"
    stop_at = df["path"][5]  # in shard 2 (rows 4..7)
    loaded = []

    def recording_load(transform, path, *a, **kw):
        loaded.append(str(path))
        if str(path) == stop_at and fail[0]:
            raise Interrupted()
        return transform_file(transform, path, *a, **kw)

    monkeypatch.setattr(datasets_mod, "transform_file", recording_load)
    fail = [True]
    with pytest.raises(Interrupted):
        embed_to_file(tiny_embedder(), df, out, batch_size=2, shard_size=4, progress=False, num_workers=0)
    parts = tmp_path / "emb.parquet.parts"
    assert (parts / "part-000000.parquet").exists() and not (parts / "part-000001.parquet").exists()
    assert not out.exists()

    loaded.clear()
    fail[0] = False
    kept, emb, errors = embed_to_file(tiny_embedder(), df, out, batch_size=2, shard_size=4, progress=False,
                                      num_workers=0)
    assert set(loaded) == set(df["path"][4:])  # shard 1 was not recomputed
    assert len(kept) == 9 and errors == []
    straight = tmp_path / "straight.parquet"
    _, ref, _ = embed_to_file(tiny_embedder(), df, straight, batch_size=3, shard_size=100, progress=False)
    np.testing.assert_allclose(emb, ref, atol=1e-6)


def test_resume_refused_with_another_model(tiny_embedder, mode_images, tmp_path, monkeypatch):
    df = _manifest(mode_images, n=6)
    out = tmp_path / "emb.parquet"

    def interrupt_late(transform, path, *a, **kw):
        if str(path) == df["path"][5]:
            raise Interrupted()
        return transform_file(transform, path, *a, **kw)

    monkeypatch.setattr(datasets_mod, "transform_file", interrupt_late)
    with pytest.raises(Interrupted):
        embed_to_file(tiny_embedder(seed=0), df, out, shard_size=2, batch_size=2, progress=False)
    monkeypatch.setattr(datasets_mod, "transform_file", transform_file)
    other = tiny_embedder(seed=1)
    with pytest.raises(ResumeError, match=r"another model or manifest; discard them \(overwrite\)"):
        embed_to_file(other, df, out, shard_size=2, batch_size=2, progress=False)
    with pytest.raises(ResumeError):  # another manifest (a label changed) is refused too
        embed_to_file(tiny_embedder(seed=0), df.assign(label="z"), out, shard_size=2, progress=False)
    _, emb, _ = embed_to_file(other, df, out, shard_size=2, batch_size=2, progress=False, overwrite=True)
    ref = embed_images(other, df["path"].tolist(), progress=False).embeddings
    np.testing.assert_allclose(emb, ref, atol=1e-6)


def test_all_failed_shard_and_reembedding_an_embeddings_file(tiny_embedder, mode_images, bad_files, tmp_path):
    df = pd.DataFrame({"path": [str(bad_files["empty"]), str(bad_files["corrupt"]), str(mode_images["rgb"])]})
    out = tmp_path / "e.parquet"
    kept, emb, errors = embed_to_file(tiny_embedder(), df, out, shard_size=2, progress=False, report_failure=_quiet)
    assert len(kept) == 1 and emb.shape == (1, 8) and len(errors) == 2
    again, _ = read_embeddings(out)
    kept2, emb2, _ = embed_to_file(tiny_embedder(embed_dim=4), again.assign(**{EMBEDDING_COLUMN: [[0.0] * 8]}),
                                   tmp_path / "e2.parquet", progress=False)
    assert emb2.shape == (1, 4) and list(kept2.columns) == ["path"]


def test_embed_to_file_input_errors(tiny_embedder, tmp_path):
    with pytest.raises(ValueError, match="no 'path' column"):
        embed_to_file(tiny_embedder(), pd.DataFrame({"file": ["a"]}), tmp_path / "o.parquet")
    with pytest.raises(ValueError, match="no rows"):
        embed_to_file(tiny_embedder(), pd.DataFrame({"path": []}), tmp_path / "o.parquet")
    with pytest.raises(ValueError, match="decode="):
        embed_images(tiny_embedder(), ["x.jpg"], decode="nvdec")


def test_read_embeddings_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_embeddings(tmp_path / "none.parquet")
    pd.DataFrame({"path": ["a"]}).to_parquet(tmp_path / "m.parquet")
    with pytest.raises(ValueError, match="no 'embedding' column"):
        read_embeddings(tmp_path / "m.parquet")
    (tmp_path / "bad.parquet").write_bytes(b"nope")
    with pytest.raises(ValueError, match="cannot read Parquet"):
        read_embeddings(tmp_path / "bad.parquet")


def test_device_decode_applies_every_exif_orientation(tmp_path):
    """nvJPEG ignores EXIF, so decode='gpu' turns images itself; all 8 orientations must match PIL's."""
    from conftest import write_exif_orientations
    from guie.models.preprocess import ImageTransform, PreprocessConfig
    from guie.pipeline.gpu_decode import EncodedImageDataset, collate_encoded, decode_batch

    cfg = PreprocessConfig(image_size=24, resize_mode="squash")
    paths = write_exif_orientations(tmp_path, 40, 24, seed=9)
    ds = EncodedImageDataset(paths, ImageTransform(cfg))
    idx, payloads, failed = collate_encoded([ds[i] for i in range(8)])
    assert [p[0] for p in payloads] == ["jpeg"] * 8 and [p[2] for p in payloads] == list(range(1, 9))
    got_idx, images, more = decode_batch(idx, payloads, paths, cfg, torch.device("cpu"))
    assert got_idx.tolist() == list(range(8)) and not failed and not more
    for i, p in enumerate(paths):
        ref = ImageTransform(cfg)(load_image(p)).float()
        assert (images[i].float() - ref).abs().mean() < 2.0, f"orientation {i + 1}"


def test_cpu_allocator_tuning_is_idempotent_and_can_be_disabled():
    import subprocess
    import sys

    from guie.runtime import tune_cpu_allocator

    first = tune_cpu_allocator()
    assert tune_cpu_allocator() is first
    if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
        assert first is True
    code = "from guie.runtime import tune_cpu_allocator as t; print(t())"
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, "GUIE_MALLOC_TUNING": "0"},
                         capture_output=True, text=True, check=True).stdout.strip()
    assert out == "False"


_THREAD_FAULTS = """
import resource, sys, threading
import numpy as np
from guie.runtime import tune_cpu_allocator
if sys.argv[1] == "1":
    tune_cpu_allocator()
def work():
    for _ in range(12):  # 96 MB blocks, as a batched forward allocates activations, freed after each round
        a = np.ones(96 << 20, dtype=np.uint8)
        del a
t = threading.Thread(target=work); t.start(); t.join()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
t = threading.Thread(target=work); t.start(); t.join()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_allocator_tuning_keeps_a_threads_freed_memory():
    """Large blocks freed by a thread other than the main one (the server's batching thread) are reused, not
    mapped and page-faulted in again on every forward: one arena under the tuning."""
    import subprocess
    import sys

    def faults(tuned: str) -> int:
        out = subprocess.run([sys.executable, "-c", _THREAD_FAULTS, tuned], capture_output=True, text=True,
                             check=True, env={**os.environ, "GUIE_MALLOC_TUNING": "1"})
        return int(out.stdout.strip())

    untuned, tuned = faults("0"), faults("1")  # counted in pages of 4 KB, or 2 MB where huge pages are on
    assert untuned >= 12 * 24              # every block is faulted in again (at least 24 huge pages per block)
    assert tuned * 20 < untuned            # tuned: the memory stays with the process


def test_images_in_memory_and_augmented_views_go_through_the_same_loop(tiny_embedder, mode_images, tmp_path):
    """embed_decoded (uploads, queries: bytes in memory through the same `ImageTransform.load`) equals embedding the
    files; the feature store's augmented views are reproducible per (seed, view, path) and differ from the clean
    view."""
    from guie.embedding.engine import embed_decoded
    from guie.embedding.feature_store import cached_features

    e = tiny_embedder()
    paths = [str(p) for p in mode_images.values()]
    files = embed_images(e, paths, batch_size=3, progress=False).embeddings
    decoded = embed_decoded(e, [e.transform.load(io.BytesIO(Path(p).read_bytes())) for p in paths], batch_size=3)
    np.testing.assert_allclose(decoded, files, atol=1e-5)
    augment = {"hflip": 1.0, "affine_p": 0.0, "cutout_p": 0.0, "jpeg_p": 0.0}
    views = [cached_features(e, paths, tmp_path / c, view=v, augment=augment, progress=False)[0]
             for c, v in (("a", 0), ("a", 1), ("b", 1))]
    np.testing.assert_array_equal(views[1], views[2])          # recomputed in another store: the same view
    assert np.abs(views[0] - views[1]).max() > 1e-3             # flipped images give other features


# --- parallel single-threaded forwards on CPU ------------------------------------------------------------------

def _embed_recording_failures(e, paths, **kw):
    reported = []
    res = embed_images(e, paths, batch_size=2, progress=False, report_failure=reported.append, **kw)
    return res, reported


def test_parallel_forwards_equal_the_single_forward_in_order(tiny_embedder, mode_images, bad_files, monkeypatch):
    """Two single-threaded forwards side by side give the single-threaded forward's vectors bit for bit, in file
    order, with the same failures reported in the same order, also when a later batch finishes first; the forwards
    run on the engine's threads with one intra-op thread each."""
    from guie.runtime import intra_op_threads

    paths = [str(p) for p in mode_images.values()]
    paths[1:1] = [str(bad_files["truncated"]), str(bad_files["empty"])]
    paths.append(str(bad_files["corrupt"]))
    e = tiny_embedder()
    with intra_op_threads(1):
        ref, ref_reported = _embed_recording_failures(e, paths, forwards=1)

    slow_path, real_load, real_forward, seen = paths[0], datasets_mod.transform_file, e.forward, []

    def load(transform, path, *a, **kw):  # the first batch finishes last
        if str(path) == slow_path:
            time.sleep(0.3)
        return real_load(transform, path, *a, **kw)

    def forward(images):
        seen.append((threading.current_thread().name, torch.get_num_threads()))
        return real_forward(images)

    monkeypatch.setattr(datasets_mod, "transform_file", load)
    monkeypatch.setattr(e, "forward", forward)
    with intra_op_threads(2):  # two forwards of one thread each, on any machine
        got, reported = _embed_recording_failures(e, paths, forwards=2)
    assert got.ok.tolist() == ref.ok.tolist() and got.errors == ref.errors and reported == ref_reported
    assert len(reported) == 3 and reported[0].startswith(str(bad_files["truncated"]))
    np.testing.assert_array_equal(got.embeddings, ref.embeddings)
    assert len(seen) == sum(ref.ok[i:i + 2].any() for i in range(0, len(paths), 2))  # no forward when all failed
    assert all(name.startswith("guie-forward") and threads == 1 for name, threads in seen), seen
    assert len({name for name, _ in seen}) == 2
    monkeypatch.undo()
    default = embed_images(e, paths, batch_size=2, progress=False, report_failure=_quiet, forwards=1)
    np.testing.assert_allclose(got.embeddings, default.embeddings, atol=1e-6)  # one forward on all threads


def test_parallel_forwards_restore_threads_and_fail_like_one_forward(tiny_embedder, mode_images, monkeypatch):
    """The caller's intra-op thread count (and the one threads started later get) is restored after a run, after
    an abandoned stream and after a failing forward, which reaches the caller as with one forward; parallel
    forwards are refused where they cannot apply."""
    from guie.runtime import intra_op_threads

    def count_in_new_thread() -> int:
        out = []
        t = threading.Thread(target=lambda: out.append(torch.get_num_threads()))
        t.start()
        t.join()
        return out[0]

    e = tiny_embedder()
    paths = [str(p) for p in mode_images.values()]
    with intra_op_threads(3):
        embed_images(e, paths, batch_size=2, progress=False, forwards=2)
        assert torch.get_num_threads() == 3 and count_in_new_thread() == 3
        stream = iter_embeddings(e, paths, batch_size=1, progress=False, forwards=2)
        next(stream)
        stream.close()
        assert torch.get_num_threads() == 3 and count_in_new_thread() == 3

        calls, real_forward = [], e.forward

        def broken(images):
            calls.append(1)
            if len(calls) == 2:
                raise RuntimeError("forward failed")
            return real_forward(images)

        monkeypatch.setattr(e, "forward", broken)
        for forwards in (1, 2):
            calls.clear()
            with pytest.raises(RuntimeError, match="forward failed"):
                embed_images(e, paths, batch_size=2, progress=False, forwards=forwards)
            assert torch.get_num_threads() == 3 and count_in_new_thread() == 3
    with pytest.raises(ValueError, match="forwards=2"):
        next(iter_embeddings(e, paths, progress=False, forwards=2, seeds=list(range(len(paths)))))
