"""Training augmentations: uint8 [3,S,S] output, identity when switched off, each op doing what it says, seeded
reproducibility (also after pickling, as in DataLoader workers), white fill, strict config parsing."""
from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from guie.models import ImageTransform, PreprocessConfig
from guie.pipeline.augment import AugmentConfig, Cutout, build_train_transform

S = 32
PRE = PreprocessConfig(image_size=S)


def photo(w: int = 48, h: int = 40, seed: int = 0) -> Image.Image:
    """A smooth, left-right asymmetric RGB image (gradients + a block), so flips and JPEG are measurable."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    arr = np.stack([xx * 255 // w, yy * 255 // h, (xx + yy) * 255 // (w + h)], -1).astype(np.uint8)
    arr[h // 4: h // 2, w // 8: w // 3] = rng.integers(0, 256, 3, dtype=np.uint8)
    return Image.fromarray(arr, "RGB")


def flat(value: int, size: int = S) -> Image.Image:
    return Image.new("RGB", (size, size), (value, value, value))


def only(**kw) -> AugmentConfig:
    """Everything off except the given fields."""
    return AugmentConfig.from_dict({**AugmentConfig.off().to_dict(), **kw})


def test_default_output_is_uint8_at_model_size():
    t = build_train_transform(PRE)
    for img in (photo(), photo(200, 50), photo(17, 90)):
        for seed in range(3):
            torch.manual_seed(seed)
            out = t(img)
            assert out.dtype == torch.uint8 and out.shape == (3, S, S)


def test_non_rgb_input_is_converted():
    t = build_train_transform(PRE)
    for mode in ("L", "RGBA", "P", "CMYK"):
        out = t(photo().convert(mode))
        assert out.dtype == torch.uint8 and out.shape == (3, S, S)


@pytest.mark.parametrize("mode", ["crop", "squash", "pad"])
def test_all_off_equals_the_evaluation_transform(mode):
    pre = PRE.replace(resize_mode=mode)
    t = build_train_transform(pre, AugmentConfig.off())
    for img in (photo(), photo(90, 30, seed=1)):
        assert torch.equal(t(img), ImageTransform(pre)(img))


def test_hflip_really_flips():
    img = photo()
    out = build_train_transform(PRE, only(hflip=1.0))(img)
    ref = ImageTransform(PRE)(img)
    assert not torch.equal(ref, ref.flip(-1))  # the image is asymmetric, so the check can fail
    assert torch.equal(out, ref.flip(-1))


def test_seeded_reproducibility_also_after_pickling():
    t = build_train_transform(PRE, AugmentConfig(color_jitter_p=0.8, grayscale_p=0.2, crop_scale=(0.3, 1.0)))
    t2 = pickle.loads(pickle.dumps(t))  # what a spawned DataLoader worker receives
    img = photo()
    outs = []
    for seed in range(6):
        torch.manual_seed(seed)
        a = t(img)
        torch.manual_seed(seed)
        b = t2(img)
        assert torch.equal(a, b)
        outs.append(a)
    assert len({o.numpy().tobytes() for o in outs}) > 1  # and it does vary with the seed


def test_affine_borders_use_the_fill_colour():
    """A pure rotation leaves the corners uncovered: white (the default) on a black image, black with fill=0."""
    white_corner = black_corner = 0
    for seed in range(8):
        torch.manual_seed(seed)
        out = build_train_transform(PRE, only(affine_p=1.0, rotate=30.0, shift=0.0, scale=0.0))(flat(0))
        assert out.max() > 0
        white_corner += bool((out[:, 0, 0] == 255).all())
        torch.manual_seed(seed)
        out = build_train_transform(PRE, only(affine_p=1.0, rotate=30.0, shift=0.0, scale=0.0, fill=0))(flat(255))
        black_corner += bool((out[:, 0, 0] == 0).all())
    assert white_corner >= 6 and black_corner >= 6  # all but near-zero angles


def test_cutout_hole_is_fill_coloured_and_at_most_40_percent_of_the_side():
    t = build_train_transform(PRE, only(cutout_p=1.0))
    side = int(0.4 * S)
    sizes = set()
    for seed in range(20):
        torch.manual_seed(seed)
        out = t(flat(100))
        changed = (out != 100).any(0)
        assert changed.any()
        assert (out[:, changed] == 255).all()
        rows, cols = changed.any(1).nonzero().flatten(), changed.any(0).nonzero().flatten()
        h, w = int(rows.max() - rows.min() + 1), int(cols.max() - cols.min() + 1)
        assert h <= side and w <= side and int(changed.sum()) == h * w  # one axis-aligned rectangle
        sizes.add((h, w))
    assert (side, side) in sizes and len(sizes) > 1  # full holes inside, clipped ones at the border


def test_cutout_rgb_fill_on_a_batch():
    torch.manual_seed(0)
    out = Cutout(0.5, (1, 2, 3))(torch.zeros(2, 3, 10, 10, dtype=torch.uint8))
    hole = (out != 0).any(1)
    assert hole.any() and torch.equal(hole[0], hole[1])
    assert torch.equal(out[0, :, hole[0]].unique(dim=1).flatten(), torch.tensor([1, 2, 3], dtype=torch.uint8))


def test_jpeg_quality_range_is_used():
    img, ref = photo(), ImageTransform(PRE)(photo())

    def err(q):
        torch.manual_seed(0)
        out = build_train_transform(PRE, only(jpeg_p=1.0, jpeg_quality=q))(img)
        return (out.float() - ref.float()).abs().mean().item()

    hi, lo = err([99, 100]), err([5, 5])
    assert hi < 3.0 and lo > 2 * hi and lo > 1.0


def test_grayscale_and_colour_jitter():
    img = photo()
    g = build_train_transform(PRE, only(grayscale_p=1.0))(img)
    assert torch.equal(g[0], g[1]) and torch.equal(g[1], g[2])
    torch.manual_seed(0)
    c = build_train_transform(PRE, only(color_jitter_p=1.0, color_jitter=[0.5, 0.5, 0.5, 0.2]))(img)
    assert c.dtype == torch.uint8 and not torch.equal(c, ImageTransform(PRE)(img))


def test_random_resized_crop_replaces_the_eval_resize():
    img = photo(120, 80)
    t = build_train_transform(PRE, only(crop_scale=[0.1, 0.3]))
    torch.manual_seed(0)
    out = t(img)
    assert out.shape == (3, S, S) and not torch.equal(out, ImageTransform(PRE)(img))


def test_from_dict_reads_recipes_and_rejects_unknown_keys():
    recipe = {"hflip": 0.5, "jpeg_quality": [99, 100], "jpeg_p": 1, "affine_p": 0.7, "shift": 0.2, "scale": 0.2,
              "rotate": 10, "cutout_p": 0.5, "cutout_size": 0.4, "fill": [255, 255, 255]}
    cfg = AugmentConfig.from_dict(recipe)
    assert cfg.jpeg_quality == (99, 100) and cfg.fill == (255, 255, 255) and cfg.jpeg_p == 1.0
    assert AugmentConfig.from_dict(cfg.to_dict()) == cfg
    assert AugmentConfig.from_dict({}) == AugmentConfig() == AugmentConfig.from_dict(None)
    with pytest.raises(ValueError, match=r"unknown option\(s\) 'hfilp' \(did you mean 'hflip'\?\)"):
        AugmentConfig.from_dict({"hfilp": 0.5})
    for bad, match in [({"hflip": 1.5}, "hflip must be a probability"), ({"jpeg_quality": [100, 90]}, "jpeg_quality"),
                       ({"fill": 300}, "fill"), ({"crop_scale": [0.5, 0.2]}, "crop_scale"),
                       ({"rotate": -1}, "rotate"), ({"cutout_p": "yes"}, "cutout_p")]:
        with pytest.raises(ValueError, match=match):
            AugmentConfig.from_dict(bad)


@pytest.mark.parametrize("crop", [False, True])
def test_threaded_batches_equal_one_by_one_samples(tmp_path, crop):
    # The main-process batch path decodes and resizes on threads, then augments in sample order after per-sample
    # seeding, with one intra-op thread: its images must be bit-identical to __getitem__'s, failures included.
    from guie.pipeline.datasets import ImageFileDataset

    paths = []
    for i in range(6):
        paths.append(tmp_path / f"{i}.png")
        photo(60 + 7 * i, 44, seed=i).save(paths[-1])
    paths.insert(3, tmp_path / "missing.png")
    cfg = AugmentConfig(jpeg_p=0.5, affine_p=0.7, cutout_p=0.5, color_jitter_p=0.5,
                        crop_scale=(0.5, 1.0) if crop else None)
    ds = ImageFileDataset(paths, build_train_transform(PRE, cfg), threads=2)
    keys = [(i, 1000 + 17 * i) for i in range(len(paths))]
    threads_before = torch.get_num_threads()
    batch = ds.__getitems__(keys)
    assert torch.get_num_threads() == threads_before
    one_by_one = [ds[k] for k in keys]
    assert [b[0] for b in batch] == list(range(len(paths)))
    assert batch[3][1] is None and "missing.png" in batch[3][2]
    for b, o in zip(batch, one_by_one):
        assert b[2] == o[2]
        if o[1] is not None:
            assert torch.equal(b[1], o[1])
    assert not all(torch.equal(batch[0][1], ds[(0, s)][1]) for s in (1, 2, 3))  # the seeds do matter
