"""Debian packages as a data source: `apt-get download` + `dpkg-deb -x` into guie's cache (no root, no install).

The glyph and icon benchmarks draw their images from what Debian's font and icon-theme packages ship, fetched at
run time with the machine's own apt client (never committed), as the emoji benchmark uses npm.
"""
from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

from ...errors import EnvironmentProblem
from ...utils import atomic_write_text, log

DONE_MARKER = ".guie-version"  # written last: a package folder without it is an interrupted extraction


def _run(cmd: list[str], what: str, cwd: Path | None = None) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=cwd)
    if proc.returncode != 0:
        raise EnvironmentProblem(f"{what} failed: {' '.join((proc.stderr or proc.stdout).split())[-500:]}")
    return proc.stdout


def package_version(root: Path, package: str) -> str | None:
    """The Debian version of an extracted package in `root`, or None if it is not (completely) there."""
    marker = Path(root) / package / DONE_MARKER
    return marker.read_text().strip() if marker.is_file() else None


def fetch_debian_packages(packages: list[str] | tuple[str, ...], root: str | Path,
                          force: bool = False) -> dict[str, Path]:
    """Download and unpack Debian packages into `root/<package>/` (the package's file tree, e.g. usr/share/...).

    Packages already unpacked are kept; the others are fetched in one `apt-get download` call (the client's own
    sources and cache; no root needed) and extracted with `dpkg-deb -x`, each atomically (a temporary folder renamed
    into place), so an interrupted run never leaves a half package that looks complete.
    Returns {package: its folder}. Raises RuntimeError naming the package(s) when apt cannot get them.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    missing = [p for p in packages if force or package_version(root, p) is None]
    if missing:
        for tool in ("apt-get", "dpkg-deb"):
            if shutil.which(tool) is None:
                raise EnvironmentProblem(f"fetching Debian packages needs `{tool}` (a Debian/Ubuntu machine)")
        log.info("fetching %d Debian package(s) with apt-get: %s", len(missing), " ".join(missing))
        with tempfile.TemporaryDirectory(dir=root, prefix=".download.") as tmp:
            tmp = Path(tmp)
            try:
                _run(["apt-get", "download", *missing], "apt-get download", cwd=tmp)
            except RuntimeError as e:
                raise EnvironmentProblem(f"{e} (packages: {' '.join(missing)}; run `apt-get update` first if the "
                                   "package lists are missing)") from None
            for package in missing:
                debs = sorted(tmp.glob(f"{package}_*.deb"))
                if not debs:
                    raise EnvironmentProblem(f"apt-get download did not produce a .deb for {package}")
                version = _run(["dpkg-deb", "-f", str(debs[-1]), "Version"], f"dpkg-deb -f {debs[-1].name}").strip()
                staging = Path(tempfile.mkdtemp(dir=root, prefix=f".{package}."))
                try:
                    _run(["dpkg-deb", "-x", str(debs[-1]), str(staging)], f"dpkg-deb -x {debs[-1].name}")
                    atomic_write_text(version + "\n", staging / DONE_MARKER)
                    if (root / package).exists():
                        shutil.rmtree(root / package)
                    staging.replace(root / package)
                finally:
                    shutil.rmtree(staging, ignore_errors=True)
    return {p: root / p for p in packages}
