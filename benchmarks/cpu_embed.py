"""CPU embedding throughput: `embed_images` end to end over image files vs the bare model forward, in one process.

    .venv/bin/python benchmarks/cpu_embed.py [--images 128] [--sources emoji,jpeg] [--rounds 2]

(a) bare: the default embedder (efficientnet_lite0 + 64-d head, 224 px) on pre-loaded uint8 tensors, channels_last,
    inference_mode, at the best of a few batch sizes, one forward on all intra-op threads (the issue's baseline);
(b) bare, N x 1 thread: the same batches as N single-threaded forwards side by side on threads (N = one per
    intra-op thread, `guie.runtime.forward_workers`), the best rate the cores give (as benchmarks/search_serve.py);
(c) guie: `embed_images` over the same files (decode, resize, batch, forward), default settings (on CPU: parallel
    single-threaded forwards, each thread decoding its own batches);
(d) guie, 1 decode process: `embed_images(num_workers=1)`, a DataLoader process decoding for the parallel forwards;
(e) guie, one forward: `embed_images(forwards=1)`, one forward on all threads with the decoding between forwards
    (the default before parallel forwards);
(f) for JPEGs, `embed_images` with the libjpeg-turbo fast path off (GUIE_FAST_JPEG=0: PIL decode and draft).
Sources: `emoji` = real 64-px PNGs of the emoji benchmark (skipped if not built), `jpeg` = generated 640x480 JPEGs.
Ratios are printed against both baselines: guie / bare (a) and guie / best bare (the faster of (a) and (b)).
Everything is warmed up first; measurements then alternate in ABBA order (a, b, c, ... then reversed) for
`--rounds` rounds and the ratios use the sums over rounds, so a drift of the machine's speed affects both sides
alike; the per-round ratios and their median are printed too (on a 2-core VM identical forwards vary by
+-20%). Prints one JSON line per measurement and a summary.
glibc's allocator is tuned at the start (`guie.runtime.tune_cpu_allocator`, as `embed_images` does on CPU), so
all run under the same conditions; `--malloc-ab` instead measures what that tuning itself is worth: the bare
forward in fresh processes with and without it (GUIE_MALLOC_TUNING=0/1), alternating.

    .venv/bin/python benchmarks/cpu_embed.py --malloc-ab [--rounds 2]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from guie.runtime import tune_cpu_allocator  # noqa: E402

# First, as guie's command line does: glibc's arena limit binds only threads that allocate after it is set, and
# importing pandas (here through _common) starts pyarrow's threads, whose arena a forward thread could then share
# (64 MB heaps: every larger activation mapped and unmapped again, ~15% of the parallel forwards' time).
TUNED = tune_cpu_allocator()
from _common import DEFAULT_MANIFEST, cpu_name  # noqa: E402

EMOJI_MANIFEST = DEFAULT_MANIFEST


def emit(record: dict) -> None:
    """One JSON line per measurement (machine-readable, flushed at once)."""
    print(json.dumps(record), flush=True)


def write_jpegs(folder: Path, n: int, size=(640, 480)) -> list[str]:
    """n photo-like JPEGs (smooth colour fields + sensor-like noise, quality 90)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w] / w
    paths = []
    for i in range(n):
        a = rng.uniform(-8, 8, (3, 3))
        img = np.stack([128 + 100 * np.sin(a[c, 0] * xx + a[c, 1] * yy + a[c, 2]) for c in range(3)], -1)
        img += rng.normal(0, 6, img.shape)
        p = folder / f"{i:05d}.jpg"
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(p, quality=90)
        paths.append(str(p))
    return paths


def emoji_paths(n: int) -> list[str] | None:
    """n random emoji PNGs (fixed seed), or None when the benchmark is not built here."""
    if not Path(EMOJI_MANIFEST).is_file():
        return None
    from guie.data.manifest import read_manifest

    df = read_manifest(EMOJI_MANIFEST)
    return df.sample(n=min(n, len(df)), random_state=0)["path"].tolist()


def pil_decode(fn):
    """Run fn with guie's libjpeg-turbo fast path off (GUIE_FAST_JPEG=0): JPEGs decoded by PIL, as before it."""
    old = os.environ.get("GUIE_FAST_JPEG")
    os.environ["GUIE_FAST_JPEG"] = "0"
    try:
        return fn()
    finally:
        if old is None:
            del os.environ["GUIE_FAST_JPEG"]
        else:
            os.environ["GUIE_FAST_JPEG"] = old


def cpu_seconds() -> tuple[float, float]:
    t = os.times()
    return t.user + t.children_user, t.system + t.children_system


