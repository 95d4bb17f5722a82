"""How hesskit reads `data`: one batch, or an iterable of batches, weighted by sample counts."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import Tensor


def is_batch(x: Any) -> bool:
    """A single batch: a tensor, a dict of tensors, or a tuple/list of tensors and dicts with at
    least one tensor, such as `(x, y)` or `({"input_ids": ..., "attention_mask": ...}, labels)`.
    A list of dicts alone is a list of batches."""
    if isinstance(x, Tensor) or isinstance(x, Mapping):
        return True
    return (isinstance(x, (tuple, list)) and any(isinstance(t, Tensor) for t in x)
            and all(isinstance(t, (Tensor, Mapping)) for t in x))


def first_tensor(batch: Any) -> Tensor | None:
    if isinstance(batch, Tensor):
        return batch
    items = batch.values() if isinstance(batch, Mapping) else batch if isinstance(batch, (tuple, list)) else ()
    for item in items:
        found = first_tensor(item)
        if found is not None:
            return found
    return None


def move_batch(batch: Any, device: torch.device, dtype: torch.dtype) -> Any:
    """Copy a batch's tensors to the model's device; floating tensors also take the model's dtype."""
    if isinstance(batch, Tensor):
        if batch.is_floating_point():
            return batch.to(device=device, dtype=dtype)
        return batch.to(device=device)
    if isinstance(batch, Mapping):
        return {k: move_batch(v, device, dtype) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(move_batch(v, device, dtype) for v in batch)
    return batch


class Batches:
    """A re-iterable view of `data` that yields `(num_samples, batch)` pairs.

    `data` is one batch or an iterable of batches (a list, a tuple, a DataLoader). A one-shot
    iterator (a generator) is refused, because every product passes over the data again.
    """

    def __init__(self, data: Any, batch_size_fn: Callable[[Any], int] | None = None):
        if data is None:
            raise ValueError("data: expected an (inputs, targets) batch or an iterable of batches, got None")
        if is_batch(data):
            self.source: Iterable[Any] = [data]
            self.in_memory = True
        elif isinstance(data, (list, tuple)):
            if len(data) == 0:
                raise ValueError("data: expected at least one batch, got an empty sequence")
            self.source = list(data)
            self.in_memory = True
        elif isinstance(data, Iterable):
            if iter(data) is data:
                raise TypeError(
                    "data: got a one-shot iterator (e.g. a generator); curvature products pass over "
                    "the data many times, so pass a list of batches or a DataLoader"
                )
            self.source = data
            self.in_memory = False
        else:
            raise TypeError(
                f"data: expected an (inputs, targets) batch or an iterable of batches, got {type(data).__name__}"
            )
        self.batch_size_fn = batch_size_fn

    def count(self, batch: Any, index: int) -> int:
        if self.batch_size_fn is not None:
            n = int(self.batch_size_fn(batch))
        else:
            t = first_tensor(batch)
            if t is None:
                raise TypeError(f"data: batch {index} contains no tensor; pass batch_size_fn to count its samples")
            n = int(t.shape[0]) if t.dim() > 0 else 1
        if n <= 0:
            raise ValueError(f"data: batch {index} is empty (0 samples)")
        return n

    def __iter__(self) -> Iterator[tuple[int, Any]]:
        empty = True
        for i, batch in enumerate(self.source):
            empty = False
            yield self.count(batch, i), batch
        if empty:
            raise ValueError("data: the iterable yielded no batches")
