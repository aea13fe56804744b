"""Layouts that are not one dataset's: GPR1200 (labels in file names), ImageFolder trees and arbitrary CSVs."""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from ...imaging.io import IMAGE_EXTENSIONS
from ..manifest import list_images
from .common import DatasetImportError, Skips, read_csv, require_columns

# GPR1200 keeps its six sources in blocks of 200 classes (by the number before "_" in the file name), in the
# order of the authors' evaluation code: GLDv2, iNat, sketches, INSTRE, SOP, IMDB faces.
GPR1200_DOMAINS = ("landmark", "nature", "sketch", "instre", "products", "faces")


def gpr1200(root: Path, skips: Skips) -> pd.DataFrame:
    """GPR1200 (1,200 classes x 10 images, a general-purpose retrieval benchmark): one folder of images named
    `<class>_<image>.jpg` (e.g. `17_a8dbeb8b4f0b5d1e.jpg`); label = the class number, domain = its source
    (classes 0-199 landmark, 200-399 nature, 400-599 sketch, 600-799 instre, 800-999 products, 1000-1199 faces)."""
    folder = root / "images" if (root / "images").is_dir() else root
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise DatasetImportError(f"{folder}: no images (GPR1200 is one folder of <class>_<image>.jpg files)")
    good, bad = [], []
    for p in files:
        head = p.name.split("_", 1)[0]
        (good if head.isdigit() and "_" in p.name else bad).append(p)
    skips.add("bad label (file name is not <class>_<image>)", [str(p) for p in bad])
    labels = [int(p.name.split("_", 1)[0]) for p in good]
    return pd.DataFrame({"path": [str(p) for p in good], "label": [str(c) for c in labels],
                         "domain": [GPR1200_DOMAINS[min(c // 200, 5)] for c in labels]})


_SPLIT_NAMES = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test",
                "query": "query", "gallery": "gallery", "index": "index"}


def imagefolder(root: Path, skips: Skips, split_folders: str = "auto") -> pd.DataFrame:
    """A torchvision-style ImageFolder: `<root>/<class>/**/<image>`, label = the class folder's name.

    Args:
        split_folders: "auto" treats top-level folders named train/val/valid/validation/test/query/gallery/index
            as splits (`<root>/<split>/<class>/...`) when every top-level folder has such a name; "yes"/"no" force it.
    Images directly in `root` (no class folder) are skipped.
    """
    dirs = sorted(d.name for d in root.iterdir() if d.is_dir())
    if split_folders not in ("auto", "yes", "no"):
        raise DatasetImportError(f"imagefolder: split_folders must be auto, yes or no, got {split_folders!r}")
    use_splits = split_folders == "yes" or (split_folders == "auto" and dirs and
                                             all(d.lower() in _SPLIT_NAMES for d in dirs))
    files = list_images(root)
    if not files:
        raise DatasetImportError(f"{root}: no images found (extensions {', '.join(IMAGE_EXTENSIONS)})")
    recs, loose = [], []
    for p in files:
        parts = p.relative_to(root).parts
        if use_splits:
            if len(parts) < 3:
                loose.append(str(p))
                continue
            recs.append((str(p), parts[1], _SPLIT_NAMES.get(parts[0].lower(), parts[0])))
        else:
            if len(parts) < 2:
                loose.append(str(p))
                continue
            recs.append((str(p), parts[0], None))
    skips.add("no class folder", loose)
    df = pd.DataFrame(recs, columns=["path", "label", "split"])
    return df if use_splits else df.drop(columns=["split"])


def csv(root: Path, skips: Skips, path_column: str = "path", label_column: str = "label",
        domain_column: str = "", split_column: str = "", image_root: str = "", sep: str = ",") -> pd.DataFrame:
    """Any CSV/TSV table of images: `root` is the file; name its columns. Relative paths are resolved against
    `image_root` (default: the CSV's folder). All other columns are kept."""
    if not root.is_file():
        raise DatasetImportError(f"{root}: the csv importer takes the CSV file itself as ROOT")
    df = read_csv(root, dtype=str, sep="\t" if root.suffix.lower() == ".tsv" and sep == "," else sep)
    require_columns(df, [c for c in (path_column, label_column, domain_column, split_column) if c], root)
    base = Path(image_root).expanduser() if image_root else root.parent
    if not base.is_absolute():
        base = root.parent / base
    rename = {path_column: "path", label_column: "label"}
    if domain_column:
        rename[domain_column] = "domain"
    if split_column:
        rename[split_column] = "split"
    clash = [v for k, v in rename.items() if k != v and v in df.columns]
    df = df.drop(columns=clash).rename(columns=rename)
    df["path"] = [str(p) if Path(p).is_absolute() else str(base / p) for p in df["path"].fillna("").str.strip()]
    return df
