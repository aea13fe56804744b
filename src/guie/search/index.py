"""Image search over an embeddings file: a FAISS index saved next to its metadata, queried with images or vectors.

`Flat` (the default) is exact Euclidean search, the GUIE metric's own neighbour rule; any FAISS factory string
(e.g. "HNSW32", "IVF1024,Flat") trades exactness for speed on millions of images.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from ..utils import atomic_write_bytes, atomic_write_json, save_parquet_atomic

INDEX_FILE, META_FILE, INFO_FILE = "index.faiss", "metadata.parquet", "index.json"


@dataclass
class SearchHits:
    """Top-k results per query: distances [Q, k], positions [Q, k] (-1 where fewer found), metadata rows."""

    distances: np.ndarray
    positions: np.ndarray
    rows: list[pd.DataFrame]


class EmbeddingIndex:
    """A FAISS index (L2) over embeddings plus the metadata of each row (path, label, ...)."""

    def __init__(self, index, metadata: pd.DataFrame, info: dict):
        self.index, self.metadata, self.info = index, metadata.reset_index(drop=True), info

    @property
    def dim(self) -> int:
        return int(self.index.d)

    def __len__(self) -> int:
        return int(self.index.ntotal)

    @classmethod
    def build(cls, embeddings: np.ndarray, metadata: pd.DataFrame, factory: str = "Flat",
              source: str | None = None) -> EmbeddingIndex:
        """Index `embeddings` [N, d] (Euclidean); IVF/PQ factories are trained on the same vectors first."""
        import faiss

        x = np.ascontiguousarray(embeddings, dtype=np.float32)
        if x.ndim != 2 or len(x) == 0:
            raise ValueError(f"need a non-empty [N, d] embedding matrix, got shape {x.shape}")
        if len(metadata) != len(x):
            raise ValueError(f"{len(x)} embeddings but {len(metadata)} metadata rows")
        try:
            index = faiss.index_factory(x.shape[1], factory, faiss.METRIC_L2)
        except RuntimeError as e:
            raise ValueError(f"FAISS cannot build {factory!r}: {str(e).splitlines()[0]}") from None
        if not index.is_trained:
            index.train(x)
        index.add(x)
        return cls(index, metadata, {"factory": factory, "dim": int(x.shape[1]), "size": int(len(x)),
                                     "source": source})

    @classmethod
    def from_embeddings_file(cls, path: str | Path, factory: str = "Flat") -> EmbeddingIndex:
        """Index a `guie embed` output file."""
        from ..embedding.files import read_embeddings

        df, emb = read_embeddings(path)
        return cls.build(emb, df, factory, source=str(path))

    def save(self, folder: str | Path) -> Path:
        """Write index.faiss, metadata.parquet and index.json into `folder` (each atomically)."""
        import faiss

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(faiss.serialize_index(self.index).tobytes(), folder / INDEX_FILE)
        save_parquet_atomic(self.metadata, folder / META_FILE)
        atomic_write_json(self.info, folder / INFO_FILE)
        return folder

    @classmethod
    def load(cls, folder: str | Path) -> EmbeddingIndex:
        """Read an index folder written by `save`."""
        import faiss

        folder = Path(folder)
        for name in (INDEX_FILE, META_FILE, INFO_FILE):
            if not (folder / name).is_file():
                raise FileNotFoundError(f"{folder}: not a guie search index (missing {name})")
        index = faiss.deserialize_index(np.frombuffer((folder / INDEX_FILE).read_bytes(), dtype=np.uint8))
        return cls(index, pd.read_parquet(folder / META_FILE), json.loads((folder / INFO_FILE).read_text()))

    def search(self, queries: np.ndarray, k: int = 5) -> SearchHits:
        """k nearest rows of each query vector [Q, d] by Euclidean distance."""
        q = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
        if q.shape[1] != self.dim:
            raise ValueError(f"query dim {q.shape[1]} != index dim {self.dim} (was the index built with this model?)")
        dist, pos = self.index.search(q, min(k, len(self)))
        rows = [self.metadata.iloc[p[p >= 0]].assign(distance=np.sqrt(np.maximum(d[p >= 0], 0)))
                for d, p in zip(dist, pos)]
        return SearchHits(np.sqrt(np.maximum(dist, 0)), pos, rows)
