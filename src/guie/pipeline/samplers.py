"""Training samplers: class-balanced P x K batches and a plain shuffle, both DDP-aware and exactly resumable.

Each epoch is a sequence of *global* batches of `batch_size` indices, a pure function of (seed, epoch). Under DDP
every rank builds the same sequence and keeps its own contiguous slice of each global batch (rank r: positions
r*B/R .. (r+1)*B/R), so the union over ranks is exactly the single-process sequence, whatever the world size.
Resuming needs only {"epoch", "batches_done"} (the same on every rank), and works across world sizes.

Why not pytorch-metric-learning's MPerClassSampler: it has no distributed version (its issue #546), is an index
sampler sized by `length_before_new_iter` rather than a batch-aware epoch (#612 asks for a batch sampler), draws
from numpy's global RNG with no `set_epoch`/state for resumption, and picks classes and images independently per
batch, so an "epoch" misses classes and images while repeating others (#684). Here classes come from successive
random passes over all classes and each class's images from a per-epoch shuffled cycle, so coverage is even.
"""
from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import Sampler

from ..errors import InputError


def _dist_defaults(num_replicas: int | None, rank: int | None) -> tuple[int, int]:
    """(world size, rank) from the arguments, else from torch.distributed when initialised, else (1, 0)."""
    initialised = torch.distributed.is_available() and torch.distributed.is_initialized()
    if num_replicas is None:
        num_replicas = torch.distributed.get_world_size() if initialised else 1
    if rank is None:
        rank = torch.distributed.get_rank() if initialised else 0
    if num_replicas < 1:
        raise InputError(f"num_replicas must be >= 1, got {num_replicas}")
    if not 0 <= rank < num_replicas:
        raise InputError(f"rank must be in [0, {num_replicas}), got {rank}")
    return int(num_replicas), int(rank)


