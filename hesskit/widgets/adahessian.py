"""Notebook 06: AdaHessian, Adam with a Hutchinson estimate of the Hessian's diagonal.

Pure functions first (the digits CNN, a study of the single-probe diagonal estimate with and
without averaging over convolution kernels, a training loop shared by AdaHessian, AdamW and SGD,
a learning-rate grid), then the widget.

References: Yao, Gholami, Shen, Mustafa, Keutzer & Mahoney, "ADAHESSIAN: An adaptive second order
optimizer for machine learning", AAAI 2021; Hutchinson, "A stochastic estimator of the trace of
the influence matrix for Laplacian smoothing splines", Commun. Stat. Simul. Comput. 1989;
Bekas, Kokiopoulou & Saad, "An estimator for the diagonal of a matrix", Appl. Numer. Math. 2007;
Kingma & Ba, "Adam: A method for stochastic optimization", ICLR 2015;
Loshchilov & Hutter, "Decoupled weight decay regularization", ICLR 2019 (AdamW).
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

from ..models import SmallCNN
from ..curvature.operators import HessianOperator
from ..optim import AdaHessian
from .explorer import Explorer
from ..experiments.training import TrainingRecord, best_run, loss_and_accuracy, run_plan
from ..optim.closures import make_closure
from .. import progress

__all__ = [
    "AdaHessianExplorer",
    "DiagonalStudy",
    "IMPLEMENTATIONS",
    "OPTIMIZERS",
    "Run",
    "StepCost",
    "Tuning",
    "digits_cnn",
    "diagonal_study",
    "kernel_mean",
    "step_costs",
    "train",
    "tune",
]

OPTIMIZERS = ("adahessian", "adamw", "sgd")
LABELS = {"adahessian": "AdaHessian", "adamw": "AdamW", "sgd": "SGD"}
COLORS = {"adahessian": "tab:red", "adamw": "tab:blue", "sgd": "tab:green"}

# What `AdaHessian(model.parameters(), lr=0.15)` means in three public packages, written as
# hk.optim.AdaHessian settings (the differences that change the trajectory, read from each package's
# source; see hk.optim.AdaHessian's docstring).
IMPLEMENTATIONS: dict[str, dict[str, Any]] = {
    "official (amirgholami/adahessian)": dict(hessian_power=1.0, eps=1e-4, spatial_average=True),
    "torch-optimizer 0.3.0 defaults": dict(hessian_power=0.5, eps=1e-4, spatial_average=True),
    "pytorch-optimizer 4.1.0 defaults": dict(hessian_power=1.0, eps=1e-16, spatial_average=False),
    "davda54/ada-hessian defaults": dict(hessian_power=1.0, eps=1e-8, spatial_average=False),
}


# --------------------------------------------------------------------------- the problem
def digits_cnn(channels: tuple[int, int] = (4, 8), seed: int = 0, dtype: torch.dtype = torch.float32) -> nn.Module:
    """`hk.models.SmallCNN(channels)` (tanh, 2x2 max-pool) for the 8 x 8 digits, initialised after
    `torch.manual_seed(seed)`: (4, 8) channels give 666 parameters."""
    torch.manual_seed(seed)
    return SmallCNN(tuple(channels)).to(dtype)


def kernel_mean(d: Tensor, shape: Sequence[int]) -> Tensor:
    """Average the entries of `d` (a flat block shaped like a parameter, with any trailing batch
    dimensions) over each convolution kernel's spatial positions (every dimension after the first
    two), as AdaHessian's spatial averaging does; 1-D and 2-D parameters are returned as they are."""
    shape = tuple(shape)
    if len(shape) <= 2:
        return d
    extra = d.shape[1:]
    block = d.reshape(*shape, *extra)
    dims = tuple(range(2, len(shape)))
    return block.mean(dim=dims, keepdim=True).expand_as(block).reshape(d.shape)


