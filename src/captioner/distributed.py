"""Multi-process training with torch.distributed, as launched by torchrun.

    torchrun --nproc_per_node=4 -m captioner train --config configs/flickr8k_attention.yaml

torchrun sets RANK / WORLD_SIZE / MASTER_ADDR for every process; without them everything here is a
no-op and training runs as one process. Backend: NCCL when CUDA is there, gloo on CPUs.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        """Rank 0 logs, validates and writes checkpoints; the others only train."""
        return self.rank == 0


def setup() -> Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return Dist(dist.get_rank(), dist.get_world_size())


def barrier(d: Dist) -> None:
    if d.world > 1:
        dist.barrier()


def broadcast(values: list[float], d: Dist) -> list[float]:
    """Rank 0's values, on every rank (e.g. the validation score that drives the schedule and stopping)."""
    if d.world == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64)
    dist.broadcast(t, src=0)
    return t.tolist()


def checksums(module: nn.Module, d: Dist) -> list[str]:
    """A digest of `module`'s weights from every rank: equal digests mean the replicas agree exactly."""
    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    mine = h.hexdigest()
    if d.world == 1:
        return [mine]
    gathered: list[str | None] = [None] * d.world
    dist.all_gather_object(gathered, mine)
    return [str(g) for g in gathered]


def cleanup(d: Dist) -> None:
    if d.world > 1 and dist.is_initialized():
        dist.destroy_process_group()
