"""The glyph benchmark: the same character drawn by many font families (Debian's font packages).

A class is one Unicode code point (Latin, digits, ASCII punctuation, common symbols, Greek, Cyrillic: `GLYPH_SET`);
its images are that character rendered by each font family of `GLYPH_FONTS` that really draws it: black on white,
`size` px square, one image per font. The fonts come from Debian packages fetched at run time with
`apt-get download` + `dpkg-deb -x` into guie's cache (`guie.data.benchmarks.debian`), never committed.

Rendering (`GlyphRenderer`): every font is scaled so that its capital H is `cap_height` of the image tall, the
baseline sits at `baseline` of the height and the ink is centred horizontally, so size and vertical position stay
meaningful (o vs O, comma vs apostrophe); a glyph that would leave the canvas is shrunk about its baseline.
A font is skipped for a character when its cmap does not map it, when it renders no ink, or when the render matches
the font's .notdef (tofu) glyph (drawn from an unmapped code point; FreeType may place it a pixel apart, hence a
tolerance); Pillow's basic layout does no font fallback, so nothing else can stand in.

Benchmark hygiene (`crossstyle`): fonts that copy an earlier font (FreeSans of Nimbus Sans, Arimo of
Liberation Sans, ...) are dropped, single copied glyphs too; characters that most fonts draw identically to an
earlier character (Greek Alpha, Cyrillic A after Latin A) are dropped; characters drawn by fewer than `min_fonts`
fonts are dropped.

Split and protocol as the emoji benchmark: classes in SHA-256 order, half test, the train half with every 5th
class val (`class_split`). Evaluation: leave one font family out (`guie evaluate ... --folds-by font`): queries =
one family's images, index = every other family's images of the same classes; n_q = the number of other families
that draw the character (at least `min_fonts` - 1, so mP@5 always looks at 5 neighbours for most queries).
"""
from __future__ import annotations

import unicodedata
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw, ImageFont

from ...errors import EnvironmentProblem, InputError
from ...utils import atomic_write_bytes, atomic_write_json, atomic_write_text, default_cache_dir, log
from .crossstyle import check_image_size, compare_array, drop_style_copies, find_confusable_classes, ink_difference
from .debian import fetch_debian_packages, package_version
from .emoji import class_split

GLYPHS_VERSION = "1"  # bump when the font list, character set or rendering rules change

GLYPH_SET: dict[str, str] = {
    "latin": "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz",
    "digits": "0123456789",
    "punctuation": "!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~",
    "symbols": "¡¢£¥§©«®°±¶·»¿×÷–—‘’“”†‡•…‰€™←↑→↓∞≈≠≤≥√∂∑",
    "greek": "ΑΒΓΔΕΖΗΘΙΚΛΜΝΞΟΠΡΣΤΥΦΧΨΩαβγδεζηθικλμνξοπρςστυφχψω",
    "cyrillic": "АБВГДЕЁЖЗИЙКЛМНОПРСТУФХЦЧШЩЪЫЬЭЮЯабвгдеёжзийклмнопрстуфхцчшщъыьэюя",
}


@dataclass(frozen=True)
class FontSpec:
    """One font family of the benchmark: the Debian package that ships it, its family name and the face to use
    (name table: typographic or legacy family/subfamily; style None = the regular face)."""

    package: str
    family: str
    style: str | None = None


# Order matters: a later font that copies an earlier one is the one dropped. Arimo and Tinos (fonts-croscore) are
# listed after Liberation Sans/Serif on purpose: they are the same designs and the copy detection drops them.
# Not used: fonts-freefont (outlines derived from URW's Nimbus fonts), fonts-noto-mono (derived from Open Sans).
GLYPH_FONTS: tuple[FontSpec, ...] = (
    FontSpec("fonts-dejavu-core", "DejaVu Sans"),
    FontSpec("fonts-dejavu-core", "DejaVu Serif"),
    FontSpec("fonts-dejavu-core", "DejaVu Sans Mono"),
    FontSpec("fonts-liberation", "Liberation Sans"),
    FontSpec("fonts-liberation", "Liberation Serif"),
    FontSpec("fonts-urw-base35", "Nimbus Sans"),
    FontSpec("fonts-urw-base35", "Nimbus Roman"),
    FontSpec("fonts-urw-base35", "Nimbus Mono PS"),
    FontSpec("fonts-urw-base35", "C059"),
    FontSpec("fonts-urw-base35", "P052"),
    FontSpec("fonts-urw-base35", "URW Bookman", "Light"),
    FontSpec("fonts-urw-base35", "URW Gothic"),
    FontSpec("fonts-urw-base35", "Z003", "Medium Italic"),
    FontSpec("fonts-linuxlibertine", "Linux Libertine O"),
    FontSpec("fonts-linuxlibertine", "Linux Biolinum O"),
    FontSpec("fonts-ebgaramond", "EB Garamond 12"),
    FontSpec("fonts-cmu", "CMU Serif"),
    FontSpec("fonts-cmu", "CMU Typewriter Text"),
    FontSpec("fonts-oldstandard", "Old Standard TT"),
    FontSpec("fonts-sil-gentium", "Gentium"),
    FontSpec("fonts-paratype", "PT Serif"),
    FontSpec("fonts-open-sans", "Open Sans"),
    FontSpec("fonts-roboto-unhinted", "Roboto"),
    FontSpec("fonts-cantarell", "Cantarell"),
    FontSpec("fonts-comfortaa", "Comfortaa"),
    FontSpec("fonts-go", "Go"),
    FontSpec("fonts-firacode", "Fira Code"),
    FontSpec("fonts-croscore", "Arimo"),
    FontSpec("fonts-croscore", "Tinos"),
)
REGULAR_STYLES = ("regular", "book", "roman", "normal")
FONT_SUFFIXES = (".ttf", ".otf")
MIN_FONTS = 6              # a class needs this many fonts (n_q >= 5 for most queries)
COPY_MAX_DIFF = 0.04       # ink_difference below which a glyph copies another font's (clones: 0.03 median)
CONFUSABLE_MAX_DIFF = 0.04
NOTDEF_MAX_DIFF = 0.2      # a render this close to the font's .notdef is tofu (real glyphs here: >= 0.31)


