"""The processes of a study: one, or several under torchrun (torch.distributed).

Under torchrun (WORLD_SIZE > 1 in the environment) each process joins the group with the NCCL
backend when it drives a GPU (cuda:LOCAL_RANK) and gloo on the CPU. The group is used only to
hand the plan from rank 0 to the others and to wait for everyone before the table is merged;
runs never talk to each other. A rank that finishes early waits up to `timeout` for the rest.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Optional

import torch


@dataclass(frozen=True)
class Ranks:
    """Where this process stands: rank of world, its device, and whether it opened the group."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    owns_group: bool = False

    @property
    def distributed(self) -> bool:
        return self.world > 1


def resolve_device(device: Optional[str], local_rank: int) -> torch.device:
    """`device` for the process of `local_rank`: "cuda" (no index) is that process's own GPU."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", local_rank)  # one GPU per process of a node
    return dev


def start(device: Optional[str] = None, timeout: timedelta = timedelta(hours=72)) -> Ranks:
    """Join (or reuse) the process group that torchrun describes in the environment; a single
    process without it. `device`: "cuda", "cuda:N", "cpu" or None (cuda when available)."""
    import torch.distributed as dist

    local = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if dist.is_available() and dist.is_initialized():
        return Ranks(dist.get_rank(), dist.get_world_size(), local, dev, owns_group=False)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Ranks(0, 1, 0, dev)
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    backend = "nccl" if dev.type == "cuda" else "gloo"
    kw = {"device_id": dev} if dev.type == "cuda" else {}
    dist.init_process_group(backend, timeout=timeout, **kw)
    return Ranks(dist.get_rank(), dist.get_world_size(), local, dev, owns_group=True)


def stop(ranks: Ranks) -> None:
    if ranks.owns_group:
        import torch.distributed as dist

        dist.destroy_process_group()


def broadcast(ranks: Ranks, value: Any) -> Any:
    """Rank 0's `value` on every rank (picklable)."""
    if not ranks.distributed:
        return value
    import torch.distributed as dist

    box = [value if ranks.rank == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather(ranks: Ranks, value: Any) -> list:
    """Every rank's `value`, in rank order, on every rank. Also a barrier."""
    if not ranks.distributed:
        return [value]
    import torch.distributed as dist

    out = [None] * ranks.world
    dist.all_gather_object(out, value)
    return out
