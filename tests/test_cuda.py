"""What only a CUDA device can check: bf16 embeddings, nvJPEG decoding, worker batches joined on the device.

Skipped without CUDA (CI has none); `benchmarks/gpu_run.sh` runs this module on the accelerator machine.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import write_exif_orientations
from guie.embedding.engine import embed_images, iter_embeddings
from guie.imaging.io import load_image
from guie.models.preprocess import ImageTransform, PreprocessConfig, draft_size
from guie.pipeline.gpu_decode import EncodedImageDataset, collate_encoded, decode_batch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _quiet(msg: str) -> None:
    pass


def test_cuda_embeddings_match_cpu_in_both_decoders(tiny_embedder, mode_images, bad_files):
    paths = [str(p) for p in mode_images.values()] + [str(bad_files["truncated"]), str(bad_files["bomb"])]
    ref = embed_images(tiny_embedder(), paths, batch_size=4, device="cpu", progress=False, report_failure=_quiet)
    for decode in ("cpu", "gpu"):
        got = embed_images(tiny_embedder(), paths, batch_size=4, device="cuda", decode=decode, progress=False,
                           report_failure=_quiet)
        assert (got.ok == ref.ok).all() and len(got.errors) == len(ref.errors) == 2, decode
        cosine = (got.embeddings * ref.embeddings).sum(1)
        assert cosine.min() > 0.98, (decode, cosine.min())  # bf16 autocast vs fp32 (and nvJPEG vs libjpeg)


def test_nvjpeg_decode_matches_pil_for_every_exif_orientation(tmp_path):
    cfg = PreprocessConfig(image_size=64, resize_mode="crop")
    paths = write_exif_orientations(tmp_path, 160, 96, seed=7)
    ds = EncodedImageDataset(paths, ImageTransform(cfg))
    idx, payloads, failed = collate_encoded([ds[i] for i in range(len(paths))])
    got_idx, images, more = decode_batch(idx, payloads, paths, cfg, torch.device("cuda"))
    assert images.is_cuda and got_idx.tolist() == list(range(8)) and not failed and not more
    refs = [ImageTransform(cfg)(load_image(p, draft_size=draft_size(cfg))).float() for p in paths]
    for i, ref in enumerate(refs):
        diff = (images[i].cpu().float() - ref).abs()
        # nvJPEG vs libjpeg (IDCT, chroma upsampling) and PIL's reduced-scale draft decode: ~1 level, more at edges
        assert diff.mean() < 1.5 and (diff > 8).float().mean() < 0.05, (i + 1, diff.mean(), (diff > 8).float().mean())
        wrong = (images[i].cpu().float() - refs[(i + 1) % 8]).abs()
        assert wrong.mean() > 5 * diff.mean() + 3, i + 1  # the check can tell orientations apart


def test_worker_batches_joined_on_the_device_keep_file_order(tiny_embedder, mode_images, bad_files):
    paths = ([str(p) for p in mode_images.values()] + [str(bad_files["corrupt"])]) * 2
    e = tiny_embedder()
    ref = embed_images(e, paths, batch_size=8, device="cuda", num_workers=0, progress=False, report_failure=_quiet)
    seen, rows = [], []
    for b in iter_embeddings(e, paths, batch_size=8, device="cuda", num_workers=4, progress=False,
                             report_failure=_quiet):
        seen += sorted(list(b.indices) + [i for i, _ in b.failed])
        rows.append(b.embeddings)
    assert seen == list(range(len(paths)))
    np.testing.assert_allclose(np.concatenate(rows), ref.embeddings, atol=1e-2)
