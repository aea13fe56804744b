"""Seeded training runs on generated images, one hash each: to check that a change to the trainer leaves training
bit for bit as it was.

    python scripts/train_hashes.py /tmp/hashes [run names]      # on each of two commits, with the same folder path

Runs: basic (head on cached features, then backbone on images, validation), distill (relational + mirror terms),
imgmirror (the mirror term where the backbone trains), multi (added dataset, locked centres, accumulation, EMA, grad
clipping, warm-up, domain-balanced sampler, CosFace with sub-centres), stagedist (an earlier stage as teacher). Each
hash covers model.pt, checkpoints/last.pt (RNG and config left out) and metrics.csv (throughput left out). Augmented
feature views are seeded by image path, so compare runs made in the same folder (delete it in between).
"""
import hashlib
import json
import sys
from pathlib import Path

import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from guie.models.embedder import create_embedder, save_embedder  # noqa: E402
from guie.train.engine import Trainer  # noqa: E402
from guie.train.recipe import load_run_config  # noqa: E402
from train_fixtures import make_labelled_images, tiny_recipe  # noqa: E402

root = Path(sys.argv[1])
root.mkdir(parents=True, exist_ok=True)
only = sys.argv[2:]
manifest = make_labelled_images(root / "gen", n_classes=16, per_class=4)
t32 = create_embedder("efficientnet_lite0", 16, image_size=32, preprocess={"crop_pct": 1.0}, seed=5)
save_embedder(t32, root / "t32.pt")
t48 = create_embedder("efficientnet_lite0", 16, image_size=48, preprocess={"crop_pct": 1.0}, seed=6)
save_embedder(t48, root / "t48.pt")
teachers = ", ".join(f"dom{d}: {root / 't32.pt'}" for d in range(3))
HEAD = """  - name: head
    datasets: [gen]
    train: [head, centers]
    steps: 12
    batch_size: 16
    lr: {head: 0.05, centers: 0.05}
    cache_views: 2
"""
BB = """  - name: backbone
    datasets: [gen]
    train: [backbone]
    steps: 5
    batch_size: 8
    lr: {backbone: 0.001}
    sampler: {name: class_balanced, m_per_class: 2}
    augment: {hflip: 0.5, affine_p: 0.5}
"""
DIST = f"""  - name: dist
    datasets: [gen]
    train: [head, centers]
    steps: 10
    batch_size: 16
    cache_views: 2
    lr: {{head: 0.05, centers: 0.05}}
    distill: {{teachers: {{{teachers}}}, weight: 5.0, temperature: 0.2, domain_weights: {{dom1: 2.0}},
              mirror_domains: [dom0, dom2], mirror_weight: 10.0}}
"""
IMGMIRROR = f"""  - name: imgmirror
    datasets: [gen]
    train: [backbone, head]
    steps: 5
    batch_size: 8
    lr: {{backbone: 0.0005, head: 0.01}}
    distill: {{teachers: {{dom0: {root / 't48.pt'}}}, weight: 5.0, mirror_domains: [dom0], mirror_weight: 20.0}}
"""
MULTI_DS = f"""
datasets:
  a: {{manifest: {manifest}, where: {{split: train}}}}
  b: {{manifest: {manifest}, where: {{split: val}}}}
"""
MULTI = """  - name: head-a
    datasets: [a]
    train: [head, centers]
    steps: 8
    batch_size: 16
    lr: {head: 0.05, centers: 0.05}
    loss: {name: cosface, margin: 0.2, sub_centers: 2}
  - name: add-b
    datasets: [a, b]
    train: [head, centers]
    lock_kept_centers: true
    steps: 8
    batch_size: 16
    accumulation_steps: 2
    ema_decay: 0.9
    max_grad_norm: 1.0
    lr: {head: 0.05, centers: 0.05}
    loss: {name: cosface, margin: 0.2, sub_centers: 2, margin_step: 0.05}
    schedule: {warmup_steps: 2}
    sampler: {name: class_balanced, m_per_class: 2, balance: domain}
"""
STAGEDIST = """  - name: again
    datasets: [gen]
    train: [head, centers]
    steps: 8
    batch_size: 16
    lr: {head: 0.05, centers: 0.05}
    distill: {teachers: {dom0: 'stage:head', dom1: 'stage:head'}, weight: 1.0}
"""
VALIDATION = f"validation: {{manifest: {manifest}, where: {{split: test}}, folds_by: vendor, every_steps: 5}}"
runs = {
    "basic": (HEAD + BB, VALIDATION),
    "distill": (DIST, ""),
    "imgmirror": (IMGMIRROR, ""),
    "multi": (MULTI, "MULTI"),
    "stagedist": (HEAD + STAGEDIST, ""),
}


def h(obj, m):
    """Feed a checkpoint's content into hash `m`, tensors by their bytes."""
    if isinstance(obj, torch.Tensor):
        m.update(str(obj.dtype).encode())
        m.update(obj.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes() if obj.numel() else b"")
    elif isinstance(obj, dict):
        for k in sorted(obj, key=str):
            if k in ("config", "rng"):
                continue
            m.update(str(k).encode())
            h(obj[k], m)
    elif isinstance(obj, (list, tuple)):
        for x in obj:
            h(x, m)
    else:
        m.update(repr(obj).encode())


out = {}
for name, (stages, extra) in runs.items():
    if only and name not in only:
        continue
    d = root / name
    d.mkdir(exist_ok=True)
    text = tiny_recipe(manifest, d / "run", root / "cache", stages,
                       "cpu_threads: 1\n" + (extra if extra != "MULTI" else ""))
    if extra == "MULTI":
        text = text.replace(f"datasets:\n  gen: {{manifest: {manifest}, where: {{split: [train, val]}}}}\n", MULTI_DS)
    (d / "r.yaml").write_text(text)
    Trainer(load_run_config(d / "r.yaml"), progress=False).run()
    res = {}
    for f in ["model.pt", "checkpoints/last.pt"]:
        m = hashlib.sha256()
        h(torch.load(d / "run" / f, weights_only=False, map_location="cpu"), m)
        res[f] = m.hexdigest()[:16]
    met = pd.read_csv(d / "run" / "metrics.csv").drop(columns=["images_per_s"])
    res["metrics"] = hashlib.sha256(met.to_csv(index=False).encode()).hexdigest()[:16]
    out[name] = res
    print(name, res, flush=True)
print(json.dumps(out, indent=1))
