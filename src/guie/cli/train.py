"""`guie train`: run a recipe's stages (torchrun for DDP)."""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from .common import fail


def register(app: typer.Typer) -> None:
    """Add `guie train` to the top-level app."""

    @app.command()
    def train(recipe: str = typer.Argument(..., help="YAML training recipe: a file, or the name of a shipped one "
                                                     "(guie recipes lists them, e.g. emoji-lite0-cpu)"),
              resume: bool = typer.Option(False, help="continue from the run folder's last checkpoint"),
              set_: Optional[List[str]] = typer.Option(None, "--set", help="override a recipe value: key.sub=value"),
              output_dir: Optional[Path] = typer.Option(None, help="run folder (default: runs/<name>)"),
              stages: Optional[str] = typer.Option(None, help="run only these stages (comma-separated names)"),
              progress: bool = typer.Option(True, help="show progress bars")):
        """Train an embedder through a recipe's stages (torchrun --nproc_per_node N guie train ... for DDP)."""
        from ..distributed import cleanup_distributed
        from ..train.engine import TrainingInterrupted
        from ..train.engine import train as run_training
        from ..train.recipe import load_run_config
        from ..typed_yaml import ConfigError

        overrides = list(set_ or [])
        if output_dir:
            overrides.append(f"output_dir={output_dir}")
        try:
            cfg = load_run_config(recipe, overrides)
            if stages:
                cfg.select_stages(stages.split(","))
        except ConfigError as e:
            fail(str(e))
        try:
            final = run_training(cfg, resume=resume, progress=progress)
        except TrainingInterrupted as e:
            typer.secho(str(e), fg="yellow", err=True)
            raise typer.Exit(143) from None
        except (ValueError, FileNotFoundError) as e:
            fail(str(e))
        finally:
            cleanup_distributed()
        typer.echo(f"model: {final}")
