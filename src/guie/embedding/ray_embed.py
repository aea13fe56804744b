"""`guie embed --ray`: the resumable embedding job (`guie.embedding.files`) as a Ray Data pipeline, so that the
images of one output are embedded by the CPUs and GPUs of a whole Ray cluster.

    rows of the unfinished parts  ->  decode + resize (CPU tasks: `ImageFileDataset`, the one geometry)
        ->  model (an actor pool, `map_batches` with a callable class: each actor loads the model once; one GPU per
            actor with num_gpus=1 on CUDA, else CPU actors on guie's CPU runtime, `guie.embedding.runtimes`)
        ->  the driver: `PartWriter` writes each part of the output as soon as its last row is in

The output is that of local `guie embed`, part for part: the same parts folder, schema, fingerprint and failure
records, so a run can be resumed by Ray or locally, `--shard` jobs can each use Ray, and `merge_parts` checks every
row exactly once. A rerun skips finished parts; a retried task (an actor killed mid-batch is restarted and its
batch run again) cannot write a row twice: the driver keeps the first copy of each row and writes each part once.

Ray is imported here only, inside the functions: nothing else in guie needs it installed (`pip install guie[ray]`).
"""
from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from ..errors import EnvironmentProblem, InputError
from ..utils import log
from .files import EmbeddingParts, PartWriter, check_shard, failed_file, merge_parts, plan_parts, read_embeddings

if TYPE_CHECKING:
    from ..models.embedder import Embedder


def connect(address: str | None = "auto", num_cpus: int | None = None) -> bool:
    """Join a Ray cluster: "auto" (the one this machine runs, or $RAY_ADDRESS; else a new local one), "local" (a
    new one on this machine) or an address (host:6379, ray://host:10001). Returns whether this call started the
    connection (and should close it). A connection the process holds already is used as it is."""
    ray = import_ray()
    if ray.is_initialized():
        return False
    kwargs = {"num_cpus": num_cpus} if num_cpus else {}
    target = {None: None, "auto": None, "local": "local"}.get(address, address)
    try:
        ray.init(address=target, include_dashboard=False, log_to_driver=True, **kwargs)
    except (ConnectionError, RuntimeError, ValueError) as e:
        raise EnvironmentProblem(f"Ray cluster {address!r}: cannot connect ({str(e).splitlines()[0]})") from None
    return True


def import_ray():
    """The ray module, or one line saying how to install it."""
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        raise EnvironmentProblem("Ray is not installed: pip install 'guie[ray]' (ray[data])") from None
    return ray


def embed_with_ray(embedder: Embedder, manifest: pd.DataFrame, out_path: str | Path, *, address: str | None = "auto",
                   batch_size: int = 64, shard_size: int = 4096, features: bool = False, device: str | None = None,
                   runtime: str = "auto", precision: str = "auto", paths: list[str] | None = None,
                   overwrite: bool = False, shard: tuple[int, int] | None = None, actors: int | None = None,
                   cpus_per_actor: float = 1.0, decode_cpus: float = 1.0, progress: bool = True,
                   report_failure: Callable[[str], None] | None = None,
                   on_batch: Callable[[int], None] | None = None, compile: bool = False):
    """Embed every row of `manifest` into `out_path` on a Ray cluster; the output, its parts and their resuming
    are those of `guie.embedding.files.embed_to_file` (arguments of the same names mean the same).

    `address`: the cluster (`connect`). `actors`: most model actors (default: one per GPU of the cluster when
    `device` is CUDA, else one per `cpus_per_actor` CPUs less one for decoding); the pool grows from 1 to that as
    blocks wait. `decode_cpus`: CPUs per decoding task. `compile`: each actor runs torch.compile'd torch (long GPU
    runs: 1,300 instead of 1,030 img/s for ViT-H-14 on an H200). `on_batch(rows done so far)`: called in the driver
    after each batch arrives (progress reporting). With `shard` = (i, n) only that shard's parts are embedded and
    nothing is merged (returns None); else returns (kept metadata rows, embeddings, failure messages).
    """
    ray = import_ray()
    if shard is not None:
        check_shard(shard)
    plan = plan_parts(embedder, manifest, out_path, shard_size, features, None, paths, overwrite)
    todo = plan.todo(*(shard or (0, 1)))
    owned = len(range(shard[0], plan.n_parts, shard[1])) if shard else plan.n_parts
    if len(todo) < owned:
        log.info("resuming %s: %d/%d shards already done", plan.out_path, owned - len(todo), owned)
    if todo:
        started_here = connect(address)
        try:
            _run(ray, embedder, plan, todo, batch_size, features, device, runtime, precision, actors,
                 cpus_per_actor, decode_cpus, progress, report_failure, on_batch, compile)
        finally:
            if started_here:
                ray.shutdown()
    if shard is not None:
        return None
    merge_parts(plan.out_path)
    df, emb = read_embeddings(plan.out_path)
    failed_csv = failed_file(plan.out_path)
    errors = pd.read_csv(failed_csv)["error"].tolist() if failed_csv.exists() else []
    return df, emb, errors


