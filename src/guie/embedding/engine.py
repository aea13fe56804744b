"""The one batched embedding loop: decoding overlapped or interleaved with the model, channels_last, bf16 on CUDA.

`iter_embeddings` streams batches of image files in file order; `embed_images` gathers them in memory;
`embed_decoded` embeds images already in memory (uploads, query images). Everything that runs a model over images
for vectors goes through here: `guie.embedding.files.embed_to_file` (resumable Parquet output), the feature store
(clean and augmented views), validation during training, search queries and the search server. Undecodable images
are reported one line each and counted, never silently dropped and never fatal.

What runs the forward is an inference runtime (`guie.embedding.runtimes`: by default OpenVINO on a CPU, torch on
CUDA); the pixels are the same whichever it is. Where decoding runs matters more than anything else for throughput:
  * model on CUDA: DataLoader worker processes decode while the GPU computes (or, with decode="gpu", workers only
    read bytes and nvJPEG decodes on the GPU);
  * model on CPU: one single-threaded forward per intra-op thread runs side by side (the runtime's `parallel`:
    OpenVINO streams, or torch's `guie.runtime.forward_workers`; threads of this process, the GIL released inside
    the forward), and each of those threads decodes its own
    next batch right before its forward, so decoding never oversubscribes the cores. One forward split over all
    cores with OpenMP stalls as a whole whenever anything takes one of its cores (its threads meet at a barrier
    after every layer), including the decoding between forwards; independent forwards only lose the time taken
    from them. Batches are the same as with one forward and handed over in file order; up to 4 cores the vectors
    are those of the single-threaded forward, whatever the core count. Worker processes would run *during* the
    forwards and compete with them for the same cores; on a 2-core machine that cost a third of the throughput.
    glibc's allocator is also tuned once (`guie.runtime`): by default it hands every activation back to the kernel,
    and faulting it in again each forward was the kernel time that equalled user time.
"""
from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ..errors import InputError
from ..models.embedder import Embedder
from ..models.preprocess import ImageTransform, PreprocessConfig, draft_size
from ..pipeline.datasets import ImageFileDataset, KeyListSampler, collate_skip_failed, stack_images
from ..utils import log, resolve_device
from .runtimes import InferenceRuntime, create_runtime
from .runtimes.torch_runtime import TorchRuntime, torch_forward

DECODERS = ("cpu", "gpu")


@dataclass
class EmbedResult:
    """Embeddings of the decodable images; `ok[i]` says whether paths[i] was embedded (row order kept)."""

    embeddings: np.ndarray            # [n_ok, d] float32, rows in the order of paths[ok]
    ok: np.ndarray                    # [N] bool
    errors: list[str] = field(default_factory=list)


@dataclass
class EmbeddedBatch:
    """One batch of `iter_embeddings`: positions (in `paths`) of the embedded images, their vectors, the failures.

    Batches arrive in file order and together cover every position exactly once (embedded or failed)."""

    indices: np.ndarray               # [n] int64
    embeddings: np.ndarray            # [n, d] float32
    failed: list[tuple[int, str]]     # (position, one-line message)


def embed_num_workers(device: str | torch.device | None = None) -> int:
    """Decode workers for inference on `device`: 0 on CPU (each forward thread decodes its own batches, see the
    module docstring), else one per core but one, up to 16."""
    if resolve_device(device).type == "cpu":
        return 0
    return max(1, min(16, (os.cpu_count() or 1) - 1))


