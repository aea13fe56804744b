"""Query-side helpers: embed query images with a model, draw results as a picture."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw

from ..data.images import load_image
from ..evaluate.report import GREY, thumbnail
from ..models.embedder import resolve_embedder


@torch.inference_mode()
def embed_query_images(model, images: Sequence[str | Path]) -> np.ndarray:
    """Embed a few query images with `model` (an Embedder, checkpoint path or backbone name) -> [Q, d]."""
    embedder = resolve_embedder(model).eval()
    batch = torch.stack([embedder.transform(load_image(p)) for p in images])
    return embedder(batch).float().numpy()


def hits_grid(images: Sequence[str | Path], hits, thumb: int = 96) -> Image.Image:
    """One row per query: the query (grey frame), then its results with their distances."""
    k = hits.positions.shape[1]
    cell = thumb + 8
    grid = Image.new("RGB", (cell * (k + 1) + 10, (cell + 14) * len(images)), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for r, (img, rows) in enumerate(zip(images, hits.rows)):
        y = r * (cell + 14)
        grid.paste(thumbnail(str(img), thumb, GREY), (0, y))
        for j, row in enumerate(rows.itertuples(index=False)):
            x = cell * (j + 1) + 10
            grid.paste(thumbnail(str(row.path), thumb, (70, 110, 200)), (x, y))
            label = f"{getattr(row, 'label', '')}"[:14]
            draw.text((x + 2, y + cell), f"{row.distance:.3f} {label}", fill=(0, 0, 0))
    return grid
