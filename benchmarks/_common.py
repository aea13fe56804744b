"""Helpers shared by the benchmark scripts (machine description, default data)."""
from __future__ import annotations

import platform
from pathlib import Path

from guie.data.benchmarks.emoji import DEFAULT_VERSION
from guie.utils import default_cache_dir

# where `guie data emoji` puts the benchmark ($GUIE_CACHE, else ~/.cache/guie)
DEFAULT_MANIFEST = str(default_cache_dir() / "emoji" / DEFAULT_VERSION / "manifest.csv")


def cpu_name() -> str:
    """The CPU model, for the machine line of a benchmark report."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"
