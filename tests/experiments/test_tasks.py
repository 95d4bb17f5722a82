"""`hesskit.experiments.tasks`: the classifier trainer and the one scoring rule."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import hesskit as hk
from hesskit.experiments.tasks import (Metrics, char_lm_task, digits_mlp, digits_task, evaluate, fit_classifier,
                                      unigram_entropy)


@pytest.fixture(scope="module")
def digits():
    return hk.data.digits(flatten=True, seed=0)


def hand_loop(model, x, y, steps, lr, batch_size, seed):
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(0, len(y), (batch_size,), generator=gen) if batch_size else slice(None)
        opt.zero_grad()
        F.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()
    return model


@pytest.mark.parametrize("batch_size", [None, 32])
def test_fit_classifier_is_the_plain_loop(digits, batch_size):
    (x, y), _ = digits
    ours = fit_classifier(digits_mlp((8,), seed=3), (x, y), 5, 1e-2, batch_size=batch_size, seed=7)
    reference = hand_loop(digits_mlp((8,), seed=3), x, y, 5, 1e-2, batch_size, seed=7)
    for p, q in zip(ours.parameters(), reference.parameters()):
        assert torch.equal(p, q)
    assert all(p.grad is None for p in ours.parameters())
    with pytest.raises(ValueError, match="optimizer"):
        fit_classifier(ours, (x, y), 1, 1e-2, optimizer="sgd")
    with pytest.raises(ValueError, match="steps"):
        fit_classifier(ours, (x, y), -1, 1e-2)


def test_digits_mlp_is_seeded():
    a, b = digits_mlp((4,), seed=1), digits_mlp((4,), seed=1)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert digits_mlp((4,), dtype=torch.float64)[1].weight.dtype == torch.float64


def test_evaluate_scores_in_eval_mode_and_restores_modes(digits):
    _, (x, y) = digits
    model = nn.Sequential(nn.Linear(64, 10), nn.Dropout(0.5))
    model.train()
    model[1].eval()
    metrics = evaluate(model, (x, y))
    assert model.training and not model[1].training  # every module's own mode restored
    with torch.no_grad():
        logits = model[0](x)
    assert metrics.loss == pytest.approx(F.cross_entropy(logits, y).item(), rel=1e-6)
    assert metrics.accuracy == (logits.argmax(1) == y).double().mean().item()
    assert metrics.percent == 100 * metrics.accuracy and metrics.bits_per_char == metrics.loss / math.log(2)


def test_evaluate_takes_dict_inputs_and_sequences():
    class Tagger(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(5, 3)

        def forward(self, input_ids):
            return self.embed(input_ids)

    ids = torch.tensor([[0, 1, 2], [2, 1, 0]])
    model = Tagger()
    metrics = evaluate(model, ({"input_ids": ids}, ids))
    logits = model.embed(ids).flatten(0, 1)
    assert isinstance(metrics, Metrics)
    assert metrics.loss == pytest.approx(F.cross_entropy(logits, ids.flatten()).item())
    assert metrics.accuracy == (logits.argmax(1) == ids.flatten()).double().mean().item()


# --------------------------------------------------------------------------- the optimizer comparisons' Task
def test_digits_task_architectures_and_evaluation_subset():
    mlp = digits_task("mlp", hidden=(8,))
    assert mlp.train[0].shape == (1438, 64) and mlp.test[0].shape == (359, 64)
    assert all(torch.equal(a, b) for a, b in zip(mlp.train_eval, mlp.train))  # eval_size None: all of them
    assert mlp.num_params() == 64 * 8 + 8 + 8 * 10 + 10 and mlp.name == "digits, MLP(8,)"
    cnn = digits_task("cnn", channels=(2, 3), eval_size=100)
    assert cnn.train[0].shape[1:] == (1, 8, 8) and cnn.model(0)(cnn.train[0][:2]).shape == (2, 10)
    assert torch.equal(cnn.train_eval[0], cnn.train[0][:100]) and cnn.metric == "accuracy" and cnn.higher_is_better
    a, b = cnn.model(4), cnn.model(4)  # seeded: the same weights for every optimizer
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    with pytest.raises(ValueError, match="architecture"):
        digits_task("rnn")


def test_task_evaluate_and_score_follow_evaluate():
    task = digits_task("mlp", hidden=(8,))
    model = task.model(0)
    m = task.evaluate(model, task.test)
    assert m == evaluate(model, task.test) and task.evaluate(model, task.test, chunk=100).accuracy == m.accuracy
    assert task.score(model, task.test) == (m.loss, m.percent)
    x, y = task.test
    right = (model(x).argmax(-1) == y).float().mean().item()
    float32 = dataclasses.replace(task, accuracy_dtype=torch.float32)
    assert float32.score(model, task.test)[1] == 100.0 * right
    loss, logits = task.loss(model(x[:5]), y[:5])
    assert logits.shape == (5, 10) and loss.item() == pytest.approx(F.cross_entropy(model(x[:5]), y[:5]).item())


def test_char_lm_task_windows_metric_and_unigram_entropy():
    task = char_lm_task(num_chars=3_000, length=8, dim=8, heads=2, stride=4, eval_windows=16)
    (x, y), (x_test, _) = task.train, task.test
    assert torch.equal(x[:, 1:], y[:, :-1]) and torch.equal(x[1, :4], x[0, 4:]) and len(x_test) > 0
    assert len(task.train_eval[0]) == 16 and task.metric == "bits/char" and not task.higher_is_better
    assert task.model(0)(x[:3]).shape == (3, 8, len(task.vocab)) and len(task.vocab) == 26
    model = task.model(0)
    loss, bits = task.score(model, task.test)
    assert bits == loss / math.log(2)
    assert 0 < unigram_entropy(task) < math.log(len(task.vocab))
    with pytest.raises(ValueError, match="metric"):
        dataclasses.replace(task, metric="f1")
