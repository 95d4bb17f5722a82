"""Notebook 18 (`18_training_order.ipynb`): the effect of the order of training batches, estimated
without retraining (Yang, Li, Yang, Chen & Gong, "Estimating the Effects of Sample Training Orders
for Large Language Models without Retraining", arXiv 2505.22042; the paper calls its framework FUT).

The method is `hk.optim.train_adam` (one reference Adam run, every iterate kept and sketched) and
`hk.optim.estimate_order` (the run under another order of the same batches, from first- or
second-order Taylor expansions of each step's gradient around the reference iterate of that step;
see `hesskit/optim/training_order.py`). This module sets up what the notebook measures with them.

Setup (`order_setup` -> `OrderSetup`): the tiny character LM of `tasks.char_lm_task` (3,626
parameters, in float64 and eval mode), one epoch of T = 35 batches of 16 windows of 32 characters,
Adam at lr 5e-3 (`DEFAULT_LR`, chosen by measurement: notebook 18, section 4). With
`grouping="difficulty"` (the default) each batch holds windows of similar difficulty (the mean
unigram surprisal of their target characters, `window_surprisal`), so that a curriculum has
something to order; the reference takes the batches in a seeded random order, and the batches are
numbered in that order (the reference order is 0, 1, ..., T - 1).

Orders (lists of batch indices, one per step): `reversed_order`, `shuffled_order`,
`swapped_order` (k random transpositions of the reference order), `curriculum_order` (by the
batches' difficulty: easy-first, hard-first, hard in the middle, easy in the middle),
`moved_order` (one batch moved to another position); `kendall_distance` measures how far an order
is from the reference (the fraction of pairs of batches taken in the other order: 0 the same
order, 1 reversed).

Studies: `compare_order` retrains an order (the ground truth) and estimates it at Taylor orders 0,
1 and 2 (`OrderComparison`: final-parameter errors relative to the reference's distance from the
truth, held-out losses, per-step distances from the sketches and exact); `distance_study` the error
against the Kendall distance over seeds; `lr_study` the error against the learning rate;
`curriculum_study` ranks candidate orders by estimated held-out loss and checks the ranking by
retraining all of them (the paper's first use); `position_study` moves one batch to every position
and reads how well it is memorised (its own loss at the end of training) and the held-out loss
(the paper's second use). The notebook's explorer is
`hesskit.widgets.training_order.TrainingOrderExplorer`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor, nn

from .. import progress
from .._checks import check_choice, check_count, is_int
from ..losses import SequenceCrossEntropy
from ..optim import Trajectory, estimate_order, train_adam
from .tasks import Task, char_lm_task

__all__ = [
    "DEFAULT_LR",
    "GROUPINGS",
    "CURRICULA",
    "TAYLOR_ORDERS",
    "OrderSetup",
    "OrderComparison",
    "DistanceStudy",
    "CurriculumStudy",
    "PositionStudy",
    "lm_loss",
    "window_surprisal",
    "order_setup",
    "reversed_order",
    "shuffled_order",
    "swapped_order",
    "curriculum_order",
    "moved_order",
    "kendall_distance",
    "compare_order",
    "distance_study",
    "lr_study",
    "default_candidates",
    "curriculum_study",
    "position_study",
]

DEFAULT_LR = 5e-3  # where the second-order expansion holds over a whole epoch here (notebook 18, section 4)
GROUPINGS = ("difficulty", "random")
CURRICULA = ("easy-first", "hard-first", "hard-middle", "easy-middle")
TAYLOR_ORDERS = (0, 1, 2)


lm_loss = SequenceCrossEntropy()  # mean next-character cross-entropy (nats per character): `Task.loss`'s first value


def window_surprisal(task: Task) -> Tensor:
    """(N,) each training window's mean unigram surprisal -log p(c) of its target characters, p the
    characters' frequencies in the training targets: a text statistic of difficulty (windows full
    of rare characters are harder to predict), known before any training."""
    y = task.train[1]
    counts = torch.bincount(y.reshape(-1), minlength=len(task.vocab) or int(y.max()) + 1).double()
    logp = (counts / counts.sum()).clamp_min(1e-300).log()
    return -logp[y].mean(dim=1)


# --------------------------------------------------------------------------- the reference run and its data
@dataclass
class OrderSetup:
    """One reference Adam run and what every study of its batch orders needs.

    `batches[i]` is the i-th batch the reference took (its order is 0 .. T - 1); `difficulty[i]`
    its mean unigram surprisal (nats / character); `model` the float64 initial model (eval mode;
    never modified); `reference` the `Trajectory` of `train_adam` at `lr`."""

    task: Task
    model: nn.Module
    batches: list[tuple[Tensor, Tensor]]
    difficulty: Tensor
    reference: Trajectory
    lr: float
    seed: int
    grouping: str

    @property
    def steps(self) -> int:
        return len(self.batches)

    def retrain(self, order: Sequence[int]) -> Trajectory:
        """The ground truth: Adam actually trained on the batches in `order` (same start, lr, sketch)."""
        p = self.reference.projection
        return train_adam(self.model, self.batches, lm_loss, order=list(order), lr=self.lr, sketch_dim=p.k,
                          seed=p.seed)

    def estimate(self, order: Sequence[int], taylor_order: int) -> Trajectory:
        """`hk.optim.estimate_order` around the reference (every estimated iterate kept, so that the
        sketched distances can be checked against exact ones)."""
        return estimate_order(self.model, self.reference, list(order), taylor_order=taylor_order,
                              keep_iterates=True)

    def heldout_loss(self, run: Trajectory) -> float:
        """The held-out loss (nats / character, the task's test windows) at `run`'s last iterate."""
        return self.task.evaluate(run.into(self.model), self.task.test).loss

    def batch_loss(self, run: Trajectory, batch: int) -> float:
        """The loss of batch `batch` at `run`'s last iterate: how well the run memorised it."""
        return self.task.evaluate(run.into(self.model), self.batches[batch]).loss


def order_setup(lr: float = DEFAULT_LR, num_batches: int = 35, batch_size: int = 16, grouping: str = "difficulty",
                seed: int = 0, sketch_dim: int = 64, task: Task | None = None) -> OrderSetup:
    """Train the reference run: `task.model(seed)` in float64 (default task: `char_lm_task()`, a
    3,626-parameter `CharTransformerLM` on 562 training windows) with `hk.optim.train_adam` at
    `lr` (PyTorch's other Adam defaults), one step per batch, `num_batches` batches of
    `batch_size` windows drawn without replacement (a seeded subset when they do not use every
    window).

    grouping: "difficulty" sorts the drawn windows by `window_surprisal` and cuts them into batches
    of similar difficulty; "random" cuts them as drawn. Either way the reference takes the batches
    in a seeded random order (`seed` seeds the draw, the order and the model's initialisation)."""
    num_batches, batch_size = check_count("num_batches", num_batches), check_count("batch_size", batch_size)
    check_choice("grouping", grouping, GROUPINGS)
    if not is_int(seed):
        raise TypeError(f"seed: expected an integer, got {seed!r}")
    task = char_lm_task() if task is None else task
    x, y = task.train
    if num_batches * batch_size > len(x):
        raise ValueError(f"num_batches, batch_size: {num_batches} x {batch_size} windows asked for, the task has "
                         f"{len(x)} training windows")
    gen = torch.Generator().manual_seed(seed)
    drawn = torch.randperm(len(x), generator=gen)[: num_batches * batch_size]
    surprisal = window_surprisal(task)
    if grouping == "difficulty":
        drawn = drawn[surprisal[drawn].argsort(stable=True)]
    groups = drawn.view(num_batches, batch_size)[torch.randperm(num_batches, generator=gen)]
    batches = [(x[g], y[g]) for g in groups]
    difficulty = torch.stack([surprisal[g].mean() for g in groups])
    model = task.model(seed).double().eval()
    reference = train_adam(model, batches, lm_loss, lr=lr, sketch_dim=sketch_dim, seed=seed)
    return OrderSetup(task, model, batches, difficulty, reference, float(lr), int(seed), grouping)


# --------------------------------------------------------------------------- orders
def _check_steps(steps: int) -> int:
    return check_count("steps", steps, minimum=2)


def reversed_order(steps: int) -> list[int]:
    """T - 1, ..., 1, 0: the reference order backwards (Kendall distance 1)."""
    return list(range(_check_steps(steps)))[::-1]


def shuffled_order(steps: int, seed: int) -> list[int]:
    """A seeded random permutation of 0 .. T - 1 (Kendall distance about 1/2)."""
    return torch.randperm(_check_steps(steps), generator=torch.Generator().manual_seed(seed)).tolist()


def swapped_order(steps: int, swaps: int, seed: int) -> list[int]:
    """The reference order after `swaps` transpositions of two random positions (seeded): a
    controlled distance from the reference, from one swap to a near-random order."""
    steps, swaps = _check_steps(steps), check_count("swaps", swaps, minimum=0)
    gen = torch.Generator().manual_seed(seed)
    order = list(range(steps))
    for _ in range(swaps):
        i, j = torch.randperm(steps, generator=gen)[:2].tolist()
        order[i], order[j] = order[j], order[i]
    return order


def curriculum_order(difficulty: Sequence[float] | Tensor, kind: str) -> list[int]:
    """Batches ordered by difficulty: "easy-first" (the classic curriculum, Bengio et al. 2009),
    "hard-first" (the anti-curriculum), "hard-middle" (easy, harder, hardest, then easier again)
    or "easy-middle" (the opposite). Ties keep the batches' order."""
    check_choice("kind", kind, CURRICULA)
    d = torch.as_tensor(difficulty, dtype=torch.float64)
    if d.ndim != 1 or len(d) < 2 or not torch.isfinite(d).all():
        raise ValueError(f"difficulty: expected at least two finite numbers, one per batch, got shape {tuple(d.shape)}")
    easy = d.argsort(stable=True).tolist()
    if kind == "easy-first":
        return easy
    if kind == "hard-first":
        return easy[::-1]
    base = easy if kind == "hard-middle" else easy[::-1]
    return base[::2] + base[1::2][::-1]


def moved_order(steps: int, batch: int, position: int) -> list[int]:
    """The reference order with batch `batch` taken at step `position` instead (the batches between
    the two places shift by one step)."""
    steps = _check_steps(steps)
    for name, value in (("batch", batch), ("position", position)):
        if not is_int(value) or not 0 <= value < steps:
            raise ValueError(f"{name}: expected an integer in [0, {steps}), got {value!r}")
    order = [i for i in range(steps) if i != batch]
    order.insert(position, batch)
    return order


def kendall_distance(order: Sequence[int], reference: Sequence[int] | None = None) -> float:
    """The normalised Kendall tau distance between two orders of the same batches: the fraction of
    the T (T - 1) / 2 pairs of batches that the two take in opposite orders (0: the same order,
    1: reversed). `reference` defaults to 0 .. T - 1."""
    order = [int(i) for i in order]
    reference = list(range(len(order))) if reference is None else [int(i) for i in reference]
    if sorted(order) != sorted(reference) or len(set(order)) != len(order) or len(order) < 2:
        raise ValueError("order: expected a permutation of the reference's batches (at least two, no repeats)")
    position = {b: i for i, b in enumerate(reference)}
    p = np.array([position[b] for b in order])
    first, second = np.triu_indices(len(p), 1)
    return float(np.mean(p[first] > p[second]))


# --------------------------------------------------------------------------- one order: estimated against retrained
@dataclass
class OrderComparison:
    """An order retrained and estimated at several Taylor orders.

    `param_error[k]` = |gamma_T - theta'_T| / |theta_T - theta'_T|: the estimate's final-parameter
    error relative to the reference's distance from the retrained run (1: no better than assuming
    the order does not matter; 0 when both distances are 0). `heldout[...]` the held-out loss of
    "reference", "retrained" and each Taylor order k; `heldout_error[k]` = |estimated - retrained|,
    `heldout_change` = |reference - retrained| (what the order did to it). `step_distance[k]` per
    step |gamma_t - theta'_t| read from the sketches (k = "reference": |theta_t - theta'_t|), and
    `exact_step_distance` the same from the kept iterates. `term_ratio[k]` (k >= 1) the estimate's
    `Trajectory.term_ratio`, its expansion's range check: near or above 1, the expansion is outside
    its range; nan when the orders never differ. `seconds`: "retrained" and each k."""

    name: str
    order: list[int]
    kendall: float
    retrained: Trajectory
    estimates: dict[int, Trajectory]
    reference_distance: float
    param_error: dict[int, float]
    heldout: dict
    heldout_error: dict[int, float]
    heldout_change: float
    step_distance: dict
    exact_step_distance: dict
    term_ratio: dict
    seconds: dict = field(default_factory=dict)


def _relative(error: float, scale: float) -> float:
    if scale > 0:
        return error / scale
    return 0.0 if error == 0 else math.inf


def compare_order(setup: OrderSetup, order: Sequence[int], taylor_orders: Sequence[int] = TAYLOR_ORDERS,
                  name: str = "") -> OrderComparison:
    """Retrain `order` and estimate it at each of `taylor_orders` (see `OrderComparison`)."""
    taylor_orders = list(taylor_orders)
    bad = [k for k in taylor_orders if k not in TAYLOR_ORDERS or not is_int(k)]
    if bad or not taylor_orders:
        raise ValueError(f"taylor_orders: expected some of {TAYLOR_ORDERS}, got {taylor_orders!r}")
    order = list(order)
    ref = setup.reference
    true = setup.retrain(order)
    estimates = {k: setup.estimate(order, k) for k in taylor_orders}
    scale = float((ref.final - true.final).norm())
    heldout = {"reference": setup.heldout_loss(ref), "retrained": setup.heldout_loss(true)}
    heldout.update({k: setup.heldout_loss(e) for k, e in estimates.items()})
    runs = {"reference": ref, **estimates}
    try:
        kendall = kendall_distance(order)
    except ValueError:  # repeats or omissions: no Kendall distance
        kendall = math.nan
    return OrderComparison(
        name, order, kendall, true, estimates, scale,
        {k: _relative(float((e.final - true.final).norm()), scale) for k, e in estimates.items()},
        heldout, {k: abs(heldout[k] - heldout["retrained"]) for k in estimates},
        abs(heldout["reference"] - heldout["retrained"]),
        {k: r.distances(true).numpy() for k, r in runs.items()},
        {k: (r.iterates - true.iterates).norm(dim=1).numpy() for k, r in runs.items()},
        {k: e.term_ratio for k, e in estimates.items() if k >= 1},
        {"retrained": true.seconds, **{k: e.seconds for k, e in estimates.items()}},
    )


# --------------------------------------------------------------------------- error against distance and learning rate
@dataclass
class DistanceStudy:
    """Rows of `compare_order` results, one per (setup, order): `label`, `seed`, `lr`, `kendall`,
    `reference_distance`, `heldout_change` (n,) arrays and `param_error[k]`, `heldout_error[k]` (n,)
    per Taylor order, `term_ratio[k]` (n,) for the orders >= 1; `seconds[k]` the estimates' and
    "retrained" the retraining seconds."""

    label: list[str]
    seed: np.ndarray
    lr: np.ndarray
    kendall: np.ndarray
    reference_distance: np.ndarray
    heldout_change: np.ndarray
    param_error: dict[int, np.ndarray]
    heldout_error: dict[int, np.ndarray]
    term_ratio: dict[int, np.ndarray]
    seconds: dict

    @classmethod
    def of(cls, rows: list[tuple[OrderSetup, OrderComparison]]) -> DistanceStudy:
        ks = list(rows[0][1].param_error)
        return cls([c.name for _, c in rows], np.array([s.seed for s, _ in rows]), np.array([s.lr for s, _ in rows]),
                   np.array([c.kendall for _, c in rows]), np.array([c.reference_distance for _, c in rows]),
                   np.array([c.heldout_change for _, c in rows]),
                   {k: np.array([c.param_error[k] for _, c in rows]) for k in ks},
                   {k: np.array([c.heldout_error[k] for _, c in rows]) for k in ks},
                   {k: np.array([c.term_ratio[k] for _, c in rows]) for k in ks if k >= 1},
                   {k: np.array([c.seconds[k] for _, c in rows]) for k in ["retrained", *ks]})


def distance_study(setups: Sequence[OrderSetup], swaps: Sequence[int] = (1, 2, 4, 8, 16, 32, 64),
                   shuffles: int = 1, reversed_too: bool = True,
                   taylor_orders: Sequence[int] = TAYLOR_ORDERS) -> DistanceStudy:
    """For each setup (a seed): orders `swapped_order(T, k, seed)` for each k in `swaps`, `shuffles`
    random orders and the reversed order, each retrained and estimated (`compare_order`)."""
    if not setups:
        raise ValueError("setups: expected at least one OrderSetup")
    rows = []
    total = len(setups) * (len(swaps) + shuffles + bool(reversed_too))
    for s in setups:
        orders = {f"{k} swaps": swapped_order(s.steps, k, s.seed) for k in swaps}
        orders.update({f"shuffled {j}": shuffled_order(s.steps, 1000 * s.seed + j + 1) for j in range(shuffles)})
        if reversed_too:
            orders["reversed"] = reversed_order(s.steps)
        for name, order in orders.items():
            rows.append((s, compare_order(s, order, taylor_orders, name)))
            progress.report(len(rows), total, "orders")
    return DistanceStudy.of(rows)


def lr_study(lrs: Sequence[float], seeds: Sequence[int] = (0, 1, 2), taylor_orders: Sequence[int] = TAYLOR_ORDERS,
             **setup_kwargs) -> DistanceStudy:
    """For each learning rate and seed: a fresh reference run (`order_setup(lr, seed=seed, ...)`) and
    one random order (`shuffled_order(T, seed + 1)`), retrained and estimated."""
    if not lrs or not seeds:
        raise ValueError("lrs, seeds: expected at least one of each")
    rows = []
    for lr in lrs:
        for seed in seeds:
            s = order_setup(lr=lr, seed=seed, **setup_kwargs)
            rows.append((s, compare_order(s, shuffled_order(s.steps, seed + 1), taylor_orders, f"lr {lr:g}")))
            progress.report(len(rows), len(lrs) * len(seeds), "learning rates")
    return DistanceStudy.of(rows)


# --------------------------------------------------------------------------- use 1: choosing a curriculum
def default_candidates(setup: OrderSetup, shuffles: int = 4) -> dict[str, list[int]]:
    """The candidate orders of the curriculum study: the reference, the four `CURRICULA` by the
    batches' difficulty, and `shuffles` random orders."""
    candidates = {"reference": list(range(setup.steps))}
    candidates.update({kind: curriculum_order(setup.difficulty, kind) for kind in CURRICULA})
    candidates.update({f"shuffled {j + 1}": shuffled_order(setup.steps, 100 + j) for j in range(shuffles)})
    return candidates


@dataclass
class CurriculumStudy:
    """Candidate orders ranked by estimated held-out loss and checked by retraining each.

    `names` the candidates; `retrained` (n,) their true held-out losses; `estimated[k]` (n,) the
    estimates at Taylor order k; `spearman[k]` the rank correlation of the two; `picked[k]` the
    candidate the estimate ranks best, `best` the truly best; `regret[k]` = true loss of the pick -
    true best; `spread` = the true worst - the true best (what choosing well is worth);
    `seconds[k]` all estimates together, `seconds["retrained"]` all retrainings."""

    names: list[str]
    retrained: np.ndarray
    estimated: dict[int, np.ndarray]
    spearman: dict[int, float]
    picked: dict[int, str]
    best: str
    regret: dict[int, float]
    spread: float
    seconds: dict
    comparisons: dict[str, OrderComparison] = field(repr=False)


def curriculum_study(setup: OrderSetup, candidates: Mapping[str, Sequence[int]] | None = None,
                     taylor_orders: Sequence[int] = TAYLOR_ORDERS) -> CurriculumStudy:
    """Estimate every candidate's final held-out loss from the reference run (FUT's curriculum use),
    and retrain every candidate to check the ranking (`default_candidates` when None)."""
    from scipy.stats import spearmanr

    candidates = default_candidates(setup) if candidates is None else dict(candidates)
    if len(candidates) < 2:
        raise ValueError(f"candidates: expected at least two orders to choose from, got {len(candidates)}")
    comparisons = {}
    for name, order in candidates.items():
        comparisons[name] = compare_order(setup, order, taylor_orders, name)
        progress.report(len(comparisons), len(candidates), "candidates")
    names = list(comparisons)
    true = np.array([comparisons[n].heldout["retrained"] for n in names])
    ks = list(taylor_orders)
    est = {k: np.array([comparisons[n].heldout[k] for n in names]) for k in ks}
    picked = {k: names[int(np.argmin(est[k]))] for k in ks}
    best = names[int(np.argmin(true))]
    return CurriculumStudy(
        names, true, est, {k: float(spearmanr(true, est[k]).statistic) for k in ks}, picked, best,
        {k: float(true[names.index(picked[k])] - true.min()) for k in ks}, float(true.max() - true.min()),
        {"retrained": sum(c.seconds["retrained"] for c in comparisons.values()),
         **{k: sum(c.seconds[k] for c in comparisons.values()) for k in ks}},
        comparisons)


# --------------------------------------------------------------------------- use 2: memorisation against position
@dataclass
class PositionStudy:
    """Batches moved to every position in `positions`: `memorised["retrained"]` (B, P) the moved
    batch's own loss after training (lower: better memorised) and `memorised[k]` its estimate at
    Taylor order k; `heldout[...]` the same for the held-out loss; `reference_position[b]` where the
    reference took batch b; `reference_memorised[b]` its loss after the reference run."""

    batches: list[int]
    positions: list[int]
    memorised: dict
    heldout: dict
    reference_position: list[int]
    reference_memorised: np.ndarray


def position_study(setup: OrderSetup, batches: Sequence[int], positions: Sequence[int],
                   taylor_orders: Sequence[int] = TAYLOR_ORDERS) -> PositionStudy:
    """Move each batch in `batches` to each step in `positions` (`moved_order`), retrain, estimate
    at each Taylor order, and read the moved batch's final loss and the held-out loss."""
    batches, positions, ks = [int(b) for b in batches], [int(p) for p in positions], list(taylor_orders)
    if not batches or not positions:
        raise ValueError("batches, positions: expected at least one of each")
    keys = ["retrained", *ks]
    memorised = {k: np.zeros((len(batches), len(positions))) for k in keys}
    heldout = {k: np.zeros((len(batches), len(positions))) for k in keys}
    done = 0
    for i, b in enumerate(batches):
        for j, p in enumerate(positions):
            true = setup.retrain(moved_order(setup.steps, b, p))
            runs = {"retrained": true, **{k: setup.estimate(true.order, k) for k in ks}}
            for k, run in runs.items():
                memorised[k][i, j] = setup.batch_loss(run, b)
                heldout[k][i, j] = setup.heldout_loss(run)
            done += 1
            progress.report(done, len(batches) * len(positions), "positions")
    return PositionStudy(batches, positions, memorised, heldout, list(batches),
                         np.array([setup.batch_loss(setup.reference, b) for b in batches]))
