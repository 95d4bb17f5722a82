"""How hesskit reads `data`: one batch, or an iterable of batches, weighted by sample counts.

Also the helpers about batches that compression shares (`hk.quant`, `hk.prune`): one (inputs,
targets) pair (`is_pair`), its samples (`num_samples`, `select_samples`), `data` as a checked list
of batches (`batch_list`), and the mean loss over them (`mean_loss`)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from ._model import call_model, eval_mode, model_output, split_batch


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


def is_pair(data: Any) -> bool:
    """One (inputs, targets) batch: inputs a tensor or a dict of model inputs, targets a tensor, both
    with the same (nonzero-dimensional) number of samples. A list of batches is not one."""
    if not (isinstance(data, (tuple, list)) and len(data) == 2 and isinstance(data[0], (Tensor, Mapping))
            and isinstance(data[1], Tensor) and data[1].dim() > 0):
        return False
    inputs = first_tensor(data[0])
    return inputs is not None and inputs.dim() > 0 and inputs.shape[0] == data[1].shape[0]


def select_samples(batch: Any, index: Any) -> Any:
    """The samples `index` (an int tensor or a slice) of a batch: every tensor with a leading
    (sample) dimension is indexed, in dict inputs and (inputs, targets) pairs alike."""
    return torch.utils._pytree.tree_map(lambda t: t[index] if isinstance(t, Tensor) and t.dim() > 0 else t, batch)


def num_samples(batch: Any) -> int:
    """The leading dimension of a batch's first tensor (for (inputs, targets): of the inputs)."""
    t = first_tensor(batch)
    return 0 if t is None else (int(t.shape[0]) if t.dim() > 0 else 1)


def batch_list(data: Any) -> list[Any]:
    """`data` as a list of (inputs, targets) batches (a DataLoader is read once); inputs a tensor or a dict."""
    if data is None:
        raise ValueError("data: expected an (inputs, targets) batch or a list of batches, got None")
    if is_batch(data) or is_pair(data):
        batches = [data]
    elif isinstance(data, (list, tuple)) or hasattr(data, "__iter__"):
        if iter(data) is data:
            raise TypeError("data: got a one-shot iterator (e.g. a generator); pass a list of batches or a DataLoader")
        batches = list(data)
    else:
        raise TypeError(f"data: expected an (inputs, targets) batch or a list of batches, got {type(data).__name__}")
    if not batches:
        raise ValueError("data: expected at least one batch, got none")
    for i, batch in enumerate(batches):
        split_batch(batch, i)
    for _ in Batches(batches):  # sample counts: a clear error for an empty batch
        pass
    return batches


def mean_loss(model: nn.Module, criterion: Any, data: Any, *, output_fn: Any = None, mode: str | None = None) -> float:
    """(1/N) sum_b N_b criterion(outputs_b, y_b) over the batches of `data`, without gradients, in
    float64 accumulation: the loss every curvature operator of hesskit differentiates.

    outputs_b is `output_fn(model(x_b))` (`model(**x_b)` for dict inputs; without `output_fn` a tensor
    as it is, a ModelOutput's `logits`). Batches move to the model's device (floating tensors to its
    dtype). `mode="eval"` evaluates in eval mode (every module's mode is restored after); None (default)
    as the model is."""
    if mode not in (None, "eval"):
        raise ValueError(f"mode: expected None or 'eval', got {mode!r}")
    weight = next(model.parameters(), None)
    total, count = 0.0, 0
    with eval_mode(model, active=mode == "eval"), torch.no_grad():
        for index, (n, batch) in enumerate(Batches(batch_list(data))):
            if weight is not None:
                batch = move_batch(batch, weight.device, weight.dtype)
            x, y = split_batch(batch, index)
            total += n * float(criterion(model_output(call_model(model, x), output_fn), y))
            count += n
    return total / count
