"""Image search: FAISS indexes over guie embeddings files."""
from .index import EmbeddingIndex, SearchHits

__all__ = ["EmbeddingIndex", "SearchHits"]
