"""Helpers shared by the benchmark scripts (machine description, default data)."""
from __future__ import annotations

import platform
from pathlib import Path

import os

DEFAULT_MANIFEST = str(Path(os.environ.get("GUIE_CACHE", Path.home() / ".cache" / "guie")) / "emoji" / "16.0.0"
                       / "manifest.csv")


def cpu_name() -> str:
    """The CPU model, for the machine line of a benchmark report."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"
