"""Torch datasets over image files that never crash a run on a bad image."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Sequence

import torch
from torch.utils.data import Dataset

from .images import ImageLoadError, load_image


class ImageFileDataset(Dataset):
    """paths[i] -> (i, uint8 tensor or None, error message or None).

    `threads` > 1 decodes a whole batch with a thread pool when the DataLoader fetches batches in the main process
    (num_workers=0, through `__getitems__`). PIL releases the GIL while it decodes and resizes, so this spreads the
    decoding over the cores *between* model forwards; worker processes would instead run *during* the forward and
    fight its intra-op threads for the same cores (on a 2-core CPU that halved throughput).
    """

    def __init__(self, paths: Sequence[str], transform: Callable, draft_size: int | None = None, threads: int = 1):
        self.paths, self.transform, self.draft_size = list(paths), transform, draft_size
        self.threads = max(1, int(threads))

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

    def __getitems__(self, indices: Sequence[int]) -> list:
        """A batch of samples (the DataLoader calls this instead of __getitem__ when it exists)."""
        if self.threads == 1 or len(indices) == 1:
            return [self[i] for i in indices]
        with ThreadPoolExecutor(min(self.threads, len(indices))) as pool:
            return list(pool.map(self.__getitem__, indices))


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
