"""`guie demo`: the emoji benchmark end to end on the default backbone."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .common import fail


def register(app: typer.Typer) -> None:
    """Add `guie demo` to the top-level app."""

    @app.command()
    def demo(out: Path = typer.Option(Path("outputs/demo"), help="where reports and the trained model go"),
             cache: Optional[Path] = typer.Option(None, help="cache folder (default $GUIE_CACHE or ~/.cache/guie)"),
             full: bool = typer.Option(False, help="run every stage of the recipe (the default one adds backbone "
                                                    "fine-tuning: ~20 min more on a 2-core CPU)"),
             recipe: Optional[str] = typer.Option(None, help="training recipe: a file or a shipped recipe's name "
                                                             "(default emoji-lite0-cpu)"),
             device: str = typer.Option("auto"), progress: bool = typer.Option(True)):
        """The emoji benchmark end to end on the default backbone: zero-shot, PCA-64, and a trained 64-d model."""
        from ..demo import DEMO_RECIPE, run_demo
        from ..typed_yaml import ConfigError

        try:
            run_demo(out, cache, full=full, recipe=recipe or DEMO_RECIPE,
                     device=None if device == "auto" else device, progress=progress)
        except (FileNotFoundError, ConfigError) as e:
            fail(str(e))
