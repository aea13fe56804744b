"""The icon benchmark: the same freedesktop standard icon drawn by many icon themes (Debian's icon-theme packages).

A class is one name of the freedesktop Icon Naming Specification (document-open, edit-copy, folder, user-trash, ...;
`STANDARD_ICON_NAMES`, grouped by the spec's contexts); its images are that icon as drawn by each theme of
`ICON_THEMES`, one image per theme, composited on white at `size` px. The themes come from Debian packages fetched
at run time with `apt-get download` + `dpkg-deb -x` into guie's cache (`guie.data.benchmarks.debian`), never committed.

Per theme and name the file chosen is the full-colour icon (never a `-symbolic` one) closest to 64 px: a scalable
SVG (rendered with CairoSVG at `size`), else the PNG size >= 48 px closest to 64, else the largest smaller one
(some themes draw actions at 22-32 px only). Symbolic links are followed inside the package; when a theme links two
standard names to one file, only the first name keeps that image (otherwise the two classes would share a picture).

Benchmark hygiene (`crossstyle`): an icon that copies the same icon of an earlier theme (MATE's icons
inherited from GNOME, GNOME-Colors' from Tango) is dropped, a theme left with few icons of its own is dropped as a
clone, names most themes draw identically to an earlier name are dropped, and names drawn by fewer than
`min_themes` themes are dropped.

Split and protocol as the emoji benchmark (`class_split`). Evaluation: leave one theme out (`guie evaluate ...
--folds-by theme`): queries = one theme's icons, index = every other theme's icons of the same classes; n_q = the
number of other themes that draw the name (at least `min_themes` - 1 = 3).
"""
from __future__ import annotations

import io
import os
import re
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from PIL import Image

from ...errors import MissingFileError
from ...imaging.io import to_rgb
from ...utils import atomic_write_bytes, atomic_write_json, atomic_write_text, default_cache_dir, log
from .crossstyle import check_image_size, compare_array, drop_style_copies, find_confusable_classes
from .debian import fetch_debian_packages, package_version
from .emoji import class_split

ICONS_VERSION = "1"  # bump when the theme list, name list or selection rules change