def script_of(char: str) -> str:
    """The GLYPH_SET group of a character ('latin', 'greek', ...), or 'other'."""
    for name, chars in GLYPH_SET.items():
        if char in chars:
            return name
    return "other"


def glyph_label(char: str) -> str:
    """Class label of a character: its code point, e.g. 'U+0041'."""
    return f"U+{ord(char):04X}"


def find_font_file(root: str | Path, family: str, style: str | None = None) -> Path:
    """The face `style` (default: the regular one) of `family` among the font files under `root`, matched on the
    name table (typographic or legacy family and subfamily names)."""
    from fontTools.ttLib import TTFont

    root = Path(root)
    styles = (style.lower(),) if style else REGULAR_STYLES
    for path in sorted(p for p in root.rglob("*") if p.suffix.lower() in FONT_SUFFIXES and p.is_file()):
        try:
            names = TTFont(path, lazy=True, fontNumber=0)["name"]
        except Exception:  # noqa: BLE001 - not a readable font: not a candidate
            continue
        for fam_id, sub_id in ((16, 17), (1, 2)):
            fam, sub = names.getDebugName(fam_id), names.getDebugName(sub_id)
            if fam and sub and fam.strip().lower() == family.lower() and sub.strip().lower() in styles:
                return path
    raise EnvironmentProblem(f"no {style or 'regular'} face of font family {family!r} under {root}")


class GlyphRenderer:
    """Renders single characters of one font file the benchmark's way (see the module docstring)."""

    def __init__(self, font_path: str | Path, size: int = 64, cap_height: float = 0.45, baseline: float = 0.68):
        from fontTools.ttLib import TTFont

        self.path, self.size, self.baseline = Path(font_path), int(size), baseline * size
        self.cmap = TTFont(self.path, lazy=True, fontNumber=0).getBestCmap() or {}
        probe = ImageFont.truetype(str(self.path), 100, layout_engine=ImageFont.Layout.BASIC)
        cap = -probe.getbbox("H", anchor="ls")[1]
        if cap <= 0:
            raise InputError(f"{self.path}: cannot measure the height of 'H'")
        self.points = cap_height * size * 100.0 / cap
        self._fonts: dict[float, ImageFont.FreeTypeFont] = {}
        missing = next((c for c in (0x10FFFD, 0xFFFF, 0xE000, 0xF8FF) if c not in self.cmap), None)
        self._notdef = self._draw(chr(missing)) if missing is not None else None

    def _font(self, points: float) -> ImageFont.FreeTypeFont:
        key = round(points, 3)
        if key not in self._fonts:
            self._fonts[key] = ImageFont.truetype(str(self.path), key, layout_engine=ImageFont.Layout.BASIC)
        return self._fonts[key]

    def _draw(self, char: str) -> Image.Image:
        s, base = self.size, self.baseline
        font = self._font(self.points)
        left, top, right, bottom = font.getbbox(char, anchor="ls")
        shrink = 1.0
        if right - left > s - 2:
            shrink = min(shrink, (s - 2) / (right - left))
        if top < -(base - 1):
            shrink = min(shrink, (base - 1) / -top)
        if bottom > s - 1 - base:
            shrink = min(shrink, (s - 1 - base) / bottom)
        if shrink < 1.0:
            font = self._font(self.points * shrink * 0.98)
            left, top, right, bottom = font.getbbox(char, anchor="ls")
        image = Image.new("L", (s, s), 255)
        ImageDraw.Draw(image).text((s / 2 - (left + right) / 2, base), char, font=font, fill=0, anchor="ls")
        return image

    def has(self, char: str) -> bool:
        """Whether the font's cmap maps the character."""
        return ord(char) in self.cmap

    def render(self, char: str) -> Image.Image | None:
        """The character's image, or None when the font does not really draw it (unmapped, no ink, tofu)."""
        if not self.has(char):
            return None
        image = self._draw(char)
        if np.asarray(image).min() > 127:  # no ink
            return None
        if self._notdef is not None:
            if ink_difference(compare_array(image), compare_array(self._notdef)) < NOTDEF_MAX_DIFF:
                return None
        return image


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in text).strip("-")


