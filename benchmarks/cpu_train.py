"""CPU training throughput: guie's training step vs a bare fwd+bwd+step of the same model, in one process.

    .venv/bin/python benchmarks/cpu_train.py [--steps 6] [--rounds 3] [--batch-size 32]

The stage is the emoji recipe's backbone fine-tune (shipped recipe emoji-lite0-cpu, stage `backbone`: EfficientNet-
Lite0 at 224 px, head and class centres locked, AdamW, ArcFace, class-balanced sampling, its augmentations):
(a) bare: the same embedder, ArcFace loss, trainable parts, train/eval modes and optimizer, on pre-loaded uint8
    batches (channels_last): zero_grad, forward, loss, backward, step; nothing else;
(b) guie: `guie.train.Trainer` running that stage (sampler, image loading, augmentation, collate, LR schedule,
    forward, ArcFace, backward, optimizer, logging); each round is a fresh run of 2 x --steps steps, of which the
    second half is timed (the first absorbs start-up: DataLoader, first allocations, optimizer state).
The guie window is timed at the run's own log calls (log_every_steps = --steps), so it covers exactly those steps.
Measurements alternate (bare, guie) for `--rounds` rounds; ratios use the sums over rounds (a load change on a
shared machine affects both sides alike), with the median of the per-round ratios and the CPU-time ratio.
Needs the emoji benchmark (`guie data emoji`).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import DEFAULT_MANIFEST, cpu_name  # noqa: E402

RECIPE = "emoji-lite0-cpu"  # a shipped recipe (src/guie/recipes/), loaded by name


def emit(record: dict) -> None:
    """One JSON line per measurement (machine-readable, flushed at once)."""
    print(json.dumps(record), flush=True)


def stage_config(args, out_dir: Path):
    """The recipe reduced to its backbone stage, 2 x steps long, no validation, logging every `steps` steps."""
    from guie.train.recipe import load_run_config

    cfg = load_run_config(RECIPE)
    stage = next(s for s in cfg.stages if s.name == "backbone")
    stage = replace(stage, steps=2 * args.steps, epochs=None, batch_size=args.batch_size)
    return replace(cfg, stages=[stage], validation=None, output_dir=out_dir, log_every_steps=args.steps,
                   checkpoint_every_steps=10**9)


class Bare:
    """The stage's model, loss and optimizer as guie builds them, stepped on pre-loaded batches."""

    def __init__(self, cfg, n_batches: int):
        import torch

        from guie.imaging.io import load_image
        from guie.pipeline.augment import AugmentConfig, build_train_transform
        from guie.train import engine
        from guie.train.batches import Batch
        from guie.train.objectives import TrainModule
        from guie.train.optim import create_optimizer, param_groups, set_train_mode, set_trainable

        stage = cfg.stages[0]
        trainer = engine.Trainer(cfg, progress=False)  # builds the embedder and plans the stage exactly as a run does
        data = trainer.plans[0].data
        trainer.centers.start_stage(stage, data)
        embedder = trainer.embedder.to(memory_format=torch.channels_last)
        set_trainable(embedder, trainer.loss, stage.train)
        set_train_mode(embedder, stage)
        self.opt = create_optimizer(param_groups(embedder, trainer.loss, stage.lr, stage.train, stage.layer_decay,
                                                 stage.optimizer.weight_decay), stage.optimizer)
        self.module = TrainModule(embedder, trainer.loss)
        self.batch = Batch
        plain = build_train_transform(embedder.preprocess, AugmentConfig.off())
        rows = data.df.sample(n=n_batches * stage.batch_size, random_state=0)
        images = torch.stack([plain(load_image(p)) for p in rows["path"]])
        targets = torch.as_tensor(rows["target"].to_numpy().copy())
        self.batches = [(images[i:i + stage.batch_size].contiguous(memory_format=torch.channels_last),
                         targets[i:i + stage.batch_size]) for i in range(0, len(images), stage.batch_size)]
        trainer.logger.close()

    def step(self, i: int) -> None:
        x, y = self.batches[i % len(self.batches)]
        self.opt.zero_grad(set_to_none=True)
        self.module(self.batch(x, y), False).backward()
        self.opt.step()


