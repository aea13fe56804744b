"""int8 calibration choices against fp32 on the benchmarks' test classes: NNCF's defaults, then guie's (more images,
full bias correction, head and stem kept out of int8, the rest in bf16), each measured per domain with the same fp32
pass (`guie.evaluate.precision.measure_precision`), and the forward speed of each (`--seconds` of bare forwards).

    .venv/bin/python benchmarks/int8_calibration.py MODEL.pt [--benchmarks emoji] [--variants defaults,guie,...]
        [--json out.json]

MODEL.pt: a checkpoint trained by a recipe (its `config.yaml` beside it names the training images calibrated on).
The checkpoint is copied into a temporary folder, so its own int8 model (if any) is left alone.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

VARIANTS = {
    "nncf defaults (300 images, fast bias correction, nothing kept)":
        {"images": 300, "keep": (), "fast_bias_correction": True},
    "guie defaults (300 images, full bias correction, head+stem kept)":
        {"images": 300, "keep": ("head", "stem"), "fast_bias_correction": False},
    "1000 images, full bias correction, head+stem kept":
        {"images": 1000, "keep": ("head", "stem"), "fast_bias_correction": False},
    "guie defaults, unquantized layers in bf16":
        {"images": 300, "keep": ("head", "stem"), "fast_bias_correction": False, "rest_precision": "bf16"},
    "mixed preset, 300 images, head+stem kept":
        {"images": 300, "keep": ("head", "stem"), "fast_bias_correction": False, "preset": "mixed"},
}


def bare_img_s(rt, size: int, seconds: float, batch: int = 32) -> float:
    """img/s of the runtime's forward on a fixed random batch."""
    import torch

    x = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8).contiguous(memory_format=torch.channels_last)
    rt.numpy(x)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        rt.numpy(x)
        n += batch
    return n / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", type=Path)
    ap.add_argument("--benchmarks", default="emoji")
    ap.add_argument("--variants", default="", help="indices into the variant list (0,1,...); default all")
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    from guie.embedding.runtimes import create_runtime
    from guie.evaluate.precision import measure_precision
    from guie.export.quantize import QuantizeSettings, quantize_checkpoint
    from guie.models import load_embedder

    print(f"command: {' '.join([Path(sys.executable).name] + sys.argv)}")
    print(f"load average at start {os.getloadavg()[0]:.2f}", flush=True)
    tmp = Path(tempfile.mkdtemp(prefix="guie-int8-"))
    ckpt = tmp / "model.pt"
    shutil.copy(args.model, ckpt)
    shutil.copy(args.model.with_name("config.yaml"), tmp / "config.yaml")
    bench = [b for b in args.benchmarks.split(",") if b]
    names = list(VARIANTS)
    if args.variants:
        names = [names[int(i)] for i in args.variants.split(",")]
    reference: dict = {}
    embedder = load_embedder(ckpt)
    size = embedder.preprocess.image_size
    rows = []
    for precision in ("fp32", "bf16"):
        rt = create_runtime(embedder, "openvino", precision, "cpu")
        rows.append({"variant": f"OpenVINO {precision}", "img_s": round(bare_img_s(rt, size, args.seconds), 1)})
        if precision == "bf16":
            check = measure_precision(embedder, "bf16", bench, reference=reference, progress=False)
            rows[-1].update(fp32=check.fp32, scores=check.scores, loss=check.domains)
        print(json.dumps(rows[-1]), flush=True)
    for name in names:
        settings = QuantizeSettings(**VARIANTS[name])
        t0 = time.perf_counter()
        quantize_checkpoint(ckpt, settings=settings, overwrite=True)
        took = time.perf_counter() - t0
        model = load_embedder(ckpt)
        rt = create_runtime(model, "openvino", "int8", "cpu")
        check = measure_precision(model, "int8", bench, runtime=rt, reference=reference, progress=False)
        rows.append({"variant": name, "quantize_s": round(took, 1), "img_s": round(bare_img_s(rt, size, args.seconds),
                                                                                    1),
                     "fp32": check.fp32, "scores": check.scores, "loss": check.domains,
                     "max_abs_diff": check.max_abs_diff, "mean_cosine": check.mean_cosine})
        print(json.dumps(rows[-1]), flush=True)
    print(f"load average at end {os.getloadavg()[0]:.2f}")
    if args.json:
        args.json.write_text(json.dumps({"model": str(args.model), "rows": rows}, indent=1))
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
