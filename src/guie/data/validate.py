"""`guie data check`: open every image of a manifest (in parallel) and report what is wrong with it.

Errors (the row is left out of the cleaned manifest): missing, empty, format (not an image), truncated, corrupt,
decode, bomb (more pixels than `max_pixels`), too_large (a non-JPEG with more pixels than guie decodes, see
`images.max_decoded_pixels`), tiny (short side < `min_side`).
Warnings (kept: `load_image` handles them, but they are worth knowing about): cmyk, 16bit, palette, alpha, exif
(an EXIF orientation other than 1, so the stored pixels are rotated), huge (more than `huge_pixels`: slow to decode),
grayscale, animated.
Nothing is deleted or modified on disk; the outputs are a report CSV and a cleaned manifest.
"""
from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
from PIL import Image
from tqdm.auto import tqdm

from ..errors import InputError
from ..imaging.io import DEFAULT_MAX_PIXELS, ImageLoadError, image_source, load_image
from .manifest import write_manifest

ERROR_KINDS = ("missing", "empty", "format", "truncated", "corrupt", "decode", "bomb", "too_large", "tiny",
               "unreadable")
WARNING_KINDS = ("cmyk", "16bit", "palette", "alpha", "exif", "huge", "grayscale", "animated")
_EXIF_ORIENTATION = 0x0112


def default_workers() -> int:
    """All cores: checking is decode-bound and embarrassingly parallel."""
    return max(1, os.cpu_count() or 1)


def parallel_map(fn: Callable, items: Sequence, workers: int | None = None, chunksize: int = 32,
                 progress: bool = True, desc: str = "", unit: str = "img") -> list:
    """[fn(x) for x in items] over a process pool, in order, with a progress bar.

    `fn` must be a module-level function (picklable); with workers <= 1 it runs in this process (no pool start-up,
    easier debugging).
    """
    workers = default_workers() if workers is None else workers
    out: list = []
    with tqdm(total=len(items), desc=desc, unit=unit, disable=not progress, dynamic_ncols=True) as bar:
        if workers <= 1 or len(items) <= chunksize:
            for x in items:
                out.append(fn(x))
                bar.update(1)
            return out
        with ProcessPoolExecutor(max_workers=workers) as pool:
            for r in pool.map(fn, items, chunksize=chunksize):
                out.append(r)
                bar.update(1)
    return out


@dataclass
class CheckConfig:
    """Thresholds of `guie data check`."""

    min_side: int = 32                       # shorter side below this is 'tiny' (an error)
    max_pixels: int = DEFAULT_MAX_PIXELS     # above this is a decompression bomb (an error)
    huge_pixels: int = 40_000_000            # above this is 'huge' (a warning: slow, ~120 MB decoded)
    decode: bool = True                      # fully decode (finds truncation); False = headers only, ~50x faster
    drop: tuple[str, ...] = ()               # warning kinds to treat as errors too (e.g. ("animated",))

    def __post_init__(self):
        unknown = [k for k in self.drop if k not in WARNING_KINDS]
        if unknown:
            raise InputError(f"drop: unknown warning kind(s) {unknown}; choose from {list(WARNING_KINDS)}")


@dataclass
class ImageCheck:
    """What one image is like; `errors`/`warnings` are ';'-joined kinds, `message` the first error's reason."""

    path: str
    ok: bool = True
    errors: str = ""
    warnings: str = ""
    message: str = ""
    format: str = ""
    mode: str = ""
    width: int = 0
    height: int = 0
    orientation: int = 1
    frames: int = 1


def check_image(path: str, cfg: CheckConfig | None = None) -> ImageCheck:
    """Inspect one image: header facts (format, mode, size, EXIF orientation), then a full decode by `load_image`."""
    cfg = cfg or CheckConfig()
    res = ImageCheck(path=str(path))
    errors: list[str] = []
    warns: list[str] = []
    try:
        with Image.open(image_source(path)) as im:
            res.format, res.mode = im.format or "", im.mode
            res.width, res.height = im.size
            res.frames = int(getattr(im, "n_frames", 1) or 1)
            try:
                res.orientation = _orientation(im)
            except Exception:  # malformed EXIF blocks are common and harmless: load_image ignores them too
                res.orientation = 1
            has_transparency = "transparency" in im.info
    except ImageLoadError as e:
        return _failed(res, e.kind, e.reason)
    except Image.DecompressionBombError as e:
        return _failed(res, "bomb", str(e))
    except Exception as e:  # UnidentifiedImageError, OSError, SyntaxError...: PIL cannot even read the header
        return _failed(res, "format", f"not a recognised image ({type(e).__name__}: {e})")

    mode = res.mode
    if mode == "CMYK":
        warns.append("cmyk")
    if mode.startswith("I;16") or mode in ("I", "F"):
        warns.append("16bit")
    if mode in ("P", "PA"):
        warns.append("palette")
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or has_transparency:
        warns.append("alpha")
    if mode in ("L", "1", "LA", "I;16", "I;16B", "I;16L", "I", "F"):
        warns.append("grayscale")
    if res.orientation not in (0, 1):
        warns.append("exif")
    if res.frames > 1:
        warns.append("animated")
    pixels = res.width * res.height
    if pixels > cfg.max_pixels:
        errors.append("bomb")
        res.message = f"{res.width}x{res.height} = {pixels:,} pixels > {cfg.max_pixels:,}"
    elif pixels > cfg.huge_pixels:
        warns.append("huge")
    if min(res.width, res.height) < cfg.min_side:
        errors.append("tiny")
        res.message = res.message or f"{res.width}x{res.height} is smaller than {cfg.min_side} px"
    if cfg.decode and not errors:
        try:
            load_image(path, max_pixels=cfg.max_pixels)
        except ImageLoadError as e:
            errors.append(e.kind)
            res.message = e.reason
    errors += [w for w in warns if w in cfg.drop]
    res.errors, res.warnings = ";".join(errors), ";".join(warns)
    res.ok = not errors
    return res


