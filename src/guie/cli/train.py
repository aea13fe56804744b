"""`guie train`: run a recipe's stages (torchrun for DDP)."""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from .options import ModelOptions, model_options


def register(app: typer.Typer) -> None:
    """Add `guie train` to the top-level app."""

    @app.command()
    def train(recipe: str = typer.Argument(..., help="YAML training recipe: a file, or the name of a shipped one "
                                                     "(guie recipes lists them, e.g. emoji-lite0-cpu)"),
              resume: bool = typer.Option(False, help="continue from the run folder's last checkpoint"),
              set_: Optional[List[str]] = typer.Option(None, "--set", help="override a recipe value: key.sub=value"),
              output_dir: Optional[Path] = typer.Option(None, help="run folder (default: runs/<name>)"),
              stages: Optional[str] = typer.Option(None, help="run only these stages (comma-separated names)"),
              progress: bool = typer.Option(True, help="show progress bars"),
              smoke: bool = typer.Option(False, help="prove the recipe runs: every stage a few steps with a tiny "
                                                     "random backbone of the same family on a small sample (or "
                                                     "generated images), on this machine, then the real run's cost "
                                                     "plan; nothing is kept unless --output-dir is given"),
              smoke_steps: int = typer.Option(2, min=1, help="--smoke: optimizer steps per stage")):
        """Train an embedder through a recipe's stages (torchrun --nproc_per_node N guie train ... for DDP)."""
        from ..distributed import cleanup_distributed
        from ..train.engine import train as run_training
        from ..train.recipe import load_run_config

        overrides = list(set_ or [])
        if output_dir and not smoke:
            overrides.append(f"output_dir={output_dir}")
        cfg = load_run_config(recipe, overrides)
        if stages:
            cfg.select_stages(stages.split(","))
        if smoke:
            import tempfile

            from ..train.smoke import run_smoke

            if output_dir:
                report = run_smoke(cfg, output_dir, steps=smoke_steps)
            else:
                with tempfile.TemporaryDirectory(prefix="guie-smoke-") as work:
                    report = run_smoke(cfg, Path(work), steps=smoke_steps)
            typer.echo(report.table())
            return
        try:
            final = run_training(cfg, resume=resume, progress=progress)
        finally:
            cleanup_distributed()
        typer.echo(f"model: {final}")

    @app.command("fit-pca")
    @model_options(model_help="backbone name, or a guie checkpoint whose backbone to keep")
    def fit_pca_cmd(source: Path = typer.Argument(..., help="images to fit on: manifest or folder (training images, "
                                                            "never the test classes)"),
                    out: Path = typer.Option(..., "--out", "-o", help="checkpoint to write (.pt)"),
                    dim: int = typer.Option(64, help="embedding size (<= 64)"),
                    whiten: bool = typer.Option(False, help="scale each principal axis to unit variance"),
                    where: Optional[List[str]] = typer.Option(None, help="keep rows with column=value (repeatable)"),
                    cache: Optional[Path] = typer.Option(None, help="feature cache folder (default $GUIE_CACHE)"),
                    progress: bool = typer.Option(True, "--progress/--no-progress", help="show a progress bar"),
                    opts: ModelOptions = None):
        """The zero-shot baseline as a model: backbone + a PCA head fitted on its features, written as a normal
        guie checkpoint (embed, evaluate, export and search accept it)."""
        from ..data.manifest import read_manifest, select_rows
        from ..models.embedder import save_embedder
        from ..train.pca import fit_pca_embedder

        df = select_rows(read_manifest(source), where, str(source))
        pca = fit_pca_embedder(df["path"].tolist(), opts.model, dim=dim, whiten=whiten, image_size=opts.image_size,
                               preprocess={"crop_pct": opts.crop_pct} if opts.crop_pct else None, cache_dir=cache,
                               progress=progress, batch_size=opts.batch_size,
                               **{**opts.inference, "precision": "fp32" if opts.precision == "auto" else
                                  opts.precision})
        save_embedder(pca, out, extra={"pca": {"source": str(source), "images": len(df), "where": list(where or []),
                                               "whiten": whiten}})
        typer.echo(f"wrote {out}: {pca.spec.backbone} @ {pca.preprocess.image_size}px + PCA "
                   f"{pca.backbone.num_features} -> {dim}")
