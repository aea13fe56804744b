"""GPU embedding throughput: guie's embedding pipeline over JPEG files vs the bare bf16 forward, in one process.

    python benchmarks/gpu_embed.py                    # H100: 6,144 640x480 JPEGs, open_clip ViT-H-14 (random), bf16
    python benchmarks/gpu_embed.py --smoke            # any machine, CPU ok: tiny ViT, 48 small JPEGs, ~1 min

Steps (each result is printed at once as one JSON line, so a run cut short still reports what it measured):
  1. write N 640x480 JPEGs (Pillow, all cores) into a temp dir;
  2. build the model through guie (`open_clip:ViT-H-14`, pretrained=False: random weights, no network);
  3. bare forward on pre-loaded uint8 GPU tensors (bf16 autocast, channels_last, inference_mode), eager;
  4. data only: the DataLoader alone (PIL decode with W workers; nvJPEG decode with decode="gpu");
  5. guie end to end (`iter_embeddings`, the engine of `embed_images`/`guie embed`) with W workers, eager,
     decode="cpu" then decode="gpu";
  6. torch.compile: bare compiled, then guie end to end compiled (decode cpu and gpu), if the time budget allows;
  7. a summary line: img/s, ratios vs the bare eager and bare compiled forwards, peak GPU memory.
End-to-end rates are given over the whole call (worker start-up included) and in steady state (from the first
batch on; what a long `guie embed` run sees). Targets (H100, ViT-H-14 @224 bf16): bare compiled ~1,336 img/s;
guie end to end >= 0.95x bare.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
import traceback
from multiprocessing import Pool
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
T0 = time.perf_counter()


def emit(record: dict) -> None:
    """One JSON line, flushed (the run may be cut off at any point)."""
    record = {"t": round(time.perf_counter() - T0, 1), **record}
    print(json.dumps(record, default=str), flush=True)


def _write_one(job) -> int:
    """Worker: write one photo-like JPEG (smooth colour fields + noise); returns its size in bytes."""
    from PIL import Image

    path, seed, w, h = job
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32) / w
    a = rng.uniform(-8, 8, (3, 3)).astype(np.float32)
    img = np.stack([128 + 100 * np.sin(a[c, 0] * xx + a[c, 1] * yy + a[c, 2]) for c in range(3)], -1)
    img += rng.normal(0, 6, img.shape).astype(np.float32)
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(path, quality=90)
    return os.path.getsize(path)


def write_jpegs(folder: Path, n: int, w: int, h: int, procs: int) -> list[str]:
    """n JPEGs written in parallel by `procs` processes."""
    jobs = [(str(folder / f"{i:06d}.jpg"), i, w, h) for i in range(n)]
    with Pool(procs) as pool:
        sizes = pool.map(_write_one, jobs, chunksize=16)
    emit({"step": "jpegs", "images": n, "size": f"{w}x{h}", "mean_kib": round(float(np.mean(sizes)) / 1024, 1)})
    return [j[0] for j in jobs]


def machine_info(device) -> dict:
    import torch

    info = {"python": platform.python_version(), "torch": torch.__version__, "cores": os.cpu_count(),
            "intra_op_threads": torch.get_num_threads(), "device": str(device)}
    try:
        import torchvision

        info["torchvision"] = torchvision.__version__
    except ImportError:
        info["torchvision"] = None
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        info |= {"gpu": p.name, "gpu_mem_gib": round(p.total_memory / 2**30, 1), "cuda": torch.version.cuda}
    try:
        info["dev_shm_gib"] = round(shutil.disk_usage("/dev/shm").free / 2**30, 1)
    except OSError:
        info["dev_shm_gib"] = None
    return info


def register_tiny_clip(folder: Path) -> str:
    """A tiny OpenCLIP ViT config (for --smoke): same code path as ViT-H-14, milliseconds per batch."""
    import open_clip

    cfg = {"embed_dim": 32, "vision_cfg": {"image_size": 224, "layers": 2, "width": 64, "patch_size": 32,
                                           "head_width": 32},
           "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 16, "heads": 2, "layers": 1}}
    (folder / "guie-smoke-vit.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(folder)
    return "open_clip:guie-smoke-vit"


def build_model(name: str, device, embed_dim: int):
    """The embedder, created directly on the device when possible (random init of 632M parameters on a CPU is slow)."""
    import torch

    from guie.models import create_embedder

    t = time.perf_counter()
    try:
        with torch.device(device):
            model = create_embedder(name, embed_dim=embed_dim, pretrained=False)
    except Exception as e:  # some init code may not support the device context: build on CPU, then move
        emit({"step": "build", "note": f"on-device build failed ({type(e).__name__}: {e}); building on CPU"})
        model = create_embedder(name, embed_dim=embed_dim, pretrained=False)
    model = model.to(device).eval().to(memory_format=torch.channels_last)
    n_params = sum(p.numel() for p in model.parameters())
    emit({"step": "build", "model": name, "params_m": round(n_params / 1e6, 1), "embed_dim": embed_dim,
          "image_size": model.preprocess.image_size, "seconds": round(time.perf_counter() - t, 1)})
    return model


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device) -> float | None:
    import torch

    return round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None


def bare_forward(fn, device, batch_size: int, image_size: int, batches: int, warmup: int) -> dict:
    """img/s of fn on pre-loaded uint8 tensors on the device (bf16 autocast on CUDA), as guie runs the model."""
    import torch

    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randint(0, 256, (batch_size, 3, image_size, image_size), dtype=torch.uint8, generator=g)
    x = x.to(device).contiguous(memory_format=torch.channels_last)
    reset_peak(device)

    def step():
        with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16,
                                                     enabled=device.type == "cuda"):
            return fn(x).float()

    t = time.perf_counter()
    for _ in range(warmup):
        step()
    sync(device)
    warm_s = time.perf_counter() - t
    t = time.perf_counter()
    for _ in range(batches):
        step()
    sync(device)
    s = time.perf_counter() - t
    return {"img_s": round(batches * batch_size / s, 1), "images": batches * batch_size, "seconds": round(s, 2),
            "warmup_s": round(warm_s, 1), "peak_gib": peak_gib(device)}


def loader_only(paths, model, device, batch_size: int, workers: int, decode: str) -> dict:
    """The data path alone: DataLoader (+ device decode for decode='gpu'), no model."""
    from guie.embedding.engine import make_loader

    pre = model.preprocess
    loader = make_loader(paths, pre, batch_size, workers, pin_memory=device.type == "cuda", decode=decode)
    n, t, t_first = 0, time.perf_counter(), None
    for batch in loader:
        if decode == "gpu":
            from guie.pipeline.gpu_decode import decode_batch

            idx, images, failed = decode_batch(batch[0], batch[1], paths, pre, device)
        else:
            idx, images, failed = batch
            images = images.to(device, non_blocking=True)
        n += len(idx)
        if t_first is None:
            sync(device)
            t_first, n_first = time.perf_counter(), n
    sync(device)
    total = time.perf_counter() - t
    steady = (n - n_first) / max(1e-9, time.perf_counter() - t_first) if n > n_first else None
    return {"img_s": round(n / total, 1), "steady_img_s": round(steady, 1) if steady else None, "images": n,
            "seconds": round(total, 2)}


def guie_end_to_end(paths, model, device, batch_size: int, workers: int, decode: str, compile: bool) -> dict:
    """`iter_embeddings` over the files, gathering results as `embed_images` does; whole-call and steady img/s."""
    from guie.embedding.engine import iter_embeddings

    reset_peak(device)
    out = np.empty((len(paths), model.embed_dim), np.float32)
    failures, n, t_first, n_first = 0, 0, None, 0
    t = time.perf_counter()
    for b in iter_embeddings(model, paths, batch_size=batch_size, num_workers=workers, device=device,
                             decode=decode, compile=compile, progress=False, report_failure=lambda m: None):
        out[b.indices] = b.embeddings
        n += len(b.indices)
        failures += len(b.failed)
        if t_first is None:
            t_first, n_first = time.perf_counter(), n
    total = time.perf_counter() - t
    steady = (n - n_first) / max(1e-9, time.perf_counter() - t_first) if n > n_first else None
    EMBEDDINGS[(decode, compile)] = out[:n]
    norms = np.linalg.norm(out[:n], axis=1) if n else np.ones(1)
    return {"img_s": round(n / total, 1), "steady_img_s": round(steady, 1) if steady else None, "images": n,
            "failed": failures, "seconds": round(total, 2), "first_batch_s": round(t_first - t, 2) if t_first else None,
            "peak_gib": peak_gib(device), "norms_ok": bool(np.allclose(norms, 1, atol=1e-3))}


EMBEDDINGS: dict[tuple[str, bool], np.ndarray] = {}  # (decode, compile) -> the end-to-end run's embeddings


def agreement(a: np.ndarray, b: np.ndarray) -> dict:
    """How far two runs' embeddings of the same files are apart (unit vectors: max |diff|, min cosine)."""
    n = min(len(a), len(b))
    a, b = a[:n], b[:n]
    return {"images": n, "max_abs_diff": round(float(np.abs(a - b).max()), 5),
            "mean_abs_diff": round(float(np.abs(a - b).mean()), 6),
            "min_cosine": round(float((a * b).sum(1).min()), 5)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="tiny model, few small images, CPU allowed (a check)")
    ap.add_argument("--model", default=None, help="guie backbone name (default open_clip:ViT-H-14)")
    ap.add_argument("--images", type=int, default=None, help="JPEG files to write (default 6144; smoke 48)")
    ap.add_argument("--repeat-files", type=int, default=1, help="embed the file list this many times over")
    ap.add_argument("--size", default="640x480", help="JPEG size WxH")
    ap.add_argument("--batch-size", type=int, default=None, help="default 256 (smoke 8)")
    ap.add_argument("--workers", type=int, default=None, help="decode workers (default 16, capped at cores; smoke 2)")
    ap.add_argument("--bare-batches", type=int, default=None, help="timed batches of the bare forward (default 16)")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile measurements")
    ap.add_argument("--decoders", default="cpu,gpu", help="comma list of decode modes to measure")
    ap.add_argument("--budget", type=float, default=200.0,
                    help="seconds after which optional steps (compiled runs, repeats) are skipped")
    ap.add_argument("--device", default=None, help="default cuda if available else cpu")
    args = ap.parse_args()

    try:
        import guie  # noqa: F401
    except ImportError:  # a bare checkout: use its src/
        sys.path.insert(0, str(REPO / "src"))
    smoke = args.smoke
    n_images = args.images or (48 if smoke else 6144)
    batch_size = args.batch_size or (8 if smoke else 256)
    workers = args.workers if args.workers is not None else (2 if smoke else min(16, os.cpu_count() or 1))
    bare_batches = args.bare_batches or (3 if smoke else 16)
    w, h = (int(v) for v in (("128x96" if smoke and args.size == "640x480" else args.size).split("x")))
    emit({"step": "start", "command": " ".join([Path(sys.executable).name] + sys.argv), "cores": os.cpu_count()})
    tmp = Path(tempfile.mkdtemp(prefix="guie-gpu-bench-"))
    # The files are written by forked processes before CUDA is initialised in this one.
    paths = write_jpegs(tmp, n_images, w, h, procs=max(1, min(os.cpu_count() or 1, 32))) * max(1, args.repeat_files)

    import torch

    from guie.utils import resolve_device

    device = resolve_device(args.device)
    emit({"step": "machine", **machine_info(device)})
    if device.type != "cuda" and not smoke:
        emit({"step": "warning", "note": "no CUDA device: numbers are CPU numbers (use --smoke for a quick check)"})
    results: dict[str, dict] = {}

    def attempt(name: str, fn, optional: bool = False) -> dict | None:
        """Run one measurement; a failure is reported and the run goes on."""
        elapsed = time.perf_counter() - T0
        if optional and elapsed > args.budget:
            emit({"step": name, "skipped": f"time budget: {elapsed:.0f}s > {args.budget:.0f}s"})
            return None
        try:
            r = fn()
        except Exception as e:
            emit({"step": name, "error": f"{type(e).__name__}: {e}",
                  "trace": traceback.format_exc(limit=3).splitlines()[-3:]})
            if device.type == "cuda":
                torch.cuda.empty_cache()
            return None
        results[name] = r
        emit({"step": name, **r})
        return r

    name = args.model or ("open_clip:guie-smoke-vit" if smoke else "open_clip:ViT-H-14")
    try:
        # Without open_clip installed (e.g. a bare GPU image), timm's vit_huge_patch14_clip_224 is the same ViT-H/14
        # image tower (width 1280, 32 blocks, patch 14): same FLOPs, same guie code path apart from the builder.
        fallback = "timm:test_vit" if smoke else "timm:vit_huge_patch14_clip_224"
        try:
            if smoke and args.model is None:
                name = register_tiny_clip(tmp)
            model = build_model(name, device, embed_dim=64)
        except ImportError as e:
            emit({"step": "build", "note": f"{name}: {e}; using {fallback}"})
            name = fallback
            model = build_model(name, device, embed_dim=64)
        size = model.preprocess.image_size
        decoders = [d for d in args.decoders.split(",") if d]

        attempt("bare eager", lambda: bare_forward(model, device, batch_size, size, bare_batches, warmup=3))
        for dec in decoders:
            attempt(f"loader only decode={dec}", lambda dec=dec: loader_only(paths, model, device, batch_size,
                                                                             workers, dec))
        for dec in decoders:
            attempt(f"guie eager decode={dec}", lambda dec=dec: guie_end_to_end(paths, model, device, batch_size,
                                                                                workers, dec, compile=False))
        if ("cpu", False) in EMBEDDINGS and ("gpu", False) in EMBEDDINGS:
            emit({"step": "agreement decode=cpu vs decode=gpu (eager)",
                  **agreement(EMBEDDINGS["cpu", False], EMBEDDINGS["gpu", False])})
        if not args.no_compile:
            compiled = torch.compile(model, dynamic=False)
            attempt("bare compiled", lambda: bare_forward(compiled, device, batch_size, size, bare_batches,
                                                          warmup=2), optional=True)
            if "bare compiled" in results:
                for dec in decoders:
                    attempt(f"guie compiled decode={dec}",
                            lambda dec=dec: guie_end_to_end(paths, model, device, batch_size, workers, dec,
                                                            compile=True), optional=True)
        if ("cpu", False) in EMBEDDINGS and ("cpu", True) in EMBEDDINGS:
            emit({"step": "agreement eager vs compiled (decode=cpu)",
                  **agreement(EMBEDDINGS["cpu", False], EMBEDDINGS["cpu", True])})
    finally:
        summary = {"step": "summary", "model": name,
                   "batch_size": batch_size, "workers": workers, "images": n_images * max(1, args.repeat_files)}
        for key in ("bare eager", "bare compiled"):
            if key in results:
                summary[f"{key} img/s"] = results[key]["img_s"]
        for name, r in results.items():
            if name.startswith("guie") or name.startswith("loader"):
                summary[f"{name} img/s"] = r["img_s"]
                summary[f"{name} steady img/s"] = r["steady_img_s"]
                for base in ("bare eager", "bare compiled"):
                    if base in results and name.startswith("guie"):
                        summary[f"{name} / {base}"] = round(r["img_s"] / results[base]["img_s"], 3)
                        if r["steady_img_s"]:
                            summary[f"{name} steady / {base}"] = round(r["steady_img_s"] / results[base]["img_s"], 3)
        emit(summary)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
