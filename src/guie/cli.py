"""The `guie` command: a thin typer layer over the library (every command is a library call)."""
from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import List, Optional

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="guie: universal image embeddings (<= 64-d): embed, evaluate with the exact GUIE mP@5, "
                       "train, export, search.")
data_app = typer.Typer(no_args_is_help=True, help="Datasets: benchmarks, importers, checks, shards.")
app.add_typer(data_app, name="data")


def _fail(message: str) -> None:
    typer.secho(f"error: {message}", fg="red", err=True)
    raise typer.Exit(2)


def _load_table(source: Path, model: Optional[str], where, batch_size, workers, device, image_size, progress=True):
    """An embeddings Parquet file as is, or a manifest/folder embedded on the fly with `model`."""
    from .data.manifest import filter_rows, read_manifest
    from .embed import EMBEDDING_COLUMN, embed_images, read_embeddings

    if source.suffix in (".parquet", ".pq") and source.is_file():
        import pyarrow.parquet as pq

        if EMBEDDING_COLUMN in pq.read_schema(source).names:
            df, emb = read_embeddings(source)
            if where:
                keep = filter_rows(df.assign(_row=range(len(df))), where)["_row"].to_numpy()
                df, emb = df.iloc[keep].reset_index(drop=True), emb[keep]
            return df, emb
    from .models.embedder import resolve_embedder

    df = filter_rows(read_manifest(source, require_labels=True), where)
    embedder = resolve_embedder(model, image_size=image_size)
    res = embed_images(embedder, df["path"].tolist(), batch_size=batch_size, num_workers=workers, device=device,
                       progress=progress)
    if res.errors:
        typer.echo(f"{source}: {len(res.errors)} images could not be read and were left out", err=True)
    return df[res.ok].reset_index(drop=True), res.embeddings


@app.command()
def embed(source: Path = typer.Argument(..., help="image folder, or manifest (.csv/.parquet with a 'path' column)"),
          out: Path = typer.Option(..., "--out", "-o", help="output embeddings .parquet"),
          model: str = typer.Option("efficientnet_lite0", help="guie checkpoint (.pt) or backbone name"),
          embed_dim: Optional[int] = typer.Option(None, help="head size for a fresh backbone (default: raw features)"),
          features: bool = typer.Option(False, help="write backbone features instead of the head's embedding"),
          image_size: Optional[int] = typer.Option(None, help="input resolution (default: the model's)"),
          batch_size: int = typer.Option(64), workers: Optional[int] = typer.Option(
              None, help="decode processes (default: 0 on CPU, decoding between forwards; cores-1 on GPU)"),
          device: str = typer.Option("auto"), shard_size: int = typer.Option(4096, help="rows per resumable shard"),
          decode: str = typer.Option("cpu", help="cpu (PIL) or gpu (JPEGs decoded on the model's device)"),
          compile: bool = typer.Option(False, "--compile", help="torch.compile the model (long runs on GPU)"),
          where: Optional[List[str]] = typer.Option(None, help="keep rows with column=value (repeatable)"),
          overwrite: bool = typer.Option(False, help="discard shards of an earlier run with another model"),
          progress: bool = typer.Option(True, "--progress/--no-progress", help="show a progress bar")):
    """Embed images into a Parquet file (manifest columns + 'embedding'); resumes an interrupted run."""
    from .data.manifest import ManifestError, filter_rows, read_manifest
    from .embed import ResumeError, embed_to_file
    from .models.embedder import resolve_embedder

    try:
        df = filter_rows(read_manifest(source), where)
        if df.empty:
            _fail(f"{source}: no rows left after --where {' '.join(where or [])}")
        embedder = resolve_embedder(model, embed_dim=embed_dim, image_size=image_size)
        from .train.distributed import init_distributed

        dist = init_distributed(device)  # under torchrun: one process per GPU, shards split over the ranks
        dev = dist.device if dist.enabled else (None if device == "auto" else device)
        kept, emb, errors = embed_to_file(embedder, df, out, batch_size=batch_size, num_workers=workers,
                                          device=dev, features=features,
                                          shard_size=shard_size, overwrite=overwrite, decode=decode,
                                          compile=compile, progress=progress, rank=dist.rank,
                                          world_size=dist.world_size)
        if not dist.is_main:
            return
    except (ManifestError, ResumeError, ValueError, FileNotFoundError) as e:
        _fail(str(e))
    typer.echo(f"wrote {len(kept)} embeddings of dim {emb.shape[1]} to {out}")
    if errors:
        typer.echo(f"skipped {len(errors)} unreadable images (listed in {out}.failed.csv)", err=True)