def make_loader(paths: Sequence[str], preprocess: PreprocessConfig, batch_size: int, num_workers: int,
                pin_memory: bool = False, decode: str = "cpu", threads: int | None = None,
                transform: Callable | None = None, seeds: Sequence[int] | None = None) -> DataLoader:
    """A DataLoader over image files in order.

    decode="cpu" yields (indices, uint8 images [B,3,S,S] or None, failures); decode="gpu" yields encoded batches
    for `guie.pipeline.gpu_decode.decode_batch`. With num_workers=0, `threads` (default: torch's intra-op thread
    count) decode each batch in parallel in the main process. `transform` replaces the evaluation transform of
    `preprocess` (e.g. an augmentation), seeded per image with `seeds` (see `guie.pipeline.datasets`).
    """
    if decode not in DECODERS:
        raise InputError(f"decode={decode!r}: choose from {DECODERS}")
    if decode == "gpu" and (transform is not None or seeds is not None):
        raise ValueError("decode='gpu' runs the evaluation transform only (no custom transform or seeds)")
    transform, draft = transform or ImageTransform(preprocess), draft_size(preprocess)
    sampler = None if seeds is None else KeyListSampler(list(zip(range(len(paths)), seeds)))
    if decode == "gpu":
        from ..pipeline.gpu_decode import EncodedImageDataset, collate_encoded

        ds, collate = EncodedImageDataset(paths, transform, draft_size=draft), collate_encoded
    else:
        n_threads = (threads or torch.get_num_threads()) if num_workers == 0 else 1
        ds, collate = ImageFileDataset(paths, transform, draft_size=draft, threads=n_threads), collate_skip_failed
    return DataLoader(ds, batch_size=batch_size, shuffle=False, sampler=sampler, num_workers=num_workers,
                      collate_fn=collate, pin_memory=pin_memory, persistent_workers=False,
                      prefetch_factor=2 if num_workers > 0 else None)


def output_dim(embedder: Embedder, features: bool) -> int:
    """Width of what `iter_embeddings` returns: backbone features or the embedding."""
    return int(embedder.backbone.num_features) if features else int(embedder.embed_dim)