@dataclass
class DiagonalStudy:
    """Single-probe Hutchinson estimates D = z * (H z) of diag(H) next to the exact Hessian.

    `samples[:, p]` is the estimate of probe p (Rademacher z); `exact` = diag(H); `row_norm[i]` =
    ||H[i, :]||_2. Without averaging, entry i has mean H_ii and variance sum_{j != i} H_ij^2
    (Bekas, Kokiopoulou & Saad 2007), and E[D_i^2] = ||H[i, :]||^2 exactly, since z_i^2 = 1.
    """

    names: list[str]
    shapes: list[tuple[int, ...]]
    exact: Tensor  # (n,)
    row_norm: Tensor  # (n,)
    samples: Tensor  # (n, P)
    theory_variance: Tensor  # (n,) sum_{j != i} H_ij^2

    def slices(self) -> dict[str, slice]:
        out, start = {}, 0
        for name, shape in zip(self.names, self.shapes):
            size = math.prod(shape)
            out[name] = slice(start, start + size)
            start += size
        return out

    def conv_names(self) -> list[str]:
        return [n for n, s in zip(self.names, self.shapes) if len(s) > 2]

    def estimates(self, name: str, averaged: bool, absolute: bool = False) -> Tensor:
        """(numel, P) estimates for one parameter: D or |D|, raw or averaged over each kernel."""
        shape = self.shapes[self.names.index(name)]
        d = self.samples[self.slices()[name]]
        d = d.abs() if absolute else d
        return kernel_mean(d, shape) if averaged else d

    def summary(self, name: str, absolute: bool = False) -> dict[str, float]:
        """Mean over the parameter's entries of the per-entry variance and of the mean squared
        error against the exact diagonal (|diag| when `absolute`), raw and averaged, plus the
        squared bias that averaging the exact diagonal itself introduces."""
        sl, shape = self.slices()[name], self.shapes[self.names.index(name)]
        target = self.exact[sl].abs() if absolute else self.exact[sl]
        out = {"signal": float((target**2).mean())}
        for key, averaged in (("raw", False), ("averaged", True)):
            est = self.estimates(name, averaged, absolute)
            out[f"variance_{key}"] = float(est.var(dim=1).mean())
            out[f"mse_{key}"] = float(((est - target[:, None]) ** 2).mean())
        out["bias2_averaged"] = float(((kernel_mean(target, shape) - target) ** 2).mean())
        return out


def diagonal_study(model: nn.Module, criterion: nn.Module, data: tuple[Tensor, Tensor], num_probes: int = 256,
                   seed: int = 0) -> DiagonalStudy:
    """The exact Hessian of `criterion(model(x), y)` (dense, one product per parameter: keep the
    model tiny) and `num_probes` Rademacher estimates z * (H z) of its diagonal (Hutchinson 1989;
    Bekas, Kokiopoulou & Saad 2007), all in the model's dtype."""
    op = HessianOperator(model, criterion, data, mode="eval")
    H = op.dense()
    gen = torch.Generator().manual_seed(seed)
    Z = torch.randint(0, 2, (H.shape[0], num_probes), generator=gen, dtype=torch.float64).mul_(2).sub_(1).to(H.dtype)
    exact = H.diagonal().clone()
    return DiagonalStudy(
        names=list(op.param_names), shapes=[tuple(p.shape) for p in op.params], exact=exact,
        row_norm=H.norm(dim=1), samples=Z * (H @ Z), theory_variance=(H**2).sum(dim=1) - exact**2,
    )


# --------------------------------------------------------------------------- training
@dataclass
class Run(TrainingRecord):
    """One training run: full training loss and test accuracy every `eval_every` steps (and at 0),
    the time of every optimizer step (forward, backward, curvature and update; evaluation excluded)
    and the flat parameters at each checkpoint. A run that diverged has nan after it stopped."""

    optimizer: str
    lr: float
    settings: dict[str, Any]  # AdaHessian: every setting in effect (defaults included); {} otherwise
    steps: np.ndarray  # (C,) checkpoint step numbers, 0 first
    train_loss: np.ndarray  # (C,)
    test_accuracy: np.ndarray  # (C,)
    step_times: np.ndarray  # (steps,) seconds per optimizer step
    thetas: np.ndarray  # (C, n) parameters at the checkpoints
    num_hvps: int  # Hessian-vector products taken (AdaHessian refreshes)
    diverged: bool

    labels = LABELS


