"""Torch datasets over image files that never crash a run on a bad image: one dataset and one collate for
inference (embedding, feature store) and training.

A key is an index, or (index, seed) to seed torch's RNG before the image is transformed: augmentation randomness
then depends on (run seed, epoch, index) only (`sample_seed`, `SeededSampler`), so a run resumed mid-epoch, or
split over DDP ranks, sees exactly the augmented images an uninterrupted single-process run would.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import torch
from torch.utils.data import Dataset, Sampler

from ..imaging.io import DEFAULT_MAX_PIXELS, ImageLoadError, load_image
from ..models.preprocess import ImageTransform
from ..runtime import single_intra_op_thread


def seed_sample_rng(seed: int) -> None:
    """Seed torch's CPU generator, the one the augmentations draw from, before one sample is transformed.

    `torch.manual_seed` would also queue a lazy seed for every accelerator backend, formatting a Python stack trace
    each time (1-2 ms per call, 15-50 ms per training batch of 32 on a CPU); the CPU stream it sets is the same.
    """
    torch.default_generator.manual_seed(seed)


class ImageFileDataset(Dataset):
    """key -> (index, uint8 tensor or None, error message or None); key = index or (index, seed).

    `threads` > 1 decodes a whole batch with a thread pool when the DataLoader fetches batches in the main process
    (num_workers=0, through `__getitems__`). PIL releases the GIL while it decodes and resizes, so this spreads the
    decoding over the cores *between* model forwards; worker processes would instead run *during* the forward and
    fight its intra-op threads for the same cores (on a 2-core CPU that halved throughput). Seeded keys with a
    random transform (an augmentation) are processed in order: torch's global RNG is seeded per sample and is not
    thread-safe. A transform split into a random-free `prepare` and a random `finish` (`TrainTransform`) still
    decodes and resizes on the threads; only `finish` runs in order, after the seeding, with one intra-op thread
    (`single_intra_op_thread`: per-sample tensor ops are tiny). The images equal `__getitem__`'s bit for bit.
    """

    def __init__(self, paths: Sequence[str], transform: Callable, draft_size: int | None = None, threads: int = 1):
        self.paths, self.transform, self.draft_size = list(paths), transform, draft_size
        self.threads = max(1, int(threads))

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, key):
        i, seed = key if isinstance(key, tuple) else (key, None)
        if seed is not None:
            seed_sample_rng(seed)
        try:
            return i, transform_file(self.transform, self.paths[i], self.draft_size), None
        except ImageLoadError as e:
            return i, None, str(e)
        except Exception as e:  # a transform failing on an odd image must not end a long run either
            return i, None, f"{self.paths[i]}: {type(e).__name__}: {e}"

    def __getitems__(self, keys: Sequence) -> list:
        """A batch of samples (the DataLoader calls this instead of __getitem__ when it exists)."""
        seeded = isinstance(keys[0], tuple)
        staged = seeded and hasattr(self.transform, "prepare") and hasattr(self.transform, "finish")
        seeded_random = seeded and not isinstance(self.transform, ImageTransform) and not staged
        if self.threads == 1 or len(keys) == 1 or seeded_random:
            return [self[k] for k in keys]
        if not staged:
            with ThreadPoolExecutor(min(self.threads, len(keys))) as pool:
                return list(pool.map(self.__getitem__, keys))
        with single_intra_op_thread(), ThreadPoolExecutor(min(self.threads, len(keys))) as pool:
            prepared = list(pool.map(self._prepare, keys))
            out = []
            for (i, seed), (_, x, err) in zip(keys, prepared):
                if err is None:
                    seed_sample_rng(seed)
                    try:
                        x = self.transform.finish(x)
                    except Exception as e:
                        x, err = None, f"{self.paths[i]}: {type(e).__name__}: {e}"
                out.append((i, x, err))
            return out

    def _prepare(self, key):
        """Decode sample key[0] and run the random-free part of a staged transform (`prepare`)."""
        i = key[0]
        try:
            return i, self.transform.prepare(load_image(self.paths[i], draft_size=self.draft_size)), None
        except ImageLoadError as e:
            return i, None, str(e)
        except Exception as e:
            return i, None, f"{self.paths[i]}: {type(e).__name__}: {e}"


def transform_file(transform: Callable, path, draft_size: int | None = None,
                   max_pixels: int = DEFAULT_MAX_PIXELS) -> torch.Tensor:
    """Decode one image file (or file-like) and transform it: the evaluation transform decodes and resizes in one
    step (`ImageTransform.load`: the JPEG fast path, no PIL image); any other transform (an augmentation) gets
    `load_image`'s PIL image, decoded at draft_size. Raises ImageLoadError for an unusable file."""
    if isinstance(transform, ImageTransform):
        return transform.load(path, max_pixels=max_pixels)
    return transform(load_image(path, draft_size=draft_size, max_pixels=max_pixels))


def stack_images(images: Sequence[torch.Tensor]) -> torch.Tensor:
    """uint8 images [3, S, S] -> a batch [B, 3, S, S]; in channels_last memory when every image is stored
    channels-last (as `ImageTransform.load` returns them): one plain copy per image where a stack and the forward's
    conversion to channels_last would copy twice, once transposing (~0.25 ms per 224-px image on one core, an
    eighth of a JPEG's decode)."""
    if all(x.dim() == 3 and x.permute(1, 2, 0).is_contiguous() for x in images):
        return torch.stack([x.permute(1, 2, 0) for x in images]).permute(0, 3, 1, 2)
    return torch.stack(list(images))


def collate_skip_failed(batch):
    """Stack the decodable images; report the others as (index, message) pairs -> (indices, images or None,
    failed)."""
    ok = [(i, x) for i, x, err in batch if err is None]
    failed = [(i, err) for i, x, err in batch if err is not None]
    if ok:
        idx = torch.tensor([i for i, _ in ok], dtype=torch.long)
        images = stack_images([x for _, x in ok])
    else:
        idx, images = torch.zeros(0, dtype=torch.long), None
    return idx, images, failed


def sample_seed(run_seed: int, epoch: int, index: int) -> int:
    """A 31-bit seed per (run, epoch, sample): augmentations independent of worker count, rank and resumption."""
    x = (run_seed * 0x9E3779B1 + epoch * 0x85EBCA77 + index * 0xC2B2AE3D) & 0xFFFFFFFFFFFF
    x ^= x >> 17
    return int((x * 0x27D4EB2F) & 0x7FFFFFFF)


class SeededSampler(Sampler):
    """Wraps an index sampler to yield (index, per-sample seed) keys for ImageFileDataset."""

    def __init__(self, base: Sampler, run_seed: int):
        self.base, self.run_seed, self.epoch = base, run_seed, 0
        self.start = 0  # skip this many indices of the epoch (resuming mid-epoch)

    def set_epoch(self, epoch: int) -> None:
        """Draw the next epoch's order and seeds."""
        self.epoch = epoch
        self.base.set_epoch(epoch)

    def __iter__(self):
        for pos, i in enumerate(self.base):
            if pos >= self.start:
                yield int(i), sample_seed(self.run_seed, self.epoch, int(i))

    def __len__(self) -> int:
        return len(self.base) - self.start


class KeyListSampler(Sampler):
    """Yields a fixed list of dataset keys in order (e.g. (index, seed) pairs of augmented feature views)."""

    def __init__(self, keys: Sequence):
        self.keys = list(keys)

    def __iter__(self):
        return iter(self.keys)

    def __len__(self) -> int:
        return len(self.keys)
