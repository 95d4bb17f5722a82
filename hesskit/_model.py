"""How hesskit calls a user's model: one rule for inputs, outputs, attention kernels and losses.

* A batch is `(inputs, targets)`. Tensor inputs are passed as `model(inputs)`, a dict (any
  Mapping) as `model(**inputs)`: Hugging Face models take `input_ids`, `attention_mask`, ...
* `output_fn(outputs) -> tensor` picks what the criterion and the GGN see. Without it a tensor
  is used as it is, and a Hugging Face `ModelOutput` (or any Mapping) with a `logits` entry gives
  its logits, the only unambiguous choice; anything else asks for `output_fn`.
* Passes that are differentiated twice run PyTorch's math attention kernel: the fused kernels
  that `F.scaled_dot_product_attention` picks by default (flash, memory-efficient, and the CPU
  flash kernel) have no double backward (pytorch#116350). The user's own setting is restored.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

__all__ = [
    "call_model", "split_batch", "model_output", "differentiable_attention", "explain_backward_error",
    "warn_loss_dtype", "LowPrecisionSpy", "as_one_sample", "per_sample_grads", "BatchLoss",
]


def call_model(model: nn.Module, inputs: Any, params: Mapping[str, Tensor] | None = None) -> Any:
    """`model(**inputs)` for a Mapping of inputs, else `model(inputs)`; with `params`, the model is
    called with those tensors in place of its parameters and buffers (`torch.func.functional_call`)."""
    if params is not None:
        from torch.func import functional_call

        if isinstance(inputs, Mapping):
            return functional_call(model, dict(params), (), dict(inputs))
        return functional_call(model, dict(params), (inputs,))
    if isinstance(inputs, Mapping):
        return model(**inputs)
    return model(inputs)


def split_batch(batch: Any, index: int) -> tuple[Any, Any]:
    """A batch's (inputs, targets); a clear error for anything else."""
    if not isinstance(batch, (tuple, list)) or len(batch) != 2:
        got = f"a {type(batch).__name__}" + (f" of {len(batch)} items" if isinstance(batch, (tuple, list)) else "")
        raise ValueError(
            f"data: batch {index} should be an (inputs, targets) pair for criterion(outputs, targets), got {got}. "
            "Inputs may be a tensor (model(inputs)) or a dict (model(**inputs)); for anything else pass "
            "loss_fn(model, batch) instead of criterion"
        )
    return batch[0], batch[1]


def model_output(outputs: Any, output_fn: Callable[[Any], Tensor] | None) -> Tensor:
    """The tensor the criterion (and the GGN) sees: `output_fn(outputs)`, the tensor itself, or the
    `logits` of a ModelOutput/Mapping."""
    if output_fn is not None:
        picked = output_fn(outputs)
        if not isinstance(picked, Tensor):
            raise TypeError(f"output_fn: expected it to return a tensor, got {type(picked).__name__}")
        return picked
    if isinstance(outputs, Tensor):
        return outputs
    if isinstance(outputs, Mapping) and isinstance(outputs.get("logits"), Tensor):
        return outputs["logits"]
    keys = f" with keys {list(outputs.keys())}" if isinstance(outputs, Mapping) else ""
    raise TypeError(
        f"model: its forward returns a {type(outputs).__name__}{keys}, not a tensor; pass output_fn to pick the "
        "tensor the criterion should see, e.g. output_fn=lambda out: out[0]"
    )


class BatchLoss(nn.Module):
    """A batch's mean loss as a module around the model, `module(batch) -> loss`:
    `criterion(output_fn(model(inputs)), targets)`, or `loss_fn(model, batch)` (its first item when
    it returns `(loss, outputs)`). `torch.func.functional_call` on it swaps the model's parameters
    (registered as `model.<name>`) for other tensors: per-sample gradients, flat parameter vectors."""

    def __init__(self, model: nn.Module, criterion: Callable[[Any, Any], Tensor] | None = None,
                 loss_fn: Callable[[nn.Module, Any], Any] | None = None,
                 output_fn: Callable[[Any], Tensor] | None = None):
        super().__init__()
        self.model = model
        self.criterion, self.loss_fn, self.output_fn = criterion, loss_fn, output_fn

    def forward(self, batch: Any) -> Tensor:
        if self.criterion is None:
            result = self.loss_fn(self.model, batch)
            return result[0] if isinstance(result, (tuple, list)) else result
        inputs, targets = split_batch(batch, 0)
        return self.criterion(model_output(call_model(self.model, inputs), self.output_fn), targets)


@contextmanager
def differentiable_attention() -> Iterator[None]:
    """Run `F.scaled_dot_product_attention` on its math kernel, which has a double backward."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.MATH):
        yield


_NO_DOUBLE_BACKWARD = "derivative for"


def explain_backward_error(exc: RuntimeError, where: str) -> Exception:
    """A clear error for the two ways a user's graph cannot be differentiated as asked, else `exc`."""
    text = str(exc)
    if _NO_DOUBLE_BACKWARD in text and "not implemented" in text:
        return RuntimeError(
            f"{where}: the model calls an operation with no second derivative ({text.splitlines()[0]}). Fused "
            "attention kernels are the usual cause: hesskit selects PyTorch's math kernel for "
            "F.scaled_dot_product_attention, but a custom attention that calls a fused kernel directly (or "
            "xformers/flash-attn) cannot be differentiated twice; build the model with "
            "attn_implementation='eager' or route it through F.scaled_dot_product_attention"
        )
    if "backward through the graph a second time" in text:
        return RuntimeError(
            f"{where}: the loss's graph was already freed, most often by loss.backward() inside the closure. "
            "hesskit optimizers differentiate the loss themselves: the closure should zero the gradients and "
            "return the loss (or (loss, outputs)) without calling backward"
        )
    return exc


