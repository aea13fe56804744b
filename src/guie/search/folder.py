"""Where a named index lives, and the lock its writers take.

A bare name is a folder under `index_home()`; anything with a slash is a path. One process commits to an index at a
time: `writer_lock` is an flock on `<folder>/.writer.lock`, which the kernel releases even on kill -9.
"""
from __future__ import annotations

import fcntl
import os
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from ..errors import InputError
from ..utils import default_cache_dir

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")
LOCK_FILE = ".writer.lock"


def index_home() -> Path:
    """Where named indexes live: $GUIE_INDEX_HOME, else <guie cache>/indexes."""
    env = os.environ.get("GUIE_INDEX_HOME")
    return Path(env) if env else default_cache_dir() / "indexes"


def resolve_index(name: str | Path) -> Path:
    """A bare name (letters, digits, `_.-`) is a folder under `index_home()`; anything with a slash is a path."""
    s = str(name)
    if "/" in s or os.sep in s or s.startswith("."):
        return Path(s).expanduser()
    if not _NAME.match(s):
        raise InputError(f"index name {s!r}: use letters, digits, '_', '.', '-' (or give a path with a '/')")
    return index_home() / s


@contextmanager
def file_lock(path: Path, blocking: bool = True, on_wait: Callable[[str], None] | None = None) -> Iterator[bool]:
    """An exclusive flock on `path` (created if missing; released by the kernel even on kill -9). Yields whether
    it is held: always when `blocking`; a blocking caller that has to wait is first told `on_wait(holder's pid)`.
    The holder's pid is written into the file for that message."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if not blocking:
                yield False
                return
            if on_wait:
                on_wait(os.pread(fd, 32, 0).decode(errors="replace").strip() or "?")
            fcntl.flock(fd, fcntl.LOCK_EX)
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        try:
            yield True
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def writer_lock(folder: Path, blocking: bool = True):
    """The folder's writer lock (`file_lock` on `LOCK_FILE`): held by whoever commits or writes a snapshot."""
    return file_lock(Path(folder) / LOCK_FILE, blocking)