# The freedesktop Icon Naming Specification 0.8.90, by context (animations left out: they are sprite strips).
STANDARD_ICON_NAMES: dict[str, tuple[str, ...]] = {context: tuple(names.split()) for context, names in {
    "actions": """address-book-new application-exit appointment-new call-start call-stop contact-new document-new
        document-open document-open-recent document-page-setup document-print document-print-preview
        document-properties document-revert document-save document-save-as document-send edit-clear edit-copy
        edit-cut edit-delete edit-find edit-find-replace edit-paste edit-redo edit-select-all edit-undo folder-new
        format-indent-less format-indent-more format-justify-center format-justify-fill format-justify-left
        format-justify-right format-text-direction-ltr format-text-direction-rtl format-text-bold
        format-text-italic format-text-underline format-text-strikethrough go-bottom go-down go-first go-home
        go-jump go-last go-next go-previous go-top go-up help-about help-contents help-faq insert-image
        insert-link insert-object insert-text list-add list-remove mail-forward mail-mark-important
        mail-mark-junk mail-mark-notjunk mail-mark-read mail-mark-unread mail-message-new mail-reply-all
        mail-reply-sender mail-send mail-send-receive media-eject media-playback-pause media-playback-start
        media-playback-stop media-record media-seek-backward media-seek-forward media-skip-backward
        media-skip-forward object-flip-horizontal object-flip-vertical object-rotate-left object-rotate-right
        process-stop system-lock-screen system-log-out system-run system-search system-reboot system-shutdown
        tools-check-spelling view-fullscreen view-refresh view-restore view-sort-ascending view-sort-descending
        window-close window-new zoom-fit-best zoom-in zoom-original zoom-out""",
    "apps": """accessories-calculator accessories-character-map accessories-dictionary accessories-text-editor
        help-browser multimedia-volume-control preferences-desktop-accessibility preferences-desktop-font
        preferences-desktop-keyboard preferences-desktop-locale preferences-desktop-multimedia
        preferences-desktop-screensaver preferences-desktop-theme preferences-desktop-wallpaper
        system-file-manager system-software-install system-software-update utilities-system-monitor
        utilities-terminal""",
    "categories": """applications-accessories applications-development applications-engineering applications-games
        applications-graphics applications-internet applications-multimedia applications-office
        applications-other applications-science applications-system applications-utilities preferences-desktop
        preferences-desktop-peripherals preferences-desktop-personal preferences-other preferences-system
        preferences-system-network system-help""",
    "devices": """audio-card audio-input-microphone battery camera-photo camera-video camera-web computer
        drive-harddisk drive-optical drive-removable-media input-gaming input-keyboard input-mouse input-tablet
        media-flash media-floppy media-optical media-tape modem multimedia-player network-wired network-wireless
        pda phone printer scanner video-display""",
    "emblems": """emblem-default emblem-documents emblem-downloads emblem-favorite emblem-important emblem-mail
        emblem-photos emblem-readonly emblem-shared emblem-symbolic-link emblem-synchronized emblem-system
        emblem-unreadable""",
    "emotes": """face-angel face-angry face-cool face-crying face-devilish face-embarrassed face-kiss face-laugh
        face-monkey face-plain face-raspberry face-sad face-sick face-smile face-smile-big face-smirk
        face-surprise face-tired face-uncertain face-wink face-worried""",
    "mimetypes": """application-x-executable audio-x-generic font-x-generic image-x-generic package-x-generic
        text-html text-x-generic text-x-generic-template text-x-script video-x-generic x-office-address-book
        x-office-calendar x-office-document x-office-presentation x-office-spreadsheet""",
    "places": """folder folder-remote network-server network-workgroup start-here user-bookmarks user-desktop
        user-home user-trash""",
    "status": """appointment-missed appointment-soon audio-volume-high audio-volume-low audio-volume-medium
        audio-volume-muted battery-caution battery-low dialog-error dialog-information dialog-password
        dialog-question dialog-warning folder-drag-accept folder-open folder-visiting image-loading
        image-missing mail-attachment mail-unread mail-read mail-replied mail-signed mail-signed-verified
        media-playlist-repeat media-playlist-shuffle network-error network-idle network-offline network-receive
        network-transmit network-transmit-receive printer-error printer-printing security-high security-medium
        security-low software-update-available software-update-urgent sync-error sync-synchronizing task-due
        task-past-due user-available user-away user-idle user-offline user-trash-full weather-clear
        weather-clear-night weather-few-clouds weather-few-clouds-night weather-fog weather-overcast
        weather-severe-alert weather-showers weather-showers-scattered weather-snow weather-storm""",
}.items()}


@dataclass(frozen=True)
class ThemeSpec:
    """One icon theme: the Debian package that ships it and its folder under usr/share/icons."""

    package: str
    theme: str


# Order matters: a later theme's copy of an earlier theme's icon is the one dropped (MATE after GNOME, GNOME-Colors
# after Tango).
ICON_THEMES: tuple[ThemeSpec, ...] = (
    ThemeSpec("adwaita-icon-theme", "Adwaita"),
    ThemeSpec("tango-icon-theme", "Tango"),
    ThemeSpec("gnome-icon-theme", "gnome"),
    ThemeSpec("breeze-icon-theme", "breeze"),
    ThemeSpec("oxygen-icon-theme", "oxygen"),
    ThemeSpec("elementary-xfce-icon-theme", "elementary-xfce"),
    ThemeSpec("papirus-icon-theme", "Papirus"),
    ThemeSpec("numix-icon-theme", "Numix"),
    ThemeSpec("faenza-icon-theme", "Faenza"),
    ThemeSpec("lxde-icon-theme", "nuoveXT2"),
    ThemeSpec("suru-icon-theme", "suru"),
    ThemeSpec("mate-icon-theme", "mate"),
    ThemeSpec("gnome-colors-common", "gnome-colors-common"),
)
MIN_THEMES = 4             # a class needs this many themes (n_q >= 3, as the emoji benchmark's)
COPY_MAX_DIFF = 0.04       # ink_difference below which an icon copies an earlier theme's
CONFUSABLE_MAX_DIFF = 0.04
SCALABLE = 10_000          # size given to a scalable (SVG) folder
_SIZE_DIR = re.compile(r"^(\d+)(?:x\d+)?(?:@\d+x?)?$")


