"""The zero-shot baseline as a model: a backbone + a PCA head fitted on its features, no training.

`fit_pca_embedder` returns an ordinary guie Embedder (Linear head set to x -> (x - mean) @ components.T), so
`save_embedder` writes a checkpoint that embed, evaluate, export and search accept like any trained model.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..embedding.feature_store import cached_features
from ..errors import InputError
from ..models.embedder import Embedder, create_embedder, resolve_embedder
from ..models.heads import MAX_EMBED_DIM, fit_pca
from ..utils import default_cache_dir, log


def fit_pca_embedder(paths: Sequence[str], model: str | Path | Embedder = "efficientnet_lite0", dim: int = 64,
                     whiten: bool = False, image_size: int | None = None, preprocess: dict | None = None,
                     cache_dir: str | Path | None = None, device=None, progress: bool = True,
                     batch_size: int = 64, runtime: str = "auto", precision: str = "fp32",
                     **backbone_kwargs) -> Embedder:
    """Backbone of `model` (a backbone name or a guie checkpoint, whose head is replaced) + a `dim`-d PCA head
    fitted on the backbone features of `paths` (computed once into the feature cache).

    Args:
        paths: images to fit on (use training images, never the test classes).
        model: backbone name (``efficientnet_lite2``, ``timm:...``) or a checkpoint whose backbone to keep.
        dim: output dimension (<= 64, the GUIE limit).
        whiten: scale each principal axis to unit variance.
        image_size, preprocess, backbone_kwargs: as `create_embedder` (backbone names only; preprocess's
            crop_pct also adapts a checkpoint).
        runtime, precision, batch_size: how the features are computed (`guie.embedding.feature_store`).
    """
    if not 1 <= dim <= MAX_EMBED_DIM:
        raise InputError(f"PCA dim must be in 1..{MAX_EMBED_DIM}, got {dim}")
    is_name = not isinstance(model, Embedder) and not Path(str(model)).is_file()
    if is_name:
        base = resolve_embedder(model, image_size=image_size, preprocess=preprocess or None, **backbone_kwargs)
    else:
        if set(preprocess or {}) - {"crop_pct"} or backbone_kwargs:
            raise InputError("preprocess/backbone options apply to backbone names, not to a trained model")
        base = resolve_embedder(model, image_size=image_size, crop_pct=(preprocess or {}).get("crop_pct"))
    feats, ok = cached_features(base, list(map(str, paths)), cache_dir or default_cache_dir(), device=device,
                                progress=progress, batch_size=batch_size, runtime=runtime, precision=precision)
    if ok.sum() < dim + 1:
        raise InputError(f"PCA to {dim} dims needs at least {dim + 1} readable images, got {int(ok.sum())}")
    log.info("PCA %d -> %d on %d images", feats.shape[1], dim, int(ok.sum()))
    mean, components = fit_pca(feats[ok].astype(np.float64), dim, whiten=whiten)
    spec = base.spec
    pca = create_embedder(spec.backbone, dim, 0.0, pretrained=False, image_size=base.preprocess.image_size,
                          head_norm="none", **spec.backbone_kwargs)
    pca.preprocess = base.preprocess
    pca.backbone.load_state_dict(base.backbone.state_dict())
    pca.head.init_from_pca(mean, components)
    return pca.eval()
