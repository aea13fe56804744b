"""How much decoding one search request, and one client, may cost the server.

A PNG of a few kilobytes can declare 30 Mpx (a 1-bit 5700x5700 image is 4 KB and takes ~0.25 s of a core to
decode), and the decode must run in full: only JPEG can be decoded at a reduced scale (DCT scaling, `draft`), and
the pixels a query gets must be the ones its image got when it was indexed, so no cheaper approximate decode is
allowed. The bounds are therefore on the work a request may ask for, read from the image headers before any pixel
is decoded (`decode_cost`: the pixels the decoder will produce, after JPEG's reduced scale):

- per query image: `max_query_pixels` (a query needs no more than the model's input; a photo that large is a JPEG
  and decodes at 1/8 scale, so only synthetic or lossless images meet this limit);
- per request: `max_request_pixels` over all its images;
- per client and overall: a request whose images decode to more than `heavy_pixels` is *heavy* and is decoded in
  a lane of its own, one thread (at most one core, whatever the number of heavy requests), never in the batcher's
  workers that serve everyone else; a client (peer address) may have `heavy_per_client` heavy requests admitted at
  once (429 beyond) and the lane holds `heavy_queue` requests (503 beyond). The lane's thread runs at a lower
  CPU priority (nice 10), and every refusal is answered after a pause (`ServerSettings.refusal_delay_s`), so that a
  client sending heavy requests back to back cannot turn cheap refusals into a flood either.
"""
from __future__ import annotations

import asyncio
import io
import os
import threading
import warnings
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

from ..errors import GuieError

_JPEG_SCALES = (8, 4, 2, 1)


class DecodeRefused(GuieError):
    """A request whose decoding would cost more than its share; `status` is the HTTP answer (413, 429, 503)."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def decode_cost(data: bytes, draft_size: int | None = None) -> int:
    """The pixels decoding `data` will produce, read from its header only: width x height, divided by JPEG's DCT
    scale (1/2, 1/4, 1/8) where the decoder reduces it for a model input of short side `draft_size`. 0 when the
    header is unreadable: the decode that follows refuses the file with its own one-line reason."""
    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as im:
                w, h = im.size
                fmt, mode = im.format, im.mode
    except Exception:  # noqa: BLE001 - any unreadable header: the decode step names the reason
        return 0
    scale = 1
    if fmt == "JPEG" and draft_size and mode in ("RGB", "L"):
        scale = next(s for s in _JPEG_SCALES if s == 1 or min(w, h) // s >= draft_size)
    return -(-w // scale) * -(-h // scale)


class DecodeLane:
    """The heavy-decode lane: one thread, `heavy_queue` requests at most, `heavy_per_client` per client."""

    def __init__(self, heavy_pixels: int, heavy_per_client: int = 2, heavy_queue: int = 8):
        self.heavy_pixels, self.per_client, self.capacity = int(heavy_pixels), int(heavy_per_client), int(heavy_queue)
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="guie-heavy-decode", initializer=_lower_priority)
        self._clients: Counter = Counter()
        self._admitted = 0
        self._lock = threading.Lock()

    def is_heavy(self, pixels: int) -> bool:
        """Whether a request decoding `pixels` in all goes through this lane."""
        return pixels > self.heavy_pixels

    @contextmanager
    def admit(self, client: str):
        """Hold a place in the lane for a heavy request of `client`; DecodeRefused (429/503) when none is left."""
        with self._lock:
            if self._clients[client] >= self.per_client:
                raise DecodeRefused(429, f"too many large images at once from this client ({self.per_client} "
                                         "requests decoding); send it when one has finished")
            if self._admitted >= self.capacity:
                raise DecodeRefused(503, f"busy: {self._admitted} requests with large images already decoding; "
                                         "retry shortly")
            self._clients[client] += 1
            self._admitted += 1
        try:
            yield
        finally:
            with self._lock:
                self._admitted -= 1
                self._clients[client] -= 1
                if not self._clients[client]:
                    del self._clients[client]

    async def run(self, fn: Callable):
        """`fn()` in the lane's thread, awaited."""
        return await asyncio.wrap_future(self._pool.submit(fn))

    def close(self) -> None:
        """Stop the lane's thread once its work is done."""
        self._pool.shutdown(wait=False, cancel_futures=True)


def _lower_priority(niceness: int = 10) -> None:
    """Run the calling thread at a lower CPU priority (Linux: a thread is a task with its own nice value), so that
    a core shared with the batcher's workers goes to them first."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), niceness)
    except (AttributeError, OSError):  # not Linux, or not allowed: the lane still holds one thread only
        pass
