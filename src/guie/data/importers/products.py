"""Products: Products-10K, Shopee Price Match, Stanford Online Products, H&M."""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from .common import DatasetImportError, Skips, find_first, read_csv, read_lines, require_columns


def _splits(split: str, allowed: tuple[str, ...], name: str) -> list[str]:
    if split == "all":
        return list(allowed)
    if split not in allowed:
        raise DatasetImportError(f"{name}: split must be one of {list(allowed) + ['all']}, got {split!r}")
    return [split]


def products10k(root: Path, skips: Skips, split: str = "train") -> pd.DataFrame:
    """Products-10K (SKU-level retail products, 10k classes): `train.csv` (name, class, group) with images in
    `train/`; the test set is `test_kaggletest.csv` (name, class, usage) or `test.csv` with images in `test/`.
    `group` (the 360 product groups) is kept as a column."""
    frames = []
    for s in _splits(split, ("train", "test"), "products10k"):
        csv = find_first(root, ["train.csv"] if s == "train" else ["test_kaggletest.csv", "test.csv"], f"{s} CSV")
        df = read_csv(csv, dtype=str)
        require_columns(df, ["name", "class"], csv)
        out = pd.DataFrame({"path": [str(root / s / n.strip()) for n in df["name"].fillna("")],
                            "label": df["class"].to_numpy(), "split": s})
        for extra in ("group", "usage"):
            if extra in df.columns:
                out[extra] = df[extra].to_numpy()
        frames.append(out)
    return pd.concat(frames, ignore_index=True)


def shopee(root: Path, skips: Skips) -> pd.DataFrame:
    """Shopee Price Match Guarantee: `train.csv` (posting_id, image, image_phash, title, label_group) with images
    in `train_images/`. Label = label_group (postings of the same product). Titles contain commas and quotes
    (standard CSV quoting). The same image file is reused by several postings: later copies are counted as
    duplicate paths. test.csv has no labels and is not imported."""
    csv = find_first(root, ["train.csv"], "train.csv")
    df = read_csv(csv, dtype=str, keep_default_na=False)
    require_columns(df, ["posting_id", "image", "label_group"], csv)
    img_dir = find_first(root, ["train_images", "images"], "image folder")
    out = pd.DataFrame({"path": [str(img_dir / n.strip()) for n in df["image"]],
                        "label": df["label_group"].str.strip().to_numpy(), "split": "train",
                        "posting_id": df["posting_id"].to_numpy()})
    if "title" in df.columns:
        out["title"] = df["title"].to_numpy()
    return out


def sop(root: Path, skips: Skips, split: str = "train") -> pd.DataFrame:
    """Stanford Online Products (120k images, 22.6k products, 12 categories): `Ebay_train.txt` / `Ebay_test.txt`
    with a header line `image_id class_id super_class_id path` and paths like `bicycle_final/<id>_0.JPG`.
    Label = class_id; the category (folder name without `_final`) is the `super_class` column."""
    frames = []
    for s in _splits(split, ("train", "test"), "sop"):
        name = f"Ebay_{s}.txt"
        txt = find_first(root, [name, f"Stanford_Online_Products/{name}"], name)
        lines = read_lines(txt)
        if not lines or lines[0].split()[:4] != ["image_id", "class_id", "super_class_id", "path"]:
            raise DatasetImportError(f"{txt}: expected the header 'image_id class_id super_class_id path'")
        rows, bad = [], []
        for ln in lines[1:]:
            parts = ln.split()
            if len(parts) != 4:
                bad.append(ln)
                continue
            rows.append(parts)
        skips.add("malformed line", bad)
        df = pd.DataFrame(rows, columns=["image_id", "class_id", "super_class_id", "path"])
        frames.append(pd.DataFrame({
            "path": [str(txt.parent / p) for p in df["path"]], "label": df["class_id"].to_numpy(), "split": s,
            "super_class": [p.split("/")[0].removesuffix("_final") for p in df["path"]],
        }))
    return pd.concat(frames, ignore_index=True)


def hm(root: Path, skips: Skips, label_by: str = "product_code") -> pd.DataFrame:
    """H&M Personalized Fashion Recommendations: `articles.csv` (article_id, product_code, prod_name,
    product_type_name, product_group_name, ...) with images at `images/<first 3 digits>/<article_id>.jpg`.

    Quirks handled: ids are zero-padded (10-digit article ids, 7-digit product codes) and lose the leading zero when
    a spreadsheet or a default pandas read turns them into numbers; ~400 articles have no image (skipped as missing).
    Args:
        label_by: product_code (all colours of one product are one class, as GUIE solutions used) or article_id.
    """
    if label_by not in ("product_code", "article_id"):
        raise DatasetImportError(f"hm: label_by must be product_code or article_id, got {label_by!r}")
    csv = find_first(root, ["articles.csv"], "articles.csv")
    df = read_csv(csv, dtype=str)
    require_columns(df, ["article_id", "product_code"], csv)
    bad = ~(df["article_id"].fillna("").str.strip().str.fullmatch(r"\d{1,10}")
             & df["product_code"].fillna("").str.strip().str.fullmatch(r"\d{1,7}"))
    skips.add("bad article id or product code", df.loc[bad, "article_id"].astype(str), n=int(bad.sum()))
    df = df[~bad]
    aid = df["article_id"].str.strip().str.zfill(10)
    code = df["product_code"].str.strip().str.zfill(7)
    img_dir = find_first(root, ["images"], "images folder")
    out = pd.DataFrame({"path": [str(img_dir / a[:3] / f"{a}.jpg") for a in aid],
                        "label": (code if label_by == "product_code" else aid).to_numpy(), "split": "train",
                        "article_id": aid.to_numpy(), "product_code": code.to_numpy()})
    for extra in ("prod_name", "product_type_name", "product_group_name"):
        if extra in df.columns:
            out[extra] = df[extra].to_numpy()
    return out
