"""The libjpeg-turbo fast path of load_image (guie.imaging.jpeg): bit-identical to PIL's draft where both pick the
same scale (every EXIF orientation, grey, progressive), n/8 scales where PIL has none, PIL for everything else; and
the evaluation transform's one-step path (`ImageTransform.load`: load_pixels + geometry.resize_array)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import photo
from guie.imaging import jpeg
from guie.imaging.geometry import MAX_RESIZED_PIXELS, resize_array, resize_pil
from guie.imaging.io import ImageLoadError, load_image, load_pixels
from guie.models.preprocess import ImageTransform, PreprocessConfig, draft_size, pil_to_uint8

pytestmark = pytest.mark.skipif(not jpeg.fast_jpeg_available(), reason="simplejpeg is not installed")


def save_jpeg(path, w, h, orientation=1, mode="RGB", progressive=False, seed=0):
    arr = photo(w, h, seed=seed)
    arr[: h // 3, : w // 5] = (250, 10, 10)  # an asymmetric block: a wrong rotation or flip cannot go unnoticed
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(arr).convert(mode).save(path, quality=92, exif=exif.tobytes(), progressive=progressive)
    return path


@pytest.fixture
def pil_only(monkeypatch):
    """load_image with the fast path switched off (GUIE_FAST_JPEG=0): PIL's decoder and draft()."""
    def load(path, **kw):
        with monkeypatch.context() as m:
            m.setenv("GUIE_FAST_JPEG", "0")
            return load_image(path, **kw)
    return load


@pytest.mark.parametrize("mode,progressive", [("RGB", False), ("L", False), ("RGB", True)])
def test_same_scale_as_pil_draft_is_bit_identical_in_every_orientation(tmp_path, pil_only, mode, progressive):
    for orientation in range(1, 9):
        path = save_jpeg(tmp_path / f"{orientation}.jpg", 512, 384, orientation, mode, progressive)
        fast, ref = load_image(path, draft_size=192), pil_only(path, draft_size=192)  # both decode at 1/2
        assert fast.mode == "RGB" and fast.size == ref.size == ((256, 192) if orientation < 5 else (192, 256))
        assert np.array_equal(np.asarray(fast), np.asarray(ref)), orientation
        assert np.array_equal(load_pixels(path, draft_size=192), np.asarray(ref)), orientation  # its array form


def test_n_eighths_scale_where_pil_must_decode_everything(tmp_path, pil_only):
    # 640x480 for a 224-px crop-0.875 model (short side >= 256): PIL cannot halve it (240 < 256); libjpeg's 5/8 can.
    path = save_jpeg(tmp_path / "photo.jpg", 640, 480, seed=4)
    fast, ref = load_image(path, draft_size=256), pil_only(path, draft_size=256)
    assert fast.size == (400, 300) and ref.size == (640, 480)
    transform = ImageTransform(PreprocessConfig(image_size=224))
    diff = np.abs(transform(fast).numpy().astype(int) - transform(ref).numpy().astype(int))
    assert diff.mean() < 1.0 and np.percentile(diff, 99) <= 8  # same picture at model size; details in the docs
    rotated = load_image(save_jpeg(tmp_path / "rotated.jpg", 640, 480, orientation=6, seed=4), draft_size=256)
    assert rotated.size == (300, 400)
    assert np.array_equal(np.asarray(rotated), np.asarray(fast.transpose(Image.Transpose.ROTATE_270)))


def test_everything_else_goes_to_pil(tmp_path, pil_only, mode_images, bad_files):
    cmyk = tmp_path / "cmyk.jpg"
    Image.fromarray(photo(640, 480)).convert("CMYK").save(cmyk, quality=90)
    for path in (cmyk, mode_images["rgb"]):
        assert np.array_equal(np.asarray(load_image(path, draft_size=256)), np.asarray(pil_only(path, draft_size=256)))
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(save_jpeg(tmp_path / "whole.jpg", 640, 480).read_bytes()[:3000])
    for load in (load_image, pil_only):  # simplejpeg refuses it; PIL reports it as before
        with pytest.raises(ImageLoadError) as info:
            load(truncated, draft_size=256)
        assert info.value.kind == "truncated" and str(truncated) in str(info.value)
    assert jpeg.decode_jpeg_scaled(b"\x89PNG\r\n", 256) is None


