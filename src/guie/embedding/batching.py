"""Dynamic batching: concurrent requests' images go through the model in one forward (`engine.pixel_forward`).

A server that runs one forward per request under a lock pays the model's fixed per-call cost for every request and
leaves batch parallelism unused; here each request hands its preprocessed images to one worker thread, which waits
at most `max_wait_ms` after the first arrival for more (up to `max_batch` images), runs one forward over all of
them and hands each request its rows back. Under load the batches fill up by themselves; a lone request waits at
most `max_wait_ms`.

With `workers` > 1 several such threads take batches in turn, so one batch can be prepared and answered while
another runs. On CPU this is how the server uses the cores (`guie.search.encoder.EngineEncoder`): one forward per
core with one intra-op thread each. A forward split over the cores with OpenMP stalls as a whole whenever any other
thread of the machine (request parsing, decoding, the clients) takes one of its cores, since its threads meet at a
barrier after every layer; independent single-threaded forwards only lose the time actually taken from them. On
2 cores, two single-threaded forwards of batch 8 embedded 75 images/s where one two-threaded forward made 66.

The queue is bounded (`max_queue` images waiting): a burst beyond it is refused at once with `Overloaded` (HTTP
503), so memory stays bounded instead of the machine swapping.
"""
from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch

from ..errors import GuieError, InputError


class Overloaded(GuieError, RuntimeError):
    """The work queue is full: try again shortly."""


@dataclass
class _Job:
    n: int
    images: torch.Tensor | None  # uint8 [n, 3, S, S]; None until `prepare` made them
    prepare: Callable[[], torch.Tensor] | None = None
    finish: Callable[[np.ndarray], object] | None = None
    future: Future = field(default_factory=Future)


@dataclass
class Ticket:
    """An announced request (`DynamicBatcher.expect`) that has not submitted yet."""

    pending: bool = True


@dataclass
class BatcherStats:
    """Counters since start: forwards run, images embedded, requests refused, the largest batch seen, and how many
    forwards each batch size had (size -> forwards; `GET /metrics` turns it into a histogram)."""

    forwards: int = 0
    images: int = 0
    refused: int = 0
    largest_batch: int = 0
    sizes: dict = field(default_factory=dict)


