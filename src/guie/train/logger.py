"""Run logs: metrics.csv, TensorBoard events and a loss / validation plot, written by rank 0 only."""
from __future__ import annotations

import csv
import io
import time
from pathlib import Path
from typing import TYPE_CHECKING

from ..utils import atomic_write_bytes

if TYPE_CHECKING:
    import torch


class RunLogger:
    """Append-only CSV of training metrics plus TensorBoard; `plot()` renders training.png."""

    FIELDS = ["stage", "step", "epoch", "loss", "lr", "margin", "images_per_s", "val_mP@5", "val_sets"]

    def __init__(self, run_dir: Path, enabled: bool = True, tensorboard: bool = True):
        self.enabled, self.path = enabled, run_dir / "metrics.csv"
        self.writer = None
        if not enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        if not self.path.exists():
            with open(self.path, "w", newline="") as f:
                csv.writer(f).writerow(self.FIELDS)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(run_dir / "tensorboard"))
            except ImportError:  # tensorboard is optional at run time
                self.writer = None

    def log(self, global_step: int, **values) -> None:
        """One CSV row (missing fields empty) and one TensorBoard scalar per numeric value."""
        if not self.enabled:
            return
        with open(self.path, "a", newline="") as f:
            csv.writer(f).writerow([values.get(k, "") for k in self.FIELDS])
            f.flush()
        if self.writer is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)) and k not in ("step", "epoch"):
                    self.writer.add_scalar(k.replace("@", "_at_"), v, global_step)
            self.writer.flush()

    def truncate_after(self, stage: str, step: int) -> None:
        """On resume, drop rows logged after the checkpoint being resumed (they will be logged again)."""
        if not self.enabled or not self.path.exists():
            return
        import pandas as pd

        df = pd.read_csv(self.path)
        if df.empty:
            return
        stages = list(dict.fromkeys(df["stage"].astype(str)))
        if stage in stages:
            later = stages[stages.index(stage) + 1:]
            keep = ~((df["stage"].astype(str) == stage) & (df["step"] > step)) & ~df["stage"].astype(str).isin(later)
            df = df[keep]
        atomic_write_bytes(df.to_csv(index=False).encode(), self.path)

    def plot(self, title: str) -> Path | None:
        """training.png: loss per step (by stage) and validation mP@5."""
        if not self.enabled or not self.path.exists():
            return None
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import pandas as pd

        df = pd.read_csv(self.path)
        if df.empty:
            return None
        df["x"] = range(len(df))
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 3.8))
        for stage, part in df.groupby("stage", sort=False):
            loss = part.dropna(subset=["loss"])
            ax1.plot(loss["x"], loss["loss"], label=str(stage))
            val = part.dropna(subset=["val_mP@5"])
            if len(val):
                ax2.plot(val["x"], val["val_mP@5"], "o-", label=str(stage))
        ax1.set(title="training loss", xlabel="log row (by stage)", ylabel="loss")
        ax2.set(title="validation mP@5", xlabel="log row (by stage)", ylabel="mP@5")
        for ax in (ax1, ax2):
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=8)
        fig.suptitle(title)
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=100)
        plt.close(fig)
        return atomic_write_bytes(buf.getvalue(), self.path.with_name("training.png"))

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


class LossMeter:
    """Mean loss and throughput between two log lines."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.t0, self.seen, self.loss_sum, self.loss_n = time.time(), 0, 0.0, 0

    def add(self, loss: torch.Tensor, accum: int, images: int) -> None:
        # summed on the device: a float() here would wait for the GPU every step and leave it idle while the next
        # step's kernels are launched
        self.loss_sum = self.loss_sum + loss.detach().float() * accum
        self.loss_n += 1
        self.seen += images

    def mean_loss(self) -> float:
        return float(self.loss_sum) / max(1, self.loss_n)

    def rate(self, world_size: int) -> float:
        return self.seen * world_size / max(1e-9, time.time() - self.t0)


def global_step(stage_index: int, step: int) -> int:
    """The TensorBoard step of a stage's step: stages apart, in recipe order."""
    return stage_index * 10_000_000 + step
