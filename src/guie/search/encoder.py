"""The model side of an index: how it is described in the index header, loaded back (and checked), and run on
query images, through the embedding engine (`guie.embedding.engine`) in every case."""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .image_index import ImageIndex, SearchIndexError


def model_reference(model: str | Path) -> str:
    """What the header stores to load the model again: a checkpoint's absolute path, or a backbone name."""
    p = Path(str(model)).expanduser()
    return str(p.resolve()) if p.is_file() else str(model)


def describe_model(embedder, model: str | Path) -> dict:
    """The header's model entry: reference, fingerprint (`Embedder.fingerprint`), preprocessing and output dimension."""
    return {"ref": model_reference(model), "fingerprint": embedder.fingerprint(),
            "preprocess": embedder.preprocess.to_dict(), "dim": int(embedder.embed_dim)}


def load_model(model: str | Path, image_size: int | None = None, crop_pct: float | None = None):
    """An Embedder from a checkpoint path or backbone name, in eval mode."""
    from ..models.embedder import resolve_embedder

    return resolve_embedder(str(model), image_size=image_size, crop_pct=crop_pct).eval()


def load_index_model(index: ImageIndex, model: str | Path | None = None, image_size: int | None = None,
                     crop_pct: float | None = None):
    """The index's model (from its header, or `model` given instead; `image_size`, `crop_pct` default to the
    index's), refused unless its fingerprint is the one the index was built with."""
    from ..errors import MissingFileError

    stored = index.model
    pre = stored.get("preprocess") or {}
    try:
        embedder = load_model(model or stored["ref"], image_size=image_size or pre.get("image_size"),
                              crop_pct=crop_pct if crop_pct is not None else pre.get("crop_pct"))
    except MissingFileError:
        if model:
            raise
        raise SearchIndexError(f"{stored['ref']}: model file not found (index {index.name!r} was built with it: "
                               "restore it, or give a copy of the same model)") from None
    index.check_model(embedder.fingerprint())
    return embedder


def embed_query_files(embedder, paths: Sequence[str | Path], batch_size: int = 64, device=None,
                      runtime: str = "auto", precision: str = "auto") -> np.ndarray:
    """Embed a few query image files -> float32 [Q, d] (one-line ImageLoadError naming a bad file)."""
    from ..embedding.engine import embed_decoded
    from ..pipeline.datasets import transform_file

    return embed_decoded(embedder, [transform_file(embedder.transform, p) for p in paths], batch_size=batch_size,
                         device=device, runtime=runtime, precision=precision)


class EngineEncoder:
    """The server's `QueryEncoder`: the model's preprocessing plus a `DynamicBatcher` over the engine's forward
    (`runtime` at `precision`, `guie.embedding.runtimes`), run by as many threads as the runtime serves at once
    (`workers` given: that many forwards at once; on CPU by default one single-threaded forward per core, up
    to 4 for torch, or one OpenVINO stream per core: a forward split over the cores stalls whenever a request takes
    one of them, `guie.embedding.batching`)."""

    def __init__(self, embedder, max_batch: int = 32, max_wait_ms: float = 5.0, max_queue: int = 128,
                 device: str | None = None, workers: int | None = 1, runtime: str = "auto", precision: str = "auto"):
        import torch

        from ..embedding.batching import DynamicBatcher
        from ..embedding.engine import pixel_forward

        self.embedder = embedder
        self.fingerprint = embedder.fingerprint()
        self.transform = embedder.transform
        forward = pixel_forward(embedder, device, runtime=runtime, precision=precision, forwards=workers)
        if forward.runtime.threads_each:  # torch on CPU: each batcher thread runs a forward on its share (process-wide)
            torch.set_num_threads(forward.runtime.threads_each)
        self.runtime = forward.runtime
        self.batcher = DynamicBatcher(forward, max_batch=max_batch, max_wait_ms=max_wait_ms, max_queue=max_queue,
                                      workers=workers or forward.parallel)

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