@app.command()
def evaluate(embeddings: Optional[Path] = typer.Argument(None, help="one embeddings file or manifest, split by --folds-by"),
             query: Optional[Path] = typer.Option(None, help="query embeddings/manifest"),
             index: Optional[Path] = typer.Option(None, help="index embeddings/manifest"),
             folds_by: Optional[str] = typer.Option(None, help="leave-one-group-out folds over this column"),
             model: Optional[str] = typer.Option(None, help="model for manifests (checkpoint or backbone name)"),
             where: Optional[List[str]] = typer.Option(None, help="keep rows with column=value (repeatable)"),
             k: int = typer.Option(5, help="neighbours per query (GUIE: 5)"),
             exclude_missing: bool = typer.Option(False, help="drop queries with n_q = 0 instead of failing"),
             out: Optional[Path] = typer.Option(None, help="folder for results.json and report.html"),
             image_size: Optional[int] = typer.Option(None), batch_size: int = typer.Option(64),
             workers: Optional[int] = typer.Option(None), device: str = typer.Option("auto"),
             progress: bool = typer.Option(True, "--progress/--no-progress", help="show a progress bar")):
    """Score embeddings with the exact GUIE metric (mP@k, Euclidean k-NN) and write a report with pictures."""
    from .data.manifest import ManifestError
    from .evaluate.protocol import evaluate_folds, evaluate_query_index
    from .evaluate.report import format_table, write_report

    dev = None if device == "auto" else device
    missing = "exclude" if exclude_missing else "error"
    if embeddings is None and (query is None or index is None):
        _fail("give an embeddings file with --folds-by, or both --query and --index")
    if embeddings is not None and (query is not None or index is not None):
        _fail("give either one embeddings file (with --folds-by) or --query and --index, not both")
    if embeddings is not None and not folds_by:
        _fail("with a single embeddings file, say how to split it into queries and index: --folds-by COLUMN "
              "(or give --query and --index)")
    try:
        if embeddings is not None:
            df, emb = _load_table(embeddings, model, where, batch_size, workers, dev, image_size, progress)
            ev = evaluate_folds(df, emb, by=folds_by, k=k, missing=missing)
        else:
            qdf, qemb = _load_table(query, model, where, batch_size, workers, dev, image_size, progress)
            idf, iemb = _load_table(index, model, where, batch_size, workers, dev, image_size, progress)
            ev = evaluate_query_index(qdf, qemb, idf, iemb, k=k, missing=missing)
    except (ManifestError, ValueError, FileNotFoundError) as e:
        _fail(str(e))
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
def train(recipe: Path = typer.Argument(..., help="YAML training recipe (see configs/)"),
          resume: bool = typer.Option(False, help="continue from the run folder's last checkpoint"),
          set_: Optional[List[str]] = typer.Option(None, "--set", help="override a recipe value: key.sub=value"),
          output_dir: Optional[Path] = typer.Option(None, help="run folder (default: runs/<name>)"),
          stages: Optional[str] = typer.Option(None, help="run only these stages (comma-separated names)"),
          progress: bool = typer.Option(True, help="show progress bars")):
    """Train an embedder through a recipe's stages (torchrun --nproc_per_node N guie train ... for DDP)."""
    from .config import ConfigError
    from .train.config import load_run_config
    from .train.engine import TrainingInterrupted, train as run_training

    overrides = list(set_ or [])
    if output_dir:
        overrides.append(f"output_dir={output_dir}")
    try:
        cfg = load_run_config(recipe, overrides)
        if stages:
            cfg.select_stages(stages.split(","))
    except ConfigError as e:
        _fail(str(e))
    try:
        final = run_training(cfg, resume=resume, progress=progress)
    except TrainingInterrupted as e:
        typer.secho(str(e), fg="yellow", err=True)
        raise typer.Exit(143)
    except (ValueError, FileNotFoundError) as e:
        _fail(str(e))
    finally:
        from .train.distributed import cleanup_distributed

        cleanup_distributed()
    typer.echo(f"model: {final}")


@data_app.command("emoji")
def data_emoji(cache: Optional[Path] = typer.Option(None, help="cache folder (default $GUIE_CACHE or ~/.cache/guie)"),
               force: bool = typer.Option(False, help="fetch and rebuild even if present")):
    """Fetch the emoji cross-vendor benchmark with npm and write its manifest."""
    from .data.emoji import build_emoji_benchmark
    from .data.manifest import read_manifest

    manifest = build_emoji_benchmark(cache, force=force)
    df = read_manifest(manifest)
    counts = df.drop_duplicates("label")["split"].value_counts().to_dict()
    typer.echo(f"{manifest}: {len(df)} images, {df['label'].nunique()} classes x {df['vendor'].nunique()} vendors; "
               f"classes per split {counts}")


@app.command()
def demo(out: Path = typer.Option(Path("outputs/demo"), help="where reports and the trained model go"),
         cache: Optional[Path] = typer.Option(None, help="cache folder (default $GUIE_CACHE or ~/.cache/guie)"),
         full: bool = typer.Option(False, help="run every stage of the recipe (the default one adds backbone "
                                                "fine-tuning: ~20 min more on a 2-core CPU)"),
         recipe: Optional[Path] = typer.Option(None, help="training recipe (default configs/emoji-lite0-cpu.yaml)"),
         device: str = typer.Option("auto"), progress: bool = typer.Option(True)):
    """The emoji benchmark end to end on the default backbone: zero-shot, PCA-64, and a trained 64-d model."""
    from .demo import DEMO_RECIPE, run_demo

    try:
        run_demo(out, cache, full=full, recipe=recipe or DEMO_RECIPE, device=None if device == "auto" else device,
                 progress=progress)
    except FileNotFoundError as e:
        _fail(str(e))


from .data.commands import register as _register_data_commands  # noqa: E402
from .export.commands import register as _register_export_commands  # noqa: E402
from .search.commands import register as _register_search_commands  # noqa: E402

_register_data_commands(data_app)
_register_export_commands(app)
_register_search_commands(app)


def main() -> None:
    """Entry point of the `guie` console script."""
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    logging.getLogger("faiss").setLevel(logging.WARNING)  # its loader logs which SIMD build it picked
    app()


if __name__ == "__main__":
    main()
