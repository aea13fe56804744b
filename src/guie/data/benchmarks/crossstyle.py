"""Shared rules of guie's cross-style retrieval benchmarks (emoji, glyphs, icons): one class = one object (an emoji,
a character, an icon name) drawn by several independent styles (vendors, fonts, icon themes).

Such a benchmark is only as good as its styles are independent and its classes distinct, so the builders apply:

* **copies across styles** (`drop_style_copies`): an image that is a near-copy of the same class's image in an
  earlier style (`ink_difference` below a threshold) is dropped, so a query never finds its own
  drawing in another style's clothes; a style left with few images of its own (a clone: FreeSans of Nimbus Sans,
  Arimo of Liberation Sans, MATE's copies of GNOME icons) is dropped as a whole;
* **confusable classes** (`find_confusable_classes`): two classes drawn identically by most styles (Latin A,
  Greek Alpha and Cyrillic A; two icon names linked to one file) cannot be told apart by any embedding, so the later
  one is dropped;
* classes drawn by fewer than `min_styles` styles are dropped, and the class split is `emoji.class_split`
  (hash order: half test, the train half with every 5th class val).
"""
from __future__ import annotations

from collections.abc import Hashable, Sequence

import numpy as np
from PIL import Image

from ...errors import InputError

COMPARE_SIZE = 32  # images are compared as 32 x 32 grey arrays in [0, 1]
IMAGE_SIZES = (16, 512)  # the side lengths a benchmark may be rendered at


def check_image_size(size: int) -> None:
    """Refuse a rendering size outside IMAGE_SIZES (a one-line error naming the value)."""
    if not IMAGE_SIZES[0] <= int(size) <= IMAGE_SIZES[1]:
        raise InputError(f"image size {size}: must be between {IMAGE_SIZES[0]} and {IMAGE_SIZES[1]} pixels")


def compare_array(image: Image.Image) -> np.ndarray:
    """An image as a flat grey float32 vector (COMPARE_SIZE^2, values in [0, 1]) for duplicate tests."""
    grey = image.convert("L").resize((COMPARE_SIZE, COMPARE_SIZE), Image.Resampling.BILINEAR)
    return (np.asarray(grey, dtype=np.float32) / 255.0).reshape(-1)


def ink_difference(a: np.ndarray, b: np.ndarray) -> float:
    """How differently two `compare_array` images are inked: sum |a - b| / (ink of a + ink of b), ink = 1 - grey.

    0 for identical images, 1 for disjoint strokes; unlike a mean pixel difference it does not call two small marks
    (a comma in two fonts) similar just because both are mostly white.
    """
    return float(np.abs(a - b).sum() / ((1.0 - a).sum() + (1.0 - b).sum() + 1e-6))


def drop_style_copies(arrays: dict[tuple[Hashable, Hashable], np.ndarray], styles: Sequence[Hashable],
                      max_diff: float, min_own_fraction: float = 0.5
                      ) -> tuple[set[tuple[Hashable, Hashable]], list[Hashable], int]:
    """Which (class, style) images to keep when later styles copy earlier ones.

    Styles are visited in `styles` order; an image whose `ink_difference` to the same class's image in an already
    visited style is below `max_diff` is a copy. A style with fewer than `min_own_fraction` of its images
    left is a clone and loses all of them.
    Returns (kept keys, clone styles dropped, number of single copies dropped).
    """
    by_class: dict[Hashable, list[tuple[Hashable, np.ndarray]]] = {}
    kept: set = set()
    clones: list = []
    copies = 0
    for style in styles:
        mine = [key for key in arrays if key[1] == style]
        own = []
        for key in mine:
            a = arrays[key]
            if any(ink_difference(a, b) < max_diff for _, b in by_class.get(key[0], [])):
                continue
            own.append(key)
        if mine and len(own) < min_own_fraction * len(mine):
            clones.append(style)
            continue
        copies += len(mine) - len(own)
        for key in own:
            kept.add(key)
            by_class.setdefault(key[0], []).append((style, arrays[key]))
    return kept, clones, copies


def _pairwise_ink_difference(x: np.ndarray, chunk: int = 64) -> np.ndarray:
    """`ink_difference` between all rows of x [n, p] -> [n, n]."""
    n = len(x)
    ink = (1.0 - x).sum(-1)
    out = np.empty((n, n), dtype=np.float32)
    for i in range(0, n, chunk):
        diff = np.abs(x[i:i + chunk, None, :] - x[None, :, :]).sum(-1)
        out[i:i + chunk] = diff / (ink[i:i + chunk, None] + ink[None, :] + 1e-6)
    return out


def find_confusable_classes(arrays: dict[tuple[Hashable, Hashable], np.ndarray], classes: Sequence[Hashable],
                            max_diff: float, min_fraction: float = 0.5) -> dict[Hashable, Hashable]:
    """Classes that most styles draw identically to an earlier class (in `classes` order).

    Two classes are confusable when, among the styles that draw both, at least `min_fraction` draw them with an
    `ink_difference` below `max_diff`. Returns {dropped class: the earlier class it duplicates}; each
    class is compared only with classes that are kept.
    """
    order = {c: i for i, c in enumerate(classes)}
    styles = sorted({s for _, s in arrays}, key=str)
    n = len(classes)
    same = np.zeros((n, n), dtype=np.int32)
    both = np.zeros((n, n), dtype=np.int32)
    for style in styles:
        idx = np.array([order[c] for c, s in arrays if s == style and c in order], dtype=np.int64)
        if len(idx) < 2:
            continue
        x = np.stack([arrays[(classes[i], style)] for i in idx])
        close = _pairwise_ink_difference(x) < max_diff
        both[np.ix_(idx, idx)] += 1
        same[np.ix_(idx, idx)] += close
    dropped: dict = {}
    for j in range(n):
        for i in range(j):
            if classes[i] in dropped or not both[i, j]:
                continue
            if same[i, j] >= min_fraction * both[i, j]:
                dropped[classes[j]] = classes[i]
                break
    return dropped
