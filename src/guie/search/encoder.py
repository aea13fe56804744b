"""The model side of an index: how it is described in the index header, loaded back (and checked), and run on
query images, through the embedding engine (`guie.embedding.engine`) in every case."""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .image_index import ImageIndex


def model_reference(model: str | Path) -> str:
    """What the header stores to load the model again: a checkpoint's absolute path, or a backbone name."""
    p = Path(str(model)).expanduser()
    return str(p.resolve()) if p.is_file() else str(model)


def describe_model(embedder, model: str | Path) -> dict:
    """The header's model entry: reference, fingerprint (`Embedder.fingerprint`), preprocessing and output dimension."""
    return {"ref": model_reference(model), "fingerprint": embedder.fingerprint(),
            "preprocess": embedder.preprocess.to_dict(), "dim": int(embedder.embed_dim)}


def load_model(model: str | Path, image_size: int | None = None):
    """An Embedder from a checkpoint path or backbone name, in eval mode."""
    from ..models.embedder import resolve_embedder

    return resolve_embedder(str(model), image_size=image_size).eval()


def load_index_model(index: ImageIndex, model: str | Path | None = None):
    """The index's model (from its header, or `model` given instead), refused unless its fingerprint is the one the
    index was built with."""
    stored = index.model
    embedder = load_model(model or stored["ref"], image_size=(stored.get("preprocess") or {}).get("image_size"))
    index.check_model(embedder.fingerprint())
    return embedder


def embed_query_files(embedder, paths: Sequence[str | Path]) -> np.ndarray:
    """Embed a few query image files -> float32 [Q, d] (one-line ImageLoadError naming a bad file)."""
    from ..embedding.engine import embed_decoded
    from ..pipeline.datasets import transform_file

    return embed_decoded(embedder, [transform_file(embedder.transform, p) for p in paths])


def serving_workers(workers: int | None = None, device: str | None = None) -> int:
    """How many forwards the server runs at once, and the process's torch intra-op threads set to match.

    On CPU the default is one forward per intra-op thread (at most 4), each forward then single-threaded
    (`guie.runtime.forward_workers`; `torch.set_num_threads`, process-wide): a forward split over the cores stalls
    whenever a request takes one of them (`guie.embedding.batching`). `workers` given: that many, sharing the
    threads. On CUDA: one forward. Call it once, from the serving process, before the model runs."""
    import torch

    from ..runtime import forward_workers
    from ..utils import resolve_device

    if resolve_device(device).type != "cpu":
        return max(1, workers or 1)
    workers, threads_each = forward_workers(workers)
    torch.set_num_threads(threads_each)
    return workers


class EngineEncoder:
    """The server's `QueryEncoder`: the model's preprocessing plus a `DynamicBatcher` over the engine's forward,
    run by `workers` threads (see `serving_workers` for the choice on CPU)."""

    def __init__(self, embedder, max_batch: int = 32, max_wait_ms: float = 5.0, max_queue: int = 128,
                 device: str | None = None, workers: int = 1):
        from ..embedding.batching import DynamicBatcher
        from ..embedding.engine import pixel_forward

        self.embedder = embedder
        self.fingerprint = embedder.fingerprint()
        self.transform = embedder.transform
        self.batcher = DynamicBatcher(pixel_forward(embedder, device), max_batch=max_batch, max_wait_ms=max_wait_ms,
                                      max_queue=max_queue, workers=workers)

    def expect(self):
        """Announce a request still being received (`DynamicBatcher.expect`); yields the ticket for `submit`."""
        return self.batcher.expect()

    def submit(self, images, prepare=None, finish=None, ticket=None):
        """Queue uint8 images [n, 3, S, S] (or their count, with `prepare` making them in the batcher's worker);
        a Future of their embeddings, or of `finish(embeddings)` (`DynamicBatcher.submit`)."""
        return self.batcher.submit(images, prepare, finish, ticket)

    @property
    def stats(self) -> dict:
        """Forwards run, images embedded, requests refused, largest batch, images waiting."""
        from dataclasses import asdict

        return {**asdict(self.batcher.stats), "queued": self.batcher.queued}

    def close(self) -> None:
        """Stop the batcher's worker."""
        self.batcher.close()
