"""The built-in cross-style benchmarks by name: how each is built, evaluated and offered on the command line.

| name   | class          | styles (one image each)        | source (fetched at run time)       | folds   |
|--------|----------------|--------------------------------|------------------------------------|---------|
| emoji  | an emoji       | 4 vendors                      | npm `emoji-datasource-*`           | vendor  |
| glyphs | a character    | 27 font families               | Debian font packages (apt-get)     | font    |
| icons  | an icon name   | 12 icon themes                 | Debian icon-theme packages         | theme   |

Every benchmark has the same split columns (`split` = train / val / test by class) and is scored leave-one-style-out:
queries = one style's images, index = the other styles' images of the same classes, mean over styles.

A new benchmark is one module with a builder (cache_dir, force=..., its options -> manifest path) and one entry in
`BENCHMARKS`: `guie data <name>`, `guie benchmark`, training recipes and build recipes take it from there. This
package is the benchmark *builders*; dataset curation (manifests, importers, builds, checks, shards) is the rest of
`guie.data`, which may use a benchmark by name but is never imported from here.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ...errors import InputError


@dataclass(frozen=True)
class BuildOption:
    """A builder option a user may set (`guie data <name> --<option>`): name, default (its type is the option's),
    help."""

    name: str
    default: int | float | str
    help: str


@dataclass(frozen=True)
class Benchmark:
    """A built-in benchmark: its builder (cache_dir, force=..., **options -> manifest path), its style column (the
    folds), what one style is in words (singular and plural), a one-line description and the builder's options."""

    name: str
    build: Callable[..., Path]
    folds_by: str
    style: str            # what one image's style is, in words
    styles: str = ""      # the same, plural, as counted in a summary ("4 vendors"; default: style + "s")
    summary: str = ""     # what building it does, one sentence (the help of `guie data <name>`)
    options: tuple[BuildOption, ...] = ()


def _emoji(cache_dir=None, **kw):
    from .emoji import build_emoji_benchmark

    return build_emoji_benchmark(cache_dir, **kw)


def _glyphs(cache_dir=None, **kw):
    from .glyphs import build_glyph_benchmark

    return build_glyph_benchmark(cache_dir, **kw)


def _icons(cache_dir=None, **kw):
    from .icons import build_icon_benchmark

    return build_icon_benchmark(cache_dir, **kw)


_SIZE = BuildOption("size", 64, "image side in pixels")

BENCHMARKS: dict[str, Benchmark] = {
    "emoji": Benchmark("emoji", _emoji, "vendor", "emoji vendor", "vendors",
                       "Fetch the emoji cross-vendor benchmark with npm and write its manifest."),
    "glyphs": Benchmark("glyphs", _glyphs, "font", "font family", "font families",
                        "Fetch Debian's font packages with apt-get and render the glyph benchmark (one class per "
                        "character, one image per font family; see docs/data.md).", (_SIZE,)),
    "icons": Benchmark("icons", _icons, "theme", "icon theme", "themes",
                       "Fetch Debian's icon-theme packages with apt-get and render the icon benchmark (one class per "
                       "freedesktop standard icon name, one image per theme; see docs/data.md).", (_SIZE,)),
}


def get_benchmark(name: str) -> Benchmark:
    """A built-in benchmark by name (a clear error listing the names otherwise)."""
    try:
        return BENCHMARKS[name]
    except KeyError:
        raise InputError(f"unknown benchmark {name!r}; built-in benchmarks: {', '.join(BENCHMARKS)}") from None


def benchmark_manifest(name: str, cache_dir: str | Path | None = None) -> Path:
    """The manifest of a built-in benchmark, built (fetched and rendered) on first use."""
    return get_benchmark(name).build(cache_dir)
