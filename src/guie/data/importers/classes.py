"""Fine-grained classification sets used as retrieval data: Stanford Cars and Food-101."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from .common import DatasetImportError, Skips, find_first, find_optional, read_csv, read_lines


def _loadmat(path: Path) -> dict:
    try:
        from scipy.io import loadmat
    except ImportError:  # pragma: no cover - scipy is a dependency; this names it if an install lacks it
        raise DatasetImportError(f"{path}: reading .mat annotations needs scipy (pip install scipy)") from None
    try:
        return loadmat(str(path), squeeze_me=True)
    except Exception as e:  # scipy raises ValueError/TypeError/MatReadError for non-.mat files
        raise DatasetImportError(f"{path}: cannot read MATLAB file ({type(e).__name__}: {e})") from None


def _image_lookup(root: Path, folders: list[str]) -> tuple[Path | None, dict[str, Path]]:
    """file name -> path for all images under the first existing folder (flat, nested or per-class layouts)."""
    for f in folders:
        d = root / f
        if d.is_dir():
            return d, {p.name: p for p in d.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png")}
    return None, {}


def stanford_cars(root: Path, skips: Skips, split: str = "train") -> pd.DataFrame:
    """Stanford Cars (196 models, 16k images), in any of its published forms:

    * the devkit: `devkit/cars_train_annos.mat`, `cars_test_annos_withlabels.mat` (struct arrays with bbox_*,
      class, fname) and `devkit/cars_meta.mat` (class_names), images in `cars_train/` and `cars_test/`;
    * the full release: `cars_annos.mat` (relative_im_path, class, test, plus class_names), images in `car_ims/`;
    * the common CSV copy: `anno_train.csv` / `anno_test.csv` (no header: fname,x1,y1,x2,y2,class) and `names.csv`,
      images in `car_data/car_data/<split>/<class name>/`.
    Label = class id (1..196); `class_name` and the bounding box (`bbox`) are kept.
    """
    if split not in ("train", "test", "all"):
        raise DatasetImportError(f"stanford_cars: split must be train, test or all, got {split!r}")
    splits = ["train", "test"] if split == "all" else [split]
    full = find_optional(root, ["cars_annos.mat"])
    if full is not None:
        mat = _loadmat(full)
        a = np.atleast_1d(mat["annotations"])
        names = [str(n) for n in np.atleast_1d(mat.get("class_names", []))]
        df = pd.DataFrame({"rel": [str(x) for x in a["relative_im_path"]],
                           "class": [int(x) for x in a["class"]],
                           "split": ["test" if int(t) else "train" for t in a["test"]],
                           "bbox": [f"{int(x1)},{int(y1)},{int(x2)},{int(y2)}" for x1, y1, x2, y2 in
                                    zip(a["bbox_x1"], a["bbox_y1"], a["bbox_x2"], a["bbox_y2"])]})
        df = df[df["split"].isin(splits)]
        paths = [str(root / r) for r in df["rel"]]
        return _cars_frame(paths, df, names)
    frames = []
    for s in splits:
        mat_path = find_optional(root, [f"devkit/cars_{s}_annos.mat", f"cars_{s}_annos.mat"] if s == "train" else
                                 ["cars_test_annos_withlabels.mat", "devkit/cars_test_annos_withlabels.mat"])
        csv_path = find_optional(root, [f"anno_{s}.csv", f"car_data/anno_{s}.csv"])
        if mat_path is not None:
            a = np.atleast_1d(_loadmat(mat_path)["annotations"])  # squeeze_me turns 1 record into a 0-d array
            if "class" not in (a.dtype.names or ()):
                raise DatasetImportError(f"{mat_path}: no 'class' field (the unlabeled test annotations?); use "
                                         "cars_test_annos_withlabels.mat")
            df = pd.DataFrame({"fname": [str(x) for x in a["fname"]], "class": [int(x) for x in a["class"]],
                               "bbox": [f"{int(x1)},{int(y1)},{int(x2)},{int(y2)}" for x1, y1, x2, y2 in
                                        zip(a["bbox_x1"], a["bbox_y1"], a["bbox_x2"], a["bbox_y2"])]})
            meta = find_optional(root, ["devkit/cars_meta.mat", "cars_meta.mat"])
            names = [str(n) for n in np.atleast_1d(_loadmat(meta)["class_names"])] if meta is not None else []
        elif csv_path is not None:
            raw = read_csv(csv_path, header=None)
            if raw.shape[1] != 6:
                raise DatasetImportError(f"{csv_path}: expected 6 columns fname,x1,y1,x2,y2,class; got {raw.shape[1]}")
            df = pd.DataFrame({"fname": raw[0].astype(str), "class": pd.to_numeric(raw[5], errors="coerce"),
                               "bbox": [f"{a},{b},{c},{d}" for a, b, c, d in zip(raw[1], raw[2], raw[3], raw[4])]})
            names_csv = find_optional(root, ["names.csv", "car_data/names.csv"])
            names = read_lines(names_csv) if names_csv is not None else []
        else:
            raise DatasetImportError(f"{root}: no Stanford Cars annotations for {s} (looked for devkit/cars_{s}_annos"
                                     f".mat, cars_test_annos_withlabels.mat, cars_annos.mat, anno_{s}.csv)")
        folder, lookup = _image_lookup(root, [f"cars_{s}", f"car_data/car_data/{s}", f"car_data/{s}", s])
        if folder is None:
            raise DatasetImportError(f"{root}: no image folder for {s} (looked for cars_{s}/, car_data/car_data/{s}/)")
        df["split"] = s
        paths = [str(lookup.get(f, folder / f)) for f in df["fname"]]
        frames.append(_cars_frame(paths, df, names))
    return pd.concat(frames, ignore_index=True)


def _cars_frame(paths: list[str], df: pd.DataFrame, names: list[str]) -> pd.DataFrame:
    cls = df["class"]
    label = [str(int(c)) if pd.notna(c) and 1 <= int(c) else None for c in cls]
    class_name = [names[int(c) - 1] if pd.notna(c) and 1 <= int(c) <= len(names) else "" for c in cls]
    return pd.DataFrame({"path": paths, "label": label, "split": df["split"].to_numpy(), "class_name": class_name,
                         "bbox": df["bbox"].to_numpy()})


def food101(root: Path, skips: Skips, split: str = "train") -> pd.DataFrame:
    """Food-101 (101 dishes x 1,000 images): `meta/train.txt` / `meta/test.txt` with lines `apple_pie/1005649`,
    images at `images/apple_pie/1005649.jpg`. Label = the dish (class folder name)."""
    if split not in ("train", "test", "all"):
        raise DatasetImportError(f"food101: split must be train, test or all, got {split!r}")
    base = root / "food-101" if (root / "food-101" / "meta").is_dir() else root
    frames = []
    for s in ["train", "test"] if split == "all" else [split]:
        txt = find_first(base, [f"meta/{s}.txt"], f"meta/{s}.txt")
        entries = read_lines(txt)
        bad = [e for e in entries if e.count("/") != 1]
        skips.add("malformed line", bad)
        entries = [e for e in entries if e.count("/") == 1]
        frames.append(pd.DataFrame({"path": [str(base / "images" / f"{e}.jpg") for e in entries],
                                    "label": [e.split("/")[0] for e in entries], "split": s}))
    return pd.concat(frames, ignore_index=True)
