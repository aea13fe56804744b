"""Torch datasets over image files that never crash a run on a bad image."""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch.utils.data import Dataset

from .images import ImageLoadError, load_image


class ImageFileDataset(Dataset):
    """paths[i] -> (i, uint8 tensor or None, error message or None)."""

    def __init__(self, paths: Sequence[str], transform: Callable, draft_size: int | None = None):
        self.paths, self.transform, self.draft_size = list(paths), transform, draft_size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        try:
            image = load_image(self.paths[i], draft_size=self.draft_size)
            return i, self.transform(image), None
        except ImageLoadError as e:
            return i, None, str(e)
        except Exception as e:  # a transform failing on an odd image must not end a long run either
            return i, None, f"{self.paths[i]}: {type(e).__name__}: {e}"


def collate_skip_failed(batch):
    """Stack the decodable images; report the others as (index, message) pairs."""
    ok = [(i, x) for i, x, err in batch if err is None]
    failed = [(i, err) for i, x, err in batch if err is not None]
    if ok:
        idx = torch.tensor([i for i, _ in ok], dtype=torch.long)
        images = torch.stack([x for _, x in ok])
    else:
        idx, images = torch.zeros(0, dtype=torch.long), None
    return idx, images, failed