def _run(ray, embedder, plan: EmbeddingParts, todo, batch_size, features, device, runtime, precision, actors,
         cpus_per_actor, decode_cpus, progress, report_failure, on_batch, compile) -> None:
    import pyarrow as pa

    from ..models.preprocess import ImageTransform, draft_size
    from .engine import output_dim

    if device in (None, "auto"):
        device = os.environ.get("GUIE_DEVICE") or "auto"  # as `guie.utils.resolve_device`: it pins the device
    gpu = str(device).startswith("cuda") or (device == "auto" and _cluster_gpus(ray) > 0)
    if actors is None:
        actors = _cluster_gpus(ray) if gpu else max(1, int((_cluster_cpus(ray) - decode_cpus) // cpus_per_actor))
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = progress
    report = report_failure or (lambda msg: log.warning("skipped %s", msg))
    blocks = [pa.table({"row": np.arange(*plan.rows(s), dtype=np.int64),
                        "path": plan.paths[slice(*plan.rows(s))]}) for s in todo]
    model = ray.put(embedder.cpu())
    preprocess = embedder.preprocess
    ds = ray.data.from_arrow(blocks)
    ds = ds.map_batches(decode_batch, batch_size=batch_size, batch_format="numpy", num_cpus=decode_cpus,
                        fn_kwargs={"transform": ImageTransform(preprocess), "draft": draft_size(preprocess),
                                   "size": preprocess.image_size})
    ds = ds.map_batches(EmbedBatches, batch_size=batch_size, batch_format="numpy",
                        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=max(1, actors)),
                        fn_constructor_kwargs={"model": [model], "features": features,
                                               "device": "cuda" if gpu else "cpu", "runtime": runtime,
                                               "precision": precision, "threads": max(1, int(cpus_per_actor)),
                                               "compile": compile, "batch_size": batch_size},
                        num_gpus=1 if gpu else 0, num_cpus=0 if gpu else cpus_per_actor)
    # an actor that dies is restarted and its batch run again (Ray Data's default for actor pools: max_restarts
    # and max_task_retries -1); a row that so arrives twice is written once (`PartWriter`)
    writer = PartWriter(plan, todo, output_dim(embedder, features))
    started, done = time.perf_counter(), 0
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        rows, errors = batch["row"].astype(np.int64), batch["error"]
        ok = np.array([not e for e in errors], bool)
        failures = [(int(r), str(e)) for r, e in zip(rows[~ok], errors[~ok])]
        for _, msg in failures:
            report(msg)
        writer.add(rows[ok], np.asarray(batch["embedding"], np.float32)[ok], failures)
        done += len(rows)
        if on_batch is not None:
            on_batch(done)
    if writer.unfinished():
        raise EnvironmentProblem(f"{plan.out_path}: the Ray job ended with {len(writer.unfinished())} shards "
                                 "unfinished; run it again (finished shards are kept)")
    took = time.perf_counter() - started
    log.info("embedded %d images on Ray in %.1f s (%.1f images/s)", done, took, done / max(took, 1e-9))


def _cluster_gpus(ray) -> int:
    return int(ray.cluster_resources().get("GPU", 0))


def _cluster_cpus(ray) -> float:
    return float(ray.cluster_resources().get("CPU", 1))


def decode_batch(batch: dict, transform, draft: int, size: int) -> dict:
    """Rows {row, path} -> {row, pixels uint8 [n, 3, S, S] (zeros where unreadable), error ("" if readable)}: the
    decoding and resizing of local embedding (`ImageFileDataset`), in a Ray task."""
    from ..pipeline.datasets import ImageFileDataset

    paths = [str(p) for p in batch["path"]]
    data = ImageFileDataset(paths, transform, draft_size=draft)
    pixels = np.zeros((len(paths), 3, size, size), np.uint8)
    errors = []
    for i in range(len(paths)):
        _, x, err = data[i]
        if err is None:
            pixels[i] = x.numpy()
        errors.append(err or "")
    return {"row": np.asarray(batch["row"], np.int64), "pixels": pixels, "error": np.array(errors, dtype=object)}


class EmbedBatches:
    """A Ray actor's model: loaded once (from the object store), run on every batch of decoded rows -> {row,
    embedding float32 [n, d] (zeros where unreadable), error}. On CPU, `threads` intra-op threads (the actor's
    CPUs) run one forward at a time on guie's CPU runtime."""

    def __init__(self, model: list, features: bool, device: str, runtime: str, precision: str, threads: int,
                 compile: bool = False, batch_size: int = 64):
        import ray
        import torch

        from .engine import _runtime_for, output_dim

        if device == "cpu":
            torch.set_num_threads(threads)
        self.embedder = ray.get(model[0])
        self.dim = output_dim(self.embedder, features)
        # the engine's forward (`pixel_forward`'s runtime), torch.compile'd with the batch padded when asked
        self.runtime = _runtime_for(self.embedder, runtime, precision, device, features, None,
                                    1 if device == "cpu" else None, compile, batch_size)
        self.forward = self.runtime.numpy

    def __call__(self, batch: dict) -> dict:
        import torch

        errors = batch["error"]
        ok = np.array([not e for e in errors], bool)
        out = np.zeros((len(errors), self.dim), np.float32)
        if ok.any():
            out[ok] = self.forward(torch.from_numpy(np.ascontiguousarray(batch["pixels"][ok])))
        return {"row": batch["row"], "embedding": out, "error": errors}


def check_ray_options(actors: int | None, cpus_per_actor: float) -> None:
    """Refuse actor settings that cannot run."""
    if actors is not None and actors < 1:
        raise InputError(f"actors must be >= 1, got {actors}")
    if cpus_per_actor <= 0:
        raise InputError(f"cpus_per_actor must be > 0, got {cpus_per_actor}")
