"""The libjpeg-turbo fast path of load_image (guie.imaging.jpeg): bit-identical to PIL's draft where both pick the
same scale (every EXIF orientation, grey, progressive), n/8 scales where PIL has none, PIL for everything else."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from conftest import photo
from guie.imaging import jpeg
from guie.imaging.io import ImageLoadError, load_image
from guie.models.preprocess import ImageTransform, PreprocessConfig

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
