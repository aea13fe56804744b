"""Image search: named, updatable indexes (`ImageIndex`: metadata in SQLite, vectors in faiss or Milvus), filled
from folders, manifests or shards (`ingest`), served over HTTP with a web page (`app`)."""
from .image_index import Hit, ImageIndex, SearchIndexError

__all__ = ["Hit", "ImageIndex", "SearchIndexError"]
