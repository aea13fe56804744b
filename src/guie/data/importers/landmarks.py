"""Landmarks and artwork: Google Landmarks v2 and The Met."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pandas as pd

from .common import DatasetImportError, Skips, find_first, find_optional, pick_base, read_csv, require_columns

_GLD_ID = re.compile(r"^[0-9a-f]{16}$")


def gldv2(root: Path, skips: Skips, subset: str = "clean", images: str = "train") -> pd.DataFrame:
    """Google Landmarks v2 (train set), as published: `train_clean.csv` (landmark_id, images = space-separated ids)
    or `train.csv` (id, url, landmark_id; the Kaggle 2020/21 copies have no url), images at
    `train/<a>/<b>/<c>/<abc...>.jpg` (first three characters of the 16-hex-digit id).

    Args:
        subset: "clean" (train_clean.csv: 1.58M images, 81k landmarks, the set GUIE winners used) or "all"
            (train.csv: 4.1M images, 203k landmarks, noisy).
        images: folder holding the 3-level image tree, relative to root.
    `train_label_to_category.csv` (landmark_id, category URL), when present, adds a `category` column.
    """
    if subset == "clean":
        csv = find_first(root, ["train_clean.csv", "train/train_clean.csv", "metadata/train_clean.csv"],
                         "train_clean.csv")
        raw = read_csv(csv, dtype=str)
        require_columns(raw, ["landmark_id", "images"], csv)
        raw["id"] = raw["images"].fillna("").str.split()
        df = raw[["landmark_id", "id"]].explode("id")
        empty = df["id"].isna()
        skips.add("landmark with no images", df.loc[empty, "landmark_id"].astype(str), n=int(empty.sum()))
        df = df[~empty]
    elif subset == "all":
        csv = find_first(root, ["train.csv", "train/train.csv", "metadata/train.csv"], "train.csv")
        df = read_csv(csv, dtype=str)
        require_columns(df, ["id", "landmark_id"], csv)
    else:
        raise DatasetImportError(f"gldv2: subset must be 'clean' or 'all', got {subset!r}")
    df = df.reset_index(drop=True)
    ids = df["id"].astype(str).str.strip().str.lower()
    bad_id = ~ids.str.match(_GLD_ID)
    skips.add("bad image id", ids[bad_id], n=int(bad_id.sum()))
    df, ids = df[~bad_id], ids[~bad_id]
    bad_label = ~df["landmark_id"].astype(str).str.strip().str.fullmatch(r"\d+")
    skips.add("bad label", df.loc[bad_label, "landmark_id"].astype(str), n=int(bad_label.sum()))
    df, ids = df[~bad_label], ids[~bad_label]
    base = root / images
    out = pd.DataFrame({
        "path": [str(base / i[0] / i[1] / i[2] / f"{i}.jpg") for i in ids],
        "label": df["landmark_id"].astype(str).str.strip().to_numpy(),
        "split": "train",
        "image_id": ids.to_numpy(),
    })
    cats = find_optional(root, ["train_label_to_category.csv", "metadata/train_label_to_category.csv"])
    if cats is not None:
        c = read_csv(cats, dtype=str)
        if {"landmark_id", "category"} <= set(c.columns):
            out["category"] = out["label"].map(dict(zip(c["landmark_id"].str.strip(), c["category"])))
    return out


_MET_GT = {"train": "MET_database.json", "val": "valset.json", "test": "testset.json"}


def met(root: Path, skips: Skips, split: str = "train", mini: bool = False) -> pd.DataFrame:
    """The Met dataset (artwork, 224k exhibits): `ground_truth/MET_database.json` ([{"id", "path": "MET/<id>/<n>.jpg"}])
    for the exhibit images; `valset.json` / `testset.json` ([{"path": "test_met/<x>.jpg", "MET_id", ...}]) for the
    visitor-photo queries, where entries without MET_id are distractors (other art, non-art) and are skipped.

    Args:
        split: train (exhibit images), val or test (queries), or all.
        mini: use mini_MET_database.json (38k images) for train.
    The image root is found automatically (archives unpack as `MET/<id>/` or `MET/MET/<id>/`).
    """
    splits = list(_MET_GT) if split == "all" else [split]
    if any(s not in _MET_GT for s in splits):
        raise DatasetImportError(f"met: split must be train, val, test or all, got {split!r}")
    gt_dir = find_first(root, ["ground_truth", "MET/ground_truth", "."], "ground_truth folder")
    frames = []
    for s in splits:
        name = ("mini_" if mini and s == "train" else "") + _MET_GT[s]
        gt = find_first(gt_dir, [name], f"MET ground-truth file {name}")
        try:
            entries = json.loads(gt.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DatasetImportError(f"{gt}: invalid JSON ({e})") from None
        if not isinstance(entries, list):
            raise DatasetImportError(f"{gt}: expected a JSON list of {{'path', ...}} entries")
        key = "id" if s == "train" else "MET_id"
        labelled = [e for e in entries if isinstance(e, dict) and "path" in e and e.get(key) is not None]
        distractors = [e for e in entries if isinstance(e, dict) and "path" in e and e.get(key) is None]
        malformed = [e for e in entries if not isinstance(e, dict) or "path" not in e]
        skips.add("distractor (no MET_id)", [e["path"] for e in distractors])
        skips.add("malformed entry", [json.dumps(e)[:80] for e in malformed])
        rel = [str(e["path"]) for e in labelled]
        base = pick_base([root, root / "MET", gt_dir.parent], rel)
        frames.append(pd.DataFrame({"path": [str(base / r) for r in rel],
                                    "label": [str(e[key]) for e in labelled], "split": s}))
    return pd.concat(frames, ignore_index=True)