class _GlobalBatchSampler(Sampler[int]):
    """Shared machinery: global batches per epoch, this rank's slice, set_epoch, and resumable position."""

    _salt = 0  # keeps the two samplers' random streams apart for the same seed

    def __init__(self, num_items: int, batch_size: int, num_samples: int | None, num_replicas: int | None,
                 rank: int | None, seed: int):
        if num_items < 1:
            raise InputError(f"{type(self).__name__}: the dataset is empty")
        if batch_size < 1:
            raise InputError(f"batch_size must be >= 1, got {batch_size}")
        self.num_replicas, self.rank = _dist_defaults(num_replicas, rank)
        if batch_size % self.num_replicas:
            raise InputError(f"batch_size {batch_size} (global) is not divisible by {self.num_replicas} processes")
        self.num_items, self.batch_size, self.seed = int(num_items), int(batch_size), int(seed)
        self.num_samples = int(num_items if num_samples is None else num_samples)
        if self.num_samples < 1:
            raise InputError(f"num_samples must be >= 1, got {num_samples}")
        self.local_batch = self.batch_size // self.num_replicas
        # whole batches only (DDP ranks must step together): the last one is topped up, never dropped
        self.batches_per_epoch = math.ceil(self.num_samples / self.batch_size)
        self.epoch = 0
        self.batches_done = 0          # batches of the current epoch handed out by the last iteration
        self._resume_at = 0            # batches to skip on the next iteration of self.epoch (load_state_dict)

    # subclasses: the epoch's global sequence, batches_per_epoch * batch_size indices
    def _epoch_indices(self, rng: np.random.Generator) -> np.ndarray:
        raise NotImplementedError

    def _rng(self, epoch: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, epoch, self._salt])

    def global_batches(self, epoch: int | None = None) -> np.ndarray:
        """All global batches of an epoch (default: the current one), [batches_per_epoch, batch_size] int64."""
        epoch = self.epoch if epoch is None else epoch
        idx = self._epoch_indices(self._rng(epoch))
        return idx.reshape(self.batches_per_epoch, self.batch_size)

    def local_indices(self) -> np.ndarray:
        """This rank's indices for the rest of the current epoch (what iterating yields), as one array."""
        g = self.global_batches()[self._resume_at:]
        return g[:, self.rank * self.local_batch:(self.rank + 1) * self.local_batch].reshape(-1)

    def __iter__(self) -> Iterator[int]:
        start = self._resume_at
        idx = self.local_indices()
        self._resume_at, self.batches_done = 0, start
        lb = self.local_batch
        for b in range(len(idx) // lb):
            chunk = idx[b * lb:(b + 1) * lb].tolist()
            yield from chunk[:-1]
            self.batches_done = start + b + 1  # counted once the batch's last index is handed out
            yield chunk[-1]

    def __len__(self) -> int:
        """Indices per epoch for this rank (a full epoch, also right after a resume)."""
        return self.batches_per_epoch * self.local_batch

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch to iterate (reshuffles deterministically from (seed, epoch)); call it every epoch,
        as with DistributedSampler. A resume position loaded for this same epoch is kept."""
        if epoch < 0:
            raise InputError(f"epoch must be >= 0, got {epoch}")
        if epoch != self.epoch:
            self._resume_at, self.batches_done = 0, 0
        self.epoch = int(epoch)

    def state_dict(self, batches_done: int | None = None) -> dict[str, int]:
        """The position {"epoch", "batches_done"} (global batches; identical on every rank).

        A DataLoader with workers asks the sampler for indices ahead of training, so pass the number of batches
        the training loop has actually consumed in this epoch; by default it is the number handed out.
        """
        done = self.batches_done if batches_done is None else int(batches_done)
        if not 0 <= done <= self.batches_per_epoch:
            raise InputError(f"batches_done must be in [0, {self.batches_per_epoch}], got {done}")
        return {"epoch": self.epoch, "batches_done": done}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue from a state_dict(): the next iteration yields the rest of that epoch, exactly as an
        uninterrupted run would (also with another number of processes, if the global batch size is the same)."""
        missing = {"epoch", "batches_done"} - set(state)
        if missing:
            raise InputError(f"sampler state lacks {sorted(missing)}: got {state}")
        done = int(state["batches_done"])
        if not 0 <= done <= self.batches_per_epoch:
            raise InputError(f"sampler state: batches_done {done} is outside this epoch's "
                             f"{self.batches_per_epoch} batches (was the batch size or dataset changed?)")
        self.epoch, self._resume_at, self.batches_done = int(state["epoch"]), done, done


class ShuffleSampler(_GlobalBatchSampler):
    """Uniform shuffle in global batches: every item once per pass (successive random permutations), the last
    batch topped up from the next pass. DDP slicing, set_epoch and resume as ClassBalancedSampler.

    num_items: dataset size; batch_size: the global batch (all ranks together); num_samples: indices per epoch
    (default num_items; more or fewer makes epochs longer or shorter).
    """

    _salt = 1

    def __init__(self, num_items: int, batch_size: int, *, num_samples: int | None = None,
                 num_replicas: int | None = None, rank: int | None = None, seed: int = 0):
        super().__init__(num_items, batch_size, num_samples, num_replicas, rank, seed)

    def _epoch_indices(self, rng: np.random.Generator) -> np.ndarray:
        total = self.batches_per_epoch * self.batch_size
        passes = [rng.permutation(self.num_items) for _ in range(math.ceil(total / self.num_items))]
        return np.concatenate(passes)[:total]


class _ClassStream:
    """Classes in successive random passes (each class once per pass). `take(k)` returns k classes, distinct
    whenever k <= the number of classes C (classes left over from the previous pass are moved to the end of the
    next one instead of being drawn twice in a batch); for k > C, every class k // C times plus k % C distinct."""

    def __init__(self, classes: np.ndarray, rng: np.random.Generator):
        self.classes, self.rng = classes, rng
        self.buf = classes[:0]

    def take(self, k: int) -> np.ndarray:
        if k <= len(self.buf):
            out, self.buf = self.buf[:k], self.buf[k:]
            return out
        if k > len(self.classes):  # more slots than classes: every class k // C times, the rest distinct
            whole, rest = divmod(k, len(self.classes))
            return np.concatenate([np.tile(self.classes, whole), self.take(rest)])
        head = self.buf
        perm = self.rng.permutation(self.classes)
        seen = np.isin(perm, head)
        perm = np.concatenate([perm[~seen], perm[seen]])
        need = k - len(head)
        out, self.buf = np.concatenate([head, perm[:need]]), perm[need:]
        return out


class ClassBalancedSampler(_GlobalBatchSampler):
    """P x K sampling for metric learning: each global batch holds `m_per_class` images of each of
    `batch_size // m_per_class` classes (consecutive), as a margin or pair loss wants positives in every batch.

    Classes are drawn in successive random passes over all classes (every class equally often per epoch); with
    `domains` (one value per item), each class slot first picks a domain (uniformly, or in proportion to
    `domain_weights`: domain value -> weight, 1 for the others), then the domain's next class, so small domains are
    not drowned by big ones. A class's images are used in a freshly shuffled cycle each
    epoch, so a class drawn j times contributes j*m different images before any repeats; classes with fewer than
    m images repeat images within their group (sampling with replacement, every image at least once).
    Under DDP, give each rank a whole number of classes (local batch divisible by m) to keep groups together.

    labels: class of each item (any hashable values); batch_size: the global batch; num_samples: indices per
    epoch (default: the dataset size).
    """

    _salt = 2

    def __init__(self, labels: Sequence | np.ndarray, batch_size: int, m_per_class: int = 2, *,
                 domains: Sequence | np.ndarray | None = None, domain_weights: dict | None = None,
                 num_samples: int | None = None, num_replicas: int | None = None, rank: int | None = None,
                 seed: int = 0):
        labels = np.asarray(labels)
        if labels.ndim != 1 or len(labels) == 0:
            raise InputError(f"ClassBalancedSampler: labels must be a non-empty 1-D sequence, got shape "
                             f"{labels.shape}")
        if m_per_class < 1:
            raise InputError(f"m_per_class must be >= 1, got {m_per_class}")
        if batch_size % m_per_class:
            raise InputError(f"batch_size {batch_size} is not a multiple of m_per_class {m_per_class}")
        super().__init__(len(labels), batch_size, num_samples, num_replicas, rank, seed)
        self.m_per_class = int(m_per_class)
        self.classes_per_batch = self.batch_size // self.m_per_class
        _, self._cls = np.unique(labels, return_inverse=True)
        self._cls = self._cls.astype(np.int64)
        self.num_classes = int(self._cls.max()) + 1
        self._counts = np.bincount(self._cls, minlength=self.num_classes)
        self._starts = np.concatenate([[0], np.cumsum(self._counts)[:-1]])
        if domains is None:
            if domain_weights:
                raise InputError("domain_weights need domains (sampler balance: domain)")
            self._domain_classes = [np.arange(self.num_classes)]
            self._domain_p = np.ones(1)
        else:
            domains = np.asarray(domains)
            if domains.shape != labels.shape:
                raise InputError(f"domains must have one value per item ({len(labels)}), got shape {domains.shape}")
            names, dom = np.unique(domains, return_inverse=True)
            # a class found in several domains is listed in each (its images are pooled)
            pairs = np.unique(np.stack([dom, self._cls], 1), axis=0)
            self._domain_classes = [pairs[pairs[:, 0] == d, 1] for d in range(int(dom.max()) + 1)]
            weights = dict(domain_weights or {})
            unknown = sorted(set(map(str, weights)) - set(map(str, names)))
            if unknown:
                raise InputError(f"domain_weights name unknown domain(s) {unknown}; the data has "
                                 f"{sorted(map(str, names))}")
            w = np.array([float(weights.get(str(n), 1.0)) for n in names])
            if not (np.isfinite(w).all() and (w >= 0).all() and w.sum() > 0):
                raise InputError(f"domain_weights must be finite, >= 0 and not all 0, got {weights}")
            self._domain_p = w / w.sum()

    @property
    def num_domains(self) -> int:
        """Domains balanced over (1 without `domains`)."""
        return len(self._domain_classes)

    def _epoch_indices(self, rng: np.random.Generator) -> np.ndarray:
        n, m, P = self.num_items, self.m_per_class, self.classes_per_batch
        # items grouped by class, each class's images in a random order for this epoch
        order = np.argsort(self._cls + rng.random(n), kind="stable")
        next_pos = np.zeros(self.num_classes, dtype=np.int64)
        streams = [_ClassStream(c, rng) for c in self._domain_classes]
        offsets = np.arange(m)
        out = np.empty((self.batches_per_epoch, P, m), dtype=np.int64)
        for b in range(self.batches_per_epoch):
            if len(streams) == 1:
                cls = streams[0].take(P)
            else:
                slots = rng.multinomial(P, self._domain_p)
                cls = rng.permutation(np.concatenate([s.take(int(k)) for s, k in zip(streams, slots) if k]))
            # k-th occurrence of a class in this batch takes the k-th next group of m images of its cycle
            srt = np.argsort(cls, kind="stable")
            cs = cls[srt]
            first = np.searchsorted(cs, cs, side="left")
            occurrence = np.empty(P, dtype=np.int64)
            occurrence[srt] = np.arange(P) - first
            pos = (next_pos[cls] + occurrence * m)[:, None] + offsets
            pos %= self._counts[cls][:, None]
            out[b] = order[self._starts[cls][:, None] + pos]
            np.add.at(next_pos, cls, m)
        return out.reshape(-1)


__all__ = ["ClassBalancedSampler", "ShuffleSampler"]
