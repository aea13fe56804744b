"""Combining models: shared-head ensembles (average outputs) and model soups (average weights).

Shared head (the GUIE 1st place): members fine-tuned from one checkpoint with the 64-d class-centre head frozen (e.g.
at 224 and 280 px) embed into the same 64-d space, so their L2-normalised outputs can be averaged. Members with
different heads live in unrelated spaces, and averaging them hurts (0.669 vs 0.671 for a single model in the 1st
place's table), so `check_shared_head` refuses them unless explicitly allowed.

Soup: the element-wise mean of the weights of checkpoints with identical architecture (fine-tunes of one parent).
"""
from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from ..errors import InputError
from ..models.embedder import Embedder, EmbedderSpec, embedder_from_spec, load_embedder, save_embedder
from ..models.heads import ProjectionHead

HEAD_RTOL, HEAD_ATOL = 1e-5, 1e-6


class IncompatibleMembersError(InputError):
    """Checkpoints that cannot be ensembled or souped together; the message says which and why."""


def _head_tensors(embedder: Embedder) -> dict[str, torch.Tensor]:
    """The head's weights and float buffers (a BatchNorm's running stats count; its step counter does not)."""
    return {k: v.detach().float().cpu() for k, v in embedder.head.state_dict().items() if v.is_floating_point()}


def head_difference(a: Embedder, b: Embedder) -> float | None:
    """Max abs difference between two heads' weights, or None if their shapes differ (or one has no head)."""
    if not (isinstance(a.head, ProjectionHead) and isinstance(b.head, ProjectionHead)):
        return None
    ta, tb = _head_tensors(a), _head_tensors(b)
    if ta.keys() != tb.keys() or any(ta[k].shape != tb[k].shape for k in ta):
        return None
    return max(float((ta[k] - tb[k]).abs().max()) for k in ta)


def check_shared_head(embedders: Sequence[Embedder], names: Sequence[str] | None = None,
                      allow_different_heads: bool = False) -> None:
    """Raise IncompatibleMembersError unless all members share one projection head (allclose weights, same dim).

    With allow_different_heads=True, heads that differ (same output dim) only give a warning: the average of
    unrelated embedding spaces is usually worse than either member. Different output dims are always refused.
    """
    names = list(names or [f"member {i}" for i in range(len(embedders))])
    if len(embedders) < 2:
        return
    first, first_name = embedders[0], names[0]
    for emb, name in zip(embedders[1:], names[1:]):
        if emb.embed_dim != first.embed_dim:
            raise IncompatibleMembersError(f"{name} outputs {emb.embed_dim}-d embeddings but {first_name} outputs "
                                           f"{first.embed_dim}-d; ensemble members must share one embedding space")
        diff = head_difference(first, emb)
        if diff is None:
            raise IncompatibleMembersError(f"{name} and {first_name} have no comparable projection heads "
                                           f"({type(emb.head).__name__} vs {type(first.head).__name__})")
        shared = all(torch.allclose(a, b, rtol=HEAD_RTOL, atol=HEAD_ATOL)
                     for a, b in zip(_head_tensors(first).values(), _head_tensors(emb).values()))
        if not shared:
            msg = (f"{name} and {first_name} have different heads (max |w1 - w2| = {diff:.3g}): they embed into "
                   "different spaces, and averaging them usually scores below either member. Fine-tune members "
                   "from one checkpoint with the head frozen")
            if not allow_different_heads:
                raise IncompatibleMembersError(msg + ", or allow different heads (allow_different_heads) to average "
                                               "them anyway.")
            warnings.warn(msg + "; averaging anyway (allow_different_heads=True).", stacklevel=2)


def load_members(checkpoints: Sequence[str | Path], allow_different_heads: bool = False) -> list[Embedder]:
    """Load guie checkpoints as ensemble members (eval mode, CPU), refusing members without a shared head."""
    if not checkpoints:
        raise InputError("no checkpoint given")
    embedders = [load_embedder(p) for p in checkpoints]
    check_shared_head(embedders, [str(p) for p in checkpoints], allow_different_heads)
    return embedders


def parse_weights(text: str, n: int) -> list[float]:
    """Member weights written as comma-separated numbers ("1,2,1"), one per member of `n`."""
    try:
        weights = [float(w) for w in str(text).split(",")]
    except ValueError:
        raise InputError(f"weights must be comma-separated numbers, got {text!r}") from None
    if len(weights) != n:
        raise InputError(f"{len(weights)} weights for {n} inputs ({text!r})")
    return weights


