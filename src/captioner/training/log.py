"""The run's record: metrics.csv (append-only, survives resumes), TensorBoard events and loss.png."""

from __future__ import annotations

import csv
import time
from pathlib import Path

from captioner.training.state import RunState


class MetricsLog:
    """metrics.csv (append-only, survives resumes), TensorBoard events and a loss-curve PNG."""

    FIELDS = ("kind", "epoch", "step", "loss", "lr", "captions_per_s", "reward", "BLEU-4", "CIDEr", "time")

    def __init__(self, out: Path):
        self.out = out
        self.path = out / "metrics.csv"
        new = not self.path.exists()
        self.file = open(self.path, "a", newline="", encoding="utf-8")
        self.csv = csv.DictWriter(self.file, fieldnames=self.FIELDS)
        if new:
            self.csv.writeheader()
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb: object | None = SummaryWriter(str(out / "tensorboard"))
        except ImportError:  # tensorboard is optional at run time
            self.tb = None

    def write(self, kind: str, state: RunState, **values) -> None:
        row = {
            "kind": kind,
            "epoch": state.epoch,
            "step": state.global_step,
            "time": round(time.time(), 1),
        }
        row.update(
            {k: (round(v, 5) if isinstance(v, float) else v) for k, v in values.items() if v is not None}
        )
        self.csv.writerow(row)
        self.file.flush()
        if self.tb is not None:
            for k, v in values.items():
                if isinstance(v, int | float):
                    self.tb.add_scalar(f"{kind}/{k}", v, state.global_step)  # type: ignore[attr-defined]

    def plot(self) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        with open(self.path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
        # Self-critical runs log the samples' mean reward: their loss (advantage-weighted) says little.
        column = "reward" if any(r.get("reward") for r in rows) else "loss"
        label = "training reward (CIDEr-D of samples)" if column == "reward" else "training loss"
        train = [(int(r["step"]), float(r[column])) for r in rows if r["kind"] == "train" and r[column]]
        val = [(int(r["step"]), float(r["CIDEr"])) for r in rows if r["kind"] == "val" and r["CIDEr"]]
        fig, ax = plt.subplots(figsize=(7, 4))
        if train:
            ax.plot(*zip(*train, strict=True), color="tab:blue", label=label)
        ax.set_xlabel("step")
        ax.set_ylabel(label if column == "reward" else "cross-entropy loss")
        if val:
            ax2 = ax.twinx()
            ax2.plot(*zip(*val, strict=True), "o-", color="tab:orange", label="validation CIDEr")
            ax2.set_ylabel("validation CIDEr")
        fig.legend(loc="upper center", ncol=2)
        fig.tight_layout()
        fig.savefig(self.out / "loss.png", dpi=100)
        plt.close(fig)

    def close(self) -> None:
        self.file.close()
        if self.tb is not None:
            self.tb.close()  # type: ignore[attr-defined]