def guie_round(cfg) -> dict:
    """Run the stage; wall and CPU seconds between its two log calls (the second half of the steps)."""
    from guie.train import engine

    marks = []
    original = engine.RunLogger.log

    def log(self, global_step, **values):
        marks.append((values.get("step"), time.perf_counter(), cpu_seconds()))
        return original(self, global_step, **values)

    engine.RunLogger.log = log
    try:
        engine.Trainer(cfg, progress=False).run()
    finally:
        engine.RunLogger.log = original
    (s0, t0, c0), (s1, t1, c1) = [m for m in marks if m[0] is not None][:2]
    return {"steps": s1 - s0, "wall_s": t1 - t0, "cpu_s": c1 - c0}


def cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=6, help="timed steps per round (guie runs twice as many)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=32, help="the recipe's batch size is 32")
    args = ap.parse_args()
    if not Path(DEFAULT_MANIFEST).is_file():
        sys.exit(f"{DEFAULT_MANIFEST} not built; run `guie data emoji` first")

    import torch

    from guie.runtime import tune_cpu_allocator

    print(f"command: {' '.join([Path(sys.executable).name] + sys.argv)}")
    print(f"machine: {cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__}, intra-op threads "
          f"{torch.get_num_threads()}, load average at start {os.getloadavg()[0]:.2f}", flush=True)
    print(f"glibc malloc tuning: {'on' if tune_cpu_allocator() else 'off'}", flush=True)
    tmp = tempfile.TemporaryDirectory(prefix="guie-cpu-train-")
    bare = Bare(stage_config(args, Path(tmp.name) / "bare"), n_batches=args.steps)
    for i in range(2):
        bare.step(i)  # warm-up: first allocations, optimizer state
    b = args.batch_size
    rounds = []
    for r in range(args.rounds):
        c0, t0 = cpu_seconds(), time.perf_counter()
        for i in range(args.steps):
            bare.step(i)
        bare_m = {"steps": args.steps, "wall_s": time.perf_counter() - t0, "cpu_s": cpu_seconds() - c0}
        guie_m = guie_round(stage_config(args, Path(tmp.name) / f"run{r}"))
        rounds.append((bare_m, guie_m))
        emit({"round": r, "bare img/s": round(b * bare_m["steps"] / bare_m["wall_s"], 2),
              "guie img/s": round(b * guie_m["steps"] / guie_m["wall_s"], 2),
              "guie / bare": round((guie_m["steps"] / guie_m["wall_s"]) / (bare_m["steps"] / bare_m["wall_s"]), 3)})
    tot = {k: {m: sum(r[i][m] for r in rounds) for m in ("steps", "wall_s", "cpu_s")}
           for i, k in enumerate(("bare", "guie"))}
    rate = {k: b * v["steps"] / v["wall_s"] for k, v in tot.items()}
    cpu_rate = {k: v["steps"] / v["cpu_s"] for k, v in tot.items()}
    per_round = [(g["steps"] / g["wall_s"]) / (bb["steps"] / bb["wall_s"]) for bb, g in rounds]
    print(f"load average at end {os.getloadavg()[0]:.2f}")
    print("summary (ratios over the sums of all rounds; target guie / bare >= 0.9):")
    emit({"batch_size": b, "timed steps per round": args.steps, "bare img/s": round(rate["bare"], 2),
          "guie img/s": round(rate["guie"], 2), "guie / bare": round(rate["guie"] / rate["bare"], 3),
          "guie / bare median of rounds": round(statistics.median(per_round), 3),
          "guie / bare (cpu time)": round(cpu_rate["guie"] / cpu_rate["bare"], 3)})
    tmp.cleanup()


if __name__ == "__main__":
    main()
