"""Embedding heads: the <=64-d projection that the GUIE metric sees, and a training-free PCA initialiser."""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from ..errors import InputError

MAX_EMBED_DIM = 64  # the competition's limit


HEAD_NORMS = ("none", "batchnorm")


class ProjectionHead(nn.Module):
    """[BatchNorm] -> Dropout -> Linear(in_features -> embed_dim): the head every top GUIE solution used (dropout 0.2
    in the 1st/2nd place). norm="batchnorm" standardises each feature first (BatchNorm1d without affine, as the 5th
    place did), which matters when features of different scales are concatenated (multi-level pooling).
    hidden=H makes the projection two layers, Linear(in -> H) -> GELU -> Linear(H -> embed_dim): a head that can
    treat inputs of different domains differently (a linear one applies one map to all), at the cost of PCA init.

    The L2 normalisation that follows is done by the Embedder, so that Euclidean k-NN equals cosine ranking.
    """

    def __init__(self, in_features: int, embed_dim: int = 64, dropout: float = 0.0, bias: bool = True,
                 max_dim: int | None = MAX_EMBED_DIM, norm: str = "none", hidden: int | None = None):
        super().__init__()
        if max_dim is not None and embed_dim > max_dim:
            raise InputError(f"embed_dim={embed_dim} exceeds the GUIE limit of {max_dim} dimensions")
        if embed_dim < 1:
            raise InputError(f"embed_dim must be >= 1, got {embed_dim}")
        if norm not in HEAD_NORMS:
            raise InputError(f"head norm {norm!r}: choose from {HEAD_NORMS}")
        if hidden is not None and hidden < 1:
            raise InputError(f"head hidden width must be >= 1 (or None for a linear head), got {hidden}")
        self.in_features, self.embed_dim, self.hidden = in_features, embed_dim, hidden
        self.norm = nn.BatchNorm1d(in_features, affine=False) if norm == "batchnorm" else nn.Identity()
        self.dropout = nn.Dropout(dropout)
        self.proj: nn.Module = (nn.Linear(in_features, embed_dim, bias=bias) if hidden is None else
                                nn.Sequential(nn.Linear(in_features, hidden), nn.GELU(),
                                              nn.Linear(hidden, embed_dim, bias=bias)))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.proj(self.dropout(self.norm(features)))

    @torch.no_grad()
    def init_from_pca(self, mean: np.ndarray, components: np.ndarray) -> ProjectionHead:
        """Set the projection to x -> (x - mean) @ components.T (so the head starts as PCA)."""
        if self.hidden is not None:
            raise InputError("PCA initialises a linear head only; this head has a hidden layer")
        comps = torch.as_tensor(components, dtype=torch.float32)
        if comps.shape != self.proj.weight.shape:
            raise InputError(f"PCA components {tuple(comps.shape)} do not fit head {tuple(self.proj.weight.shape)}")
        self.proj.weight.copy_(comps)
        if self.proj.bias is not None:
            self.proj.bias.copy_(-comps @ torch.as_tensor(mean, dtype=torch.float32))
        return self


def fit_pca(features: np.ndarray, dim: int, whiten: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """PCA of a feature matrix [N, F] -> (mean [F], components [dim, F]); whiten scales each axis to unit variance."""
    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] < 2:
        raise InputError(f"PCA needs a 2-D matrix with at least 2 rows, got shape {x.shape}")
    if dim > min(x.shape):
        raise InputError(f"PCA to {dim} dims needs at least {dim} samples and features, got {x.shape}")
    mean = x.mean(0)
    _, s, vt = np.linalg.svd(x - mean, full_matrices=False)
    comps = vt[:dim]
    if whiten:
        comps = comps / (s[:dim, None] / np.sqrt(len(x) - 1) + 1e-8)
    return mean.astype(np.float32), comps.astype(np.float32)