def ensemble_embeddings(arrays: Sequence[np.ndarray], weights: Sequence[float] | None = None) -> np.ndarray:
    """The ensemble of precomputed embeddings (same rows, same dim): L2-normalise(weighted mean of L2-normalised rows).

    This equals what an exported ensemble computes, so members can be embedded once each (`guie embed`) and the
    ensemble scored without exporting it.
    """
    if not arrays:
        raise InputError("no embeddings to ensemble")
    shapes = {np.asarray(a).shape for a in arrays}
    if len(shapes) != 1:
        raise InputError("ensemble members must have embeddings of one shape (same rows and dim), "
                         f"got {sorted(shapes)}")
    weights = [1.0] * len(arrays) if weights is None else list(weights)
    if len(weights) != len(arrays):
        raise InputError(f"{len(weights)} weights for {len(arrays)} members")
    total = np.zeros(next(iter(shapes)), dtype=np.float64)
    for arr, w in zip(arrays, weights):
        a = np.asarray(arr, dtype=np.float64)
        total += w * a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)
    return (total / np.maximum(np.linalg.norm(total, axis=1, keepdims=True), 1e-12)).astype(np.float32)


def soup_embedders(embedders: Sequence[Embedder], weights: Sequence[float] | None = None,
                   names: Sequence[str] | None = None) -> Embedder:
    """Weight-space average ("model soup") of embedders with identical architecture, as a new Embedder.

    Floating-point tensors are averaged (weights normalised to sum 1); integer buffers (e.g. BatchNorm's
    num_batches_tracked) are taken from the first model. Preprocessing comes from the first model.
    """
    names = list(names or [f"model {i}" for i in range(len(embedders))])
    if len(embedders) < 2:
        raise InputError("a soup needs at least two checkpoints")
    weights = np.full(len(embedders), 1.0 / len(embedders)) if weights is None else np.asarray(weights, float)
    if len(weights) != len(embedders) or (weights < 0).any() or weights.sum() <= 0:
        raise InputError(f"soup weights must be {len(embedders)} non-negative numbers with a positive sum")
    weights = weights / weights.sum()
    first = embedders[0]
    states = [e.state_dict() for e in embedders]
    for emb, state, name in zip(embedders[1:], states[1:], names[1:]):
        if _architecture(emb.spec) != _architecture(first.spec):
            raise IncompatibleMembersError(
                f"{name} ({emb.spec.backbone}, {emb.spec.embed_dim}-d) and {names[0]} ({first.spec.backbone}, "
                f"{first.spec.embed_dim}-d) differ in architecture; a soup needs identical ones")
        if state.keys() != states[0].keys():
            raise IncompatibleMembersError(f"{name} and {names[0]} have different parameter names")
        for key, value in state.items():
            if value.shape != states[0][key].shape:
                raise IncompatibleMembersError(f"{name} and {names[0]} differ in the shape of {key}: "
                                               f"{tuple(value.shape)} vs {tuple(states[0][key].shape)}")
    if any(e.preprocess != first.preprocess for e in embedders[1:]):
        warnings.warn(f"soup members have different preprocessing; the soup uses {names[0]}'s: {first.preprocess}",
                      stacklevel=2)
    averaged = {}
    for key, value in states[0].items():
        if value.is_floating_point():
            acc = sum(float(w) * s[key].detach().double() for w, s in zip(weights, states))
            averaged[key] = acc.to(value.dtype)
        else:
            averaged[key] = value.clone()
    soup = load_embedder_like(first)
    soup.load_state_dict(averaged, strict=True)
    return soup.eval()


def _architecture(spec: EmbedderSpec) -> tuple:
    """The spec fields that fix parameter shapes and meaning (not resolution or dropout, which a soup may mix)."""
    return spec.backbone, spec.embed_dim, spec.backbone_kwargs, spec.head_norm, spec.head_hidden


def load_embedder_like(embedder: Embedder) -> Embedder:
    """A fresh Embedder with the architecture and preprocessing of `embedder` (random weights, no hub access)."""
    fresh = embedder_from_spec(embedder.spec)
    fresh.preprocess = embedder.preprocess
    return fresh


def soup_checkpoints(checkpoints: Sequence[str | Path], out: str | Path | None = None,
                     weights: Sequence[float] | None = None) -> Embedder:
    """Average the weights of guie checkpoints into one model; saved (atomically) to `out` if given."""
    embedders = [load_embedder(p) for p in checkpoints]
    soup = soup_embedders(embedders, weights, [str(p) for p in checkpoints])
    if out is not None:
        save_embedder(soup, out, extra={"soup": {"checkpoints": [str(p) for p in checkpoints],
                                                 "weights": None if weights is None else list(map(float, weights))}})
    return soup
