"""Multi-process training and sampling with torchrun + PyTorch DDP.

`torchrun` (PyTorch's own launcher) starts the processes and sets RANK/WORLD_SIZE/LOCAL_RANK;
this module only reads them, joins the process group and wraps the model in DDP. A plain
`brainfusion train` without torchrun is a world of one and touches none of this.

Rules the callers keep (see docs/guides/several-gpus.md):
  * every collective here (`any_flag`, `mean`, `barrier`) is called the same number of times,
    in the same order, on every rank — never inside an `if ctx.is_main:` branch;
  * only rank 0 writes files (checkpoints, logs, pictures, the sample grid);
  * `shutdown` is called once the work is done, so the process group is torn down cleanly.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as tdist

log = logging.getLogger(__name__)


@dataclass
class Context:
    rank: int
    world: int
    local_rank: int
    device: torch.device
    owns_group: bool = False  # True where `init` created the process group (and `shutdown` destroys it)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def is_main_process() -> bool:
    """Rank 0 under torchrun, or a plain single process: the one that speaks for the job and owns its folders."""
    return os.environ.get("RANK", "0") == "0"


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
    owns = False
    if world > 1:
        if rank != 0:
            # rank 0 speaks for the job; the others report only errors (no duplicated info/warnings)
            logging.getLogger("brainfusion").setLevel(logging.ERROR)
        if not tdist.is_initialized():
            _init_group(device)
            owns = True
    return Context(rank, world, local_rank, device, owns)


_generation = 0  # process groups this process has created; every rank creates them in the same order


def _init_group(device: torch.device) -> None:
    """init_process_group on torchrun's store, under a fresh key prefix each time.

    A plain second `init_process_group` after `destroy_process_group` (e.g. `brainfusion demo`:
    train, then sample, in one process) reuses the first group's store keys and can hang; a
    per-generation prefix keeps the groups apart.
    """
    global _generation
    store, rank, world = next(tdist.rendezvous("env://"))
    store = tdist.PrefixStore(f"brainfusion/{_generation}", store)
    _generation += 1
    if device.type == "cuda":
        tdist.init_process_group("nccl", store=store, rank=rank, world_size=world, device_id=device)
    else:
        tdist.init_process_group("gloo", store=store, rank=rank, world_size=world)


def shutdown(ctx: Context) -> None:
    """Destroy the process group `init` created (a no-op for a world of one)."""
    if ctx.owns_group and tdist.is_initialized():
        tdist.destroy_process_group()
        ctx.owns_group = False


def wrap(model: torch.nn.Module, ctx: Context) -> torch.nn.Module:
    """DDP-wrap `model` (in place where BatchNorm is converted); the unwrapped `model` stays usable for saving."""
    if ctx.world == 1:
        return model
    from torch.nn.parallel import DistributedDataParallel

    has_bn = any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())
    if has_bn and ctx.device.type == "cuda":
        # statistics over the global batch, as one process would compute them; same parameters
        # and buffers, so state_dict keys and checkpoints are unchanged
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    elif has_bn and ctx.is_main:
        log.warning(
            "BatchNorm under %d CPU processes normalises over each process's share of the batch (PyTorch's "
            "SyncBatchNorm needs GPUs), so the loss curve will differ from a one-process run; use model.norm=group to avoid this.",
            ctx.world,
        )
    # broadcast_buffers (the default) copies rank 0's BatchNorm running statistics to every rank each forward
    return DistributedDataParallel(model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None)


def any_flag(flag: bool, ctx: Context) -> bool:
    """True on every rank if `flag` is true on any rank (so all ranks stop or skip together)."""
    if ctx.world == 1:
        return bool(flag)
    value = torch.tensor([1.0 if flag else 0.0], device=ctx.device)
    tdist.all_reduce(value, op=tdist.ReduceOp.MAX)
    return bool(value.item() > 0)


def mean(value: torch.Tensor, ctx: Context) -> torch.Tensor:
    """The mean of a (detached) tensor over the ranks, on every rank; NaN/Inf anywhere makes it non-finite."""
    value = value.detach().float().clone()
    if ctx.world > 1:
        tdist.all_reduce(value, op=tdist.ReduceOp.SUM)
        value /= ctx.world
    return value


def barrier(ctx: Context) -> None:
    if ctx.world > 1:
        if ctx.device.type == "cuda":
            tdist.barrier(device_ids=[ctx.device.index])
        else:
            tdist.barrier()
