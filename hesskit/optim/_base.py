"""Plumbing shared by hesskit's optimizers: the closure contract, gradients, seeds, checks.

The step contract (every hesskit optimizer):

    def closure():
        opt.zero_grad()
        return criterion(model(x), y)        # a fresh forward pass; do NOT call backward
    loss = opt.step(closure)

The optimizer computes the gradient itself (and writes it to `.grad`, so clipping or logging
code still sees it), and builds the second-order graph (`create_graph=True`) only on the
steps that need curvature. Optimizers that need the model outputs (Sophia-G, Newton-CG with
the GGN) take a closure returning `(loss, outputs)`; the loss must be computed from those outputs.

Data parallel (torch.distributed, DistributedDataParallel). The optimizer takes the gradient with
`torch.autograd.grad`, which DDP's gradient hooks do not see, so an optimizer built with
`process_group=` averages the gradient over the processes itself (DDP's convention: the mean of
the processes' mean losses), and averages its curvature estimate too. AdaHessian, Sophia (H and G)
and M-FAC support it; K-FAC, MKOR and Newton-CG would need their factors or products all-reduced
and take no process_group argument. Without one, in a job of several processes, every process would step
on its own gradient and curvature and the replicas would drift apart: a warning says so.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .._distributed import Collective
from .._model import differentiable_attention, explain_backward_error, model_output, warn_loss_dtype
from .._checks import is_int, is_real
from ..curvature.operators import NonFiniteError

__all__ = ["ClosureOptimizer", "Evaluation"]


@dataclass
class Evaluation:
    """One closure call: the loss, the gradient of every trainable parameter, and the outputs if given.

    With a process group, `grads` are averaged over the processes, except with create_graph=True:
    then they are this process's own, with their graph for curvature products, and `.grad` holds
    the average."""

    loss: Tensor
    grads: list[Tensor]
    outputs: Tensor | None


def check_number(name: str, value: Any, low: float = 0.0, high: float = math.inf, *, open_low: bool = False,
                 open_high: bool = False) -> float:
    """A finite number in [low, high] (ends excluded when open_*), else a ValueError naming it."""
    if not is_real(value) or not math.isfinite(value):
        raise ValueError(f"{name}: expected a finite number, got {value!r}")
    below = value <= low if open_low else value < low
    above = value >= high if open_high else value > high
    if below or above:
        lo, hi = "(" if open_low else "[", ")" if open_high else "]"
        raise ValueError(f"{name}: expected a value in {lo}{low}, {high}{hi}, got {value!r}")
    return float(value)


def check_betas(name: str, betas: Any, count: int = 2) -> tuple[float, ...]:
    if not isinstance(betas, (tuple, list)) or len(betas) != count:
        raise ValueError(f"{name}: expected a tuple of {count} numbers in [0, 1), got {betas!r}")
    return tuple(check_number(f"{name}[{i}]", b, 0.0, 1.0, open_high=True) for i, b in enumerate(betas))


def check_seed(seed: Any) -> int:
    """The optimizer's probe seed: a fixed default keeps runs reproducible, and it is saved in state_dict."""
    if not is_int(seed) or seed < 0:
        raise ValueError(f"seed: expected a non-negative integer, got {seed!r}")
    return int(seed)


def step_seed(seed: int, step: int) -> int:
    """A distinct, reproducible probe seed for step `step` (so a restored optimizer draws the same probes)."""
    return (seed * 1_000_003 + step) % (2**62)


