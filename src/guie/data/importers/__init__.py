"""Importers: a dataset as downloaded (its own published layout) -> a guie manifest `path,label,domain[,split]`.

    from guie.data.importers import import_dataset
    res = import_dataset("sop", "/data/Stanford_Online_Products", split="train")
    res.manifest          # DataFrame: path (absolute), label, domain, split, extra columns
    res.skipped           # {"missing file": 3, "bad label": 1, ...}

Every importer is a function `(root, skips, **options) -> DataFrame` in `IMPORTERS`; `import_dataset` checks the
options against its signature, then drops (and counts) rows with no label, duplicate paths, missing or empty files
and, with `verify=True`, files whose image header cannot be read.
"""
from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from .classes import food101, stanford_cars
from .common import DatasetImportError, Skips, finalize
from .fashion import deepfashion_c2s, deepfashion_inshop
from .generic import csv, gpr1200, imagefolder
from .landmarks import gldv2, met
from .products import hm, products10k, shopee, sop

__all__ = ["IMPORTERS", "DEFAULT_DOMAINS", "ImportResult", "DatasetImportError", "import_dataset", "importer_options",
           "parse_options"]

IMPORTERS: dict[str, Callable[..., pd.DataFrame]] = {
    "gldv2": gldv2,
    "products10k": products10k,
    "shopee": shopee,
    "met": met,
    "sop": sop,
    "deepfashion_inshop": deepfashion_inshop,
    "deepfashion_c2s": deepfashion_c2s,
    "stanford_cars": stanford_cars,
    "food101": food101,
    "hm": hm,
    "gpr1200": gpr1200,
    "imagefolder": imagefolder,
    "csv": csv,
}

# GUIE's domains where a dataset has one (the GUIE test set: apparel, artwork, cars, dishes, furniture,
# illustrations, landmarks, memes, packaged goods, storefronts, toys).
DEFAULT_DOMAINS = {
    "gldv2": "landmark", "products10k": "packaged", "shopee": "products", "met": "artwork", "sop": "products",
    "deepfashion_inshop": "apparel", "deepfashion_c2s": "apparel", "stanford_cars": "cars", "food101": "dishes",
    "hm": "apparel", "gpr1200": "mixed", "imagefolder": "default", "csv": "default",
}


@dataclass
class ImportResult:
    """An imported manifest and what was left out of it."""

    kind: str
    root: Path
    manifest: pd.DataFrame
    skipped: dict[str, int] = field(default_factory=dict)
    examples: dict[str, list[str]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def n_skipped(self) -> int:
        return sum(self.skipped.values())

    def summary(self) -> str:
        """One line: rows kept, classes, and skipped rows by reason."""
        df = self.manifest
        classes = df["label"].nunique() if len(df) else 0
        line = f"{self.kind}: {len(df)} images, {classes} classes"
        if "split" in df.columns and len(df):
            line += " (" + ", ".join(f"{k} {v}" for k, v in df["split"].value_counts().sort_index().items()) + ")"
        if self.skipped:
            line += f"; skipped {self.n_skipped}: " + ", ".join(f"{k} {v}" for k, v in self.skipped.items())
        return line


FILE_IMPORTERS = ("csv",)  # importers whose source is one file; every other one reads a folder

def importer_options(kind: str) -> dict[str, inspect.Parameter]:
    """The dataset-specific options of an importer (name -> Parameter with default and annotation)."""
    fn = _importer(kind)
    params = list(inspect.signature(fn).parameters.values())[2:]  # after (root, skips)
    return {p.name: p for p in params}


def _importer(kind: str) -> Callable[..., pd.DataFrame]:
    if kind not in IMPORTERS:
        raise DatasetImportError(f"unknown dataset kind {kind!r}; choose from {', '.join(IMPORTERS)}")
    return IMPORTERS[kind]


def parse_options(kind: str, items: list[str]) -> dict:
    """CLI `key=value` strings -> typed keyword arguments of the importer (bool/int/str by its defaults)."""
    allowed = importer_options(kind)
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep:
            raise DatasetImportError(f"option {item!r} must look like key=value")
        if key not in allowed:
            raise DatasetImportError(f"{kind}: unknown option {key!r}; options: {', '.join(allowed) or 'none'}")
        default = allowed[key].default
        if isinstance(default, bool):
            if value.lower() not in ("1", "0", "true", "false", "yes", "no"):
                raise DatasetImportError(f"{kind}: option {key} takes true/false, got {value!r}")
            out[key] = value.lower() in ("1", "true", "yes")
        elif isinstance(default, int):
            try:
                out[key] = int(value)
            except ValueError:
                raise DatasetImportError(f"{kind}: option {key} takes an integer, got {value!r}") from None
        else:
            out[key] = value
    return out


def import_dataset(kind: str, root: str | Path, domain: str | None = None, verify: bool = False,
                   **options) -> ImportResult:
    """Read a dataset's published layout under `root` into a manifest (see `IMPORTERS` for the kinds).

    Args:
        domain: the `domain` column (default: the dataset's GUIE domain, see DEFAULT_DOMAINS; GPR1200 has one per
            class block); a domain set here overrides the importer's.
        verify: also open every image's header and skip those PIL cannot read (full decoding: `guie data check`).
        options: dataset-specific, e.g. split="test" (see each importer's docstring / `importer_options`).
    Raises:
        DatasetImportError: unknown kind or option, or a root that does not have the expected files.
    """
    fn = _importer(kind)
    allowed = importer_options(kind)
    unknown = [k for k in options if k not in allowed]
    if unknown:
        raise DatasetImportError(f"{kind}: unknown option(s) {unknown}; options: {', '.join(allowed) or 'none'}")
    root = Path(root).expanduser()
    if not root.exists():
        raise DatasetImportError(f"{root}: no such file or folder")
    if kind not in FILE_IMPORTERS and not root.is_dir():
        raise DatasetImportError(f"{root}: is a file; the {kind} importer reads a dataset folder")
    root = root.resolve()
    skips = Skips()
    df = fn(root, skips, **options)
    if domain is not None:
        df["domain"] = domain
    df = finalize(df, skips, DEFAULT_DOMAINS[kind], verify=verify)
    return ImportResult(kind, root, df, dict(skips.counts), dict(skips.examples), list(skips.notes))
