"""What a training step minimises: the stage's margin loss over the labelled rows, plus extra terms.

`TrainModule` (the module DDP wraps) runs the model on a `Batch` and adds the terms. A term is an `Objective`: one
class per training objective, each deciding from the batch whether it applies, so a new objective is one class
(the distillation terms live in `guie.train.distill`) and the step loop does not change.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..models.embedder import Embedder
from .batches import Batch


@dataclass
class HeadOutput:
    """The head's output for every row of a batch ([B + M, d], before L2 normalisation).

    embeddings: as trained (dropout active in train mode); `clean`: the same rows without dropout, computed only
    when an active term asks for it (`Objective.needs_clean`).
    """

    embeddings: torch.Tensor
    clean: torch.Tensor | None = None


class Objective(nn.Module):
    """An extra loss term: `forward(out, batch)` returns its weighted value, added to the margin loss."""

    needs_clean = False  # whether the term reads `HeadOutput.clean`

    def applies(self, batch: Batch) -> bool:
        """Whether this batch carries what the term reads (e.g. teacher embeddings, mirrored rows)."""
        return True

    def forward(self, out: HeadOutput, batch: Batch) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError


class TrainModule(nn.Module):
    """Embedder head (+ backbone unless the batch holds features) + margin loss + extra terms -> one loss.

    samples=N > 1 is multi-sample dropout (the GUIE 3rd place; Inoue 2019): the head runs N times on the same
    features, each with its own dropout mask, and the margin loss is the mean of the N losses; the backbone runs once.
    The extra terms read the first sample. At inference (no dropout) the N copies are one and the same.
    """

    def __init__(self, embedder: Embedder, loss: nn.Module, terms: Sequence[Objective] = (), samples: int = 1):
        super().__init__()
        self.embedder, self.loss = embedder, loss
        self.terms = nn.ModuleList(terms)
        self.samples = int(samples)

    def forward(self, batch: Batch, features_given: bool) -> torch.Tensor:
        """The step's loss: margin loss on the labelled rows (mirrored rows past them feed the terms alone)."""
        feats = batch.inputs if features_given else self.embedder.forward_features(batch.inputs)
        active = [term for term in self.terms if term.applies(batch)]
        head = self.embedder.head
        if any(term.needs_clean for term in active):
            # the image-mirror similarity is read without dropout: two independent dropout masks would make every
            # image look unlike its own mirror, and the term would push the clean similarities up, not down
            normed = head.norm(feats.float())
            out = HeadOutput(head.proj(head.dropout(normed)), head.proj(normed))
        else:
            out = HeadOutput(head(feats.float()))
        loss = self.loss(out.embeddings[:batch.size], batch.targets)
        if self.samples > 1:
            feats_labelled = feats[:batch.size].float()
            for _ in range(self.samples - 1):
                loss = loss + self.loss(head(feats_labelled), batch.targets)
            loss = loss / self.samples
        for term in active:
            loss = loss + term(out, batch)
        return loss