class ClosureOptimizer(torch.optim.Optimizer):
    """A `torch.optim.Optimizer` that evaluates `closure()` and differentiates the loss itself."""

    needs_outputs = False  # Sophia-G / Newton-CG with GGN: closure returns (loss, outputs)
    settings: tuple[str, ...] = ()  # optimizer-wide attributes saved in state_dict under "hesskit"
    process_group: Any = None  # set by the optimizers that take one (AdaHessian, Sophia, MFAC)
    _collective: Collective | None = None
    _warned_group = False

    def _use_group(self, process_group: Any) -> None:
        """Set the torch.distributed group gradients and curvature are averaged over (see the module
        docstring). Only the optimizers that average their curvature call it; the others take no
        `process_group` argument."""
        if process_group is not None:
            self.process_group = process_group
            self._collective = Collective(process_group, type(self).__name__)

    def _warn_without_group(self) -> None:
        import torch.distributed as dist

        if self._warned_group or self._collective is not None or not dist.is_available() or not dist.is_initialized():
            return
        if dist.get_world_size() > 1:
            self._warned_group = True
            warnings.warn(
                f"{type(self).__name__}: torch.distributed runs {dist.get_world_size()} processes but the optimizer has "
                "no process_group, so each process steps on its own gradient and curvature (hesskit's optimizers take "
                "gradients with torch.autograd.grad, which DDP does not average) and the replicas drift apart. Pass "
                "process_group=dist.group.WORLD (or your DDP model's group).", stacklevel=4)

    def state_dict(self) -> dict:
        state = super().state_dict()
        state["hesskit"] = {name: getattr(self, name) for name in self.settings}
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        state_dict = dict(state_dict)
        settings = state_dict.pop("hesskit", {})
        super().load_state_dict(state_dict)
        for name, value in settings.items():
            setattr(self, name, value)

    def _global_step(self) -> int:
        """Steps taken so far (kept as the first trainable parameter's "step" state)."""
        return int(self.state[self._trainable()[0]].get("step", 0))

    def _trainable(self) -> list[Tensor]:
        return [p for group in self.param_groups for p in group["params"] if p.requires_grad]

    def _call_closure(self, closure: Callable | None, create_graph: bool = False) -> tuple[Tensor, Tensor | None]:
        """Call the closure (on the math attention kernel when its graph will be differentiated twice):
        (loss, outputs or None), checked."""
        name = type(self).__name__
        if closure is None or not callable(closure):
            need = "(loss, outputs)" if self.needs_outputs else "the loss"
            raise TypeError(
                f"closure: {name}.step needs closure() that zeroes the gradients and returns {need} from a fresh "
                "forward pass, without calling backward (the optimizer differentiates it)"
            )
        second_order = create_graph or self.needs_outputs  # products differentiate the model twice
        with torch.enable_grad(), differentiable_attention() if second_order else nullcontext():
            out = closure()
        outputs = None
        if isinstance(out, (tuple, list)):
            if len(out) != 2:
                raise ValueError(f"closure: expected the loss or a (loss, outputs) pair, got {len(out)} values")
            out, outputs = out
            outputs = model_output(outputs, None)  # a Hugging Face ModelOutput gives its logits
        elif self.needs_outputs:
            raise ValueError(f"closure: {name} needs closure() to return (loss, outputs), the loss computed from the outputs")
        if not isinstance(out, Tensor) or out.numel() != 1:
            raise ValueError(f"closure: expected a scalar loss tensor, got {getattr(out, 'shape', type(out).__name__)}")
        if not out.requires_grad:
            raise ValueError("closure: the loss has no graph; compute it from the model without torch.no_grad and "
                             "do not call backward inside the closure")
        if not torch.isfinite(out):
            raise NonFiniteError(f"closure: the loss is {out.item()}; training has diverged (lower lr or raise damping)")
        params = self._trainable()
        if params:
            warn_loss_dtype(out, params[0].dtype, f"closure ({name})")
        return out.reshape(()), outputs

    def _evaluate(self, closure: Callable | None, create_graph: bool = False) -> Evaluation:
        """Call the closure and take the gradient of every trainable parameter (zero if unused).

        With `create_graph=True` the gradients keep their graph for Hessian-vector products.
        The detached gradients are also written to `.grad`.
        """
        self._warn_without_group()
        params = self._trainable()

        found: dict[str, Evaluation] = {}

        def local() -> tuple[Tensor, int]:
            loss, outputs = self._call_closure(closure, create_graph)
            try:
                grads = list(torch.autograd.grad(loss, params, create_graph=create_graph, retain_graph=create_graph or
                                                 outputs is not None, materialize_grads=True))
            except RuntimeError as exc:
                clear = explain_backward_error(exc, f"closure ({type(self).__name__})")
                if clear is exc:
                    raise
                raise clear from exc
            found["ev"] = Evaluation(loss=loss, grads=grads, outputs=outputs)
            return torch.cat([g.detach().reshape(-1) for g in grads]), 1

        if self._collective is None:
            local()
            ev = found["ev"]
            for p, g in zip(params, ev.grads):
                p.grad = g.detach().clone() if create_graph else g
            return ev
        total, count = self._collective.sum(local, "the gradient")
        ev = found["ev"]
        mean = split_like(total.div_(count), params)
        for p, g in zip(params, mean):
            p.grad = g.clone()
        if not create_graph:
            ev.grads = [p.grad for p in params]
        return ev

    def _average(self, tensors: list[Tensor], what: str) -> list[Tensor]:
        """The mean of `tensors` over the processes (as they are with one process)."""
        if self._collective is None:
            return tensors
        total, count = self._collective.sum(lambda: (torch.cat([t.reshape(-1) for t in tensors]), 1), what)
        return split_like(total.div_(count), tensors)


def split_like(flat: Tensor, params: list[Tensor]) -> list[Tensor]:
    """Cut a flat vector into views shaped like `params`."""
    out, start = [], 0
    for p in params:
        out.append(flat[start : start + p.numel()].view_as(p))
        start += p.numel()
    return out
