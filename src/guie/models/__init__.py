"""Models: backbones (a registry), heads, and the Embedder that joins them with their preprocessing."""
from .backbones import Backbone, create_backbone, list_backbones
from .embedder import Embedder, EmbedderSpec, create_embedder, load_embedder, resolve_embedder, save_embedder
from .heads import MAX_EMBED_DIM, ProjectionHead, fit_pca
from .preprocess import ImageNormalize, ImageTransform, PreprocessConfig

__all__ = ["Backbone", "create_backbone", "list_backbones", "Embedder", "EmbedderSpec", "create_embedder",
           "load_embedder", "resolve_embedder", "save_embedder", "MAX_EMBED_DIM", "ProjectionHead", "fit_pca",
           "ImageNormalize", "ImageTransform", "PreprocessConfig"]
