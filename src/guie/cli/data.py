"""`guie data ...`: the built-in benchmarks (one command per registry entry), importers, build, check, dedup, shard."""
from __future__ import annotations

import inspect
from pathlib import Path
from typing import List, Optional

import typer

from .common import fail
from .options import ModelOptions, model_options


def _table(rows: list[dict], columns: list[str], title: str) -> str:
    from ..evaluate.report import format_table

    return format_table(rows, columns, title=title)


def _report_benchmark(manifest: Path, style: str, styles: str) -> None:
    """One line on a built benchmark: images, classes, styles, classes per split."""
    from ..data.manifest import read_manifest

    df = read_manifest(manifest)
    counts = df.drop_duplicates("label")["split"].value_counts().to_dict()
    typer.echo(f"{manifest}: {len(df)} images, {df['label'].nunique()} classes x {df[style].nunique()} {styles}; "
               f"classes per split {counts}")


def _add_benchmark_command(data_app: typer.Typer, bench) -> None:
    """`guie data <name>` for one entry of the benchmark registry: --cache, its builder's options, --force."""

    def command(cache, force, **options):
        manifest = bench.build(cache, force=force, **options)
        _report_benchmark(manifest, bench.folds_by, bench.styles or f"{bench.style}s")

    kw = inspect.Parameter.KEYWORD_ONLY
    params = [inspect.Parameter("cache", kw, annotation=Optional[Path], default=typer.Option(
        None, help="cache folder (default $GUIE_CACHE or ~/.cache/guie)"))]
    params += [inspect.Parameter(o.name, kw, annotation=type(o.default), default=typer.Option(o.default, help=o.help))
               for o in bench.options]
    params.append(inspect.Parameter("force", kw, annotation=bool, default=typer.Option(
        False, help="fetch (where needed) and build again even if built")))
    command.__signature__ = inspect.Signature(params)  # typer reads the options from the signature
    command.__doc__ = bench.summary
    data_app.command(bench.name)(command)


