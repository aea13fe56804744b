"""`guie recipes`: the recipes guie ships (training and data builds), loadable by name anywhere guie is installed."""
from __future__ import annotations

from typing import Optional

import typer


def register(app: typer.Typer) -> None:
    """Add `guie recipes` to the top-level app."""

    @app.command()
    def recipes(name: Optional[str] = typer.Argument(None, help="print this recipe's YAML (to copy and edit)")):
        """List the shipped recipes, each loaded and checked (guie train NAME / guie data build NAME run them), or
        print one."""
        from ..typed_yaml import find_recipe, shipped_recipes

        if name:
            typer.echo(find_recipe(name).read_text(), nl=False)
            return
        for recipe_name, path in shipped_recipes().items():
            kind = _load_any(path)
            summary = next((line.lstrip("# ").strip() for line in path.read_text().splitlines()
                            if line.startswith("#") and line.lstrip("# ").strip()), "")
            typer.echo(f"{recipe_name:30s} {kind:10s} {summary[:80]}")


def _load_any(path) -> str:
    """Load a recipe with the schema it is written for -> "train" or "data build" (ConfigError if neither fits)."""
    from ..data.builder import load_recipe
    from ..train.recipe import load_run_config
    from ..typed_yaml import ConfigError

    try:
        load_run_config(path)
        return "train"
    except ConfigError as train_error:
        try:
            load_recipe(path)
            return "data build"
        except ConfigError:
            raise train_error from None