def _make_optimizer(name: str, params, lr: float, settings: dict[str, Any]):
    if name == "adahessian":
        return AdaHessian(params, lr=lr, **settings)
    if settings:
        raise ValueError(f"settings: only AdaHessian takes settings here, got {sorted(settings)} for {name!r}")
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr)  # torch defaults: betas (0.9, 0.999), eps 1e-8, wd 0.01
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr)
    raise ValueError(f"optimizer: expected one of {OPTIMIZERS}, got {name!r}")


def train(optimizer: str, lr: float, data: tuple[Tensor, Tensor], test: tuple[Tensor, Tensor], steps: int = 300,
          batch_size: int = 64, eval_every: int = 10, seed: int = 0, channels: tuple[int, int] = (4, 8),
          divergence: float = 2 * math.log(10), **settings: Any) -> Run:
    """Train `digits_cnn(channels, seed)` for `steps` mini-batch steps of cross-entropy.

    Every optimizer sees the same initialisation and the same batches: the training set in the
    order of `torch.randperm(N, generator=Generator().manual_seed(seed))`, reshuffled each epoch
    from that generator (the last incomplete batch of an epoch is dropped). "adahessian" is
    `hk.optim.AdaHessian(lr=lr, seed=seed, **settings)` with the closure contract (the optimizer
    differentiates); "adamw" and "sgd" are torch.optim with their defaults and `loss.backward()`.
    A run stops as diverged when a loss is not finite or the full training loss at a checkpoint
    reaches `divergence` (default 2 log 10 = 4.6, twice the loss of a uniform guess).
    """
    x, y = data
    batches, checkpoints = run_plan(len(x), steps, batch_size, eval_every, seed)
    if optimizer == "adahessian":
        settings.setdefault("seed", seed)
    model = digits_cnn(channels, seed, x.dtype)
    params = list(model.parameters())
    opt = _make_optimizer(optimizer, params, lr, settings)
    if isinstance(opt, AdaHessian):  # record every setting in effect, defaults included
        group = opt.param_groups[0]
        settings = {key: group[key] for key in ("betas", "eps", "weight_decay", "hessian_power")}
        settings.update({key: getattr(opt, key) for key in opt.settings})
    criterion = nn.CrossEntropyLoss()
    losses = np.full(len(checkpoints), np.nan)
    accuracies = np.full(len(checkpoints), np.nan)
    thetas = np.full((len(checkpoints), sum(p.numel() for p in params)), np.nan)
    step_times: list[float] = []
    num_hvps, diverged = 0, False

    def evaluate(c: int) -> None:
        losses[c], accuracies[c] = loss_and_accuracy(model, criterion, data, test)
        with torch.no_grad():
            thetas[c] = torch.cat([p.reshape(-1) for p in params]).double().numpy()

    evaluate(0)
    c = 1
    for t in range(1, steps + 1):
        xb, yb = x[batches[t - 1]], y[batches[t - 1]]
        closure = make_closure("loss" if optimizer == "adahessian" else "backward", opt,
                               lambda: (criterion(model(xb), yb), None))
        start = time.perf_counter()
        try:
            loss = opt.step(closure)
            if optimizer == "adahessian":
                num_hvps += (t - 1) % opt.update_every == 0
        except FloatingPointError:
            diverged = True
        step_times.append(time.perf_counter() - start)
        if not diverged:
            with torch.no_grad():
                diverged = not (torch.isfinite(loss) and all(torch.isfinite(p).all() for p in params))
        if diverged:
            break
        if c < len(checkpoints) and checkpoints[c] == t:
            evaluate(c)
            c += 1
            if not losses[c - 1] < divergence:
                diverged = True
                break
        progress.report(t, steps, f"{LABELS.get(optimizer, optimizer)} step")  # shown while an explorer renders
    return Run(optimizer, float(lr), dict(settings), np.array(checkpoints), losses, accuracies,
               np.array(step_times), thetas, num_hvps, diverged)


