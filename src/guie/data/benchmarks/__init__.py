"""The built-in cross-style benchmarks by name: how each is built and how it is evaluated.

| name   | class          | styles (one image each)        | source (fetched at run time)       | folds   |
|--------|----------------|--------------------------------|------------------------------------|---------|
| emoji  | an emoji       | 4 vendors                      | npm `emoji-datasource-*`           | vendor  |
| glyphs | a character    | 27 font families               | Debian font packages (apt-get)     | font    |
| icons  | an icon name   | 12 icon themes                 | Debian icon-theme packages         | theme   |

Every benchmark has the same split columns (`split` = train / val / test by class) and is scored leave-one-style-out:
queries = one style's images, index = the other styles' images of the same classes, mean over styles.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Benchmark:
    """A built-in benchmark: its builder (cache_dir -> manifest path) and its style column (the folds)."""

    name: str
    build: Callable[..., Path]
    folds_by: str
    style: str            # what one image's style is, in words


def _emoji(cache_dir=None, **kw):
    from .emoji import build_emoji_benchmark

    return build_emoji_benchmark(cache_dir, **kw)


def _glyphs(cache_dir=None, **kw):
    from .glyphs import build_glyph_benchmark

    return build_glyph_benchmark(cache_dir, **kw)


def _icons(cache_dir=None, **kw):
    from .icons import build_icon_benchmark

    return build_icon_benchmark(cache_dir, **kw)


BENCHMARKS: dict[str, Benchmark] = {
    "emoji": Benchmark("emoji", _emoji, "vendor", "emoji vendor"),
    "glyphs": Benchmark("glyphs", _glyphs, "font", "font family"),
    "icons": Benchmark("icons", _icons, "theme", "icon theme"),
}


def get_benchmark(name: str) -> Benchmark:
    """A built-in benchmark by name (a clear error listing the names otherwise)."""
    try:
        return BENCHMARKS[name]
    except KeyError:
        raise ValueError(f"unknown benchmark {name!r}; built-in benchmarks: {', '.join(BENCHMARKS)}") from None


def benchmark_manifest(name: str, cache_dir: str | Path | None = None) -> Path:
    """The manifest of a built-in benchmark, built (fetched and rendered) on first use."""
    return get_benchmark(name).build(cache_dir)
