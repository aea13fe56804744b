"""ONNX export: dynamic batch / height / width in onnxruntime, parity with the eager module and the training-time
Embedder, TTA gates that depend on the input shape, metadata, and check-submission on an .onnx file."""
import numpy as np
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from guie.export import TTAConfig, build_exported_module, check_submission, export_onnx, read_metadata, reference_embed
from guie.export.check import identity_side, synthetic_image
from guie.export.metadata import ExportError
from guie.models import create_embedder, save_embedder
from guie.models.preprocess import ImageTransform
from model_fixtures import register_tiny_open_clip

TTA = TTAConfig(flip=True, letterbox=True)


def pil(arr):
    return Image.fromarray(np.ascontiguousarray(arr.transpose(1, 2, 0)), "RGB")


@pytest.fixture(scope="module")
def onnx_export(tmp_path_factory):
    d = tmp_path_factory.mktemp("onnx")
    torch.manual_seed(0)
    emb = create_embedder("timm:test_efficientnet", pretrained=False, image_size=32, pad_type="same").eval()
    ckpt = save_embedder(emb, d / "tiny.pt")
    result = export_onnx([emb], d / "tiny.onnx", TTA, checkpoints=[ckpt])
    session = ort.InferenceSession(str(result.path), providers=["CPUExecutionProvider"])
    return emb, result, session


def run(session, x):
    return session.run(None, {"images": x})[0]


def test_onnx_graph_has_dynamic_batch_height_width(onnx_export):
    _, result, session = onnx_export
    (inp,), (out,) = session.get_inputs(), session.get_outputs()
    assert inp.name == "images" and inp.type == "tensor(uint8)"
    assert inp.shape[1] == 3 and all(isinstance(s, str) for s in (inp.shape[0], inp.shape[2], inp.shape[3]))
    assert out.name == "embeddings" and out.shape[1] == 64
    meta = read_metadata(result.path)
    assert meta.tta == TTA.to_dict() and meta.verification["onnx_vs_eager_max_abs"] < 1e-3


def test_onnx_matches_eager_and_training_time_model(onnx_export):
    emb, _, session = onnx_export
    eager = build_exported_module([emb], TTA)
    side = identity_side(emb.preprocess)
    # square (letterbox gate closed), elongated (gate open), large, tiny
    shapes = [(side, side), (37, 500), (500, 37), (3000, 4000), (9, 13)]
    arrays = [synthetic_image(h, w, seed=i) for i, (h, w) in enumerate(shapes)]
    ref = reference_embed([emb], [pil(a) for a in arrays], TTA)
    with torch.no_grad():
        for i, a in enumerate(arrays):
            out = run(session, a[None])
            assert out.shape == (1, 64) and out.dtype == np.float32
            assert np.abs(out - eager(torch.from_numpy(a)[None]).numpy()).max() < 1e-3
            cos = float((out[0] * ref[i]).sum() / np.linalg.norm(out[0]) / np.linalg.norm(ref[i]))
            assert cos > 0.999, shapes[i]
    # same pixels into the network (native side, flip views identical in both paths): exact parity
    assert np.abs(run(session, arrays[0][None])[0] - ref[0]).max() < 1e-4
    # the letterbox view really switches with the shape inside one graph
    plain = build_exported_module([emb], TTAConfig(flip=True))
    with torch.no_grad():
        assert np.abs(run(session, arrays[1][None]) - plain(torch.from_numpy(arrays[1])[None]).numpy()).max() > 1e-3
        assert np.abs(run(session, arrays[0][None]) - plain(torch.from_numpy(arrays[0])[None]).numpy()).max() < 1e-4


def test_onnx_batches_equal_single_images(onnx_export):
    _, _, session = onnx_export
    batch = np.stack([synthetic_image(70, 90, seed=s) for s in range(3)])
    rows = np.concatenate([run(session, b[None]) for b in batch])
    np.testing.assert_allclose(run(session, batch), rows, atol=1e-5)


def test_check_submission_on_onnx(onnx_export):
    report = check_submission(onnx_export[1].path, latency_runs=1)
    status = {c.name: c.status for c in report.checks}
    assert report.ok, report.table()
    assert status["network parity (same pixels)"] == "PASS"
    assert status["single image"] == "INFO"  # ONNX takes rank-4 input only


def test_onnx_refuses_old_opsets(onnx_export, tmp_path):
    with pytest.raises(ExportError, match="older than 18"):
        export_onnx([onnx_export[0]], tmp_path / "old.onnx", opset=17)
    assert not (tmp_path / "old.onnx").exists()


def test_open_clip_tower_exports_to_onnx(tmp_path):
    register_tiny_open_clip(tmp_path, "guie-test-tiny-clip-onnx", embed_dim=32, width=64, head_width=32, layers=1)
    torch.manual_seed(0)
    emb = create_embedder("open_clip:guie-test-tiny-clip-onnx", pretrained=False, embed_dim=16).eval()
    result = export_onnx([emb], tmp_path / "clip.onnx")
    session = ort.InferenceSession(str(result.path), providers=["CPUExecutionProvider"])
    arrays = [synthetic_image(32, 32, seed=0), synthetic_image(120, 45, seed=1)]
    with torch.no_grad():
        eager = emb(ImageTransform(emb.preprocess)(pil(arrays[0]))[None]).numpy()
    assert np.abs(run(session, arrays[0][None]) - eager).max() < 1e-4
    wide = run(session, np.stack([arrays[1]] * 2))
    ref = reference_embed([emb], [pil(arrays[1])])
    assert wide.shape == (2, 16)
    assert float(F.cosine_similarity(torch.from_numpy(wide[:1]), torch.from_numpy(ref))) > 0.999
