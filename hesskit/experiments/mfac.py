"""Notebook 09 (`09_mfac.ipynb`): M-FAC, inverse-Hessian-vector products from a window of m gradients (and
Hessian-free Newton-CG as the matrix-free counterpart).

M-FAC (Frantar, Kurtic & Alistarh, "M-FAC: Efficient Matrix-Free Approximations of Second-Order
Information", NeurIPS 2021) uses the damped empirical Fisher of the last m gradients,

    F = damping * I + (1/m) sum_i g_i g_i^T,

and applies its inverse exactly by the Woodbury identity in O(dm + m^2) (`hk.MFACInverseOperator`).
This module holds what the notebook measures: the accuracy of such inverse-Hessian-vector
products (IHVPs) against the dense inverse of a tiny model's full empirical Fisher, their cost
against d and m, the float32 cancellation of the Woodbury subtraction, and a training loop shared
by M-FAC, SGD with momentum, AdamW and Newton-CG (Martens, "Deep learning via Hessian-free
optimization", ICML 2010) on a digits MLP, with a learning-rate grid.

Studies: the IHVP accuracy of windows of m gradients (`tiny_fisher_problem`, `FisherProblem`,
`fill_window`, `ihvp_errors`, `IHVPErrors`, `ihvp_windows`) and its float32 caveat
(`float32_errors`); the cost of an IHVP and of a dense solve (`ihvp_timing`, `dense_solve_timing`)
and of optimizer steps timed interleaved (`step_costs`, `StepCosts`, by
`training.interleaved_step_times`); the training protocol
(`make_optimizer`, `train`, recorded as a `training.TrainingRun`, on `tasks.digits_mlp`) and learning-rate
grids (`tune`: `training.tune` with this setup bound, giving a `training.Tuning`). The notebook's
explorer is `hesskit.widgets.mfac.MFACExplorer`.

References: Frantar, Kurtic & Alistarh, NeurIPS 2021 (M-FAC); Singh & Alistarh, "WoodFisher:
Efficient second-order approximation for neural network compression", NeurIPS 2020; Hassibi &
Stork, "Second order derivatives for network pruning: Optimal brain surgeon", NeurIPS 1993;
Martens, ICML 2010; Kunstner, Hennig & Balles, "Limitations of the empirical Fisher
approximation for natural gradient descent", NeurIPS 2019.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from .. import progress
from ..curvature.mfac import MFACInverseOperator
from ..data import digits
from ..optim import MFAC, NewtonCG, make_closure
from .tasks import digits_mlp, evaluate, fit_classifier
from . import training
from .training import (TrainingRun, Tuning, interleaved_step_times, iter_random_batches, run_plan, run_to_end,
                       training_steps)

__all__ = [
    "FisherProblem",
    "IHVPErrors",
    "LABELS",
    "OPTIMIZERS",
    "StepCosts",
    "dense_solve_timing",
    "fill_window",
    "float32_errors",
    "ihvp_errors",
    "ihvp_timing",
    "ihvp_windows",
    "make_optimizer",
    "step_costs",
    "tiny_fisher_problem",
    "train",
    "tune",
]

OPTIMIZERS = ("mfac", "sgd", "adamw", "newton-cg")
LABELS = {"mfac": "M-FAC", "sgd": "SGD-momentum", "adamw": "AdamW", "newton-cg": "Newton-CG (GGN)"}


# --------------------------------------------------------------------------- IHVP accuracy
@dataclass
class FisherProblem:
    """The per-sample gradients of a tiny model (float64) and the vector the IHVPs are applied to.

    `grads[i]` is the gradient of sample i's cross-entropy; `x` is their mean (the full-batch
    gradient, the vector an optimizer preconditions). The reference is the *full* damped
    empirical Fisher F_N = damping * I + (1/N) G^T G over all N samples, solved densely.
    """

    grads: Tensor  # (N, d) float64
    x: Tensor  # (d,) float64
    _dense: dict[float, Tensor] = field(default_factory=dict, repr=False)

    @property
    def num_samples(self) -> int:
        return self.grads.shape[0]

    @property
    def dim(self) -> int:
        return self.grads.shape[1]

    def fisher(self, damping: float) -> Tensor:
        """The dense d x d damped empirical Fisher of all N gradients (float64)."""
        G = self.grads
        return damping * torch.eye(self.dim, dtype=G.dtype) + G.T @ G / self.num_samples

    def exact(self, damping: float) -> Tensor:
        """F_N^{-1} x by `torch.linalg.solve` of the dense matrix (cached per damping)."""
        key = float(damping)
        if key not in self._dense:
            self._dense[key] = torch.linalg.solve(self.fisher(damping), self.x)
        return self._dense[key]


def tiny_fisher_problem(hidden: tuple[int, ...] = (8,), num_samples: int = 512, train_steps: int = 100,
                        seed: int = 0) -> FisherProblem:
    """Per-sample gradients of a `tasks.digits_mlp(hidden)` in float64 (610 parameters for (8,)),
    after `train_steps` full-batch AdamW steps (lr 0.01, `tasks.fit_classifier`) on the first
    `num_samples` training digits, so that the gradients are those of a model in mid-training
    rather than at initialisation.
    The gradients come from `hk.MFACInverseOperator.from_model` (one vmapped pass)."""
    if num_samples < 2:
        raise ValueError(f"num_samples: expected at least 2, got {num_samples}")
    (x, y), _ = digits(flatten=True, seed=seed)
    x, y = x[:num_samples].double(), y[:num_samples]
    model = fit_classifier(digits_mlp(hidden, seed=seed, dtype=torch.float64), (x, y), train_steps, lr=1e-2,
                           optimizer="adamw")
    inv = MFACInverseOperator.from_model(model, nn.CrossEntropyLoss(), (x, y), damping=1.0)
    G = inv.grads.clone()
    return FisherProblem(G, G.mean(dim=0))


def fill_window(grads: Tensor, num_grads: int, damping: float,
                dtype: torch.dtype = torch.float64) -> MFACInverseOperator:
    """An `hk.MFACInverseOperator` with a window of `num_grads` rows, fed the rows of `grads` one by one
    through `update` (the ring buffer keeps the last `num_grads` of them)."""
    inv = MFACInverseOperator(grads.shape[1], num_grads=num_grads, damping=damping, dtype=dtype)
    for g in grads:
        inv.update(g.to(dtype))
    return inv


@dataclass
class IHVPErrors:
    """Relative errors |F_m^{-1} x - F_N^{-1} x| / |F_N^{-1} x| of windows of the first m gradients.

    `window` (float64) is the approximation error of using m of the N gradients; `float32` is the
    same product computed in float32 (approximation and rounding); `rounding` is float32 against
    float64 with the same window (rounding alone)."""

    windows: np.ndarray
    damping: float
    window: np.ndarray
    float32: np.ndarray
    rounding: np.ndarray
    num_samples: int
    dim: int


def _rel(a: Tensor, b: Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def ihvp_errors(problem: FisherProblem, windows: Sequence[int], damping: float) -> IHVPErrors:
    """IHVP errors of windows of the first m per-sample gradients (m in `windows`) against the
    dense inverse of the full empirical Fisher F_N (M-FAC, Frantar et al. 2021, Section 3)."""
    windows = np.asarray(sorted({int(m) for m in windows}))
    if len(windows) == 0 or windows.min() < 1 or windows.max() > problem.num_samples:
        raise ValueError(f"windows: expected sizes in 1..{problem.num_samples}, got {list(windows)}")
    exact = problem.exact(damping)
    window, single, rounding = [], [], []
    for k, m in enumerate(windows, start=1):
        G = problem.grads[:m]
        u64 = fill_window(G, int(m), damping, torch.float64) @ problem.x
        u32 = fill_window(G, int(m), damping, torch.float32) @ problem.x.float()
        window.append(_rel(u64, exact))
        single.append(_rel(u32, exact))
        rounding.append(_rel(u32, u64))
        progress.report(k, len(windows), "IHVP error: window")
    return IHVPErrors(windows, float(damping), np.array(window), np.array(single), np.array(rounding),
                      problem.num_samples, problem.dim)


def float32_errors(problem: FisherProblem, num_grads: int, dampings: Sequence[float]) -> dict[str, np.ndarray]:
    """The float32 caveat. For a window of the first `num_grads` gradients and each damping:

    * "woodbury": `inv @ g` in float32 against float64, for g the last gradient of the window
      (the Woodbury subtraction (g - G^T K^{-1} G g) / damping cancels when damping is small);
    * "update_and_apply": the same F^{-1} g from `update_and_apply(g)`, which forms it as
      m G^T K^{-1} e_s and subtracts nothing;
    * "predicted": eps32 * |g| / (damping * |F^{-1} g|), the rounding error of the difference
      g - G^T K^{-1} G g (of size eps32 |g|) relative to what is left of it (damping |F^{-1} g|)."""
    dampings = np.asarray(dampings, dtype=float)
    G = problem.grads[:num_grads]
    eps = torch.finfo(torch.float32).eps
    out = {"dampings": dampings, "woodbury": [], "update_and_apply": [], "predicted": []}
    for damping in dampings:
        reference = fill_window(G, num_grads, float(damping), torch.float64) @ G[-1]
        inv = fill_window(G, num_grads, float(damping), torch.float32)
        out["woodbury"].append(_rel(inv @ G[-1].float(), reference))
        inv = fill_window(G[:-1], num_grads, float(damping), torch.float32)
        out["update_and_apply"].append(_rel(inv.update_and_apply(G[-1].float()), reference))
        out["predicted"].append(eps * float(G[-1].norm()) / (damping * float(reference.norm())))
    return {k: np.asarray(v) for k, v in out.items()}


def ihvp_windows(num_samples: int, num_grads: int) -> list[int]:
    """The window sizes of the explorer's IHVP error sweep: the powers of two up to `num_samples`
    (N), N itself and the chosen window `num_grads`."""
    n = num_samples
    powers = [2**k for k in range(int(math.log2(n)) + 1)]
    return sorted({*powers, n, int(num_grads)})


# --------------------------------------------------------------------------- IHVP cost
def _best_seconds(fn, repeats: int) -> float:
    """The fastest of `repeats` timed calls after a warm-up: the least disturbed by other load."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(min(times))


