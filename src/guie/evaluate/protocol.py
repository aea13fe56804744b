"""Evaluation protocols on top of the metric: an explicit query/index split, or leave-one-group-out folds
(e.g. the emoji benchmark: queries from one vendor, index = the other vendors), with per-domain breakdowns."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from ..errors import InputError
from ..metrics import precision_at_k


@dataclass
class Evaluation:
    """Scores of one evaluation: overall, per fold, per domain, and per query (with neighbours)."""

    score: float
    k: int
    folds: list[dict] = field(default_factory=list)          # [{"fold", "score", "queries"}]
    per_domain: pd.DataFrame | None = None                   # domain, queries, score
    per_query: pd.DataFrame | None = None                    # query row info + precision + neighbour ids
    index_frames: dict = field(default_factory=dict)         # fold -> index metadata (for pictures)

    def summary(self) -> dict:
        out = {f"mP@{self.k}": self.score, "k": self.k, "folds": self.folds,
               "queries": int(sum(f["queries"] for f in self.folds))}
        if self.per_domain is not None:
            out["per_domain"] = self.per_domain.to_dict(orient="records")
        return out


def _run_fold(name, qdf, qemb, idf, iemb, k, missing) -> tuple[dict, pd.DataFrame]:
    res = precision_at_k(qemb, qdf["label"].to_numpy(), iemb, idf["label"].to_numpy(), k=k, missing=missing)
    kept = qdf[res.kept].reset_index(drop=True).copy()
    kept["fold"] = name
    kept["precision"] = res.per_query
    kept["n_q"] = res.n_relevant
    kept["neighbors"] = list(res.neighbors)
    kept["relevant"] = list(res.relevant)
    kept["distances"] = list(res.distances)
    return {"fold": name, "score": res.score, "queries": int(len(kept)),
            "excluded": int((~res.kept).sum())}, kept


def _finish(fold_rows, per_query_parts, k, index_frames) -> Evaluation:
    per_query = pd.concat(per_query_parts, ignore_index=True)
    # Mean over folds (each fold is a full GUIE evaluation); with one fold this is the plain mP@k.
    score = float(np.mean([f["score"] for f in fold_rows]))
    per_domain = None
    if "domain" in per_query.columns:
        per_domain = (per_query.groupby("domain", sort=True)["precision"].agg(["count", "mean"])
                      .rename(columns={"count": "queries", "mean": "score"}).reset_index())
    return Evaluation(score, k, fold_rows, per_domain, per_query, index_frames)


def evaluate_query_index(query_df: pd.DataFrame, query_emb: np.ndarray, index_df: pd.DataFrame,
                         index_emb: np.ndarray, k: int = 5, missing: str = "error") -> Evaluation:
    """GUIE evaluation with a given query set and index set (both need a `label` column)."""
    for name, df in (("query", query_df), ("index", index_df)):
        if "label" not in df.columns:
            raise InputError(f"the {name} set has no 'label' column")
    fold, part = _run_fold("all", query_df.reset_index(drop=True), query_emb, index_df.reset_index(drop=True),
                           index_emb, k, missing)
    return _finish([fold], [part], k, {"all": index_df.reset_index(drop=True)})


def evaluate_folds(df: pd.DataFrame, emb: np.ndarray, by: str, k: int = 5, missing: str = "error") -> Evaluation:
    """Leave-one-group-out: for each value v of column `by`, queries = rows with v, index = all other rows.

    The score is the mean of the folds' mP@k (the emoji benchmark uses by='vendor': 4 folds, n_q = 3).
    """
    if by not in df.columns:
        raise InputError(f"no column {by!r} to make folds from (columns: {list(df.columns)})")
    if "label" not in df.columns:
        raise InputError("evaluation needs a 'label' column")
    df = df.reset_index(drop=True)
    groups = sorted(df[by].astype(str).unique())
    if len(groups) < 2:
        raise InputError(f"column {by!r} has {len(groups)} value(s); folds need at least 2")
    folds, parts, index_frames = [], [], {}
    key = df[by].astype(str).to_numpy()
    for g in groups:
        qmask = key == g
        fold, part = _run_fold(g, df[qmask].reset_index(drop=True), emb[qmask],
                               df[~qmask].reset_index(drop=True), emb[~qmask], k, missing)
        folds.append(fold)
        parts.append(part)
        index_frames[g] = df[~qmask].reset_index(drop=True)
    return _finish(folds, parts, k, index_frames)
