"""`guie demo`: the emoji benchmark end to end on the default backbone; `--universal`: the transfer table's headline
rows on every built-in benchmark."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer


def register(app: typer.Typer) -> None:
    """Add `guie demo` to the top-level app."""

    @app.command()
    def demo(out: Optional[Path] = typer.Option(None, help="where reports, results.json and the trained model go "
                                                           "(default outputs/demo, or outputs/demo-universal)"),
             cache: Optional[Path] = typer.Option(None, help="cache folder (default $GUIE_CACHE or ~/.cache/guie)"),
             full: bool = typer.Option(False, help="run every stage of the recipe (emoji: adds backbone fine-tuning, "
                                                    "~13 min more on a 2-core CPU; --universal: ~16 min more)"),
             universal: bool = typer.Option(False, help="the universal demo: emoji, glyph and icon benchmarks, "
                                                         "zero-shot and PCA-64 rows, the multi-domain recipe"),
             recipe: Optional[str] = typer.Option(None, help="training recipe: a file or a shipped recipe's name "
                                                             "(default emoji-lite0-cpu, with --universal "
                                                             "multi-domain-lite0-cpu)"),
             device: str = typer.Option("auto"), progress: bool = typer.Option(True)):
        """The emoji benchmark end to end on the default backbone: zero-shot, PCA-64, and a trained 64-d model
        (--universal: every built-in benchmark and the multi-domain recipe)."""
        from ..demo import DEMO_RECIPE, UNIVERSAL_RECIPE, run_demo, run_universal_demo

        if universal:
            run_universal_demo(out or Path("outputs/demo-universal"), cache, full=full,
                               recipe=recipe or UNIVERSAL_RECIPE, device=device, progress=progress)
        else:
            run_demo(out or Path("outputs/demo"), cache, full=full, recipe=recipe or DEMO_RECIPE, device=device,
                     progress=progress)
