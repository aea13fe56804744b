"""DeepFashion In-shop Clothes Retrieval and Consumer-to-shop Clothes Retrieval benchmarks."""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from .common import DatasetImportError, Skips, find_first, pick_base, read_lines

_PARTITION = ["Eval/list_eval_partition.txt", "list_eval_partition.txt", "Anno/list_eval_partition.txt"]


def _read_partition(root: Path, header: list[str], skips: Skips) -> tuple[Path, list[list[str]]]:
    """The rows of list_eval_partition.txt: line 1 = row count, line 2 = column names, then space-aligned rows."""
    txt = find_first(root, _PARTITION, "list_eval_partition.txt")
    lines = read_lines(txt)
    if len(lines) < 2 or lines[1].split() != header:
        raise DatasetImportError(f"{txt}: expected a count line then the header {' '.join(header)!r}; "
                                 "is this the right DeepFashion benchmark?")
    rows, bad = [], []
    for ln in lines[2:]:
        parts = ln.split()
        if len(parts) == len(header):
            rows.append(parts)
        else:
            bad.append(ln)
    skips.add("malformed line", bad)
    declared = lines[0].split()[0]
    if declared.isdigit() and int(declared) != len(rows) + len(bad):
        skips.note(f"{txt}: the first line announces {declared} rows, the file has {len(rows) + len(bad)}")
    return txt, rows


def _image_base(root: Path, txt: Path, rel: list[str]) -> Path:
    """Images are listed as `img/...`; the archive unpacks them under the root or under `Img/`."""
    return pick_base([root, root / "Img", txt.parent.parent, txt.parent], rel)


def deepfashion_inshop(root: Path, skips: Skips, split: str = "all", highres: bool = False) -> pd.DataFrame:
    """DeepFashion In-shop (52,712 images, 7,982 items): `Eval/list_eval_partition.txt` with a count line, the
    header `image_name item_id evaluation_status`, and rows `img/WOMEN/Dresses/id_00000002/02_1_front.jpg
    id_00000002 train`; status is train, query or gallery (the benchmark's own query/index split).

    Args:
        split: train, query, gallery or all.
        highres: read `img_highres/` instead of `img/` (the high-resolution release).
    """
    txt, rows = _read_partition(root, ["image_name", "item_id", "evaluation_status"], skips)
    df = pd.DataFrame(rows, columns=["image", "item_id", "split"])
    if split != "all":
        if split not in ("train", "query", "gallery"):
            raise DatasetImportError(f"deepfashion_inshop: split must be train, query, gallery or all, got {split!r}")
        df = df[df["split"] == split]
    rel = [("img_highres/" + r[4:]) if highres and r.startswith("img/") else r for r in df["image"]]
    base = _image_base(root, txt, rel)
    return pd.DataFrame({"path": [str(base / r) for r in rel], "label": df["item_id"].to_numpy(),
                         "split": df["split"].to_numpy(),
                         "category": [r.split("/")[1] + "/" + r.split("/")[2] if r.count("/") >= 3 else ""
                                      for r in df["image"]]})


def deepfashion_c2s(root: Path, skips: Skips, split: str = "all") -> pd.DataFrame:
    """DeepFashion Consumer-to-shop (239,557 pairs, 33,881 items): `Eval/list_eval_partition.txt` with a count line,
    the header `image_pair_name_1 image_pair_name_2 item_id evaluation_status`, rows `img/CLOTHING/Blouse/
    id_00000001/comsumer_01.jpg img/.../shop_01.jpg id_00000001 train` (sic: 'comsumer' in the published file
    names), status train, val or test.

    Each image becomes one row (shop images recur in many pairs and are listed once) with `view` = consumer or shop,
    so consumer photos can be queries against a shop-photo index.
    """
    txt, rows = _read_partition(root, ["image_pair_name_1", "image_pair_name_2", "item_id", "evaluation_status"],
                                skips)
    if split not in ("train", "val", "test", "all"):
        raise DatasetImportError(f"deepfashion_c2s: split must be train, val, test or all, got {split!r}")
    recs = []
    for consumer, shop, item, status in rows:
        if split != "all" and status != split:
            continue
        recs.append((consumer, item, status, "consumer"))
        recs.append((shop, item, status, "shop"))
    df = pd.DataFrame(recs, columns=["image", "label", "split", "view"]).drop_duplicates("image")
    base = _image_base(root, txt, df["image"].head(20).tolist())
    df.insert(0, "path", [str(base / r) for r in df["image"]])
    return df.drop(columns=["image"])
