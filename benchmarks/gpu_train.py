"""Training throughput: guie's full pipeline vs the bare backbone forward+backward, in one process.

Full pipeline = `guie train` engine on JPEG files: DataLoader workers decode + augment (1st-place augmentations),
uint8 to GPU, channels_last, bf16 autocast, backbone + 64-d head + ArcFace loss, AdamW step. Bare = the same
backbone's forward+backward on pre-loaded GPU tensors (bf16 autocast, random weights), no data, no head; once
without and once with an AdamW step over the backbone. Target: full >= 0.9x bare with the step. Prints JSON lines
(img/s, ratios, peak memory) and writes them to --out.

    python benchmarks/gpu_train.py                      # H100: open_clip ViT-H-14, 224 px, batch 64
    python benchmarks/gpu_train.py --smoke              # CPU check with a tiny model (seconds)
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


def emit(record: dict, out: Path | None) -> None:
    line = json.dumps(record)
    print(line, flush=True)
    if out:
        with open(out, "a") as f:
            f.write(line + "\n")


def _write_jpegs(args) -> int:
    folder, start, n, w, h = args
    from PIL import Image

    rng = np.random.default_rng(start)
    for i in range(start, start + n):
        # smooth random images (noise JPEGs would be unrealistically large and slow to decode)
        small = rng.integers(0, 255, (h // 16, w // 16, 3), dtype=np.uint8)
        Image.fromarray(small).resize((w, h), Image.BICUBIC).save(folder / f"{i:06d}.jpg", quality=90)
    return n


def make_jpegs(folder: Path, n: int, w: int = 640, h: int = 480) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    workers = max(1, (os.cpu_count() or 2) - 1)
    chunk = -(-n // workers)
    with ProcessPoolExecutor(workers) as ex:
        list(ex.map(_write_jpegs, [(folder, s, min(chunk, n - s), w, h) for s in range(0, n, chunk)]))
    return sorted(folder.glob("*.jpg"))


def bare_train(embedder, batch: int, size: int, steps: int, device, bf16: bool, step: bool) -> float:
    """img/s of backbone forward+backward (+ an AdamW step over the backbone when `step`) on pre-loaded tensors."""
    model = embedder.backbone.to(device).train()
    model.to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6) if step else None
    x = torch.randn(batch, 3, size, size, device=device).contiguous(memory_format=torch.channels_last)

    def one():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            model(x).float().square().mean().backward()
        if opt is not None:
            opt.step()
            opt.zero_grad(set_to_none=True)

    for _ in range(3):
        one()
    _sync(device)
    t = time.perf_counter()
    for _ in range(steps):
        one()
    _sync(device)
    return batch * steps / (time.perf_counter() - t)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbone", default="open_clip:ViT-H-14")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=60, help="engine steps (rates after the first log window count)")
    p.add_argument("--images", type=int, default=4096)
    p.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 1))
    p.add_argument("--grad-checkpointing", action="store_true")
    p.add_argument("--smoke", action="store_true", help="tiny model on CPU, a few steps")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    if args.smoke:
        args.backbone, args.size, args.batch, args.steps, args.images, args.workers = \
            "timm:resnet18", 64, 8, 6, 64, 1

    from guie.models import create_embedder
    from guie.train.engine import Trainer
    from guie.train.recipe import DatasetConfig, LossConfig, ModelConfig, RunConfig, StageConfig

    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    bf16 = device.type == "cuda"
    emit({"machine": platform.node(), "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
          "cpus": os.cpu_count(), "torch": torch.__version__, "backbone": args.backbone, "size": args.size,
          "batch": args.batch, "workers": args.workers, "cmd": " ".join(sys.argv)}, args.out)

    tmp = Path(tempfile.mkdtemp(prefix="guie-train-bench-"))
    t = time.time()
    files = make_jpegs(tmp / "jpg", args.images)
    labels = [f"c{i // 4}" for i in range(len(files))]  # 4 images per class
    import pandas as pd

    pd.DataFrame({"path": [str(f) for f in files], "label": labels}).to_csv(tmp / "m.csv", index=False)
    emit({"made_jpegs": len(files), "seconds": round(time.time() - t, 1)}, args.out)

    embedder = create_embedder(args.backbone, embed_dim=64, pretrained=False, image_size=args.size)
    if args.grad_checkpointing:
        embedder.backbone.set_grad_checkpointing(True)
    bare_no_step = bare_train(embedder, args.batch, args.size, max(3, args.steps // 4), device, bf16, step=False)
    emit({"mode": "bare_fwd_bwd", "img_s": round(bare_no_step, 1)}, args.out)
    # The baseline the target names: forward + backward + AdamW step. Its optimizer state is dropped with it.
    bare = bare_train(embedder, args.batch, args.size, max(3, args.steps // 4), device, bf16, step=True)
    emit({"mode": "bare_fwd_bwd_step", "img_s": round(bare, 1)}, args.out)
    embedder.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()

    stage = StageConfig(name="bench", datasets=["jpg"], train=["backbone", "head", "centers"], steps=args.steps,
                        batch_size=args.batch, lr={"backbone": 1e-5, "head": 1e-3, "centers": 1e-3},
                        loss=LossConfig(name="arcface"), feature_cache="off", freeze_bn=False,
                        grad_checkpointing=args.grad_checkpointing,
                        augment={"hflip": 0.5, "jpeg_p": 0.5, "affine_p": 0.7, "cutout_p": 0.5})
    cfg = RunConfig(name="bench", stages=[stage], datasets={"jpg": DatasetConfig(manifest=str(tmp / "m.csv"))},
                    model=ModelConfig(backbone=args.backbone, embed_dim=64, pretrained=False, image_size=args.size),
                    output_dir=tmp / "run", log_every_steps=max(1, args.steps // 6),
                    checkpoint_every_steps=10 ** 9, num_workers=args.workers,
                    device="cuda" if device.type == "cuda" else "cpu")
    trainer = Trainer(cfg, progress=False)
    trainer.embedder.load_state_dict(embedder.state_dict())
    t = time.time()
    trainer.run()
    wall = time.time() - t
    rates = pd.read_csv(tmp / "run" / "metrics.csv")["images_per_s"].dropna().tolist()
    steady = statistics.median(rates[1:]) if len(rates) > 1 else rates[0]
    rec = {"mode": "guie_train_pipeline", "img_s": round(steady, 1), "ratio_vs_bare": round(steady / bare, 3),
           "ratio_vs_bare_fwd_bwd": round(steady / bare_no_step, 3),
           "window_rates": rates, "wall_s_incl_startup": round(wall, 1)}
    if device.type == "cuda":
        rec["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2 ** 30, 2)
    emit(rec, args.out)


if __name__ == "__main__":
    main()
