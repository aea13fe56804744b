"""Evaluation apps: fold protocols, reports, and loading what to score (the metric itself is `guie.metrics`)."""
from .protocol import Evaluation, evaluate_folds, evaluate_query_index
from .report import format_table, write_report

__all__ = ["Evaluation", "evaluate_folds", "evaluate_query_index", "format_table", "write_report"]
