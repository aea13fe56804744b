"""Icon benchmark: which file a theme contributes per standard name (size preference, symbolic icons skipped,
links followed only inside the package), SVG and PNG loading, copied icons and shared files dropped."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from guie.data.benchmarks import BENCHMARKS, get_benchmark
from guie.data.benchmarks.icons import STANDARD_ICON_NAMES, context_of, find_theme_icons, load_icon, render_icon_set

SVG = """<svg xmlns="http://www.w3.org/2000/svg" width="16" height="16" viewBox="0 0 16 16">
<rect x="2" y="3" width="12" height="10" fill="{colour}"/></svg>"""


def _png(path: Path, size: int, shape: str, colour=(200, 30, 30, 255)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.new("RGBA", (size, size), (0, 0, 0, 0))
    d = ImageDraw.Draw(image)
    box = (size // 8, size // 8, size - size // 8, size - size // 8)
    if shape == "disc":
        d.ellipse(box, fill=colour)
    elif shape == "cross":
        d.rectangle((size // 2 - size // 10, box[1], size // 2 + size // 10, box[3]), fill=colour)
        d.rectangle((box[0], size // 2 - size // 10, box[2], size // 2 + size // 10), fill=colour)
    else:
        d.polygon([(box[0], box[3]), (size // 2, box[1]), (box[2], box[3])], fill=colour)
    image.save(path)
    return path


@pytest.fixture()
def themes(tmp_path) -> dict[str, Path]:
    icons = tmp_path / "pkg" / "usr" / "share" / "icons"
    a = icons / "ThemeA"
    _png(a / "22x22" / "actions" / "edit-copy.png", 22, "disc")
    _png(a / "48x48" / "actions" / "edit-copy.png", 48, "disc")            # preferred: >= 48 px
    _png(a / "48x48" / "actions" / "edit-cut-symbolic.png", 48, "cross")   # symbolic: never used
    _png(a / "symbolic" / "actions" / "edit-cut.png", 48, "cross")         # symbolic folder: never used
    _png(a / "48x48" / "places" / "folder.png", 48, "triangle")
    (a / "scalable" / "places").mkdir(parents=True)
    (a / "scalable" / "places" / "folder.svg").write_text(SVG.format(colour="#2040c0"))  # preferred over PNG
    _png(a / "48x48" / "devices" / "computer.png", 48, "cross")
    os.symlink("computer.png", a / "48x48" / "devices" / "video-display.png")  # two names, one file
    outside = _png(tmp_path / "elsewhere" / "printer.png", 48, "disc")
    os.symlink(outside, a / "48x48" / "devices" / "printer.png")              # leaves the package: ignored
    b = icons / "ThemeB"
    _png(b / "64x64" / "actions" / "edit-copy.png", 64, "triangle", (20, 160, 20, 255))
    _png(b / "64x64" / "places" / "folder.png", 64, "disc", (20, 160, 20, 255))
    _png(b / "64x64" / "devices" / "computer.png", 64, "triangle", (20, 20, 160, 255))
    c = icons / "ThemeC"                                                     # copies ThemeA's edit-copy
    _png(c / "48x48" / "actions" / "edit-copy.png", 48, "disc")
    _png(c / "48x48" / "places" / "folder.png", 48, "cross", (90, 90, 90, 255))
    _png(c / "48x48" / "devices" / "computer.png", 48, "disc", (90, 90, 90, 255))
    return {"ThemeA": a, "ThemeB": b, "ThemeC": c}


def test_theme_file_choice(themes):
    found = find_theme_icons(themes["ThemeA"])
    assert found["edit-copy"].parts[-3:] == ("48x48", "actions", "edit-copy.png")
    assert found["folder"].suffix == ".svg"
    assert "edit-cut" not in found and "printer" not in found
    assert found["video-display"] == found["computer"]            # links resolved to the real file
    with pytest.raises(FileNotFoundError, match="NoTheme"):
        find_theme_icons(themes["ThemeA"].parent / "NoTheme")


def test_load_icon_renders_svg_and_png_on_white(themes):
    svg = load_icon(find_theme_icons(themes["ThemeA"])["folder"], size=40)
    assert svg.size == (40, 40) and svg.mode == "RGB"
    arr = np.asarray(svg)
    assert tuple(arr[0, 0]) == (255, 255, 255) and tuple(arr[20, 20]) == (0x20, 0x40, 0xC0)
    png = np.asarray(load_icon(themes["ThemeA"] / "48x48" / "actions" / "edit-copy.png", size=64))
    assert png.shape == (64, 64, 3) and tuple(png[0, 0]) == (255, 255, 255) and png[32, 32, 0] > 150


def test_icon_set_drops_copies_and_shared_files(themes, tmp_path):
    names = ["edit-copy", "folder", "computer", "video-display"]
    df, report = render_icon_set(themes, names, tmp_path / "out", size=32, min_themes=2)
    pairs = set(zip(df["label"], df["theme"]))
    assert ("edit-copy", "ThemeC") not in pairs                   # a copy of ThemeA's icon
    assert {("edit-copy", "ThemeA"), ("edit-copy", "ThemeB"), ("folder", "ThemeC")} <= pairs
    assert report["icons_dropped_as_copies"] == 1 and report["icons_sharing_a_file_dropped"] == 1
    assert "video-display" not in set(df["label"])               # its only image shared computer's file
    assert set(df["domain"]) == {"actions", "places", "devices"}
    assert all((tmp_path / "out" / p).is_file() for p in df["path"])


def test_builders_refuse_odd_sizes_before_fetching(tmp_path):
    from guie.data.benchmarks.glyphs import build_glyph_benchmark
    from guie.data.benchmarks.icons import build_icon_benchmark

    for build in (build_glyph_benchmark, build_icon_benchmark):
        with pytest.raises(ValueError, match="image size 8: must be between 16 and 512"):
            build(tmp_path, size=8)
    assert not any(tmp_path.iterdir())


def test_standard_names_and_benchmark_registry():
    names = [n for ns in STANDARD_ICON_NAMES.values() for n in ns]
    assert len(names) == len(set(names)) > 250
    assert context_of("user-trash") == "places" and context_of("edit-copy") == "actions"
    assert {b.folds_by for b in BENCHMARKS.values()} == {"vendor", "font", "theme"}
    with pytest.raises(ValueError, match="built-in benchmarks: emoji, glyphs, icons"):
        get_benchmark("logos")
