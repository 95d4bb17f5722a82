"""How much memory a batch's cached state takes, and how much the operators may spend on caching.

A curvature operator on in-memory data keeps each batch's graph (or per-sample gradients)
between products as long as the graphs fit in a budget, `cache_memory`, and rebuilds the others
for every product. Here: the default budget, and the size of one batch's state, measured from
what autograd saved while the state was built.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor

__all__ = ["default_cache_memory", "available_memory", "SavedBytes", "tensor_bytes"]

CPU_FRACTION = 0.25  # of the RAM available when the operator first builds a graph
GPU_FRACTION = 0.5  # of the device memory free at that moment


def available_memory(device: torch.device) -> int | None:
    """Bytes free for new tensors on `device`: CUDA's free memory, or the host's MemAvailable
    (Linux /proc/meminfo, else sysconf's available pages). None where neither can be read."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return None


def default_cache_memory(device: torch.device) -> float:
    """The default budget: a quarter of the available host memory on CPU, half the free memory on
    a GPU (the rest stays for the products themselves, the model and the user's own tensors);
    2 GiB where the available memory cannot be read."""
    free = available_memory(device)
    if free is None:
        return float(2 * 1024**3)
    return float(free * (GPU_FRACTION if device.type == "cuda" else CPU_FRACTION))


def _storage(t: Tensor) -> tuple[int, int] | None:
    """(address, bytes) of a tensor's storage, or None for tensors without one (functorch wrappers)."""
    try:
        storage = t.untyped_storage()
        return storage.data_ptr(), storage.nbytes()
    except (RuntimeError, NotImplementedError, TypeError):
        return None


def tensor_bytes(tensors: Iterable[Any], exclude: set[int] = frozenset()) -> dict[int, int]:
    """{storage address: bytes} for the tensors in `tensors` (nested tuples/lists), skipping the
    storages in `exclude`."""
    found: dict[int, int] = {}

    def visit(x: Any) -> None:
        if isinstance(x, Tensor):
            s = _storage(x)
            if s is not None and s[0] not in exclude:
                found[s[0]] = max(found.get(s[0], 0), s[1])
        elif isinstance(x, (tuple, list)):
            for item in x:
                visit(item)

    visit(list(tensors))
    return found


class SavedBytes:
    """Records the storages autograd saves for backward while it is active (`with meter.recording():`),
    so that the size of a graph is known without walking it. Storages that outlive the graph
    anyway (the model's parameters and buffers, the batch) are excluded. The tensors are saved as they are (detached views of the same storage)."""

    def __init__(self, exclude: Iterable[Tensor]):
        self.exclude = set(tensor_bytes(exclude))
        self.storages: dict[int, int] = {}

    def _pack(self, t: Tensor) -> Tensor:
        s = _storage(t)
        if s is not None and s[0] not in self.exclude:
            self.storages[s[0]] = max(self.storages.get(s[0], 0), s[1])
        # detached, as torch's own example: the tensor itself would make a reference cycle (node ->
        # saved output -> its grad_fn -> node) that keeps the graph alive until the garbage collector
        # runs. Autograd restores the saved tensor's grad_fn on unpacking, so double backward still
        # differentiates through it (the operators' tests against dense Hessians cover it).
        return t.detach()

    @contextmanager
    def recording(self) -> Iterator["SavedBytes"]:
        with torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t):
            yield self

    def total(self, state: Any = ()) -> int:
        """Bytes of the saved storages plus those of the state's own tensors (each storage once)."""
        storages = dict(self.storages)
        storages.update(tensor_bytes([state], self.exclude))
        return int(sum(storages.values()))
