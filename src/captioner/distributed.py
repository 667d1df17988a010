"""Multi-process training with torch.distributed, as launched by torchrun.

    torchrun --nproc_per_node=4 -m captioner train --config configs/flickr8k_attention.yaml

torchrun sets RANK / WORLD_SIZE / MASTER_ADDR for every process; without them everything here is a
no-op and training runs as one process. Backend: NCCL when CUDA is there (process i on GPU LOCAL_RANK),
gloo on CPUs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0  # this process's GPU on its machine

    @property
    def main(self) -> bool:
        """Rank 0 logs, validates and writes checkpoints; the others only train."""
        return self.rank == 0


def setup() -> Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local)  # before NCCL starts: each process talks to its own GPU
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
    return Dist(dist.get_rank(), dist.get_world_size(), local)


def device(setting: str | torch.device, d: Dist | None = None) -> torch.device:
    """The device a process works on: "auto" is this process's GPU when there is one, else the CPU;
    "cuda" under torchrun means cuda:LOCAL_RANK, one GPU per process."""
    d = d or Dist()
    if setting == "auto":
        setting = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        chosen = torch.device(setting)
    except RuntimeError:
        from captioner.errors import ConfigError

        raise ConfigError(f"device {setting!r}: not a device (auto, cpu, cuda or cuda:N)") from None
    if chosen.type == "cuda":
        if not torch.cuda.is_available():
            from captioner.errors import ConfigError

            raise ConfigError(f"device {setting!r}: this machine has no CUDA GPU that torch can use")
        if chosen.index is None:
            chosen = torch.device("cuda", d.local_rank if d.world > 1 else torch.cuda.current_device())
    return chosen


def barrier(d: Dist) -> None:
    if d.world > 1:
        dist.barrier()


def broadcast(values: list[float], d: Dist) -> list[float]:
    """Rank 0's values, on every rank (e.g. the validation score that drives the schedule and stopping)."""
    if d.world == 1:
        return values
    # NCCL reduces only GPU tensors; gloo only CPU ones.
    on = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    t = torch.tensor(values, dtype=torch.float64, device=on)
    dist.broadcast(t, src=0)
    return t.tolist()


def checksums(module: nn.Module, d: Dist) -> list[str]:
    """A digest of `module`'s weights from every rank: equal digests mean the replicas agree exactly."""
    from captioner.checkpoint import weights_digest

    mine = weights_digest(module)
    if d.world == 1:
        return [mine]
    gathered: list[str | None] = [None] * d.world
    dist.all_gather_object(gathered, mine)
    return [str(g) for g in gathered]


def gather(value: object, d: Dist) -> list:
    """Every rank's `value` (any picklable object), in rank order, on every rank."""
    if d.world == 1:
        return [value]
    gathered: list = [None] * d.world
    dist.all_gather_object(gathered, value)
    return gathered


def cleanup(d: Dist) -> None:
    """Leave the process group together: a rank that tears down its connections while another still
    has a collective in flight makes gloo abort the other process ("terminate called ...")."""
    if d.world > 1 and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