@dataclass
class Tuning:
    """Every optimizer of `OPTIMIZERS` trained once per learning rate of one shared grid, with the
    data, budget and seed every run used. The best lr has the lowest final training loss."""

    grid: np.ndarray
    runs: dict[str, list[Run]]
    data: tuple[Tensor, Tensor]
    test: tuple[Tensor, Tensor]
    steps: int
    batch_size: int
    eval_every: int
    seed: int
    channels: tuple[int, int]
    settings: dict[str, Any] = field(default_factory=dict)  # AdaHessian's settings while tuning

    def final_losses(self, optimizer: str) -> np.ndarray:
        return np.array([r.final_loss for r in self.runs[optimizer]])

    def best(self, optimizer: str) -> Run:
        """The run with the lowest final training loss (a diverged run counts as inf)."""
        return best_run(self.runs[optimizer])

    def train(self, optimizer: str, lr: float, **settings: Any) -> Run:
        """One more run on the same data, budget, initialisation and batch order."""
        return train(optimizer, lr, self.data, self.test, steps=self.steps, batch_size=self.batch_size,
                     eval_every=self.eval_every, seed=self.seed, channels=self.channels, **settings)


def tune(grid: Sequence[float], data: tuple[Tensor, Tensor], test: tuple[Tensor, Tensor], steps: int = 300,
         batch_size: int = 64, eval_every: int = 10, seed: int = 0, channels: tuple[int, int] = (4, 8),
         optimizers: Sequence[str] = OPTIMIZERS, **settings: Any) -> Tuning:
    """Train each optimizer at every learning rate of the same `grid` (same init, batches, seed).

    `settings` go to AdaHessian only (its defaults otherwise: the official ones)."""
    grid = np.asarray(sorted(float(g) for g in grid))
    if len(grid) == 0 or (grid <= 0).any():
        raise ValueError(f"grid: expected positive learning rates, got {list(grid)}")
    runs = {}
    for name in optimizers:
        extra = settings if name == "adahessian" else {}
        runs[name] = [train(name, lr, data, test, steps, batch_size, eval_every, seed, channels, **extra)
                      for lr in grid]
    return Tuning(grid, runs, data, test, steps, batch_size, eval_every, seed, tuple(channels), dict(settings))


@dataclass
class StepCost:
    """Seconds per optimizer step, measured interleaved: `seconds[b, j]` is the mean step time of
    optimizer `labels[j]` over block b (every block holds a whole number of refresh periods)."""

    labels: list[str]
    update_every: list[int | None]  # None for AdamW and SGD
    seconds: np.ndarray  # (num_blocks, num_optimizers)

    def ratio(self, label: str, reference: str = "AdamW") -> float:
        """Median over blocks of the step time of `label` divided by that of `reference`."""
        i, j = self.labels.index(label), self.labels.index(reference)
        return float(np.median(self.seconds[:, i] / self.seconds[:, j]))

    def ratios(self, reference: str = "AdamW") -> np.ndarray:
        return np.array([self.ratio(label, reference) for label in self.labels])


