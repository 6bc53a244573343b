"""One process or many: the supervised stage under `torchrun` (DistributedDataParallel), or alone in-process.

`torchrun` sets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT; `init_from_env` joins that process
group (gloo on CPU, nccl on GPU) or, without them, returns a one-process context that never touches
torch.distributed, so the same training loop runs in a test, in the trainer and on a 4-GPU server.

Every rank computes the same global batch of indices for a step and takes its own share (see
`sft.batch_indices`); the loss each rank backpropagates is scaled so that DDP's gradient average equals the
gradient of the global batch's mean loss, whatever the share sizes.
"""

from __future__ import annotations

import datetime as _dt
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from irevla_ros.train.config import DEVICES


class DistributedError(ValueError):
    """The distributed environment cannot be used (bad device, inconsistent torchrun variables...)."""


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None  # None: one process, no process group
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.backend is not None


def _device(name: str, local_rank: int) -> torch.device:
    if name not in DEVICES:
        raise DistributedError(f"device must be one of {', '.join(DEVICES)}, got {name!r}")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise DistributedError("device 'cuda' asked for, but torch sees no CUDA GPU here")
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def local_context(device: str = "cpu") -> DistContext:
    """One process, no process group."""
    return DistContext(device=_device(device, 0))


def current_context(device: str = "cpu") -> DistContext:
    """The context of an already initialised process group, else a one-process one."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
        local_rank = int(os.environ.get("LOCAL_RANK", rank))
        return DistContext(
            rank, world, local_rank, torch.distributed.get_backend(), _device(device, local_rank)
        )
    return local_context(device)


def init_from_env(device: str = "cpu", timeout_s: float = 600.0) -> DistContext:
    """Join the torchrun process group described by the environment (WORLD_SIZE > 1), else run alone."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return local_context(device)
    try:
        rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    except (KeyError, ValueError) as exc:
        raise DistributedError(f"WORLD_SIZE={world} but RANK/LOCAL_RANK are missing or bad ({exc})") from exc
    dev = _device(device, local_rank)
    backend = "nccl" if dev.type == "cuda" else "gloo"
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    # A bounded timeout: a rank that dies makes the others fail instead of waiting forever in a collective.
    torch.distributed.init_process_group(backend, timeout=_dt.timedelta(seconds=timeout_s))
    return DistContext(rank, world, local_rank, backend, dev)


def shutdown(ctx: DistContext) -> None:
    if ctx.distributed and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def wrap(module: nn.Module, ctx: DistContext) -> nn.Module:
    """DistributedDataParallel around `module` when there are several processes; the module itself otherwise."""
    if not ctx.distributed:
        return module
    from torch.nn.parallel import DistributedDataParallel

    ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    # Frozen pretrained modules run in eval mode (BatchNorm statistics fixed): no buffers to keep in step.
    return DistributedDataParallel(module, device_ids=ids, broadcast_buffers=False)


def all_reduce_sum(value: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    if ctx.distributed:
        value = value.clone()
        torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.SUM)
    return value


def barrier(ctx: DistContext) -> None:
    if ctx.distributed:
        torch.distributed.barrier()


def torchrun_command() -> list[str]:
    """The torchrun launcher of this interpreter's environment (`python -m torch.distributed.run` without the
    console script)."""
    script = Path(sys.executable).parent / "torchrun"
    if script.is_file() and os.access(script, os.X_OK):
        return [str(script)]
    return [sys.executable, "-m", "torch.distributed.run"]
