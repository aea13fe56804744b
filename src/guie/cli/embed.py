"""`guie embed`: image files -> an embeddings Parquet file, resumably (one process, or torchrun ranks)."""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from .options import ModelOptions, model_options


def register(app: typer.Typer) -> None:
    """Add `guie embed` to the top-level app."""

    @app.command()
    @model_options()
    def embed(source: Path = typer.Argument(..., help="image folder, or manifest (.csv/.parquet with a 'path' column)"),
              out: Path = typer.Option(..., "--out", "-o", help="output embeddings .parquet"),
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
              opts: ModelOptions = None):
        """Embed images into a Parquet file (manifest columns + 'embedding'); resumes an interrupted run."""
        from ..data.manifest import OTHER_FILES, read_manifest, resolved_paths, select_rows
        from ..distributed import init_distributed
        from ..embedding.files import embed_to_file

        listed = read_manifest(source, resolve=False)  # paths as listed: relative ones stay relative
        others = listed.attrs.get(OTHER_FILES, [])  # a folder's files that are not images
        df = select_rows(listed, where, str(source))
        paths = resolved_paths(df, source)
        embedder = opts.load(embed_dim=embed_dim, seed=seed)
        dist = init_distributed(opts.device)  # under torchrun: one process per GPU, shards split over the ranks
        kept, emb, errors = embed_to_file(embedder, df, out, batch_size=opts.batch_size, num_workers=workers,
                                          device=dist.device if dist.enabled else opts.device,
                                          features=features, shard_size=shard_size, overwrite=overwrite,
                                          decode=decode, compile=compile, progress=progress, rank=dist.rank,
                                          world_size=dist.world_size, paths=paths, runtime=opts.runtime,
                                          precision=opts.precision)
        if not dist.is_main:
            return
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
