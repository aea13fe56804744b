"""Robust decoding (`load_image`), manifests (`read_manifest`) and the dataset that never crashes on a bad file."""
from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from conftest import photo, png_header_only
from guie.data.manifest import ManifestError, read_manifest
from guie.imaging.io import ImageLoadError, load_image, to_rgb
from guie.models.preprocess import ImageTransform, PreprocessConfig
from guie.pipeline.datasets import ImageFileDataset, collate_skip_failed


@pytest.mark.parametrize("kind", ["rgb", "gray", "cmyk", "rgba", "la", "palette", "palette_transparent", "bw",
                                  "gray16", "webp", "tall", "wide", "tiny", "exif_rotated"])
def test_every_mode_becomes_8bit_rgb(mode_images, kind):
    im = load_image(mode_images[kind])
    assert im.mode == "RGB"
    arr = np.asarray(im)
    assert arr.dtype == np.uint8 and arr.shape[2] == 3
    assert arr.std() > 0 or kind == "tiny"  # not a blank canvas


def test_modes_keep_their_content(mode_images):
    """Grey, 16-bit grey, CMYK, alpha and palette versions of one picture decode to (nearly) the same pixels."""
    ref = np.asarray(load_image(mode_images["rgb"]), np.float32)
    grey = np.asarray(load_image(mode_images["gray"]), np.float32)
    for kind in ("cmyk", "rgba", "webp"):
        assert np.abs(np.asarray(load_image(mode_images[kind]), np.float32) - ref).mean() < 6, kind
    with Image.open(mode_images["palette"]) as pal:  # 16 colours: compare with the palette's own colours
        assert (np.asarray(load_image(mode_images["palette"])) == np.asarray(pal.convert("RGB"))).all()
    for kind in ("la", "gray16"):
        assert np.abs(np.asarray(load_image(mode_images[kind]), np.float32) - grey).mean() < 1.0, kind
    assert (grey[..., 0] == grey[..., 1]).all() and (grey[..., 1] == grey[..., 2]).all()


def test_sixteen_bit_is_scaled_not_clipped(tmp_path):
    ramp = np.linspace(0, 65535, 64 * 8).reshape(8, 64).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "ramp16.png")
    got = np.asarray(load_image(tmp_path / "ramp16.png"))[..., 0].astype(int)
    np.testing.assert_allclose(got, ramp / 257.0, atol=1.01)


def test_transparency_is_composited_on_white(tmp_path):
    rgba = np.zeros((10, 10, 4), np.uint8)
    rgba[:, :5] = (200, 10, 10, 255)  # left: opaque red; right: fully transparent black
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    got = np.asarray(load_image(tmp_path / "a.png"))
    assert (got[:, :5] == (200, 10, 10)).all()
    assert (got[:, 5:] == 255).all()
    la = Image.fromarray(np.stack([np.zeros((4, 4), np.uint8), np.zeros((4, 4), np.uint8)], -1), "LA")
    assert (np.asarray(to_rgb(la)) == 255).all()


def test_exif_orientation_is_applied(mode_images):
    """Stored 60x40 with red left / blue right and Orientation=6 (turn 90 deg clockwise): shown 40x60, red on top."""
    im = load_image(mode_images["exif_rotated"])
    assert im.size == (40, 60)
    arr = np.asarray(im).astype(int)
    top, bottom = arr[:25].mean((0, 1)), arr[35:].mean((0, 1))
    assert top[0] > 200 and top[2] < 60, top
    assert bottom[2] > 200 and bottom[0] < 60, bottom


@pytest.mark.parametrize("kind, expected", [("empty", "empty"), ("truncated", "truncated"), ("corrupt", "format"),
                                            ("not_image", "format"), ("bomb", "bomb")])
def test_bad_files_raise_one_line_error_naming_the_file(bad_files, kind, expected):
    path = bad_files[kind]
    with pytest.raises(ImageLoadError) as info:
        load_image(path)
    msg = str(info.value)
    assert msg.startswith(str(path)) and "\n" not in msg
    assert info.value.kind == expected


def test_missing_file_and_folder(tmp_path):
    with pytest.raises(ImageLoadError, match="file not found"):
        load_image(tmp_path / "nope.jpg")
    (tmp_path / "dir.jpg").mkdir()
    with pytest.raises(ImageLoadError, match="folder"):
        load_image(tmp_path / "dir.jpg")


def test_max_pixels_refuses_large_images(tmp_path):
    Image.fromarray(photo(100, 100)).save(tmp_path / "big.png")
    with pytest.raises(ImageLoadError, match="too large .*decompression bomb") as info:
        load_image(tmp_path / "big.png", max_pixels=5000)
    assert info.value.kind == "bomb"
    # Above PIL's warning threshold (89 Mpx): refused by our limit before any pixel is decoded, and no warning.
    png_header_only(tmp_path / "big2.png", 10_000, 10_000)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ImageLoadError, match="too large .*100,000,000 pixels") as info:
            load_image(tmp_path / "big2.png", max_pixels=50_000_000)
    assert info.value.kind == "bomb"


