"""Sample-order effects without retraining: Taylor expansions of Adam around one reference run.

Yang, Li, Yang, Chen & Gong, "Estimating the Effects of Sample Training Orders for Large Language
Models without Retraining" (arXiv 2505.22042; the paper calls the framework FUT).

Train once with Adam on batches B_0 .. B_{T-1} and keep the reference iterates theta_0 .. theta_T.
Training on the same batches in another order l_0 .. l_{T-1} would give iterates gamma_t with
gamma_0 = theta_0 and

    gamma_{t+1} = gamma_t - lr * Adam_t(grad L(gamma_t; B_{l_t})),

where Adam_t is Adam's step from its moments. Instead of evaluating the model at gamma_t, expand
the gradient, the only place the parameters enter Adam's update, around the reference iterate of
the same step, delta_t = gamma_t - theta_t:

    grad L(gamma_t; B) ~ grad L(theta_t; B)                        (order 0: replay stored gradients)
                       + H(theta_t; B) delta_t                      (order 1: one Hessian-vector product)
                       + 1/2 D^3 L(theta_t; B)[delta_t, delta_t]    (order 2: the gradient of delta^T H delta)

and run Adam's moment recursion on the estimated gradients. Every model pass is at a reference
iterate; none is at gamma_t. To order k this is the order-k Taylor expansion of the Adam update in
the parameters (the two differ only at order k + 1): first order is exact when the loss is
quadratic in the parameters, second order when it is cubic (both are tested).

Reading of the paper. Its method section was not retrievable here; the abstract and a public
summary give the recursion gamma_{t+1} = gamma_t - lr Gamma(gamma_t, B_{l_t}) with
Gamma(gamma, B) ~ Gamma(theta_t, B) + grad Gamma(theta_t, B) (gamma - theta_t) [+ the second-order
term], Gamma the Adam update. We carry the estimated run's own Adam moments (a reordered run's
momentum holds its own batches' gradients, not the reference's), which costs nothing.

Random projections. The paper stores its checkpoints through random (Johnson-Lindenstrauss)
projections to fit an LLM's trajectory in memory. Here every trajectory, reference, estimated or
retrained, keeps a k-dimensional sketch P theta_t of every iterate (P Gaussian / sqrt(k), drawn from
a seed), so trajectories of many orders are compared step by step in O(T k) memory with distances
preserved to a relative standard deviation of about 1/sqrt(2k). The expansion itself needs the full
reference iterates: `train_adam(keep_iterates=True)` stores them (T n numbers);
with `keep_iterates=False` the estimator replays the reference run beside the estimate (O(n)
memory, one more gradient per step unless the two orders take the same batch).

Smoothness. The expansion needs a loss that is smooth in the parameters along the way. A ReLU
network's Hessian does not see the kinks a reordered run crosses: on tests/heldout.py's ReLU digits
MLP (20 batches, lr 1e-3, reversed order) second order was barely better than order 0 (79% against
83% of the reference-to-retrained distance), while the same network with tanh gave 2.8%. GELU
transformers, like the character LM of notebook 18, are smooth.

Cost. Per step an estimate takes one gradient at theta_t (order 0), plus one Hessian-vector product
(order 1), plus one backward through that product (order 2): about 1, 3 and 6 gradient passes
against retraining's 1. On a model this small estimating an order costs more than retraining it;
the paper's saving is for models whose retraining is out of reach.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from .. import progress
from .._batches import batch_list
from .._checks import check_count, is_int
from .._copy import model_copy
from .._model import BatchLoss, differentiable_attention, explain_backward_error
from ..curvature.operators import NonFiniteError, mode_sensitive_modules
from ._base import check_betas, check_number

__all__ = ["RandomProjection", "Trajectory", "train_adam", "estimate_order", "adam_step"]


# --------------------------------------------------------------------------- the sketch that stores checkpoints
class RandomProjection:
    """x -> P x, P a k x n matrix of independent N(0, 1/k) entries drawn from `seed`.

    Johnson & Lindenstrauss: for any fixed x, |P x|^2 / |x|^2 follows chi^2_k / k, mean 1 and
    variance 2/k, so a distance read from sketches has a relative standard deviation of about
    1/sqrt(2k). P is generated in column blocks from the seed and never stored whole beyond
    `cache_entries` numbers, so a sketch of a large model costs k numbers per checkpoint.
    """

    block = 1 << 16  # columns per generated block
    salt = 0x5EED_0F_0DE5  # keeps P independent of tensors the user draws with torch.manual_seed(seed)

    def __init__(self, n: int, k: int, seed: int = 0, cache_entries: int = 1 << 24):
        self.n, self.k, self.seed = check_count("n", n), check_count("sketch_dim", k), int(seed)
        self._matrix = None
        self._cache = n * k <= cache_entries

    def _block(self, i: int, dtype: torch.dtype, device: torch.device) -> Tensor:
        start, stop = i * self.block, min(self.n, (i + 1) * self.block)
        gen = torch.Generator().manual_seed(self.salt + self.seed * 1_000_003 + i)
        cols = torch.randn(self.k, stop - start, generator=gen, dtype=torch.float64) / math.sqrt(self.k)
        return cols.to(dtype=dtype, device=device)

    def __call__(self, x: Tensor) -> Tensor:
        """The sketch of a vector (n,) or of rows (m, n): (k,) or (m, k)."""
        if x.shape[-1] != self.n:
            raise ValueError(f"x: expected {self.n} entries in its last dimension, got shape {tuple(x.shape)}")
        if self._cache:
            if self._matrix is None or self._matrix.dtype != x.dtype or self._matrix.device != x.device:
                blocks = [self._block(i, x.dtype, x.device) for i in range(math.ceil(self.n / self.block))]
                self._matrix = torch.cat(blocks, dim=1)
            return x @ self._matrix.T
        out = 0
        for i in range(math.ceil(self.n / self.block)):
            start = i * self.block
            out = out + x[..., start:start + self.block] @ self._block(i, x.dtype, x.device).T
        return out

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RandomProjection) and (self.n, self.k, self.seed) == (other.n, other.k, other.seed)

    def __repr__(self) -> str:
        return f"RandomProjection(n={self.n}, k={self.k}, seed={self.seed})"


# --------------------------------------------------------------------------- Adam, one step on flat vectors
def adam_step(param: Tensor, grad: Tensor, m: Tensor, v: Tensor, step: int, lr: float,
              betas: tuple[float, float], eps: float, weight_decay: float) -> None:
    """One step of `torch.optim.AdamW` (Loshchilov & Hutter's decoupled weight decay; Adam when
    weight_decay = 0) on flat tensors, in place: theta <- theta (1 - lr wd); m <- b1 m + (1 - b1) g;
    v <- b2 v + (1 - b2) g^2; theta <- theta - lr / (1 - b1^t) * m / (sqrt(v / (1 - b2^t)) + eps)."""
    beta1, beta2 = betas
    if weight_decay:
        param.mul_(1 - lr * weight_decay)
    m.lerp_(grad, 1 - beta1)
    v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    denom = (v.sqrt() / math.sqrt(1 - beta2 ** step)).add_(eps)
    param.addcdiv_(m, denom, value=-lr / (1 - beta1 ** step))


# --------------------------------------------------------------------------- the loss as a function of a flat vector
class _FlatLoss:
    """L(theta; batch) for a flat vector theta of the trained parameters and its Taylor terms."""

    def __init__(self, model: nn.Module, names: list[str], shapes: list[torch.Size], criterion: Any,
                 loss_fn: Any, output_fn: Any):
        self.module = BatchLoss(model, criterion, loss_fn, output_fn)
        self.names, self.shapes = ["model." + n for n in names], shapes
        self.sizes = [s.numel() for s in shapes]

    def loss(self, flat: Tensor, batch: Any) -> Tensor:
        from torch.func import functional_call

        views = [t.view(shape) for t, shape in zip(flat.split(self.sizes), self.shapes)]
        loss = functional_call(self.module, dict(zip(self.names, views)), (batch,))
        if not isinstance(loss, Tensor) or loss.numel() != 1:
            raise ValueError(f"loss: expected a scalar mean loss per batch, got "
                             f"{type(loss).__name__ if not isinstance(loss, Tensor) else tuple(loss.shape)}")
        loss = loss.reshape(())
        if not torch.isfinite(loss):
            raise NonFiniteError(f"loss: the batch loss is {loss.item()} at a reference iterate")
        return loss

    def expansion(self, theta: Tensor, batch: Any, delta: Tensor | None,
                  order: int) -> tuple[Tensor, Tensor, list[float]]:
        """(the order-`order` Taylor estimate of grad L(theta + delta), the gradient at theta itself,
        the loss terms [L, g.delta, delta.H.delta / 2, D^3L[delta]^3 / 6] from the same passes)."""
        flat = theta.detach().clone().requires_grad_(True)
        higher = delta is not None and order >= 1
        try:
            with torch.enable_grad(), differentiable_attention():
                loss = self.loss(flat, batch)
                (grad,) = torch.autograd.grad(loss, flat, create_graph=higher, materialize_grads=True)
                terms = [loss.item()]
                if not higher:
                    return grad.detach(), grad.detach(), terms
                terms.append(float(grad.detach() @ delta))
                hd = (torch.autograd.grad(grad, flat, delta, create_graph=order >= 2, allow_unused=True,
                                          materialize_grads=True)[0] if grad.requires_grad else torch.zeros_like(flat))
                estimate = grad.detach() + hd.detach()
                terms.append(0.5 * float(hd.detach() @ delta))
                if order >= 2:
                    third = (torch.autograd.grad(hd, flat, delta, allow_unused=True, materialize_grads=True)[0]
                             if hd.requires_grad else torch.zeros_like(flat))
                    estimate += 0.5 * third
                    terms.append(float(third @ delta) / 6)
        except RuntimeError as exc:
            raise explain_backward_error(exc, "estimate_order") from exc
        return estimate, grad.detach(), terms


# --------------------------------------------------------------------------- results
@dataclass
class Trajectory:
    """An Adam run over the batches of a reference, trained (`taylor_order` None) or estimated.

    Attributes:
        order: the batch indices in the order they were taken (into `batches`).
        taylor_order: None for a run actually trained; 0, 1 or 2 for an estimate.
        sketches: (T + 1, k) the sketch `projection(theta_t)` of every iterate (t = 0 is the start).
        final: (n,) the last iterate; `parameters()` as a name -> tensor dict, `into(model)` as a model copy.
        initial: (n,) the first iterate (an estimate that replays the reference starts there).
        iterates: (T + 1, n) every iterate, or None when not kept.
        losses: (T,) the loss of step t's batch at the iterate it was taken at. Measured for a
            trained run; for an estimate its Taylor estimate from the same passes, to one order more
            than the gradient's (order 0: the reference's loss; 1: + g.delta + delta.H.delta/2;
            2: + D^3L[delta]^3/6).
        loss_terms: for an estimate, (T, taylor_order + 2) the terms of each step's loss expansion
            [L(theta_t), g.delta, delta.H.delta / 2, D^3L[delta]^3 / 6] (zeros where delta = 0), the
            range check: where the last term is not small against the one before it, the expansion
            is likely outside its range (`term_ratio`). None for a trained run.
        names / frozen: the parameters trained, and the ones left alone (requires_grad False).
        products: model passes by kind ("gradients", "hessian_vector", "third_order",
            "replayed_gradients"); seconds: wall time.
    """

    order: list[int]
    taylor_order: int | None
    sketches: Tensor
    final: Tensor
    initial: Tensor
    iterates: Tensor | None
    losses: Tensor
    names: list[str]
    frozen: list[str]
    shapes: list[torch.Size]
    projection: RandomProjection
    batches: list[Any] = field(repr=False)
    hyper: dict[str, Any] = field(repr=False)
    products: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    loss_spec: tuple[Any, Any, Any] = field(default=(None, None, None), repr=False)
    loss_terms: Tensor | None = None

    @property
    def steps(self) -> int:
        return len(self.order)

    @property
    def term_ratio(self) -> float:
        """For an estimate of Taylor order >= 1, a check of its expansion's range: the last loss term
        over the one before, each summed in absolute value over the steps (`loss_terms`; nan when
        delta stayed 0). It grows as the expansion fails (a per-step ratio would spike wherever the
        term before crosses zero), but it is a warning light, not an error bar, and its scale depends
        on the model. Measured: on notebook 18's char LM (6 seeds) at most 0.66 at lr <= 5e-3, where
        second-order estimates were within 1-6% of the reference-to-retrained distance, and at least
        8.2 at lr 2e-2, where they diverged; on a 3-5-2 tanh MLP 0.006 and 0.06 with errors of 0.00004%
        and 0.08%, but 0.27-0.6 already with errors of 37-98%. Before trusting estimates in a new
        setting, retrain an order or two and compare."""
        if self.loss_terms is None or self.taylor_order in (None, 0):
            raise ValueError("term_ratio: only an estimate of taylor_order 1 or 2 has loss terms to compare")
        sums = self.loss_terms.abs().sum(dim=0)
        return float(sums[-1] / sums[-2]) if sums[-2] > 0 else math.nan

    def parameters(self, step: int | None = None) -> dict[str, Tensor]:
        """The iterate after `step` steps (None: the last) as a name -> tensor dict."""
        if step is None or step == self.steps:
            flat = self.final
        elif step == 0:
            flat = self.initial
        elif self.iterates is None:
            raise ValueError(f"step: only the last iterate is kept (keep_iterates=False); got step={step}")
        else:
            flat = self.iterates[step]
        return {n: t.view(s).clone() for n, t, s in zip(self.names, flat.split([s.numel() for s in self.shapes]),
                                                         self.shapes)}

    def into(self, model: nn.Module, step: int | None = None) -> nn.Module:
        """A copy of `model` holding this run's parameters after `step` steps (None: the last);
        `model` itself is not modified."""
        clone = model_copy(model)
        params = dict(clone.named_parameters())
        with torch.no_grad():
            for name, value in self.parameters(step).items():
                if name not in params:
                    raise ValueError(f"model: has no parameter {name!r}; pass the model this run trained")
                params[name].copy_(value)
        return clone

    def distances(self, other: Trajectory) -> Tensor:
        """(T + 1,) |theta_t - theta'_t| at every step, read from the two runs' sketches (relative
        standard deviation about 1/sqrt(2k)); exact at the last step, where both keep the iterate."""
        if self.projection != other.projection or self.sketches.shape != other.sketches.shape:
            raise ValueError(f"other: its sketches ({other.projection}, {tuple(other.sketches.shape)}) do not match "
                             f"these ({self.projection}, {tuple(self.sketches.shape)}); sketch both runs with the "
                             "same sketch_dim and seed over the same number of steps")
        d = (self.sketches - other.sketches).norm(dim=1)
        d[-1] = (self.final - other.final).norm()
        return d


# --------------------------------------------------------------------------- argument checks
def _trained_params(model: nn.Module) -> tuple[list[str], list[str], list[nn.Parameter]]:
    names, frozen, params = [], [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            names.append(name)
            params.append(p)
        else:
            frozen.append(name)
    if not params:
        raise ValueError("model: no parameter requires grad, so Adam has nothing to train")
    return names, frozen, params


def _check_mode(model: nn.Module) -> None:
    batchnorms, dropouts = mode_sensitive_modules(model)
    live = [n for n in batchnorms + dropouts if dict(model.named_modules()).get(n, model).training]
    if live:
        raise ValueError(f"model: {live} behave differently in train mode (dropout draws noise, BatchNorm updates "
                         "its running statistics), so the reference run could not be replayed or expanded; call "
                         "model.eval() first (the estimate's model passes must be deterministic)")


def _check_order(order: Any, num_batches: int, steps: int | None = None) -> list[int]:
    """`order` as a list of batch indices in [0, num_batches), `steps` of them when given."""
    if isinstance(order, Tensor) or type(order).__module__ == "numpy":  # a tensor or a numpy array of indices
        order = order.tolist()
    if isinstance(order, (str, bytes)) or not isinstance(order, Sequence):
        raise TypeError(f"order: expected a sequence of batch indices, got {type(order).__name__}")
    bad = [i for i in order if not is_int(i) or not 0 <= i < num_batches]
    if bad:
        raise ValueError(f"order: expected batch indices in [0, {num_batches}), got {bad[:5]}")
    if steps is not None and len(order) != steps:
        raise ValueError(f"order: expected {steps} indices (one per reference step: the expansion is around the "
                         f"reference iterate of the same step), got {len(order)}")
    if not order:
        raise ValueError("order: expected at least one batch index, got none")
    return [int(i) for i in order]


# --------------------------------------------------------------------------- the two public entry points
def train_adam(model: nn.Module, data: Any, criterion: Callable[[Any, Any], Tensor] | None = None, *,
               order: Sequence[int] | None = None, loss_fn: Callable[[nn.Module, Any], Any] | None = None,
               output_fn: Callable[[Any], Tensor] | None = None, lr: float = 1e-3,
               betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0,
               keep_iterates: bool = True, sketch_dim: int = 64, seed: int = 0) -> Trajectory:
    """Train a copy of `model` with Adam(W) on the batches of `data`, one step per batch, and record
    the run: the reference for `estimate_order`, and the ground truth an estimate is judged by.

    Args:
        model: any nn.Module in eval mode if it has dropout or BatchNorm (the runs must be
            deterministic). It is not modified: training runs on flat copies of its trained
            parameters (those with requires_grad; frozen ones stay as they are, tied ones count once).
        data: a list of `(inputs, targets)` batches (dict inputs go to `model(**inputs)`).
        criterion / loss_fn / output_fn: the batch loss, as for `hk.HessianOperator`: either
            `criterion(output_fn(model(inputs)), targets)` or `loss_fn(model, batch)`.
        order: the batch indices to take, one per step (default: every batch once, in order).
        lr, betas, eps, weight_decay: `torch.optim.AdamW`'s (PyTorch's Adam defaults; decoupled weight
            decay, none by default). The paper trains its LLMs with Adam.
        keep_iterates: store every iterate (T + 1 rows of n numbers), which `estimate_order` expands
            around. False keeps the first and last only; estimates then replay the run.
        sketch_dim, seed: the random projection that sketches every iterate (64 numbers each by
            default: distances to about 9%; see `RandomProjection`).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    if (criterion is None) == (loss_fn is None):
        raise ValueError("criterion / loss_fn: give exactly one of them (criterion(outputs, targets) or "
                         "loss_fn(model, batch))")
    batches = batch_list(data)
    order = list(range(len(batches))) if order is None else _check_order(order, len(batches))
    hyper = dict(lr=check_number("lr", lr, open_low=True), betas=check_betas("betas", betas),
                 eps=check_number("eps", eps), weight_decay=check_number("weight_decay", weight_decay))
    _check_mode(model)
    names, frozen, params = _trained_params(model)
    shapes = [p.shape for p in params]
    flat_loss = _FlatLoss(model, names, shapes, criterion, loss_fn, output_fn)
    theta = torch.cat([p.detach().reshape(-1) for p in params]).clone()
    initial = theta.clone()
    projection = RandomProjection(theta.numel(), sketch_dim, seed)
    m, v = torch.zeros_like(theta), torch.zeros_like(theta)
    sketches, iterates, losses = [projection(theta)], [theta.clone()] if keep_iterates else None, []
    start = time.perf_counter()
    for t, b in enumerate(order):
        grad, _, terms = flat_loss.expansion(theta, batches[b], None, 0)
        losses.append(terms[0])
        adam_step(theta, grad, m, v, t + 1, **hyper)
        sketches.append(projection(theta))
        if keep_iterates:
            iterates.append(theta.clone())
        progress.report(t + 1, len(order), "train_adam")
    return Trajectory(order, None, torch.stack(sketches), theta, initial,
                      torch.stack(iterates) if keep_iterates else None, torch.tensor(losses, dtype=torch.float64),
                      names, frozen, shapes, projection, batches, hyper, {"gradients": len(order)},
                      time.perf_counter() - start, (criterion, loss_fn, output_fn))


