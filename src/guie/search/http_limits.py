"""ASGI middleware that bounds what one HTTP client may cost the search service before any endpoint runs.

`BodyGuard` covers the request body: its size (413, declared or counted as it arrives), how long it may take
(408 when a client sends more slowly than a minimum rate after a grace period: a stalled upload is dropped after
`grace_s` seconds), how many bodies may be arriving at once (`max_readers`, a pool of its own so that stalled
clients never hold the slots of requests doing real work; when it is full, the slowest body that has been arriving
for over a second is evicted from it, so that a flood of stalled sockets cannot keep new requests out either) and a
client that disconnects mid-upload (one log line, no traceback). uvicorn has none of this: its only timer is the
keep-alive one between requests, and `limit_concurrency` counts stalled connections as busy ones, so it would lock
everyone out as well.

`SecurityHeaders` adds the security headers to every answer. Both are plain ASGI: Starlette's `BaseHTTPMiddleware`
runs each request through an extra task and stream, a measurable share of a small request's CPU.
"""
from __future__ import annotations

import asyncio
import json
import logging
import time

from starlette.requests import ClientDisconnect

log = logging.getLogger("guie.search")

SECURITY_HEADERS = [(b"x-content-type-options", b"nosniff"), (b"referrer-policy", b"no-referrer"),
                    (b"content-security-policy",
                     b"default-src 'self'; img-src 'self' blob: data:; frame-ancestors 'none'")]


class _BodyTooLarge(Exception):
    pass


class _TooSlow(Exception):
    pass


async def plain_error(send, status: int, detail: str, close: bool = False, extra: list | None = None) -> None:
    """A JSON `{"detail": ...}` answer sent straight over ASGI (before or instead of the app)."""
    body = json.dumps({"detail": detail}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
               *(extra or [])]
    if close:
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def client_name(scope) -> str:
    """`host:port` of the peer, for log lines."""
    client = scope.get("client")
    return f"{client[0]}:{client[1]}" if client else "a client"


class BodyGuard:
    """ASGI middleware bounding request bodies (see the module docstring).

    A body must arrive within `grace_s + received / min_rate` seconds of the request's start: a normal upload
    (any size, at any rate above `min_rate` bytes/s) passes, a client that sends a few bytes and stalls is answered
    408 and disconnected after `grace_s`. At most `max_readers` bodies count as arriving at once: a new one evicts
    the slowest that has been arriving for over `EVICT_AFTER_S` (it is answered 408 at its next chunk or deadline
    and no longer counts), else it gets 503."""

    EVICT_AFTER_S = 1.0

    def __init__(self, app, limit: int, grace_s: float = 5.0, min_rate: float = 32 * 1024, max_readers: int = 256):
        self.app, self.limit = app, int(limit)
        self.grace_s, self.min_rate, self.max_readers = float(grace_s), float(min_rate), int(max_readers)
        self._readers: dict[int, list] = {}  # id -> [start, bytes received, evicted]

    @property
    def readers(self) -> int:
        """Bodies counted as arriving now."""
        return len(self._readers)

    def _make_room(self) -> bool:
        """Evict the slowest reader arriving for over EVICT_AFTER_S; False when none qualifies."""
        now = time.monotonic()
        old = [r for r in self._readers.items() if now - r[1][0] > self.EVICT_AFTER_S]
        if not old:
            return False
        key, state = min(old, key=lambda r: r[1][1] / (now - r[1][0]))
        state[2] = True
        del self._readers[key]
        return True

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.limit):
            return await plain_error(send, 413, f"request body larger than {self.limit:,} bytes", close=True)
        if not (b"chunked" in headers.get(b"transfer-encoding", b"").lower() or (declared and int(declared))):
            return await self.app(scope, receive, send)  # no body to wait for
        if self.readers >= self.max_readers and not self._make_room():
            return await plain_error(send, 503, f"busy: {self.readers} uploads already arriving; retry shortly",
                                     close=True, extra=[(b"retry-after", b"1")])
        start = time.monotonic()
        state = [start, 0, False]  # start, bytes received, evicted
        self._readers[id(state)] = state
        reading, received, started = True, 0, False

        def done_reading():
            nonlocal reading
            if reading:
                reading = False
                self._readers.pop(id(state), None)

        async def guarded_receive():
            nonlocal received
            if not reading:
                return await receive()  # after the body: Starlette may listen for a disconnect
            allowed = start + self.grace_s + received / self.min_rate - time.monotonic()
            try:
                message = await asyncio.wait_for(receive(), max(allowed, 0.001))
            except TimeoutError:
                done_reading()
                raise _TooSlow() from None
            if state[2]:  # evicted to make room for a newer request
                done_reading()
                raise _TooSlow()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                state[1] = received
                if received > self.limit:
                    done_reading()
                    raise _BodyTooLarge()
                if not message.get("more_body", False):
                    done_reading()
            else:
                done_reading()
            return message

        async def tracking_send(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, guarded_receive, tracking_send)
        except _BodyTooLarge:
            if not started:
                await plain_error(send, 413, f"request body larger than {self.limit:,} bytes", close=True)
        except _TooSlow:
            log.warning("%s: %s %s sent %d bytes in %.1f s, slower than the minimum rate; dropped",
                        client_name(scope), scope["method"], scope["path"], received, time.monotonic() - start)
            if not started:
                await plain_error(send, 408, f"request body too slow: {received:,} bytes in "
                                             f"{time.monotonic() - start:.1f} s", close=True)
        except ClientDisconnect:
            log.warning("%s: disconnected during %s %s after %d bytes of the body", client_name(scope),
                        scope["method"], scope["path"], received)
        finally:
            done_reading()


class SecurityHeaders:
    """ASGI middleware adding `SECURITY_HEADERS` to every response."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *SECURITY_HEADERS]}
            await send(message)

        await self.app(scope, receive, send_with_headers)
