"""`guie index ...` (a named, updatable image index) and `guie serve NAME` (the search service and its page)."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import List, Optional

import typer

from .common import fail
from .options import ModelOptions, model_options

BACKEND_HELP = "faiss (embedded, default) or milvus (Milvus Lite file, or a cluster with --uri)"
INDEX_MODEL_HELP = ("the index's model at another path (default: the one it was created with; its fingerprint must "
                    "match)")
KIND_HELP = "flat (exact, default), hnsw or ivfpq: approximate, for large indexes (docs/search.md says when)"


def _open(name: str, write: bool = True, uri: Optional[str] = None):
    from ..search.image_index import ImageIndex

    return ImageIndex.open(name, write=write, uri=uri, token=os.environ.get("GUIE_MILVUS_TOKEN"))


def register(app: typer.Typer) -> None:
    """Add the `guie index` group and `guie serve` to the top-level app."""
    index_app = typer.Typer(no_args_is_help=True, help="A named, updatable image index (faiss or milvus) with "
                                                      "metadata; NAME is a folder under $GUIE_INDEX_HOME or a path.")
    app.add_typer(index_app, name="index")

    @index_app.command("create")
    @model_options(model=..., model_help="the model every add and search uses (checkpoint or backbone)")
    def create(name: str = typer.Argument(..., help="index name (or a path with a '/')"),
               backend: str = typer.Option("faiss", help=BACKEND_HELP),
               kind: str = typer.Option("flat", help=KIND_HELP),
               image_root: Optional[Path] = typer.Option(None, help="folder item paths are relative to (default: "
                                                                     "the first source added)"),
               uri: Optional[str] = typer.Option(None, help="milvus: a cluster, e.g. http://host:19530 (token in "
                                                            "GUIE_MILVUS_TOKEN); default: a Milvus Lite file"),
               opts: ModelOptions = None):
        """Create an empty index bound to one model (its fingerprint, preprocessing and dimension)."""
        from ..embedding.runtimes import create_runtime
        from ..search.encoder import describe_model, load_model
        from ..search.image_index import ImageIndex

        embedder = load_model(opts.model, image_size=opts.image_size, crop_pct=opts.crop_pct)
        desc = describe_model(embedder, opts.model)
        create_runtime(embedder, **opts.inference).close()  # converts once, so add and serve start at once
        with ImageIndex.create(name, dim=desc["dim"], model=desc, backend=backend, kind=kind,
                               image_root=image_root, uri=uri,
                               token=os.environ.get("GUIE_MILVUS_TOKEN")) as index:
            typer.echo(f"created index {index.name!r} in {index.folder}: {desc['dim']}-d, {backend} {kind}, "
                       f"model {desc['ref']} (fingerprint {desc['fingerprint']})")

    @index_app.command("add")
    @model_options(model=None, model_help=INDEX_MODEL_HELP)
    def add(name: str = typer.Argument(..., help="index name"),
            source: Optional[Path] = typer.Argument(None, help="image folder, manifest (.csv/.parquet) or shard "
                                                               "folder"),
            where: Optional[List[str]] = typer.Option(None, help="keep rows with column=value (repeatable)"),
            shard_size: int = typer.Option(
                1024, help="rows per resumable embedding shard (a killed add redoes only unfinished shards)"),
            embeddings: Optional[Path] = typer.Option(
                None, help="instead of SOURCE: vectors made by `guie embed` (also --shard or --ray), of the "
                           "index's model; loaded without running a model"),
            image_root: Optional[Path] = typer.Option(
                None, help="with --embeddings: the folder relative paths in it are relative to (default: the "
                           "index's image root, else the current folder)"),
            progress: bool = typer.Option(True, "--progress/--no-progress"),
            watch: bool = typer.Option(False, "--watch", help="then keep the index in step with the folder: new, "
                                                              "changed, deleted and renamed files, committed in "
                                                              "batches, until Ctrl+C (a restart catches up)"),
            watch_batch_s: float = typer.Option(2.0, help="--watch: seconds of changes gathered per commit"),
            watch_polling: bool = typer.Option(False, help="--watch: poll instead of inotify (network file "
                                                           "systems)"),
            opts: ModelOptions = None):
        """Embed and add the images the index lacks (same content = same item), in one commit; resumable. With
        --watch, then follow the folder (docs/search.md); with --embeddings, load vectors made by guie embed."""
        from ..search.encoder import load_index_model
        from ..search.ingest import add_source

        if (source is None) == (embeddings is None):
            fail("give SOURCE (images to embed) or --embeddings OUT (vectors made by guie embed), one of them")
        if embeddings is not None:
            from ..search.bulk import add_embeddings

            if where:
                fail("--where selects rows of SOURCE; select them when embedding (guie embed --where)")
            if watch:
                fail("--watch follows a folder of images; --embeddings loads vectors once")

            with _open(name) as index:
                rep = add_embeddings(index, embeddings, image_root=image_root)
                typer.echo(f"{index.name}: added {rep.added} of {rep.rows} embedded images ({rep.duplicates} "
                           f"already indexed, {len(rep.errors)} unreadable) in commit {rep.seq}; {len(index)} items")
            return
        if watch and not source.is_dir():
            fail(f"{source}: --watch follows a folder; this is not one")
        if watch and where:
            fail("--watch follows a whole folder: --where does not apply")
        if watch_batch_s <= 0:
            fail(f"--watch-batch-s must be > 0, got {watch_batch_s}")
        with _open(name) as index:
            embedder = load_index_model(index, opts.model, opts.image_size, opts.crop_pct)
            rep = add_source(index, source, embedder, where=where, batch_size=opts.batch_size,
                             shard_size=shard_size, progress=progress, **opts.inference)
            typer.echo(f"{index.name}: added {rep.added} of {rep.rows} images ({rep.duplicates} already indexed"
                       f", {len(rep.errors)} unreadable) in commit {rep.seq}; {len(index)} items")
            if not watch:
                return
            from ..search.watch import FolderWatcher

            def said(r) -> None:
                typer.echo(f"{index.name}: commit {r.seq}: removed {r.removed}, added {r.added}"
                           f"{f', {len(r.errors)} unreadable' if r.errors else ''}; {len(index)} items")
                for e in r.errors[:5]:
                    typer.echo(f"  skipped {e}", err=True)

            watcher = FolderWatcher(index, source, embedder, batch_s=watch_batch_s, batch_size=opts.batch_size,
                                    report=lambda msg: typer.echo(f"warning: {msg}", err=True), **opts.inference)
            typer.echo(f"watching {watcher.folder} (Ctrl+C stops; a restart catches up)", err=True)
            try:
                watcher.run(polling=watch_polling, on_sync=said)
            except KeyboardInterrupt:
                typer.echo("stopped watching", err=True)

    @index_app.command("remove")
    def remove(name: str = typer.Argument(..., help="index name"),
               where: Optional[List[str]] = typer.Option(None, help="remove items with column=value (repeatable)"),
               ids: Optional[Path] = typer.Option(None, help="a file of item ids, one per line")):
        """Remove items by metadata (--where vendor=apple) or by id, in one commit."""
        if bool(where) == bool(ids):
            fail("give --where col=value or --ids FILE (one of them)")
        with _open(name) as index:
            if ids:
                tokens = ids.read_text().split()
                if not all(t.isdecimal() for t in tokens):
                    fail(f"{ids}: expected integer ids, one per line")
                wanted = [int(t) for t in tokens]
                seq, removed = index.remove(wanted, op=f"remove --ids {ids.name}")
            else:
                seq, removed = index.remove_where(where)
            typer.echo(f"{index.name}: removed {len(removed)} items in commit {seq}; {len(index)} items")

    @index_app.command("stats")
    def stats(name: str = typer.Argument(..., help="index name"),
              as_json: bool = typer.Option(False, "--json", help="print JSON")):
        """Size, model, backend, labels and the last commits."""
        with _open(name, write=False) as index:
            s = index.stats()
        if as_json:
            typer.echo(json.dumps(s, indent=1, default=str))
            return
        b = s["backend"]
        typer.echo(f"{s['name']}: {s['items']} items, {s['dim']}-d, commit {s['seq']}, folder {s['folder']}")
        typer.echo(f"  model {s['model']['ref']} (fingerprint {s['model']['fingerprint']})")
        typer.echo("  backend " + ", ".join(f"{k} {v}" for k, v in b.items() if k != "backend") + f" ({b['backend']})")
        typer.echo(f"  image root {s['image_root']}; columns {', '.join(s['columns'])}")
        typer.echo("  top labels " + ", ".join(f"{v} ({n})" for v, n in s["labels"][:10]))
        for c in s["commits"][:5]:
            typer.echo(f"  commit {c['seq']}: {c['op']} ({c['n']} items)")

    @index_app.command("search")
    @model_options(model=None, model_help=INDEX_MODEL_HELP)
    def search(name: str = typer.Argument(..., help="index name"),
               images: List[Path] = typer.Argument(..., help="query image files"),
               k: int = typer.Option(5, "-k", "--k", "--limit", help="results per query (per page)"),
               offset: int = typer.Option(0, help="skip the OFFSET nearest: the next page starts at offset + k"),
               max_distance: Optional[float] = typer.Option(
                   None, help="only hits within this Euclidean distance (unit-norm embeddings: 0 identical, "
                              "~1.41 unrelated, 2 opposite; docs/search.md suggests values)"),
               where: Optional[List[str]] = typer.Option(None, help="only items with column=value (repeatable)"),
               grid: Optional[Path] = typer.Option(None, help="write a PNG: each query followed by its results"),
               as_json: bool = typer.Option(False, "--json", help="print one JSON line per query"),
               opts: ModelOptions = None):
        """The k nearest indexed images of each query image (Euclidean distance, nearest first), optionally
        within --max-distance and from --offset on (paging)."""
        from ..imaging.draw import picture_format
        from ..search.encoder import embed_query_files, load_index_model
        from ..search.image_index import check_max_distance

        if grid:
            picture_format(grid)  # a name no picture can have is refused before the search
        check_max_distance(max_distance)
        if offset < 0 or k < 1:
            fail(f"offset must be >= 0 and k >= 1 (got offset {offset}, k {k})")

        with _open(name, write=False) as index:
            embedder = load_index_model(index, opts.model, opts.image_size, opts.crop_pct)
            vectors = embed_query_files(embedder, images, batch_size=opts.batch_size, **opts.inference)
            hits = index.search(vectors, k, where=where, max_distance=max_distance, offset=offset)
            files = [[index.item_file(h.item) for h in row] for row in hits]
        for img, row in zip(images, hits):
            results = [{"id": h.id, "distance": round(h.distance, 6), "label": h.item.get("label"),
                        "path": h.item.get("path")} for h in row]
            if as_json:
                typer.echo(json.dumps({"query": str(img), "results": results}))
            else:
                typer.echo(str(img) + ("" if results else f"  (no match within {max_distance})"
                                                          if max_distance is not None else "  (no results)"))
                for r in results:
                    typer.echo(f"  {r['id']:>8}  {r['distance']:.4f}  {r['label']}  {r['path']}")
        if grid:
            from ..imaging.draw import hits_grid, save_picture

            save_picture(hits_grid(images, [[(f, h.distance, h.item.get("label")) for f, h in zip(fs, row)]
                                            for fs, row in zip(files, hits)]), grid)
            typer.echo(f"grid: {grid}")

    @index_app.command("duplicates")
    def duplicates(name: str = typer.Argument(..., help="index name"),
                   max_distance: Optional[float] = typer.Option(
                       None, help="items this close are near-duplicates (default 0.15; calibrate it for your "
                                  "model: docs/search.md)"),
                   neighbours: int = typer.Option(16, help="nearest neighbours looked at per item"),
                   linkage: str = typer.Option("star", help="star: every member within the distance of its group's "
                                                            "first (default); single: groups joined through shared "
                                                            "members (can chain distinct pictures)"),
                   as_json: bool = typer.Option(False, "--json", help="print one JSON object")):
        """Groups of near-identical items (re-encodes, resizes, light crops), found with the index's own backend
        in bounded memory; exact byte duplicates were refused at add time already."""
        from ..search.image_index import DUPLICATE_DISTANCE

        distance = DUPLICATE_DISTANCE if max_distance is None else max_distance
        with _open(name, write=False) as index:
            groups = index.duplicate_groups(distance, neighbours=neighbours, linkage=linkage)
        if as_json:
            typer.echo(json.dumps({"index": name, "max_distance": distance, "groups": [
                [{"id": h.id, "distance": round(h.distance, 6), "label": h.item.get("label"),
                  "path": h.item.get("path")} for h in g] for g in groups]}))
            return
        typer.echo(f"{name}: {len(groups)} groups of near-duplicates within distance {distance} "
                   f"({sum(len(g) for g in groups)} items)")
        for n, g in enumerate(groups, 1):
            typer.echo(f"group {n} ({len(g)} items)")
            for h in g:
                typer.echo(f"  {h.id:>8}  {h.distance:.4f}  {h.item.get('label')}  {h.item.get('path')}")

    @index_app.command("reindex")
    def reindex(name: str = typer.Argument(..., help="index name"),
                kind: str = typer.Option(..., help=KIND_HELP)):
        """Rebuild the vector backend as another kind (e.g. flat -> hnsw once the index has grown)."""
        with _open(name) as index:
            index.reindex(kind)
            typer.echo(f"{index.name}: {index.stats()['backend']}")

    @app.command("serve")
    @model_options(batch_size=32, batch_size_flags=("--batch-size", "--max-batch"),
                   batch_size_help="images per forward, at most (dynamic batching)", model=None,
                   model_help=INDEX_MODEL_HELP)
    def serve(name: str = typer.Argument(..., help="index name"),
              host: str = typer.Option("127.0.0.1", help="interface; anything but loopback requires an API key"),
              port: int = typer.Option(8000, help="TCP port (1-65535)"),
              api_key_file: Optional[Path] = typer.Option(None, help="read the API key from the first line of this "
                                                                     "file (preferred: not visible to other users)"),
              api_key: Optional[str] = typer.Option(None, envvar="GUIE_API_KEY", show_default=False,
                                                    help="the API key: once set, every read and write needs it. "
                                                         "Prefer GUIE_API_KEY or --api-key-file: a key given here "
                                                         "is visible to every local user in `ps`"),
              allow_host: Optional[List[str]] = typer.Option(None, help="also accept this name in the Host header "
                                                                        "(repeatable; loopback names and --host "
                                                                        "always are)"),
              max_k: int = typer.Option(100, help="largest k (results per page) a client may ask for"),
              max_depth: int = typer.Option(1000, help="largest offset + k a client may page to"),
              max_files: int = typer.Option(8, help="images per request"),
              max_upload_mb: float = typer.Option(8.0, help="bytes per uploaded image, in MiB"),
              max_pixels: int = typer.Option(40_000_000, help="declared pixels per image (decompression bombs)"),
              max_query_pixels: int = typer.Option(16_000_000, help="decoded pixels per query image (a JPEG "
                                                                     "counts at the reduced scale it decodes at)"),
              batch_wait_ms: float = typer.Option(5.0, help="how long a forward waits for more requests"),
              queue: int = typer.Option(128, help="images waiting for a forward; beyond: 503"),
              workers: int = typer.Option(0, help="forwards run at once (0: on CPU one single-threaded forward "
                                                  "per core, up to 4 for torch; on a GPU one)"),
              cors_origin: Optional[List[str]] = typer.Option(None, help="allow this browser origin (repeatable); "
                                                                         "CORS is off by default"),
              opts: ModelOptions = None):
        """Serve the index over HTTP with its search page at / (FastAPI; see docs/search.md for the access model
        and the limits)."""
        import uvicorn

        from ..search.app import ServerSettings, create_app
        from ..search.auth import read_api_key
        from ..search.encoder import EngineEncoder, load_index_model

        settings = ServerSettings(api_key=read_api_key(api_key, api_key_file), host=host, port=port,
                                  allowed_hosts=list(allow_host or []), max_upload_bytes=int(max_upload_mb * 2**20),
                                  max_files=max_files, max_pixels=max_pixels, max_query_pixels=max_query_pixels,
                                  max_k=max_k, max_depth=max_depth, cors_origins=list(cor for cor in cors_origin or []))
        settings.check()
        index = _open(name)
        encoder = EngineEncoder(load_index_model(index, opts.model, opts.image_size, opts.crop_pct),
                                max_batch=opts.batch_size, max_wait_ms=batch_wait_ms, max_queue=queue,
                                workers=workers or None, **opts.inference)
        web = create_app(index, encoder, settings, on_close=lambda: (encoder.close(), index.close()))
        typer.echo(f"serving {index.name!r} ({len(index)} items) on http://{host}:{port}/", err=True)
        uvicorn.run(web, host=host, port=port, log_level="warning")