def estimate_order(model: nn.Module, reference: Trajectory, order: Sequence[int], *, taylor_order: int = 2,
                   keep_iterates: bool = False) -> Trajectory:
    """Estimate the Adam run over `reference`'s batches taken in `order`, without training on it:
    each step's gradient is the Taylor expansion, to `taylor_order`, of the batch gradient around
    the reference iterate of the same step, and Adam's moments run on those estimates (module
    docstring; Yang et al., arXiv 2505.22042).

    Args:
        model: the model `reference` was trained from (its architecture; not modified).
        reference: `train_adam`'s record of the reference run.
        order: one batch index per reference step (a permutation of the reference's order is the
            paper's case; repeats and omissions are allowed).
        taylor_order: 0 (each batch's gradient at the reference iterate), 1 (+ a Hessian-vector
            product) or 2 (+ the third-derivative term, the gradient of delta^T H delta). Default 2,
            the paper's second-order estimate. Measured on the char LM of notebook 18 (35 batches,
            reversed and shuffled orders, 3 seeds), final-parameter error relative to the distance
            between the reference and the retrained run: at Adam's default lr 1e-3, 27-35% (order 0),
            0.8-1.4% (order 1), 0.1-0.2% (order 2); at lr 3e-3, 50-61%, 5-7%, 1-2%; at lr 1e-2 the
            expansion leaves its range and order 2 was worse than order 1 in 4 of 6 runs
            (`Trajectory.term_ratio` flags it).
        keep_iterates: store every estimated iterate (default: the sketches and the last one).

    Returns the estimated `Trajectory` (taylor_order set; `products` counts the passes).
    """
    if not isinstance(reference, Trajectory) or reference.taylor_order is not None:
        raise TypeError("reference: expected the Trajectory that train_adam returned (a trained run)")
    if not is_int(taylor_order) or taylor_order not in (0, 1, 2):
        raise ValueError(f"taylor_order: expected 0, 1 or 2, got {taylor_order!r}")
    order = _check_order(order, len(reference.batches), reference.steps)
    names, frozen, params = _trained_params(model)
    if names != reference.names or [p.shape for p in params] != reference.shapes:
        raise ValueError("model: its trained parameters differ from the ones the reference trained "
                         f"({len(names)} vs {len(reference.names)} tensors); pass the model given to train_adam")
    _check_mode(model)
    flat_loss = _FlatLoss(model, names, reference.shapes, *reference.loss_spec)
    hyper, projection = reference.hyper, reference.projection
    batches = reference.batches
    replay = reference.iterates is None  # then step the reference beside the estimate, from its first iterate
    theta = reference.initial.clone()
    ref_m, ref_v = torch.zeros_like(theta), torch.zeros_like(theta)
    gamma = theta.clone()
    m, v = torch.zeros_like(gamma), torch.zeros_like(gamma)
    sketches, iterates, losses, loss_terms = [projection(gamma)], [gamma.clone()] if keep_iterates else None, [], []
    products = {"gradients": 0, "hessian_vector": 0, "third_order": 0, "replayed_gradients": 0}
    start = time.perf_counter()
    for t, b in enumerate(order):
        if not replay:
            theta = reference.iterates[t]
        delta = gamma - theta
        moved = bool(delta.any())
        grad, at_theta, terms = flat_loss.expansion(theta, batches[b], delta if moved else None, taylor_order)
        products["gradients"] += 1
        if moved and taylor_order >= 1:
            products["hessian_vector"] += 1
            products["third_order"] += taylor_order >= 2
        losses.append(sum(terms))
        loss_terms.append(terms + [0.0] * (taylor_order + 2 - len(terms)))
        if replay:  # step the reference beside the estimate
            ref_b = reference.order[t]
            ref_grad = at_theta if ref_b == b else flat_loss.expansion(theta, batches[ref_b], None, 0)[0]
            products["replayed_gradients"] += ref_b != b
            adam_step(theta, ref_grad, ref_m, ref_v, t + 1, **hyper)
        adam_step(gamma, grad, m, v, t + 1, **hyper)
        sketches.append(projection(gamma))
        if keep_iterates:
            iterates.append(gamma.clone())
        progress.report(t + 1, len(order), "estimate_order")
    return Trajectory(order, taylor_order, torch.stack(sketches), gamma, reference.initial,
                      torch.stack(iterates) if keep_iterates else None, torch.tensor(losses, dtype=torch.float64),
                      names, frozen, reference.shapes, projection, batches, hyper, products,
                      time.perf_counter() - start, reference.loss_spec, torch.tensor(loss_terms, dtype=torch.float64))