def iter_embeddings(embedder: Embedder, paths: Sequence[str], batch_size: int = 64, num_workers: int | None = None,
                    device: str | torch.device | None = None, features: bool = False,
                    preprocess: PreprocessConfig | None = None, decode: str = "cpu", compile: bool = False,
                    progress: bool = True, report_failure: Callable[[str], None] | None = None,
                    desc: str = "embed", transform: Callable | None = None,
                    seeds: Sequence[int] | None = None, forwards: int | None = None,
                    runtime: str | InferenceRuntime | None = "auto", precision: str | None = "auto",
                    cache_dir=None) -> Iterator[EmbeddedBatch]:
    """Stream embeddings (or backbone features when features=True) of image files, batch by batch, in file order.

    Args:
        num_workers: decode processes; default `embed_num_workers(device)`.
        preprocess: override the embedder's preprocessing (e.g. resize mode; see `Embedder.set_image_size` to
            change a ViT's resolution).
        decode: "cpu" (PIL) or "gpu" (JPEGs decoded on the model's device by torchvision/nvJPEG, see
            `guie.pipeline.gpu_decode`).
        compile: run the model through `torch.compile` (the last batch is padded so only one shape is compiled).
        report_failure: called with a one-line message per undecodable image (default: stderr).
        transform: PIL image -> uint8 tensor replacing the evaluation transform (e.g. a training augmentation);
            `seeds` (one per path) seed torch's RNG before each image is transformed, so augmented views are
            reproducible.
        forwards: on CPU, forwards run side by side on threads, each on its share of torch's intra-op threads
            (default `guie.runtime.forward_workers`: one single-threaded forward per thread; 1: one forward on all
            threads, as on CUDA). With num_workers=0 each of those threads decodes its own batches. The vectors
            are those of a forward with that share of threads (float sums depend on the thread count, see
            `guie.runtime.intra_op_threads`). Not with compile, seeds or decode="gpu" (which run one forward).
        runtime, precision: what runs the forward (`guie.embedding.runtimes.create_runtime`: "auto" is OpenVINO
            on a CPU, torch on CUDA), or a runtime already created for this model and output kind. The pixels are
            the same whichever runs it. compile=True runs torch.
        cache_dir: where converted models are kept (default `<guie cache>/runtimes`).
    The model is moved to `device`, put in eval mode and channels_last; its train/eval mode is restored after, and
    so is torch's intra-op thread count. On CPU, glibc's allocator is tuned once for the process
    (`guie.runtime.tune_cpu_allocator`); parallel forwards each hold a batch's activations.
    """
    preprocess = preprocess or embedder.preprocess
    was_training = embedder.training
    try:
        rt = _runtime_for(embedder, runtime, precision, device, features, cache_dir, forwards, compile, batch_size)
    except BaseException:
        embedder.train(was_training)
        raise
    device = rt.device
    num_workers = embed_num_workers(device) if num_workers is None else num_workers
    report_failure = report_failure or (lambda msg: log.warning("skipped %s", msg))
    split = loader_split(batch_size, num_workers)
    n_forwards, threads_each = _cpu_forwards(rt, forwards, decode, compile, seeds)
    loader = make_loader(paths, preprocess, batch_size // split, num_workers, pin_memory=device.type == "cuda",
                         decode=decode, transform=transform, seeds=seeds, threads=threads_each)
    cuda, pending = device.type == "cuda", None

    def embed_batch(batch) -> tuple:
        """One loader batch -> (indices, vectors or None, failures, CUDA event or None)."""
        if decode == "gpu":
            from ..pipeline.gpu_decode import decode_batch

            idx, images, failed = decode_batch(*batch[:2], paths, preprocess, device)
            failed = batch[2] + failed
        else:
            idx, images, failed = batch
        out, event = None, None
        if images is not None:
            out = rt(images)
            if cuda:  # copy back without a sync: the GPU keeps working while the next batch is prepared
                host = torch.empty(out.shape, dtype=torch.float32, pin_memory=True)
                out, event = host.copy_(out, non_blocking=True), torch.cuda.Event()
                event.record()
        return idx, out, failed, event

    if n_forwards == 1:
        steps = map(embed_batch, _regroup(iter(loader), split, decode, device))
    elif num_workers == 0:  # each forward thread decodes the batch it is about to embed
        def fetch_and_embed(keys):
            return embed_batch(loader.collate_fn(loader.dataset.__getitems__(keys)))

        steps = _in_order(fetch_and_embed, loader.batch_sampler, n_forwards, threads_each)
    else:  # decode processes feed the forward threads
        steps = _in_order(embed_batch, _regroup(iter(loader), split, decode, device), n_forwards, threads_each)
    try:
        with tqdm(total=len(paths), desc=desc, unit="img", disable=not progress, dynamic_ncols=True) as bar:
            while True:
                try:
                    current = next(steps)
                except StopIteration:
                    break
                except BaseException:  # interrupted: hand over the finished batch first (it may complete a shard)
                    if pending is not None:
                        finished, pending = pending, None
                        yield _collect(finished, bar)
                    raise
                for _, msg in current[2]:
                    report_failure(msg)
                if pending is not None:
                    yield _collect(pending, bar)
                    pending = None
                if cuda:  # handed over after the next batch is queued, so the GPU never waits for the copy
                    pending = current
                else:
                    yield _collect(current, bar)
            if pending is not None:
                yield _collect(pending, bar)
    finally:
        if hasattr(steps, "close"):
            steps.close()  # parallel forwards: cancel what is queued, wait for the running ones, restore threads
        embedder.train(was_training)


def _runtime_for(embedder: Embedder, runtime, precision, device, features: bool, cache_dir, forwards: int | None,
                 compile: bool, batch_size: int) -> InferenceRuntime:
    """The runtime `iter_embeddings` runs: the one given, torch.compile'd torch, or `create_runtime`'s choice."""
    if isinstance(runtime, InferenceRuntime):
        if runtime.features != features:
            raise ValueError(f"the runtime given computes {'features' if runtime.features else 'embeddings'}, "
                             f"not {'features' if features else 'embeddings'}")
        return runtime
    if compile:
        if runtime not in (None, "auto", "torch"):
            raise ValueError(f"compile runs torch, not runtime {runtime}")
        from .runtimes import resolve_choice

        dev = resolve_device(device)
        choice = resolve_choice(embedder, "torch", precision, dev)
        return TorchRuntime(embedder, choice.precision, dev, features, forwards, compile=True, pad_to=batch_size)
    return create_runtime(embedder, runtime, precision, device, features, cache_dir, forwards)


