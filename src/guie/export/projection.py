"""Concatenate members' embeddings, then PCA back to <= 64 dims: the GUIE 4th place's combination (soups of
several backbones, their 512-d embeddings concatenated, PCA to 64) and, with one member, the 6th place's (a 256-d
ArcFace head, PCA to 64 for the submission).

Each member's output is L2-normalised (with its TTA views averaged) before the concatenation, so every member
weighs the same; the PCA is fitted on those concatenated training embeddings (never the test classes); the result
is L2-normalised again. The projection travels inside the exported file (module buffers) and in its metadata
(base64 float32), so `guie check-submission` can rebuild the reference later.
"""
from __future__ import annotations

import base64
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from ..errors import InputError
from ..models.embedder import Embedder
from ..models.heads import MAX_EMBED_DIM, fit_pca
from .module import TTAConfig


@dataclass
class ConcatPCA:
    """x = concat(member embeddings) [N, D] -> normalise((x - mean) @ components.T) [N, k]."""

    mean: np.ndarray                  # [D]
    components: np.ndarray            # [k, D]
    member_dims: list[int]
    fitted_on: dict = field(default_factory=dict)   # what the PCA saw: source, images

    def __post_init__(self):
        self.mean = np.asarray(self.mean, dtype=np.float32)
        self.components = np.asarray(self.components, dtype=np.float32)
        if self.components.ndim != 2 or self.components.shape[1] != self.mean.shape[0] or \
                self.mean.shape[0] != sum(self.member_dims):
            raise InputError(f"projection shapes do not fit: mean {self.mean.shape}, components "
                             f"{self.components.shape}, member dims {self.member_dims}")

    @property
    def dim(self) -> int:
        return int(self.components.shape[0])

    def apply(self, parts: Sequence[np.ndarray]) -> np.ndarray:
        """Project the members' (L2-normalised) embeddings of the same rows: float32 [N, k], L2-normalised."""
        x = np.concatenate([np.asarray(p, dtype=np.float64) for p in parts], axis=1)
        y = (x - self.mean) @ self.components.T.astype(np.float64)
        return (y / np.maximum(np.linalg.norm(y, axis=1, keepdims=True), 1e-12)).astype(np.float32)

    def to_dict(self) -> dict:
        """JSON-ready, with the arrays as base64 float32 (little-endian)."""
        def b64(a):
            return base64.b64encode(np.ascontiguousarray(a, dtype="<f4").tobytes()).decode()
        return {"kind": "concat-pca", "dim": self.dim, "member_dims": list(self.member_dims),
                "fitted_on": self.fitted_on, "mean": b64(self.mean), "components": b64(self.components)}

    @classmethod
    def from_dict(cls, d: dict) -> ConcatPCA:
        def arr(s):
            return np.frombuffer(base64.b64decode(s), dtype="<f4")
        total = sum(d["member_dims"])
        return cls(arr(d["mean"]), arr(d["components"]).reshape(int(d["dim"]), total), list(d["member_dims"]),
                   dict(d.get("fitted_on") or {}))


def fit_concat_pca(embedders: Sequence[Embedder], images: Sequence[str], dim: int = MAX_EMBED_DIM,
                   tta: TTAConfig | None = None, source: str = "", batch_size: int = 64) -> ConcatPCA:
    """Embed training `images` (paths) with every member as the exported model will (PIL resizing, the same TTA
    views) and fit the PCA of their concatenation to `dim` dims."""
    from PIL import Image

    from .reference import reference_embed

    if not embedders:
        raise InputError("concat-pca needs at least one model")
    total = sum(e.embed_dim for e in embedders)
    if not 1 <= dim <= total:
        raise InputError(f"concat-pca dim {dim} must be in [1, {total}] (the members' {total} concatenated dims)")
    if len(images) < dim + 1:
        raise InputError(f"concat-pca to {dim} dims needs more than {dim} training images, got {len(images)}")
    parts = [[] for _ in embedders]
    for start in range(0, len(images), 256):
        pil = []
        for p in images[start:start + 256]:
            with Image.open(p) as im:
                pil.append(im.convert("RGB"))
        for i, e in enumerate(embedders):
            parts[i].append(reference_embed([e], pil, tta, batch_size=batch_size))
    x = np.concatenate([np.concatenate(p) for p in parts], axis=1)
    mean, comps = fit_pca(x, dim)
    return ConcatPCA(mean, comps, [e.embed_dim for e in embedders], {"source": source, "images": len(images)})
