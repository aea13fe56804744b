"""`guie index add NAME FOLDER --watch`: keep an index in step with a folder.

    1. `sync(None)` compares the whole folder with the items stored under it: items whose file is gone or whose
       content changed are removed and files whose content is not indexed are embedded and added, in ONE commit
       (`ImageIndex.replace`: a rename or a change is never half-applied). That is also how a restart after a
       kill -9 catches up: the index holds whole commits only, and the folder is compared afresh.
    2. Then `watchdog` reports created, modified, deleted and moved files (inotify on Linux; polling elsewhere, or
       when inotify's watches or instances run out: one warning line says so and how to raise the limit); the paths
       are collected and synced together every `batch_s` seconds (a burst of changes is one commit).
    3. A watched folder that disappears stops the watch with a one-line error; the index keeps its last commit.

An item is identified by its content (adding the same bytes again is a no-op), so a renamed file is its old item
removed and its content added under the new path (embedded again: the index keeps no vectors by path).
"""
from __future__ import annotations

import errno
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import InputError
from .image_index import UPLOADS, ImageIndex
from .ingest import add_lock, relative_path
from .store import NewItem

log = logging.getLogger(__name__)
POLL_SECONDS = 1.0


class WatchError(InputError):
    """The watched folder cannot be watched (missing, not a folder, vanished while watched)."""


@dataclass
class SyncReport:
    """One sync: items removed and added, files that could not be read, the last commit."""

    removed: int = 0
    added: int = 0
    seq: int = 0
    errors: list[str] = field(default_factory=list)


def start_observer(folder: Path, handler, polling: bool = False, make_observer: Callable | None = None,
                   say: Callable[[str], None] = log.warning):
    """A started watchdog observer of `folder` (recursive) calling `handler`: inotify where it can, else polling
    (every POLL_SECONDS); when inotify's watches or instances run out, `say` explains and polling takes over."""
    from watchdog.observers import Observer
    from watchdog.observers.polling import PollingObserver

    if not polling:
        observer = (make_observer or Observer)()
        try:
            observer.schedule(handler, str(folder), recursive=True)
            observer.start()
            return observer
        except OSError as e:
            if e.errno not in (errno.ENOSPC, errno.EMFILE):
                raise
            say(f"{folder}: inotify ran out of {'watches' if e.errno == errno.ENOSPC else 'instances'} ({e}); "
                f"watching by polling every {POLL_SECONDS:g} s instead (raise the limit for instant events: sysctl "
                f"fs.inotify.max_user_{'watches' if e.errno == errno.ENOSPC else 'instances'})")
    observer = PollingObserver(timeout=POLL_SECONDS)
    observer.schedule(handler, str(folder), recursive=True)
    observer.start()
    return observer


