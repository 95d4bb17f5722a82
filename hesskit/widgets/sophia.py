"""Notebook 07: Sophia, clipped diagonal-Newton steps, on a tiny character language model.

Sophia (Liu, Li, Hall, Liang & Ma, "Sophia: A Scalable Stochastic Second-order Optimizer for
Language Model Pre-training", ICLR 2024) steps

    theta <- theta - lr * clip( m / max(gamma * h, eps), 1 )

with m the gradient momentum and h a diagonal curvature estimate refreshed every k steps:
Hutchinson's u * (H u) (Sophia-H) or the Gauss-Newton-Bartlett estimate B * g_hat^2 from labels
sampled from the model's own softmax (Sophia-G). This module trains `hk.models.CharTransformerLM`
with Sophia and with first-order baselines under one protocol (same initialisation, same batch
order, same seeds) and records what the notebook plots: held-out loss against steps and against
wall-clock seconds, and Sophia's win rate (the fraction of coordinates whose step was not clipped).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ..data import char_windows, text
from ..models import CharTransformerLM
from ..optim import Sophia
from ..optim import step_seed
from ..curvature.trace import sampled_label_loss
from ..optim.sophia import DEFAULT_GAMMA
from .explorer import Explorer
from ..experiments.training import batch_order, best_run
from ..optim.closures import make_closure
from .. import progress

__all__ = [
    "SophiaExplorer",
    "CharLMTask",
    "TrainingRun",
    "SignMomentum",
    "OfficialSophiaG",
    "char_lm_task",
    "make_optimizer",
    "train_lm",
    "seeded_label_loss",
    "batch_order",
    "lr_sweep",
    "step_cost",
    "step_cost_rounds",
    "best_run",
]

OPTIMIZERS = ("sophia-g", "sophia-h", "adamw", "sign", "sophia-g-official")
LABELS = {"sophia-g": "Sophia-G", "sophia-h": "Sophia-H", "adamw": "AdamW", "sign": "sign momentum",
          "sophia-g-official": "official SophiaG"}
BASELINES = {"AdamW": "adamw", "sign momentum": "sign", "none": None}
ESTIMATORS = {"Sophia-G (GNB)": "sophia-g", "Sophia-H (Hutchinson)": "sophia-h"}


# --------------------------------------------------------------------------- the task
@dataclass
class CharLMTask:
    """Next-character prediction on `hk.data.text`: training and held-out windows, and the model shape."""

    x: Tensor  # (N, length) int64 character ids
    y: Tensor  # (N, length) the next characters
    x_test: Tensor
    y_test: Tensor
    vocab: str
    dim: int = 32
    blocks: int = 1
    heads: int = 4

    @property
    def length(self) -> int:
        return self.x.shape[1]

    def model(self, seed: int = 0) -> CharTransformerLM:
        """A fresh model; the same seed gives the same initial weights for every optimizer."""
        torch.manual_seed(seed)
        return CharTransformerLM(vocab=len(self.vocab), dim=self.dim, blocks=self.blocks, heads=self.heads,
                                 max_length=self.length)

    def loss(self, logits: Tensor, y: Tensor) -> Tensor:
        """Mean cross-entropy (nats per character) of logits (B, T, V) against targets (B, T)."""
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))

    @torch.no_grad()
    def test_loss(self, model: torch.nn.Module) -> float:
        return float(self.loss(model(self.x_test), self.y_test))

    def unigram_entropy(self) -> float:
        """Entropy of the training characters' frequencies: the loss of the best model that ignores context."""
        counts = torch.bincount(self.y.reshape(-1), minlength=len(self.vocab)).double()
        p = counts[counts > 0] / counts.sum()
        return float(-(p * p.log()).sum())


