"""guie: universal image embeddings (<= 64-d) — build, train, measure with the exact GUIE metric, export, search."""
from .evaluate.metrics import mean_precision_at_k

__version__ = "0.1.0"
__all__ = ["Embedder", "create_backbone", "create_embedder", "list_backbones", "load_embedder", "save_embedder",
           "mean_precision_at_k", "__version__"]
_FROM_MODELS = {"Embedder", "create_backbone", "create_embedder", "list_backbones", "load_embedder", "save_embedder"}


def __getattr__(name: str):
    """Model entry points load on first use (PEP 562): `import guie` and `guie --help` stay free of torch's ~3 s
    import; `guie.create_embedder` works as if it were imported here."""
    if name in _FROM_MODELS:
        from . import models

        return getattr(models, name)
    raise AttributeError(f"module 'guie' has no attribute {name!r}")
