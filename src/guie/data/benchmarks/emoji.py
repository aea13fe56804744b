"""The emoji cross-style benchmark: the same emoji drawn by Apple, Google, Twitter and Facebook.

Data comes from the npm packages `emoji-datasource-<vendor>` (fetched at run time with `npm pack` into a cache;
the images are never committed: Apple's are not licensed for redistribution). A class is one base emoji present
in all four vendors' 64 px sets (1,857 in 16.0.0); its four images are one instance seen in four styles.

Split rule (deterministic, independent of category order): classes are sorted by the SHA-256 of their `unified`
code; the first half (rounded up) is the *train half*, the rest is *test*. Within the train half every 5th class
in that order is *val* (model selection), the others *train*. Evaluation: 4 folds, queries = one vendor's images,
index = the other three vendors' (n_q = 3); the score is the mean over folds.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path

import pandas as pd

from ...errors import EnvironmentProblem
from ...utils import atomic_write_text, default_cache_dir, log

VENDORS = ("apple", "google", "twitter", "facebook")
DEFAULT_VERSION = "16.0.0"
VAL_EVERY = 5


def _require_npm() -> None:
    if shutil.which("npm") is None:
        raise EnvironmentProblem("the emoji benchmark needs the `npm` client to fetch its images (apt-get install npm)")


def _npm_pack(package: str, dest: Path) -> Path:
    """Download a package tarball with the npm client (no install, no scripts run)."""
    _require_npm()
    dest.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(["npm", "pack", package, "--silent", "--pack-destination", str(dest)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise EnvironmentProblem(f"npm pack {package} failed: {' '.join(proc.stderr.split())[-500:]}")
    name = proc.stdout.strip().splitlines()[-1]
    return dest / name


def _extract_vendor(tgz: Path, vendor: str, out: Path, want_json: bool) -> None:
    prefix = f"package/img/{vendor}/64/"
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{vendor}."))
    try:
        with tarfile.open(tgz, "r:gz") as tar:
            for member in tar:
                name = member.name
                in_folder = name.startswith(prefix) and "/" not in name[len(prefix):]
                if member.isfile() and in_folder and name.endswith(".png"):
                    target = tmp / vendor / name[len(prefix):]
                elif want_json and name == "package/emoji.json":
                    target = tmp / "emoji.json"
                else:
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                with tar.extractfile(member) as src, open(target, "wb") as dst:
                    shutil.copyfileobj(src, dst)
        if want_json:
            (tmp / "emoji.json").replace(out / "emoji.json")
        if (out / vendor).exists():
            shutil.rmtree(out / vendor)
        (tmp / vendor).replace(out / vendor)  # atomic per vendor: a half-extracted vendor never looks complete
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def class_split(unified_codes: list[str], val_every: int = VAL_EVERY) -> dict[str, str]:
    """Deterministic train/val/test assignment of emoji classes (see module docstring)."""
    order = sorted(unified_codes, key=lambda u: hashlib.sha256(u.encode()).hexdigest())
    n_train_half = (len(order) + 1) // 2
    split = {}
    for rank, code in enumerate(order):
        if rank >= n_train_half:
            split[code] = "test"
        else:
            split[code] = "val" if rank % val_every == val_every - 1 else "train"
    return split


def build_emoji_benchmark(cache_dir: str | Path | None = None, version: str = DEFAULT_VERSION,
                          vendors: tuple[str, ...] = VENDORS, force: bool = False) -> Path:
    """Fetch (once) and build the benchmark; returns the manifest path (CSV: path,label,domain,vendor,split,...)."""
    root = Path(cache_dir or default_cache_dir()) / "emoji" / version
    manifest = root / "manifest.csv"
    if manifest.exists() and not force:
        return manifest
    fetch = [v for v in vendors if force or not ((root / v).is_dir() and (root / "emoji.json").exists())]
    if fetch:
        _require_npm()  # before anything is fetched or written: one line saying what is missing
    root.mkdir(parents=True, exist_ok=True)
    for vendor in fetch:
        log.info("fetching emoji-datasource-%s@%s with npm", vendor, version)
        with tempfile.TemporaryDirectory(dir=root) as tmp:
            tgz = _npm_pack(f"emoji-datasource-{vendor}@{version}", Path(tmp))
            _extract_vendor(tgz, vendor, root, want_json=not (root / "emoji.json").exists())
    entries = json.loads((root / "emoji.json").read_text())
    rows = []
    present = {v: {p.name for p in (root / v).iterdir()} for v in vendors}
    base = [e for e in entries if all(e["image"] in present[v] for v in vendors)]
    split = class_split([e["unified"] for e in base])
    for e in base:
        for v in vendors:
            rows.append({"path": f"{v}/{e['image']}", "label": e["unified"], "domain": e["category"],
                         "vendor": v, "split": split[e["unified"]], "subcategory": e.get("subcategory", ""),
                         "name": e.get("name") or e.get("short_name", "")})
    df = pd.DataFrame(rows)
    atomic_write_text(df.to_csv(index=False), manifest)
    log.info("emoji benchmark: %d classes x %d vendors -> %s", len(base), len(vendors), manifest)
    return manifest