def test_the_pixel_budget_is_respected(tmp_path):
    path = save_jpeg(tmp_path / "photo.jpg", 640, 480)
    data = path.read_bytes()
    assert jpeg.decode_jpeg_scaled(data, 256, max_pixels=400 * 300).shape == (300, 400, 3)
    assert jpeg.decode_jpeg_scaled(data, 256, max_pixels=400 * 300 - 1) is None  # the caller's bounded decode decides


def test_the_transform_decodes_a_photo_at_half_scale_and_stays_near_a_full_decode(tmp_path, mode_images):
    # 640x480 for a 224-px crop-0.875 model (256 px): 4/8 (240 px, >= 15/16 of 256) instead of 5/8
    path = save_jpeg(tmp_path / "photo.jpg", 640, 480, seed=4)
    assert load_pixels(path, draft_size=256).shape == (240, 320, 3)
    assert load_image(path, draft_size=256).size == (400, 300)  # load_image keeps its promise: short side >= 256
    cfg = PreprocessConfig(image_size=224)
    transform = ImageTransform(cfg)
    got = transform.load(path)
    assert got.shape == (3, 224, 224) and got.dtype == torch.uint8 and got.permute(1, 2, 0).is_contiguous()
    full = transform(load_image(path))  # every pixel decoded, Pillow's resize: what the fast path approximates
    diff = np.abs(got.numpy().astype(int) - full.numpy().astype(int))
    assert diff.mean() < 1.5 and np.percentile(diff, 99) <= 8
    rotated = transform.load(save_jpeg(tmp_path / "rotated.jpg", 640, 480, orientation=6, seed=4))
    expected = transform(load_image(path, draft_size=256).transpose(Image.Transpose.ROTATE_270))
    assert np.abs(rotated.numpy().astype(int) - expected.numpy().astype(int)).mean() < 1.5
    for kind in ("gray", "rgba", "cmyk", "webp"):  # other formats and CMYK take the PIL path: the old pixels
        path = mode_images[kind]
        assert torch.equal(transform.load(path), transform(load_image(path, draft_size=draft_size(cfg)))), kind
    assert isinstance(load_pixels(mode_images["rgba"]), Image.Image)


@pytest.mark.parametrize("mode", ["crop", "pad", "squash"])
@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear"])
def test_resize_array_is_pillows_resize_within_two_levels(mode, interpolation):
    from guie.imaging.geometry import short_side_ratio

    for w, h in ((320, 240), (90, 200), (640, 130), (224, 224)):  # down, up, wide, already the size
        arr = photo(w, h, seed=w)
        got = resize_array(arr, 96, mode, *short_side_ratio(96, 0.875), interpolation)
        ref = pil_to_uint8(resize_pil(Image.fromarray(arr), 96, mode, *short_side_ratio(96, 0.875), interpolation))
        diff = np.abs(got.numpy().astype(int) - ref.numpy().astype(int))
        assert got.shape == (3, 96, 96) and diff.max() <= 2 and (diff > 0).mean() < 0.02, (w, h, diff.max())


def test_resize_array_leaves_other_filters_and_huge_plans_to_pillow():
    arr = photo(64, 48)
    assert resize_array(arr, 32, "crop", 32, 1, "lanczos") is None
    assert resize_array(arr, 32, "crop", 32, 1, "nearest") is None
    thin = np.zeros((1, 3 * MAX_RESIZED_PIXELS // 256, 3), np.uint8)  # crop mode: a 256 x 49152 plan > the budget
    assert resize_array(thin, 224, "crop", 256, 1, "bicubic") is None
