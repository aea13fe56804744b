"""The one resize geometry: how an image of any size becomes the model's S x S input, in bounded memory.

Three paths turn pixels into model input: PIL on the CPU (`resize_pil`, behind `models.preprocess.resize_image`),
the device decoder (`pipeline.gpu_decode`) and the exported module (`export.module`). All three follow the plan
computed by `resize_plan`, and the two tensor paths resample with `resize_tensor`, which reproduces Pillow's own
arithmetic (its filter coefficients, 22-bit fixed-point weights, rounding to 8 bits between the horizontal and the
vertical pass, and its rule for which pass runs first). So the three give the same pixels, for every filter
(bicubic, bilinear, lanczos, and nearest, whose source index is computed in exact integers everywhere).
A fourth follows the same plan for JPEGs on the CPU fast path (`resize_array`, behind
`models.preprocess.ImageTransform.load`): torch's SIMD uint8 resampler, within 2 levels of Pillow's pixels, on an
image libjpeg-turbo already decoded at a reduced scale.

The plan, per axis: "resize the whole axis to n pixels, keep the m pixels starting at c, paste them at p on a white
S x S canvas". crop: n = the short side scaled to S / crop_pct (and the other side in proportion), c centres an
S-pixel window; pad: n fits the long side to S, the window is all of it, p centres it; squash: n = m = S.

Only the m kept outputs are ever computed: Pillow is asked for just the window (`resize(box=...)`, see `pil_box`;
for a 640x480 photo in crop mode 224x224 outputs instead of 341x256, ~40% less resize work), and `resize_tensor`
evaluates Pillow's filter at exactly those positions, with Pillow's box arithmetic (centres measured from the box's
float32 corners). Bounded memory: the plan is never executed literally, so an 8000x1 image in crop mode touches a
few source pixels instead of building a 2,048,000 x 256 intermediate. `resize_pil` lets Pillow resize (its fast C
path) only when the full plan has at most `MAX_RESIZED_PIXELS` pixels, which is the case for every ordinary image;
otherwise it hands the pixels to `resize_tensor`. Every intermediate then has at most max(source rows in use, m) x m
pixels per channel.

Everything `resize_tensor` calls is TorchScript-compatible and uses integer arithmetic for sizes; under
`torch.export` (ONNX) it stays free of branches on the symbolic image size.
"""
from __future__ import annotations

import functools
import math
from fractions import Fraction

import torch
import torch.nn.functional as F
from torch import Tensor

INTERPOLATIONS = ("bicubic", "bilinear", "lanczos", "nearest")
RESIZE_MODES = ("crop", "squash", "pad")
# Pillow resizes (the kept window of) plans up to this many pixels (16 MiB as RGB); larger plans go through
# resize_tensor, which computes only the kept window.
MAX_RESIZED_PIXELS = 1 << 22


@functools.lru_cache(maxsize=64)
def short_side_ratio(image_size: int, crop_pct: float) -> tuple[int, int]:
    """crop mode's short side, image_size / crop_pct, as an exact fraction (numerator, denominator); cached, as every
    image's resize asks for it."""
    fr = Fraction(image_size / crop_pct).limit_denominator(10_000)
    return fr.numerator, fr.denominator


def size_min(a: int, b: int) -> int:
    """min() of two image sizes that stays symbolic under torch.export (where Python's min() would specialise it to
    the example input's value) and compiles in TorchScript."""
    if torch.jit.is_scripting():
        return min(a, b)
    return torch.sym_min(a, b)


def size_max(a: int, b: int) -> int:
    """max() of two image sizes; see `size_min`."""
    if torch.jit.is_scripting():
        return max(a, b)
    return torch.sym_max(a, b)


def _round_div(num: int, den: int) -> int:
    """round(num / den) for positive ints, halves up, in integer arithmetic."""
    return (2 * num + den) // (2 * den)