def ihvp_timing(dims: Sequence[int], windows: Sequence[int], repeats: int = 5, damping: float = 1e-4,
                seed: int = 0) -> np.ndarray:
    """Seconds of one IHVP `inv @ x` (best of `repeats`; float32, the m x m factorisation done) for
    random gradients, `seconds[i, j]` for window windows[i] and dimension dims[j]: two passes over
    the m x d window, O(dm), plus an m x m triangular solve, O(m^2)."""
    gen = torch.Generator().manual_seed(seed)
    seconds = np.zeros((len(windows), len(dims)))
    for i, m in enumerate(windows):
        for j, d in enumerate(dims):
            inv = MFACInverseOperator(int(d), num_grads=int(m), damping=damping)
            inv.grads.copy_(torch.randn(int(m), int(d), generator=gen))
            inv.gram.copy_(inv.grads @ inv.grads.T)
            inv.count = int(m)
            x = torch.randn(int(d), generator=gen)
            inv @ x  # factorise K once
            seconds[i, j] = _best_seconds(lambda: inv @ x, repeats)
    return seconds


def dense_solve_timing(dims: Sequence[int], repeats: int = 3, seed: int = 0) -> np.ndarray:
    """Seconds (best of `repeats`) to form the d x d damped Fisher of 32 random gradients and solve it by
    Cholesky (float32): the O(d^2) memory and O(d^3) time that M-FAC avoids."""
    gen = torch.Generator().manual_seed(seed)
    seconds = []
    for d in dims:
        G = torch.randn(32, int(d), generator=gen)
        x = torch.randn(int(d), 1, generator=gen)

        def solve():
            F = G.T @ G / 32
            F.diagonal().add_(1e-4)
            return torch.cholesky_solve(x, torch.linalg.cholesky(F))

        seconds.append(_best_seconds(solve, repeats))
    return np.array(seconds)


