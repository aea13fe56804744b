"""A run's files on disk: the resumable checkpoint (model, centres, optimizer, step, sampler position, RNG), the
per-stage model files, and the RNG state they carry so a resumed run repeats the uninterrupted one bit for bit."""
from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch

from ..errors import InputError
from ..utils import atomic_save

CHECKPOINT_VERSION = 1


def stage_model_path(run_dir: Path, index: int, stage_name: str) -> Path:
    """Where a run keeps the model as it stood at the end of stage `index` (model.pt is always the latest)."""
    return Path(run_dir) / f"model-stage-{index:02d}-{stage_name}.pt"


def rng_state() -> dict:
    """The state of every RNG a run draws from (torch, numpy, python; CUDA when present)."""
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore `rng_state()` output."""
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    """Seed python's, numpy's and torch's global RNGs."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def write_checkpoint(state: dict, ckpt_dir: Path, tag: str | None = None) -> None:
    """Write `state` atomically as ckpt_dir/last.pt (and as <tag>.pt, a stage's end kept for good)."""
    atomic_save(state, ckpt_dir / "last.pt")
    if tag:
        atomic_save(state, ckpt_dir / f"{tag}.pt")


def read_last_checkpoint(ckpt_dir: Path, stage_names: list[str]) -> dict | None:
    """The run's last checkpoint, or None when there is none; refused when it was written by another checkpoint
    version or another recipe's stages."""
    path = ckpt_dir / "last.pt"
    if not path.exists():
        return None
    state = torch.load(path, map_location="cpu", weights_only=False)
    if state.get("version") != CHECKPOINT_VERSION:
        raise InputError(f"{path}: checkpoint version {state.get('version')} is not {CHECKPOINT_VERSION}; use a new "
                         f"output_dir")
    if state["stage_name"] not in stage_names or stage_names.index(state["stage_name"]) != state["stage_index"]:
        raise InputError(f"{path}: checkpoint is from stage {state['stage_name']!r}, which is not stage "
                         f"{state['stage_index']} of this recipe {stage_names}; use a new output_dir")
    return state
