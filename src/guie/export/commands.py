"""`guie export` and `guie check-submission`."""
from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    """Add the export commands to the top-level `guie` app."""
