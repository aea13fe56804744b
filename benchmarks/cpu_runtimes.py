"""CPU inference runtimes: bare forwards of every runtime, then `guie embed` and `guie serve` end to end, with peak RSS.

    .venv/bin/python benchmarks/cpu_runtimes.py [--images 1000] [--rounds 2] [--bare-rounds 3] [--json out.json]
        [--model CHECKPOINT] [--variants "torch eager,openvino bf16"] [--sources png,jpeg] [--no-serve]

The model is guie's default embedder (EfficientNet-Lite0 + a 64-d head, seed 0, 224 px), saved once, or `--model`
(e.g. the demo's checkpoint, whose recorded bf16 check lets `auto` choose bf16 on a native-bf16 CPU); every
measurement runs in its own process (ONNX Runtime's and OpenVINO's thread pools, torch's OpenMP team and the glibc
heap of one would otherwise colour the next), built through the runtime registry (`guie.embedding.runtimes`).

1. conversion (skip with --no-conversion): OpenVINO's own PyTorch conversion (`ov.convert_model(module)`, what guie
   uses) against guie's ONNX export read by OpenVINO: seconds to convert, bare img/s, max abs diff to torch.
2. bare forward, batch `--batch` of real preprocessed images (emoji PNGs; generated images where the set is not
   built), `--bare-seconds` per measurement, alternating A..F then F..A for `--bare-rounds` rounds: torch eager
   (guie's layout: one single-threaded forward per core side by side; and one forward on all cores), torch.compile,
   ONNX Runtime, OpenVINO fp32 (one stream per core; and one stream on all cores), OpenVINO bf16 (only on a CPU with
   native bf16). img/s from the sums over rounds.
3. end to end, over `--images` emoji PNGs and as many generated 640x480 JPEGs, alternating for `--rounds` rounds:
   `guie embed` with defaults (auto), `guie embed --runtime torch` (the path before runtimes), and a bare loop in the
   benchmark ("decode + resize + forward": `ImageTransform.load` per image, then the auto runtime's forward per
   batch, one thread). img/s is guie's own "embedded N images in X s" (the embedding phase; the command's whole
   wall time, imports and start included, is printed too); peak RSS of each process (`ru_maxrss`, as
   `/usr/bin/time -f %M`). The first `guie embed` converts the model (cold, reported apart).
4. `guie serve` (benchmarks/search_serve.py, `--clients` clients, one image per request): served img/s, its RSS at
   rest and under load; the ratio to the fastest bare forward of (2) at the same precision.
The summary prints each target of issue 27 beside the measured ratio. Everything is bounded; on a shared machine the
figures are noisy (the load average is printed at start and end): rerun on a quiet one.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import cpu_name  # noqa: E402

HERE = Path(__file__).resolve().parent
BARE = ["torch eager", "torch eager, one forward", "torch.compile", "onnxruntime", "openvino fp32",
        "openvino fp32, one stream", "openvino bf16", "openvino int8"]  # int8: only with --model quantized


def emit(record: dict) -> None:
    print(json.dumps(record), flush=True)


def run_child(args: list[str], env: dict | None = None, timeout: float = 1800) -> tuple[str, str, float, float]:
    """Run a process to its end: (stdout, stderr, wall seconds, peak RSS in MB from its rusage)."""
    t0 = time.perf_counter()
    args = [str(a) for a in args]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **(env or {})})
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
    wall = time.perf_counter() - t0
    rss = 0.0
    try:
        import resource

        rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024  # the largest child so far
    except ImportError:  # pragma: no cover - not Linux
        pass
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(map(str, args))} failed ({proc.returncode}):\n{err[-3000:]}")
    return out, err, wall, rss


def child_rss(args: list[str], env: dict | None = None) -> tuple[str, str, float, float]:
    """`run_child` through a fresh wrapper process, so the peak RSS is this child's alone (RUSAGE_CHILDREN keeps the
    maximum over all children ever waited for)."""
    code = ("import resource, subprocess, sys, time, json; t=time.perf_counter(); "
            "p=subprocess.run(sys.argv[1:], capture_output=True, text=True); "
            "w=time.perf_counter()-t; sys.stdout.write(p.stdout); sys.stderr.write(p.stderr); "
            "print(json.dumps({'__rss_mb': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, "
            "'__wall_s': w}), file=sys.stderr); sys.exit(p.returncode)")
    out, err, _, _ = run_child([sys.executable, "-c", code, *map(str, args)], env)
    meta = json.loads(err.strip().splitlines()[-1])
    return out, err, meta["__wall_s"], meta["__rss_mb"]


# ---------------------------------------------------------------- children (each in its own process)

def _load(model: Path):
    from guie.models import load_embedder

    return load_embedder(model).eval()


def _batch(images: Path, n: int):
    import numpy as np
    import torch

    arr = np.load(images)[:n]
    return torch.from_numpy(arr).permute(0, 3, 1, 2)  # NHWC storage: channels_last, as the engine's batches


def bare_child(variant: str, model: Path, images: Path, batch: int, seconds: float) -> dict:
    """img/s of one variant's forward on the preprocessed batch, in a loop for `seconds` after a warm-up."""
    import threading

    import torch

    from guie.embedding.runtimes import create_runtime
    from guie.embedding.runtimes.torch_runtime import TorchRuntime
    from guie.runtime import tune_cpu_allocator

    tune_cpu_allocator()
    embedder, x = _load(model), _batch(images, batch)
    callers = 1
    if variant == "torch eager":
        rt = create_runtime(embedder, "torch", "fp32", "cpu")
        callers = rt.parallel
    elif variant == "torch eager, one forward":
        rt = create_runtime(embedder, "torch", "fp32", "cpu", forwards=1)
    elif variant == "torch.compile":
        rt = TorchRuntime(embedder, "fp32", torch.device("cpu"), False, compile=True, pad_to=batch)
    elif variant == "onnxruntime":
        rt = create_runtime(embedder, "onnxruntime", "fp32", "cpu")
    elif variant.startswith("openvino"):
        rt = create_runtime(embedder, "openvino", variant.split()[1].rstrip(","), "cpu",
                            forwards=1 if "one stream" in variant else None)
    else:
        raise SystemExit(f"unknown variant {variant!r}")
    threads_each = getattr(rt, "threads_each", None)
    for _ in range(2):
        rt.numpy(x)
    counts, stop = [0] * callers, time.perf_counter() + seconds

    def loop(i: int) -> None:
        if threads_each:
            torch.set_num_threads(threads_each)
        while time.perf_counter() < stop:
            rt.numpy(x)
            counts[i] += len(x)

    t0 = time.perf_counter()
    workers = [threading.Thread(target=loop, args=(i,)) for i in range(callers)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    return {"variant": variant, "images": sum(counts), "seconds": time.perf_counter() - t0, "layout": rt.layout,
            "precision": rt.precision}


def loop_child(model: Path, paths_file: Path, batch: int) -> dict:
    """The bare "decode + resize + forward" loop: one thread decodes a batch, then the auto runtime embeds it."""
    import torch

    from guie.embedding.runtimes import create_runtime
    from guie.pipeline.datasets import stack_images
    from guie.runtime import tune_cpu_allocator

    tune_cpu_allocator()
    embedder = _load(model)
    rt = create_runtime(embedder, "auto", "auto", "cpu")
    paths = paths_file.read_text().split("\n")
    transform = embedder.transform
    rt.numpy(torch.zeros(2, 3, 224, 224, dtype=torch.uint8))
    t0 = time.perf_counter()
    for lo in range(0, len(paths), batch):
        rt.numpy(stack_images([transform.load(p) for p in paths[lo:lo + batch]]))
    took = time.perf_counter() - t0
    return {"images": len(paths), "seconds": took, "runtime": rt.name, "precision": rt.precision}


def conversion_child(model: Path, images: Path, batch: int, seconds: float) -> list[dict]:
    """Both conversion paths: seconds, bare img/s (one compiled model each, guie's thread layout), max abs diff."""
    import warnings

    import numpy as np
    import openvino as ov
    import torch

    from guie.embedding.runtimes.onnxruntime_runtime import export_onnx_bytes
    from guie.embedding.runtimes.openvino_runtime import ForwardModule, example_images

    embedder, x = _load(model), _batch(images, batch)
    with torch.inference_mode():
        ref = embedder(x.contiguous()).numpy()
    size = embedder.preprocess.image_size
    out = []
    for path in ("ov.convert_model(PyTorch module)", "guie's ONNX export + ov.convert_model(ONNX)"):
        t0 = time.perf_counter()
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            if path.startswith("ov."):
                m = ov.convert_model(ForwardModule(embedder, False), example_input=example_images(embedder),
                                     input=[(-1, 3, size, size)])
            else:
                with tempfile.TemporaryDirectory() as tmp:
                    (Path(tmp) / "m.onnx").write_bytes(export_onnx_bytes(embedder, False))
                    m = ov.convert_model(str(Path(tmp) / "m.onnx"))
        took = time.perf_counter() - t0
        n = torch.get_num_threads()
        compiled = ov.Core().compile_model(m, "CPU", {"INFERENCE_PRECISION_HINT": "f32", "NUM_STREAMS": n,
                                                      "INFERENCE_NUM_THREADS": n, "PERFORMANCE_HINT": "THROUGHPUT"})
        arr = np.ascontiguousarray(x.contiguous().numpy())
        diff = float(np.abs(compiled(arr)[0] - ref).max())
        queue = ov.AsyncInferQueue(compiled, n)
        chunks = np.array_split(arr, max(1, len(arr) // 4))
        done, t1 = 0, time.perf_counter()
        while time.perf_counter() - t1 < seconds:
            for c in chunks:
                queue.start_async({0: c})
            queue.wait_all()
            done += len(arr)
        out.append({"conversion": path, "convert_s": round(took, 1),
                    "img_s": round(done / (time.perf_counter() - t1), 1), "max_abs_diff": diff})
    return out


# ---------------------------------------------------------------- the parent

def prepare_images(tmp: Path, n: int) -> tuple[list[str], list[str]]:
    """(emoji PNG paths or generated PNGs, generated 640x480 JPEG paths)."""
    from cpu_embed import emoji_paths, write_jpegs

    png = emoji_paths(n)
    if png is None:
        import numpy as np
        from PIL import Image

        (tmp / "png").mkdir()
        rng = np.random.default_rng(0)
        png = []
        for i in range(n):
            p = tmp / "png" / f"{i:05d}.png"
            Image.fromarray(rng.integers(0, 256, (72, 72, 3), dtype=np.uint8)).save(p)
            png.append(str(p))
    (tmp / "jpeg").mkdir()
    return png, write_jpegs(tmp / "jpeg", n)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=1000, help="images per source for the end-to-end runs")
    ap.add_argument("--rounds", type=int, default=2, help="rounds of the end-to-end runs")
    ap.add_argument("--bare-rounds", type=int, default=3)
    ap.add_argument("--bare-seconds", type=float, default=8.0)
    ap.add_argument("--batch", type=int, default=32, help="bare forward batch")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--serve-seconds", type=float, default=15.0)
    ap.add_argument("--no-conversion", action="store_true")
    ap.add_argument("--no-serve", action="store_true")
    ap.add_argument("--no-torch-embed", action="store_true", help="leave out `guie embed --runtime torch`")
    ap.add_argument("--model", type=Path, help="checkpoint to run (default: a fresh default embedder)")
    ap.add_argument("--variants", default="", help="comma-separated bare variants (default: all)")
    ap.add_argument("--sources", default="png,jpeg", help="end-to-end sources: png (emoji) and/or jpeg (640x480)")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        kind, *rest = args.child
        if kind == "bare":
            emit(bare_child(rest[0], Path(rest[1]), Path(rest[2]), int(rest[3]), float(rest[4])))
        elif kind == "loop":
            emit(loop_child(Path(rest[0]), Path(rest[1]), int(rest[2])))
        else:
            for rec in conversion_child(Path(rest[0]), Path(rest[1]), int(rest[2]), float(rest[3])):
                emit(rec)
        return

    import numpy as np
    import torch

    from guie.embedding.runtimes import cpu_has_native_bf16
    from guie.models import create_embedder, save_embedder

    versions = {"torch": torch.__version__}
    for mod in ("openvino", "onnxruntime"):
        try:
            versions[mod] = __import__(mod).__version__
        except ImportError:
            versions[mod] = "missing"
    bf16 = cpu_has_native_bf16()
    print(f"command: {' '.join([Path(sys.executable).name] + sys.argv)}")
    print(f"machine: {cpu_name()}, {os.cpu_count()} cores, native bf16: {bf16}, {versions}, "
          f"load average at start {os.getloadavg()[0]:.2f}", flush=True)
    report: dict = {"machine": cpu_name(), "cores": os.cpu_count(), "native_bf16": bf16, "versions": versions,
                    "load_start": os.getloadavg()[0]}
    tmp_dir = tempfile.TemporaryDirectory(prefix="guie-cpu-runtimes-")
    tmp = Path(tmp_dir.name)
    env = {"GUIE_CACHE": str(tmp / "cache")}  # a fresh conversion cache: the first embed converts (cold)
    if args.model:  # a copy with the files beside it (its int8 model, recipe): the original stays as it is
        import shutil

        model = tmp / "model" / args.model.name
        shutil.copytree(args.model.parent, model.parent, ignore=shutil.ignore_patterns("checkpoints", "tensorboard"))
    else:
        model = save_embedder(create_embedder(embed_dim=64, seed=0), tmp / "model.pt")
    png, jpeg = prepare_images(tmp, args.images)
    from guie.imaging.io import load_image
    from guie.models import load_embedder

    transform = load_embedder(model).transform  # the model's own preprocessing (the demo's: crop_pct 1.0)
    batch = np.stack([transform(load_image(p)).permute(1, 2, 0).numpy() for p in png[:args.batch]])
    np.save(tmp / "batch.npy", batch)
    me = [sys.executable, __file__, "--child"]

    # 1. conversion paths
    if not args.no_conversion:
        out, *_ = run_child(me + ["conversion", model, tmp / "batch.npy", args.batch, args.bare_seconds], env)
        report["conversion"] = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
        for rec in report["conversion"]:
            emit({"phase": "conversion", **rec})

    # 2. bare forwards, each in its own process; the converting ones warmed once (conversion cached)
    wanted = [v.strip() for v in args.variants.split(",") if v.strip()] or [v for v in BARE if "int8" not in v]
    variants = [v for v in BARE if v in wanted and (bf16 or "bf16" not in v)]
    if not bf16:
        emit({"phase": "bare", "variant": "openvino bf16", "skipped": "this CPU has no native bf16"})
    for v in [v for v in ("onnxruntime", "openvino fp32") if v in variants or v == "openvino fp32"]:
        run_child(me + ["bare", v, model, tmp / "batch.npy", args.batch, 0.1], env)
    sums = {v: [0, 0.0] for v in variants}
    for r in range(args.bare_rounds):
        for v in (variants if r % 2 == 0 else variants[::-1]):
            out, *_ = run_child(me + ["bare", v, model, tmp / "batch.npy", args.batch, args.bare_seconds], env)
            rec = json.loads(out.strip().splitlines()[-1])
            sums[v][0] += rec["images"]
            sums[v][1] += rec["seconds"]
            emit({"phase": "bare", "round": r + 1, **rec, "img_s": round(rec["images"] / rec["seconds"], 1)})
    bare = {v: n / t for v, (n, t) in sums.items()}
    report["bare_img_s"] = {v: round(x, 1) for v, x in bare.items()}
    eager = bare.get("torch eager")
    for v, x in bare.items():
        emit({"phase": "bare summary", "variant": v, "img_s": round(x, 1),
              "vs torch eager": round(x / eager, 2) if eager else None})
    fastest_fp32 = max((x for v, x in bare.items() if "bf16" not in v), default=0.0)
    fastest = max(bare.values())

    # 3. end to end
    guie = [sys.executable, "-m", "guie.cli"]
    lists = {}
    picked = {s.strip() for s in args.sources.split(",")}
    sources = [(n, p) for key, n, p in (("png", "emoji png", png), ("jpeg", "jpeg 640x480", jpeg)) if key in picked]
    for name, paths in sources:
        pd_path = tmp / f"{name.split()[0]}.csv"
        import pandas as pd

        pd.DataFrame({"path": paths}).to_csv(pd_path, index=False)
        (tmp / f"{name.split()[0]}.txt").write_text("\n".join(paths))
        lists[name] = (pd_path, tmp / f"{name.split()[0]}.txt")
    _, err, wall, rss = child_rss(guie + ["embed", next(iter(lists.values()))[0], "-o", tmp / "cold.parquet",
                                          "--model", model, "--no-progress"], env)
    report["cold_embed"] = {"wall_s": round(wall, 1), "peak_rss_mb": round(rss), "log": _chosen(err)}
    emit({"phase": "embed cold (converts)", **report["cold_embed"]})
    e2e = {}
    kinds = [k for k in ("guie embed (auto)", "guie embed --runtime torch", "bare decode+resize+forward loop")
             if not (args.no_torch_embed and "torch" in k)]
    for name, (manifest, listing) in lists.items():
        sums = {k: [0, 0.0, 0.0, 0.0] for k in kinds}  # images, embedding seconds, wall seconds, peak RSS
        for r in range(args.rounds):
            for k in (kinds if r % 2 == 0 else kinds[::-1]):
                if k.startswith("guie"):
                    extra = ["--runtime", "torch"] if "torch" in k else []
                    _, err, wall, rss = child_rss(guie + ["embed", manifest, "-o", tmp / "e.parquet", "--model",
                                                          model, "--no-progress", "--overwrite", *extra], env)
                    m = re.search(r"embedded (\d+) images in ([\d.]+) s", err)
                    n, secs = int(m.group(1)), float(m.group(2))
                else:
                    out, _, wall, rss = child_rss(me + ["loop", model, listing, 64], env)
                    rec = json.loads(out.strip().splitlines()[-1])
                    n, secs = rec["images"], rec["seconds"]
                s = sums[k]
                s[0] += n
                s[1] += secs
                s[2] += wall
                s[3] = max(s[3], rss)
                emit({"phase": "end to end", "source": name, "round": r + 1, "variant": k, "images": n,
                      "img_s": round(n / secs, 1), "wall_s": round(wall, 1), "peak_rss_mb": round(rss)})
        e2e[name] = {k: {"img_s": round(s[0] / s[1], 1), "wall_img_s": round(s[0] / s[2], 1),
                         "peak_rss_mb": round(s[3])} for k, s in sums.items()}
        emit({"phase": "end to end summary", "source": name, **e2e[name]})
    report["end_to_end"] = e2e

    # 4. serve
    if not args.no_serve:
        out_json = tmp / "serve.json"
        run_child([sys.executable, HERE / "search_serve.py", "--clients", args.clients, "--rounds", 1,
                   "--searches", 5, "--seconds", args.serve_seconds, "--json", out_json], env)
        serve = json.loads(out_json.read_text())
        report["serve"] = {k: serve.get(k) for k in ("served_img_per_s", "rss_at_rest_mb", "rss_under_load_mb",
                                                     "bare_img_per_s")}
        emit({"phase": "serve", **report["serve"]})

    # summary against the targets
    chosen = report["cold_embed"]["log"]
    m = re.match(r"inference: (\S+) (\S+) on", chosen)  # the runtime and precision `auto` chose
    chosen_precision = m.group(2) if m else "fp32"
    same_precision = bare.get(f"openvino {chosen_precision}", fastest if chosen_precision != "fp32" else fastest_fp32)
    rows, mem = [], []

    def ratio(source: str, kind: str, other: str | float) -> float | None:
        if source not in e2e or kind not in e2e[source]:
            return None
        base = other if isinstance(other, float) else e2e[source].get(other, {}).get("img_s")
        return e2e[source][kind]["img_s"] / base if base else None

    rows.append(("guie embed (auto) / fastest bare forward, emoji PNGs",
                 ratio("emoji png", "guie embed (auto)", same_precision), 0.9))
    rows.append(("guie embed (auto) / bare decode+resize+forward loop, JPEGs",
                 ratio("jpeg 640x480", "guie embed (auto)", "bare decode+resize+forward loop"), 0.9))
    rows.append(("guie embed (auto) / guie embed --runtime torch, emoji PNGs",
                 ratio("emoji png", "guie embed (auto)", "guie embed --runtime torch"), 2.5))
    rows.append(("guie embed (auto) / guie embed --runtime torch, JPEGs",
                 ratio("jpeg 640x480", "guie embed (auto)", "guie embed --runtime torch"), 2.0))
    if "serve" in report and same_precision:
        rows.append(("guie serve, 8 clients / fastest bare forward", report["serve"]["served_img_per_s"] /
                     same_precision, 0.8))
    rows = [r for r in rows if r[1] is not None]
    for source, label in (("emoji png", "emoji PNGs"), ("jpeg 640x480", "JPEGs")):
        if source in e2e:
            mem.append((f"guie embed (auto) peak RSS MB, {label}", e2e[source]["guie embed (auto)"]["peak_rss_mb"]))
    report["targets"] = [{"what": w, "ratio": round(x, 3), "target": t, "met": x >= t} for w, x, t in rows]
    if "serve" in report:
        mem += [("guie serve RSS MB at rest", report["serve"]["rss_at_rest_mb"]),
                ("guie serve RSS MB under 8 clients", report["serve"]["rss_under_load_mb"])]
    report["memory"] = [{"what": w, "mb": v, "target": 1200, "met": v is not None and v <= 1200} for w, v in mem]
    report["load_end"] = os.getloadavg()[0]
    print("\nsummary (targets of issue 27):")
    for t in report["targets"]:
        print(f"  {t['what']:62s} {t['ratio']:6.2f}x  (target >= {t['target']}x: {'met' if t['met'] else 'MISSED'})")
    for m in report["memory"]:
        print(f"  {m['what']:62s} {m['mb']:6}    (target <= 1200: {'met' if m['met'] else 'MISSED'})")
    print(f"load average at end {report['load_end']:.2f}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))


def _chosen(err: str) -> str:
    """The engine's one log line saying which runtime, precision and layout it chose."""
    return next((line for line in err.splitlines() if line.startswith("inference:")), "")


if __name__ == "__main__":
    main()
