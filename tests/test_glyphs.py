"""Glyph benchmark: rendering rules (tofu, blank, unmapped, size and baseline kept), font lookup, copy and confusable
removal, the Debian fetch path (a fake apt-get offline; the real client once, skipped where it cannot download)."""
from __future__ import annotations

import os
import shutil
import stat
from pathlib import Path

import matplotlib
import numpy as np
import pytest

from guie.data.benchmarks.debian import fetch_debian_packages, package_version
from guie.data.benchmarks.glyphs import GlyphRenderer, find_font_file, glyph_label, render_glyph_set, script_of
from guie.errors import EnvironmentProblem

MPL_FONTS = Path(matplotlib.get_data_path()) / "fonts" / "ttf"


def _rect_glyph(rects):
    from fontTools.pens.ttGlyphPen import TTGlyphPen

    pen = TTGlyphPen(None)
    for x0, y0, x1, y1 in rects:
        pen.moveTo((x0, y0))
        pen.lineTo((x0, y1))
        pen.lineTo((x1, y1))
        pen.lineTo((x1, y0))
        pen.closePath()
    return pen.glyph()


@pytest.fixture(scope="module")
def toy_font(tmp_path_factory) -> Path:
    """A TrueType font made here: H, o (x-height), O (cap height), comma (below the baseline), quote (high),
    'B' mapped to a copy of the .notdef box (a placeholder, i.e. tofu) and 'C' mapped to an empty glyph."""
    from fontTools.fontBuilder import FontBuilder

    order = [".notdef", "H", "o", "O", "comma", "quotesingle", "blank", "box"]
    frame = [(50, 0, 550, 60), (50, 640, 550, 700), (50, 60, 110, 640), (490, 60, 550, 640)]
    glyphs = {
        ".notdef": _rect_glyph(frame),
        "box": _rect_glyph(frame),
        "H": _rect_glyph([(80, 0, 180, 700), (420, 0, 520, 700), (180, 300, 420, 400)]),
        "o": _rect_glyph([(100, 0, 500, 450)]),
        "O": _rect_glyph([(100, 0, 500, 700)]),
        "comma": _rect_glyph([(250, -150, 330, 80)]),
        "quotesingle": _rect_glyph([(250, 500, 330, 720)]),
        "blank": _rect_glyph([]),
    }
    fb = FontBuilder(1000, isTTF=True)
    fb.setupGlyphOrder(order)
    fb.setupCharacterMap({ord("H"): "H", ord("o"): "o", ord("O"): "O", ord(","): "comma", ord("'"): "quotesingle",
                          ord("B"): "box", ord("C"): "blank"})
    fb.setupGlyf(glyphs)
    fb.setupHorizontalMetrics({g: (600, 0) for g in order})
    fb.setupHorizontalHeader(ascent=800, descent=-200)
    fb.setupNameTable({"familyName": "Toy Sans", "styleName": "Regular"})
    fb.setupOS2(sTypoAscender=800, sTypoDescender=-200, usWinAscent=800, usWinDescent=200)
    fb.setupPost()
    path = tmp_path_factory.mktemp("toy") / "ToySans-Regular.ttf"
    fb.save(str(path))
    return path


def _ink_rows(image):
    rows = np.flatnonzero((np.asarray(image) < 128).any(axis=1))
    return rows.min(), rows.max()


def test_renderer_refuses_tofu_blank_and_unmapped_characters(toy_font):
    r = GlyphRenderer(toy_font, size=64)
    assert r.render("H") is not None
    assert r.has("B") and r.render("B") is None      # mapped, but drawn like the .notdef box
    assert r.has("C") and r.render("C") is None      # mapped to a glyph without ink
    assert not r.has("Z") and r.render("Z") is None  # not in the cmap: no fallback font stands in
    image = r.render("O")
    assert image.size == (64, 64) and image.mode == "L" and np.asarray(image)[0, 0] == 255  # white background


def test_renderer_keeps_size_and_vertical_position(toy_font):
    r = GlyphRenderer(toy_font, size=64, cap_height=0.45, baseline=0.68)
    top_o, bottom_o = _ink_rows(r.render("o"))
    top_big, bottom_big = _ink_rows(r.render("O"))
    assert abs(bottom_o - bottom_big) <= 1 and top_o > top_big + 5   # same baseline, lower x-height
    assert abs((bottom_big - top_big + 1) - 0.45 * 64) <= 2          # the cap height is 45% of the image
    comma, quote = _ink_rows(r.render(",")), _ink_rows(r.render("'"))
    assert comma[1] > bottom_big and quote[0] < top_o                 # a comma hangs, a quote sits high


