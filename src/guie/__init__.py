"""guie: universal image embeddings (<= 64-d) — build, train, measure with the exact GUIE metric, export, search."""
from .evaluate.metrics import mean_precision_at_k
from .models import Embedder, create_backbone, create_embedder, list_backbones, load_embedder, save_embedder

__version__ = "0.1.0"
__all__ = ["Embedder", "create_backbone", "create_embedder", "list_backbones", "load_embedder", "save_embedder",
           "mean_precision_at_k", "__version__"]
