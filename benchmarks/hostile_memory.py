"""Peak memory of `guie embed` over hostile images vs ordinary photos, each folder in a fresh process.

    .venv/bin/python benchmarks/hostile_memory.py [--model CKPT] [--keep DIR]

Folders: `ordinary` = three 640x480 JPEGs; `hostile` = an 8000x1 PNG, a 1x8000 PNG and a 13000x13000 1-bit PNG
(tens of KB on disk; the 169 Mpx one is refused from its header). Each runs `guie embed FOLDER` in its own Python
process (a tiny random checkpoint unless --model) and reports the process's peak RSS (ru_maxrss) and wall time,
plus the ratio hostile / ordinary; the hardening issue asks for at most 1.10. Before the bounded geometry the
hostile folder took +2.1 GB (the 8000x1 PNG was resized to 2,048,000 x 256 before cropping).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from _common import cpu_name  # noqa: E402

RUN = """
import resource, sys, time
from guie.cli import app
t = time.time()
try:
    app(sys.argv[1:], standalone_mode=False)
except SystemExit:
    pass
print("RESULT", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024, round(time.time() - t, 2), flush=True)
"""


def make_folders(root: Path) -> dict[str, Path]:
    """The two folders of the comparison."""
    from PIL import Image

    from conftest import photo, png_one_bit

    ordinary, hostile = root / "ordinary", root / "hostile"
    ordinary.mkdir()
    hostile.mkdir()
    for i in range(3):
        Image.fromarray(photo(640, 480, seed=i)).save(ordinary / f"photo{i}.jpg", quality=90)
    Image.fromarray(photo(8000, 1, seed=1)).save(hostile / "wide-8000x1.png")
    Image.fromarray(photo(1, 8000, seed=2)).save(hostile / "tall-1x8000.png")
    png_one_bit(hostile / "bitmap-13000x13000.png", 13000, 13000)
    return {"ordinary": ordinary, "hostile": hostile}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="guie checkpoint (default: a tiny random one)")
    ap.add_argument("--keep", default=None, help="build the folders here and keep them")
    args = ap.parse_args()
    root = Path(args.keep or tempfile.mkdtemp(prefix="guie-hostile-"))
    root.mkdir(parents=True, exist_ok=True)
    model = args.model
    if model is None:
        import torch

        from guie.models import create_embedder, save_embedder

        model = str(save_embedder(create_embedder("timm:test_efficientnet", pretrained=False, embed_dim=8,
                                                  image_size=64), root / "tiny.pt"))
        del torch
    folders = make_folders(root)
    peaks = {}
    for name, folder in folders.items():
        out = subprocess.run([sys.executable, "-c", RUN, "embed", str(folder), "-o", str(root / f"{name}.parquet"),
                              "--model", model, "--no-progress", "--overwrite"], capture_output=True, text=True,
                             env=os.environ, check=True)
        line = next(x for x in out.stdout.splitlines() if x.startswith("RESULT"))
        peak_mb, seconds = int(line.split()[1]), float(line.split()[2])
        peaks[name] = peak_mb
        print(json.dumps({"folder": name, "files": sorted(p.name for p in folder.iterdir()), "peak_rss_mb": peak_mb,
                          "seconds": seconds, "report": out.stderr.strip().splitlines()[-1:]}), flush=True)
    print(json.dumps({"hostile_over_ordinary": round(peaks["hostile"] / peaks["ordinary"], 3), "cpu": cpu_name()}))


if __name__ == "__main__":
    main()
