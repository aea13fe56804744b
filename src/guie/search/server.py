"""`guie search serve`: an HTTP image-search service (FastAPI) over a saved index and the model that made it.

    GET  /health            index size, dimension, factory, model
    POST /search?k=5        multipart `files` (one or more images) -> the k nearest indexed images of each
    POST /embed             multipart `files` -> their embeddings

An image that cannot be decoded is answered with HTTP 400 and a one-line reason naming the upload, never a 500.
The model and the index are loaded once, when the app is created; requests are embedded in one batch each.
(No `from __future__ import annotations` here: FastAPI reads the endpoint annotations at run time.)
"""
import io
import math
import threading
from pathlib import Path
from typing import List

from fastapi import FastAPI, File, HTTPException, Query, UploadFile

from ..embedding.engine import embed_decoded
from ..imaging.io import ImageLoadError, load_image
from ..models.embedder import resolve_embedder
from .index import EmbeddingIndex

MAX_UPLOAD_BYTES = 50 * 2**20


def _json_value(value):
    """Metadata cells as JSON: numpy scalars to Python, NaN to null."""
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


def create_app(index: EmbeddingIndex | str | Path, model, max_k: int = 100):
    """A FastAPI app answering image queries against `index` with `model` (Embedder, checkpoint or backbone name).

    The model must be the one that produced the index's embeddings: its output dimension is checked here.
    """
    index = index if isinstance(index, EmbeddingIndex) else EmbeddingIndex.load(index)
    embedder = resolve_embedder(model).eval()
    if embedder.embed_dim != index.dim:
        raise ValueError(f"model outputs {embedder.embed_dim}-d embeddings but the index holds {index.dim}-d ones: "
                         "serve the index with the model that built it")
    lock = threading.Lock()  # FastAPI runs sync endpoints in a thread pool; one forward at a time keeps memory flat
    app = FastAPI(title="guie image search", version="1")

    def embed_uploads(files: List[UploadFile]):
        if not files:
            raise HTTPException(400, "no images uploaded (multipart field 'files')")
        images = []
        for f in files:
            data = f.file.read(MAX_UPLOAD_BYTES + 1)
            if len(data) > MAX_UPLOAD_BYTES:
                raise HTTPException(413, f"{f.filename}: upload larger than {MAX_UPLOAD_BYTES // 2**20} MiB")
            if not data:
                raise HTTPException(400, f"{f.filename}: empty upload")
            try:
                images.append(embedder.transform(load_image(io.BytesIO(data))))  # resized outside the lock
            except ImageLoadError as e:
                raise HTTPException(400, f"{f.filename}: {e.reason}") from None
        with lock:
            return embed_decoded(embedder, images)

    @app.get("/health")
    def health():
        """Liveness and what is being served."""
        return {"status": "ok", "size": len(index), "dim": index.dim, "factory": index.info.get("factory"),
                "model": str(model) if isinstance(model, (str, Path)) else type(model).__name__}

    @app.post("/search")
    def search(files: List[UploadFile] = File(...), k: int = Query(5, ge=1)):
        """The k nearest indexed images of each uploaded image (Euclidean distance, nearest first)."""
        vectors = embed_uploads(files)
        hits = index.search(vectors, min(k, max_k, len(index)))
        return {"results": [
            {"query": f.filename,
             "hits": [{c: _json_value(v) for c, v in row.items()} for row in rows.to_dict(orient="records")]}
            for f, rows in zip(files, hits.rows)]}

    @app.post("/embed")
    def embed(files: List[UploadFile] = File(...)):
        """The embedding of each uploaded image."""
        vectors = embed_uploads(files)
        return {"embeddings": [{"file": f.filename, "vector": v.tolist()} for f, v in zip(files, vectors)]}

    return app