def context_of(name: str) -> str:
    """The spec context ('actions', 'places', ...) of a standard icon name."""
    for context, names in STANDARD_ICON_NAMES.items():
        if name in names:
            return context
    raise KeyError(f"{name!r} is not a standard icon name")


def _dir_size(parts: tuple[str, ...]) -> int | None:
    for part in parts:
        if part == "scalable":
            return SCALABLE
        m = _SIZE_DIR.match(part)
        if m:
            return int(m.group(1))
    return None


def _preference(size: int) -> float:
    """Lower is better: a scalable SVG, then PNG sizes >= 48 closest to 64, then the largest smaller size."""
    if size == SCALABLE:
        return 0.0
    return abs(size - 64) if size >= 48 else 1000.0 + (64 - size)


def find_theme_icons(theme_dir: str | Path, names: set[str] | None = None) -> dict[str, Path]:
    """{standard icon name: the file to render} for one theme folder (see the module docstring for the choice)."""
    theme_dir = Path(theme_dir)
    if not theme_dir.is_dir():
        raise MissingFileError(theme_dir, "icon theme folder")
    names = names if names is not None else {n for ns in STANDARD_ICON_NAMES.values() for n in ns}
    bound = theme_dir.resolve().parent  # links may point into sibling themes of the package, not outside
    best: dict[str, tuple[float, str, Path]] = {}
    for dirpath, _, filenames in os.walk(theme_dir):
        parts = Path(dirpath).relative_to(theme_dir).parts
        if any("symbolic" in p for p in parts):
            continue
        size = _dir_size(parts)
        if size is None:
            continue
        for filename in filenames:
            stem, ext = os.path.splitext(filename)
            if ext not in (".png", ".svg") or stem not in names or (ext == ".png" and size == SCALABLE):
                continue
            path = Path(dirpath) / filename
            real = path.resolve()
            if not real.is_file() or bound not in real.parents:
                continue  # a dangling link, or one that leaves the package
            key = (_preference(size), str(path))
            if stem not in best or key < best[stem][:2]:
                best[stem] = (*key, real)
    return {name: real for name, (_, _, real) in best.items()}


def load_icon(path: str | Path, size: int = 64) -> Image.Image:
    """An icon file (PNG or SVG) as an RGB image of size x size on white."""
    path = Path(path)
    if path.suffix == ".svg":
        import cairosvg

        png = cairosvg.svg2png(url=str(path), output_width=size, output_height=size)
        image = Image.open(io.BytesIO(png))
    else:
        image = Image.open(path)
    image.load()
    image = image.convert("RGBA")
    if image.size != (size, size):
        image = image.resize((size, size), Image.Resampling.LANCZOS)
    return to_rgb(image)


