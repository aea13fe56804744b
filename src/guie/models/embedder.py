"""Embedder = normalisation + backbone + head + L2 normalisation, with the preprocessing it expects.

`create_embedder` builds one from a backbone name (like timm's `create_model`); `save_embedder`/`load_embedder`
round-trip it through a self-describing checkpoint that needs no hub access to load.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InputError, MissingFileError
from ..utils import atomic_save
from .backbones import BACKBONES, FAMILIES, Backbone, create_backbone
from .heads import MAX_EMBED_DIM, ProjectionHead
from .preprocess import ImageNormalize, ImageTransform, PreprocessConfig, check_image_size

CHECKPOINT_FORMAT = "guie-embedder/1"


class CheckpointError(InputError):
    """A model file that is not a usable guie checkpoint (not one at all, empty, damaged, weights that do not fit
    its architecture); the message names the file."""


@dataclass
class EmbedderSpec:
    """Everything needed to rebuild an Embedder's architecture (weights live in the state dict)."""

    backbone: str = "efficientnet_lite0"
    embed_dim: int | None = 64  # None: no head, the backbone's raw features (zero-shot baseline; > 64-d)
    dropout: float = 0.0
    image_size: int | None = None
    backbone_kwargs: dict = field(default_factory=dict)
    head_norm: str = "none"    # "batchnorm": standardise features before the projection
    head_hidden: int | None = None  # a hidden layer of this width in the head (None: linear)


class Embedder(nn.Module):
    """images (uint8 [B,3,S,S], or float in [0,1]) -> L2-normalised embeddings [B, d]."""

    def __init__(self, backbone: Backbone, head: nn.Module | None, preprocess: PreprocessConfig,
                 spec: EmbedderSpec):
        super().__init__()
        self.normalize = ImageNormalize(preprocess.mean, preprocess.std)
        self.backbone = backbone
        self.head = head if head is not None else nn.Identity()
        self.preprocess = preprocess
        self.spec = spec

    @property
    def embed_dim(self) -> int:
        return self.head.embed_dim if isinstance(self.head, ProjectionHead) else self.backbone.num_features

    @property
    def transform(self) -> ImageTransform:
        """PIL RGB image -> uint8 tensor at this model's resolution."""
        return ImageTransform(self.preprocess)

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        """Backbone features [B, F] before the head (what the frozen-backbone cache stores)."""
        return self.backbone(self.normalize(images))

    def embed_features(self, features: torch.Tensor) -> torch.Tensor:
        """Head + L2 normalisation applied to backbone features."""
        return F.normalize(self.head(features).float(), dim=-1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.embed_features(self.forward_features(images))

    def set_image_size(self, image_size: int, patch_stride: int | None = None) -> Embedder:
        """Run at another resolution: the backbone adapts (ViTs resample position embeddings), preprocessing follows.
        `patch_stride` (OpenCLIP ViTs) also changes the patch embedding's stride (overlapping patches).

        Saved checkpoints record the new size (and stride), so `load_embedder` rebuilds the model at it."""
        stride_changes = patch_stride is not None and patch_stride != self.spec.backbone_kwargs.get("patch_stride")
        if stride_changes:
            self.backbone.set_geometry(image_size, patch_stride)
            self.spec.backbone_kwargs = {**self.spec.backbone_kwargs, "patch_stride": int(patch_stride)}
        elif image_size != self.preprocess.image_size:
            self.backbone.set_image_size(image_size)
        if image_size != self.preprocess.image_size:
            self.preprocess = self.preprocess.replace(image_size=image_size)
            self.spec.image_size = image_size
        return self

    def fingerprint(self, features: bool = False, preprocess: PreprocessConfig | None = None) -> str:
        """A cheap identity of (weights, preprocessing, output kind): 16 hex digits.

        Indexes refuse a query model, and resumable embedding files a rerun, whose fingerprint differs; feature
        caches are keyed by it. With `features` only the backbone counts (a new head must not invalidate cached
        features). `preprocess` (default: the model's own) is the preprocessing the output is made with.
        """
        preprocess = preprocess or self.preprocess
        spec = self.spec
        ident = {"backbone": spec.backbone, "backbone_kwargs": spec.backbone_kwargs, "pre": preprocess.to_dict(),
                 "features": features}
        if not features:
            ident["spec"] = spec.__dict__
        h = hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode())
        module = self.backbone if features else self
        with torch.no_grad():
            # Per tensor: shape, sum, sum of squares and a few values: any weight update changes it, and it costs one
            # pass over the weights (about a second for ViT-H), not a hash of gigabytes.
            for name, t in module.state_dict().items():
                t = t.detach()
                if not t.is_floating_point():
                    t = t.double()
                t64 = t.double()
                h.update(f"{name}{tuple(t.shape)}{float(t64.sum()):.10e}{float((t64 * t64).sum()):.10e}".encode())
                h.update(np.ascontiguousarray(t.reshape(-1)[:8].float().cpu().numpy()).tobytes())
        return h.hexdigest()[:16]

    def set_preprocess(self, preprocess: PreprocessConfig) -> None:
        """Change resolution/resize policy (e.g. evaluate at 280 px); mean/std must stay those of the weights."""
        if tuple(preprocess.mean) != tuple(self.preprocess.mean) or tuple(preprocess.std) != tuple(self.preprocess.std):
            raise InputError("set_preprocess cannot change mean/std: they belong to the backbone's weights")
        self.preprocess = preprocess
        self.spec.image_size = preprocess.image_size


