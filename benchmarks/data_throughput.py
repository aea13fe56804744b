"""Throughput of `guie data check`, shard writing and shard reading on real images (default: the emoji set).

    .venv/bin/python benchmarks/data_throughput.py [--manifest M]
        [--limit N] [--workers 2]

M defaults to the emoji benchmark's manifest where `guie data emoji` writes it ($GUIE_CACHE or ~/.cache/guie).

Prints images/s for each operation and its ratio to a baseline run in the same process: a plain sequential loop of
`load_image` over the same files (what any data pipeline must at least do).
"""
from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import DEFAULT_MANIFEST, cpu_name  # noqa: E402


def _timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--manifest", default=DEFAULT_MANIFEST)
    ap.add_argument("--limit", type=int, default=None, help="use the first N images")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    args = ap.parse_args()
    if not Path(args.manifest).is_file():
        sys.exit(f"{args.manifest}: not found (build the emoji set with `guie data emoji`, or pass --manifest)")

    from guie.data.manifest import read_manifest
    from guie.data.shards import ShardConfig, ShardStream, write_shards
    from guie.data.validate import CheckConfig, check_manifest
    from guie.imaging.io import load_image

    df = read_manifest(args.manifest)
    if args.limit:
        df = df.head(args.limit)
    n = len(df)
    paths = df["path"].tolist()
    print(f"command: {' '.join([Path(sys.executable).name] + sys.argv)}")
    print(f"machine: {cpu_name()}, {os.cpu_count()} cores, Python {platform.python_version()}")
    print(f"images: {n} from {args.manifest}")

    for p in paths[:200]:  # warm the page cache so the first timed run is not a disk benchmark
        Path(p).read_bytes()
    _, base_s = _timed(lambda: [load_image(p) for p in paths])
    results = [("baseline: sequential load_image loop", base_s)]
    _, s = _timed(lambda: check_manifest(df, CheckConfig(), workers=1, progress=False))
    results.append(("guie data check, 1 process", s))
    _, s = _timed(lambda: check_manifest(df, CheckConfig(), workers=args.workers, progress=False))
    results.append((f"guie data check, {args.workers} processes", s))
    _, s = _timed(lambda: check_manifest(df, CheckConfig(decode=False), workers=args.workers, progress=False))
    results.append((f"guie data check --no-decode, {args.workers} processes", s))

    tmp = Path(tempfile.mkdtemp(prefix="guie-bench-shards-"))
    try:
        _, s = _timed(lambda: write_shards(df, tmp / "keep", ShardConfig(shard_size=1000), workers=args.workers,
                                           progress=False))
        results.append(("guie data shard (copy bytes)", s))
        _, s = _timed(lambda: write_shards(df, tmp / "jpg", ShardConfig(shard_size=1000, image_format="jpg"),
                                           workers=args.workers, progress=False))
        results.append((f"guie data shard --format jpg, {args.workers} processes", s))
        refs = read_manifest(tmp / "keep")["path"].tolist()
        _, s = _timed(lambda: [load_image(r) for r in refs])
        results.append(("random access: load_image(shard reference) loop", s))
        _, s = _timed(lambda: sum(1 for _ in ShardStream(tmp / "keep")))
        results.append(("streaming: ShardStream (decode to PIL)", s))
        mb = sum(f.stat().st_size for f in (tmp / "keep").glob("*.tar")) / 1e6
        print(f"shards (copy bytes): {mb:.1f} MB in {len(list((tmp / 'keep').glob('*.tar')))} files")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    width = max(len(name) for name, _ in results)
    print(f"\n{'operation':<{width}}  {'images/s':>9}  {'vs baseline':>11}")
    for name, secs in results:
        print(f"{name:<{width}}  {n / secs:9.0f}  {base_s / secs:10.2f}x")


if __name__ == "__main__":
    main()
