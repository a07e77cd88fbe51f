"""Multi-process training and sampling with torchrun + PyTorch DDP.

`torchrun` (PyTorch's own launcher) starts the processes and sets RANK/WORLD_SIZE/LOCAL_RANK;
this module only reads them, joins the process group and wraps the model in DDP. A plain
`brainfusion train` without torchrun is a world of one and touches none of this.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as tdist


@dataclass
class Context:
    rank: int
    world: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init() -> Context:
    """Join the torchrun process group if there is one; pick this process's device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world > 1 and not tdist.is_initialized():
        tdist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Context(rank, world, local_rank, device)


def wrap(model: torch.nn.Module, ctx: Context) -> torch.nn.Module:
    if ctx.world == 1:
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None)


def any_flag(flag: bool, ctx: Context) -> bool:
    """True on every rank if `flag` is true on any rank (so all ranks stop or skip together)."""
    if ctx.world == 1:
        return bool(flag)
    value = torch.tensor([1.0 if flag else 0.0], device=ctx.device)
    tdist.all_reduce(value, op=tdist.ReduceOp.MAX)
    return bool(value.item() > 0)


def barrier(ctx: Context) -> None:
    if ctx.world > 1:
        tdist.barrier()
