"""Notebook 07 (`07_sophia.ipynb`): Sophia, clipped diagonal-Newton steps, on a tiny character language model.

Sophia (Liu, Li, Hall, Liang & Ma, "Sophia: A Scalable Stochastic Second-order Optimizer for
Language Model Pre-training", ICLR 2024) steps

    theta <- theta - lr * clip( m / max(gamma * h, eps), 1 )

with m the gradient momentum and h a diagonal curvature estimate refreshed every k steps:
Hutchinson's u * (H u) (Sophia-H) or the Gauss-Newton-Bartlett estimate B * g_hat^2 from labels
sampled from the model's own softmax (Sophia-G). This module trains `hk.models.CharTransformerLM`
with Sophia and with first-order baselines under one protocol (same initialisation, same batch
order, same seeds) and records what the notebook plots: held-out loss against steps and against
wall-clock seconds, and Sophia's win rate (the fraction of coordinates whose step was not clipped).

Studies: the task is a `hesskit.experiments.tasks.char_lm_task` (the notebook's: 30,000
characters, windows of 32 starting 16 apart, one block of width 32 with 4 heads and MLP ratio 4);
Sophia and its baselines behind one constructor
(`make_optimizer`), with two reference implementations for the cross-checks: `SignMomentum`
(Sophia with every coordinate clipped) and `OfficialSophiaG` (the official update rule); the
training protocol (`train_lm`, recording a `hesskit.experiments.training.TrainingRun`;
`seeded_label_loss`), the reading an lr grid minimises (`final_test_loss`) and a learning-rate grid
(`tune`: `training.tune` with this setup bound); step costs timed in turns (`step_cost`,
`step_cost_rounds`, by `training.interleaved_step_times`). The notebook's
explorer is `hesskit.widgets.sophia.SophiaExplorer`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import partial

import numpy as np
import torch
from torch import Tensor

from ..curvature.trace import sampled_label_loss
from ..optim import Sophia, make_closure, step_seed
from .tasks import Task
from . import training
from .training import TrainingRun, Tuning, batch_order, interleaved_step_times, run_to_end, training_steps

__all__ = [
    "LABELS",
    "OPTIMIZERS",
    "OfficialSophiaG",
    "SignMomentum",
    "final_test_loss",
    "make_optimizer",
    "seeded_label_loss",
    "step_cost",
    "step_cost_rounds",
    "train_lm",
    "tune",
]

OPTIMIZERS = ("sophia-g", "sophia-h", "adamw", "sign", "sophia-g-official")
LABELS = {"sophia-g": "Sophia-G", "sophia-h": "Sophia-H", "adamw": "AdamW", "sign": "sign momentum",
          "sophia-g-official": "official SophiaG"}


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
def final_test_loss(run: TrainingRun, last: int = 3) -> float:
    """The mean held-out loss of the `last` evaluations of a `train_lm` run (inf if the run diverged
    or one of them is not finite): what the notebook's lr grid minimises (`min(runs, key=final_test_loss)`)."""
    values = np.asarray(run.evals["test_loss"][-last:])
    return float(values.mean()) if run.ok and np.isfinite(values).all() else math.inf


def seeded_label_loss(logits: Tensor, seed: int) -> Tensor:
    """Mean cross-entropy of `logits` on labels drawn from the model's own softmax (seeded): the
    loss whose gradient g_hat gives the Gauss-Newton-Bartlett estimate B * g_hat^2
    (`hesskit.curvature.trace.sampled_label_loss` with a generator seeded by `seed`)."""
    return sampled_label_loss(logits, torch.Generator().manual_seed(seed))