def test_find_font_file_matches_family_and_style(tmp_path):
    for name in ("DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSerif.ttf"):
        shutil.copy(MPL_FONTS / name, tmp_path / name)
    assert find_font_file(tmp_path, "DejaVu Sans").name == "DejaVuSans.ttf"
    assert find_font_file(tmp_path, "dejavu sans", "Bold").name == "DejaVuSans-Bold.ttf"
    with pytest.raises(EnvironmentProblem, match="No Such Font"):
        find_font_file(tmp_path, "No Such Font")


def test_glyph_set_drops_copied_fonts_and_confusable_characters(tmp_path):
    fonts = {"DejaVu Sans": MPL_FONTS / "DejaVuSans.ttf", "DejaVu Serif": MPL_FONTS / "DejaVuSerif.ttf",
             "STIX": MPL_FONTS / "STIXGeneral.ttf", "Sans Copy": MPL_FONTS / "DejaVuSans.ttf",
             "Mono": MPL_FONTS / "DejaVuSansMono.ttf"}
    chars = "AaQ\u0391\u0416?"  # Latin A, a, Q, Greek capital Alpha, Cyrillic Zhe, ?
    df, report = render_glyph_set(fonts, chars, tmp_path, size=48, min_fonts=3)
    assert report["fonts_dropped_as_copies"] == ["Sans Copy"]
    assert report["confusable_characters_dropped"] == {"U+0391": "U+0041"}
    assert set(df["font"]) == {"DejaVu Sans", "DejaVu Serif", "STIX", "Mono"}
    assert set(df["label"]) == {glyph_label(c) for c in "AaQ\u0416?"}
    assert set(df.columns) >= {"path", "label", "char", "name", "domain", "font"}
    row = df[df["label"] == "U+0416"].iloc[0]
    assert row["domain"] == "cyrillic" and row["name"] == "cyrillic capital letter zhe"
    assert all((tmp_path / p).is_file() for p in df["path"])
    assert script_of("7") == "digits" and script_of("\u00e9") == "other"


FAKE_APT = """#!/bin/sh
# offline stand-in for `apt-get download PKG...`: builds a tiny .deb per package with dpkg-deb
echo "$@" >> "{log}"
shift
for pkg in "$@"; do
  if [ "$pkg" = "no-such-package" ]; then echo "E: Unable to locate package $pkg" >&2; exit 100; fi
  mkdir -p "tree-$pkg/DEBIAN" "tree-$pkg/usr/share/fonts/truetype/$pkg"
  printf 'Package: %s\\nVersion: 1.2-3\\nArchitecture: all\\nMaintainer: t <t@t>\\nDescription: t\\n' "$pkg" \\
    > "tree-$pkg/DEBIAN/control"
  cp "{font}" "tree-$pkg/usr/share/fonts/truetype/$pkg/"
  dpkg-deb --build "tree-$pkg" "${{pkg}}_1.2-3_all.deb" >/dev/null
  rm -rf "tree-$pkg"
done
"""


@pytest.mark.skipif(shutil.which("dpkg-deb") is None, reason="needs dpkg-deb (Debian)")
def test_fetch_debian_packages_extracts_once(tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "calls.log"
    script = bin_dir / "apt-get"
    script.write_text(FAKE_APT.format(log=calls, font=MPL_FONTS / "DejaVuSans.ttf"))
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    root = tmp_path / "debian"
    dirs = fetch_debian_packages(["fonts-a", "fonts-b"], root)
    assert (dirs["fonts-a"] / "usr/share/fonts/truetype/fonts-a/DejaVuSans.ttf").is_file()
    assert package_version(root, "fonts-b") == "1.2-3"
    assert find_font_file(dirs["fonts-b"], "DejaVu Sans").name == "DejaVuSans.ttf"
    fetch_debian_packages(["fonts-a", "fonts-b"], root)           # already there: apt-get is not called again
    assert calls.read_text().splitlines() == ["download fonts-a fonts-b"]
    with pytest.raises(RuntimeError, match="no-such-package"):
        fetch_debian_packages(["fonts-a", "no-such-package"], root)
    assert package_version(root, "no-such-package") is None and not list(root.glob(".*"))  # nothing half-done


@pytest.mark.skipif(shutil.which("apt-get") is None, reason="needs apt-get (Debian)")
def test_fetch_debian_packages_with_the_real_client(tmp_path):
    """One real download of a 14 kB font package; skipped where apt cannot reach its sources (offline CI)."""
    try:
        dirs = fetch_debian_packages(["fonts-radisnoir"], tmp_path)
    except RuntimeError as e:
        pytest.skip(f"apt-get cannot download here: {e}")
    assert list(dirs["fonts-radisnoir"].rglob("*.ttf")) or list(dirs["fonts-radisnoir"].rglob("*.otf"))