def resize_plan(width: int, height: int, size: int, mode: str, short_num: int, short_den: int) -> list[int]:
    """The geometry of turning a width x height image into size x size model input.

    Returns [n_x, c_x, m_x, p_x, n_y, c_y, m_y, p_y]: along each axis, resize the whole image to n pixels, keep the m
    pixels from c on, and paste them at offset p on a white size x size canvas. `mode` is crop, squash or pad;
    crop mode scales the short side to short_num / short_den (see `short_side_ratio`).
    """
    if mode == "squash":
        return [size, 0, size, 0, size, 0, size, 0]
    if mode == "pad":
        long_side = size_max(width, height)
        nx = size_max(1, _round_div(width * size, long_side))
        ny = size_max(1, _round_div(height * size, long_side))
        return [nx, 0, nx, (size - nx) // 2, ny, 0, ny, (size - ny) // 2]
    short = size_min(width, height)
    nx = size_max(size, _round_div(width * short_num, short_den * short))
    ny = size_max(size, _round_div(height * short_num, short_den * short))
    return [nx, (nx - size) // 2, size, 0, ny, (ny - size) // 2, size, 0]


def horizontal_first(width: int, height: int, out_width: int, out_height: int) -> bool:
    """Pillow's choice of pass order for resizing width x height to out_width x out_height: horizontal first, unless
    the height shrinks by more than twice as many pixels as the width (Resample.c). The rounding to 8 bits between
    the passes makes the order visible in the pixels, so every path follows this rule."""
    dh = height - out_height
    return not (dh > 0 and dh > (width - out_width) * 2)


def _exporting() -> bool:
    if torch.jit.is_scripting():
        return False
    return torch.compiler.is_exporting()


def _support(interpolation: str) -> float:
    if interpolation == "bilinear":
        return 1.0
    if interpolation == "bicubic":
        return 2.0
    if interpolation == "lanczos":
        return 3.0
    return 0.0  # nearest


def _sinc(x: Tensor) -> Tensor:
    xp = x * math.pi
    return torch.where(x == 0.0, torch.ones_like(x), torch.sin(xp) / xp)


def _filter(t: Tensor, interpolation: str) -> Tensor:
    """Pillow's filter kernels (Resample.c), term for term, so that the float64 coefficients match its own."""
    if interpolation == "bilinear":
        x = t.abs()
        return torch.where(x < 1.0, 1.0 - x, torch.zeros_like(x))
    if interpolation == "bicubic":  # a = -0.5
        x = t.abs()
        inner = (1.5 * x - 2.5) * x * x + 1
        outer = (((x - 5) * x + 8) * x - 4) * -0.5
        return torch.where(x < 1.0, inner, torch.where(x < 2.0, outer, torch.zeros_like(x)))
    if interpolation == "lanczos":
        keep = (t >= -3.0) & (t < 3.0)
        return torch.where(keep, _sinc(t) * _sinc(t / 3), torch.zeros_like(t))
    return torch.ones_like(t)  # nearest: the single source pixel selected by the bounds


def _axis_bounds(in_len: int, n: int, c: int, m: int, interpolation: str,
                 device: torch.device) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Outputs c..c+m-1 of an axis of in_len pixels resized to n -> (centre, first source, end source, 1/filterscale),
    as Pillow's precompute_coeffs computes them (float64) when asked for just those outputs: m pixels from the source
    box [c * in_len / n, (c + m) * in_len / n), whose ends Pillow holds as C floats (float32; see `pil_box`)."""
    one = torch.ones((), dtype=torch.float64, device=device)
    in0 = (one * (c * in_len) / n).to(torch.float32)
    in1 = (one * ((c + m) * in_len) / n).to(torch.float32)
    scale = (in1 - in0).to(torch.float64) / m
    filterscale = torch.clamp(scale, min=1.0)
    center = in0.to(torch.float64) + (torch.arange(m, dtype=torch.float64, device=device) + 0.5) * scale
    if interpolation == "nearest":
        # the source pixel under the output pixel's centre, floor((c + o + 0.5) * in_len / n), in exact integers
        # (Pillow accumulates the position in floating point and can land one pixel off where it is an integer)
        o = torch.arange(m, dtype=torch.int64, device=device) + c
        first = torch.div((2 * o + 1) * in_len, 2 * n, rounding_mode="floor").to(torch.float64)
        first = torch.minimum(first, one * in_len - 1.0)
        return center, first, first + 1.0, 1.0 / filterscale
    support = filterscale * _support(interpolation)
    first = torch.clamp(torch.trunc(center - support + 0.5), min=0.0)
    end = torch.clamp(torch.trunc(center + support + 0.5), max=one * in_len)
    return center, first, end, 1.0 / filterscale


def _fixed_point(w: Tensor) -> Tensor:
    """Normalise raw filter values [outputs, sources] per output and quantise them to Pillow's fixed point: 22
    fractional bits (Resample.c, PRECISION_BITS), kept as float64 (products with 8-bit pixels and sums stay exact)."""
    total = w.sum(1, keepdim=True)
    k = torch.where(total != 0.0, w / total, w)
    return torch.trunc(k * 4194304.0 + torch.where(k < 0.0, -0.5, 0.5))


def _to_uint8_levels(acc: Tensor) -> Tensor:
    """Pillow's clip8: fixed-point sums -> integer levels 0..255 (kept as float64 for the next pass)."""
    return torch.clamp(torch.floor((acc + 2097152.0) / 4194304.0), 0.0, 255.0)


def _resample(x: Tensor, dim: int, in_len: int, n: int, c: int, m: int, interpolation: str, offset: int) -> Tensor:
    """Resample axis `dim` (-1: columns, -2: rows) of x [..., rows, cols] as Pillow does: outputs c..c+m-1 of that
    axis (in_len source pixels) resized to n, rounded to 8-bit levels (float64). x holds source pixels offset,
    offset + 1, ... of the axis (the others are not read by these outputs).

    Eager and TorchScript: outputs go in groups of a few consecutive ones, each a small matrix product over just
    the source pixels the group reads, so the work stays close to Pillow's loop over each output's filter taps.
    Under torch.export: one product over the whole axis, whose shape does not depend on a loop count.
    """
    center, first, end, inv_scale = _axis_bounds(in_len, n, c, m, interpolation, x.device)
    if _exporting():
        src = torch.arange(in_len, dtype=torch.float64, device=x.device).unsqueeze(0)  # [1, L]
        t = (src - center.unsqueeze(1) + 0.5) * inv_scale
        keep = (src >= first.unsqueeze(1)) & (src < end.unsqueeze(1))
        weights = _fixed_point(torch.where(keep, _filter(t, interpolation), torch.zeros_like(t)))  # [m, L]
        xf = x.to(torch.float64)
        return _to_uint8_levels(xf @ weights.t() if dim == -1 else weights @ xf)
    ksize = int((end - first).max().item())
    taps = torch.arange(ksize, dtype=torch.float64, device=x.device).unsqueeze(0)  # [1, K]
    src = first.unsqueeze(1) + taps                                                # [m, K] source indices
    t = (src - center.unsqueeze(1) + 0.5) * inv_scale
    weights = _fixed_point(torch.where(src < end.unsqueeze(1), _filter(t, interpolation), torch.zeros_like(t)))
    local = (first - offset).to(torch.long)
    starts: list[int] = local.tolist()
    ends: list[int] = (end - offset).to(torch.long).tolist()
    group = max(4, int(6.0 * _support(interpolation)))  # the slab a group reads is ~4x its taps: cheap, few calls
    parts: list[Tensor] = []
    for g0 in range(0, m, group):
        g1 = min(m, g0 + group)
        s0, span = starts[g0], ends[g1 - 1] - starts[g0]
        cols = torch.clamp(local[g0:g1].unsqueeze(1) - s0 + taps.to(torch.long), max=span - 1)  # taps past the
        dense = torch.zeros([g1 - g0, span], dtype=torch.float64, device=x.device)             # end weigh 0
        dense.scatter_add_(1, cols, weights[g0:g1])
        slab = x.narrow(dim, s0, span).to(torch.float64)
        parts.append(slab @ dense.t() if dim == -1 else dense @ slab)
    return _to_uint8_levels(torch.cat(parts, dim))


def _used_range(in_len: int, n: int, c: int, m: int, interpolation: str, device: torch.device) -> tuple[int, int]:
    """[first, end) of the source pixels that outputs c..c+m-1 read."""
    _, first, end, _ = _axis_bounds(in_len, n, c, m, interpolation, device)
    return int(first[0].item()), int(end[m - 1].item())


def _two_passes(x: Tensor, plan: list[int], interpolation: str, width: int, height: int, x0: int, y0: int,
                h_first: bool) -> Tensor:
    """x [B,C,rows,cols] (source rows from y0, columns from x0) -> float64 levels [B,C,m_y,m_x], the two passes in
    the given order."""
    nx, cx, mx, ny, cy, my = plan[0], plan[1], plan[2], plan[4], plan[5], plan[6]
    if h_first:
        return _resample(_resample(x, -1, width, nx, cx, mx, interpolation, x0), -2, height, ny, cy, my,
                         interpolation, y0)
    return _resample(_resample(x, -2, height, ny, cy, my, interpolation, y0), -1, width, nx, cx, mx,
                     interpolation, x0)


def resize_tensor(images: Tensor, size: int, mode: str, short_num: int, short_den: int,
                  interpolation: str) -> Tensor:
    """Images [B,C,H,W] (uint8, or float with 0..255 values) -> uint8 [B,C,size,size], following `resize_plan`
    with Pillow's resampling arithmetic: the same pixels as `resize_pil` on the same image.

    Memory: only the source rows and columns the kept window reads are touched; the float64 intermediates hold at
    most B x C x (source rows in use) x size values.
    """
    h, w = images.shape[-2], images.shape[-1]
    plan = resize_plan(w, h, size, mode, short_num, short_den)
    mx, px, my, py = plan[2], plan[3], plan[6], plan[7]
    if _exporting():
        # both pass orders, chosen by the (symbolic) shape without a Python branch; see horizontal_first
        h_first = _two_passes(images, plan, interpolation, w, h, 0, 0, True)
        v_first = _two_passes(images, plan, interpolation, w, h, 0, 0, False)
        one = torch.ones((), dtype=torch.float64, device=images.device)
        dh, dw = one * (h - plan[4]), one * (w - plan[0])
        out = torch.where((dh > 0) & (dh > dw * 2), v_first, h_first)
    else:
        y0, y1 = _used_range(h, plan[4], plan[5], my, interpolation, images.device)
        x0, x1 = _used_range(w, plan[0], plan[1], mx, interpolation, images.device)
        used = images.narrow(-2, y0, y1 - y0).narrow(-1, x0, x1 - x0)
        out = _two_passes(used, plan, interpolation, w, h, x0, y0, horizontal_first(w, h, plan[0], plan[4]))
    if mode == "pad":
        out = F.pad(out, [px, size - mx - px, py, size - my - py], value=255.0)  # white, as resize_pil
    return out.to(torch.uint8)


def pil_box(width: int, height: int, nx: int, cx: int, mx: int, ny: int, cy: int, my: int) -> tuple[float, ...]:
    """Pillow's `resize(box=...)` for outputs cx..cx+mx-1 (of nx) and cy..cy+my-1 (of ny) of a width x height image:
    the source rectangle those outputs cover. Pillow then computes only the kept window instead of the whole resized
    image (for a 640x480 photo in crop mode 224x224 instead of 341x256 outputs), with its centres measured from the
    box's float32 corners; `_axis_bounds` reproduces that arithmetic, so the tensor paths keep giving the same
    pixels."""
    return cx * width / nx, cy * height / ny, (cx + mx) * width / nx, (cy + my) * height / ny


def resize_pil(image, size: int, mode: str, short_num: int, short_den: int, interpolation: str):
    """An RGB PIL image -> size x size RGB PIL image following `resize_plan` (see the module docstring).

    Pillow computes the kept window (`pil_box`) when the plan's full size has at most `MAX_RESIZED_PIXELS` pixels
    (every ordinary image: its fast C path); larger plans (extreme aspect ratios) go through `resize_tensor`, which
    computes the same pixels. "nearest" always goes through
    `resize_tensor` (its exact integer source index; see `_axis_bounds`).
    """
    import numpy as np
    from PIL import Image

    w, h = image.size
    nx, cx, mx, px, ny, cy, my, py = resize_plan(w, h, size, mode, short_num, short_den)
    if nx * ny <= max(MAX_RESIZED_PIXELS, size * size) and interpolation != "nearest":
        resample = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR,
                    "lanczos": Image.Resampling.LANCZOS, "nearest": Image.Resampling.NEAREST}[interpolation]
        if (nx, ny) != (w, h):  # only the kept window is computed (Pillow's box)
            image = image.resize((mx, my), resample, box=pil_box(w, h, nx, cx, mx, ny, cy, my))
        elif (cx, cy, mx, my) != (0, 0, nx, ny):
            image = image.crop((cx, cy, cx + mx, cy + my))
        if (px, py, mx, my) == (0, 0, size, size):
            return image
        canvas = Image.new("RGB", (size, size), (255, 255, 255))
        canvas.paste(image, (px, py))
        return canvas
    arr = torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1).unsqueeze(0)
    out = resize_tensor(arr, size, mode, short_num, short_den, interpolation)[0]
    return Image.fromarray(np.ascontiguousarray(out.permute(1, 2, 0).numpy()), "RGB")


