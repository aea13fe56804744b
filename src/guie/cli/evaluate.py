"""`guie evaluate`: the exact GUIE metric over embeddings files or manifests, with a report."""
from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer

from .common import fail
from .options import ModelOptions, model_options


def register(app: typer.Typer) -> None:
    """Add `guie evaluate` to the top-level app."""

    @app.command()
    @model_options(model=None, model_help="model for manifests (checkpoint or backbone name)", precision="fp32")
    def evaluate(embeddings: Optional[Path] = typer.Argument(None, help="one embeddings file or manifest, split by "
                                                                        "--folds-by"),
                 query: Optional[Path] = typer.Option(None, help="query embeddings/manifest"),
                 index: Optional[Path] = typer.Option(None, help="index embeddings/manifest"),
                 folds_by: Optional[str] = typer.Option(None, help="leave-one-group-out folds over this column"),
                 where: Optional[List[str]] = typer.Option(None, help="keep rows with column=value (repeatable)"),
                 k: int = typer.Option(5, help="neighbours per query (GUIE: 5)"),
                 exclude_missing: bool = typer.Option(False, help="drop queries with n_q = 0 instead of failing"),
                 out: Optional[Path] = typer.Option(None, help="folder for results.json and report.html"),
                 workers: Optional[int] = typer.Option(None),
                 progress: bool = typer.Option(True, "--progress/--no-progress", help="show a progress bar"),
                 opts: ModelOptions = None):
        """Score embeddings with the exact GUIE metric (mP@k, Euclidean k-NN) and write a report with pictures."""
        from ..evaluate.protocol import evaluate_folds, evaluate_query_index
        from ..evaluate.report import format_table, write_report
        from ..evaluate.tables import load_table

        missing = "exclude" if exclude_missing else "error"
        if embeddings is None and (query is None or index is None):
            fail("give an embeddings file with --folds-by, or both --query and --index")
        if embeddings is not None and (query is not None or index is not None):
            fail("give either one embeddings file (with --folds-by) or --query and --index, not both")
        if embeddings is not None and not folds_by:
            fail("with a single embeddings file, say how to split it into queries and index: --folds-by COLUMN "
                 "(or give --query and --index)")
        table_opts = dict(where=where, workers=workers, progress=progress, **opts.as_dict())
        if embeddings is not None:
            df, emb = load_table(embeddings, **table_opts)
            ev = evaluate_folds(df, emb, by=folds_by, k=k, missing=missing)
        else:
            qdf, qemb = load_table(query, **table_opts)
            idf, iemb = load_table(index, **table_opts)
            ev = evaluate_query_index(qdf, qemb, idf, iemb, k=k, missing=missing)
        rows = [{"fold": f["fold"], "queries": f["queries"], f"mP@{k}": f["score"]} for f in ev.folds]
        rows.append({"fold": "mean", "queries": sum(f["queries"] for f in ev.folds), f"mP@{k}": ev.score})
        typer.echo(format_table(rows, ["fold", "queries", f"mP@{k}"], title="GUIE metric"))
        if ev.per_domain is not None:
            drows = ev.per_domain.to_dict(orient="records")
            typer.echo(format_table(drows, ["domain", "queries", "score"], title="per domain"))
        if out:
            report = write_report(ev, out, title=f"guie evaluate: {embeddings or query}")
            typer.echo(f"report: {report}")
        typer.echo(json.dumps({f"mP@{k}": round(ev.score, 6)}))

    @app.command()
    @model_options(with_model=False, precision="fp32")
    def benchmark(models: List[str] = typer.Argument(..., help="checkpoints (.pt) or backbone names (raw features)"),
                  benchmarks: str = typer.Option("emoji,glyphs,icons", help="comma-separated built-in benchmarks"),
                  split: str = typer.Option("test", help="classes to score: test | val | train | all"),
                  names: Optional[str] = typer.Option(None, help="comma-separated row names (default: the paths)"),
                  cache: Optional[Path] = typer.Option(None, help="benchmark and feature cache folder"),
                  out: Optional[Path] = typer.Option(None, help="write the table as JSON here"),
                  progress: bool = typer.Option(True, "--progress/--no-progress", help="show a progress bar"),
                  opts: ModelOptions = None):
        """The transfer table: mP@5 of each model on each built-in benchmark (leave-one-style-out, one split's
        classes); benchmarks are built on first use."""
        from ..evaluate.benchmarks import transfer_table
        from ..evaluate.report import format_table
        from ..utils import atomic_write_json

        bench = [b.strip() for b in benchmarks.split(",") if b.strip()]
        labels = [n.strip() for n in names.split(",")] if names else list(models)
        if len(labels) != len(models):
            fail(f"--names gives {len(labels)} names for {len(models)} models")
        table = transfer_table(dict(zip(labels, models)), bench, split, cache, progress=progress,
                               **opts.as_dict(exclude=("model",)))
        rows = table.to_dict(orient="records")
        typer.echo(format_table(rows, ["model", "dim", *bench, "mean"], title=f"mP@5 on {split} classes"))
        if out:
            atomic_write_json({"split": split, "rows": rows}, out)

    @app.command("check-precision")
    def check_precision(model: str = typer.Argument(..., metavar="MODEL", help="guie checkpoint (.pt) (or a backbone "
                                                    "name, with --no-record)"),
                        checked: str = typer.Argument(..., metavar="PRECISION", help="bf16 or int8 (the "
                                                      "checkpoint's int8 model, made by guie quantize)"),
                        benchmarks: str = typer.Option("emoji,glyphs,icons", help="comma-separated built-in "
                                                                                 "benchmarks: one domain each"),
                        split: str = typer.Option("test", help="classes to score: test | val | train | all"),
                        record: bool = typer.Option(True, "--record/--no-record", help="store the result with the "
                                                    "model (what lets --precision auto choose it)"),
                        cache: Optional[Path] = typer.Option(None, help="benchmark cache folder"),
                        batch_size: int = typer.Option(64, help="images per forward"),
                        progress: bool = typer.Option(True, "--progress/--no-progress", help="show a progress bar"),
                        out: Optional[Path] = typer.Option(None, help="write the check as JSON here")):
        """Measure what a model loses in mP@5 when its forward runs in bf16 or int8 instead of fp32 (OpenVINO, the same
        pixels), per benchmark domain, and record it with the model: --precision auto picks bf16/int8 only where
        every domain lost at most 0.002."""
        from ..evaluate.precision import measure_precision, record_precision_check
        from ..evaluate.report import format_table
        from ..utils import atomic_write_json

        bench = [b.strip() for b in benchmarks.split(",") if b.strip()]
        check = measure_precision(model, checked.strip().lower(), bench, split, cache, batch_size, progress)
        cols = ["domain", "images", "fp32", check.precision, "loss", "max |diff|", "mean cos"]
        typer.echo(format_table(check.table_rows(), cols, title=f"mP@5, {split} classes: fp32 vs {check.precision}"))
        verdict = "passes" if check.passes else "fails"
        typer.echo(f"{check.precision} {verdict}: largest loss {max(check.domains.values()):+.4f} "
                   f"(tolerance {check.tolerance})")
        if record:
            typer.echo(f"recorded in {record_precision_check(model, check)}")
        if out:
            atomic_write_json(check.to_record(), out)