def create_embedder(backbone: str = "efficientnet_lite0", embed_dim: int | None = 64, dropout: float = 0.0,
                    pretrained: bool = True, image_size: int | None = None, preprocess: dict | None = None,
                    head_norm: str = "none", head_hidden: int | None = None, seed: int | None = 0,
                    max_embed_dim: int | None = MAX_EMBED_DIM, **backbone_kwargs) -> Embedder:
    """Build an Embedder: a registered backbone + Dropout/Linear head to `embed_dim` (<= 64) + L2 normalisation.

    Fresh weights (the head; the whole backbone when not pretrained) are drawn from torch's RNG seeded with `seed`
    in a forked RNG state, so the same call always builds the same model (two `guie embed --embed-dim 64` runs
    agree, and an interrupted one resumes) and the caller's RNG is left as it was. seed=None draws from the
    caller's global RNG instead (training seeds it itself and continues from it).

    Args:
        backbone: see `guie.models.backbones.create_backbone` (``efficientnet_lite0``, ``timm:...``, ``open_clip:...``).
        embed_dim: output dimension (<= 64), or None for the backbone's raw features (no head).
        dropout: dropout before the projection (active in train mode only).
        pretrained: load the backbone's pretrained weights.
        image_size: input resolution (defaults to the backbone's native one).
        preprocess: overrides of PreprocessConfig fields, e.g. ``{"crop_pct": 1.0}``.
        head_norm: "batchnorm" to standardise backbone features before the projection.
        head_hidden: width of a hidden GELU layer in the head (None: the linear head the winners used).
        max_embed_dim: refuse a wider head (the GUIE limit, 64); None allows any (a wide head trained for a PCA
            to 64 at export, the 6th place's way).
        backbone_kwargs: family options, e.g. ``keep_projection=False`` (open_clip) or ``feature_levels=(2, 3, 4)``
            (timm CNNs: also pool these intermediate stages and concatenate them to the final features).
    """
    with torch.random.fork_rng(devices=[]) if seed is not None else contextlib.nullcontext():
        if seed is not None:
            torch.manual_seed(seed)
        net, pre = create_backbone(backbone, pretrained=pretrained, image_size=image_size, **backbone_kwargs)
        head = (ProjectionHead(net.num_features, embed_dim, dropout, norm=head_norm, hidden=head_hidden,
                               max_dim=max_embed_dim) if embed_dim is not None else None)
    if preprocess:
        pre = pre.replace(**preprocess)
    spec = EmbedderSpec(backbone=backbone, embed_dim=embed_dim, dropout=dropout, image_size=pre.image_size,
                        backbone_kwargs=dict(backbone_kwargs), head_norm=head_norm, head_hidden=head_hidden)
    return Embedder(net, head, pre, spec)


def save_embedder(embedder: Embedder, path: str | Path, extra: dict | None = None) -> Path:
    """Write a self-describing checkpoint (spec + preprocessing + weights) atomically."""
    payload = {"format": CHECKPOINT_FORMAT, "spec": asdict(embedder.spec),
               "preprocess": embedder.preprocess.to_dict(), "state_dict": embedder.state_dict(),
               "extra": extra or {}}
    return atomic_save(payload, path)


def embedder_from_spec(spec: EmbedderSpec) -> Embedder:
    """A fresh Embedder of `spec`'s architecture, random weights and no hub access: what a checkpoint's weights
    are loaded into."""
    return create_embedder(spec.backbone, spec.embed_dim, spec.dropout, pretrained=False, image_size=spec.image_size,
                           head_norm=spec.head_norm, head_hidden=spec.head_hidden, max_embed_dim=None,
                           **spec.backbone_kwargs)


