"""Query-side helpers: embed query images with a model (result pictures: `guie.imaging.draw.hits_grid`)."""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..embedding.engine import embed_decoded
from ..imaging.io import load_image
from ..models.embedder import resolve_embedder


def embed_query_images(model, images: Sequence[str | Path]) -> np.ndarray:
    """Embed a few query images with `model` (an Embedder, checkpoint path or backbone name) -> [Q, d]."""
    embedder = resolve_embedder(model)
    return embed_decoded(embedder, [load_image(p) for p in images])
