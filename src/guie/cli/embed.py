"""`guie embed`: image files -> an embeddings Parquet file, resumably (one process, or torchrun ranks)."""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from .common import fail
from .options import ModelOptions, model_options


def register(app: typer.Typer) -> None:
    """Add `guie embed` to the top-level app."""

    @app.command()
    @model_options()
    def embed(source: Optional[Path] = typer.Argument(
                  None, help="image folder, or manifest (.csv/.parquet with a 'path' column)"),
              out: Optional[Path] = typer.Option(None, "--out", "-o", help="output embeddings .parquet"),
              embed_dim: Optional[int] = typer.Option(None, help="head size for a fresh backbone (default: raw "
                                                                 "features); the head is initialised from --seed"),
              seed: int = typer.Option(0, help="seed of a fresh head (--embed-dim): the same seed gives the same "
                                               "vectors, so an interrupted run resumes"),
              features: bool = typer.Option(False, help="write backbone features instead of the head's embedding"),
              workers: Optional[int] = typer.Option(
                  None, help="decode processes (default: 0 on CPU, decoding between forwards; cores-1 on GPU)"),
              shard_size: int = typer.Option(4096, help="rows per resumable shard"),
              decode: str = typer.Option("cpu", help="cpu (PIL) or gpu (JPEGs decoded on the model's device)"),
              compile: bool = typer.Option(False, "--compile", help="torch.compile the model (long runs on GPU)"),
              where: Optional[List[str]] = typer.Option(None, help="keep rows with column=value (repeatable)"),
              overwrite: bool = typer.Option(False, help="discard shards of an earlier run with another model"),
              progress: bool = typer.Option(True, "--progress/--no-progress", help="show a progress bar"),
              shard: Optional[str] = typer.Option(
                  None, help="i/N: embed only shard i of N (0-based; shards s with s %% N == i), for N independent "
                             "jobs writing into one --out; join them with --merge OUT"),
              merge: Optional[Path] = typer.Option(
                  None, "--merge", help="merge the shards of OUT once every --shard job is done: checks every row "
                                        "is there exactly once (one line and a non-zero exit if not)"),
              ray: Optional[str] = typer.Option(
                  None, "--ray", help="run on a Ray cluster (pip install 'guie[ray]'): auto (the one this machine "
                                      "runs or $RAY_ADDRESS, else a local one), local, or an address "
                                      "(host:6379, ray://host:10001)"),
              actors: Optional[int] = typer.Option(
                  None, help="--ray: most model actors (default: one per GPU of the cluster, else one per CPU "
                             "but one)"),
              cpus_per_actor: float = typer.Option(1.0, help="--ray on CPU: cores per model actor"),
              opts: ModelOptions = None):
        """Embed images into a Parquet file (manifest columns + 'embedding'); resumes an interrupted run.

        Scale-out: --ray for a Ray cluster, --shard i/N for N scheduler jobs (then --merge OUT); both together for
        N Ray jobs. See docs/scale-out.md."""
        if merge is not None:
            if source is not None or out is not None or shard is not None:
                fail("--merge OUT takes no SOURCE, --out or --shard")
            return _merge(merge)
        if source is None or out is None:
            fail("give SOURCE and --out (or --merge OUT)")
        from ..data.manifest import OTHER_FILES, read_manifest, resolved_paths, select_rows
        from ..distributed import init_distributed
        from ..embedding.files import embed_to_file, parse_shard

        listed = read_manifest(source, resolve=False)  # paths as listed: relative ones stay relative
        others = listed.attrs.get(OTHER_FILES, [])  # a folder's files that are not images
        df = select_rows(listed, where, str(source))
        paths = resolved_paths(df, source)
        shard_of = parse_shard(shard) if shard is not None else None
        embedder = opts.load(embed_dim=embed_dim, seed=seed)
        if ray is not None:
            from ..embedding.ray_embed import check_ray_options, embed_with_ray

            if decode != "cpu":
                fail("--ray decodes in CPU tasks: --decode gpu is for one machine")
            check_ray_options(actors, cpus_per_actor)
            done = embed_with_ray(embedder, df, out, address=ray, batch_size=opts.batch_size, shard_size=shard_size,
                                  features=features, device=opts.device, runtime=opts.runtime,
                                  precision=opts.precision, paths=paths, overwrite=overwrite, shard=shard_of,
                                  actors=actors, cpus_per_actor=cpus_per_actor, progress=progress,
                                  compile=compile)
            if done is None:
                typer.echo(f"shard {shard_of[0]}/{shard_of[1]} of {out} done; when every shard is, run: "
                           f"guie embed --merge {out}")
            else:
                _summary(source, out, *done, others)
            return
        if shard_of is not None:
            embed_to_file(embedder, df, out, batch_size=opts.batch_size, num_workers=workers, device=opts.device,
                          features=features, shard_size=shard_size, overwrite=overwrite, decode=decode,
                          compile=compile, progress=progress, paths=paths, runtime=opts.runtime,
                          precision=opts.precision, shard=shard_of)
            typer.echo(f"shard {shard_of[0]}/{shard_of[1]} of {out} done; when every shard is, run: "
                       f"guie embed --merge {out}")
            return
        dist = init_distributed(opts.device)  # under torchrun: one process per GPU, shards split over the ranks
        kept, emb, errors = embed_to_file(embedder, df, out, batch_size=opts.batch_size, num_workers=workers,
                                          device=dist.device if dist.enabled else opts.device,
                                          features=features, shard_size=shard_size, overwrite=overwrite,
                                          decode=decode, compile=compile, progress=progress, rank=dist.rank,
                                          world_size=dist.world_size, paths=paths, runtime=opts.runtime,
                                          precision=opts.precision)
        if not dist.is_main:
            return
        _summary(source, out, kept, emb, errors, others)


def _summary(source: Path, out: Path, kept, emb, errors: list, others: list) -> None:
    """What a finished `guie embed` prints: rows written, unreadable images, files that are not images."""
    typer.echo(f"wrote {len(kept)} embeddings of dim {emb.shape[1]} to {out}")
    if errors:
        typer.echo(f"skipped {len(errors)} unreadable images (listed in {out}.failed.csv)", err=True)
    if others:
        names = ", ".join(Path(p).name for p in others[:3]) + (", ..." if len(others) > 3 else "")
        typer.echo(f"left out {len(others)} files that are not images ({names})", err=True)
    if errors or others:
        unit = "files" if source.is_dir() else "rows"
        typer.echo(f"{source}: {len(kept) + len(errors) + len(others)} {unit}: {len(kept)} embedded, "
                   f"{len(errors)} unreadable, {len(others)} not images", err=True)

def _merge(out: Path) -> None:
    """`guie embed --merge OUT`: join the parts of --shard jobs into OUT, every row exactly once."""
    from ..embedding.files import failed_file, merge_parts

    rep = merge_parts(out)
    typer.echo(f"merged {out}: {rep.rows} rows, {rep.embedded} embedded, {rep.failed} unreadable"
               + (f" (listed in {failed_file(out)})" if rep.failed else ""))