class FolderWatcher:
    """Keeps `index` in step with `folder` (see the module docstring), embedding with `embedder` (the index's
    model) through the engine's forward (`runtime`, `precision`, `device` as everywhere)."""

    def __init__(self, index: ImageIndex, folder: str | Path, embedder, batch_s: float = 2.0, batch_size: int = 64,
                 device=None, runtime: str = "auto", precision: str = "auto",
                 report: Callable[[str], None] | None = None):
        self.index, self.embedder = index, embedder
        self.folder = Path(folder).resolve()
        self.batch_s, self.batch_size = batch_s, batch_size
        self.say = report or log.warning
        self._inference = {"device": device, "runtime": runtime, "precision": precision}
        self._forward = None
        self._dirty: set[Path] = set()
        self._rescan = False
        self._lock = threading.Lock()
        self._check_folder()
        index.check_model(embedder.fingerprint())
        root = index.set_image_root(self.folder)
        self.prefix = relative_path(str(self.folder), root)
        if self.prefix.startswith(("/", "../")):
            raise WatchError(f"{self.folder}: not under index {index.name!r}'s image root {root}: watch a folder "
                             "inside it (or the root itself)")
        self.prefix = "" if self.prefix == "." else self.prefix

    def _check_folder(self) -> None:
        if not self.folder.is_dir():
            raise WatchError(f"{self.folder}: the watched folder is gone (or is not a folder); index "
                             f"{self.index.name!r} keeps its last commit ({self.index.seq})")

    # -- comparing the folder with the index ------------------------------------------------------------------
    def _label(self, path: Path) -> str | None:
        parent = path.parent.relative_to(self.folder).as_posix()
        return None if parent == "." else parent

    def _embed(self, paths: list[Path]) -> tuple[np.ndarray, list[Path], list[str]]:
        """(vectors, the paths embedded, one line per unreadable file)."""
        from ..embedding.engine import pixel_forward
        from ..imaging.io import ImageLoadError
        from ..pipeline.datasets import stack_images, transform_file

        if self._forward is None:
            self._forward = pixel_forward(self.embedder, **self._inference)
        vectors, kept, errors = [], [], []
        for lo in range(0, len(paths), self.batch_size):
            pixels = []
            for p in paths[lo:lo + self.batch_size]:
                try:
                    pixels.append(transform_file(self.embedder.transform, p))
                    kept.append(p)
                except ImageLoadError as e:
                    errors.append(str(e))
                except OSError as e:  # deleted or unreadable since it was hashed
                    errors.append(f"{p}: cannot be read ({e.strerror})")
            if pixels:
                vectors.append(self._forward(stack_images(pixels)))
        dim = self.index.dim
        return (np.concatenate(vectors) if vectors else np.empty((0, dim), np.float32)), kept, errors

    def sync(self, paths: set[Path] | None = None) -> SyncReport:
        """Bring the items under the folder in line with its files: all of them (`paths` None), or only these
        paths (files or folders that changed). At most one commit."""
        from ..data.dedup import file_digests
        from ..imaging.io import IMAGE_EXTENSIONS

        self._check_folder()
        root = self.index.image_root
        if paths is None or any(p.is_dir() for p in paths):
            from ..data.manifest import folder_files

            files = [p for p in folder_files(self.folder)[0] if p.suffix.lower() in IMAGE_EXTENSIONS]
            stored = self.index.path_items(prefix=self.prefix)
        else:
            paths = {p for p in paths if p.resolve().is_relative_to(self.folder)}  # moved out: only the source counts
            files = sorted(p for p in paths if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
            stored = self.index.path_items(paths=[relative_path(str(p), root) for p in paths])
        stored = {i: ph for i, ph in stored.items() if not ph[0].startswith((UPLOADS, "/", "../"))}
        digests = file_digests([str(p) for p in files], workers=1, progress=False, images_only=True) if files else []
        current = {relative_path(str(p), root): (p, d) for p, d in zip(files, digests) if d is not None}
        report = SyncReport(seq=self.index.seq)
        report.errors = [f"{p}: cannot be read" for p, d in zip(files, digests) if d is None]
        with add_lock(self.index):
            stale = [i for i, (path, h) in stored.items() if path not in current or current[path][1] != h]
            # content indexed under a path that goes now (a rename) is free to be added under its new path
            going = set(stale)
            known = {h for h, i in self.index.ids_for_hashes([d for _, d in current.values()]).items()
                     if i not in going}
            todo, seen = [], set()
            for p, d in current.values():
                if d not in known and d not in seen:
                    seen.add(d)
                    todo.append((p, d))
            vectors, kept, errors = self._embed([p for p, _ in todo]) if todo else (None, [], [])
            report.errors += errors
            hashes = dict(todo)
            items = [NewItem(hashes[p], relative_path(str(p), root), self._label(p), {}) for p in kept]
            if stale or items:
                vectors = vectors if items else np.empty((0, self.index.dim), np.float32)
                report.seq, removed, result = self.index.replace(stale, vectors, items, op=f"watch {self.folder.name}")
                report.removed, report.added = len(removed), result.added
        return report

    # -- watching -----------------------------------------------------------------------------------------------
    def _note(self, *paths: str) -> None:
        with self._lock:
            for p in paths:
                if p:
                    self._dirty.add(Path(p))

    def handler(self):
        """A watchdog event handler that records changed paths (folders: a rescan) for the next sync."""
        from watchdog.events import FileSystemEventHandler

        watcher = self

        class Handler(FileSystemEventHandler):
            def on_any_event(self, event):
                if event.event_type in ("opened", "closed_no_write"):
                    return
                if event.is_directory and event.event_type in ("deleted", "moved", "created"):
                    with watcher._lock:
                        watcher._rescan = True
                    return
                if not event.is_directory:
                    watcher._note(event.src_path, getattr(event, "dest_path", ""))

        return Handler()

    def take(self) -> set[Path] | None | bool:
        """The paths changed since the last call (None: rescan the folder; False: nothing changed)."""
        with self._lock:
            if self._rescan:
                self._rescan, self._dirty = False, set()
                return None
            if not self._dirty:
                return False
            dirty, self._dirty = self._dirty, set()
            return dirty

    def run(self, stop: threading.Event | None = None, polling: bool = False,
            on_sync: Callable[[SyncReport], None] | None = None, make_observer: Callable | None = None) -> None:
        """Sync the whole folder, then watch it and sync what changed every `batch_s` seconds until `stop` is set
        (or forever); raises WatchError when the folder disappears."""
        stop = stop or threading.Event()
        observer = start_observer(self.folder, self.handler(), polling, make_observer, self.say)
        try:
            report = self.sync(None)
            if on_sync:
                on_sync(report)
            while not stop.wait(self.batch_s):
                self._check_folder()
                changed = self.take()
                if changed is False:
                    continue
                report = self.sync(changed)
                if on_sync and (report.added or report.removed or report.errors):
                    on_sync(report)
        finally:
            observer.stop()
            observer.join(5)


__all__ = ["FolderWatcher", "SyncReport", "WatchError", "start_observer"]