def register(app: typer.Typer) -> None:
    """Add the `guie data` group to the top-level app."""
    from ..data.benchmarks import BENCHMARKS

    data_app = typer.Typer(no_args_is_help=True, help="Datasets: benchmarks, importers, checks, shards.")
    app.add_typer(data_app, name="data")
    for bench in BENCHMARKS.values():  # guie data emoji | glyphs | icons: one command per registry entry
        _add_benchmark_command(data_app, bench)

    @data_app.command("import")
    def import_cmd(
        kind: str = typer.Argument(..., help="gldv2, products10k, shopee, met, sop, deepfashion_inshop, "
                                             "deepfashion_c2s, stanford_cars, food101, hm, gpr1200, imagefolder, csv"),
        root: Path = typer.Argument(..., help="the dataset folder as downloaded (for csv: the CSV file)"),
        out: Path = typer.Option(..., "--out", "-o", help="manifest to write (.csv or .parquet)"),
        opt: Optional[List[str]] = typer.Option(None, "--opt", help="dataset option key=value (repeatable), "
                                                                     "e.g. split=test; `guie data importers` "
                                                                     "lists them"),
        domain: Optional[str] = typer.Option(None, help="domain column (default: the dataset's GUIE domain)"),
        verify: bool = typer.Option(False, help="also open every image header and skip unreadable ones"),
    ):
        """Turn a downloaded dataset (its published layout) into a manifest: path,label,domain[,split]."""
        from ..data.importers import import_dataset, parse_options
        from ..data.manifest import write_manifest

        res = import_dataset(kind, root, domain=domain, verify=verify, **parse_options(kind, list(opt or [])))
        if res.manifest.empty:
            fail(f"{kind}: no usable images under {root} ({res.summary()})")
        write_manifest(res.manifest, out)
        typer.echo(res.summary())
        for reason, examples in res.examples.items():
            typer.echo(f"  {reason}: e.g. {examples[0]}", err=True)
        for note in res.notes:
            typer.echo(f"  note: {note}", err=True)
        typer.echo(f"wrote {out}")

    @data_app.command("importers")
    def importers_cmd():
        """List the dataset kinds `guie data import` reads, with their options and defaults."""
        import inspect
        import textwrap

        from ..data.importers import DEFAULT_DOMAINS, IMPORTERS, importer_options

        for kind, fn in IMPORTERS.items():
            opts = ", ".join(f"{n}={p.default!r}" for n, p in importer_options(kind).items()) or "no options"
            first = " ".join((inspect.getdoc(fn) or "").split("\n\n")[0].split())
            typer.echo(f"{kind}  (domain {DEFAULT_DOMAINS[kind]}; {opts})")
            typer.echo(textwrap.fill(first, width=110, initial_indent="    ", subsequent_indent="    "))

    @data_app.command("build")
    def build_cmd(
        recipe: str = typer.Argument(..., help="YAML build recipe: a file, or a shipped one's name (data-mix)"),
        out: Optional[Path] = typer.Option(None, "--out", "-o", help="output folder (overrides the recipe's)"),
        set_: Optional[List[str]] = typer.Option(None, "--set", help="override a recipe value: key.sub=value"),
        progress: bool = typer.Option(True, help="show progress bars"),
    ):
        """Merge manifests into one label space: train.csv, val/queries/index.csv, summary.csv + .png."""
        from ..data.builder import build_dataset, check_query_index, load_recipe

        cfg = load_recipe(recipe, list(set_ or []))
        if out is not None:
            cfg.output = out
        res = build_dataset(cfg, progress=progress)
        typer.echo(_table(res.summary.to_dict(orient="records"),
                          ["part", "domain", "images", "unique_images", "classes"], title=f"build {cfg.name}"))
        sanity = check_query_index(res.queries, res.index)
        typer.echo(f"queries/index: {sanity['shared_images']} shared images, {sanity['queries_without_index']} "
                   f"queries without a relevant index image; removed {res.leaks} evaluation images found in "
                   f"training data, {res.eval_duplicates} duplicated within evaluation")
        typer.echo(f"wrote {res.out_dir}/{{train,val,queries,index,summary}}.csv")

    @data_app.command("check")
    def check_cmd(
        manifest: Path = typer.Argument(..., help="manifest, image folder or shard folder"),
        out: Optional[Path] = typer.Option(None, "--out", "-o",
                                           help="output prefix (default: the manifest's path without suffix): "
                                                "<out>.clean.csv, <out>.report.csv"),
        workers: Optional[int] = typer.Option(None, help="processes (default: all cores)"),
        min_side: int = typer.Option(32, help="shorter side below this is an error ('tiny')"),
        max_pixels: Optional[int] = typer.Option(None, help="more pixels is an error ('bomb'; default: PIL's limit)"),
        decode: bool = typer.Option(True, help="fully decode every image (finds truncation); --no-decode: headers"),
        drop: Optional[List[str]] = typer.Option(None, help="also leave out images with this warning (repeatable): "
                                                            "cmyk, 16bit, palette, alpha, exif, huge, grayscale, "
                                                            "animated"),
        progress: bool = typer.Option(True, help="show a progress bar"),
    ):
        """Open every image (in parallel), report problems by kind, write a cleaned manifest. Deletes nothing."""
        from ..data.manifest import read_manifest
        from ..data.validate import CheckConfig, check_manifest, print_problems, write_check_outputs
        from ..imaging.io import DEFAULT_MAX_PIXELS

        df = read_manifest(manifest)
        cfg = CheckConfig(min_side=min_side, max_pixels=max_pixels or DEFAULT_MAX_PIXELS, decode=decode,
                          drop=tuple(drop or ()))
        res = check_manifest(df, cfg, workers=workers, progress=progress)
        prefix = out or (manifest if manifest.is_dir() else manifest.with_suffix(""))  # a folder: files beside it
        clean, report = write_check_outputs(res, prefix)
        print_problems(res)
        if res.counts:
            typer.echo(_table(res.summary_rows(), ["kind", "severity", "images"], title="image problems"))
        typer.echo(f"{len(df)} images: {len(res.clean)} usable, {res.n_bad} left out")
        typer.echo(f"wrote {clean} and {report}")

    @data_app.command("dedup")
    @model_options(model=None, model_help="embedding: checkpoint or backbone name (default efficientnet_lite0)")
    def dedup_cmd(
        manifest: Path = typer.Argument(..., help="manifest to examine (the evaluation set when --against is given)"),
        against: Optional[Path] = typer.Option(None, help="training manifest: report MANIFEST rows that duplicate it"),
        method: Optional[List[str]] = typer.Option(None, help="exact, phash, embedding (repeatable; default exact "
                                                              "+ phash)"),
        max_distance: int = typer.Option(4, help="phash: max Hamming distance (of 64 bits)"),
        min_cosine: float = typer.Option(0.95, help="embedding: min cosine similarity"),
        out: Optional[Path] = typer.Option(None, "--out", "-o", help="pairs report CSV (default <manifest>.dups.csv)"),
        write_clean: Optional[Path] = typer.Option(None, help="write MANIFEST without the duplicates (first of each "
                                                              "group kept) or without the leaked rows"),
        workers: Optional[int] = typer.Option(None), progress: bool = typer.Option(True),
        opts: ModelOptions = None,
    ):
        """Find exact and near-duplicate images, within a manifest or between evaluation and training data."""
        from ..data.dedup import DedupConfig, drop_duplicates, drop_leaks, find_duplicates, find_leaks
        from ..data.manifest import read_manifest, write_manifest
        from ..utils import atomic_write_text

        df = read_manifest(manifest)
        train = read_manifest(against) if against else None
        methods = tuple(method or ("exact", "phash"))
        embed = None
        if "embedding" in methods:
            from ..embedding.engine import path_embedder

            embed = path_embedder(opts.model, progress=progress, **opts.as_dict(exclude=("model",)))
        cfg = DedupConfig(methods=methods, max_distance=max_distance, min_cosine=min_cosine, embed=embed)
        if train is None:
            rep = find_duplicates(df, cfg, workers=workers, progress=progress)
            cleaned = drop_duplicates(df, rep)
            what = f"{len(df) - len(cleaned)} duplicate images (keeping the first of each group)"
        else:
            rep = find_leaks(df, train, cfg, workers=workers, progress=progress)
            cleaned = drop_leaks(df, rep)
            what = f"{len(df) - len(cleaned)} of {len(df)} images also in {against} (leaked)"
        report = out or manifest.with_name(manifest.stem + ".dups.csv")
        atomic_write_text(rep.pairs.to_csv(index=False), report)
        if "label_i" in rep.pairs.columns and train is None:
            conflicts = int((rep.pairs["label_i"] != rep.pairs["label_j"]).sum())
            typer.echo(f"{conflicts} duplicate pairs carry different labels")
        for k, v in rep.unreadable.items():
            typer.echo(f"{v} images could not be read for {k}", err=True)
        typer.echo(f"pairs by method: {rep.counts() or 'none'}; {what}")
        typer.echo(f"wrote {report}")
        if write_clean:
            write_manifest(cleaned, write_clean)
            typer.echo(f"wrote {write_clean} ({len(cleaned)} rows)")

    @data_app.command("shard")
    def shard_cmd(
        manifest: Path = typer.Argument(..., help="manifest or image folder"),
        out_dir: Path = typer.Argument(..., help="folder for shard-*.tar + index.parquet"),
        shard_size: int = typer.Option(1000, help="samples per shard"),
        image_format: str = typer.Option("keep", "--format", help="keep (copy bytes) | jpg | webp | png"),
        max_side: Optional[int] = typer.Option(None, help="re-encode: shrink the longer side to this"),
        quality: int = typer.Option(90, help="jpg/webp quality"),
        shuffle: bool = typer.Option(False, help="shuffle rows before packing (for streamed training)"),
        seed: int = typer.Option(0),
        workers: Optional[int] = typer.Option(None),
        overwrite: bool = typer.Option(False, help="replace shards of another manifest or other settings"),
        progress: bool = typer.Option(True),
    ):
        """Pack images into WebDataset-style tar shards; resumes an interrupted run. Use the folder as a manifest."""
        from ..data.manifest import read_manifest
        from ..data.shards import ShardConfig, write_shards

        df = read_manifest(manifest)
        cfg = ShardConfig(shard_size=shard_size, image_format=image_format, max_side=max_side, quality=quality,
                          shuffle=shuffle, seed=seed)
        res = write_shards(df, out_dir, cfg, workers=workers, progress=progress, overwrite=overwrite)
        n_shards = res.index["shard"].nunique() if len(res.index) else 0
        typer.echo(f"{len(res.index)} images in {n_shards} shards ({res.written} written, {res.resumed} already "
                   f"done); {len(res.errors)} unreadable images left out")
        typer.echo(f"wrote {out_dir}/index.parquet; use {out_dir} wherever a manifest is accepted")