def _orientation(im: Image.Image) -> int:
    """EXIF orientation without decoding pixels (PNG's getexif() would load the whole image first)."""
    if im.format == "PNG":
        if "exif" not in im.info:
            return 1
        exif = Image.Exif()
        exif.load(im.info["exif"])
    else:
        exif = im.getexif()
    return int(exif.get(_EXIF_ORIENTATION, 1) or 1)


def _failed(res: ImageCheck, kind: str, message: str) -> ImageCheck:
    res.ok, res.errors, res.message = False, kind, message
    return res


class _Checker:
    """Picklable `check_image` with a fixed config, for the process pool."""

    def __init__(self, cfg: CheckConfig):
        self.cfg = cfg

    def __call__(self, path: str) -> ImageCheck:
        return check_image(path, self.cfg)


@dataclass
class CheckResult:
    """Per-image report rows (in manifest order), the cleaned manifest, and counts per issue kind."""

    report: pd.DataFrame
    clean: pd.DataFrame
    counts: dict[str, int] = field(default_factory=dict)

    @property
    def n_bad(self) -> int:
        return int((~self.report["ok"]).sum())

    def summary_rows(self) -> list[dict]:
        """[{kind, severity, images}] for the kinds that occurred, errors first."""
        rows = [{"kind": k, "severity": "error", "images": self.counts[k]} for k in ERROR_KINDS if self.counts.get(k)]
        rows += [{"kind": k, "severity": "warning", "images": self.counts[k]}
                 for k in WARNING_KINDS if self.counts.get(k)]
        return rows


def count_kinds(values: Iterable[str]) -> dict[str, int]:
    """{'tiny': 3, ...} from ';'-joined kind strings."""
    counts: dict[str, int] = {}
    for v in values:
        for k in filter(None, str(v).split(";")):
            counts[k] = counts.get(k, 0) + 1
    return counts


def check_manifest(df: pd.DataFrame, cfg: CheckConfig | None = None, workers: int | None = None,
                   progress: bool = True, chunksize: int = 32) -> CheckResult:
    """Check every image of `df` (a manifest with absolute `path`s) in parallel; nothing on disk is changed."""
    cfg = cfg or CheckConfig()
    paths = df["path"].astype(str).tolist()
    checks = parallel_map(_Checker(cfg), paths, workers, chunksize=chunksize, progress=progress, desc="check")
    report = pd.DataFrame([vars(c) for c in checks], columns=list(ImageCheck.__dataclass_fields__))
    ok = report["ok"].to_numpy(dtype=bool)
    counts = count_kinds(report["errors"])
    counts.update(count_kinds(report["warnings"]))
    return CheckResult(report, df[ok].reset_index(drop=True), counts)


def write_check_outputs(result: CheckResult, out_prefix: str | Path) -> tuple[Path, Path]:
    """Write `<prefix>.clean.csv` and `<prefix>.report.csv` (only the rows with an error or warning), atomically."""
    from ..utils import atomic_write_text

    out_prefix = Path(out_prefix)
    clean_path = out_prefix.with_name(out_prefix.name + ".clean.csv")
    report_path = out_prefix.with_name(out_prefix.name + ".report.csv")
    write_manifest(result.clean, clean_path)
    flagged = result.report[(~result.report["ok"]) | (result.report["warnings"] != "")]
    atomic_write_text(flagged.to_csv(index=False), report_path)
    return clean_path, report_path


def print_problems(result: CheckResult, limit: int = 20, file=sys.stderr) -> None:
    """One line per bad image ('<path>: <kind>: <reason>'), at most `limit`."""
    bad = result.report[~result.report["ok"]]
    for row in bad.head(limit).itertuples():
        print(f"{row.path}: {row.errors}: {row.message}", file=file)
    if len(bad) > limit:
        print(f"... and {len(bad) - limit} more (see the report CSV)", file=file)
