"""What a run must remember to resume exactly: counters, optimiser, schedule and random number generators.

OUT/last/training_state.pt holds them (torch.save of plain tensors and numbers, loaded with
weights_only=True); the model weights beside it are the checkpoint's own.
"""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from captioner.config import TrainConfig
from captioner.errors import ConfigError

STATE_FILE = "training_state.pt"


@dataclass
class RunState:
    epoch: int = 0  # epochs finished
    step_in_epoch: int = 0  # optimiser steps done in the current epoch
    global_step: int = 0
    best_cider: float = -1.0
    bad_epochs: int = 0  # epochs since the best validation CIDEr
    best_epoch: int = 0  # the epoch (from 1) whose model is OUT/best


def make_scheduler(optimizer: torch.optim.Optimizer, tc: TrainConfig):
    if tc.schedule == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, mode="max", factor=tc.lr_decay, patience=max(0, tc.lr_patience - 1)
        )
    if tc.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(tc.epochs, 1))
    if tc.schedule == "constant":
        return None
    raise ConfigError(f"train.schedule: unknown schedule {tc.schedule!r} (plateau, cosine or constant)")


def step_scheduler(scheduler, tc: TrainConfig, cider: float) -> None:
    """One epoch's step: the plateau schedule watches validation CIDEr, the others count epochs."""
    if scheduler is None:
        return
    if tc.schedule == "plateau":
        scheduler.step(cider)
    else:
        scheduler.step()


def save_state(file: Path, state: RunState, optimizer, scheduler) -> None:
    torch.save(
        {
            "state": dataclasses.asdict(state),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict() if scheduler is not None else None,
            "torch_rng": torch.get_rng_state(),
            "python_rng": random.getstate(),
        },
        file,
    )


def load_state(file: Path, optimizer, scheduler) -> RunState:
    """Restore the optimiser (its tensors follow the parameters' device), schedule and RNGs."""
    saved = torch.load(file, map_location="cpu", weights_only=True)
    optimizer.load_state_dict(saved["optimizer"])
    if scheduler is not None and saved["scheduler"] is not None:
        scheduler.load_state_dict(saved["scheduler"])
    torch.set_rng_state(saved["torch_rng"])
    random.setstate(_as_tuple(saved["python_rng"]))
    return RunState(**saved["state"])


def _as_tuple(x):
    return tuple(_as_tuple(v) for v in x) if isinstance(x, list | tuple) else x


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
