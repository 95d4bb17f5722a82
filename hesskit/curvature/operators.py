"""Curvature operators: matrix-free Hessian, GGN and empirical-Fisher products.

Each operator is the curvature of the *mean* loss over all samples in `data`,

    L(theta) = (1/N) sum_b N_b * L_b(theta),

where L_b is the (mean-reduced) loss of batch b with N_b samples, so a ragged last batch is
weighted exactly. Products use torch.autograd double backward only: torch.func's second
derivatives through `layer_norm` are wrong in torch 2.13, autograd's are right.

For in-memory data (one batch, or a list of batches) the operator keeps batch graphs between
products, as many as fit in a memory budget (`cache_memory`), so a product on a cached batch
costs one backward pass instead of a forward and two backward passes; the other batches are
rebuilt for every product, so one operator serves 1 batch and 1,000 batches alike. The cache
is rebuilt when a parameter or buffer of the model changes and released by `clear_cache()`;
DataLoaders are re-iterated for every product unless given a budget.

With `process_group=` (torch.distributed), each process holds its own shard of the data and a
product is the sample-weighted sum over the processes: the operator of the union of the shards.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager, nullcontext
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from .._batches import Batches, move_batch
from .._distributed import Collective, resolve_model
from .._checks import check_cache_memory, check_graph_params
from .._memory import SavedBytes, default_cache_memory
from .._model import (BatchLoss, as_one_sample, call_model, differentiable_attention, explain_backward_error,
                     model_output, per_sample_grads, split_batch, LowPrecisionSpy)
from ..layers import tied_names

__all__ = [
    "NonFiniteError",
    "MatrixFreeOperator", "CurvatureOperator", "HessianOperator", "GGNOperator", "EmpiricalFisherOperator",
    "LossHessianOperator", "LossGGNOperator", "LossEmpiricalFisherOperator", "layer_groups", "mode_sensitive_modules",
]

LossFn = Callable[[nn.Module, Any], Tensor]
_MODES = (None, "eval", "train")
_DENSE_LIMIT = 20_000


def _select_params(model: nn.Module, params: Any) -> tuple[list[str], list[nn.Parameter]]:
    """Resolve `params` (None, names, tensors or a submodule) to (names, parameters)."""
    named = list(model.named_parameters())
    if params is None:
        chosen = [(n, p) for n, p in named if p.requires_grad]
        if not chosen:
            raise ValueError("params: the model has no parameters that require grad")
        return [n for n, _ in chosen], [p for _, p in chosen]
    if isinstance(params, nn.Module):
        ids = {id(p) for p in params.parameters()}
        params = [p for _, p in named if id(p) in ids]
    if isinstance(params, (str, Tensor)):
        params = [params]
    by_name = dict(named)
    by_id = {id(p): n for n, p in named}
    aliases = tied_names(model)  # a tied parameter may be named by any of its names
    names: list[str] = []
    for i, item in enumerate(params):
        if isinstance(item, str):
            item = aliases.get(item, item)
            if item not in by_name:
                raise ValueError(f"params[{i}]: no parameter named {item!r}; the model has {list(by_name)}")
            names.append(item)
        elif isinstance(item, Tensor):
            if id(item) not in by_id:
                raise ValueError(f"params[{i}]: this tensor is not a parameter of the model")
            names.append(by_id[id(item)])
        else:
            raise TypeError(f"params[{i}]: expected a parameter name or tensor, got {type(item).__name__}")
    if not names:
        raise ValueError("params: expected at least one parameter, got none")
    if len(set(names)) != len(names):
        raise ValueError("params: a parameter is listed twice (a tied parameter counts once, under any of its names)")
    frozen = [n for n in names if not by_name[n].requires_grad]
    if frozen:
        raise ValueError(f"params: these parameters do not require grad: {frozen}")
    return names, [by_name[n] for n in names]


def layer_groups(names: list[str], by: str = "module") -> dict[str, list[str]]:
    """Parameter names grouped per layer (`by="module"`: "conv1.weight" and "conv1.bias" under
    "conv1") or one group per parameter (`by="parameter"`), in order."""
    if by not in ("module", "parameter"):
        raise ValueError(f"by: expected 'module' or 'parameter', got {by!r}")
    groups: dict[str, list[str]] = {}
    for name in names:
        groups.setdefault(name.rpartition(".")[0] if by == "module" else name, []).append(name)
    return groups


def mode_sensitive_modules(model: nn.Module) -> tuple[list[str], list[str]]:
    """Names of (BatchNorm-like, dropout-like) submodules whose output depends on train mode."""
    batchnorms, dropouts = [], []
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            batchnorms.append(name or type(m).__name__)
        elif isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0:
            dropouts.append(name or type(m).__name__)
        elif isinstance(m, nn.MultiheadAttention) and m.dropout > 0:
            dropouts.append(name or type(m).__name__)
    return batchnorms, dropouts


class NonFiniteError(ValueError, FloatingPointError):
    """A loss or a curvature product came out nan or inf. A ValueError for the curvature API,
    and a FloatingPointError, which the optimizers raise when training diverges."""


def _check_loss(loss: Any, where: str) -> Tensor:
    if not isinstance(loss, Tensor):
        raise TypeError(f"{where}: expected the loss to be a tensor, got {type(loss).__name__}")
    if loss.numel() != 1 or loss.dim() > 1:
        raise ValueError(
            f"{where}: expected a scalar (mean-reduced) loss, got shape {tuple(loss.shape)}; "
            "use reduction='mean'"
        )
    loss = loss.reshape(())
    if not torch.isfinite(loss):
        raise NonFiniteError(f"{where}: the loss is {loss.item()}; curvature of a non-finite loss is undefined")
    return loss


def _flat(tensors: Iterable[Tensor]) -> Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def _flat_batched(tensors: Iterable[Tensor], k: int) -> Tensor:
    return torch.cat([t.reshape(k, -1) for t in tensors], dim=1)


def _vjp(outputs: Tensor, inputs: list[Tensor] | Tensor, V: Tensor, batched: bool = False, retain: bool = True) -> Tensor:
    """Rows V^T (d outputs / d inputs), flattened: (k, n_inputs). V has shape (k, *outputs.shape).

    With `retain` the graph is kept, so products can be repeated on it; without, it is freed by
    the last row's backward pass (a graph built for one product: the peak memory drops by the
    graph's size). `batched` evaluates the k rows in one vmapped backward pass (faster on GPU)
    instead of a loop (faster on CPU).
    """
    inputs_list = [inputs] if isinstance(inputs, Tensor) else inputs
    k = V.shape[0]
    V = V.contiguous()
    if not outputs.requires_grad:
        return V.new_zeros(k, sum(t.numel() for t in inputs_list))
    if batched and k > 1:
        grads = torch.autograd.grad(
            outputs, inputs_list, V, retain_graph=retain, is_grads_batched=True, materialize_grads=True
        )
        return _flat_batched(grads, k)
    rows = [
        _flat(torch.autograd.grad(outputs, inputs_list, V[j], retain_graph=retain or j < k - 1, materialize_grads=True))
        for j in range(k)
    ]
    return torch.stack(rows)


class MatrixFreeOperator(ABC):
    """A symmetric n x n matrix available through products `op @ v` ((n,) or (n, k)).

    Checks the vector, counts and times products and refuses nan/inf; subclasses give `_matmat`.
    """

    shape: tuple[int, int]
    dtype: torch.dtype
    device: torch.device

    def __init__(self, n: int, dtype: torch.dtype, device: torch.device):
        self.shape = (n, n)
        self.dtype = dtype
        self.device = device
        self.num_matvecs = 0
        self.matvec_time = 0.0

    @abstractmethod
    def _matmat(self, V: Tensor) -> Tensor:
        """The matrix times V, shape (n, k)."""

    def __matmul__(self, v: Any) -> Tensor:
        if not isinstance(v, Tensor):
            raise TypeError(f"v: expected a torch.Tensor of shape ({self.shape[0]},) or ({self.shape[0]}, k), got {type(v).__name__}")
        n = self.shape[0]
        if v.dim() not in (1, 2) or v.shape[0] != n or (v.dim() == 2 and v.shape[1] == 0):
            raise ValueError(f"v: expected shape ({n},) or ({n}, k), got {tuple(v.shape)}")
        V = v.to(device=self.device, dtype=self.dtype).reshape(n, -1)
        if not torch.isfinite(V).all():
            raise ValueError("v: contains nan or inf")
        start = time.perf_counter()
        try:
            with torch.enable_grad():
                out = self._matmat(V)
        except RuntimeError as exc:
            clear = explain_backward_error(exc, type(self).__name__)
            if clear is exc:
                raise
            raise clear from exc
        self.num_matvecs += V.shape[1]
        self.matvec_time += time.perf_counter() - start
        if not torch.isfinite(out).all():
            raise NonFiniteError(f"{type(self).__name__}: a product came out nan or inf; the model or loss is not finite here")
        return out.reshape(v.shape)

    def dense(self, progress: bool = False) -> Tensor:
        """The exact n x n matrix (n products, 256 at a time), for small models. `progress=True`
        shows a progress bar of the products."""
        from ..progress import progress_bar

        n = self.shape[0]
        if n > _DENSE_LIMIT:
            raise ValueError(f"dense(): n = {n} is too large to materialise (limit {_DENSE_LIMIT}); use the estimators")
        eye = torch.eye(n, dtype=self.dtype, device=self.device)
        cols = []
        with progress_bar(progress, n, "dense", unit="product", group=getattr(self, "process_group", None)) as bar:
            for i in range(0, n, 256):
                cols.append(self @ eye[:, i : i + 256])
                bar.update(cols[-1].shape[1])
        matrix = torch.cat(cols, dim=1)
        return (matrix + matrix.T) / 2

    def to_scipy(self):
        """A `scipy.sparse.linalg.LinearOperator` view (float64 numpy in and out)."""
        from scipy.sparse.linalg import LinearOperator

        def matmat(x: np.ndarray) -> np.ndarray:
            return (self @ torch.as_tensor(np.asarray(x))).detach().cpu().double().numpy()

        return LinearOperator(self.shape, matvec=matmat, rmatvec=matmat, matmat=matmat, rmatmat=matmat, dtype=np.float64)


class CurvatureOperator(MatrixFreeOperator):
    """A symmetric n x n curvature matrix of a model's mean loss, available through products.

    Args:
        model: the network, any nn.Module (Hugging Face models included). Its train/eval mode,
            parameters, `.grad`, `requires_grad` and buffers are left as they were.
        criterion: `criterion(outputs, targets)` returning the mean loss of a batch, like
            `nn.CrossEntropyLoss()` or `hk.SequenceCrossEntropy()` for language models. Give
            either this or `loss_fn`.
        data: one `(inputs, targets)` batch or an iterable of them (list, DataLoader). Tensor
            inputs are passed as `model(inputs)`, a dict as `model(**inputs)`.
        params: the parameters to differentiate: None (all that require grad), a list of
            names (a tied parameter under any of its names) or parameter tensors, or a submodule.
        loss_fn: `loss_fn(model, batch) -> scalar mean loss`, or `-> (loss, outputs)` with the
            loss computed from those outputs (the GGN needs them), for models that do not fit
            the outputs/targets mould (custom or regularised losses, HF's `labels=` loss).
        output_fn: `output_fn(model outputs) -> tensor`, what the criterion and the GGN see.
            Default: a tensor as it is, the `logits` of a Hugging Face ModelOutput (or any
            Mapping with a `logits` entry); anything else asks for output_fn.
        mode: None uses the model as it is, but refuses one whose loss depends on a mode you may
            have forgotten to set: a BatchNorm or dropout module in train mode, or a loss that
            comes out different on two evaluations (dropout inside attention, any other
            randomness). "eval" evaluates in eval mode. "train" evaluates in train mode
            (BatchNorm uses batch statistics; its running statistics are restored); randomness is
            refused there. The model's own mode is restored after every pass.
        cache_memory: bytes that graphs kept between products may take (per-sample gradients
            for the empirical Fisher). Batches are cached in data order while their measured
            states fit (a state's size is what autograd saved to build it, measured on its
            first build); the others are rebuilt for every product and freed by it, so the peak
            stays within the budget plus one batch's graph. Results do not depend on the budget.
            0 caches nothing (every product pays a forward and a gradient per batch again);
            float("inf") caches everything. Default (None): for in-memory data a quarter of the
            RAM available at the first product on CPU, half the free GPU memory on CUDA; 0 for
            other iterables such as DataLoaders, which may reshuffle or load lazily (give a
            budget only if yours yields the same batches in the same order every time).
        process_group: a torch.distributed process group (e.g. `dist.group.WORLD`). Each process
            passes its own shard of the data (the shards may differ in size); a product is the
            sample-weighted sum of the processes' products, so every process gets the operator
            of the union of the shards, and the estimators (whose probes are drawn from the same
            seed on every process) return the same result on every process. Every process must
            call the same products in the same order. A process that fails makes every process
            raise, instead of hanging. Default None: one process, or the group of a
            `DistributedDataParallel` model.
        batch_size_fn: `batch_size_fn(batch) -> int` samples in a batch, used to weight batches
            (default: the leading dimension of the batch's first tensor).
        batched_products: evaluate the k columns of `op @ V` in one vmapped backward pass
            (faster on GPU) instead of a loop reusing the graph (faster on CPU). Default: by device.

    Samples. A sample is one entry along the batch's leading dimension; for a language model
    that is a sequence, and a batch's loss is whatever the criterion returns for it (for token
    cross-entropy, the mean over the batch's non-padding tokens). Batches are weighted by their
    sample counts; the per-sample terms (EF, exact GGN diagonal) use each sequence's own loss
    `criterion(f_i[None], y_i[None])`.

    Attention. Passes that are differentiated twice (Hessian and GGN products) run
    `F.scaled_dot_product_attention` on PyTorch's math kernel, which has a double backward
    (the fused kernels have none, pytorch#116350); products on an SDPA model equal those of the
    same model with eager attention. The user's kernel setting is untouched outside.
    """

    kind = "curvature"
    state_is_graph = True  # a batch's state holds an autograd graph (its size is what autograd saved)

    def __init__(
        self,
        model: nn.Module,
        criterion: Callable[[Any, Any], Tensor] | None = None,
        data: Any = None,
        params: Any = None,
        *,
        loss_fn: LossFn | None = None,
        output_fn: Callable[[Any], Tensor] | None = None,
        mode: str | None = None,
        cache_memory: float | None = None,
        batch_size_fn: Callable[[Any], int] | None = None,
        batched_products: bool | None = None,
        process_group: Any = None,
    ):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
        wrapped = model
        model, params, process_group = resolve_model(model, params, process_group)
        if (criterion is None) == (loss_fn is None):
            raise ValueError("criterion/loss_fn: give exactly one of criterion(outputs, targets) or loss_fn(model, batch)")
        if criterion is not None and not callable(criterion):
            raise TypeError(f"criterion: expected a callable criterion(outputs, targets), got {type(criterion).__name__}")
        if loss_fn is not None and not callable(loss_fn):
            raise TypeError(f"loss_fn: expected a callable loss_fn(model, batch), got {type(loss_fn).__name__}")
        if output_fn is not None and not callable(output_fn):
            raise TypeError(f"output_fn: expected a callable output_fn(outputs) -> tensor, got {type(output_fn).__name__}")
        if getattr(criterion, "reduction", "mean") != "mean":
            raise ValueError(f"criterion: expected reduction='mean', got reduction={criterion.reduction!r}")
        if mode not in _MODES:
            raise ValueError(f"mode: expected None, 'eval' or 'train', got {mode!r}")
        self.model = model
        self.criterion = criterion
        self.loss_fn = loss_fn
        self.output_fn = output_fn
        self.mode = mode
        self.param_names, self.params = _select_params(model, params)
        self._check_mode()
        self.batches = Batches(data, batch_size_fn)
        self.cache_memory = check_cache_memory(cache_memory)
        self.process_group = process_group
        self._collective = Collective(process_group, type(self).__name__)
        self._sizes = [p.numel() for p in self.params]
        super().__init__(sum(self._sizes), self.params[0].dtype, self.params[0].device)
        self.batched_products = self.device.type != "cpu" if batched_products is None else bool(batched_products)
        self._init_kwargs = dict(
            loss_fn=loss_fn, output_fn=output_fn, mode=mode, cache_memory=cache_memory, batch_size_fn=batch_size_fn,
            batched_products=batched_products, process_group=process_group,
        )
        self._wrapped = wrapped
        self._data = data
        self._cache: dict[int, Any] = {}  # batch index -> its state, while the parameters are unchanged
        self._cache_key: tuple[int, ...] | None = None
        self._budget: float | None = None  # cache_memory, or the default decided at the first pass
        self.state_bytes: dict[int, int] = {}  # batch index -> measured size of its state (bytes)
        self._retain = False  # whether the state being applied is cached (its graph must survive)
        self._checked_model = False  # precision and randomness, checked before the first pass

    # ----------------------------------------------------------------- model safety
    def _check_mode(self) -> None:
        batchnorms, dropouts = mode_sensitive_modules(self.model)
        modules = dict(self.model.named_modules())
        training = [name for name in batchnorms + dropouts if modules.get(name, self.model).training]
        if self.mode is None and training:
            raise ValueError(
                f"mode: {', '.join(training)} {'is' if len(training) == 1 else 'are'} in train mode, so the loss "
                "depends on the mode. Call model.eval() first, or pass mode='eval' (inference loss) or "
                "mode='train' (BatchNorm batch statistics; running statistics are restored)"
            )
        if self.mode == "train" and dropouts:
            raise ValueError(
                f"mode: 'train' would make the loss random through dropout in {dropouts}; use mode='eval'"
            )

    def _ensure_checked(self) -> None:
        if not self._checked_model:
            self._check_model()
            self._checked_model = True

    def _check_model(self) -> None:
        """Once, on the first batch, before the first pass over the data: warn when a computation that
        depends on the parameters runs in lower precision than they have (`LowPrecisionSpy`), and,
        with any module in train mode (and mode != "eval"), refuse a random loss: the loss is evaluated
        twice and must agree to the bit. That catches what module types cannot show: dropout inside
        attention (`F.dropout(x, p, self.training)`, SDPA's dropout_p), noise layers, stochastic
        depth. The global random state is restored afterwards."""
        _, batch = next(iter(self.batches))
        batch = move_batch(batch, self.device, self.dtype)
        devices = [self.device.index or 0] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            with self._forward_mode(), LowPrecisionSpy(self.model, self.dtype) as spy:
                first = self._batch_loss(batch, 0).detach()
            spy.warn(type(self).__name__)
            if self.mode == "eval" or not any(m.training for m in self.model.modules()):
                return
            with self._forward_mode(), torch.no_grad():
                second = self._batch_loss(batch, 0)
        if not torch.equal(first, second):
            raise ValueError(
                f"mode: the model is in train mode and its loss is random (two evaluations of batch 0 gave "
                f"{first.item():.6g} and {second.item():.6g}), e.g. dropout inside attention; curvature of a "
                "random loss is not one matrix. Call model.eval() first or pass mode='eval'"
            )

    @contextmanager
    def _forward_mode(self) -> Iterator[None]:
        """Evaluate the model in the chosen mode, with the math attention kernel (its graph can be
        differentiated twice and under vmap), then restore every module's mode and buffers."""
        flags = [(m, m.training) for m in self.model.modules()]
        saved, momenta = None, []
        if self.mode == "train":
            # BatchNorm's backward reads its running statistics, so they must not be restored in
            # place after the forward pass: momentum 0 leaves them bit-identical instead.
            saved = [(b, b.detach().clone()) for b in self.model.buffers()]
            momenta = [(m, m.momentum) for m in self.model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        try:
            for m, _ in momenta:
                m.momentum = 0.0
            if self.mode == "eval":
                self.model.eval()
            elif self.mode == "train":
                self.model.train()
            with differentiable_attention():
                yield
        finally:
            for m, flag in flags:
                m.training = flag
            for m, momentum in momenta:
                m.momentum = momentum
            with torch.no_grad():
                for b, value in saved or []:
                    if not torch.equal(b, value):
                        b.copy_(value)

    def _evaluate(self, batch: Any, index: int) -> tuple[Tensor, Tensor | None]:
        """One batch's mean loss, built with a graph to the parameters, and the output tensor it was
        computed from (None for a loss_fn that returns the loss alone)."""
        if self.criterion is not None:
            inputs, targets = split_batch(batch, index)
            outputs = self._forward(inputs, index)
            return self._criterion_loss(outputs, targets, index), outputs
        try:
            result = self.loss_fn(self.model, batch)
        except Exception as exc:
            raise ValueError(f"loss_fn: failed on batch {index}: {exc}") from exc
        outputs = None
        if isinstance(result, (tuple, list)):
            if len(result) != 2:
                raise ValueError(f"loss_fn: expected it to return the loss or (loss, outputs), got {len(result)} values")
            result, outputs = result[0], model_output(result[1], self.output_fn)
        return self._checked(result, index), outputs

    def _batch_loss(self, batch: Any, index: int) -> Tensor:
        return self._evaluate(batch, index)[0]

    def _checked(self, loss: Any, index: int) -> Tensor:
        return _check_loss(loss, f"data: batch {index}")

    def _criterion_loss(self, outputs: Any, targets: Any, index: int) -> Tensor:
        try:
            loss = self.criterion(outputs, targets)
        except Exception as exc:
            raise ValueError(f"criterion: failed on batch {index}: {exc}") from exc
        return self._checked(loss, index)

    def _forward(self, inputs: Any, index: int) -> Tensor:
        """The model's output tensor for one batch's inputs (`output_fn` applied)."""
        try:
            outputs = call_model(self.model, inputs)
        except Exception as exc:
            if isinstance(inputs, Tensor):
                shape = tuple(inputs.shape)
            elif isinstance(inputs, Mapping):
                shape = "dict with keys " + ", ".join(map(str, inputs))
            else:
                shape = type(inputs).__name__
            raise ValueError(f"data: the model cannot take the inputs of batch {index} ({shape}): {exc}") from exc
        return model_output(outputs, self.output_fn)

    def _sample_loss_module(self) -> nn.Module:
        """The per-batch loss as a module around the model, `module(batch) -> loss`, so torch.func
        can swap the model's parameters for per-sample gradients."""
        return BatchLoss(self.model, self.criterion, self.loss_fn, self.output_fn)

    # ----------------------------------------------------------------- per-batch states
    @abstractmethod
    def _prepare(self, batch: Any, index: int) -> Any:
        """Build whatever products on this batch need (a graph, per-sample gradients)."""

    @abstractmethod
    def _apply(self, state: Any, V: Tensor) -> Tensor:
        """The batch's curvature (of its mean loss) times V, shape (n, k)."""

    def _state_key(self) -> tuple[int, ...]:
        return tuple(t._version for t in (*self.model.parameters(), *self.model.buffers()))

    @property
    def budget(self) -> float:
        """The cache budget in bytes: `cache_memory`, or its default (decided at the first pass)."""
        if self.cache_memory is not None:
            return self.cache_memory
        if not self.batches.in_memory:
            return 0.0
        if self._budget is None:
            self._budget = default_cache_memory(self.device)
        return self._budget

    @property
    def cached_bytes(self) -> int:
        """Bytes the cached states take now (as measured when each was built)."""
        return sum(self.state_bytes[i] for i in self._cache)

    @property
    def cached_batches(self) -> list[int]:
        """Indices of the batches whose states are cached now."""
        return sorted(self._cache)

    def _states(self) -> Iterator[tuple[int, Any, bool]]:
        """(sample count, state, cached) for every batch in data order: a cached state, or one built
        now. A new state is kept while the measured sizes fit in the budget; the rest are yielded
        once and dropped, so their graphs are freed by the product (`_retain` False)."""
        key = self._state_key()
        if self._cache_key != key:
            self.clear_cache()
            self._cache_key = key
        budget = self.budget
        self._ensure_checked()
        used = self.cached_bytes
        for index, (count, batch) in enumerate(self.batches):
            if index in self._cache:
                yield count, self._cache[index], True
                continue
            measure = budget > 0 and index not in self.state_bytes
            state = self._build(move_batch(batch, self.device, self.dtype), index, measure)
            keep = budget > 0 and used + self.state_bytes[index] <= budget
            if keep:
                self._cache[index] = state
                used += self.state_bytes[index]
            yield count, state, keep
            del state  # an uncached graph must not outlive its product

    def _build(self, batch: Any, index: int, measure: bool) -> Any:
        """The batch's state; with `measure`, its size is recorded in `state_bytes`."""
        if not measure:
            return self._prepare(batch, index)
        meter = SavedBytes([*self.model.parameters(), *self.model.buffers(), batch])
        with meter.recording() if self.state_is_graph else nullcontext():
            state = self._prepare(batch, index)
        self.state_bytes[index] = meter.total(state)
        return state

    def _build_states(self) -> Iterator[tuple[int, Any]]:
        """(sample count, state) for every batch, built now and not cached."""
        self._ensure_checked()
        for index, (count, batch) in enumerate(self.batches):
            yield count, self._prepare(move_batch(batch, self.device, self.dtype), index)

    def clear_cache(self) -> None:
        """Release the cached per-batch states (they are rebuilt on the next product)."""
        self._cache = {}
        self._cache_key = None

    # ----------------------------------------------------------------- products
    def _matmat(self, V: Tensor) -> Tensor:
        def local() -> tuple[Tensor, int]:
            total, out = 0, torch.zeros_like(V)
            for count, state, cached in self._states():
                self._retain = cached
                out.add_(self._apply(state, V), alpha=count)
                total += count
                del state
            return out, total

        out, total = self._collective.sum(local, "a product")
        return out.div_(total)

    def _vjp(self, outputs: Tensor, inputs: list[Tensor] | Tensor, V: Tensor) -> Tensor:
        """`_vjp` on a batch's state; a graph that is not cached is freed by its last use."""
        return _vjp(outputs, inputs, V, self.batched_products, retain=self._retain)

    # ----------------------------------------------------------------- conveniences
    def batch_gradients(self) -> Iterator[tuple[int, Tensor]]:
        """(sample count, flat gradient of the batch's mean loss) for each batch in data order,
        in the operator's mode and parameter order (one forward and backward pass per batch).
        With a process group: this process's batches only."""
        self._ensure_checked()
        for index, (count, batch) in enumerate(self.batches):
            batch = move_batch(batch, self.device, self.dtype)
            with self._forward_mode():
                loss = self._batch_loss(batch, index)
            yield count, _flat(torch.autograd.grad(loss, self.params, materialize_grads=True))

    def restrict(self, params: Any) -> CurvatureOperator:
        """The same curvature restricted to a subset of parameters (a diagonal block)."""
        return type(self)(self._wrapped, self.criterion, self._data, params, **self._init_kwargs)

    def blocks(self, by: str = "module") -> Iterator[tuple[str, CurvatureOperator]]:
        """Yield (name, block operator) per layer (`by="module"`) or per parameter (`by="parameter"`)."""
        for key, names in layer_groups(self.param_names, by).items():
            yield key, self.restrict(names)

    def __repr__(self) -> str:
        group = "" if self.process_group is None else f", processes={self._collective.world_size}"
        return (f"{type(self).__name__}(n={self.shape[0]}, params={len(self.params)}, dtype={self.dtype}, "
                f"device={self.device}{group})")


class HessianOperator(CurvatureOperator):
    """The Hessian of the mean loss, H = d^2 L / d theta^2 (Pearlmutter 1994's double backward)."""

    kind = "hessian"

    def _prepare(self, batch: Any, index: int) -> Tensor:
        with self._forward_mode():
            loss = self._batch_loss(batch, index)
        grads = torch.autograd.grad(loss, self.params, create_graph=True, materialize_grads=True)
        return _flat(grads)

    def _apply(self, gradient: Tensor, V: Tensor) -> Tensor:
        return self._vjp(gradient, self.params, V.T).T


class GGNOperator(CurvatureOperator):
    """The generalised Gauss-Newton matrix G = J^T (d^2 l / d f^2) J (Schraudolph 2002).

    J is the Jacobian of the model outputs f with respect to the parameters. Products use the
    double-vjp trick for J v, so everything runs on torch.autograd's reverse mode. The outputs f
    are what `output_fn` picks (a ModelOutput's logits by default); with `loss_fn`, it returns
    `(loss, outputs)`.
    """

    kind = "ggn"

    def _prepare(self, batch: Any, index: int) -> tuple[Tensor, ...]:
        if self.criterion is not None:
            inputs, targets = split_batch(batch, index)
            with self._forward_mode():
                outputs = self._forward(inputs, index)
            detached = outputs.detach().requires_grad_()  # the loss as a function of the outputs alone
            loss = self._criterion_loss(detached, targets, index)
        else:
            with self._forward_mode():
                loss, outputs = self._evaluate(batch, index)
            if outputs is None:
                raise ValueError("loss_fn: GGNOperator needs the model outputs; make loss_fn(model, batch) return "
                                 "(loss, outputs) with the loss computed from those outputs, or pass criterion")
            detached = outputs  # d loss / d outputs through the loss's own graph
        loss_grad = torch.autograd.grad(loss, detached, create_graph=True)[0]
        dummy = torch.zeros_like(outputs, requires_grad=True)
        jt_dummy = _flat(torch.autograd.grad(outputs, self.params, dummy, create_graph=True, materialize_grads=True))
        return outputs, detached, loss_grad, dummy, jt_dummy

    def _apply(self, state: tuple[Tensor, ...], V: Tensor) -> Tensor:
        outputs, detached, loss_grad, dummy, jt_dummy = state
        k = V.shape[1]
        jv = self._vjp(jt_dummy, dummy, V.T).reshape(k, *outputs.shape)  # J v via d/du <J^T u, v>
        hjv = self._vjp(loss_grad, detached, jv).reshape(k, *outputs.shape)
        return self._vjp(outputs, self.params, hjv).T

    def exact_diagonal(self) -> Tensor:
        """diag(G) exactly, with no probes (BackPACK's DiagGGNExact), for models with few outputs per sample.

        Per sample i, the output Hessian of its own loss l_i = criterion(f_i[None], y_i[None]) is
        diagonalised, H_i = sum_c lambda_ic u_ic u_ic^T, and

            diag(G) = (1/N) sum_i sum_c lambda_ic (J_i^T u_ic)^2,

        where J_i^T u_ic is the gradient of u_ic . f(x_i) (first derivatives only, torch.func
        vmapped over samples). Cost: C per-sample-gradient passes per batch, C = outputs per sample.
        The criterion must average per-sample losses (as mean-reduced cross-entropy and MSE do);
        otherwise a ValueError says so.
        """
        from torch.func import jacrev, vmap

        if self.criterion is None:
            raise ValueError("loss_fn: exact_diagonal needs criterion(outputs, targets), to split each sample's loss "
                             "from the model; use hk.diagonal(op) with loss_fn")
        batchnorms, _ = mode_sensitive_modules(self.model)
        if self.mode == "train" and batchnorms:
            raise ValueError(f"mode: per-sample terms are undefined with BatchNorm batch statistics ({batchnorms}); "
                             "use mode='eval'")
        criterion, output_fn = self.criterion, self.output_fn
        weights = {name: p.detach() for name, p in zip(self.param_names, self.params)}
        fixed = {name: p.detach() for name, p in self.model.named_parameters() if name not in weights}

        def sample_loss(f: Tensor, y: Any) -> Tensor:
            return criterion(f.unsqueeze(0), as_one_sample(y))

        def projected_output(w: dict[str, Tensor], x: Any, u: Tensor) -> Tensor:
            outputs = model_output(call_model(self.model, as_one_sample(x), {**fixed, **w}), output_fn)
            return outputs.reshape(-1) @ u

        def local() -> tuple[Tensor, int]:
            self._ensure_checked()
            total, out = 0, torch.zeros(self.shape[0], dtype=self.dtype, device=self.device)
            for index, (count, batch) in enumerate(self.batches):
                inputs, targets = split_batch(move_batch(batch, self.device, self.dtype), index)
                with self._forward_mode(), torch.no_grad():
                    outputs = self._forward(inputs, index)
                    loss = self._criterion_loss(outputs, targets, index)
                outputs = outputs.detach()
                n, c = outputs.shape[0], outputs[0].numel()
                if not torch.allclose(vmap(sample_loss)(outputs, targets).mean(), loss, rtol=1e-5, atol=0):
                    raise ValueError("criterion: exact_diagonal needs a batch loss equal to the mean of the per-sample "
                                     "losses criterion(f_i[None], y_i[None]) (padding tokens make a token mean differ)")
                hess = vmap(jacrev(jacrev(sample_loss)))(outputs, targets)  # reverse-over-reverse: no jvp rules needed
                lam, U = torch.linalg.eigh(hess.reshape(n, c, c))
                with self._forward_mode():
                    for j in range(c):
                        g = per_sample_grads(projected_output, weights, (inputs, U[:, :, j]), "GGNOperator.exact_diagonal")
                        flat = torch.cat([g[name].reshape(n, -1) for name in self.param_names], dim=1)
                        out.add_((lam[:, j : j + 1] * flat.square()).sum(dim=0) / n, alpha=count)
                total += count
            return out, total

        out, total = self._collective.sum(local, "exact_diagonal")
        return out.div_(total)


class EmpiricalFisherOperator(CurvatureOperator):
    """The empirical Fisher F = (1/N) sum_i g_i g_i^T, g_i the gradient of sample i's loss alone.

    Per-sample gradients come from torch.func (`vmap` over `grad`: first derivatives only), or a
    loop over samples where vmap cannot run the model (named in a warning), and each batch keeps
    its (N_b x n) gradient matrix, so a product is two matrix multiplications. For a language
    model a sample is a sequence: g_i is the gradient of that sequence's own (token-mean) loss.
    """

    kind = "empirical_fisher"
    state_is_graph = False  # the (N_b x n) per-sample gradients, no graph (torch.func refuses saved-tensor hooks)

    def _check_mode(self) -> None:
        super()._check_mode()
        batchnorms, _ = mode_sensitive_modules(self.model)
        if self.mode == "train" and batchnorms:
            raise ValueError(
                f"mode: per-sample gradients are undefined with BatchNorm batch statistics ({batchnorms}); use mode='eval'"
            )

    def _prepare(self, batch: Any, index: int) -> Tensor:
        from torch.func import functional_call

        with self._forward_mode(), torch.no_grad():
            self._batch_loss(batch, index)  # clear errors for bad inputs, non-scalar or non-finite loss
        wrapper = self._sample_loss_module()
        weights = {"model." + name: p.detach() for name, p in zip(self.param_names, self.params)}
        # the other parameters enter as constants: no graph through them, no gradient for them
        fixed = {"model." + name: p.detach() for name, p in self.model.named_parameters() if "model." + name not in weights}

        def sample_loss(w: dict[str, Tensor], sample: Any) -> Tensor:
            return functional_call(wrapper, {**fixed, **w}, (as_one_sample(sample),)).reshape(())

        with self._forward_mode():
            grads = per_sample_grads(sample_loss, weights, (batch,), type(self).__name__)
        per_sample = torch.cat([grads["model." + name].flatten(1) for name in self.param_names], dim=1)
        if not torch.isfinite(per_sample).all():
            raise ValueError(f"data: batch {index} has a per-sample gradient with nan or inf")
        return per_sample

    def _apply(self, per_sample: Tensor, V: Tensor) -> Tensor:
        return per_sample.T @ (per_sample @ V) / per_sample.shape[0]

    def per_sample_gradients(self, limit: int | None = None) -> Tensor:
        """The (N, n) matrix G whose rows are the per-sample gradients g_i in data order, so that
        F = G^T G / N; with `limit`, its first `limit` rows (later batches are not evaluated).
        M-FAC's and WoodFisher's inverses are built from these rows."""
        rows: list[Tensor] = []
        for _, per_sample in self._build_states():
            rows.append(per_sample.detach())
            if limit is not None and sum(len(r) for r in rows) >= limit:
                break
        G = torch.cat(rows)
        return G if limit is None else G[:limit]


# --------------------------------------------------------------------- on one computed loss
class LossHessianOperator(MatrixFreeOperator):
    """The Hessian of one already computed scalar `loss` with respect to `params`.

    The products run on the loss's own graph (Pearlmutter's double backward), so an optimizer
    that has just evaluated its closure pays one backward pass per product and no forward
    pass. `grads` may pass gradients already taken with `create_graph=True` (the optimizer's
    step gradient), which saves one backward. The graph lives as long as this object.
    """

    kind = "hessian"

    def __init__(self, loss: Tensor, params: Any, grads: list[Tensor] | None = None):
        self.params = check_graph_params(params)
        loss = _check_loss(loss, "loss")
        if grads is None:
            if not loss.requires_grad:
                raise ValueError("loss: does not depend on params (no graph); compute it with gradients enabled")
            grads = torch.autograd.grad(loss, self.params, create_graph=True, materialize_grads=True)
        if len(grads) != len(self.params):
            raise ValueError(f"grads: expected one gradient per parameter ({len(self.params)}), got {len(grads)}")
        self._gradient = _flat(grads)
        super().__init__(self._gradient.numel(), self.params[0].dtype, self.params[0].device)

    def _matmat(self, V: Tensor) -> Tensor:
        return _vjp(self._gradient, self.params, V.T).T


class LossGGNOperator(MatrixFreeOperator):
    """The generalised Gauss-Newton matrix J^T (d^2 loss / d outputs^2) J of one computed loss.

    `outputs` are the model outputs the `loss` was computed from, with their graph to `params`
    (J is d outputs / d params). Used by Hessian-free optimization on the step's own graph.
    """

    kind = "ggn"

    def __init__(self, loss: Tensor, outputs: Tensor, params: Any):
        self.params = check_graph_params(params)
        loss = _check_loss(loss, "loss")
        if not isinstance(outputs, Tensor) or not outputs.requires_grad:
            raise ValueError("outputs: expected the model outputs the loss was computed from, with their graph")
        self._outputs = outputs
        self._loss_grad = torch.autograd.grad(loss, outputs, create_graph=True)[0]
        self._dummy = torch.zeros_like(outputs, requires_grad=True)
        self._jt_dummy = _flat(torch.autograd.grad(outputs, self.params, self._dummy, create_graph=True, materialize_grads=True))
        super().__init__(self._jt_dummy.numel(), self.params[0].dtype, self.params[0].device)

    def _matmat(self, V: Tensor) -> Tensor:
        k, shape = V.shape[1], self._outputs.shape
        jv = _vjp(self._jt_dummy, self._dummy, V.T).reshape(k, *shape)  # J v via d/du <J^T u, v>
        hjv = _vjp(self._loss_grad, self._outputs, jv).reshape(k, *shape)
        return _vjp(self._outputs, self.params, hjv).T


class LossEmpiricalFisherOperator(MatrixFreeOperator):
    """The empirical Fisher F = (1/N) sum_i g_i g_i^T of one computed loss, from its outputs.

    `outputs` (N, ...) are the model outputs the scalar `loss` was computed from, with their graph
    to `params`. A sample is a row of the outputs: with u = d loss / d outputs,

        g_i = N J_i^T u_i,    J_i = d outputs_i / d params,

    which is the gradient of sample i's own loss whenever the loss is the mean over the rows of
    per-row losses (mean-reduced cross-entropy, or MSE, on (N, C) outputs), as
    `hk.EmpiricalFisherOperator` defines it (tested equal to its dense matrix). A product needs no
    per-sample gradients: J v by the double-vjp trick, w_i = u_i . (J v)_i, then F v = N J^T (w u)
    (three vector-Jacobian products on the step's graph, like `hk.LossGGNOperator`). Rows coupled
    through the batch (BatchNorm in train mode) have no per-sample losses: then F is this formula
    and not an empirical Fisher. The graph lives as long as this object.
    """

    kind = "empirical_fisher"

    def __init__(self, loss: Tensor, outputs: Tensor, params: Any):
        self.params = check_graph_params(params)
        if not isinstance(loss, Tensor) or loss.numel() != 1:
            raise ValueError(f"loss: expected a scalar (mean-reduced) loss tensor, got {getattr(loss, 'shape', loss)!r}")
        if not torch.isfinite(loss):
            raise NonFiniteError(f"loss: the loss is {loss.item()}; curvature of a non-finite loss is undefined")
        if not isinstance(outputs, Tensor) or not outputs.requires_grad or outputs.dim() == 0:
            raise ValueError("outputs: expected the (N, ...) model outputs the loss was computed from, with their graph")
        self._outputs = outputs
        self.num_samples = outputs.shape[0]
        u = torch.autograd.grad(loss.reshape(()), outputs, retain_graph=True)[0]
        self._sample_grads = (u * self.num_samples).detach()  # row i: d l_i / d outputs_i
        self._dummy = torch.zeros_like(outputs, requires_grad=True)
        jt = torch.autograd.grad(outputs, self.params, self._dummy, create_graph=True, materialize_grads=True)
        self._jt_dummy = torch.cat([t.reshape(-1) for t in jt])
        super().__init__(self._jt_dummy.numel(), self.params[0].dtype, self.params[0].device)

    def _matmat(self, V: Tensor) -> Tensor:
        e, columns = self._sample_grads, []
        for j in range(V.shape[1]):
            jv = torch.autograd.grad(self._jt_dummy, self._dummy, V[:, j], retain_graph=True)[0]  # J v, (N, ...)
            w = (e * jv).reshape(self.num_samples, -1).sum(dim=1)  # g_i^T v
            weights = w.reshape(-1, *([1] * (e.dim() - 1))) * e / self.num_samples
            fv = torch.autograd.grad(self._outputs, self.params, weights, retain_graph=True, materialize_grads=True)
            columns.append(torch.cat([t.reshape(-1) for t in fv]))
        return torch.stack(columns, dim=1)
