"""What a run must remember to resume exactly: counters, optimiser, schedule and random number generators.

OUT/last/training_state.pt holds them (torch.save of plain tensors and numbers, loaded with
weights_only=True); the model weights beside it are the checkpoint's own.
"""

from __future__ import annotations

import dataclasses
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from captioner.config import TrainConfig
from captioner.errors import CheckpointError, ConfigError

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
    try:
        saved = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:  # empty, truncated, or not a training state
        raise CheckpointError(
            f"{file}: not a readable training state ({type(e).__name__}: {str(e).splitlines()[0]})"
        ) from None
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


def _step_of(folder: Path) -> int | None:
    """The optimiser steps a checkpoint folder's training state records, or None if it is not whole."""
    from captioner.checkpoint import CONFIG_FILE, VOCAB_FILE, WEIGHTS_FILE

    if not all((folder / f).is_file() for f in (STATE_FILE, WEIGHTS_FILE, VOCAB_FILE, CONFIG_FILE)):
        return None
    try:
        return int(
            torch.load(folder / STATE_FILE, map_location="cpu", weights_only=True)["state"]["global_step"]
        )
    except Exception:  # an empty, truncated or foreign file: not something to resume from
        return None


def recover_last(out: Path) -> tuple[Path | None, str]:
    """Put the newest whole `last` checkpoint of a run directory back in `out/last`, from wherever a killed
    save left it (`last/`, `.last.old`, or the finished temporary folder that was about to replace it),
    and remove the other leftovers (`.last.*`, and `.best.*` once `best/` is whole). Returns (out/last or
    None, what was done, for the log)."""
    from captioner.checkpoint import restore_interrupted

    last = out / "last"
    candidates = [last, *sorted(out.glob(".last.*"))]
    steps = {c: _step_of(c) for c in candidates if c.is_dir()}
    whole = {c: s for c, s in steps.items() if s is not None}
    note = ""
    if whole:
        newest = max(whole, key=lambda c: (whole[c], c == last))
        if newest != last:
            if last.exists():
                shutil.rmtree(last)
            os.replace(newest, last)
            note = f" (recovered from {newest.name}, left by an interrupted save)"
    for leftover in out.glob(".last.*"):
        shutil.rmtree(leftover, ignore_errors=True)
    restore_interrupted(out / "best")
    for leftover in out.glob(".best.*"):
        shutil.rmtree(leftover, ignore_errors=True)
    return (last if whole else None), note