def resize_array(pixels, size: int, mode: str, short_num: int, short_den: int, interpolation: str) -> Tensor | None:
    """An RGB uint8 array [H, W, 3] -> uint8 tensor [3, size, size] following `resize_plan`, fast and without the GIL;
    None where this resampler does not apply (other filters, plans above `MAX_RESIZED_PIXELS` pixels: the caller
    resizes with `resize_pil`, exact and bounded). The result is stored channels-last ([size, size, 3] permuted),
    the CPU forward's layout: `guie.pipeline.datasets.stack_images` batches such images without a transposing copy.

    For the JPEG fast path (`guie.imaging.io.load_pixels`), whose pixels already differ from a full decode by a few
    levels: bicubic and bilinear go through torch's antialiased uint8 resampler (SIMD, ported from pillow-simd:
    Pillow's filters and fixed-point arithmetic, within 2 levels of `resize_pil` in ~0.3% of the values), under
    half of Pillow's time for a 640x480 JPEG. It computes the whole plan and keeps the window.
    """
    h, w = pixels.shape[:2]
    nx, cx, mx, px, ny, cy, my, py = resize_plan(w, h, size, mode, short_num, short_den)
    if nx * ny > max(MAX_RESIZED_PIXELS, size * size) or interpolation not in ("bicubic", "bilinear"):
        return None
    import numpy as np

    if (nx, ny) != (w, h):
        x = torch.from_numpy(pixels).permute(2, 0, 1).unsqueeze(0)  # channels_last strides: the SIMD kernel's layout
        pixels = F.interpolate(x, size=(ny, nx), mode=interpolation, antialias=True)[0].permute(1, 2, 0).numpy()
    # copies by numpy: a torch copy would start an OpenMP team in each decoding thread (`pil_to_uint8`)
    window = pixels[cy:cy + my, cx:cx + mx]
    if (px, py, mx, my) == (0, 0, size, size):
        out = np.ascontiguousarray(window)
    else:
        out = np.full((size, size, 3), 255, dtype=np.uint8)
        out[py:py + my, px:px + mx] = window
    return torch.from_numpy(out).permute(2, 0, 1)