def read_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """The payload of a `save_embedder` file (spec, preprocess, state_dict, extra), read once.

    Anything but a guie checkpoint is refused with one line naming the file: MissingFileError (no such file) or
    CheckpointError (a folder, empty, not a checkpoint, another format)."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(path, "model file") if not path.is_dir() else \
            CheckpointError(f"{path}: a folder, not a model checkpoint file")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: empty file (0 bytes), not a model checkpoint")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as e:  # noqa: BLE001 - torch raises many types (unpickling, zip, EOF, value errors) for non-checkpoints
        raise CheckpointError(f"{path}: not a guie model checkpoint (torch cannot read it: {type(e).__name__}: "
                              f"{_first_line(e)})") from None
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path}: not a guie embedder checkpoint (expected format {CHECKPOINT_FORMAT!r})")
    return payload


def embedder_from_payload(payload: dict, path: str | Path = "checkpoint") -> Embedder:
    """The Embedder a `read_checkpoint` payload describes (random init, then the stored weights: no hub access);
    a damaged header, an architecture that cannot be built or weights that do not fit it are a CheckpointError
    naming `path`."""
    try:
        spec = EmbedderSpec(**payload["spec"])
        pre = PreprocessConfig.from_dict(payload["preprocess"])
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: damaged checkpoint header ({type(e).__name__}: {_first_line(e)})") from None
    try:
        embedder = embedder_from_spec(spec)
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{path}: its architecture ({spec.backbone}) cannot be built ({_first_line(e)})") \
            from None
    embedder.preprocess = pre
    state = payload.get("state_dict")
    problem = _state_dict_mismatch(embedder, state)
    if problem:
        raise CheckpointError(f"{path}: its weights do not fit its architecture ({spec.backbone}, embed_dim "
                              f"{spec.embed_dim}): {problem}")
    embedder.load_state_dict(state, strict=True)
    # accuracy checks of other precisions (bf16, int8) recorded with the weights: what lets inference choose them
    embedder.precision_checks = dict((payload.get("extra") or {}).get("precision_checks") or {})
    return embedder.eval()


def load_embedder(path: str | Path, map_location: str | torch.device = "cpu") -> Embedder:
    """Rebuild an Embedder from `save_embedder` output (`read_checkpoint` + `embedder_from_payload`); the model
    remembers its file (`checkpoint_path`), where files made from it live beside it (its int8 model)."""
    embedder = embedder_from_payload(read_checkpoint(path, map_location), path)
    embedder.checkpoint_path = Path(path).expanduser().resolve()
    return embedder


def _state_dict_mismatch(embedder: nn.Module, state) -> str | None:
    """Why `state` cannot be loaded strictly into `embedder` (missing, unexpected, mis-shaped weights), or None."""
    if not isinstance(state, dict):
        return "no state_dict"
    own = embedder.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shaped = [k for k in own if k in state and tuple(getattr(state[k], "shape", ())) != tuple(own[k].shape)]
    parts = [f"{len(keys)} {what} (e.g. {keys[0]!r})"
             for what, keys in (("missing", missing), ("unexpected", unexpected), ("of another shape", shaped)) if keys]
    return "; ".join(parts) or None


def _first_line(exc: BaseException) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    return (lines[0] if lines else type(exc).__name__)[:200]


def is_backbone_name(name: str) -> bool:
    """Whether `name` names a backbone (a registered one, or `timm:...` / `open_clip:...`) rather than a file."""
    family, _, rest = name.partition(":")
    return (family in BACKBONES and not rest) or (family in FAMILIES and bool(rest))


def resolve_embedder(model: str | Path | Embedder | None, image_size: int | None = None, seed: int = 0,
                     crop_pct: float | None = None, **kwargs) -> Embedder:
    """An Embedder from an instance, a checkpoint file, or a backbone name (raw features unless embed_dim given).

    `image_size` and `crop_pct` (the centre-crop fraction, 1.0: the whole image) apply to all three (a checkpoint or
    instance is adapted with `Embedder.set_image_size` / `set_preprocess`); `seed` initialises a fresh head (see
    `create_embedder`); other keyword arguments go to `create_embedder` and are refused for a checkpoint, which fixes
    them itself. A reference that names a file (a .pt suffix or a path) that does not exist is "file not found".
    """
    if image_size is not None:
        image_size = check_image_size(image_size)
    if model is not None and not isinstance(model, Embedder) and not is_backbone_name(str(model)) \
            and not Path(str(model)).expanduser().is_file() and _looks_like_path(str(model)):
        raise MissingFileError(model, "model file") if not Path(str(model)).expanduser().is_dir() else \
            CheckpointError(f"{model}: a folder, not a model checkpoint file")
    if isinstance(model, Embedder) or (model is not None and Path(str(model)).expanduser().is_file()):
        if any(v is not None for v in kwargs.values()):
            raise InputError(f"{sorted(k for k, v in kwargs.items() if v is not None)} cannot be changed on a "
                             f"trained model ({model if not isinstance(model, Embedder) else 'an Embedder'})")
        embedder = model if isinstance(model, Embedder) else load_embedder(Path(str(model)).expanduser())
        if image_size:
            embedder.set_image_size(image_size)
        if crop_pct is not None and crop_pct != embedder.preprocess.crop_pct:
            embedder.set_preprocess(embedder.preprocess.replace(crop_pct=float(crop_pct)))
        return embedder
    if model is None:
        model = "efficientnet_lite0"
    kwargs.setdefault("embed_dim", None)
    preprocess = {**(kwargs.pop("preprocess", None) or {}), **({"crop_pct": float(crop_pct)} if crop_pct else {})}
    return create_embedder(str(model), image_size=image_size, seed=seed, preprocess=preprocess or None,
                           **kwargs).eval()


def _looks_like_path(name: str) -> bool:
    """A model argument that is meant as a file: it has a folder part, a file suffix, or exists as a folder."""
    p = Path(name).expanduser()
    return p.name != name or bool(p.suffix) or name.startswith(("~", ".")) or p.is_dir()
