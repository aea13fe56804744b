"""Validation during training: GUIE mP@5 of the current model on the recipe's held-out set(s), computed by rank 0
(on cached features when the backbone is frozen, else on the images) and shared with the other ranks."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..data.manifest import select_rows
from ..distributed import DistInfo
from ..embedding.engine import embed_images
from ..embedding.feature_store import cached_features, embed_cached_features
from ..evaluate.protocol import evaluate_folds, evaluate_query_index
from ..models.embedder import Embedder
from .data import load_validation_frame
from .frozen_features import FeatureCache
from .recipe import ValidationConfig, ValidationSet


class Validator:
    """Scores a model on `cfg`'s sets; `last` keeps each set's score of the latest call. Set frames are read once."""

    def __init__(self, cfg: ValidationConfig | None, cache_dir: Path | None, features: FeatureCache,
                 device: torch.device, dist: DistInfo):
        self.cfg, self.cache_dir, self.features = cfg, cache_dir, features
        self.num_workers, self.device, self.dist = features.num_workers, device, dist
        self.sets = cfg.all_sets() if cfg is not None else {}
        self.last: dict[str, float] = {}
        self._frames: dict = {}

    @torch.no_grad()
    def score(self, embedder: Embedder, use_features: bool) -> float | None:
        """The mean mP@5 over the sets (None when there are none) of `embedder`, which must be in eval mode; every
        rank gets rank 0's score."""
        if not self.sets:
            return None
        score = None
        if self.dist.is_main:
            self.last = {name: self._score_set(embedder, name, vset, use_features) for name, vset in self.sets.items()}
            score = float(np.mean(list(self.last.values())))
        if self.dist.enabled:
            obj = [score]
            torch.distributed.broadcast_object_list(obj, src=0)
            score = obj[0]
        return score

    def fields(self, val: float | None) -> dict:
        """Log fields of a validation result: the mean, and each set's score when there are several."""
        if val is None:
            return {}
        fields = {"val_mP@5": val}
        if len(self.last) > 1:
            fields["val_sets"] = " ".join(f"{k}={v:.4f}" for k, v in self.last.items())
            fields.update({f"val_mP@5/{k}": v for k, v in self.last.items()})
        return fields

    def summary(self, val: float | None) -> str:
        """', validation mP@5 x (set a, set b)' for the end-of-stage log line ('' without validation)."""
        if val is None:
            return ""
        msg = f", validation mP@5 {val:.4f}"
        if len(self.last) > 1:
            msg += " (" + ", ".join(f"{k} {v:.4f}" for k, v in self.last.items()) + ")"
        return msg

    def _score_set(self, embedder: Embedder, name: str, vset: ValidationSet, use_features: bool) -> float:
        if name not in self._frames:
            self._frames[name] = load_validation_frame(vset, self.cache_dir)
        df = self._frames[name]
        batch_size = self.cfg.batch_size
        if use_features:
            feats, ok = cached_features(embedder, df["path"].tolist(), self.features.cache_dir,
                                        batch_size=batch_size, num_workers=self.num_workers, device=self.device,
                                        progress=False, runtime=self.features.runtime,
                                        precision=self.features.precision)
            emb = embed_cached_features(embedder, feats[ok], self.device)
        else:
            res = embed_images(embedder, df["path"].tolist(), batch_size=batch_size,  # weights change: torch
                               num_workers=self.num_workers, device=self.device, progress=False, runtime="torch",
                               precision="fp32" if self.device.type == "cpu" else "auto")
            emb, ok = res.embeddings, res.ok
        vdf = df[ok].reset_index(drop=True)
        if vset.folds_by:
            return evaluate_folds(vdf, emb, by=vset.folds_by, missing="exclude").score
        qmask = vdf.index.isin(select_rows(vdf.reset_index(), vset.query_where, f"validation {name} query")["index"])
        imask = vdf.index.isin(select_rows(vdf.reset_index(), vset.index_where, f"validation {name} index")["index"])
        return evaluate_query_index(vdf[qmask], emb[qmask], vdf[imask], emb[imask], missing="exclude").score