def train_lm(task: Task, optimizer: str, lr: float, steps: int = 300, batch_size: int = 32,
             gamma: float | None = None, update_every: int = 10, weight_decay: float = 0.1,
             bias_correction: bool = True, seed: int = 0, eval_every: int = 10) -> TrainingRun:
    """Train a fresh `task.model(seed)` for `steps` steps of `optimizer` (see `make_optimizer`)
    on the batches `batch_order(..., seed)`: every optimizer starts from the same weights and sees
    the same data in the same order; Sophia's probes and sampled labels are seeded by `seed` too.
    The steps run in `hesskit.experiments.training.training_steps`.

    Sophia-G's closure returns (loss, logits), so its Gauss-Newton-Bartlett estimate reuses the
    step's forward pass. "sophia-g-official" follows the official training script instead: a
    normal step, then after every k-th step a second forward and backward pass on the next batch
    with sampled labels and `update_hessian()` (timed as part of that step).

    Returns a `TrainingRun`: its `log` holds each step's batch loss (before the step) and wall and
    CPU seconds (forward, backward, curvature, update); `evals["test_loss"][j]` the held-out loss
    after `eval_steps[j]` steps (step 0 = the initial model; every `eval_every` steps and the
    last); `per_step["win_rate"]` Sophia's fraction of unclipped coordinates (nan for the
    baselines); `settings` gamma (the one used; None for the baselines), update_every,
    weight_decay, bias_correction, batch_size, seed, steps and eval_every; `extra`, for the Sophia
    variants, "refreshes" (curvature estimates taken) and "negative_h" (fraction of coordinates
    whose curvature state h is negative at the end). A non-finite batch or held-out loss stops the
    run (`diverged`; what is left stays nan). `final_test_loss` is what an lr grid minimises.
    """
    if steps < 1 or batch_size < 1 or eval_every < 1:
        raise ValueError(f"steps, batch_size, eval_every: expected positive integers, got {steps}, {batch_size}, "
                         f"{eval_every}")
    model = task.model(seed)
    model.train()
    opt = make_optimizer(optimizer, model.parameters(), lr, gamma=gamma, update_every=update_every,
                         weight_decay=weight_decay, bias_correction=bias_correction, seed=seed)
    batches = batch_order(len(task.train[0]), steps + 1, batch_size, seed)
    win = np.full(steps, np.nan)
    eval_steps = np.unique(np.r_[np.arange(0, steps + 1, eval_every), steps])
    test_loss = np.full(len(eval_steps), np.nan)
    test_loss[0] = task.evaluate(model, task.test).loss
    step, refreshes = _training_step(task, model, opt, optimizer, batches, update_every, seed, win)

    def at_checkpoint(t: int) -> str | None:
        j = int(np.searchsorted(eval_steps, t))
        test_loss[j] = task.evaluate(model, task.test).loss
        return None if math.isfinite(test_loss[j]) else f"held-out loss {test_loss[j]} at step {t}"

    log = run_to_end(training_steps(step, steps, checkpoints=eval_steps[1:].tolist(), at_checkpoint=at_checkpoint,
                                    label=f"{LABELS.get(optimizer, optimizer)} step"))
    settings = {"gamma": _used_gamma(opt), "update_every": update_every, "weight_decay": weight_decay,
                "bias_correction": bias_correction, "batch_size": batch_size, "seed": seed, "steps": steps,
                "eval_every": eval_every}
    return TrainingRun(optimizer, lr, log, eval_steps, {"test_loss": test_loss}, settings, {"win_rate": win},
                       _curvature_state(model, opt, refreshes), name=LABELS.get(optimizer, optimizer))


def _training_step(task: Task, model, opt: torch.optim.Optimizer, optimizer: str, batches: list,
                   update_every: int, seed: int, win: np.ndarray) -> tuple:
    """`train_lm`'s step t, for `training_steps`: `_lm_step` on batch t and, for the official
    SophiaG, the refresh of the official training script after every k-th step. It writes the
    win rate of the Sophia variants to win[t-1], also when the step fails. Returns the step and
    the list of the steps after which the official SophiaG refreshed."""
    official = isinstance(opt, OfficialSophiaG)
    refreshes: list[int] = []

    def step(t: int) -> Tensor:
        try:
            loss = _lm_step(task, model, opt, optimizer, batches[t - 1])
            if official and t % update_every == 0:  # train_sophiag.py: iter_num % k == k - 1, iter_num from 0
                opt.zero_grad()
                seeded_label_loss(model(task.train[0][batches[t]]), step_seed(seed, t)).backward()
                opt.update_hessian()
                opt.zero_grad()
                refreshes.append(t)
        finally:
            if isinstance(opt, (Sophia, OfficialSophiaG)):
                win[t - 1] = opt.win_rate
        return loss

    return step, refreshes


def _lm_step(task: Task, model, opt: torch.optim.Optimizer, optimizer: str, idx: Tensor) -> Tensor:
    """One step of `opt` (named `optimizer`) on the windows `idx`, with the closure it expects:
    hesskit's Sophia differentiates the loss itself (Sophia-G takes (loss, logits)), the others
    need `loss.backward()`; the official SophiaG is told the number of predictions per batch."""
    xb, yb = task.train[0][idx], task.train[1][idx]

    def compute():
        logits = model(xb)
        return task.loss(logits, yb)[0], logits

    kind = "backward" if not isinstance(opt, Sophia) else "loss_outputs" if optimizer == "sophia-g" else "loss"
    closure = make_closure(kind, opt, compute)
    return opt.step(closure, bs=yb.numel()) if isinstance(opt, OfficialSophiaG) else opt.step(closure)


