"""Data-parallel curvature over torch.distributed: one rule for every operator and estimator.

Each process holds its own shard of the data. A product is computed on the local shard (a sum
of batch products weighted by sample counts), and the processes add their sums and their
sample counts with one all-reduce each, so every process gets the product of the operator of
the union of the shards, in the same bits. Random probes come from a seed that is the same on
every process, so every estimator takes the same steps and returns the same result everywhere.

A failure on one process must not leave the others waiting in a collective: every collective
step first shares which processes failed, and then all of them raise.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["resolve_model", "Collective", "shared_seed", "RankFailedError"]


class RankFailedError(RuntimeError):
    """Raised on the processes that did not fail when another one did."""


def _is_ddp(model: nn.Module) -> bool:
    return isinstance(model, nn.parallel.DistributedDataParallel)


def resolve_model(model: nn.Module, params: Any, process_group: Any) -> tuple[nn.Module, Any, Any]:
    """(module to differentiate, params, process group) for a plain or a DistributedDataParallel model.

    A DDP model is unwrapped: second-order passes call its `.module` directly, so DDP's gradient
    hooks and buffer broadcasts never run inside them (its forward would broadcast buffers once
    per batch, a collective the processes may call a different number of times). Parameter names
    may keep DDP's "module." prefix. The process group defaults to DDP's own."""
    if not _is_ddp(model):
        return model, params, process_group
    inner = model.module
    if process_group is None:
        process_group = model.process_group
    if isinstance(params, str):
        params = [params]
    if isinstance(params, (list, tuple)):
        params = [p[len("module."):] if isinstance(p, str) and p.startswith("module.") else p for p in params]
    elif params is model:
        params = inner
    return inner, params, process_group


def _check_group(group: Any) -> None:
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        raise ValueError("process_group: torch.distributed is not initialised; call dist.init_process_group first "
                         "(e.g. under torchrun), or pass process_group=None for one process")
    try:
        dist.get_world_size(group)
    except (RuntimeError, ValueError) as exc:
        raise ValueError(f"process_group: expected a torch.distributed process group this process belongs to, "
                         f"got {group!r} ({exc})") from exc


class Collective:
    """The all-reduce steps of one operator, with failures shared (see the module docstring).

    With `group=None` every method runs locally."""

    def __init__(self, group: Any, owner: str):
        self.group = group
        self.owner = owner
        if group is not None:
            _check_group(group)

    @property
    def world_size(self) -> int:
        import torch.distributed as dist

        return 1 if self.group is None else dist.get_world_size(self.group)

    @property
    def rank(self) -> int:
        import torch.distributed as dist

        return 0 if self.group is None else dist.get_rank(self.group)

    def _device(self, like: Tensor | None) -> torch.device:
        import torch.distributed as dist

        if dist.get_backend(self.group) == "nccl":
            return like.device if like is not None and like.device.type == "cuda" else torch.device("cuda")
        return torch.device("cpu")

    def sum(self, local: Callable[[], tuple[Tensor, int]], what: str) -> tuple[Tensor, int]:
        """Run `local() -> (sum over this process's batches, its sample count)` and add both over the
        processes. If `local` raises on any process, every process raises: the failing one its own
        error, the others a RankFailedError naming the failed ranks."""
        if self.group is None:
            return local()
        import torch.distributed as dist

        error, value, count = None, None, 0
        try:
            value, count = local()
        except Exception as exc:  # shared below, then re-raised
            error = exc
        device = self._device(value)
        status = torch.zeros(self.world_size + 1, dtype=torch.float64, device=device)
        status[self.rank] = 1.0 if error is not None else 0.0
        status[-1] = float(count) if error is None else 0.0
        dist.all_reduce(status, group=self.group)
        failed = [r for r in range(self.world_size) if status[r].item() > 0]
        if error is not None:
            raise error
        if failed:
            raise RankFailedError(f"{self.owner}: process(es) {failed} of the group failed during {what}; this process "
                                  "stops too (see the failing process's error)")
        summed = value.to(device).contiguous()
        dist.all_reduce(summed, group=self.group)
        return summed.to(value.device), int(round(status[-1].item()))


def shared_seed(seed: int, group: Any) -> int:
    """The seed every process uses: process 0's (so a seed drawn at random on each process agrees)."""
    if group is None:
        return seed
    import torch.distributed as dist

    backend = dist.get_backend(group)
    device = torch.device("cuda") if backend == "nccl" else torch.device("cpu")
    t = torch.tensor([seed], dtype=torch.int64, device=device)
    dist.broadcast(t, src=dist.get_global_rank(group, 0), group=group)
    return int(t.item())
