"""Milvus Lite without its open local port.

pymilvus opens a `.db` path by asking milvus-lite (3.x) to start a gRPC server on 127.0.0.1 at a free TCP port,
with no authentication: any local user who finds the port (`ss -ltn`) can read, change or drop the collection while
the index is open. Here the same server (milvus-lite's own servicer over the same data folder) listens on a unix
socket instead, in a fresh folder only this user may enter (mode 0700), and pymilvus connects through it
(`unix:` URIs are pymilvus's own). One server per data folder and process, stopped when its last user closes
it (`release`) or at exit.

milvus-lite 2.x ran a C++ server on a unix socket already; where the 3.x servicer is missing, `local_uri` returns
None and the caller lets pymilvus start its own.
"""
from __future__ import annotations

import atexit
import shutil
import tempfile
import threading
from pathlib import Path

_MAX_MESSAGE = 256 * 2**20  # milvus-lite's own limit
_servers: dict[str, tuple] = {}
_lock = threading.Lock()


def local_uri(data: str | Path, workers: int = 8) -> str | None:
    """A `unix:` URI serving the Milvus Lite data folder `data` (started on first use in this process), or None
    when this milvus-lite has no in-process gRPC servicer."""
    try:
        from concurrent import futures

        import grpc
        from milvus_lite import MilvusLite
        from milvus_lite.adapter.grpc.servicer import MilvusServicer
        from pymilvus.grpc_gen import milvus_pb2_grpc
    except ImportError:
        return None
    key = str(Path(data).resolve())
    with _lock:
        if key in _servers:
            return _servers[key][0]
        folder = tempfile.mkdtemp(prefix="guie-milvus-")  # mode 0700: only this user may reach the socket
        uri = f"unix:{folder}/milvus.sock"
        db = MilvusLite(key)
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers),
                             options=[("grpc.max_receive_message_length", _MAX_MESSAGE),
                                      ("grpc.max_send_message_length", _MAX_MESSAGE)])
        milvus_pb2_grpc.add_MilvusServiceServicer_to_server(MilvusServicer(db), server)
        server.add_insecure_port(uri)
        server.start()
        if not _servers:
            atexit.register(stop_all)
        _servers[key] = (uri, server, db, folder)
        return uri


def release(data: str | Path) -> None:
    """Stop the server of `data` (its last user in this process closed it), which releases the data folder."""
    with _lock:
        entry = _servers.pop(str(Path(data).resolve()), None)
    if entry is not None:
        _stop(entry)


def _stop(entry: tuple) -> None:
    _, server, db, folder = entry
    server.stop(grace=2).wait(5)
    db.close()
    shutil.rmtree(folder, ignore_errors=True)


def stop_all() -> None:
    """Stop every server `local_uri` started (at exit)."""
    with _lock:
        entries, _ = list(_servers.values()), _servers.clear()
    for entry in entries:
        _stop(entry)
