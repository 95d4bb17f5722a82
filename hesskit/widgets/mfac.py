"""Notebook 09: M-FAC, inverse-Hessian-vector products from a window of m gradients (and
Hessian-free Newton-CG as the matrix-free counterpart).

M-FAC (Frantar, Kurtic & Alistarh, "M-FAC: Efficient Matrix-Free Approximations of Second-Order
Information", NeurIPS 2021) uses the damped empirical Fisher of the last m gradients,

    F = damping * I + (1/m) sum_i g_i g_i^T,

and applies its inverse exactly by the Woodbury identity in O(dm + m^2) (`hk.MFACInverseOperator`).
This module holds what the notebook measures: the accuracy of such inverse-Hessian-vector
products (IHVPs) against the dense inverse of a tiny model's full empirical Fisher, their cost
against d and m, the float32 cancellation of the Woodbury subtraction, and a training loop shared
by M-FAC, SGD with momentum, AdamW and Newton-CG (Martens, "Deep learning via Hessian-free
optimization", ICML 2010) on a digits MLP, with a learning-rate grid; then the widget.

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
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ..data import digits
from ..curvature.mfac import MFACInverseOperator
from ..models import MLP
from ..optim import MFAC, NewtonCG
from .explorer import Explorer
from ..experiments.training import TrainingRecord, best_run, loss_and_accuracy, run_plan
from ..optim.closures import make_closure
from .. import progress

__all__ = [
    "MFACExplorer",
    "SHOW",
    "FisherProblem",
    "IHVPErrors",
    "Run",
    "Tuning",
    "OPTIMIZERS",
    "digits_mlp",
    "fill_window",
    "ihvp_errors",
    "ihvp_timing",
    "dense_solve_timing",
    "step_costs",
    "StepCosts",
    "float32_errors",
    "make_optimizer",
    "tiny_fisher_problem",
    "train",
    "tune",
]

OPTIMIZERS = ("mfac", "sgd", "adamw", "newton-cg")
LABELS = {"mfac": "M-FAC", "sgd": "SGD-momentum", "adamw": "AdamW", "newton-cg": "Newton-CG (GGN)"}
COLORS = {"mfac": "tab:red", "sgd": "tab:green", "adamw": "tab:blue", "newton-cg": "tab:purple"}


# --------------------------------------------------------------------------- the models
def digits_mlp(hidden: tuple[int, ...] = (32,), seed: int = 0, dtype: torch.dtype = torch.float32) -> nn.Module:
    """`hk.models.MLP(64, hidden, 10, "tanh")` for the flattened 8 x 8 digits, initialised after
    `torch.manual_seed(seed)`: hidden (32,) gives 2,410 parameters, (8,) gives 610."""
    torch.manual_seed(seed)
    return MLP(64, tuple(hidden), 10, activation="tanh").to(dtype)


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
    """Per-sample gradients of a `digits_mlp(hidden)` in float64 (610 parameters for (8,)), after
    `train_steps` full-batch AdamW steps (lr 0.01) on the first `num_samples` training digits, so
    that the gradients are those of a model in mid-training rather than at initialisation.
    The gradients come from `hk.MFACInverseOperator.from_model` (one vmapped pass)."""
    if num_samples < 2:
        raise ValueError(f"num_samples: expected at least 2, got {num_samples}")
    (x, y), _ = digits(flatten=True, seed=seed)
    x, y = x[:num_samples].double(), y[:num_samples]
    model = digits_mlp(hidden, seed, torch.float64)
    criterion = nn.CrossEntropyLoss()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(train_steps):
        opt.zero_grad()
        criterion(model(x), y).backward()
        opt.step()
    model.zero_grad(set_to_none=True)
    inv = MFACInverseOperator.from_model(model, criterion, (x, y), damping=1.0)
    G = inv.grads.clone()
    return FisherProblem(G, G.mean(dim=0))


def fill_window(grads: Tensor, num_grads: int, damping: float, dtype: torch.dtype = torch.float64) -> MFACInverseOperator:
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
    models = [digits_mlp(hidden, seed, x.dtype) for _ in specs]
    opts = [make_optimizer(name, m.parameters(), 1e-3, damping=damping, max_cg_iters=max_cg_iters, **kw)
            for (_, name, kw), m in zip(specs, models)]
    gen = torch.Generator().manual_seed(seed)
    times = np.zeros((rounds, len(specs)))
    for r in range(rounds):
        idx = torch.randint(0, len(x), (batch_size,), generator=gen)
        xb, yb = x[idx], y[idx]
        for j, ((_, name, _), model, opt) in enumerate(zip(specs, models, opts)):
            start = time.perf_counter()
            if name == "mfac":
                def loss_closure(model=model, opt=opt):
                    opt.zero_grad()
                    return criterion(model(xb), yb)

                opt.step(loss_closure)
            elif name == "newton-cg":
                def closure(model=model, opt=opt):
                    opt.zero_grad()
                    logits = model(xb)
                    return criterion(logits, yb), logits

                opt.step(closure)
            else:
                opt.zero_grad()
                criterion(model(xb), yb).backward()
                opt.step()
            times[r, j] = time.perf_counter() - start
    return StepCosts([label for label, _, _ in specs], times)


# --------------------------------------------------------------------------- training
@dataclass
class Run(TrainingRecord):
    """One training run: full training loss and test accuracy every `eval_every` steps (and at 0);
    per step the wall time (forward, backward, curvature and update; evaluation excluded), the
    norm of the mini-batch gradient g_t and of the parameter change, the cosine between the change
    and -g_t (how much of the step goes downhill on the batch), and for Newton-CG the CG
    iterations and the Levenberg-Marquardt damping used (nan for the other optimizers).
    A run that diverged has nan after it stopped."""

    optimizer: str
    lr: float
    settings: dict[str, Any]
    steps: np.ndarray  # (C,) checkpoint step numbers, 0 first
    train_loss: np.ndarray  # (C,)
    test_accuracy: np.ndarray  # (C,)
    step_times: np.ndarray  # (T,) seconds per optimizer step
    grad_norm: np.ndarray  # (T,)
    step_norm: np.ndarray  # (T,)
    step_cosine: np.ndarray  # (T,) cos(theta_{t+1} - theta_t, -g_t): 1 for a gradient step, < 0 uphill
    cg_iterations: np.ndarray  # (T,)
    lm_damping: np.ndarray  # (T,)
    diverged: bool
    batch_size: int = 64

    labels = LABELS


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


def train(optimizer: str, lr: float, data: tuple[Tensor, Tensor], test: tuple[Tensor, Tensor], steps: int = 300,
          batch_size: int = 64, eval_every: int = 10, seed: int = 0, hidden: tuple[int, ...] = (32,),
          num_grads: int = 32, damping: float = 1e-3, max_cg_iters: int = 10,
          divergence: float = 2 * math.log(10)) -> Run:
    """Train `digits_mlp(hidden, seed)` for `steps` mini-batch steps of cross-entropy.

    Every optimizer sees the same initialisation and the same batches: the training set in the
    order of `torch.randperm(N, generator=Generator().manual_seed(seed))`, reshuffled each epoch
    from that generator (the last incomplete batch of an epoch is dropped; batch_size = N gives
    full-batch gradient steps). M-FAC and Newton-CG use hesskit's closure contract (the optimizer
    differentiates; Newton-CG's closure returns (loss, logits) for the GGN), SGD and AdamW
    `loss.backward()`. A run stops as diverged when a loss is not finite or the full training loss
    at a checkpoint reaches `divergence` (2 log 10 = 4.6, twice a uniform guess's loss).
    """
    x, y = data
    batches, checkpoints = run_plan(len(x), steps, batch_size, eval_every, seed)
    model = digits_mlp(hidden, seed, x.dtype)
    params = list(model.parameters())
    opt = make_optimizer(optimizer, params, lr, num_grads, damping, max_cg_iters)
    settings: dict[str, Any] = {}
    if optimizer == "mfac":
        settings = dict(num_grads=num_grads, damping=damping)
    elif optimizer == "newton-cg":
        settings = dict(max_cg_iters=max_cg_iters, initial_damping=opt.damping)
    criterion = nn.CrossEntropyLoss()
    losses = np.full(len(checkpoints), np.nan)
    accuracies = np.full(len(checkpoints), np.nan)
    per_step = {key: np.full(steps, np.nan) for key in ("grad_norm", "step_norm", "step_cosine", "cg_iterations",
                                                        "lm_damping")}
    step_times: list[float] = []
    diverged = False

    def evaluate(c: int) -> None:
        losses[c], accuracies[c] = loss_and_accuracy(model, criterion, data, test)

    evaluate(0)
    c = 1
    for t in range(1, steps + 1):
        xb, yb = x[batches[t - 1]], y[batches[t - 1]]
        before = _flat(params)

        def compute():
            logits = model(xb)
            return criterion(logits, yb), logits

        closure = make_closure({"mfac": "loss", "newton-cg": "loss_outputs"}.get(optimizer, "backward"), opt, compute)
        start = time.perf_counter()
        try:
            loss = opt.step(closure)
        except FloatingPointError:
            diverged = True
        step_times.append(time.perf_counter() - start)
        if not diverged:
            with torch.no_grad():
                after = _flat(params)
                diverged = not (torch.isfinite(loss) and torch.isfinite(after).all())
        if diverged:
            break
        grad, delta = _flat([p.grad for p in params]), after - before
        per_step["grad_norm"][t - 1] = grad.norm().item()
        per_step["step_norm"][t - 1] = delta.norm().item()
        per_step["step_cosine"][t - 1] = -(grad @ delta).item() / max(grad.norm().item() * delta.norm().item(), 1e-300)
        if optimizer == "newton-cg":
            per_step["cg_iterations"][t - 1] = opt.last_step_info["cg_iterations"]
            per_step["lm_damping"][t - 1] = opt.last_step_info["damping"]
        if c < len(checkpoints) and checkpoints[c] == t:
            evaluate(c)
            c += 1
            if not losses[c - 1] < divergence:
                diverged = True
                break
        progress.report(t, steps, f"{LABELS.get(optimizer, optimizer)} step")  # shown while an explorer renders
    return Run(optimizer, float(lr), settings, np.array(checkpoints), losses, accuracies, np.array(step_times),
               diverged=diverged, batch_size=batch_size, **per_step)


@dataclass
class Tuning:
    """Optimizers trained once per learning rate of a grid, with the data, budget and seed every
    run used. The best lr of an optimizer has the lowest final training loss."""

    grids: dict[str, np.ndarray]
    runs: dict[str, list[Run]]
    data: tuple[Tensor, Tensor]
    test: tuple[Tensor, Tensor]
    steps: int
    batch_size: int
    eval_every: int
    seed: int
    hidden: tuple[int, ...]
    num_grads: int
    damping: float
    max_cg_iters: int

    def final_losses(self, optimizer: str) -> np.ndarray:
        return np.array([r.final_loss for r in self.runs[optimizer]])

    def best(self, optimizer: str) -> Run:
        """The run with the lowest final training loss (a diverged run counts as inf)."""
        return best_run(self.runs[optimizer])

    def train(self, optimizer: str, lr: float, **overrides: Any) -> Run:
        """One more run on the same data, budget, initialisation and batch order (`overrides`:
        num_grads, damping, max_cg_iters, batch_size, steps)."""
        kwargs = dict(steps=self.steps, batch_size=self.batch_size, eval_every=self.eval_every, seed=self.seed,
                      hidden=self.hidden, num_grads=self.num_grads, damping=self.damping,
                      max_cg_iters=self.max_cg_iters)
        kwargs.update(overrides)
        return train(optimizer, lr, self.data, self.test, **kwargs)


def tune(grid: Sequence[float], data: tuple[Tensor, Tensor], test: tuple[Tensor, Tensor], steps: int = 300,
         batch_size: int = 64, eval_every: int = 10, seed: int = 0, hidden: tuple[int, ...] = (32,),
         optimizers: Sequence[str] = ("mfac", "sgd", "adamw"), num_grads: int = 32, damping: float = 1e-3,
         max_cg_iters: int = 10, grids: dict[str, Sequence[float]] | None = None) -> Tuning:
    """Train each optimizer at every learning rate of the same `grid` (same init, batches, seed);
    `grids` overrides the grid for some optimizers (e.g. a shorter one for the costly Newton-CG)."""
    grids = dict(grids or {})
    result_grids, runs = {}, {}
    for name in optimizers:
        g = np.asarray(sorted(float(v) for v in grids.get(name, grid)))
        if len(g) == 0 or (g <= 0).any():
            raise ValueError(f"grid: expected positive learning rates for {name}, got {list(g)}")
        result_grids[name] = g
        runs[name] = [train(name, lr, data, test, steps, batch_size, eval_every, seed, tuple(hidden), num_grads,
                            damping, max_cg_iters) for lr in g]
    return Tuning(result_grids, runs, data, test, steps, batch_size, eval_every, seed, tuple(hidden), num_grads,
                  float(damping), max_cg_iters)


# --------------------------------------------------------------------------- widget
SHOW = {"SGD-momentum": "sgd", "AdamW": "adamw", "Newton-CG (GGN)": "newton-cg"}


class MFACExplorer(Explorer):
    """M-FAC's window size m, damping and lr against the tuned baselines of a `Tuning`: training
    loss against steps and against optimizer seconds, test accuracy, and the IHVP error of windows
    of m gradients at the chosen damping against the dense inverse of a tiny model's full
    empirical Fisher (a `FisherProblem`)."""


    def __init__(self, tuning: Tuning, problem: FisherProblem, num_grads: int | None = None,
                 damping: float | None = None, lr: float | None = None, max_grads: int = 128,
                 damping_range: tuple[float, float] = (-6, 0), lr_range: tuple[float, float] = (-4, 0),
                 show: Sequence[str] = ("SGD-momentum", "AdamW")):
        import ipywidgets as widgets

        self.tuning, self.problem = tuning, problem
        self._runs: dict[tuple, Run] = {}
        self._errors: dict[float, IHVPErrors] = {}
        if "mfac" in tuning.runs:
            best = tuning.best("mfac")
            self._runs[self._key(tuning.num_grads, tuning.damping, best.lr)] = best
            default_lr = best.lr
        else:
            default_lr = 1e-2
        num_grads = tuning.num_grads if num_grads is None else int(num_grads)
        damping = tuning.damping if damping is None else float(damping)
        lr = default_lr if lr is None else float(lr)
        if not 1 <= num_grads <= min(max_grads, problem.num_samples):
            raise ValueError(f"num_grads: expected 1..{min(max_grads, problem.num_samples)}, got {num_grads}")
        style = {"description_width": "initial"}
        options = [name for name in SHOW if SHOW[name] in tuning.runs]
        super().__init__({
            "num_grads": widgets.IntSlider(value=num_grads, min=1, max=min(max_grads, problem.num_samples),
                                           description="window m", continuous_update=False, style=style),
            "damping": widgets.FloatLogSlider(value=damping, base=10, min=damping_range[0], max=damping_range[1],
                                              step=0.5, description="damping λ", readout_format=".0e",
                                              continuous_update=False, style=style),
            "lr": widgets.FloatLogSlider(value=lr, base=10, min=lr_range[0], max=lr_range[1], step=0.25,
                                         description="M-FAC lr", readout_format=".2g", continuous_update=False,
                                         style=style),
            "show": widgets.SelectMultiple(options=options, value=tuple(s for s in show if s in options),
                                           rows=len(options), description="compare with (tuned)", style=style),
        })

    @staticmethod
    def _key(num_grads: int, damping: float, lr: float) -> tuple:
        return (int(num_grads), float(f"{damping:.6g}"), float(f"{lr:.6g}"))

    def _windows(self, num_grads: int) -> list[int]:
        n = self.problem.num_samples
        powers = [2**k for k in range(int(math.log2(n)) + 1)]
        return sorted({*powers, n, int(num_grads)})

    def add_runs(self, runs: Sequence[Run]) -> None:
        """Reuse M-FAC runs trained elsewhere on the tuning's data and budget (e.g. a damping scan
        made with `tuning.train("mfac", lr, damping=...)`) instead of training them again."""
        for r in runs:
            if r.optimizer == "mfac" and len(r.step_times) <= self.tuning.steps:
                self._runs[self._key(r.settings["num_grads"], r.settings["damping"], r.lr)] = r

    def add_errors(self, errors: Sequence[IHVPErrors]) -> None:
        """Reuse IHVP error sweeps computed elsewhere on the same problem (e.g. with `ihvp_errors`);
        one is used for a damping when it covers the window sizes the widget plots."""
        for e in errors:
            if e.num_samples == self.problem.num_samples and e.dim == self.problem.dim:
                self._errors[float(f"{e.damping:.6g}")] = e

    def compute(self, num_grads: int, damping: float, lr: float, show: Sequence[str]) -> dict:
        key = self._key(num_grads, damping, lr)
        if key not in self._runs:
            self._runs[key] = self.tuning.train("mfac", float(lr), num_grads=int(num_grads), damping=float(damping))
        run = self._runs[key]
        damping_key = float(f"{damping:.6g}")
        errors = self._errors.get(damping_key)
        if errors is None or not set(self._windows(num_grads)) <= set(errors.windows.tolist()):
            errors = self._errors[damping_key] = ihvp_errors(self.problem, self._windows(num_grads), damping)
        at = int(np.flatnonzero(errors.windows == int(num_grads))[0])
        baselines = {name: self.tuning.best(SHOW[name]) for name in show}
        reference = self.tuning.best("adamw") if "adamw" in self.tuning.runs else None
        ratio = run.median_step_time / reference.median_step_time if reference is not None else math.nan
        return {
            "run": run, "baselines": baselines, "errors": errors, "num_grads": int(num_grads),
            "damping": float(damping), "lr": float(lr), "error_at_m": float(errors.window[at]),
            "float32_error_at_m": float(errors.float32[at]), "rounding_at_m": float(errors.rounding[at]),
            "time_ratio": ratio, "final_loss": run.final_loss, "final_accuracy": run.final_accuracy,
            "beats": {name: run.final_loss < b.final_loss for name, b in baselines.items()},
        }

    def draw(self, result: dict):
        from matplotlib.figure import Figure
        from matplotlib.ticker import NullFormatter, NullLocator

        fig = Figure(figsize=(11, 7.2))
        (ax_step, ax_time), (ax_acc, ax_err) = fig.subplots(2, 2)
        fig.subplots_adjust(left=0.075, right=0.985, bottom=0.08, top=0.955, wspace=0.22, hspace=0.32)
        run = result["run"]
        label = f"M-FAC (m {result['num_grads']}, λ {result['damping']:.0e}, lr {run.lr:.2g})"
        curves = [(run, label, COLORS["mfac"])]
        curves += [(b, f"{b.label}, tuned", COLORS[b.optimizer]) for b in result["baselines"].values()]
        for r, label, color in curves:
            ax_step.plot(r.steps, r.train_loss, color=color, lw=2, label=label)
            ax_time.plot(r.wall, r.train_loss, color=color, lw=2, label=label)
            ax_acc.plot(r.steps, 100 * r.test_accuracy, color=color, lw=2, label=label)
        losses = np.concatenate([r.train_loss for r, _, _ in curves])
        losses = losses[np.isfinite(losses) & (losses > 0)]
        for ax in (ax_step, ax_time):
            ax.set_yscale("log")
            ax.set_ylabel(f"training loss (all {len(self.tuning.data[0])} digits)")
            if len(losses) and losses.max() > 10 * losses.min():  # decades are labelled: skip the minor labels
                ax.yaxis.set_minor_formatter(NullFormatter())  # (also halves the time to draw the figure)
        ax_step.set_xlabel(f"optimizer step (batch {self.tuning.batch_size})")
        ax_time.set_xlabel("optimizer wall-clock time (s, evaluation excluded)")
        ax_acc.set_xlabel(f"optimizer step (batch {self.tuning.batch_size})")
        ax_acc.set_ylabel("test accuracy (%)")
        ax_acc.set_ylim(0, 100)
        status = "diverged" if run.diverged else f"final loss {run.final_loss:.3g}"
        ax_step.set_title(f"M-FAC: {status}", fontsize=10)
        ax_time.set_title(f"median step: M-FAC {1e3 * run.median_step_time:.2f} ms "
                          f"= {result['time_ratio']:.1f}x AdamW's (noisy)", fontsize=10)
        acc = result["final_accuracy"]
        ax_acc.set_title(f"test accuracy: M-FAC {100 * acc:.1f}%" if math.isfinite(acc) and not run.diverged
                         else "test accuracy (M-FAC diverged)", fontsize=10)
        for ax in (ax_step, ax_time, ax_acc):
            ax.legend(fontsize=8)
            ax.grid(alpha=0.3)

        e = result["errors"]
        ax_err.loglog(e.windows, e.window, "o-", color="tab:red", label="window of m vs all N (float64)")
        ax_err.loglog(e.windows, e.float32, "s--", color="tab:orange", ms=4, label="same, computed in float32")
        ax_err.loglog(e.windows, np.maximum(e.rounding, 1e-17), "^:", color="0.4", ms=4,
                      label="float32 rounding alone (same window)")
        ax_err.axvline(result["num_grads"], color="k", lw=0.8, ls="--")
        ax_err.plot([result["num_grads"]], [result["error_at_m"]], "o", ms=11, mfc="none", mec="k",
                    label=f"m = {result['num_grads']}: error {result['error_at_m']:.2g}")
        ax_err.set_xlabel(f"window size m (tiny model: N = {e.num_samples} gradients, d = {e.dim})")
        ax_err.set_ylabel("relative error of $F^{-1}\\bar g$ (vs dense $F_N$)")
        ax_err.set_title(f"IHVP error at damping λ = {result['damping']:.0e}", fontsize=10)
        ax_err.legend(fontsize=8)
        ax_err.grid(alpha=0.3)
        ax_err.yaxis.set_minor_locator(NullLocator())  # up to 17 decades: minor ticks would only cost time
        ax_err.xaxis.set_minor_formatter(NullFormatter())
        return fig
