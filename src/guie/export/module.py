"""The exported module: raw RGB pixels of any size -> L2-normalised float32 embeddings [B, d], preprocessing inside.

One definition serves every format: `torch.jit.script` compiles it (with each member's network traced at its fixed
resolution), `torch.onnx.export` traces the same eager module with symbolic H and W.

Per member: resize with `guie.imaging.geometry.resize_tensor` (the crop/squash/pad geometry and Pillow's resampling
arithmetic, so the network sees the pixels the training-time PIL path gives it, for every interpolation including
lanczos) -> the member's Embedder (normalise -> backbone -> head -> L2). Optional TTA views (horizontal flip, a
whole-image letterbox view for non-square images) are averaged; members are averaged; the result is L2-normalised.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from fractions import Fraction

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InputError
from ..imaging.geometry import resize_tensor, size_max, size_min
from ..models.preprocess import PreprocessConfig


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
            raise InputError(f"TTA min_aspect must be >= 1 (long side / short side), got {self.min_aspect}")

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
            raise InputError(f"unknown TTA view(s) {sorted(unknown)}; choose from flip, letterbox")
        return cls(flip="flip" in names, letterbox="letterbox" in names, min_aspect=min_aspect)


def _ratio(x: float, max_denominator: int = 10_000) -> tuple[int, int]:
    fr = Fraction(x).limit_denominator(max_denominator)
    return fr.numerator, fr.denominator


class MemberPipeline(nn.Module):
    """One member: raw float pixels [B,3,H,W] in [0,255] -> resized uint8 views -> its network -> [B, d].

    `net` maps uint8 [B,3,S,S] to L2-normalised [B,d] (an Embedder, or its trace at resolution S).
    """

    def __init__(self, net: nn.Module, preprocess: PreprocessConfig, tta: TTAConfig):
        super().__init__()
        self.net = net
        self.size: int = int(preprocess.image_size)
        self.resize_mode: str = preprocess.resize_mode
        self.interpolation: str = preprocess.interpolation
        # crop mode: short side -> image_size / crop_pct, kept as an exact fraction num/den
        self.short_num, self.short_den = preprocess.short_side
        self.flip: bool = tta.flip
        self.letterbox: bool = tta.letterbox and preprocess.resize_mode != "pad"
        self.aspect_num, self.aspect_den = _ratio(tta.min_aspect, 1000)

    def resize(self, x: torch.Tensor, mode: str) -> torch.Tensor:
        """float [B,3,H,W] (0..255) -> uint8 [B,3,S,S]: the pixels models.preprocess.resize_image gives."""
        return resize_tensor(x, self.size, mode, self.short_num, self.short_den, self.interpolation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        views = [self.resize(x, self.resize_mode)]
        # weight of the letterbox view: 1 for images at least min_aspect wide or tall, else 0
        wide = torch.ones((), dtype=torch.float32, device=x.device)
        if self.letterbox:
            h, w = x.shape[-2], x.shape[-1]
            if torch.jit.is_scripting():
                if size_max(h, w) * self.aspect_den >= size_min(h, w) * self.aspect_num:
                    views.append(self.resize(x, "pad"))
            else:
                # Traced for ONNX: the view always runs and a 0/1 weight computed from the symbolic shape gates it
                # (a Python `if` on the shape would be frozen at the example's value).
                views.append(self.resize(x, "pad"))
                wide = (wide * size_max(h, w) * self.aspect_den >= wide * size_min(h, w) * self.aspect_num).float()
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

    def __init__(self, members: list[MemberPipeline], projection=None):
        super().__init__()
        if not members:
            raise InputError("an exported model needs at least one member")
        self.members = nn.ModuleList(members)
        self.ensemble: bool = len(members) > 1
        self.register_buffer("device_anchor", torch.zeros(0), persistent=False)
        # `projection` (guie.export.projection.ConcatPCA): the members' embeddings are concatenated, not averaged,
        # then projected by a PCA fitted on training images
        self.concat: bool = projection is not None
        mean = torch.zeros(0) if projection is None else torch.as_tensor(projection.mean, dtype=torch.float32)
        comps = torch.zeros(0, 0) if projection is None else torch.as_tensor(projection.components,
                                                                             dtype=torch.float32)
        self.register_buffer("pca_mean", mean.clone())
        self.register_buffer("pca_components", comps.clone())

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
        if self.concat:
            parts: list[torch.Tensor] = []
            for member in self.members:
                parts.append(member(x))
            emb = torch.cat(parts, dim=1) - self.pca_mean
            return F.normalize(emb @ self.pca_components.t(), dim=-1).float()
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