def _used_gamma(opt: torch.optim.Optimizer) -> float | None:
    """Sophia's gamma (the official rule's rho), None for the baselines."""
    if isinstance(opt, Sophia):
        return opt.param_groups[0]["gamma"]
    return opt.param_groups[0]["rho"] if isinstance(opt, OfficialSophiaG) else None


def _curvature_state(model, opt: torch.optim.Optimizer, official_refreshes: list[int]) -> dict:
    """`TrainingRun.extra` of the Sophia variants: "negative_h" (fraction of coordinates with h < 0
    at the end) and "refreshes" (curvature estimates taken); empty for the baselines."""
    if not isinstance(opt, (Sophia, OfficialSophiaG)):
        return {}
    states = [opt.state[p] for p in model.parameters() if "hessian" in opt.state[p]]
    negative = sum(int((s["hessian"] < 0).sum()) for s in states)
    refreshes = (len(official_refreshes) if isinstance(opt, OfficialSophiaG) else
                 int(states[0]["refreshes"]) if states else 0)
    return {"negative_h": negative / max(sum(s["hessian"].numel() for s in states), 1), "refreshes": refreshes}


def step_cost_rounds(task: Task, configs: dict[str, float], blocks: int = 8, block: int = 10,
                     batch_size: int = 32, seed: int = 0, clock: str = "cpu") -> dict[str, np.ndarray]:
    """Seconds per training step of each optimizer (`configs`: name -> lr) in each of `blocks`
    rounds: the optimizers take turns, `block` steps each (one Sophia refresh per block of k = 10
    steps), so within a round every optimizer sees the same background load, and the ratio of two
    optimizers' times in one round cancels most of it (`training.interleaved_step_times`).
    `clock` "cpu" (default) is the process's CPU time, which a busy, shared machine inflates far
    less than the wall clock; "wall" is `time.perf_counter`. With one torch thread (as in the
    notebooks) the two agree on a quiet machine. Returns name -> array (blocks,) of seconds per step."""
    if blocks < 1 or block < 1:
        raise ValueError(f"blocks, block: expected positive integers, got {blocks} and {block}")
    if clock not in ("cpu", "wall"):
        raise ValueError(f"clock: expected 'cpu' or 'wall', got {clock!r}")
    batches = batch_order(len(task.train[0]), blocks * block, batch_size, seed)
    steps = []
    for name, lr in configs.items():
        if name == "sophia-g-official":
            raise ValueError("step_cost: the official training loop is not timed here")
        model = task.model(seed)
        opt = make_optimizer(name, model.parameters(), lr, update_every=block, seed=seed)
        steps.append((name, partial(_lm_step, task, model, opt, name)))
    names, seconds = interleaved_step_times(steps, batches, block=block, clock=clock)
    return {name: seconds[:, j] for j, name in enumerate(names)}


def step_cost(task: Task, configs: dict[str, float], blocks: int = 8, block: int = 10, batch_size: int = 32,
              seed: int = 0, clock: str = "cpu") -> dict[str, float]:
    """Seconds per training step of each optimizer (`configs`: name -> lr), measured fairly on a
    busy machine: the median over the rounds of `step_cost_rounds` (the optimizers take turns,
    `block` steps each, for `blocks` rounds; CPU time by default). Taking turns exposes every
    optimizer to the same background load; the median ignores load spikes."""
    rounds = step_cost_rounds(task, configs, blocks=blocks, block=block, batch_size=batch_size, seed=seed, clock=clock)
    return {name: float(np.median(t)) for name, t in rounds.items()}


def tune(task: Task, optimizers: Sequence[str], lrs: Sequence[float], steps: int = 300, **kwargs) -> Tuning:
    """`train_lm` for every optimizer and every learning rate of one grid (same seed, data, init):
    `hesskit.experiments.training.tune` of `train_lm` with this setup bound (`kwargs`: train_lm's
    settings). `tuning.best(name)` is the run with the lowest `final_test_loss` (the held-out
    loss, not the training loss), `tuning.runs[name]` the runs in increasing lr."""
    return training.tune(partial(train_lm, task, steps=steps, **kwargs), {name: lrs for name in optimizers},
                         key=final_test_loss)