class DynamicBatcher:
    """`workers` threads (default one) sharing `forward` (uint8 images [B, 3, S, S] -> float32 [B, d], e.g.
    `guie.embedding.engine.pixel_forward(embedder)`); see the module docstring."""

    def __init__(self, forward: Callable[[torch.Tensor], np.ndarray], max_batch: int = 32, max_wait_ms: float = 5.0,
                 max_queue: int = 128, name: str = "guie-batcher", workers: int = 1):
        if max_batch < 1 or max_queue < max_batch:
            raise InputError(f"need 1 <= max_batch ({max_batch}) <= max_queue ({max_queue})")
        if workers < 1:
            raise InputError(f"need at least one worker, got {workers}")
        self.forward, self.max_batch, self.max_wait = forward, int(max_batch), max_wait_ms / 1000.0
        self.max_queue = int(max_queue)
        self.stats = BatcherStats()
        self._jobs: deque[_Job] = deque()
        self._queued = 0  # images waiting
        self._cond = threading.Condition()
        self._closed = False
        self._gathering = False  # a worker is waiting for its batch to fill
        self._expected = 0  # requests announced with `expect` that have not submitted yet
        self._announcing = False  # a caller uses `expect`: gathering waits only while something is expected
        self._threads = [threading.Thread(target=self._run, name=f"{name}-{i}" if workers > 1 else name, daemon=True)
                         for i in range(int(workers))]
        for thread in self._threads:
            thread.start()

    @contextmanager
    def expect(self) -> Iterator[Ticket]:
        """Announce a request that is still being received and will `submit` soon (passing the yielded ticket).

        A worker gathering a batch then waits for announced requests too (at most `max_wait_ms` after the first
        queued one), and once any caller announces, it stops waiting as soon as nothing more is announced: under
        load the batches take every request that has arrived, and a lone request does not wait at all."""
        ticket = Ticket()
        with self._cond:
            self._announcing = True
            self._expected += 1
        try:
            yield ticket
        finally:
            self._redeem(ticket)

    def _redeem(self, ticket: Ticket | None) -> None:
        with self._cond:
            if ticket is not None and ticket.pending:
                ticket.pending = False
                self._expected -= 1
                self._cond.notify_all()

    def submit(self, images: torch.Tensor | int, prepare: Callable[[], torch.Tensor] | None = None,
               finish: Callable[[np.ndarray], object] | None = None, ticket: Ticket | None = None) -> Future:
        """Queue a request's images (uint8 [n, 3, S, S]); the Future resolves to their float32 [n, d] embeddings.

        With `prepare`, `images` is just their count n and a worker calls `prepare()` for the tensor right before
        the forward; with `finish`, the Future resolves to `finish(embeddings)`, also run by the worker. A server
        uses them to decode and to search in the worker, with no extra thread hand-off per request. An exception
        in either fails this request only. `ticket`: from `expect`, when the request was announced.

        Raises Overloaded when the queue cannot take them."""
        n = int(images) if prepare is not None else int(images.shape[0])
        if n < 1:
            raise InputError("no images to embed")
        job = _Job(n, None if prepare is not None else images, prepare, finish)
        with self._cond:  # (re-entrant: `_redeem` takes it too) the ticket ends as the job is queued, atomically
            self._redeem(ticket)
            if self._closed:
                raise Overloaded("the server is shutting down")
            if self._queued + n > self.max_queue:
                self.stats.refused += 1
                raise Overloaded(f"busy: {self._queued} images already queued (limit {self.max_queue}); retry shortly")
            self._jobs.append(job)
            self._queued += n
            self._cond.notify_all()
        return job.future

    def embed(self, images: torch.Tensor, timeout: float | None = None) -> np.ndarray:
        """Blocking `submit`: the embeddings of `images`."""
        return self.submit(images).result(timeout)

    @property
    def queued(self) -> int:
        """Images waiting for a forward."""
        return self._queued

    def _take_batch(self) -> list[_Job] | None:
        with self._cond:
            # One worker at a time gathers a batch; the others wait their turn (or for work).
            while (not self._jobs or self._gathering) and not self._closed:
                self._cond.wait()
            if self._closed and not self._jobs:
                return None
            self._gathering = True
            deadline = time.monotonic() + self.max_wait
            # Wait for more work until the batch is full or the first job has waited max_wait.
            while self._queued < self.max_batch and not self._closed and (self._expected or not self._announcing):
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            batch, size = [], 0
            while self._jobs and (not batch or size + self._jobs[0].n <= self.max_batch):
                job = self._jobs.popleft()
                batch.append(job)
                size += job.n
            self._queued -= size
            self._gathering = False
            self._cond.notify_all()  # the next worker may gather what is left
            return batch

    def _run(self) -> None:
        while (batch := self._take_batch()) is not None:
            live = [j for j in batch if j.future.set_running_or_notify_cancel()]
            for j in live:
                if j.prepare is not None:
                    try:
                        j.images = j.prepare()
                        if int(j.images.shape[0]) != j.n:
                            raise ValueError(f"prepare gave {j.images.shape[0]} images, {j.n} announced")
                    except BaseException as e:  # noqa: BLE001 - this request's failure, reported to it alone
                        j.future.set_exception(e)
            live = [j for j in live if not j.future.done()]
            if not live:
                continue
            try:
                images = torch.cat([j.images for j in live]) if len(live) > 1 else live[0].images
                out = self.forward(images)
            except BaseException as e:  # noqa: BLE001 - every waiting request must learn about the failure
                for j in live:
                    j.future.set_exception(e)
                continue
            with self._cond:
                self.stats.forwards += 1
                self.stats.images += len(out)
                self.stats.largest_batch = max(self.stats.largest_batch, len(out))
                self.stats.sizes[len(out)] = self.stats.sizes.get(len(out), 0) + 1
            start = 0
            for j in live:
                rows, start = out[start:start + j.n], start + j.n
                j.images = None  # the pixels are not needed any more
                try:
                    j.future.set_result(rows if j.finish is None else j.finish(rows))
                except BaseException as e:  # noqa: BLE001 - this request's failure, reported to it alone
                    j.future.set_exception(e)

    def close(self, timeout: float = 10.0) -> None:
        """Finish the queued work, then stop the workers."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        for thread in self._threads:
            thread.join(timeout)
