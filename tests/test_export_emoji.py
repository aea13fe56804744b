"""Parity of exported models with the training-time Embedder on real images: the emoji test split (skipped when the
emoji cache is absent: see the `emoji_manifest` fixture). Model: efficientnet_lite0 (ImageNet weights, offline) + a
seeded 64-d head, 64 px.

Figures for the full test split: benchmarks/export_parity.py.
"""
import numpy as np
import pytest
import torch

N_CLASSES = 50  # x 4 vendors = 200 images, a few seconds per path

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning")]


@pytest.fixture(scope="module")
def emoji(emoji_manifest, tmp_path_factory):
    from guie.data.manifest import read_manifest, select_rows
    from guie.export import export_onnx, export_torchscript, reference_embed
    from guie.imaging.io import load_image
    from guie.models import create_embedder
    from guie.models.preprocess import pil_to_uint8

    df = select_rows(read_manifest(emoji_manifest), ["split=test"])
    labels = sorted(df["label"].unique())[:N_CLASSES]
    df = df[df["label"].isin(labels)].reset_index(drop=True)
    images = [load_image(p) for p in df["path"]]
    torch.manual_seed(0)
    emb = create_embedder("efficientnet_lite0", image_size=64).eval()
    d = tmp_path_factory.mktemp("emoji")
    ts = torch.jit.load(str(export_torchscript([emb], d / "m.pt").path))
    import onnxruntime as ort

    sess = ort.InferenceSession(str(export_onnx([emb], d / "m.onnx").path), providers=["CPUExecutionProvider"])
    batch = np.stack([pil_to_uint8(im).numpy() for im in images])  # the emoji PNGs are all 64 x 64
    with torch.inference_mode():
        outputs = {"eager": reference_embed([emb], images), "torchscript": ts(torch.from_numpy(batch)).numpy(),
                   "onnx": sess.run(None, {"images": batch})[0]}
    return df, outputs


def _neighbours(df, emb):
    from guie.evaluate.protocol import evaluate_folds

    ev = evaluate_folds(df, emb, by="vendor")
    return ev.score, ev.per_query.sort_values(["fold", "path"])["neighbors"].map(tuple).tolist()


@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
def test_exported_model_keeps_the_emoji_neighbours(emoji, fmt):
    df, outputs = emoji
    eager, out = outputs["eager"], outputs[fmt]
    score_e, nn_e = _neighbours(df, eager)
    score_x, nn_x = _neighbours(df, out)
    same = np.mean([a == b for a, b in zip(nn_e, nn_x)])
    diff = float(np.abs(out - eager).max())
    print(f"\n{fmt}: end-to-end max|diff| {diff:.1e}, identical top-5 {same:.1%}, mP@5 {score_x:.4f} vs eager "
          f"{score_e:.4f} ({len(df)} emoji test images)")
    assert diff < 2e-2
    assert same >= 0.85
    assert abs(score_x - score_e) < 0.02
