"""One resize geometry (`guie.imaging.geometry`): the PIL, device-decode and export paths give the same model input on
ordinary and hostile sizes, and hostile images (extreme aspect ratios, huge declared sizes) cost bounded memory."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import photo, png_one_bit
from guie.export.module import MemberPipeline, TTAConfig
from guie.imaging import geometry
from guie.imaging.geometry import INTERPOLATIONS, RESIZE_MODES, resize_plan
from guie.imaging.io import ImageLoadError, load_image
from guie.models.preprocess import ImageTransform, PreprocessConfig
from guie.pipeline.gpu_decode import resize_batch

# (width, height): 1xN and Nx1 (short and long), tiny, square, 4:3, 16:9; HUGE for a few combinations (it is slow)
ODD_SIZES = [(1, 700), (700, 1), (8000, 1), (1, 8000), (3, 2), (50, 50), (640, 480), (1280, 720)]
HUGE = (2600, 1950)
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning")


@pytest.fixture(autouse=True)
def one_thread():
    """Small resizes: one intra-op thread is fastest (a thread team only waits on a loaded 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def noise(w: int, h: int, seed: int) -> np.ndarray:
    """Random pixels [h, w, 3]: every rounding difference between two resamplers shows on them."""
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


@pytest.mark.parametrize("mode", RESIZE_MODES)
@pytest.mark.parametrize("interpolation", INTERPOLATIONS)
def test_pil_device_and_export_paths_give_identical_pixels(mode, interpolation):
    cfg = PreprocessConfig(image_size=32, crop_pct=0.875, resize_mode=mode, interpolation=interpolation)
    member = MemberPipeline(torch.nn.Identity(), cfg, TTAConfig())
    huge = [HUGE] if interpolation in ("bicubic", "lanczos") and mode != "squash" else []
    for i, (w, h) in enumerate(ODD_SIZES + huge):
        arr = noise(w, h, seed=i)
        pil = ImageTransform(cfg)(Image.fromarray(arr))
        x = torch.from_numpy(arr).permute(2, 0, 1)[None]
        device = resize_batch(x, cfg)[0]
        export = member.resize(x.float(), mode)[0]
        assert pil.shape == (3, 32, 32) and pil.dtype == device.dtype == export.dtype == torch.uint8
        assert torch.equal(pil, device), (w, h)
        assert torch.equal(pil, export), (w, h)


@pytest.mark.parametrize("mode, interpolation", [("crop", "bicubic"), ("pad", "lanczos")])
def test_scripted_export_resize_gives_the_same_pixels(mode, interpolation):
    cfg = PreprocessConfig(image_size=32, resize_mode=mode, interpolation=interpolation)
    scripted = torch.jit.script(MemberPipeline(torch.nn.Identity(), cfg, TTAConfig()))
    for i, (w, h) in enumerate(ODD_SIZES):
        arr = noise(w, h, seed=10 + i)
        ref = ImageTransform(cfg)(Image.fromarray(arr))
        assert torch.equal(scripted.resize(torch.from_numpy(arr).permute(2, 0, 1)[None].float(), mode)[0], ref)


def test_bounded_route_equals_the_literal_plan(monkeypatch):
    """An extreme aspect ratio goes through the tensor resampler; Pillow computing the same window (of the 300x1
    image resized to 76,800 x 256) gives the very same pixels."""
    cfg = PreprocessConfig(image_size=224, interpolation="bicubic")
    for w, h in ((300, 1), (1, 300), (900, 5)):
        image = Image.fromarray(photo(w, h, seed=w))
        nx, _, _, _, ny, _, _, _ = resize_plan(w, h, 224, "crop", *cfg.short_side)
        assert nx * ny > geometry.MAX_RESIZED_PIXELS  # the bounded route
        bounded = np.asarray(ImageTransform(cfg)(image))
        monkeypatch.setattr(geometry, "MAX_RESIZED_PIXELS", 1 << 40)
        literal = np.asarray(ImageTransform(cfg)(image))
        monkeypatch.undo()
        assert np.array_equal(bounded, literal), (w, h)


def test_pil_resizes_only_the_crop_window_with_the_tensor_paths_arithmetic(monkeypatch):
    """A 640x480 photo in crop mode: Pillow is asked for the 224x224 window only (not 341x256 then a crop), and the
    tensor resampler reproduces its box arithmetic at full model size (the old full-axis centres differ here in
    ~90 of 150,528 values)."""
    calls = []
    resize = Image.Image.resize

    def spy(self, size, *args, **kwargs):
        calls.append((tuple(size), kwargs.get("box")))
        return resize(self, size, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "resize", spy)
    cfg = PreprocessConfig()
    arr = noise(640, 480, seed=7)
    pil = ImageTransform(cfg)(Image.fromarray(arr))
    assert calls == [((224, 224), geometry.pil_box(640, 480, 341, 58, 224, 256, 16, 224))]
    tensor = geometry.resize_tensor(torch.from_numpy(arr).permute(2, 0, 1)[None], 224, "crop", *cfg.short_side,
                                    "bicubic")[0]
    assert torch.equal(pil, tensor)


def test_plan_keeps_todays_geometry_for_ordinary_images():
    # crop: short side to 224 / 0.875 = 256, centre 224 window; pad: long side to 224, centred on white
    assert resize_plan(640, 480, 224, "crop", 256, 1) == [341, 58, 224, 0, 256, 16, 224, 0]
    assert resize_plan(640, 480, 224, "pad", 256, 1) == [224, 0, 224, 0, 168, 0, 168, 28]
    assert resize_plan(8000, 1, 224, "crop", 256, 1) == [2_048_000, 1_023_888, 224, 0, 256, 16, 224, 0]
    assert resize_plan(8000, 1, 224, "pad", 256, 1) == [224, 0, 224, 0, 1, 0, 1, 111]


def test_huge_and_bomb_files_are_refused_from_the_header(tmp_path):
    big = png_one_bit(tmp_path / "bitmap-13000.png", 13000, 13000)
    assert big.stat().st_size < 100_000  # tens of KB that decode to 169 Mpx
    with pytest.raises(ImageLoadError) as info:
        load_image(big)
    assert info.value.kind == "too_large" and str(info.value).startswith(str(big)) and "\n" not in str(info.value)
    assert "13000x13000" in str(info.value)


def test_large_jpegs_decode_at_a_scale_that_fits(tmp_path):
    path = tmp_path / "photo.jpg"
    Image.fromarray(photo(1200, 900, seed=4)).save(path, quality=85)
    assert load_image(path, max_decoded=400_000).size == (600, 450)  # 1/2 scale: the finest within 400k pixels
    assert load_image(path, max_decoded=100_000).size == (300, 225)
    assert load_image(path).size == (1200, 900)
    with pytest.raises(ImageLoadError, match="too large to decode"):
        load_image(path, max_decoded=10_000)  # even 1/8 (150x113) is more


def test_decode_limit_comes_from_the_environment(tmp_path, monkeypatch):
    path = tmp_path / "p.png"
    Image.fromarray(photo(200, 100, seed=1)).save(path)
    monkeypatch.setenv("GUIE_MAX_DECODED_PIXELS", "10000")
    with pytest.raises(ImageLoadError) as info:
        load_image(path)
    assert info.value.kind == "too_large"
    monkeypatch.setenv("GUIE_MAX_DECODED_PIXELS", "lots")
    with pytest.raises(ValueError, match="GUIE_MAX_DECODED_PIXELS='lots'"):
        load_image(path)


def test_hostile_images_cost_bounded_memory(tmp_path):
    """Decode + resize (what `guie embed` does per image) of 8000x1, 1x8000 and a 13000x13000 1-bit PNG, after
    ordinary 640x480 JPEGs: the process's peak RSS grows by less than 32 MB (it grew by 2.1 GB before)."""
    ordinary = []
    for i in range(3):
        ordinary.append(tmp_path / f"photo{i}.jpg")
        Image.fromarray(photo(640, 480, seed=i)).save(ordinary[-1], quality=90)
    Image.fromarray(photo(8000, 1, seed=1)).save(tmp_path / "wide.png")
    Image.fromarray(photo(1, 8000, seed=2)).save(tmp_path / "tall.png")
    png_one_bit(tmp_path / "bitmap.png", 13000, 13000)
    hostile = [tmp_path / "wide.png", tmp_path / "tall.png", tmp_path / "bitmap.png"]
    code = textwrap.dedent("""
        import resource, sys
        from guie.imaging.io import ImageLoadError, load_image
        from guie.models.preprocess import ImageTransform, PreprocessConfig, draft_size
        cfg = PreprocessConfig(image_size=224)
        transform = ImageTransform(cfg)
        def run(paths):
            out = []
            for p in paths:
                try:
                    out.append(list(transform(load_image(p, draft_size=draft_size(cfg))).shape))
                except ImageLoadError as e:
                    out.append(e.kind)
            return out, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
        print(*run(sys.argv[1:4]))
        print(*run(sys.argv[4:7]))
    """)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    out = subprocess.run([sys.executable, "-c", code, *map(str, ordinary + hostile)], capture_output=True, text=True,
                         check=True, env=env, timeout=300).stdout.splitlines()
    ordinary_shapes, ordinary_mb = eval(out[0].rsplit(" ", 1)[0]), int(out[0].rsplit(" ", 1)[1])
    hostile_shapes, hostile_mb = eval(out[1].rsplit(" ", 1)[0]), int(out[1].rsplit(" ", 1)[1])
    assert ordinary_shapes == [[3, 224, 224]] * 3
    assert hostile_shapes == [[3, 224, 224], [3, 224, 224], "too_large"]
    print(f"peak RSS: {ordinary_mb} MB after ordinary JPEGs, {hostile_mb} MB after the hostile files")
    assert hostile_mb - ordinary_mb < 32
