"""`guie data ...` subcommands beyond the emoji benchmark (importers, build, check, dedup, shard)."""
from __future__ import annotations

import typer


def register(data_app: typer.Typer) -> None:
    """Add the data subcommands to the `guie data` group."""