def loader_split(batch_size: int, num_workers: int) -> int:
    """How many worker batches make one model batch: the largest divisor of `batch_size` up to min(workers, 8).

    Each DataLoader worker assembles a whole batch alone, so with one worker batch per model batch the first model
    batch waits for one worker to decode all of it (about a second for 256 JPEGs) while the others idle; split over
    several workers it arrives that many times sooner. Steady throughput is the same either way."""
    for split in range(min(num_workers, 8, batch_size), 1, -1):
        if batch_size % split == 0:
            return split
    return 1


def _regroup(batches: Iterator, split: int, decode: str, device: torch.device) -> Iterator:
    """Join `split` consecutive loader batches into one model batch, in order (the last one may be shorter). Images
    are moved to `device` chunk by chunk (asynchronously from pinned memory) and joined there."""
    if split == 1:
        yield from batches
        return
    while True:
        group = [b for _, b in zip(range(split), batches)]
        if not group:
            return
        failed = [f for b in group for f in b[2]]
        if decode == "gpu":  # (indices list, payloads list, failures)
            yield [i for b in group for i in b[0]], [p for b in group for p in b[1]], failed
            continue
        images = [b[1].to(device, non_blocking=True) for b in group if b[1] is not None]
        yield (torch.cat([b[0] for b in group]), torch.cat(images) if images else None, failed)


def _cpu_forwards(rt: InferenceRuntime, forwards: int | None, decode: str, compile: bool,
                  seeds: Sequence[int] | None) -> tuple[int, int | None]:
    """(forward threads side by side, torch intra-op threads each, None: all) for `iter_embeddings`: the runtime's
    `parallel` on CPU with CPU decoding (each thread decodes its own batches), else one forward."""
    if rt.device.type == "cpu" and decode == "cpu" and not compile and seeds is None:
        if isinstance(rt, TorchRuntime):
            return (rt.parallel, rt.threads_each) if rt.parallel > 1 else (1, None)
        return (rt.parallel, 1) if rt.parallel > 1 else (1, None)
    if forwards is not None and forwards > 1:
        raise ValueError(f"forwards={forwards}: parallel forwards run on CPU only, without compile, seeds or "
                         "decode='gpu'")
    return 1, None


def _in_order(fn: Callable, items: Iterable, workers: int, threads_each: int) -> Iterator:
    """fn(item) for every item on `workers` threads with `threads_each` torch intra-op threads each, yielded in item
    order; at most 2 x workers items are taken ahead (bounded memory). Closing it cancels the queued items, waits
    for the running ones and restores torch's thread count (`torch.set_num_threads` also sets the count that
    threads started later get)."""
    before = torch.get_num_threads()
    pool = ThreadPoolExecutor(workers, thread_name_prefix="guie-forward", initializer=torch.set_num_threads,
                              initargs=(threads_each,))
    queued: deque = deque()
    try:
        for item in items:
            queued.append(pool.submit(fn, item))
            if len(queued) >= 2 * workers:
                yield queued.popleft().result()
        while queued:
            yield queued.popleft().result()
    finally:
        for future in queued:
            future.cancel()
        pool.shutdown(wait=True)
        torch.set_num_threads(before)


_forward = torch_forward  # (the name the tests know)


def _collect(pending, bar) -> EmbeddedBatch:
    idx, out, failed, event = pending
    if event is not None:
        event.synchronize()
    bar.update(len(idx) + len(failed))
    emb = out.numpy() if out is not None else np.empty((0, 0), dtype=np.float32)
    return EmbeddedBatch(np.asarray(idx, dtype=np.int64), emb, failed)


