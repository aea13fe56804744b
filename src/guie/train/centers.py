"""The class centres of a run: the margin loss's centre matrix as it passes from stage to stage.

A stage whose label space is the previous one's (or the init checkpoint's) keeps the loss as it is. When the label
space changed (datasets added or removed), a new matrix is made in which the classes known before keep their
centres and new classes start random, unless the stage asks for `new_centers` (all random); `lock_kept_centers`
then holds the kept rows exactly fixed through every optimizer step.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from ..errors import InputError
from ..losses import LOSSES, create_loss
from ..utils import log
from .data import StageData
from .recipe import StageConfig


def carry_centers(old_loss: nn.Module, old_names, new_loss: nn.Module, new_names) -> np.ndarray | None:
    """Copy the centres of classes present in both label spaces (matched by namespaced label) from old_loss into
    new_loss, sub-centres included. Returns the boolean mask of new classes that got an old centre, or None when
    the two spaces share no class (or their sub-centre counts differ)."""
    if old_loss.sub_centers != new_loss.sub_centers or old_loss.embed_dim != new_loss.embed_dim:
        return None
    index = {str(n): i for i, n in enumerate(old_names)}
    pairs = [(j, index[str(n)]) for j, n in enumerate(new_names) if str(n) in index]
    if not pairs:
        return None
    k = new_loss.sub_centers
    new_rows = torch.as_tensor([j * k + s for j, _ in pairs for s in range(k)])
    old_rows = torch.as_tensor([i * k + s for _, i in pairs for s in range(k)])
    with torch.no_grad():
        new_loss.weight[new_rows] = old_loss.weight.detach().to(new_loss.weight.device)[old_rows]
    kept = np.zeros(len(new_names), dtype=bool)
    kept[[j for j, _ in pairs]] = True
    return kept


def _same_labels(a, b) -> bool:
    return np.array_equal(np.asarray(a, dtype=str), np.asarray(b, dtype=str))


class ClassCenters:
    """The run's margin loss (`loss`, its centre matrix) and label space (`class_names`), on `device`.

    `init` is the `extra` of a model.init_checkpoint that stored centres: a first stage on the same label space
    starts from them. `kept` holds (row numbers, their values) of locked rows: an index, not a boolean mask, because
    assigning through a mask waits for the GPU at every step.
    """

    def __init__(self, device: torch.device, embed_dim: int, init: dict | None = None, init_source=None,
                 verbose: bool = True):
        self.device, self.embed_dim, self.verbose = device, embed_dim, verbose
        self.init, self.init_source = init, init_source
        self.loss: nn.Module | None = None
        self.class_names: np.ndarray | None = None
        self.kept: tuple[torch.Tensor, torch.Tensor] | None = None

    def _from_init(self) -> tuple[nn.Module, np.ndarray]:
        """The init checkpoint's loss and labels."""
        init = self.init
        prev = create_loss(init["loss_name"], self.embed_dim, len(init["class_names"]), sub_centers=init["sub_centers"])
        prev.load_state_dict(init["centers"])
        if self.verbose:
            log.info("class centres from %s (%d classes)", self.init_source, len(init["class_names"]))
        return prev, np.asarray(init["class_names"], dtype=object)

    def start_stage(self, stage: StageConfig, data: StageData) -> None:
        """The stage's loss: the previous one kept, or a new matrix with the known classes' centres carried over."""
        lc = stage.loss
        prev, prev_names = self.loss, self.class_names
        if prev is None and self.init is not None and not stage.new_centers:
            prev, prev_names = self._from_init()
        same_space = prev_names is not None and _same_labels(prev_names, data.class_names)
        self.kept = None
        carry = prev is not None and not stage.new_centers and prev.sub_centers == lc.sub_centers
        if carry and same_space and type(prev) is LOSSES.get(lc.name):
            self.loss, self.class_names = prev, np.asarray(prev_names, dtype=object)
        else:
            self.loss = create_loss(lc.name, self.embed_dim, data.num_classes, scale=lc.scale, margin=lc.margin,
                                    sub_centers=lc.sub_centers)
            self.class_names = data.class_names
            kept = carry_centers(prev, prev_names, self.loss, data.class_names) if carry else None
            if kept is not None and self.verbose:
                log.info("class centres: %d kept from the previous stage%s, %d new", int(kept.sum()),
                         " (locked)" if stage.lock_kept_centers else "", int((~kept).sum()))
            if kept is not None and stage.lock_kept_centers and kept.any():
                self.kept = self.kept_rows(np.repeat(kept, self.loss.sub_centers))
        self.loss.scale = lc.scale
        self.loss.to(self.device)
        if self.kept is not None:
            self.kept = tuple(t.to(self.device) for t in self.kept)

    def restore(self, state: dict) -> None:
        """The loss and labels of a checkpoint (`state_dict()` output)."""
        self.loss = create_loss(state["loss_name"], self.embed_dim, len(state["class_names"]),
                                sub_centers=state["sub_centers"])
        self.loss.load_state_dict(state["loss"])
        self.loss.to(self.device)
        self.class_names = np.asarray(state["class_names"], dtype=object)

    def resume_stage(self, stage: StageConfig, data: StageData, state: dict) -> None:
        """The loss of a stage interrupted mid-way, from its checkpoint; refused if the data's classes changed."""
        self.restore(state)
        if not _same_labels(self.class_names, data.class_names):
            raise InputError(f"stage {stage.name!r}: the data's classes changed since the checkpoint; use a new "
                             f"output_dir")
        self.class_names = data.class_names
        self.loss.scale = stage.loss.scale
        mask = state.get("kept_centers_mask")
        self.kept = None if mask is None else self.kept_rows(mask)

    def kept_rows(self, row_mask) -> tuple[torch.Tensor, torch.Tensor]:
        """(row numbers, row values) of the centre matrix's rows where `row_mask` is true, on its device."""
        weight = self.loss.weight.detach()
        rows = torch.as_tensor(np.flatnonzero(np.asarray(row_mask)), device=weight.device)
        return rows, weight[rows].clone()

    def restore_kept(self) -> None:
        """Put the locked centres back after an optimizer step (exact, whatever the optimizer's momentum or weight
        decay did to them)."""
        if self.kept is not None:
            rows, values = self.kept
            with torch.no_grad():
                self.loss.weight.index_copy_(0, rows, values)

    def state_dict(self, loss_name: str) -> dict:
        """What a resumable checkpoint stores of the centres (`restore` reads it)."""
        mask = None
        if self.kept is not None:
            mask = torch.zeros(self.loss.weight.shape[0], dtype=torch.bool)
            mask[self.kept[0].cpu()] = True
        return {"loss": self.loss.state_dict(), "loss_name": loss_name, "sub_centers": self.loss.sub_centers,
                "class_names": list(map(str, self.class_names)), "kept_centers_mask": mask}

    def model_extra(self) -> dict:
        """What a saved model stores of the centres (a later run's model.init_checkpoint reads it)."""
        return {"centers": self.loss.state_dict(), "class_names": list(map(str, self.class_names)),
                "loss_name": type(self.loss).__name__.removesuffix("Loss").lower(),
                "sub_centers": self.loss.sub_centers}
