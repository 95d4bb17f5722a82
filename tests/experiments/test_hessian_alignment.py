"""Notebook 16's experiments (hesskit.experiments.hessian_alignment): the colored digits and their
rates against binomial tolerances, the exact head Hessians of the transfer measure against the
full model's operator and a dense autograd reference, and the training protocol (same weights and
batches for every method, the annealed penalty weight, the penalty switched off equals ERM)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import hesskit as hk
from hesskit.experiments.hessian_alignment import (METHODS, DomainMLP, colored_digits, compare, final,
                                                   train_domains, transfer_measures)

TINY = dict(steps=6, batch_size=64, eval_every=3)


@pytest.fixture(scope="module")
def task():
    return colored_digits(seed=0, copies=1)


def within_binomial(count: int, n: int, p: float, sigmas: float = 5.0) -> bool:
    return abs(count - n * p) <= sigmas * math.sqrt(n * p * (1 - p))


# --------------------------------------------------------------------------- the task
def test_colored_digits_rates_shapes_and_channels():
    task = colored_digits(seed=1, copies=2)
    assert [len(x) for x, _ in task.domains] == [2396, 2396, 599] and task.in_features == 128
    assert len(task.names) == 3 and task.names[-1].startswith("test")
    for (x, y), flip in zip(task.domains, (0.1, 0.2, 0.9)):
        images = x.reshape(len(x), 2, 64)
        lit = images.abs().sum(2) > 0
        assert (lit.sum(1) == 1).all()  # every digit in exactly one channel
        color = lit[:, 1].long()
        assert within_binomial(int((color != y).sum()), len(y), flip)  # the color disagrees at the flip rate
    (x0, y0), (x1, y1) = task.train
    # the same images in both training domains, each copy with its own label and color draws
    assert torch.equal(x0.reshape(-1, 2, 64).sum(1), x1.reshape(-1, 2, 64).sum(1))
    assert not torch.equal(y0, y1)
    gray = task.grayscale()
    gx = gray.test[0].reshape(-1, 2, 64)
    assert torch.equal(gx[:, 0], gx[:, 1]) and torch.equal(gray.test[1], task.test[1]) and gray.settings["grayscale"]


def test_colored_digits_label_noise_against_the_digits():
    from sklearn.datasets import load_digits

    task = colored_digits(seed=2, copies=1, label_noise=0.25)
    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).div(16).reshape(len(digits.images), 64)
    below = torch.tensor(digits.target) < 5
    lookup = {tuple(row.tolist()): bool(b) for row, b in zip(images, below)}
    for x, y in task.domains:
        shape = x.reshape(len(x), 2, 64).sum(1)
        clean = torch.tensor([lookup[tuple(row.tolist())] for row in shape]).long()
        assert within_binomial(int((clean != y).sum()), len(y), 0.25)


def test_colored_digits_is_seeded_and_checks_its_arguments():
    a, b, c = colored_digits(seed=3, copies=1), colored_digits(seed=3, copies=1), colored_digits(seed=4, copies=1)
    assert all(torch.equal(u[0], v[0]) and torch.equal(u[1], v[1]) for u, v in zip(a.domains, b.domains))
    assert not torch.equal(a.test[1], c.test[1])
    with pytest.raises(ValueError, match="copies: expected an integer >= 1"):
        colored_digits(copies=0)
    with pytest.raises(ValueError, match="test_flip: expected probabilities in"):
        colored_digits(test_flip=1.5)
    with pytest.raises(ValueError, match="train_flips: expected at least 2 training domains"):
        colored_digits(train_flips=(0.1,))


# --------------------------------------------------------------------------- the transfer measure
def test_transfer_measures_are_the_exact_head_hessians(task):
    torch.manual_seed(0)
    model = DomainMLP(hidden=6)
    before = [p.detach().clone() for p in model.parameters()]
    m = transfer_measures(model, task)
    assert all(torch.equal(p, b) and p.dtype == torch.float32 for p, b in zip(model.parameters(), before))
    model64 = DomainMLP(hidden=6).double()
    model64.load_state_dict({k: v.double() for k, v in model.state_dict().items()})
    for (x, y), H, g in zip(task.domains, m.hessians, m.gradients):
        x = x.double()
        full = hk.HessianOperator(model64, nn.CrossEntropyLoss(), (x, y), params=model64.head).dense()
        features = model64.body(x).detach()

        def loss(w):
            return F.cross_entropy(features @ w[:12].view(2, 6).T + w[12:], y)

        w = torch.cat([model64.head.weight.reshape(-1), model64.head.bias]).detach()
        assert H.shape == (14, 14) and H.dtype == torch.float64
        assert torch.allclose(H, full, rtol=1e-10, atol=1e-14)
        assert torch.allclose(H, torch.autograd.functional.hessian(loss, w), rtol=1e-10, atol=1e-14)
        assert torch.allclose(g, torch.func.grad(loss)(w), rtol=1e-10, atol=1e-14)
    H1, H2, Ht = m.hessians
    assert math.isclose(m.train_gap, float(torch.linalg.matrix_norm(H1 - H2, ord=2)), rel_tol=1e-10)
    assert np.allclose(m.test_gaps, [float(torch.linalg.matrix_norm(H - Ht, ord=2)) for H in (H1, H2)], rtol=1e-10)
    lanczos = hk.eigenvalues(H1 - Ht, k=1, which="magnitude").values.abs().item()
    assert math.isclose(m.test_gaps[0], lanczos, rel_tol=1e-8)
    assert m.test_gap == m.test_gaps.max()
    assert np.allclose(m.gradient_test_gaps, [float((g - m.gradients[-1]).norm()) for g in m.gradients[:2]])
    assert np.allclose(m.hessian_norms, [float(torch.linalg.matrix_norm(H, ord=2)) for H in m.hessians])


# --------------------------------------------------------------------------- the training protocol
def test_every_method_starts_from_the_same_weights_and_records_its_penalty(task):
    runs = compare(task, METHODS, seeds=(0,), **TINY, hidden=8)
    first = {m: rs[0] for m, rs in runs.items()}
    assert first["erm"].evals["test_loss"][0] == first["hgp"].evals["test_loss"][0] == \
        first["hutchinson"].evals["test_loss"][0]
    assert list(first["erm"].eval_steps) == [0, 3, 6]
    for method, run in first.items():
        assert run.ok and run.name == {"erm": "ERM", "hgp": "HGP", "hutchinson": "Hutchinson"}[method]
        assert np.isfinite(run.evals["hessian_gap_test"]).all() and np.isfinite(run.per_step["nll"]).all()
        assert 0 <= final(run) <= 1 and run.extra["final_measures"].test_gap == run.evals["hessian_gap_test"][-1]
        penalised = method != "erm"
        assert np.isfinite(run.per_step["penalty"]).all() == penalised
        assert (run.settings["alpha"] is not None) == penalised
    assert first["hutchinson"].settings["num_probes"] == 300 and first["hgp"].settings["num_probes"] is None
    assert first["erm"].settings["task"]["copies"] == 1


def test_the_penalty_weight_is_annealed_and_the_objective_recorded(task):
    run = train_domains(task, "hgp", steps=6, batch_size=64, eval_every=6, hidden=8, l2=0.0, alpha=2.0, beta=3.0,
                        penalty_weight=50.0, anneal_steps=3, measure=False)
    weights = np.array([1, 1, 1, 50, 50, 50])
    assert np.allclose(run.log.loss, run.per_step["nll"] + weights * run.per_step["penalty"], rtol=1e-5)
    assert np.allclose(run.per_step["penalty"],
                       2.0 * run.per_step["hessian_term"] + 3.0 * run.per_step["gradient_term"], rtol=1e-5)
    assert "hessian_gap_test" not in run.evals


def test_a_switched_off_penalty_trains_exactly_as_erm(task):
    """alpha = beta = 0 and weight 1: the same initial weights and batches give the same run, bit for bit."""
    erm = train_domains(task, "erm", **TINY, hidden=8, measure=False)
    off = train_domains(task, "hgp", **TINY, hidden=8, alpha=0.0, beta=0.0, penalty_weight=1.0, measure=False)
    assert np.array_equal(erm.evals["test_loss"], off.evals["test_loss"])
    assert np.array_equal(erm.per_step["nll"], off.per_step["nll"])
    assert all(torch.equal(a, b) for a, b in zip(erm.extra["model"].parameters(), off.extra["model"].parameters()))


def test_runs_are_reproducible_and_seeds_differ(task):
    a = train_domains(task, "hutchinson", **TINY, hidden=8, num_probes=5, measure=False)
    b = train_domains(task, "hutchinson", **TINY, hidden=8, num_probes=5, measure=False)
    c = train_domains(task, "hutchinson", **TINY, hidden=8, num_probes=5, measure=False, seed=1)
    assert np.array_equal(a.per_step["penalty"], b.per_step["penalty"])
    assert not np.array_equal(a.per_step["penalty"], c.per_step["penalty"])


def test_train_domains_checks_its_arguments(task):
    with pytest.raises(ValueError, match="method: expected one of"):
        train_domains(task, "irm", **TINY)
    with pytest.raises(ValueError, match="steps: expected an integer >= 1"):
        train_domains(task, "erm", steps=0)