def render_icon_set(themes: dict[str, Path], names: list[str], out_dir: Path, size: int = 64,
                    min_themes: int = MIN_THEMES, overwrite: bool = False) -> tuple[pd.DataFrame, dict]:
    """Render each theme's standard icons into out_dir/<theme>/<name>.png and apply the benchmark hygiene rules;
    returns (rows without split, report). `themes`: theme name -> theme folder, in priority order."""
    arrays, images, failed, shared = {}, {}, [], 0
    wanted = set(names)
    for theme, folder in themes.items():
        files = find_theme_icons(folder, wanted)
        seen: set[Path] = set()
        for name in names:
            path = files.get(name)
            if path is None:
                continue
            if path in seen:  # the theme links this name to an icon an earlier name already uses
                shared += 1
                continue
            seen.add(path)
            try:
                image = load_icon(path, size)
            except Exception as e:  # noqa: BLE001 - an SVG CairoSVG cannot draw: that theme lacks the icon
                failed.append(f"{theme}/{name}: {type(e).__name__}: {e}"[:200])
                continue
            array = compare_array(image)
            if array.min() > 0.98:  # blank
                failed.append(f"{theme}/{name}: blank render")
                continue
            images[(name, theme)] = image
            arrays[(name, theme)] = array
    kept, clones, copies = drop_style_copies(arrays, list(themes), COPY_MAX_DIFF)
    arrays = {k: v for k, v in arrays.items() if k in kept}
    confusable = find_confusable_classes(arrays, names, CONFUSABLE_MAX_DIFF)
    counts = pd.Series([n for n, _ in arrays], dtype=object).value_counts()
    order = {n: i for i, n in enumerate(names)}
    theme_order = {t: i for i, t in enumerate(themes)}
    rows = []
    for name, theme in sorted(arrays, key=lambda k: (order[k[0]], theme_order[k[1]])):
        if name in confusable or counts[name] < min_themes:
            continue
        rel = f"{theme}/{name}.png"
        target = out_dir / rel
        if overwrite or not target.exists():
            buf = io.BytesIO()
            images[(name, theme)].save(buf, format="PNG", optimize=True)
            atomic_write_bytes(buf.getvalue(), target)
        rows.append({"path": rel, "label": name, "domain": context_of(name), "theme": theme})
    report = {"themes_dropped_as_copies": clones, "icons_dropped_as_copies": copies,
              "icons_sharing_a_file_dropped": shared, "unreadable_icons": failed,
              "confusable_names_dropped": confusable,
              "names_below_min_themes": sorted(n for n in counts.index if counts[n] < min_themes
                                               and n not in confusable)}
    return pd.DataFrame(rows), report


def build_icon_benchmark(cache_dir: str | Path | None = None, size: int = 64,
                         themes: tuple[ThemeSpec, ...] = ICON_THEMES, min_themes: int = MIN_THEMES,
                         force: bool = False) -> Path:
    """Fetch the icon-theme packages (once), render the benchmark and write its manifest; returns its path.

    Manifest columns: path, label (icon name), domain (spec context), theme, package, split.
    """
    check_image_size(size)
    cache = Path(cache_dir or default_cache_dir())
    root = cache / "icons" / f"v{ICONS_VERSION}-{size}px"
    manifest = root / "manifest.csv"
    if manifest.exists() and not force:
        return manifest
    packages = list(dict.fromkeys(t.package for t in themes))
    pkg_dirs = fetch_debian_packages(packages, cache / "debian")
    folders = {t.theme: pkg_dirs[t.package] / "usr" / "share" / "icons" / t.theme for t in themes}
    names = [n for ns in STANDARD_ICON_NAMES.values() for n in ns]
    log.info("rendering %d standard icon names x %d themes at %d px", len(names), len(folders), size)
    df, report = render_icon_set(folders, names, root, size=size, min_themes=min_themes, overwrite=force)
    df["package"] = df["theme"].map({t.theme: t.package for t in themes})
    split = class_split(sorted(df["label"].unique()))
    df["split"] = df["label"].map(split)
    report.update({"classes": int(df["label"].nunique()), "images": len(df), "themes": int(df["theme"].nunique()),
                   "packages": {p: package_version(cache / "debian", p) for p in packages}})
    atomic_write_json(report, root / "build.json")
    atomic_write_text(df.to_csv(index=False), manifest)
    log.info("icon benchmark: %d classes, %d themes, %d images -> %s", report["classes"], report["themes"],
             len(df), manifest)
    return manifest