def render_glyph_set(fonts: dict[str, Path], chars: str, out_dir: Path, size: int = 64,
                     min_fonts: int = MIN_FONTS, overwrite: bool = False) -> tuple[pd.DataFrame, dict]:
    """Render every (font, character) pair that passes the checks into out_dir/<font>/<U+XXXX>.png and apply the
    benchmark hygiene rules; returns (rows without split, report). `fonts`: family -> font file, in priority order."""
    arrays, images = {}, {}
    for family, path in fonts.items():
        renderer = GlyphRenderer(path, size)
        for char in chars:
            image = renderer.render(char)
            if image is not None:
                images[(char, family)] = image
                arrays[(char, family)] = compare_array(image)
    kept, clones, copies = drop_style_copies(arrays, list(fonts), COPY_MAX_DIFF)
    arrays = {k: v for k, v in arrays.items() if k in kept}
    confusable = find_confusable_classes(arrays, list(chars), CONFUSABLE_MAX_DIFF)
    counts = pd.Series([c for c, _ in arrays]).value_counts()
    rows = []
    for (char, family) in sorted(arrays, key=lambda k: (chars.index(k[0]), list(fonts).index(k[1]))):
        if char in confusable or counts[char] < min_fonts:
            continue
        rel = f"{_slug(family)}/{glyph_label(char)}.png"
        target = out_dir / rel
        if overwrite or not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            buf = _png_bytes(images[(char, family)])
            atomic_write_bytes(buf, target)
        rows.append({"path": rel, "label": glyph_label(char), "char": char,
                     "name": unicodedata.name(char, "").lower(), "domain": script_of(char), "font": family})
    report = {"fonts_dropped_as_copies": clones, "glyphs_dropped_as_copies": copies,
              "confusable_characters_dropped": {glyph_label(k): glyph_label(v) for k, v in confusable.items()},
              "characters_below_min_fonts": sorted(glyph_label(c) for c in counts.index
                                                   if counts[c] < min_fonts and c not in confusable)}
    return pd.DataFrame(rows), report


def _png_bytes(image: Image.Image) -> bytes:
    import io

    buf = io.BytesIO()
    image.save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def build_glyph_benchmark(cache_dir: str | Path | None = None, size: int = 64,
                          fonts: tuple[FontSpec, ...] = GLYPH_FONTS, chars: str | None = None,
                          min_fonts: int = MIN_FONTS, force: bool = False) -> Path:
    """Fetch the font packages (once), render the benchmark and write its manifest; returns the manifest path.

    Manifest columns: path, label (U+XXXX), char, name, domain (script group), font, package, split.
    """
    check_image_size(size)
    cache = Path(cache_dir or default_cache_dir())
    root = cache / "glyphs" / f"v{GLYPHS_VERSION}-{size}px"
    manifest = root / "manifest.csv"
    if manifest.exists() and not force:
        return manifest
    chars = chars if chars is not None else "".join(GLYPH_SET.values())
    packages = list(dict.fromkeys(f.package for f in fonts))
    pkg_dirs = fetch_debian_packages(packages, cache / "debian")
    files = {f.family: find_font_file(pkg_dirs[f.package], f.family, f.style) for f in fonts}
    log.info("rendering %d characters x %d fonts at %d px", len(chars), len(files), size)
    df, report = render_glyph_set(files, chars, root, size=size, min_fonts=min_fonts, overwrite=force)
    package_of = {f.family: f.package for f in fonts}
    df["package"] = df["font"].map(package_of)
    split = class_split(sorted(df["label"].unique()))
    df["split"] = df["label"].map(split)
    report.update({"classes": int(df["label"].nunique()), "images": len(df), "fonts": int(df["font"].nunique()),
                   "packages": {p: package_version(cache / "debian", p) for p in packages},
                   "font_files": {k: str(v.relative_to(cache / "debian")) for k, v in files.items()}})
    atomic_write_json(report, root / "build.json")
    atomic_write_text(df.to_csv(index=False), manifest)
    log.info("glyph benchmark: %d classes, %d fonts, %d images -> %s", report["classes"], report["fonts"],
             len(df), manifest)
    return manifest
