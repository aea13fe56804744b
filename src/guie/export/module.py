"""The exported module: raw RGB pixels of any size -> L2-normalised float32 embeddings [B, d], preprocessing inside.

One definition serves every format: `torch.jit.script` compiles it (with each member's network traced at its fixed
resolution), `torch.onnx.export` traces the same eager module with symbolic H and W. So that one code path is valid
for the TorchScript compiler and for `torch.export`, the resize geometry is computed with integer arithmetic only
(no float rounding of symbolic sizes, no data-dependent branches outside TorchScript).

Per member: resize (PreprocessConfig's crop/squash/pad geometry; antialiased bicubic/bilinear in PIL's two passes) ->
round to uint8 -> the member's Embedder (normalise -> backbone -> head -> L2). Optional TTA views (horizontal flip, a
whole-image letterbox view for non-square images) are averaged; members are averaged; the result is L2-normalised.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from fractions import Fraction

import torch
import torch.nn.functional as F
from torch import nn

from ..models.preprocess import PreprocessConfig

# PIL filter -> torch.nn.functional.interpolate mode. torch has no Lanczos; bicubic is its nearest equivalent.
TORCH_INTERPOLATION = {"bicubic": "bicubic", "bilinear": "bilinear", "nearest": "nearest-exact", "lanczos": "bicubic"}


@dataclass(frozen=True)
class TTAConfig:
    """Test-time augmentation done inside the exported module (each view's embedding is L2-normalised, then averaged).

    flip: add the horizontally mirrored image.
    letterbox: for images whose long/short side ratio is >= min_aspect, add a whole-image view (resize_mode "pad")
        next to the model's own (centre-crop) view, so content cut off by the crop still counts (the 5th place's
        aspect-aware views). Square-ish images keep the single view.
    """

    flip: bool = False
    letterbox: bool = False
    min_aspect: float = 1.25

    def __post_init__(self):
        if self.min_aspect < 1:
            raise ValueError(f"TTA min_aspect must be >= 1 (long side / short side), got {self.min_aspect}")

    @property
    def enabled(self) -> bool:
        return self.flip or self.letterbox

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def parse(cls, spec: str | None, min_aspect: float = 1.25) -> TTAConfig:
        """From a CLI string: '', 'none', 'flip', 'letterbox' or 'flip,letterbox'."""
        names = {s.strip() for s in (spec or "").split(",") if s.strip() and s.strip() != "none"}
        unknown = names - {"flip", "letterbox"}
        if unknown:
            raise ValueError(f"unknown TTA view(s) {sorted(unknown)}; choose from flip, letterbox")
        return cls(flip="flip" in names, letterbox="letterbox" in names, min_aspect=min_aspect)


def _ratio(x: float, max_denominator: int = 10_000) -> tuple[int, int]:
    fr = Fraction(x).limit_denominator(max_denominator)
    return fr.numerator, fr.denominator


def _imin(a: int, b: int) -> int:
    # torch.sym_min keeps a symbolic size symbolic under torch.export, where Python's min() would specialise it.
    if torch.jit.is_scripting():
        return min(a, b)
    return torch.sym_min(a, b)


def _imax(a: int, b: int) -> int:
    if torch.jit.is_scripting():
        return max(a, b)
    return torch.sym_max(a, b)


def _round_div(num: int, den: int) -> int:
    """round(num / den) for positive ints, halves up, in integer arithmetic."""
    return (2 * num + den) // (2 * den)


class MemberPipeline(nn.Module):
    """One member: raw float pixels [B,3,H,W] in [0,255] -> resized uint8 views -> its network -> [B, d].

    `net` maps uint8 [B,3,S,S] to L2-normalised [B,d] (an Embedder, or its trace at resolution S).
    """

    def __init__(self, net: nn.Module, preprocess: PreprocessConfig, tta: TTAConfig):
        super().__init__()
        self.net = net
        self.size: int = int(preprocess.image_size)
        self.resize_mode: str = preprocess.resize_mode
        self.interpolation: str = TORCH_INTERPOLATION[preprocess.interpolation]
        self.antialias: bool = self.interpolation in ("bicubic", "bilinear")
        # crop mode: short side -> image_size / crop_pct, kept as an exact fraction num/den
        self.short_num, self.short_den = _ratio(preprocess.image_size / preprocess.crop_pct)
        self.flip: bool = tta.flip
        self.letterbox: bool = tta.letterbox and preprocess.resize_mode != "pad"
        self.aspect_num, self.aspect_den = _ratio(tta.min_aspect, 1000)

    def _interpolate(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """Resize like PIL's Resample.c: horizontal pass, round to 8 bits, vertical pass.

        The pixels then match PIL's within 1 level on > 99.7% of pixels, where a single 2-D pass differs on up to
        ~25% (by up to 9 levels when upsampling) and moves embeddings ~10x more. (Pillow 13 sometimes runs the
        vertical pass first, seemingly by a size heuristic; those images differ by 1-2 levels on ~20% of pixels.)
        """
        y = F.interpolate(x, size=[x.shape[-2], w], mode=self.interpolation, antialias=self.antialias)
        return F.interpolate(y.clamp(0.0, 255.0).round(), size=[h, w], mode=self.interpolation,
                             antialias=self.antialias)

    def resize(self, x: torch.Tensor, mode: str) -> torch.Tensor:
        """float [B,3,H,W] (0..255) -> uint8 [B,3,S,S], the geometry of models.preprocess.resize_image."""
        s = self.size
        h, w = x.shape[-2], x.shape[-1]
        if mode == "squash":
            y = self._interpolate(x, s, s)
        elif mode == "pad":
            long_side = _imax(h, w)
            nh = _imax(1, _round_div(h * s, long_side))
            nw = _imax(1, _round_div(w * s, long_side))
            y = self._interpolate(x, nh, nw)
            top, left = (s - nh) // 2, (s - nw) // 2
            y = F.pad(y, [left, s - nw - left, top, s - nh - top], value=255.0)  # white, as resize_image
        else:  # crop: short side to s / crop_pct, then the centre s x s
            short_side = _imin(h, w)
            nh = _imax(s, _round_div(h * self.short_num, self.short_den * short_side))
            nw = _imax(s, _round_div(w * self.short_num, self.short_den * short_side))
            # at the same size the (antialiased) kernels reduce to the identity, so no data-dependent skip is needed
            y = self._interpolate(x, nh, nw)
            y = y.narrow(2, (nh - s) // 2, s).narrow(3, (nw - s) // 2, s)
        return y.clamp(0.0, 255.0).round().to(torch.uint8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        views = [self.resize(x, self.resize_mode)]
        # weight of the letterbox view: 1 for images at least min_aspect wide or tall, else 0
        wide = torch.ones((), dtype=torch.float32, device=x.device)
        if self.letterbox:
            h, w = x.shape[-2], x.shape[-1]
            if torch.jit.is_scripting():
                if _imax(h, w) * self.aspect_den >= _imin(h, w) * self.aspect_num:
                    views.append(self.resize(x, "pad"))
            else:
                # Traced for ONNX: the view always runs and a 0/1 weight computed from the symbolic shape gates it
                # (a Python `if` on the shape would be frozen at the example's value).
                views.append(self.resize(x, "pad"))
                wide = (wide * _imax(h, w) * self.aspect_den >= wide * _imin(h, w) * self.aspect_num).float()
        if self.flip:
            views = views + [v.flip(3) for v in views]
        if len(views) == 1:
            return self.net(views[0])
        # one network call on all views, so the exported graph holds the backbone once
        b = x.shape[0]
        out = self.net(torch.cat(views, dim=0))
        n_base = len(views) // 2 if self.flip else len(views)
        emb = torch.zeros_like(out[:b])
        for i in range(len(views)):  # views: [model view, letterbox view?] + their mirror images
            part = out[i * b:(i + 1) * b]
            emb = emb + (part * wide if i % n_base == 1 else part)
        return F.normalize(emb, dim=-1)


class ExportedEmbedder(nn.Module):
    """Raw RGB images -> L2-normalised float32 embeddings [B, d] (the GUIE submission contract).

    Input: uint8 [3,H,W] or [B,3,H,W] with values 0..255 (what `PILToTensor` gives for `Image.open(p).convert("RGB")`),
    any H and W; float input is read as [0,1] (torchvision's ConvertImageDtype convention). Input on another device
    than the model is moved to the model's. Output: float32 [B, d] on the model's device (B = 1 for a single image).
    """

    def __init__(self, members: list[MemberPipeline]):
        super().__init__()
        if not members:
            raise ValueError("an exported model needs at least one member")
        self.members = nn.ModuleList(members)
        self.ensemble: bool = len(members) > 1
        self.register_buffer("device_anchor", torch.zeros(0), persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images
        if x.dim() == 3:
            x = x.unsqueeze(0)
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError("expected RGB images as uint8 [3,H,W] or [B,3,H,W]; got shape " + str(list(images.shape)))
        if torch.jit.is_scripting():
            x = x.to(self.device_anchor.device)
        if x.dtype == torch.uint8:
            x = x.float()
        else:
            x = x.float() * 255.0
        emb = torch.zeros(0)
        first = True
        for member in self.members:
            e = member(x)
            if first:
                emb = e
                first = False
            else:
                emb = emb + e
        if self.ensemble:
            emb = F.normalize(emb, dim=-1)
        return emb.float()