def test_jpeg_draft_keeps_enough_resolution(tmp_path):
    Image.fromarray(photo(1600, 1200, seed=3)).save(tmp_path / "big.jpg", quality=90)
    full = load_image(tmp_path / "big.jpg")
    draft = load_image(tmp_path / "big.jpg", draft_size=256)
    assert full.size == (1600, 1200)
    assert min(draft.size) >= 256 and draft.size[0] < 1600  # decoded at a reduced DCT scale, short side kept
    cfg = PreprocessConfig(image_size=224)
    a = np.asarray(ImageTransform(cfg)(full), np.float32)
    b = np.asarray(ImageTransform(cfg)(draft), np.float32)
    assert np.abs(a - b).mean() < 3.0  # after the resize to 224 the two are nearly identical


def test_dataset_reports_failures_instead_of_raising(mode_images, bad_files):
    paths = [str(mode_images["rgb"]), str(bad_files["truncated"]), str(mode_images["cmyk"]), str(bad_files["empty"])]
    transform = ImageTransform(PreprocessConfig(image_size=16))
    for threads in (1, 2):
        ds = ImageFileDataset(paths, transform, threads=threads)
        batch = ds.__getitems__([0, 1, 2, 3])
        idx, images, failed = collate_skip_failed(batch)
        assert idx.tolist() == [0, 2]
        assert images.shape == (2, 3, 16, 16) and str(images.dtype) == "torch.uint8"
        assert [i for i, _ in failed] == [1, 3]
        assert all(msg.startswith(paths[i]) for i, msg in failed)


def test_dataset_survives_a_transform_error(mode_images):
    def broken(_):
        raise RuntimeError("boom")

    i, x, err = ImageFileDataset([str(mode_images["rgb"])], broken)[0]
    assert x is None and err.startswith(str(mode_images["rgb"])) and "boom" in err


# --- manifests -------------------------------------------------------------------------------------------------

def test_folder_manifest_labels_from_subfolders(labelled_folder):
    df = read_manifest(labelled_folder)
    assert len(df) == 12 and set(df["label"]) == {f"class{c}" for c in range(4)}
    assert all(p.startswith("/") for p in df["path"])


def test_empty_folder_is_a_one_line_error(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("no images here")
    with pytest.raises(ManifestError) as info:
        read_manifest(tmp_path / "empty")
    assert str(tmp_path / "empty") in str(info.value) and "no images" in str(info.value)
    assert "\n" not in str(info.value)


def test_manifest_without_path_column_names_the_file(tmp_path):
    pd.DataFrame({"file": ["a.jpg"], "label": ["x"]}).to_csv(tmp_path / "m.csv", index=False)
    with pytest.raises(ManifestError, match=r"m\.csv: manifest has no 'path' column"):
        read_manifest(tmp_path / "m.csv")


def test_manifest_relative_paths_and_extra_columns(tmp_path, mode_images):
    img = tmp_path / "sub" / "x.jpg"
    img.parent.mkdir()
    img.write_bytes(mode_images["rgb"].read_bytes())
    pd.DataFrame({"path": ["sub/x.jpg"], "label": [7], "domain": ["art"], "note": ["kept"]}).to_parquet(
        tmp_path / "m.parquet")
    df = read_manifest(tmp_path / "m.parquet")
    assert df.loc[0, "path"] == str(img) and df.loc[0, "label"] == "7" and df.loc[0, "note"] == "kept"


@pytest.mark.parametrize("content, suffix, match", [(b"path\n", ".csv", "no rows"),
                                                    (b"\x00\x01garbage", ".parquet", "cannot read manifest"),
                                                    (b"path\na.jpg\n", ".json", "unsupported manifest type")])
def test_bad_manifests(tmp_path, content, suffix, match):
    f = tmp_path / f"m{suffix}"
    f.write_bytes(content)
    with pytest.raises(ManifestError, match=match) as info:
        read_manifest(f)
    assert str(f) in str(info.value)


def test_missing_source_and_required_labels(tmp_path, mode_images):
    with pytest.raises(ManifestError, match="no such file"):
        read_manifest(tmp_path / "nothing.csv")
    pd.DataFrame({"path": [str(mode_images["rgb"])]}).to_csv(tmp_path / "m.csv", index=False)
    with pytest.raises(ManifestError, match="'label' column is required"):
        read_manifest(tmp_path / "m.csv", require_labels=True)


def test_atomic_writes_leave_no_temp_file_and_respect_the_umask(tmp_path):
    import os

    from guie.utils import atomic_write_text

    old = os.umask(0o027)
    try:
        path = atomic_write_text("hello", tmp_path / "a.txt")
    finally:
        os.umask(old)
    assert path.read_text() == "hello" and [p.name for p in tmp_path.iterdir()] == ["a.txt"]
    assert path.stat().st_mode & 0o777 == 0o640  # not mkstemp's 0600
