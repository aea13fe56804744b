"""Tiny dataset trees that mimic the published layouts (file names, headers, quirks), built in a tmp folder.

Each `make_<kind>(root)` writes a handful of small images plus the dataset's own metadata files, and returns a dict
of what a correct importer must find (`rows`, `classes`, `skipped` by reason...).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image


def make_image(path: Path, seed: int = 0, size: tuple[int, int] = (40, 32), mode: str = "RGB") -> Path:
    """A small distinct image (random blocks from `seed`) saved in the format of the file suffix."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
    arr = np.kron(blocks, np.ones((size[1] // 4 + 1, size[0] // 4 + 1, 1), dtype=np.uint8))[:size[1], :size[0]]
    im = Image.fromarray(arr, "RGB")
    if mode != "RGB":
        im = im.convert(mode)
    fmt = {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG", ".webp": "WEBP"}[path.suffix.lower()]
    im.save(path, fmt)
    return path


def make_gldv2(root: Path) -> dict:
    """train_clean.csv (landmark_id,images) + train.csv (id,url,landmark_id) + train/a/b/c/<id>.jpg."""
    ids = {"1": ["0a1b2c3d4e5f6071", "0a1b99aa00112233"], "7": ["fedcba9876543210", "f0e1d2c3b4a59687",
                                                               "f00d00d00d00d00d"]}
    for k, group in enumerate(ids.values()):
        for j, i in enumerate(group):
            if i != "f00d00d00d00d00d":  # listed but not downloaded -> missing file
                make_image(root / "train" / i[0] / i[1] / i[2] / f"{i}.jpg", seed=10 * k + j)
    (root / "train_clean.csv").write_text(
        "landmark_id,images\n"
        + "".join(f"{lid},{' '.join(group)}\n" for lid, group in ids.items())
        + "12,\n"                                 # a landmark whose images were all removed by the cleaning
        + "13,NOT-AN-ID\n")
    (root / "train.csv").write_text(
        "id,url,landmark_id\n"
        "0a1b2c3d4e5f6071,http://upload.example/a.jpg,1\n"
        "0a1b99aa00112233,http://upload.example/b.jpg,1\n"
        "fedcba9876543210,http://upload.example/c.jpg,7\n"
        "f0e1d2c3b4a59687,http://upload.example/d.jpg,None\n")  # a bad landmark id
    (root / "train_label_to_category.csv").write_text(
        "landmark_id,category\n1,http://commons.example/wiki/Category:Big_Tower\n7,http://commons.example/wiki/"
        "Category:Old_Bridge\n")
    return {"clean_rows": 4, "clean_classes": 2, "clean_skipped": {"landmark with no images": 1, "bad image id": 1,
                                                                    "missing file": 1},
            "all_rows": 3, "all_skipped": {"bad label": 1}}


def make_products10k(root: Path) -> dict:
    """train.csv (name,class,group) + train/<name>; test_kaggletest.csv (name,class,usage) + test/."""
    (root / "train.csv").write_text("name,class,group\n0.jpg,0,0\n1.jpg,0,0\n2.jpg,5,1\n3.jpg,5,1\n4.jpg,9,1\n")
    for i in range(4):  # 4.jpg is listed but absent
        make_image(root / "train" / f"{i}.jpg", seed=i)
    (root / "test_kaggletest.csv").write_text("name,class,usage\n100.jpg,0,Public\n101.jpg,5,Private\n")
    for i in (100, 101):
        make_image(root / "test" / f"{i}.jpg", seed=i)
    return {"train_rows": 4, "test_rows": 2, "skipped": {"missing file": 1}}


def make_shopee(root: Path) -> dict:
    """train.csv (posting_id,image,image_phash,title,label_group) with quoted titles, images in train_images/."""
    (root / "train.csv").write_text(
        'posting_id,image,image_phash,title,label_group\n'
        'train_129225211,0000a68812bc7e98c42888dfb1c07da0.jpg,94974f937d4c2433,"Paper Bag Victoria Secret",249114794\n'
        'train_3386243561,00039780dfc94d01db8676fe789ecd05.jpg,af3f9460c2838f0f,"Double Tape 3M, ""VHB"" 12 mm",'
        '2937985045\n'
        'train_2288590299,000a190fdd715a2a36faed16e2c65df7.jpg,b94cb00ed3e50f78,"Maling TTS Canned Pork",2395904891\n'
        'train_2406599165,000a190fdd715a2a36faed16e2c65df7.jpg,b94cb00ed3e50f78,"Maling TTS (repost)",2395904891\n'
        'train_3369186413,00136d1cf4edede0203f32f05f660588.jpg,e4d0d36b1a3c7b8f,"Daster Batik",\n')
    for k, name in enumerate(["0000a68812bc7e98c42888dfb1c07da0", "00039780dfc94d01db8676fe789ecd05",
                              "000a190fdd715a2a36faed16e2c65df7", "00136d1cf4edede0203f32f05f660588"]):
        make_image(root / "train_images" / f"{name}.jpg", seed=k)
    return {"rows": 3, "skipped": {"bad label": 1, "duplicate path": 1}, "title": 'Double Tape 3M, "VHB" 12 mm'}


def make_met(root: Path) -> dict:
    """The Kaggle copy's nesting: MET/MET/<id>/<n>.jpg, ground_truth/{MET_database,valset,testset}.json, test_met/."""
    db = []
    for met_id, n in ((18344, 2), (770869, 3)):
        for i in range(n):
            make_image(root / "MET" / "MET" / str(met_id) / f"{i}.jpg", seed=met_id % 97 + i)
            db.append({"id": met_id, "path": f"MET/{met_id}/{i}.jpg"})
    gt = root / "ground_truth"
    gt.mkdir(parents=True)
    (gt / "MET_database.json").write_text(json.dumps(db))
    make_image(root / "MET" / "test_met" / "4d0c6a.jpg", seed=5)
    make_image(root / "MET" / "test_noart" / "aa11.jpg", seed=6)
    val = [{"path": "test_met/4d0c6a.jpg", "MET_id": 18344, "photographer": "x"},
           {"path": "test_noart/aa11.jpg", "url": "http://commons.example/x"}]   # distractor: no MET_id
    (gt / "valset.json").write_text(json.dumps(val))
    (gt / "testset.json").write_text("[]")
    return {"train_rows": 5, "train_classes": 2, "val_rows": 1, "val_skipped": {"distractor (no MET_id)": 1}}


def make_sop(root: Path) -> dict:
    """Stanford_Online_Products/Ebay_{train,test}.txt with the published header; upper-case .JPG file names."""
    base = root / "Stanford_Online_Products"
    train = [("1", "1", "1", "bicycle_final/111085122871_0.JPG"), ("2", "1", "1", "bicycle_final/111085122871_1.JPG"),
             ("3", "2", "7", "kettle_final/111265328556_0.JPG")]
    test = [("4", "11319", "1", "bicycle_final/111085122872_0.JPG")]
    for k, (_, _, _, p) in enumerate(train + test):
        make_image(base / p, seed=k)
    (base / "Ebay_train.txt").write_text("image_id class_id super_class_id path\n"
                                         + "".join(" ".join(r) + "\n" for r in train) + "5 3 7\n")  # truncated line
    (base / "Ebay_test.txt").write_text("image_id class_id super_class_id path\n"
                                        + "".join(" ".join(r) + "\n" for r in test))
    return {"train_rows": 3, "train_classes": 2, "test_rows": 1, "skipped": {"malformed line": 1}}


def make_deepfashion_inshop(root: Path) -> dict:
    """Eval/list_eval_partition.txt (count line, header, space-aligned rows) and images under Img/img/."""
    rows = [("img/WOMEN/Dresses/id_00000002/02_1_front.jpg", "id_00000002", "train"),
            ("img/WOMEN/Dresses/id_00000002/02_2_side.jpg", "id_00000002", "train"),
            ("img/MEN/Denim/id_00000080/01_1_front.jpg", "id_00000080", "query"),
            ("img/MEN/Denim/id_00000080/01_2_side.jpg", "id_00000080", "gallery")]
    for k, (p, _, _) in enumerate(rows):
        make_image(root / "Img" / p, seed=k)
    text = "4\nimage_name item_id evaluation_status\n" + "".join(f"{p:<60}{i:<16}{s}\n" for p, i, s in rows)
    (root / "Eval").mkdir(parents=True)
    (root / "Eval" / "list_eval_partition.txt").write_text(text)
    return {"rows": 4, "classes": 2, "splits": {"train": 2, "query": 1, "gallery": 1}}


def make_deepfashion_c2s(root: Path) -> dict:
    """Consumer-to-shop partition file (pairs; 'comsumer' typo as published), one shop image in two pairs."""
    pairs = [("img/CLOTHING/Blouse/id_00000001/comsumer_01.jpg", "img/CLOTHING/Blouse/id_00000001/shop_01.jpg",
              "id_00000001", "train"),
             ("img/CLOTHING/Blouse/id_00000001/comsumer_02.jpg", "img/CLOTHING/Blouse/id_00000001/shop_01.jpg",
              "id_00000001", "train"),
             ("img/DRESSES/Dress/id_00000005/comsumer_01.jpg", "img/DRESSES/Dress/id_00000005/shop_01.jpg",
              "id_00000005", "test")]
    seen = set()
    for k, (c, s, _, _) in enumerate(pairs):
        for p in (c, s):
            if p not in seen:
                make_image(root / p, seed=k + len(seen))
                seen.add(p)
    text = ("3\nimage_pair_name_1 image_pair_name_2 item_id evaluation_status\n"
            + "".join(f"{c} {s} {i} {st}\n" for c, s, i, st in pairs))
    (root / "Eval").mkdir(parents=True)
    (root / "Eval" / "list_eval_partition.txt").write_text(text)
    return {"rows": 5, "consumer": 3, "shop": 2, "classes": 2}


def _cars_struct(records: list[dict]) -> np.ndarray:
    fields = ["bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class", "fname"]
    arr = np.zeros((1, len(records)), dtype=[(f, "O") for f in fields])
    for i, r in enumerate(records):
        for f in fields:
            arr[0, i][f] = np.array([[r[f]]]) if f != "fname" else np.array([r[f]])
    return arr


def make_stanford_cars_devkit(root: Path) -> dict:
    """The devkit layout: devkit/cars_train_annos.mat, cars_test_annos_withlabels.mat, devkit/cars_meta.mat."""
    from scipy.io import savemat

    train = [{"bbox_x1": 39, "bbox_y1": 116, "bbox_x2": 569, "bbox_y2": 375, "class": 14, "fname": "00001.jpg"},
             {"bbox_x1": 36, "bbox_y1": 116, "bbox_x2": 868, "bbox_y2": 587, "class": 3, "fname": "00002.jpg"},
             {"bbox_x1": 85, "bbox_y1": 109, "bbox_x2": 601, "bbox_y2": 381, "class": 14, "fname": "00003.jpg"}]
    test = [{"bbox_x1": 30, "bbox_y1": 52, "bbox_x2": 246, "bbox_y2": 147, "class": 181, "fname": "00001.jpg"}]
    (root / "devkit").mkdir(parents=True)
    savemat(root / "devkit" / "cars_train_annos.mat", {"annotations": _cars_struct(train)})
    savemat(root / "cars_test_annos_withlabels.mat", {"annotations": _cars_struct(test)})
    names = np.empty((1, 196), dtype=object)
    for i in range(196):
        names[0, i] = f"Model {i + 1} 2012"
    names[0, 13] = "Audi TTS Coupe 2012"
    savemat(root / "devkit" / "cars_meta.mat", {"class_names": names})
    for k, r in enumerate(train):
        make_image(root / "cars_train" / r["fname"], seed=k)
    make_image(root / "cars_test" / "00001.jpg", seed=50)  # same file name as a train image, other folder
    return {"train_rows": 3, "train_classes": 2, "test_rows": 1, "class_14": "Audi TTS Coupe 2012"}


def make_stanford_cars_csv(root: Path) -> dict:
    """The common CSV copy: anno_train.csv (no header), names.csv, car_data/car_data/train/<class name>/."""
    (root / "anno_train.csv").write_text("00001.jpg,39,116,569,375,14\n00002.jpg,36,116,868,587,3\n")
    (root / "names.csv").write_text("\n".join(f"Model {i + 1}" for i in range(196)) + "\n")
    make_image(root / "car_data" / "car_data" / "train" / "Model 14" / "00001.jpg", seed=1)
    make_image(root / "car_data" / "car_data" / "train" / "Model 3" / "00002.jpg", seed=2)
    return {"train_rows": 2}


def make_food101(root: Path) -> dict:
    """food-101/meta/{train,test,classes}.txt (lines 'class/id'), images/<class>/<id>.jpg."""
    base = root / "food-101"
    train = ["apple_pie/1005649", "apple_pie/1014775", "baby_back_ribs/1005293"]
    test = ["apple_pie/1011328"]
    for k, e in enumerate(train + test):
        make_image(base / "images" / f"{e}.jpg", seed=k)
    (base / "meta").mkdir(parents=True)
    (base / "meta" / "train.txt").write_text("\n".join(train) + "\n")
    (base / "meta" / "test.txt").write_text("\n".join(test) + "\n")
    (base / "meta" / "classes.txt").write_text("apple_pie\nbaby_back_ribs\n")
    return {"train_rows": 3, "train_classes": 2, "test_rows": 1}


def make_hm(root: Path) -> dict:
    """articles.csv (zero-padded ids, one written without its leading zero) and images/<3 digits>/<id>.jpg."""
    (root / "articles.csv").write_text(
        "article_id,product_code,prod_name,product_type_no,product_type_name,product_group_name\n"
        "0108775015,0108775,Strap top,253,Vest top,Garment Upper body\n"
        "108775044,108775,Strap top,253,Vest top,Garment Upper body\n"      # leading zeros lost
        "0110065001,0110065,OP T-shirt(Idro),306,Bra,Underwear\n"
        "0110065011,0110065,OP T-shirt(Idro),306,Bra,Underwear\n")       # no image for this one
    for k, a in enumerate(["0108775015", "0108775044", "0110065001"]):
        make_image(root / "images" / a[:3] / f"{a}.jpg", seed=k)
    return {"rows": 3, "classes": 2, "skipped": {"missing file": 1}}


def make_gpr1200(root: Path) -> dict:
    """One folder of <class>_<image>.jpg files (GPR1200's published form)."""
    for k, name in enumerate(["0_a1.jpg", "0_a2.jpg", "250_b1.jpg", "1199_c1.jpg"]):
        make_image(root / "images" / name, seed=k)
    make_image(root / "images" / "thumbnail.jpg", seed=9)
    return {"rows": 4, "domains": {"0": "landmark", "250": "nature", "1199": "faces"},
            "skipped": {"bad label (file name is not <class>_<image>)": 1}}


def make_imagefolder(root: Path) -> dict:
    """train/<class>/... and val/<class>/... plus a loose image at the top of a split."""
    make_image(root / "train" / "cat" / "1.jpg", seed=1)
    make_image(root / "train" / "cat" / "sub" / "2.png", seed=2)
    make_image(root / "train" / "dog" / "3.jpg", seed=3)
    make_image(root / "val" / "dog" / "4.jpg", seed=4)
    make_image(root / "val" / "loose.jpg", seed=5)
    return {"rows": 4, "classes": 2, "skipped": {"no class folder": 1}}


def write_corrupt_images(folder: Path) -> dict[str, Path]:
    """A zoo of problem images for `guie data check`: name -> path."""
    folder.mkdir(parents=True, exist_ok=True)
    out = {"good": make_image(folder / "good.jpg", seed=1, size=(64, 48))}
    out["empty"] = folder / "empty.jpg"
    out["empty"].write_bytes(b"")
    out["format"] = folder / "notes.jpg"
    out["format"].write_text("this is not an image")
    full = (folder / "good.jpg").read_bytes()
    big = make_image(folder / "big.jpg", seed=2, size=(256, 256))
    out["truncated"] = folder / "truncated.jpg"
    out["truncated"].write_bytes(big.read_bytes()[: len(big.read_bytes()) // 2])
    big.unlink()
    out["tiny"] = make_image(folder / "tiny.png", seed=3, size=(8, 8))
    out["cmyk"] = folder / "cmyk.jpg"
    Image.open(folder / "good.jpg").convert("CMYK").save(out["cmyk"])
    out["palette"] = make_image(folder / "palette.png", seed=4, size=(64, 48), mode="P")
    out["alpha"] = make_image(folder / "alpha.png", seed=5, size=(64, 48), mode="RGBA")
    out["16bit"] = folder / "deep.png"
    Image.fromarray(np.arange(64 * 48, dtype=np.uint16).reshape(48, 64) * 20).save(out["16bit"])
    out["exif"] = folder / "rotated.jpg"
    im = Image.open(folder / "good.jpg")
    exif = im.getexif()
    exif[0x0112] = 6
    im.save(out["exif"], exif=exif.tobytes())
    out["missing"] = folder / "missing.jpg"
    assert full
    return out
