"""`guie search build` and `guie search query`."""
from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer

from .common import fail


def register(app: typer.Typer) -> None:
    """Add the `guie search` group to the top-level app."""
    search_app = typer.Typer(no_args_is_help=True, help="Image search: FAISS index over an embeddings file.")
    app.add_typer(search_app, name="search")

    @search_app.command("build")
    def build(embeddings: Path = typer.Argument(..., help="embeddings .parquet from `guie embed`"),
              out: Path = typer.Option(..., "--out", "-o", help="index folder to write"),
              factory: str = typer.Option("Flat", help="FAISS index factory: Flat (exact), HNSW32, IVF1024,Flat, ...")):
        """Build a search index from an embeddings file."""
        from ..search.index import EmbeddingIndex

        try:
            index = EmbeddingIndex.from_embeddings_file(embeddings, factory)
        except (FileNotFoundError, ValueError) as e:
            fail(str(e))
        index.save(out)
        typer.echo(f"indexed {len(index)} embeddings of dim {index.dim} ({factory}) in {out}")

    @search_app.command("query")
    def query(index_dir: Path = typer.Argument(..., help="index folder from `guie search build`"),
              images: List[Path] = typer.Argument(..., help="query image files"),
              model: str = typer.Option(..., help="the model that made the index (checkpoint or backbone name)"),
              k: int = typer.Option(5, "-k", "--k", help="results per query"),
              grid: Optional[Path] = typer.Option(None, help="write a PNG: each query followed by its results"),
              as_json: bool = typer.Option(False, "--json", help="print JSON lines instead of a table")):
        """Find the k nearest indexed images of each query image."""
        from ..imaging.draw import hits_grid
        from ..imaging.io import ImageLoadError
        from ..search.index import EmbeddingIndex
        from ..search.query import embed_query_images

        try:
            index = EmbeddingIndex.load(index_dir)
            vectors = embed_query_images(model, images)
            hits = index.search(vectors, k)
        except (FileNotFoundError, ValueError, ImageLoadError) as e:
            fail(str(e))
        for img, rows in zip(images, hits.rows):
            cols = [c for c in ("path", "label", "domain", "distance") if c in rows.columns]
            if as_json:
                typer.echo(json.dumps({"query": str(img), "results": rows[cols].to_dict(orient="records")}))
            else:
                typer.echo(f"{img}")
                for r in rows[cols].itertuples(index=False):
                    typer.echo("  " + "  ".join(f"{v:.4f}" if isinstance(v, float) else str(v) for v in r))
        if grid:
            hits_grid(images, hits).save(grid)
            typer.echo(f"grid: {grid}")

    @search_app.command("serve")
    def serve(index_dir: Path = typer.Argument(..., help="index folder from `guie search build`"),
              model: str = typer.Option(..., help="the model that made the index (checkpoint or backbone name)"),
              host: str = typer.Option("127.0.0.1", help="interface to listen on (0.0.0.0 for all)"),
              port: int = typer.Option(8000, help="TCP port"),
              max_k: int = typer.Option(100, help="largest k a client may ask for")):
        """Serve image search over HTTP (FastAPI): POST /search, POST /embed, GET /health; docs at /docs."""
        import uvicorn

        from ..search.server import create_app

        try:
            app = create_app(index_dir, model, max_k=max_k)
        except (FileNotFoundError, ValueError) as e:
            fail(str(e))
        uvicorn.run(app, host=host, port=port)
