"""What `guie evaluate` scores: an embeddings file as it is, or a manifest/folder embedded on the fly with a model."""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from ..data.manifest import read_manifest, select_rows
from ..embedding.files import EMBEDDING_COLUMN, read_embeddings
from ..errors import InputError
from ..utils import log


def is_embeddings_file(source: Path) -> bool:
    """True for a Parquet file with an `embedding` column (what `guie embed` writes)."""
    if source.suffix not in (".parquet", ".pq") or not source.is_file():
        return False
    import pyarrow.parquet as pq

    try:
        return EMBEDDING_COLUMN in pq.read_schema(source).names
    except Exception as e:  # pyarrow's errors do not say which file
        first_line = str(e).splitlines()[0] if str(e) else ""
        raise InputError(f"{source}: cannot read Parquet ({type(e).__name__}: {first_line})") from None


def load_table(source: str | Path, model=None, where: Sequence[str] | None = None, batch_size: int = 64,
               workers: int | None = None, device=None, image_size: int | None = None,
               progress: bool = True, crop_pct: float | None = None, runtime: str = "auto",
               precision: str = "auto") -> tuple[pd.DataFrame, np.ndarray]:
    """(metadata rows, float32 [N, d]) of an embeddings file (rows kept by `where`, column=value filters), or of a
    labelled manifest/folder embedded with `model` (checkpoint, backbone name or Embedder; `image_size`, `crop_pct`
    adapt it) on `runtime` at `precision`; images that cannot be read are left out, with one warning line."""
    source = Path(source)
    if is_embeddings_file(source):
        df, emb = read_embeddings(source)
        if emb.shape[0] == 0:
            raise InputError(f"{source}: holds no embeddings (0 rows)")
        if where:
            keep = select_rows(df.assign(_row=range(len(df))), where, str(source))["_row"].to_numpy()
            df, emb = df.iloc[keep].reset_index(drop=True), emb[keep]
        return df, emb
    from ..embedding.engine import embed_images
    from ..models.embedder import resolve_embedder

    df = select_rows(read_manifest(source, require_labels=True), where, str(source))
    embedder = resolve_embedder(model, image_size=image_size, crop_pct=crop_pct)
    res = embed_images(embedder, df["path"].tolist(), batch_size=batch_size, num_workers=workers, device=device,
                       progress=progress, runtime=runtime, precision=precision)
    if res.errors:
        log.warning("%s: %d images could not be read and were left out", source, len(res.errors))
    if not np.asarray(res.ok).any():
        raise InputError(f"{source}: none of its {len(df)} images could be read")
    return df[res.ok].reset_index(drop=True), res.embeddings