@dataclass
class StepCosts:
    """`seconds[r, j]`: the time of optimizer `labels[j]`'s step in round r (AdamW is labels[0])."""

    labels: list[str]
    seconds: np.ndarray

    def median(self, label: str) -> float:
        return float(np.median(self.seconds[:, self.labels.index(label)]))

    def ratio(self, label: str, reference: str = "AdamW") -> float:
        """Median over rounds of the step time of `label` divided by that of `reference`."""
        i, j = self.labels.index(label), self.labels.index(reference)
        return float(np.median(self.seconds[:, i] / self.seconds[:, j]))


def step_costs(data: tuple[Tensor, Tensor], rounds: int = 100, batch_size: int = 64,
               num_grads: Sequence[int] = (8, 32, 128), damping: float = 1e-3, max_cg_iters: int = 10,
               hidden: tuple[int, ...] = (32,), seed: int = 0, newton: bool = True) -> StepCosts:
    """Step times measured interleaved: in each of `rounds` rounds every optimizer takes one step
    on the same random batch (each on its own copy of the model), so machine load hits all of them
    alike. Optimizers: AdamW, SGD-momentum, M-FAC for each window size in `num_grads`, and
    Newton-CG (GGN, `max_cg_iters`) if `newton`."""
    x, y = data
    specs = [("AdamW", "adamw", {}), ("SGD-momentum", "sgd", {})]
    specs += [(f"M-FAC, m = {m}", "mfac", dict(num_grads=int(m))) for m in num_grads]
    if newton:
        specs.append(("Newton-CG (GGN)", "newton-cg", {}))
    criterion = nn.CrossEntropyLoss()
    steps = []
    for label, name, kw in specs:
        model = digits_mlp(hidden, seed=seed, dtype=x.dtype)
        opt = make_optimizer(name, model.parameters(), 1e-3, damping=damping, max_cg_iters=max_cg_iters, **kw)
        kind = {"mfac": "loss", "newton-cg": "loss_outputs"}.get(name, "backward")

        def step(batch, model=model, opt=opt, kind=kind):
            def compute():
                logits = model(batch[0])
                return criterion(logits, batch[1]), logits

            opt.step(make_closure(kind, opt, compute))

        steps.append((label, step))
    batches = ((x[idx], y[idx]) for idx in iter_random_batches(len(x), rounds, batch_size, seed))  # drawn per round
    return StepCosts(*interleaved_step_times(steps, batches))