def timed(fn) -> dict:
    """Run fn once; wall seconds and process CPU (user, sys) seconds, workers included."""
    u0, s0 = cpu_seconds()
    t0 = time.perf_counter()
    fn()
    wall = time.perf_counter() - t0
    u1, s1 = cpu_seconds()
    return {"wall_s": wall, "user_s": u1 - u0, "sys_s": s1 - s0}


def bare_child(batch_size: int, images: int) -> None:
    """Child of --malloc-ab: bare forward only, tuning per GUIE_MALLOC_TUNING; prints one JSON line."""
    import torch

    from guie.models import create_embedder
    from guie.runtime import tune_cpu_allocator

    tuned = tune_cpu_allocator()
    model = create_embedder().eval().to(memory_format=torch.channels_last)
    x = torch.randint(0, 256, (batch_size, 3, 224, 224), dtype=torch.uint8).contiguous(
        memory_format=torch.channels_last)
    n = max(1, images // batch_size)
    with torch.inference_mode():
        model(x)
        m = timed(lambda: [model(x) for _ in range(n)])
    print(json.dumps({"malloc_tuning": tuned, "batch_size": batch_size, "images": n * batch_size,
                      "img_s": round(n * batch_size / m["wall_s"], 2), **{k: round(v, 2) for k, v in m.items()}}))


def malloc_ab(args) -> None:
    """Bare forward in fresh processes with and without the allocator tuning, alternating; ratio of the sums."""
    import subprocess

    for bs in (int(b) for b in args.batch_sizes.split(",")):
        sums = {"0": [0, 0.0], "1": [0, 0.0]}
        for r in range(args.rounds):
            for flag in ("0", "1"):
                out = subprocess.run([sys.executable, __file__, "--bare-only", str(bs), "--images", str(args.images)],
                                     env={**os.environ, "GUIE_MALLOC_TUNING": flag}, capture_output=True, text=True,
                                     check=True).stdout.strip().splitlines()[-1]
                rec = json.loads(out)
                emit({"round": r, **rec})
                sums[flag][0] += rec["images"]
                sums[flag][1] += rec["wall_s"]
        rate = {f: n / t for f, (n, t) in sums.items()}
        emit({"batch_size": bs, "bare img/s untuned": round(rate["0"], 1), "bare img/s tuned": round(rate["1"], 1),
              "tuned / untuned": round(rate["1"] / rate["0"], 3)})
    print(f"load average at end {os.getloadavg()[0]:.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=128, help="images per source")
    ap.add_argument("--sources", default="emoji,jpeg", help="comma list of emoji, jpeg")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--batch-sizes", default="32,64", help="bare forward batch sizes to try (best is used)")
    ap.add_argument("--no-before", action="store_true",
                    help="skip the comparisons (1 decode process, one forward)")
    ap.add_argument("--malloc-ab", action="store_true", help="measure the allocator tuning alone (subprocesses)")
    ap.add_argument("--bare-only", type=int, default=0, help=argparse.SUPPRESS)  # a --malloc-ab child: batch size
    args = ap.parse_args()
    if args.bare_only:
        return bare_child(args.bare_only, args.images)
    import torch

    from guie.embedding.engine import embed_images
    from guie.imaging.io import load_image
    from guie.imaging.jpeg import fast_jpeg_available
    from guie.models import create_embedder
    from guie.runtime import forward_workers

    print(f"command: {' '.join([Path(sys.executable).name] + sys.argv)}")
    print(f"machine: {cpu_name()}, {os.cpu_count()} cores (affinity {len(os.sched_getaffinity(0))}), "
          f"torch {torch.__version__}, intra-op threads {torch.get_num_threads()}, "
          f"load average at start {os.getloadavg()[0]:.2f}", flush=True)
    if args.malloc_ab:
        return malloc_ab(args)
    print(f"glibc malloc tuning: {'on' if TUNED else 'off'}", flush=True)
    embedder = create_embedder().eval().to(memory_format=torch.channels_last)
    tmp = tempfile.TemporaryDirectory(prefix="guie-cpu-bench-")
    sources = {}
    for name in args.sources.split(","):
        if name == "emoji":
            paths = emoji_paths(args.images)
            if paths is None:
                print(f"emoji: skipped ({EMOJI_MANIFEST} not built; `guie data emoji`)")
                continue
        elif name == "jpeg":
            paths = write_jpegs(Path(tmp.name), args.images)
        else:
            sys.exit(f"unknown source {name!r}")
        sources[name] = paths

    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    n_par, threads_each = forward_workers()
    summary = []
    for name, paths in sources.items():
        x = torch.stack([embedder.transform(load_image(p)) for p in paths]).contiguous(
            memory_format=torch.channels_last)

        def bare(bs):
            with torch.inference_mode():
                for i in range(0, len(x), bs):
                    embedder(x[i:i + bs])

        def bare_parallel(bs):
            """The batches of `bare` as n_par forwards side by side, each on threads_each intra-op threads."""
            def one(i):
                with torch.inference_mode():
                    embedder(x[i:i + bs])

            before = torch.get_num_threads()
            try:
                with ThreadPoolExecutor(n_par, initializer=torch.set_num_threads, initargs=(threads_each,)) as pool:
                    list(pool.map(one, range(0, len(x), bs)))
            finally:
                torch.set_num_threads(before)

        with torch.inference_mode():
            embedder(x[:batch_sizes[0]])  # warm-up: first-call allocations and kernel selection
        trial = {bs: timed(lambda: bare(bs))["wall_s"] for bs in batch_sizes}
        best = min(trial, key=trial.get)
        emit({"source": name, "what": "bare batch-size trial", **{f"bs{k}_img_s": len(x) / v for k, v in trial.items()},
              "best_bs": best})
        par_name = f"bare, {n_par} x {threads_each} thread"
        variants = {"bare": lambda: bare(best)}
        if n_par > 1:
            variants[par_name] = lambda: bare_parallel(best)
        variants["guie"] = lambda: embed_images(embedder, paths, batch_size=best, progress=False)
        if name == "jpeg" and fast_jpeg_available():
            variants["guie, PIL decode"] = lambda: pil_decode(lambda: embed_images(embedder, paths, batch_size=best,
                                                                                   progress=False))
        if not args.no_before:
            variants["guie, 1 decode process"] = lambda: embed_images(embedder, paths, batch_size=best,
                                                                      progress=False, num_workers=1)
            variants["guie, one forward"] = lambda: embed_images(embedder, paths, batch_size=best, progress=False,
                                                                 forwards=1)
        for what, fn in variants.items():  # warm-up of every side (the bare forward was warmed above)
            if what != "bare":
                fn()
        totals = {k: {"wall_s": 0.0, "user_s": 0.0, "sys_s": 0.0} for k in variants}
        walls_per_round = []
        for r in range(args.rounds):
            # ABBA: the order reverses every other round, so a steady drift of the machine's speed (other VMs on the
            # host) weighs on both sides alike
            order = list(variants) if r % 2 == 0 else list(variants)[::-1]
            walls = {}
            for what in order:
                m = timed(variants[what])
                walls[what] = m["wall_s"]
                emit({"source": name, "round": r, "what": what, "images": len(paths), "batch_size": best,
                      "img_s": round(len(paths) / m["wall_s"], 2), **{k: round(v, 2) for k, v in m.items()}})
                for k in m:
                    totals[what][k] += m[k]
            walls_per_round.append(walls)
        n = len(paths) * args.rounds
        row = {"source": name, "images": len(paths), "batch_size": best}
        for what, t in totals.items():
            row[f"{what} img/s"] = round(n / t["wall_s"], 1)
            row[f"{what} sys/user"] = round(t["sys_s"] / max(t["user_s"], 1e-9), 2)
        cpu = {k: t["user_s"] + t["sys_s"] for k, t in totals.items()}
        bares = [k for k in ("bare", par_name) if k in totals]
        best_bare = min(bares, key=lambda k: totals[k]["wall_s"])
        row["best bare"] = best_bare
        for what in [k for k in totals if k.startswith("guie")]:
            label = "guie" if what == "guie" else what
            row[f"{label} / bare"] = round(totals["bare"]["wall_s"] / totals[what]["wall_s"], 3)
            row[f"{label} / best bare"] = round(totals[best_bare]["wall_s"] / totals[what]["wall_s"], 3)
        # CPU seconds per image: the work guie adds, less sensitive than wall time to other jobs on a shared machine
        row["guie / bare (cpu time)"] = round(cpu["bare"] / cpu["guie"], 3)
        for base, key in (("bare", "guie / bare"), (best_bare, "guie / best bare")):
            pairs = [w[base] / w["guie"] for w in walls_per_round]
            row[f"{key} per round"] = [round(v, 3) for v in pairs]
            row[f"{key} (median round)"] = round(float(np.median(pairs)), 3)
        summary.append(row)
    print(f"load average at end {os.getloadavg()[0]:.2f}")
    print("summary (ratios over the sums of all rounds; target guie / bare >= 0.9; best bare = the faster of one "
          "forward on all threads and single-threaded forwards side by side):")
    for row in summary:
        print(json.dumps(row), flush=True)
    tmp.cleanup()


if __name__ == "__main__":
    main()
