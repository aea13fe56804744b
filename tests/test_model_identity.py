"""A model's identity (`Embedder.fingerprint`) and its head over cached features (`embed_cached_features`): the one
home of each, used by search, resumable embedding files, the feature store, the demo, evaluation and training."""
from __future__ import annotations

import numpy as np
import torch

from guie.embedding.feature_store import embed_cached_features
from guie.models.embedder import read_checkpoint, save_embedder


def test_fingerprint_follows_weights_and_preprocessing_and_features_ignore_the_head(tiny_embedder, tmp_path):
    a, b = tiny_embedder(seed=0), tiny_embedder(seed=0)
    assert a.fingerprint() == b.fingerprint() and len(a.fingerprint()) == 16
    with torch.no_grad():
        b.head.proj.weight[0, 0] += 1e-3
    assert a.fingerprint() != b.fingerprint()                     # any weight update changes the identity
    assert a.fingerprint(features=True) == b.fingerprint(features=True)  # cached features survive a new head
    assert a.fingerprint() != a.fingerprint(preprocess=a.preprocess.replace(crop_pct=1.0))
    save_embedder(a, tmp_path / "a.pt")
    from guie.models import load_embedder

    assert load_embedder(tmp_path / "a.pt").fingerprint() == a.fingerprint()  # survives a save/load round trip
    assert read_checkpoint(tmp_path / "a.pt")["spec"]["embed_dim"] == 8


def test_the_head_over_cached_features_runs_without_dropout_or_autograd_and_keeps_the_mode(tiny_embedder):
    e = tiny_embedder(dropout=0.5).train()
    feats = np.random.default_rng(0).normal(size=(6, e.backbone.num_features)).astype(np.float32)
    first, second = embed_cached_features(e, feats), embed_cached_features(e, feats)
    np.testing.assert_array_equal(first, second)                  # no dropout: the same twice
    assert first.shape == (6, 8) and first.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(first, axis=1), 1.0, rtol=1e-5)
    assert e.training and e.head.dropout.training                 # the caller's mode is back
    with torch.no_grad():
        expected = e.eval().embed_features(torch.as_tensor(feats)).numpy()
    np.testing.assert_array_equal(first, expected)