def embed_images(embedder: Embedder, paths: Sequence[str], batch_size: int = 64, num_workers: int | None = None,
                 device: str | torch.device | None = None, features: bool = False, progress: bool = True,
                 preprocess: PreprocessConfig | None = None, report_failure: Callable[[str], None] | None = None,
                 desc: str = "embed", decode: str = "cpu", compile: bool = False,
                 forwards: int | None = None, runtime: str | InferenceRuntime | None = "auto",
                 precision: str | None = "auto", cache_dir=None) -> EmbedResult:
    """Embed image files with `embedder` (or extract backbone features when features=True), in memory.

    Arguments as `iter_embeddings`. Returns the vectors of the decodable images in path order, the ok mask and the
    failure messages.
    """
    n = len(paths)
    out = np.empty((n, output_dim(embedder, features)), dtype=np.float32)
    ok = np.zeros(n, dtype=bool)
    errors: list[str] = []
    for b in iter_embeddings(embedder, paths, batch_size, num_workers, device, features, preprocess, decode,
                             compile, progress, report_failure, desc, forwards=forwards, runtime=runtime,
                             precision=precision, cache_dir=cache_dir):
        errors += [msg for _, msg in b.failed]
        if len(b.indices):
            out[b.indices] = b.embeddings
            ok[b.indices] = True
    return EmbedResult(out[ok], ok, errors)


def embed_decoded(embedder: Embedder, images: Sequence[Image.Image | torch.Tensor], batch_size: int = 64,
                  device: str | torch.device | None = None, features: bool = False,
                  runtime: str | InferenceRuntime | None = "auto", precision: str | None = "auto") -> np.ndarray:
    """Embed images already in memory (PIL images, or uint8 [3,S,S] tensors at the model's resolution) -> float32
    [N, d], in the order given: the path for uploads and query images, with the same forward as `iter_embeddings`
    (`runtime`, `precision`: as there, or a runtime already created).
    """
    transform = embedder.transform
    pixels = [im if isinstance(im, torch.Tensor) else transform(im) for im in images]
    out = np.empty((len(pixels), output_dim(embedder, features)), dtype=np.float32)
    was_training = embedder.training
    try:
        rt = _runtime_for(embedder, runtime, precision, device, features, None, None, False, batch_size)
        for lo in range(0, len(pixels), batch_size):
            out[lo:lo + batch_size] = rt.numpy(stack_images(pixels[lo:lo + batch_size]))
    finally:
        embedder.train(was_training)
    return out


def pixel_forward(embedder: Embedder, device: str | torch.device | None = None, features: bool = False,
                  runtime: str | InferenceRuntime | None = "auto", precision: str | None = "auto",
                  forwards: int | None = None) -> Callable[[torch.Tensor], np.ndarray]:
    """A function uint8 images [B, 3, S, S] (the model's input, `embedder.transform` of each) -> float32 [B, d],
    with the runtime prepared once (`guie.embedding.runtimes.create_runtime`) and the same forward as
    `iter_embeddings`; safe to call from `forward.parallel` threads at once (its runtime's layout).

    For callers that assemble batches themselves, e.g. the search server's `DynamicBatcher` merging concurrent
    requests into one forward. The model is left in eval mode."""
    rt = _runtime_for(embedder, runtime, precision, device, features, None, forwards, False, 0)

    def forward(images: torch.Tensor) -> np.ndarray:
        return rt.numpy(images)

    forward.runtime = rt
    forward.parallel = rt.parallel
    return forward


def path_embedder(model, image_size: int | None = None, batch_size: int = 64, progress: bool = False,
                  device: str | torch.device | None = None, runtime: str | None = "auto",
                  precision: str | None = "auto",
                  crop_pct: float | None = None) -> Callable[[Sequence[str]], tuple[np.ndarray, np.ndarray]]:
    """A function paths -> (float32 [N, d] with zero rows where an image could not be read, ok mask [N]) that embeds
    with `model` (an Embedder, checkpoint path or backbone name; default efficientnet_lite0), loaded once, on
    `runtime` at `precision` (created once).

    This is how code below the engine (e.g. `guie.data.dedup`'s embedding detector) gets embeddings without
    importing it."""
    from ..models.embedder import resolve_embedder

    embedder = resolve_embedder(model, image_size=image_size, crop_pct=crop_pct)
    rt = create_runtime(embedder, runtime, precision, device)

    def embed(paths: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        res = embed_images(embedder, [str(p) for p in paths], batch_size=batch_size, runtime=rt,
                           progress=progress, report_failure=lambda msg: None, desc="embed")
        full = np.zeros((len(paths), res.embeddings.shape[1]), dtype=np.float32)
        full[res.ok] = res.embeddings
        return full, res.ok

    return embed
