"""Convert once: converted models on disk, keyed by what they depend on.

An entry is a folder `<root>/<runtime>/<key digest>/` holding the runtime's files and `meta.json` (the key, the
runtime's version, guie's version). The key is the model fingerprint (`Embedder.fingerprint`:
weights, preprocessing, output kind), the runtime, the converted precision and the input geometry (3 x S x S,
dynamic batch). A second run with the same model loads the entry instead of converting (seconds to tens of seconds
saved). Entries appear atomically (written in a temporary folder, then renamed), so a killed conversion leaves
nothing half-written behind; two processes converting at once both succeed and one entry stays.

Every problem has one warning and a way on: an entry that cannot be read (damaged files, unreadable meta) or was
written by another version of the runtime is converted again and replaced; a cache folder that cannot be written
(read-only, full disk) leaves the model converted in memory for this run only. Files are written by the runtime's own
serialiser (OpenVINO IR, ONNX); guie adds only the key and the folder discipline.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..._version import __version__ as guie_version
from ...utils import atomic_write_json, default_cache_dir, log


def cache_root(cache_dir: str | Path | None = None) -> Path:
    """Where converted models live: `cache_dir`, else `<guie cache>/runtimes` ($GUIE_CACHE or ~/.cache/guie)."""
    return Path(cache_dir) if cache_dir else default_cache_dir() / "runtimes"


def entry_folder(runtime: str, key: dict, cache_dir: str | Path | None = None) -> Path:
    """The folder of the entry for `key` (which need not exist)."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:20]
    return cache_root(cache_dir) / runtime / digest


def _valid_meta(folder: Path, key: dict, version: str, what: str) -> bool:
    """Whether the entry's meta matches; warns once (and returns False) when it exists but must be rebuilt."""
    try:
        meta = json.loads((folder / "meta.json").read_text())
        if not isinstance(meta, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as e:
        log.warning("converted-model cache %s: unreadable entry (%s); converting again", folder, e)
        return False
    if meta.get("key") != key:
        log.warning("converted-model cache %s: entry of another model; converting again", folder)
        return False
    if meta.get("runtime_version") != version:
        log.warning("converted-model cache %s: written by %s %s, this is %s; converting again", folder, what,
                    meta.get("runtime_version"), version)
        return False
    return True


def load_or_convert(runtime: str, key: dict, version: str, convert: Callable[[], Any],
                    save: Callable[[Any, Path], None], load: Callable[[Path], Any],
                    cache_dir: str | Path | None = None, what: str | None = None) -> Any:
    """The converted model for `key`: loaded from its cache entry, else `convert()`ed and saved (then loaded back
    from the entry, so the first run uses what later runs will).

    Args:
        convert: () -> the converted model in memory.
        save: (model, folder) -> writes the runtime's files into the (new, empty) folder.
        load: folder -> the converted model; raising means the entry is damaged (converted again, one warning).
    """
    what = what or runtime
    folder = entry_folder(runtime, key, cache_dir)
    if folder.is_dir():
        if _valid_meta(folder, key, version, what):
            try:
                return load(folder)
            except Exception as e:  # noqa: BLE001 - any failure to read an entry means: convert again
                log.warning("converted-model cache %s: cannot load (%s: %s); converting again", folder,
                            type(e).__name__, str(e).splitlines()[0] if str(e) else "")
    model = convert()
    tmp = None
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}."))
        save(model, tmp)
        atomic_write_json({"key": key, "runtime": runtime, "runtime_version": version, "guie_version": guie_version},
                          tmp / "meta.json")
        if folder.exists():
            shutil.rmtree(folder, ignore_errors=True)
        try:
            tmp.rename(folder)
        except OSError:  # another process put its entry there first: ours is the same model
            shutil.rmtree(tmp, ignore_errors=True)
        tmp = None
        return load(folder)
    except OSError as e:
        log.warning("converted-model cache %s: cannot write (%s); using the model converted in memory, for this "
                    "run only", folder.parent, e.strerror or e)
        return model
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
