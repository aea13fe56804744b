"""Evaluation: the exact GUIE metric, fold protocols, and reports."""
from .metrics import RetrievalResult, knn_search, mean_precision_at_k, precision_at_k
from .protocol import Evaluation, evaluate_folds, evaluate_query_index
from .report import format_table, write_report

__all__ = ["RetrievalResult", "knn_search", "mean_precision_at_k", "precision_at_k", "Evaluation",
           "evaluate_folds", "evaluate_query_index", "format_table", "write_report"]