class LowPrecisionSpy:
    """Finds the first computation in a forward pass that depends on the parameters and runs in a
    lower precision than they have (a float32 RMSNorm or softmax inside a float64 model, a loss
    cast to float32): it caps the precision of every derivative without changing any dtype the
    user sees. Used as `with LowPrecisionSpy(model, dtype) as spy: loss = ...`; then `spy.found`
    is None or (module name, operation)."""

    def __init__(self, model: nn.Module, dtype: torch.dtype):
        self.model, self.dtype = model, dtype
        self.found: tuple[str, str] | None = None
        self._stack: list[str] = []
        self._handles: list[Any] = []

    def __enter__(self) -> LowPrecisionSpy:
        from torch.overrides import TorchFunctionMode

        spy = self

        class Mode(TorchFunctionMode):
            def __torch_function__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                if (spy.found is None and isinstance(out, Tensor) and out.is_floating_point() and out.requires_grad
                        and torch.finfo(out.dtype).bits < torch.finfo(spy.dtype).bits):
                    spy.found = (spy._stack[-1] if spy._stack else "the loss", getattr(func, "__name__", str(func)))
                return out

        def enter(label: str) -> Callable:
            def hook(*_: Any) -> None:  # a hook must return None, or it would replace the module's input
                self._stack.append(label)
            return hook

        def leave(*_: Any) -> None:  # ... or its output
            if self._stack:
                self._stack.pop()

        for name, m in self.model.named_modules():
            label = f"{name or type(self.model).__name__} ({type(m).__name__})"
            self._handles.append(m.register_forward_pre_hook(enter(label)))
            self._handles.append(m.register_forward_hook(leave))
        self._mode = Mode()
        self._mode.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._mode.__exit__(*exc)
        for handle in self._handles:
            handle.remove()

    def warn(self, where: str) -> None:
        if self.found is not None:
            module, op = self.found
            warnings.warn(
                f"{where}: {module} computes in lower precision than the parameters ({self.dtype}) at `{op}`, so every "
                "derivative is only as accurate as that (e.g. Llama's RMSNorm upcasts to float32 by design, or a "
                "loss cast to float32). Results are fine at that precision; for float64-exact checks remove the cast",
                stacklevel=4,
            )


def warn_loss_dtype(loss: Tensor, dtype: torch.dtype, where: str) -> None:
    """Warn when the loss has a lower precision than the parameters (it caps every product's)."""
    if loss.dtype != dtype and torch.finfo(loss.dtype).bits < torch.finfo(dtype).bits:
        warnings.warn(
            f"{where}: the loss is {loss.dtype} but the parameters are {dtype}, so every product is only "
            f"{loss.dtype}-accurate (e.g. a model that upcasts or downcasts internally, or a loss computed by the "
            "model from labels=); compute the loss in the parameters' dtype", stacklevel=3,
        )


def as_one_sample(sample: Any) -> Any:
    """A vmapped (or indexed) sample with its leading dimension of 1 put back, so the model sees a batch of one."""
    return torch.utils._pytree.tree_map(lambda t: t.unsqueeze(0) if isinstance(t, Tensor) else t, sample)


def per_sample_grads(fn: Callable[..., Tensor], weights: dict[str, Tensor], batched: tuple[Any, ...],
                     where: str) -> dict[str, Tensor]:
    """{name: (N, *shape)}: the gradient of `fn(weights, *sample_i)` for each sample i along the
    leading dimension of the `batched` arguments.

    torch.func's vmap over grad (one pass for the whole batch) where it can run the model; where it
    cannot (data-dependent Python such as `.item()` in a model's mask code, in-place updates of a
    recurrent state), a loop over samples with torch.autograd, named in a warning. Same result.
    """
    from torch.func import grad, vmap

    try:
        return vmap(grad(fn), in_dims=(None,) + (0,) * len(batched))(weights, *batched)
    except Exception as exc:  # noqa: BLE001 - any vmap failure falls back to the loop, which re-raises real errors
        first = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else ""
        reason = f"{type(exc).__name__}: {first}"
    warnings.warn(f"{where}: torch.func.vmap cannot run this model ({reason}); per-sample gradients fall back to a "
                  "loop over samples (the same result, slower)", stacklevel=3)
    leaves = {name: w.detach().requires_grad_() for name, w in weights.items()}
    count = next(t for t in torch.utils._pytree.tree_leaves(batched) if isinstance(t, Tensor)).shape[0]
    rows = []
    for i in range(count):
        sample = torch.utils._pytree.tree_map(lambda t: t[i] if isinstance(t, Tensor) else t, batched)
        with torch.enable_grad():
            value = fn(leaves, *sample)
        rows.append(torch.autograd.grad(value, list(leaves.values()), allow_unused=True, materialize_grads=True))
    return {name: torch.stack([row[j] for row in rows]) for j, name in enumerate(leaves)}


@contextmanager
def eval_mode(model: nn.Module, active: bool = True) -> Iterator[nn.Module]:
    """Run `model` in eval mode for a while (when `active`); every module's own mode is restored after."""
    modes = [(m, m.training) for m in model.modules()]
    try:
        if active:
            model.eval()
        yield model
    finally:
        for m, training in modes:
            m.training = training


@contextmanager
def requiring_grad(params: Iterable[Tensor]) -> Iterator[None]:
    """Let frozen weights be differentiated for a while (their requires_grad flags are restored)."""
    params = list(params)
    flags = [p.requires_grad for p in params]
    try:
        for p in params:
            p.requires_grad_(True)
        yield
    finally:
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)
