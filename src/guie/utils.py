"""Small helpers shared by every module: atomic writes, device choice, logging."""
from __future__ import annotations

import errno
import json
import logging
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

log = logging.getLogger("guie")


def _umask() -> int:
    """The process umask, read without changing it where Linux exposes it (os.umask would, for other threads)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextmanager
def atomic_output(path: str | Path):
    """Yield a temp file path in `path`'s folder to write by any means (a streaming writer, say); on success it is
    fsynced, given the usual permissions and renamed to `path`, on any error removed: readers never see a partial
    file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb+") as f:
            os.fchmod(f.fileno(), 0o666 & ~_umask())  # mkstemp makes 0600 files
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_bytes(data: bytes, path: str | Path) -> Path:
    """Write to a temp file in the same folder, fsync, then rename: readers never see a partial file."""
    with atomic_output(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def atomic_save(obj: Any, path: str | Path) -> Path:
    """torch.save through a temp file + rename."""
    import io

    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    return atomic_write_bytes(buf.getvalue(), path)


def atomic_write_text(text: str, path: str | Path) -> Path:
    return atomic_write_bytes(text.encode("utf-8"), path)


def atomic_write_json(obj: Any, path: str | Path) -> Path:
    return atomic_write_text(json.dumps(obj, indent=2, default=_json_default) + "\n", path)


def _json_default(o):
    import numpy as np

    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o)}")


def resolve_device(device: str | None = None) -> torch.device:
    """'auto'/None -> $GUIE_DEVICE when set, else cuda if available, else cpu.

    GUIE_DEVICE pins the default for every command and API call that is given no device (the test suite sets it to
    cpu, so its exact-equality checks mean the same on a GPU machine)."""
    import torch

    if device in (None, "auto"):
        device = os.environ.get("GUIE_DEVICE") or "auto"
        if device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def default_cache_dir() -> Path:
    """Where guie keeps downloaded data and feature caches ($GUIE_CACHE, else ~/.cache/guie)."""
    return Path(os.environ.get("GUIE_CACHE", Path.home() / ".cache" / "guie"))


def save_parquet_atomic(df, path: str | Path) -> Path:
    """Write a DataFrame/Table to Parquet atomically."""
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    table = df if isinstance(df, pa.Table) else pa.Table.from_pandas(df, preserve_index=False)
    buf = io.BytesIO()
    pq.write_table(table, buf)
    return atomic_write_bytes(buf.getvalue(), path)


_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


def is_disk_full(exc: BaseException) -> bool:
    """Whether an exception means "no space left": an OSError ENOSPC/EDQUOT, or a C++ library's RuntimeError that
    says so (FAISS, pyarrow and SQLite report it in their own words)."""
    if isinstance(exc, OSError) and exc.errno in _NO_SPACE:
        return True
    text = str(exc).lower()
    return any(s in text for s in ("no space left", "disk quota exceeded", "database or disk is full"))


@contextmanager
def disk_full_as_error(what: str | Path, hint: str = "free some space and run it again"):
    """Turn running out of disk space inside the block into one `DiskFullError` line naming `what` (and `hint`);
    any other exception passes through unchanged."""
    from .errors import DiskFullError

    try:
        yield
    except DiskFullError:
        raise
    except Exception as e:  # noqa: BLE001 - only disk-full errors are translated; the rest is re-raised as is
        if not is_disk_full(e):
            raise
        raise DiskFullError(f"{what}: disk full (no space left on its file system); {hint}") from None
