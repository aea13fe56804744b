"""Public home of the GUIE metric: `guie.metrics.mean_precision_at_k` (implemented in guie.evaluate.metrics)."""
from .evaluate.metrics import RetrievalResult, knn_search, mean_precision_at_k, precision_at_k

__all__ = ["mean_precision_at_k", "precision_at_k", "knn_search", "RetrievalResult"]
