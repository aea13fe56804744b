"""The eager, training-time equivalent of an exported model: PIL resizing (`ImageTransform`) + the Embedders, with
the same TTA views and averaging. Parity checks compare an exported model against this."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..models.embedder import Embedder
from ..models.preprocess import ImageTransform
from .module import TTAConfig


def _views(image: Image.Image, embedder: Embedder, tta: TTAConfig) -> list[torch.Tensor]:
    """uint8 view tensors [3,S,S] of one image for one member: its own view, the letterbox view, mirror images."""
    pre = embedder.preprocess
    views = [ImageTransform(pre)(image)]
    w, h = image.size
    if tta.letterbox and pre.resize_mode != "pad" and max(w, h) >= tta.min_aspect * min(w, h):
        views.append(ImageTransform(pre.replace(resize_mode="pad"))(image))
    if tta.flip:
        views += [v.flip(2) for v in views]
    return views


@torch.inference_mode()
def reference_embed(embedders: Sequence[Embedder], images: Sequence[Image.Image], tta: TTAConfig | None = None,
                    batch_size: int = 64, projection=None) -> np.ndarray:
    """Embed RGB PIL images the way the exported module does, but through PIL resizing and eager Embedders.

    Each member: L2-normalise(sum of its views' embeddings); several members: L2-normalise(sum of members), or with
    `projection` (guie.export.projection.ConcatPCA) the members concatenated and projected. Returns float32 [N, d].
    """
    tta = tta or TTAConfig()
    if projection is not None:
        return projection.apply([reference_embed([e], images, tta, batch_size) for e in embedders])
    total: torch.Tensor | None = None
    for embedder in embedders:
        embedder.eval()
        device = next(embedder.parameters()).device
        parts = []
        for start in range(0, len(images), batch_size):
            chunk = images[start:start + batch_size]
            tensors, owner = [], []
            for i, image in enumerate(chunk):
                views = _views(image, embedder, tta)
                tensors += views
                owner += [i] * len(views)
            out = embedder(torch.stack(tensors).to(device)).float().cpu()
            owner_t = torch.tensor(owner)
            emb = torch.zeros(len(chunk), out.shape[1]).index_add_(0, owner_t, out)
            summed = torch.bincount(owner_t, minlength=len(chunk)) > 1  # a single view is already unit length
            emb[summed] = F.normalize(emb[summed], dim=-1)
            parts.append(emb)
        member = torch.cat(parts)
        total = member if total is None else total + member
    assert total is not None, "no embedders given"
    if len(embedders) > 1:
        total = F.normalize(total, dim=-1)
    return total.numpy().astype(np.float32)