def char_lm_task(num_chars: int = 30_000, length: int = 32, dim: int = 32, blocks: int = 1, heads: int = 4,
                 seed: int = 0) -> CharLMTask:
    """`num_chars` characters of `hk.data.text`, cut into windows of `length` characters (stride
    length/2 in the training part, the last 10% held out), and the shape of a tiny GPT for them."""
    corpus = text(num_chars, seed=seed)
    (x, y), (x_test, y_test), vocab = char_windows(corpus, length=length, test_fraction=0.1,
                                                   stride=max(length // 2, 1))
    return CharLMTask(x, y, x_test, y_test, vocab, dim=dim, blocks=blocks, heads=heads)


# --------------------------------------------------------------------------- optimizers
class SignMomentum(torch.optim.Optimizer):
    """theta <- theta (1 - lr wd) - lr sign(m), m = beta1 m + (1 - beta1) g: Sophia with every
    coordinate clipped (win rate 0), the limit gamma -> 0. What is left of Sophia without its
    curvature (signSGD with momentum: Bernstein et al., "signSGD", ICML 2018)."""

    def __init__(self, params, lr: float = 1e-3, beta1: float = 0.965, weight_decay: float = 0.1):
        super().__init__(params, dict(lr=lr, beta1=beta1, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                m = self.state[p].setdefault("exp_avg", torch.zeros_like(p))
                m.mul_(group["beta1"]).add_(p.grad, alpha=1 - group["beta1"])
                p.mul_(1 - group["lr"] * group["weight_decay"])
                p.add_(m.sign(), alpha=-group["lr"])
        return loss


class OfficialSophiaG(torch.optim.Optimizer):
    """The update rule of the official SophiaG (github.com/Liuhong99/Sophia, `sophia.py`, 2024),
    reproduced for comparison (no capturable/complex/maximize options):

        theta <- theta (1 - lr wd);   m <- beta1 m + (1 - beta1) g
        theta <- theta - lr sign(m) min(|m| / (rho bs h + 1e-15), 1)
        update_hessian():   h <- beta2 h + (1 - beta2) grad * grad

    where `grad` in `update_hessian` is the gradient of the mean loss on labels sampled from the
    model, and `bs` (an argument of `step`) the number of predictions per batch, so rho bs h is the
    paper's gamma h with gamma = rho. h starts at 0 and nothing is bias-corrected: until the first
    `update_hessian()` every step is a pure sign step, lr sign(m) (the official training script
    calls it after every k-th step, `iter_num % k == k - 1`). `win_rate` after a step is the
    fraction of coordinates with |m| < rho bs h (the script's "win rate").
    """

    def __init__(self, params, lr: float = 1e-4, betas: tuple[float, float] = (0.965, 0.99), rho: float = 0.04,
                 weight_decay: float = 0.1):
        super().__init__(params, dict(lr=lr, betas=tuple(betas), rho=rho, weight_decay=weight_decay))
        self.win_rate = float("nan")

    def _state(self, p: Tensor) -> dict:
        state = self.state[p]
        if not state:
            state["exp_avg"] = torch.zeros_like(p)
            state["hessian"] = torch.zeros_like(p)
        return state

    @torch.no_grad()
    def update_hessian(self) -> None:
        for group in self.param_groups:
            beta2 = group["betas"][1]
            for p in group["params"]:
                if p.grad is not None:
                    self._state(p)["hessian"].mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)

    @torch.no_grad()
    def step(self, closure=None, bs: int = 5120):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        unclipped, total = 0, 0
        for group in self.param_groups:
            beta1 = group["betas"][0]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self._state(p)
                m, h = state["exp_avg"], state["hessian"]
                p.mul_(1 - group["lr"] * group["weight_decay"])
                m.mul_(beta1).add_(p.grad, alpha=1 - beta1)
                scale = group["rho"] * bs * h
                ratio = (m.abs() / (scale + 1e-15)).clamp(max=1)
                p.addcmul_(m.sign(), ratio, value=-group["lr"])
                unclipped += int((m.abs() < scale).sum())
                total += p.numel()
        self.win_rate = unclipped / max(total, 1)
        return loss


def make_optimizer(name: str, params, lr: float, gamma: float | None = None, update_every: int = 10,
                   weight_decay: float = 0.1, bias_correction: bool = True, seed: int = 0) -> torch.optim.Optimizer:
    """One of `OPTIMIZERS`: "sophia-g" / "sophia-h" (`hk.optim.Sophia`, betas (0.965, 0.99)),
    "adamw" (`torch.optim.AdamW`, betas (0.9, 0.999)), "sign" (`SignMomentum`), "sophia-g-official"
    (`OfficialSophiaG` with rho = gamma, default 0.05). All use decoupled weight decay
    `weight_decay` (AdamW, Loshchilov & Hutter, ICLR 2019)."""
    if name in ("sophia-g", "sophia-h"):
        return Sophia(params, lr=lr, gamma=gamma, weight_decay=weight_decay, update_every=update_every,
                      estimator="gnb" if name == "sophia-g" else "hutchinson", bias_correction=bias_correction,
                      seed=seed)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    if name == "sign":
        return SignMomentum(params, lr=lr, weight_decay=weight_decay)
    if name == "sophia-g-official":
        return OfficialSophiaG(params, lr=lr, rho=0.05 if gamma is None else gamma, weight_decay=weight_decay)
    raise ValueError(f"optimizer: expected one of {OPTIMIZERS}, got {name!r}")


# --------------------------------------------------------------------------- training
@dataclass
class TrainingRun:
    """One training run. Per step t = 1..steps: `train_loss[t-1]` (the batch loss before the
    step), `step_seconds[t-1]` (wall time of the step: forward, backward, curvature, update) and
    `win_rate[t-1]` (Sophia: fraction of unclipped coordinates; nan for the baselines).
    `test_loss[j]` is the held-out loss after `eval_steps[j]` steps (step 0 = the initial model)."""

    name: str
    lr: float
    gamma: float | None
    update_every: int
    seed: int
    train_loss: np.ndarray
    step_seconds: np.ndarray
    win_rate: np.ndarray
    eval_steps: np.ndarray
    test_loss: np.ndarray
    diverged: bool = False
    extra: dict = field(default_factory=dict)
    batch_size: int = 32

    @property
    def label(self) -> str:
        return f"{LABELS.get(self.name, self.name)}, lr {self.lr:.2g}"

    @property
    def eval_seconds(self) -> np.ndarray:
        """Cumulative training wall time (evaluation excluded) at each evaluation."""
        cumulative = np.concatenate([[0.0], np.cumsum(self.step_seconds)])
        return cumulative[np.minimum(self.eval_steps, len(self.step_seconds))]

    @property
    def final_loss(self) -> float:
        """Mean held-out loss of the last three evaluations (inf if the run diverged)."""
        last = self.test_loss[-3:]
        return float(last.mean()) if not self.diverged and np.isfinite(last).all() else math.inf

    def steps_to(self, target: float) -> float:
        """The first evaluated step with held-out loss <= target (nan if never reached)."""
        hit = np.flatnonzero(self.test_loss <= target)
        return float(self.eval_steps[hit[0]]) if len(hit) else math.nan

    def seconds_to(self, target: float) -> float:
        hit = np.flatnonzero(self.test_loss <= target)
        return float(self.eval_seconds[hit[0]]) if len(hit) else math.nan

    @property
    def seconds_per_step(self) -> float:
        """Median wall time of a step (robust to the noise of a shared machine)."""
        return float(np.median(self.step_seconds)) if len(self.step_seconds) else math.nan


def seeded_label_loss(logits: Tensor, seed: int) -> Tensor:
    """Mean cross-entropy of `logits` on labels drawn from the model's own softmax (seeded): the
    loss whose gradient g_hat gives the Gauss-Newton-Bartlett estimate B * g_hat^2
    (`hesskit.curvature.trace.sampled_label_loss` with a generator seeded by `seed`)."""
    return sampled_label_loss(logits, torch.Generator().manual_seed(seed))


def train_lm(task: CharLMTask, optimizer: str, lr: float, steps: int = 300, batch_size: int = 32,
             gamma: float | None = None, update_every: int = 10, weight_decay: float = 0.1,
             bias_correction: bool = True, seed: int = 0, eval_every: int = 10) -> TrainingRun:
    """Train a fresh `task.model(seed)` for `steps` steps of `optimizer` (see `make_optimizer`)
    on the batches `batch_order(..., seed)`: every optimizer starts from the same weights and sees
    the same data in the same order; Sophia's probes and sampled labels are seeded by `seed` too.

    Sophia-G's closure returns (loss, logits), so its Gauss-Newton-Bartlett estimate reuses the
    step's forward pass. "sophia-g-official" follows the official training script instead: a
    normal step, then after every k-th step a second forward and backward pass on the next batch
    with sampled labels and `update_hessian()` (timed as part of that step). A non-finite loss
    stops the run (`diverged`, the remaining losses nan). `extra` holds, for the Sophia variants,
    "refreshes" (curvature estimates taken) and "negative_h" (fraction of coordinates whose
    curvature state h is negative at the end).
    """
    if steps < 1 or batch_size < 1 or eval_every < 1:
        raise ValueError(f"steps, batch_size, eval_every: expected positive integers, got {steps}, {batch_size}, "
                         f"{eval_every}")
    model = task.model(seed)
    model.train()
    opt = make_optimizer(optimizer, model.parameters(), lr, gamma=gamma, update_every=update_every,
                         weight_decay=weight_decay, bias_correction=bias_correction, seed=seed)
    hesskit_optimizer = isinstance(opt, Sophia)
    official = isinstance(opt, OfficialSophiaG)
    batches = batch_order(len(task.x), steps + 1, batch_size, seed)
    train_loss = np.full(steps, np.nan)
    seconds = np.zeros(steps)
    win = np.full(steps, np.nan)
    eval_steps = np.unique(np.r_[np.arange(0, steps + 1, eval_every), steps])
    test_loss = np.full(len(eval_steps), np.nan)
    test_loss[0] = task.test_loss(model)
    diverged, refreshes = False, 0
    for t in range(1, steps + 1):
        xb, yb = task.x[batches[t - 1]], task.y[batches[t - 1]]

        def compute():
            logits = model(xb)
            return task.loss(logits, yb), logits

        kind = "backward" if not hesskit_optimizer else "loss_outputs" if optimizer == "sophia-g" else "loss"
        closure = make_closure(kind, opt, compute)

        start = time.perf_counter()
        try:
            loss = opt.step(closure, bs=yb.numel()) if official else opt.step(closure)
            if official and t % update_every == 0:  # train_sophiag.py: iter_num % k == k - 1, iter_num from 0
                opt.zero_grad()
                xn = task.x[batches[t]]
                seeded_label_loss(model(xn), step_seed(seed, t)).backward()
                opt.update_hessian()
                opt.zero_grad()
                refreshes += 1
        except FloatingPointError:
            loss = torch.tensor(math.nan)
        seconds[t - 1] = time.perf_counter() - start
        train_loss[t - 1] = float(loss.detach())
        if hesskit_optimizer or official:
            win[t - 1] = opt.win_rate
        if not math.isfinite(train_loss[t - 1]):
            diverged = True
            break
        if t in eval_steps:
            test_loss[np.searchsorted(eval_steps, t)] = task.test_loss(model)
        progress.report(t, steps, f"{LABELS.get(optimizer, optimizer)} step")  # shown while an explorer renders
    if not diverged and not np.isfinite(test_loss).all():
        diverged = True
    extra: dict = {}
    if hesskit_optimizer or official:
        states = [opt.state[p] for p in model.parameters() if "hessian" in opt.state[p]]
        negative = sum(int((s["hessian"] < 0).sum()) for s in states)
        extra["negative_h"] = negative / max(sum(s["hessian"].numel() for s in states), 1)
        extra["refreshes"] = refreshes if official else (int(states[0]["refreshes"]) if states else 0)
    used_gamma = (opt.param_groups[0]["gamma"] if hesskit_optimizer else
                  opt.param_groups[0]["rho"] if official else None)
    return TrainingRun(optimizer, lr, used_gamma, update_every, seed, train_loss, seconds, win, eval_steps, test_loss,
                       diverged, extra, batch_size)


def step_cost_rounds(task: CharLMTask, configs: dict[str, float], blocks: int = 8, block: int = 10,
                     batch_size: int = 32, seed: int = 0, clock: str = "cpu") -> dict[str, np.ndarray]:
    """Seconds per training step of each optimizer (`configs`: name -> lr) in each of `blocks`
    rounds: the optimizers take turns, `block` steps each (one Sophia refresh per block of k = 10
    steps), so within a round every optimizer sees the same background load, and the ratio of two
    optimizers' times in one round cancels most of it. `clock` "cpu" (default) is the process's
    CPU time, which a busy, shared machine inflates far less than the wall clock; "wall" is
    `time.perf_counter`. With one torch thread (as in the notebooks) the two agree on a quiet
    machine. Returns name -> array (blocks,) of seconds per step."""
    if blocks < 1 or block < 1:
        raise ValueError(f"blocks, block: expected positive integers, got {blocks} and {block}")
    if clock not in ("cpu", "wall"):
        raise ValueError(f"clock: expected 'cpu' or 'wall', got {clock!r}")
    now = time.process_time if clock == "cpu" else time.perf_counter
    batches = batch_order(len(task.x), blocks * block, batch_size, seed)
    setups = {}
    for name, lr in configs.items():
        if name == "sophia-g-official":
            raise ValueError("step_cost: the official training loop is not timed here")
        model = task.model(seed)
        opt = make_optimizer(name, model.parameters(), lr, update_every=block, seed=seed)
        setups[name] = (model, opt)
    times: dict[str, list[float]] = {name: [] for name in configs}
    for r in range(blocks):
        for name, (model, opt) in setups.items():
            start = now()
            for idx in batches[r * block : (r + 1) * block]:
                xb, yb = task.x[idx], task.y[idx]

                def compute():
                    logits = model(xb)
                    return task.loss(logits, yb), logits

                kind = "backward" if not isinstance(opt, Sophia) else "loss_outputs" if name == "sophia-g" else "loss"
                opt.step(make_closure(kind, opt, compute))
            times[name].append((now() - start) / block)
    return {name: np.array(t) for name, t in times.items()}


def step_cost(task: CharLMTask, configs: dict[str, float], blocks: int = 8, block: int = 10, batch_size: int = 32,
              seed: int = 0, clock: str = "cpu") -> dict[str, float]:
    """Seconds per training step of each optimizer (`configs`: name -> lr), measured fairly on a
    busy machine: the median over the rounds of `step_cost_rounds` (the optimizers take turns,
    `block` steps each, for `blocks` rounds; CPU time by default). Taking turns exposes every
    optimizer to the same background load; the median ignores load spikes."""
    rounds = step_cost_rounds(task, configs, blocks=blocks, block=block, batch_size=batch_size, seed=seed, clock=clock)
    return {name: float(np.median(t)) for name, t in rounds.items()}


def lr_sweep(task: CharLMTask, optimizers: Sequence[str], lrs: Sequence[float], steps: int = 300,
             **kwargs) -> dict[str, list[TrainingRun]]:
    """`train_lm` for every optimizer and every learning rate of one grid (same seed, data, init)."""
    return {name: [train_lm(task, name, lr, steps=steps, **kwargs) for lr in lrs] for name in optimizers}


# --------------------------------------------------------------------------- the explorer
class SophiaExplorer(Explorer):
    """Sophia's lr, gamma, refresh interval k and estimator, against a baseline at its own lr:
    held-out loss against steps and against seconds, and the win rate over training."""


    def __init__(self, task: CharLMTask | None = None, steps: int = 300, lr: float = 3e-3, gamma: float = 0.05,
                 update_every: int = 10, estimator: str = "Sophia-G (GNB)", baseline: str = "AdamW",
                 baseline_lrs: dict[str, float] | None = None, target: float | None = None,
                 lr_range: tuple[float, float] = (-4, -1), gamma_range: tuple[float, float] = (-3, 1),
                 max_update_every: int = 50, batch_size: int = 32, seed: int = 0):
        import ipywidgets as widgets

        self.task = char_lm_task() if task is None else task
        self.steps, self.batch_size, self.seed = steps, batch_size, seed
        self.baseline_lrs = {"AdamW": 3e-3, "sign momentum": 1e-3, **(baseline_lrs or {})}
        self.target = target
        self._cache: dict[tuple, TrainingRun] = {}
        style = {"description_width": "initial"}
        super().__init__({
            "lr": widgets.FloatLogSlider(value=lr, base=10, min=lr_range[0], max=lr_range[1], step=0.25,
                                         description="Sophia lr", readout_format=".1e", continuous_update=False,
                                         style=style),
            "gamma": widgets.FloatLogSlider(value=gamma, base=10, min=gamma_range[0], max=gamma_range[1], step=0.25,
                                            description="gamma", readout_format=".2g", continuous_update=False,
                                            style=style),
            "update_every": widgets.IntSlider(value=update_every, min=1, max=max_update_every,
                                              description="refresh every k", continuous_update=False, style=style),
            "estimator": widgets.ToggleButtons(options=list(ESTIMATORS), value=estimator, description="estimator",
                                               style=style),
            "baseline": widgets.Dropdown(options=list(BASELINES), value=baseline, description="baseline",
                                         style=style),
        })

    @staticmethod
    def _key(name: str, lr: float, gamma: float | None, update_every: int, steps: int, batch_size: int,
             seed: int) -> tuple:
        sophia = name in ("sophia-g", "sophia-h")
        if sophia and gamma is None:
            gamma = DEFAULT_GAMMA["gnb" if name == "sophia-g" else "hutchinson"]
        return (name, f"{lr:.6g}", f"{gamma:.6g}" if sophia else None, update_every if sophia else None, steps,
                batch_size, seed)

    def add_runs(self, runs: Sequence[TrainingRun]) -> None:
        """Reuse runs trained elsewhere (e.g. a learning-rate sweep on the same task) instead of
        training them again; a run is used when its optimizer, lr, gamma, k, steps, batch size and
        seed match the controls'."""
        for r in runs:
            self._cache[self._key(r.name, r.lr, r.gamma, r.update_every, len(r.train_loss), r.batch_size, r.seed)] = r

    def _run(self, name: str, lr: float, gamma: float | None = None, update_every: int = 10) -> TrainingRun:
        key = self._key(name, lr, gamma, update_every, self.steps, self.batch_size, self.seed)
        if key not in self._cache:
            self._cache[key] = train_lm(self.task, name, lr, steps=self.steps, batch_size=self.batch_size,
                                        gamma=gamma, update_every=update_every, seed=self.seed)
        return self._cache[key]

    def compute(self, lr: float, gamma: float, update_every: int, estimator: str, baseline: str) -> dict:
        sophia = self._run(ESTIMATORS[estimator], lr, gamma, update_every)
        base_name = BASELINES[baseline]
        base = self._run(base_name, self.baseline_lrs[baseline]) if base_name else None
        if self.target is not None:
            target = self.target
        else:  # the loss the baseline (or Sophia) reaches by the end, so that "steps to target" is defined
            reference = base if base is not None and base.final_loss < math.inf else sophia
            target = float(np.nanmin(reference.test_loss)) + 0.02
        runs = [r for r in (sophia, base) if r is not None]
        finite = sophia.win_rate[np.isfinite(sophia.win_rate)]
        return {
            "sophia": sophia, "baseline": base, "runs": runs, "target": target,
            "steps_to": {r.label: r.steps_to(target) for r in runs},
            "seconds_to": {r.label: r.seconds_to(target) for r in runs},
            "mean_win_rate": float(finite.mean()) if len(finite) else math.nan,
            "unigram": self.task.unigram_entropy(),
        }

    def draw(self, result: dict):
        from matplotlib.figure import Figure

        fig = Figure(figsize=(12, 3.6))
        ax_steps, ax_time, ax_win = fig.subplots(1, 3)
        colors = {"sophia-g": "C0", "sophia-h": "C2", "adamw": "C1", "sign": "C7"}
        for run in result["runs"]:
            label = run.label + (" (diverged)" if run.diverged else "")
            ax_steps.plot(run.eval_steps, run.test_loss, color=colors[run.name], label=label)
            ax_time.plot(run.eval_seconds, run.test_loss, color=colors[run.name], label=label)
        lowest = min(float(np.nanmin(r.test_loss)) for r in result["runs"])
        for ax in (ax_steps, ax_time):
            ax.axhline(result["target"], color="k", ls=":", lw=1, label=f"target {result['target']:.2f}")
            ax.axhline(result["unigram"], color="0.6", ls="--", lw=1,
                       label=f"unigram entropy {result['unigram']:.2f}")
            ax.set_ylabel("held-out loss (nats / character)")
            ax.set_ylim(max(lowest - 0.1, 0.0), result["unigram"] + 0.15)
        ax_steps.set_xlabel("optimizer steps")
        ax_time.set_xlabel("training wall-clock time (s)")
        ax_steps.legend(fontsize=7)
        sophia = result["sophia"]
        to = result["steps_to"]
        reached = ", ".join(f"{k.split(',')[0]} {v:.0f}" if math.isfinite(v) else f"{k.split(',')[0]} never"
                            for k, v in to.items())
        ax_steps.set_title(f"steps to target: {reached}", fontsize=9)
        secs = result["seconds_to"]
        ax_time.set_title("seconds to target: " + ", ".join(
            f"{k.split(',')[0]} {v:.1f}" if math.isfinite(v) else f"{k.split(',')[0]} never"
            for k, v in secs.items()), fontsize=9)
        steps = np.arange(1, len(sophia.win_rate) + 1)
        ax_win.plot(steps, sophia.win_rate, color=colors[sophia.name], lw=0.8)
        ax_win.axhspan(0.1, 0.5, color="C0", alpha=0.08, label="0.1-0.5 (official README)")
        ax_win.set_ylim(-0.02, 1.02)
        ax_win.set_xlabel("optimizer steps")
        ax_win.set_ylabel("win rate (fraction unclipped)")
        ax_win.set_title(f"{LABELS[sophia.name]}: gamma {sophia.gamma:.2g}, k = {sophia.update_every}, "
                         f"mean win rate {result['mean_win_rate']:.2f}", fontsize=9)
        ax_win.legend(fontsize=7, loc="upper right")
        fig.tight_layout()
        return fig