# --------------------------------------------------------------------------- training
def make_optimizer(name: str, params, lr: float, num_grads: int = 32, damping: float = 1e-3,
                   max_cg_iters: int = 10) -> torch.optim.Optimizer:
    """"mfac": `hk.optim.MFAC(lr, num_grads, damping)` (momentum and weight decay 0, as the
    official defaults); "sgd": `torch.optim.SGD(lr, momentum=0.9)`; "adamw": `torch.optim.AdamW(lr)`
    (torch defaults: betas (0.9, 0.999), weight decay 0.01); "newton-cg":
    `hk.optim.NewtonCG(lr, curvature="ggn", max_cg_iters)` (initial damping 1, adapted by
    Levenberg-Marquardt). `num_grads` and `damping` are M-FAC's only."""
    if name == "mfac":
        return MFAC(params, lr=lr, num_grads=num_grads, damping=damping)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr)
    if name == "newton-cg":
        return NewtonCG(params, lr=lr, curvature="ggn", max_cg_iters=max_cg_iters)
    raise ValueError(f"optimizer: expected one of {OPTIMIZERS}, got {name!r}")


def _flat(params: list[Tensor]) -> Tensor:
    return torch.cat([p.detach().reshape(-1) for p in params])


def _record_step(per_step: dict[str, np.ndarray], t: int, grad: Tensor, delta: Tensor, opt) -> None:
    """Step t's entries of the run's `per_step` records: the norms of the batch gradient and of the
    parameter change, their cosine, and Newton-CG's CG iterations and LM damping."""
    per_step["grad_norm"][t - 1] = grad.norm().item()
    per_step["step_norm"][t - 1] = delta.norm().item()
    per_step["step_cosine"][t - 1] = -(grad @ delta).item() / max(grad.norm().item() * delta.norm().item(), 1e-300)
    if isinstance(opt, NewtonCG):
        per_step["cg_iterations"][t - 1] = opt.last_step_info["cg_iterations"]
        per_step["lm_damping"][t - 1] = opt.last_step_info["damping"]


