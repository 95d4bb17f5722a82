"""Notebook 16 (`16_hessian_alignment.ipynb`): Hessian alignment for domain generalization.

Hemati, Zhang, Estiri & Chen, "Understanding Hessian Alignment for Domain Generalization", ICCV
2023: the transfer measure between two domains is bounded by the spectral norm of the difference
of their classifier-head Hessians, and a penalty that aligns the training domains' head Hessians
and gradients (`hk.optim.hessian_alignment_penalty`: HGP and Hutchinson) should generalise better
to an unseen domain than empirical risk minimisation (ERM).

Studies: colored digits (`colored_digits`, a `DomainTask`: the ColoredMNIST construction of
Arjovsky et al. 2019 on scikit-learn's 8 x 8 digits, whose color predicts the label better than the
digit's shape in the training domains and the other way round in the held-out one); the model, a
ReLU MLP with a separate linear classifier head (`DomainMLP`); one training protocol for ERM, HGP
and Hutchinson (`train_domains`, recorded as a `hesskit.experiments.training.TrainingRun`), the
protocol of the official ColoredMNIST scripts (penalty weights 1, annealed penalty weight, the loss
rescaled) on minibatches; the exact head Hessians of every domain in float64 and the spectral norms
of their differences, the quantity the paper's bound is about (`transfer_measures`,
`TransferMeasures`); seeds (`compare`, `final`). The notebook's explorer is
`hesskit.widgets.hessian_alignment.HessianAlignmentExplorer`.

References: Hemati et al., ICCV 2023 (code: huawei-noah/Federated-Learning, HessianAlignment);
Arjovsky, Bottou, Gulrajani & Lopez-Paz, "Invariant Risk Minimization", arXiv 2019 (ColoredMNIST,
the annealed penalty protocol); Gulrajani & Lopez-Paz, "In Search of Lost Domain Generalization",
ICLR 2021 (DomainBed).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._checks import check_choice, check_count
from ..curvature.operators import HessianOperator
from ..optim import step_seed
from ..optim.alignment import DEFAULT_NUM_PROBES, hessian_alignment_penalty
from .tasks import evaluate
from .training import TrainingRun, batch_order, run_to_end, training_steps

__all__ = [
    "LABELS",
    "METHODS",
    "DomainMLP",
    "DomainTask",
    "TransferMeasures",
    "colored_digits",
    "compare",
    "final",
    "train_domains",
    "transfer_measures",
]

METHODS = ("erm", "hgp", "hutchinson")
LABELS = {"erm": "ERM", "hgp": "HGP", "hutchinson": "Hutchinson"}


# --------------------------------------------------------------------------- the task
@dataclass
class DomainTask:
    """Training domains and a held-out test domain of one classification problem.

    `train[e]` = (x, y) of training domain e, `test` = (x, y) of the held-out domain; `names` name
    the training domains then the test domain; `settings` how the data were made."""

    train: list[tuple[Tensor, Tensor]]
    test: tuple[Tensor, Tensor]
    names: tuple[str, ...]
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def domains(self) -> list[tuple[Tensor, Tensor]]:
        """Every domain, the training domains first and the test domain last."""
        return [*self.train, self.test]

    @property
    def in_features(self) -> int:
        return int(self.test[0].shape[1])

    def grayscale(self) -> DomainTask:
        """The same images and labels with the color removed (the digit in both channels): what a
        model that cannot see the color learns, the reference for an invariant predictor."""
        def gray(x: Tensor) -> Tensor:
            digit = x.reshape(len(x), 2, -1).sum(1)
            return torch.cat([digit, digit], dim=1)

        return replace(self, train=[(gray(x), y) for x, y in self.train], test=(gray(self.test[0]), self.test[1]),
                       settings={**self.settings, "grayscale": True})


def colored_digits(seed: int = 0, train_flips: Sequence[float] = (0.1, 0.2), test_flip: float = 0.9,
                   label_noise: float = 0.25, copies: int = 2, test_fraction: float = 1 / 3) -> DomainTask:
    """ColoredMNIST (Arjovsky et al. 2019) on scikit-learn's 1,797 digits (`hk.data`-style: nothing
    downloads). The label is the digit being below 5, flipped with probability `label_noise`, so
    the shape predicts it with at most 1 - label_noise = 75% accuracy; the color (channel 0 or 1 of
    a 2 x 8 x 8 image, flattened to 128 inputs) equals the label flipped with probability
    `train_flips[e]` in training domain e (10% and 20%: the color predicts 90% and 80%) and
    `test_flip` (90%) in the test domain, where a color-reader scores 10%.

    A seeded permutation holds out `test_fraction` of the images for the test domain (599); every
    training domain shows the other 1,198 images `copies` times, each copy with its own label
    noise and color draws (2,396 samples per domain at copies=2: with one copy a small MLP memorises
    the noisy labels). Labels and colors are drawn from a generator seeded by `seed`."""
    from sklearn.datasets import load_digits

    check_count("copies", copies)
    for name, p in [("label_noise", label_noise), ("test_flip", test_flip), *(("train_flips", f) for f in train_flips)]:
        if not 0 <= p <= 1:
            raise ValueError(f"{name}: expected probabilities in [0, 1], got {p!r}")
    if len(train_flips) < 2:
        raise ValueError(f"train_flips: expected at least 2 training domains, got {len(train_flips)}")
    bunch = load_digits()
    images = torch.tensor(bunch.images, dtype=torch.float32).div_(16.0)
    digits = torch.tensor(bunch.target, dtype=torch.int64)
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(images), generator=gen)
    n_test = int(round(test_fraction * len(images)))
    test_idx, train_idx = perm[:n_test], perm[n_test:]

    def domain(idx: Tensor, flip: float) -> tuple[Tensor, Tensor]:
        y = (digits[idx] < 5).long() ^ (torch.rand(len(idx), generator=gen) < label_noise).long()
        color = y ^ (torch.rand(len(idx), generator=gen) < flip).long()
        x = torch.zeros(len(idx), 2, 8, 8)
        x[torch.arange(len(idx)), color] = images[idx]
        return x.reshape(len(idx), 128), y

    train = [domain(train_idx.repeat(copies), f) for f in train_flips]
    names = tuple(f"train (color flipped {f:.0%})" for f in train_flips) + (f"test (color flipped {test_flip:.0%})",)
    settings = dict(seed=seed, train_flips=tuple(train_flips), test_flip=test_flip, label_noise=label_noise,
                    copies=copies, test_fraction=test_fraction)
    return DomainTask(train, domain(test_idx, test_flip), names, settings)


class DomainMLP(nn.Module):
    """`body`: Linear(in, hidden) - ReLU - Linear(hidden, hidden) - ReLU (the IRM ColoredMNIST MLP,
    narrower); `head`: the linear classifier Linear(hidden, classes) whose Hessian is aligned."""

    def __init__(self, in_features: int = 128, hidden: int = 32, classes: int = 2):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(in_features, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU())
        self.head = nn.Linear(hidden, classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.body(x))


# --------------------------------------------------------------------------- the transfer measure
@dataclass
class TransferMeasures:
    """The exact head Hessians H_e and gradients g_e (float64) of every domain's mean loss, the
    training domains first and the test domain last, and the spectral norms the paper's bound is
    about: `train_gap` = max over pairs of training domains of ||H_a - H_b||_2, `test_gaps[e]` =
    ||H_e - H_test||_2 for training domain e, `gradient_test_gaps[e]` = ||g_e - g_test||, and
    `hessian_norms[d]` = ||H_d||_2 (the scale the gaps can be read against)."""

    hessians: list[Tensor]
    gradients: list[Tensor]
    train_gap: float
    test_gaps: np.ndarray
    gradient_test_gaps: np.ndarray
    hessian_norms: np.ndarray

    @property
    def test_gap(self) -> float:
        """max_e ||H_e - H_test||_2: the largest transfer gap of a training domain."""
        return float(self.test_gaps.max())


def spectral_norm(matrix: Tensor) -> float:
    """||M||_2 of a symmetric matrix: its largest |eigenvalue| (dense, exact)."""
    return float(torch.linalg.eigvalsh(matrix).abs().max())


def transfer_measures(model: DomainMLP, task: DomainTask) -> TransferMeasures:
    """Every domain's classifier-head Hessian, exactly: `hk.HessianOperator(head, cross-entropy,
    (features, y)).dense()` in float64 on all of the domain's samples. The head Hessian depends on
    the body only through the features, so the operator is built on the head and the features the
    body computes (the same matrix as `HessianOperator(model, ..., params=model.head)`, without a
    forward pass through the body per product). The model is copied, not changed."""
    model64 = copy.deepcopy(model).double().eval()
    head = model64.head
    hessians, gradients = [], []
    for x, y in task.domains:
        with torch.no_grad():
            features = model64.body(x.double())
        op = HessianOperator(head, nn.CrossEntropyLoss(), (features, y))
        hessians.append(op.dense())
        loss = F.cross_entropy(head(features), y)
        gradients.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, list(head.parameters()))]))
    num_train = len(task.train)
    train_gap = max(spectral_norm(hessians[a] - hessians[b]) for a in range(num_train) for b in range(a + 1, num_train))
    test_gaps = np.array([spectral_norm(h - hessians[-1]) for h in hessians[:-1]])
    gradient_gaps = np.array([float((g - gradients[-1]).norm()) for g in gradients[:-1]])
    norms = np.array([spectral_norm(h) for h in hessians])
    return TransferMeasures(hessians, gradients, train_gap, test_gaps, gradient_gaps, norms)


# --------------------------------------------------------------------------- training
def _penalty_weight(step: int, penalty_weight: float, anneal_steps: int) -> float:
    """The IRM protocol's weight: 1 for the first `anneal_steps` steps, then `penalty_weight`."""
    return penalty_weight if step > anneal_steps else 1.0


def train_domains(task: DomainTask, method: str = "hgp", *, steps: int = 500, lr: float = 1e-3,
                  batch_size: int = 512, l2: float = 1e-3, penalty_weight: float = 1e4, anneal_steps: int = 150,
                  alpha: float = 1.0, beta: float = 1.0, num_probes: int = DEFAULT_NUM_PROBES,
                  center: str = "mean_loss", hidden: int = 32, seed: int = 0, eval_every: int = 50,
                  measure: bool = True) -> TrainingRun:
    """Train a fresh `DomainMLP(hidden)` (initialised after `torch.manual_seed(seed)`) on the
    training domains of `task` with Adam(lr) for `steps` steps. Step t draws `batch_size` samples
    of every training domain (epoch-by-epoch reshuffles, `training.batch_order`, seeded per domain)
    and minimises

        mean_e L_e + l2 sum ||theta||^2 + w_t penalty,     divided by w_t when w_t > 1,

    with penalty = `hk.optim.hessian_alignment_penalty(losses, model.head, method, alpha, beta, ...)`
    ("hgp" or "hutchinson"; none for "erm"; the Hutchinson probes seeded by `hk.optim.step_seed(seed, t)`) and w_t = 1
    for t <= anneal_steps, `penalty_weight` after. That is the official ColoredMNIST scripts'
    protocol (from IRM's: weights alpha = beta = 1, L2 1.1e-3, penalty weight 91257 after 190 of
    501 full-batch steps at lr 4.9e-4), with minibatches and the weight, lr and schedule set for
    this task (weights 1e3-1e5 gave the same test accuracy within the seed spread). The DomainBed
    defaults are alpha 1e-4 (HGP) or 1e-3 (Hutchinson), beta 5e-3, penalty_weight 1, l2 0.

    Returns a `TrainingRun` (`optimizer` = method, `name` its label): `log` the per-step objective
    (before rescaling) and times; at checkpoint steps 0, every `eval_every` and the last, `evals`
    "train_accuracy" (mean over the training domains, all samples), "test_accuracy", "test_loss"
    and, with `measure`, the exact transfer measures of `transfer_measures` ("hessian_gap_train",
    "hessian_gap_test" = max_e ||H_e - H_test||_2, "gradient_gap_test", "hessian_norm_test");
    `per_step` "nll" (mean training loss of the step's batches), "penalty", "hessian_term" and
    "gradient_term" (the penalty's parts before alpha and beta; nan for ERM); `settings` every
    setting above; `extra["final_measures"]` the last `TransferMeasures`.
    """
    check_choice("method", method, METHODS)
    check_count("steps", steps)
    check_count("eval_every", eval_every)
    torch.manual_seed(seed)
    model = DomainMLP(task.in_features, hidden)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    orders = [batch_order(len(x), steps, min(batch_size, len(x)), seed + 7919 * (e + 1))
              for e, (x, _) in enumerate(task.train)]
    per_step = {key: np.full(steps, np.nan) for key in ("nll", "penalty", "hessian_term", "gradient_term")}
    eval_steps = np.unique(np.r_[np.arange(0, steps + 1, eval_every), steps])
    keys = ["train_accuracy", "test_accuracy", "test_loss"]
    keys += ["hessian_gap_train", "hessian_gap_test", "gradient_gap_test", "hessian_norm_test"] if measure else []
    evals = {key: np.full(len(eval_steps), np.nan) for key in keys}
    extra: dict[str, Any] = {}

    def record(j: int) -> None:
        evals["train_accuracy"][j] = np.mean([evaluate(model, d).accuracy for d in task.train])
        scored = evaluate(model, task.test)
        evals["test_accuracy"][j], evals["test_loss"][j] = scored.accuracy, scored.loss
        if measure:
            m = extra["final_measures"] = transfer_measures(model, task)
            evals["hessian_gap_train"][j], evals["hessian_gap_test"][j] = m.train_gap, m.test_gap
            evals["gradient_gap_test"][j] = m.gradient_test_gaps.max()
            evals["hessian_norm_test"][j] = m.hessian_norms[-1]

    def step(t: int) -> Tensor:
        losses = [F.cross_entropy(model(x[order[t - 1]]), y[order[t - 1]]) for (x, y), order in zip(task.train, orders)]
        nll = torch.stack(losses).mean()
        objective = nll + l2 * sum(p.pow(2).sum() for p in model.parameters())
        per_step["nll"][t - 1] = float(nll.detach())
        if method != "erm":
            penalty, rec = hessian_alignment_penalty(losses, model.head, method, alpha=alpha, beta=beta,
                                                     num_probes=num_probes, seed=step_seed(seed, t), center=center)
            per_step["penalty"][t - 1], per_step["hessian_term"][t - 1] = rec.value, rec.hessian_term
            per_step["gradient_term"][t - 1] = rec.gradient_term
            w = _penalty_weight(t, penalty_weight, anneal_steps)
            objective = objective + w * penalty
            scaled = objective / w if w > 1 else objective
        else:
            scaled = objective
        opt.zero_grad()
        scaled.backward()
        opt.step()
        return objective.detach()

    def at_checkpoint(t: int) -> str | None:
        record(int(np.searchsorted(eval_steps, t)))
        return None

    record(0)
    log = run_to_end(training_steps(step, steps, checkpoints=eval_steps[1:].tolist(), at_checkpoint=at_checkpoint,
                                    params=list(model.parameters()), label=f"{LABELS[method]} step"))
    settings = dict(steps=steps, lr=lr, batch_size=batch_size, l2=l2, penalty_weight=penalty_weight,
                    anneal_steps=anneal_steps, alpha=alpha if method != "erm" else None,
                    beta=beta if method != "erm" else None, num_probes=num_probes if method == "hutchinson" else None,
                    center=center if method != "erm" else None, hidden=hidden, seed=seed, eval_every=eval_every,
                    task=dict(task.settings))
    extra["model"] = model
    return TrainingRun(method, lr, log, eval_steps, evals, settings, per_step, extra, name=LABELS[method])


def final(run: TrainingRun, key: str = "test_accuracy") -> float:
    """The last checkpoint's `evals[key]` (nan if the run diverged)."""
    return run.final(key)


def compare(task: DomainTask, methods: Sequence[str] = METHODS, seeds: Sequence[int] = (0, 1, 2),
            **settings: Any) -> dict[str, list[TrainingRun]]:
    """`train_domains(task, method, seed=s, **settings)` for every method and seed: the same
    initial weights and batches for every method of a seed. Returns method -> runs, in seed order."""
    return {method: [train_domains(task, method, seed=s, **settings) for s in seeds] for method in methods}
