"""What every command shares: the one way a command fails on bad input."""
from __future__ import annotations

from typing import NoReturn

import typer


def fail(message: str, code: int = 2) -> NoReturn:
    """Print a one-line red `error: ...` to stderr and exit with `code` (2: bad input, as typer's own errors)."""
    typer.secho(f"error: {message}", fg="red", err=True)
    raise typer.Exit(code)