def train(optimizer: str, lr: float, data: tuple[Tensor, Tensor], test: tuple[Tensor, Tensor], steps: int = 300,
          batch_size: int = 64, eval_every: int = 10, seed: int = 0, hidden: tuple[int, ...] = (32,),
          num_grads: int = 32, damping: float = 1e-3, max_cg_iters: int = 10,
          divergence: float = 2 * math.log(10)) -> TrainingRun:
    """Train `tasks.digits_mlp(hidden, seed=seed)` for `steps` mini-batch steps of cross-entropy.

    Every optimizer sees the same initialisation and the same batches: the training set in the
    order of `torch.randperm(N, generator=Generator().manual_seed(seed))`, reshuffled each epoch
    from that generator (the last incomplete batch of an epoch is dropped; batch_size = N gives
    full-batch gradient steps). M-FAC and Newton-CG use hesskit's closure contract (the optimizer
    differentiates; Newton-CG's closure returns (loss, logits) for the GGN), SGD and AdamW
    `loss.backward()`. The steps run through `hesskit.experiments.training.training_steps`: a run
    stops as diverged when a loss or parameter is not finite or the full training loss at a
    checkpoint reaches `divergence` (2 log 10 = 4.6, twice a uniform guess's loss).

    The `TrainingRun` holds the full training loss ("train_loss") and test accuracy
    ("test_accuracy", a fraction) every `eval_every` steps and at 0; its `log` the wall time of
    every step (forward, backward, curvature and update; evaluation excluded); its `per_step` the
    norm of the mini-batch gradient g_t ("grad_norm") and of the parameter change ("step_norm"),
    the cosine between the change and -g_t ("step_cosine": how much of the step goes downhill on
    the batch; 1 for a gradient step, < 0 uphill), and for Newton-CG the CG iterations
    ("cg_iterations") and the Levenberg-Marquardt damping used ("lm_damping"; nan for the other
    optimizers); its `settings` the protocol's (batch_size, seed, steps, eval_every) and M-FAC's
    num_grads and damping or Newton-CG's max_cg_iters and initial_damping. A run that diverged
    has nan after it stopped.
    """
    x, y = data
    batches, checkpoints = run_plan(len(x), steps, batch_size, eval_every, seed)
    model = digits_mlp(hidden, seed=seed, dtype=x.dtype)
    params = list(model.parameters())
    opt = make_optimizer(optimizer, params, lr, num_grads, damping, max_cg_iters)
    settings: dict[str, Any] = {"batch_size": batch_size, "seed": seed, "steps": steps, "eval_every": eval_every}
    if optimizer == "mfac":
        settings.update(num_grads=num_grads, damping=damping)
    elif optimizer == "newton-cg":
        settings.update(max_cg_iters=max_cg_iters, initial_damping=opt.damping)
    criterion = nn.CrossEntropyLoss()
    kind = {"mfac": "loss", "newton-cg": "loss_outputs"}.get(optimizer, "backward")
    losses = np.full(len(checkpoints), np.nan)
    accuracies = np.full(len(checkpoints), np.nan)
    per_step = {key: np.full(steps, np.nan) for key in ("grad_norm", "step_norm", "step_cosine", "cg_iterations",
                                                        "lm_damping")}
    before = _flat(params)  # the parameters before the next step (evaluation leaves them as they are)

    def step(t: int) -> Tensor:
        xb, yb = x[batches[t - 1]], y[batches[t - 1]]

        def compute():
            logits = model(xb)
            return criterion(logits, yb), logits

        return opt.step(make_closure(kind, opt, compute))

    def after_step(t: int, loss: float) -> None:
        nonlocal before
        after = _flat(params)
        _record_step(per_step, t, _flat([p.grad for p in params]), after - before, opt)
        before = after

    def checkpoint(t: int) -> str | None:
        c = checkpoints.index(t)
        losses[c], accuracies[c] = evaluate(model, data).loss, evaluate(model, test).accuracy
        return None if losses[c] < divergence else f"training loss {losses[c]} at step {t}"

    checkpoint(0)
    log = run_to_end(training_steps(step, steps, checkpoints=checkpoints, at_checkpoint=checkpoint,
                                    after_step=after_step, params=params,
                                    label=f"{LABELS.get(optimizer, optimizer)} step"))
    return TrainingRun(optimizer, float(lr), log, np.array(checkpoints),
                       {"train_loss": losses, "test_accuracy": accuracies}, settings=settings, per_step=per_step,
                       name=LABELS[optimizer])


def tune(grid: Sequence[float], data: tuple[Tensor, Tensor], test: tuple[Tensor, Tensor], steps: int = 300,
         batch_size: int = 64, eval_every: int = 10, seed: int = 0, hidden: tuple[int, ...] = (32,),
         optimizers: Sequence[str] = ("mfac", "sgd", "adamw"), num_grads: int = 32, damping: float = 1e-3,
         max_cg_iters: int = 10, grids: dict[str, Sequence[float]] | None = None) -> Tuning:
    """Train each optimizer at every learning rate of the same `grid` (same init, batches, seed);
    `grids` overrides the grid for some optimizers (e.g. a shorter one for the costly Newton-CG).
    This is `hesskit.experiments.training.tune` of `train` with this setup bound: `tuning.setup`
    holds it, `tuning.train(name, lr, **overrides)` trains one more run like them (overrides:
    num_grads, damping, max_cg_iters, batch_size, steps) and `tuning.best` picks the lowest final
    training loss."""
    train_fn = partial(train, data=data, test=test, steps=steps, batch_size=batch_size, eval_every=eval_every,
                       seed=seed, hidden=tuple(hidden), num_grads=num_grads, damping=float(damping),
                       max_cg_iters=max_cg_iters)
    grids = dict(grids or {})
    return training.tune(train_fn, {name: grids.get(name, grid) for name in optimizers})