def step_costs(data: tuple[Tensor, Tensor], update_every: Sequence[int] = (1, 2, 5, 10, 20), rounds: int = 100,
               batch_size: int = 64, seed: int = 0, channels: tuple[int, int] = (4, 8)) -> StepCost:
    """Time AdamW, SGD and AdaHessian (one per refresh period u) on the digits CNN, one step of
    each in turn on the same batch, `rounds` times: machine load then hits every optimizer alike.

    An AdaHessian refresh builds the gradient's graph (create_graph) and takes one Hessian-vector
    product (a second backward pass); the other steps cost about one AdamW step. Rounds are
    grouped into blocks of lcm(update_every) steps, so each block's mean is the amortised cost.
    """
    x, y = data
    periods = [int(u) for u in update_every]
    if not periods or min(periods) < 1:
        raise ValueError(f"update_every: expected positive integers, got {list(update_every)}")
    block = math.lcm(*periods)
    rounds = max(block, -(-rounds // block) * block)
    labels = ["AdamW", "SGD"] + [f"AdaHessian, u = {u}" for u in periods]
    models = [digits_cnn(channels, seed, x.dtype) for _ in labels]
    opts = [_make_optimizer("adamw", models[0].parameters(), 1e-3, {}),
            _make_optimizer("sgd", models[1].parameters(), 1e-3, {})]
    opts += [AdaHessian(m.parameters(), lr=1e-3, update_every=u, seed=seed) for m, u in zip(models[2:], periods)]
    criterion = nn.CrossEntropyLoss()
    gen = torch.Generator().manual_seed(seed)
    times = np.zeros((rounds, len(labels)))
    for r in range(rounds):
        idx = torch.randint(0, len(x), (batch_size,), generator=gen)
        xb, yb = x[idx], y[idx]
        for j, (model, opt) in enumerate(zip(models, opts)):
            start = time.perf_counter()
            if isinstance(opt, AdaHessian):
                def closure(model=model, opt=opt):
                    opt.zero_grad()
                    return criterion(model(xb), yb)

                opt.step(closure)
            else:
                opt.zero_grad()
                criterion(model(xb), yb).backward()
                opt.step()
            times[r, j] = time.perf_counter() - start
    seconds = times.reshape(rounds // block, block, len(labels)).mean(axis=1)
    return StepCost(labels, [None, None, *periods], seconds)


# --------------------------------------------------------------------------- widget
BASELINES = {"AdamW": ("adamw",), "SGD": ("sgd",), "AdamW and SGD": ("adamw", "sgd")}


class AdaHessianExplorer(Explorer):
    """AdaHessian's settings against the tuned AdamW / SGD runs of a `Tuning`: training loss
    against steps and against optimizer seconds, and test accuracy.

    The seconds axis is the wall-clock time measured during each run; runs measured at different
    moments on a shared machine can differ by the load. Pass `costs` (from `step_costs`, timed
    interleaved) to also report its step-time ratio for the chosen refresh period."""


    def __init__(self, tuning: Tuning, lr: float | None = None, lr_range: tuple[float, float] = (1e-3, 10**0.5),
                 max_update_every: int = 20, costs: StepCost | None = None):
        import ipywidgets as widgets

        self.tuning = tuning
        self.costs = costs
        self._cache: dict[tuple, Run] = {}
        if "adahessian" in tuning.runs:
            best = tuning.best("adahessian")
            self._cache[self._key(best.lr, 1.0, "on", 1)] = best  # the tuned run, official settings
            default_lr = best.lr
        else:
            default_lr = 0.15
        lr = default_lr if lr is None else float(lr)
        lo, hi = math.log10(lr_range[0]), math.log10(lr_range[1])
        if not lr_range[0] * (1 - 1e-9) <= lr <= lr_range[1] * (1 + 1e-9):
            raise ValueError(f"lr: expected a value in {lr_range}, got {lr}")
        style = {"description_width": "initial"}
        super().__init__({
            "lr": widgets.FloatLogSlider(value=lr, base=10, min=lo, max=hi, step=0.25, description="AdaHessian lr",
                                         continuous_update=False, readout_format=".3g", style=style),
            "hessian_power": widgets.FloatSlider(value=1.0, min=0.0, max=1.0, step=0.25, description="Hessian power k",
                                                 continuous_update=False, style=style),
            "spatial_average": widgets.ToggleButtons(options=["on", "off"], value="on",
                                                     description="kernel averaging", style=style),
            "update_every": widgets.IntSlider(value=1, min=1, max=max_update_every, description="refresh D every",
                                              continuous_update=False, style=style),
            "baseline": widgets.Dropdown(options=list(BASELINES), value="AdamW", description="baseline (tuned)",
                                         style=style),
        })

    @staticmethod
    def _key(lr: float, hessian_power: float, spatial_average: str, update_every: int) -> tuple:
        return (round(float(lr), 12), float(hessian_power), spatial_average, int(update_every))

    def compute(self, lr: float, hessian_power: float, spatial_average: str, update_every: int,
                baseline: str) -> dict:
        key = self._key(lr, hessian_power, spatial_average, update_every)
        if key not in self._cache:
            self._cache[key] = self.tuning.train("adahessian", float(lr), hessian_power=float(hessian_power),
                                                 spatial_average=spatial_average == "on",
                                                 update_every=int(update_every))
        run = self._cache[key]
        baselines = {name: self.tuning.best(name) for name in BASELINES[baseline]}
        adamw = self.tuning.best("adamw")
        time_ratio = run.median_step_time / adamw.median_step_time
        label = f"AdaHessian, u = {int(update_every)}"
        benchmark = self.costs.ratio(label) if self.costs is not None and label in self.costs.labels else math.nan
        return {
            "run": run, "baselines": baselines, "time_ratio": time_ratio, "benchmark_ratio": benchmark, "lr": float(lr),
            "hessian_power": float(hessian_power), "spatial_average": spatial_average,
            "update_every": int(update_every), "baseline": baseline, "num_hvps": run.num_hvps,
            "final_loss": run.final_loss, "final_accuracy": run.final_accuracy,
            "beats": {name: run.final_loss < b.final_loss for name, b in baselines.items()},
        }

    def draw(self, result: dict):
        from matplotlib.figure import Figure

        fig = Figure(figsize=(13, 4.1), layout="constrained")
        ax_step, ax_time, ax_acc = fig.subplots(1, 3)
        run = result["run"]
        curves = [(run, f"AdaHessian (lr {run.lr:.3g})", "tab:red")]
        curves += [(b, f"{b.label}, tuned", COLORS[name]) for name, b in result["baselines"].items()]
        for r, label, color in curves:
            ax_step.plot(r.steps, r.train_loss, color=color, lw=2, label=label)
            ax_time.plot(r.wall, r.train_loss, color=color, lw=2, label=label)
            ax_acc.plot(r.steps, 100 * r.test_accuracy, color=color, lw=2, label=label)
        for ax in (ax_step, ax_time):
            ax.set_yscale("log")
            ax.set_ylabel("training loss (cross-entropy, all 1438 digits)")
        ax_step.set_xlabel("optimizer step")
        ax_time.set_xlabel("optimizer wall-clock time (s, evaluation excluded)")
        ax_acc.set_xlabel("optimizer step")
        ax_acc.set_ylabel("test accuracy (%)")
        ax_acc.set_ylim(0, 100)
        status = "diverged" if run.diverged else f"final loss {run.final_loss:.3g}"
        ax_step.set_title(f"AdaHessian k = {result['hessian_power']:g}, averaging {result['spatial_average']}, "
                          f"D every {result['update_every']}\n{status}", fontsize=10)
        bench = result["benchmark_ratio"]
        bench_text = f"interleaved benchmark: {bench:.1f}x; " if math.isfinite(bench) else ""
        ax_time.set_title(f"AdaHessian step {1e3 * run.median_step_time:.1f} ms = {result['time_ratio']:.1f}x AdamW's "
                          f"(measured)\n{bench_text}{run.num_hvps} HVPs in {len(run.step_times)} steps", fontsize=9)
        acc = result["final_accuracy"]
        ax_acc.set_title(f"test accuracy: AdaHessian {100 * acc:.1f}%" if math.isfinite(acc)
                         else "test accuracy (AdaHessian diverged)", fontsize=10)
        for ax in (ax_step, ax_time, ax_acc):
            ax.legend(fontsize=8)
            ax.grid(alpha=0.3)
        return fig
