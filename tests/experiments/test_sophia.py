import matplotlib

matplotlib.use("Agg")

# Notebook 07's experiments: the character task, the shared training protocol, the lr sweep, the
# step costs timed in turns, the reference optimizers (sign momentum, the official SophiaG) against
# hesskit's Sophia. The explorer: tests/widgets/test_sophia_explorer.py.

import math  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

import hesskit as hk  # noqa: E402
from hesskit.optim import step_seed  # noqa: E402
from hesskit.experiments.tasks import unigram_entropy  # noqa: E402
from hesskit.experiments.training import batch_order  # noqa: E402
from hesskit.experiments.sophia import (  # noqa: E402
    OfficialSophiaG,
    SignMomentum,
    final_test_loss,
    make_optimizer,
    seeded_label_loss,
    step_cost,
    step_cost_rounds,
    train_lm,
    tune,
)
from fixtures.sophia import STEPS, task  # noqa: E402,F401 (pytest fixtures)


# --------------------------------------------------------------------------- the task and the protocol
def test_task_shapes_and_unigram_entropy(task):
    x, y = task.train
    assert x.shape == y.shape and x.shape[1] == 16
    assert torch.equal(x[:, 1:], y[:, :-1])  # y is x shifted by one character
    assert torch.equal(x[1, :8], x[0, 8:])  # windows start stride = 8 characters apart
    assert len(task.test[0]) > 0
    logits = task.model(0)(x[:3])
    assert logits.shape == (3, 16, len(task.vocab))
    assert 0 < unigram_entropy(task) < math.log(len(task.vocab))


def test_batch_order_is_seeded_and_covers_the_data():
    a, b = batch_order(50, 20, 8, seed=3), batch_order(50, 20, 8, seed=3)
    assert all(torch.equal(p, q) for p, q in zip(a, b)) and len(a) == 20
    assert all(len(idx) == 8 for idx in a)
    first_epoch = torch.cat(a[:6])  # 6 batches of 8 fit in 50 windows: no repeats within an epoch
    assert len(set(first_epoch.tolist())) == 48
    assert not all(torch.equal(p, q) for p, q in zip(a, batch_order(50, 20, 8, seed=4)))


def test_every_optimizer_starts_from_the_same_weights_and_sees_the_same_batches(task):
    runs = {name: train_lm(task, name, 1e-2, steps=3, batch_size=8, seed=5)
            for name in ("adamw", "sophia-g", "sophia-h", "sign", "sophia-g-official")}
    initial = {r.evals["test_loss"][0] for r in runs.values()}
    first_batch = {r.log.loss[0] for r in runs.values()}
    assert len(initial) == 1 and len(first_batch) == 1  # same init, same first batch
    assert np.isnan(runs["adamw"].per_step["win_rate"]).all()
    assert np.isfinite(runs["sophia-g"].per_step["win_rate"]).all()


def test_training_is_deterministic(task):
    a = train_lm(task, "sophia-g", 1e-2, steps=6, batch_size=8, update_every=2, seed=1)
    b = train_lm(task, "sophia-g", 1e-2, steps=6, batch_size=8, update_every=2, seed=1)
    np.testing.assert_array_equal(a.evals["test_loss"], b.evals["test_loss"])
    np.testing.assert_array_equal(a.per_step["win_rate"], b.per_step["win_rate"])


def test_run_bookkeeping(task):
    run = train_lm(task, "adamw", 3e-3, steps=25, batch_size=8, eval_every=10)
    np.testing.assert_array_equal(run.eval_steps, [0, 10, 20, 25])
    assert np.all(np.diff(run.eval_seconds()) > 0) and run.eval_seconds()[0] == 0
    test_loss = run.evals["test_loss"]
    assert test_loss[-1] < test_loss[0]  # it learns
    target = float(test_loss[2])
    assert run.steps_to(target, "test_loss") <= 20
    assert math.isnan(run.steps_to(-1.0, "test_loss")) and math.isnan(run.seconds_to(-1.0, "test_loss"))
    assert final_test_loss(run) == pytest.approx(test_loss[-3:].mean())
    assert run.settings == dict(gamma=None, update_every=10, weight_decay=0.1, bias_correction=True, batch_size=8,
                                seed=0, steps=25, eval_every=10)
    assert run.optimizer == "adamw" and run.name == "AdamW"
    with pytest.raises(ValueError, match="steps"):
        train_lm(task, "adamw", 1e-3, steps=0)
    with pytest.raises(ValueError, match="optimizer"):
        train_lm(task, "lion", 1e-3, steps=2)


def test_tune_and_best_run(task):
    tuning = tune(task, ["adamw"], [1e-2, 1e-4], steps=STEPS, batch_size=8, eval_every=4)
    runs = tuning.runs["adamw"]
    assert [r.lr for r in runs] == [1e-4, 1e-2]  # the grid in increasing order
    best = tuning.best("adamw")  # the notebook's pick: the lowest final held-out loss
    assert best is runs[1] and final_test_loss(runs[1]) < final_test_loss(runs[0])  # 12 steps at lr 1e-4 barely move
    np.testing.assert_array_equal(tuning.final_losses("adamw"), [final_test_loss(r) for r in runs])
    again = tuning.train("adamw", 1e-2)  # one more run with the same setup
    np.testing.assert_array_equal(again.evals["test_loss"], runs[1].evals["test_loss"])


@pytest.mark.parametrize("name", ["adamw", "sophia-g", "sophia-h"])
def test_divergence_is_caught(task, name, monkeypatch):
    fresh = task.model

    def poisoned(seed=0):
        model = fresh(seed)
        with torch.no_grad():
            model.head.bias.fill_(float("nan"))
        return model

    monkeypatch.setattr(task, "model", poisoned)
    run = train_lm(task, name, 1e-3, steps=4, batch_size=8)
    assert run.diverged and final_test_loss(run) == math.inf and np.isnan(run.log.loss).all()
    assert run.log.seconds[0] > 0 and np.isnan(run.log.seconds[1:]).all()  # steps not taken: no time
    assert run.log.steps_taken == 1


def test_step_cost_times_every_optimizer_in_turns(task):
    cost = step_cost(task, {"adamw": 1e-3, "sophia-g": 1e-3, "sophia-h": 1e-3, "sign": 1e-3}, blocks=2, block=3,
                     batch_size=8)
    assert set(cost) == {"adamw", "sophia-g", "sophia-h", "sign"}
    assert all(0 < c < 1 for c in cost.values())
    with pytest.raises(ValueError, match="blocks"):
        step_cost(task, {"adamw": 1e-3}, blocks=0)
    with pytest.raises(ValueError, match="official"):
        step_cost(task, {"sophia-g-official": 1e-3}, blocks=1, block=1)


# --------------------------------------------------------------------------- optimizers
def quadratic(opt_params, target):
    return 0.5 * ((opt_params - target) ** 2).sum()


def test_sign_momentum_moves_every_coordinate_by_lr():
    x = torch.nn.Parameter(torch.tensor([1.0, -2.0, 0.5]))
    opt = SignMomentum([x], lr=0.1, weight_decay=0.0)
    x.grad = torch.tensor([3.0, -1e-6, 0.0])
    opt.step()
    torch.testing.assert_close(x.detach(), torch.tensor([0.9, -1.9, 0.5]))


def test_official_sophiag_first_step_is_a_sign_step_then_a_clipped_newton_step():
    torch.manual_seed(0)
    x = torch.nn.Parameter(torch.randn(6, dtype=torch.float64))
    lr, rho, bs = 0.01, 0.05, 4
    opt = OfficialSophiaG([x], lr=lr, rho=rho, weight_decay=0.0)
    start = x.detach().clone()
    x.grad = torch.tensor([1e-6, -1e-6, 2.0, -3.0, 1e-3, 5.0], dtype=torch.float64)
    opt.step(bs=bs)
    torch.testing.assert_close((x.detach() - start).abs(), torch.full((6,), lr, dtype=torch.float64))
    assert opt.win_rate == 0.0
    # one Hessian refresh, then the official rule: lr sign(m) min(|m| / (rho bs h), 1)
    g_hat = torch.tensor([1.0, 1.0, 0.1, 0.1, 1.0, 0.1], dtype=torch.float64)
    x.grad = g_hat.clone()
    opt.update_hessian()
    h = 0.01 * g_hat**2
    before = x.detach().clone()
    g = torch.tensor([1e-6, -1e-6, 2.0, -3.0, 1e-3, 5.0], dtype=torch.float64)
    x.grad = g.clone()
    opt.step(bs=bs)
    m = 0.965 * (0.035 * g) + 0.035 * g
    expected = before - lr * m.sign() * (m.abs() / (rho * bs * h + 1e-15)).clamp(max=1)
    torch.testing.assert_close(x.detach(), expected, rtol=1e-14, atol=0)
    assert opt.win_rate == pytest.approx(float(((m.abs() / (rho * bs * h)) < 1).double().mean()))


def test_official_rule_equals_hesskit_without_bias_correction_after_the_same_refresh():
    """rho * bs * EMA(g_hat^2) = gamma * EMA(B g_hat^2): the same step once both hold the same h."""
    torch.manual_seed(0)
    g_hat = torch.randn(5, dtype=torch.float64)
    g = torch.randn(5, dtype=torch.float64)
    bs = 7
    a = torch.nn.Parameter(torch.zeros(5, dtype=torch.float64))
    b = torch.nn.Parameter(torch.zeros(5, dtype=torch.float64))
    official = OfficialSophiaG([a], lr=0.1, rho=0.3, weight_decay=0.0)
    a.grad = g_hat.clone()
    official.update_hessian()
    a.grad = g.clone()
    official.step(bs=bs)
    ours = hk.optim.Sophia([b], lr=0.1, gamma=0.3, weight_decay=0.0, bias_correction=False)
    ours.state[b].update(step=torch.zeros((), dtype=torch.float64), refreshes=torch.ones((), dtype=torch.float64),
                         exp_avg=torch.zeros(5, dtype=torch.float64), hessian=0.01 * bs * g_hat**2)
    ours.update_every = 10**9  # no fresh estimate on the next step: use the h set above
    ours.state[b]["step"] += 1  # step 2 is not a refresh step

    def closure():
        ours.zero_grad()
        return (g * b).sum()  # gradient g

    ours.step(closure)
    torch.testing.assert_close(b.detach(), a.detach(), rtol=1e-13, atol=1e-16)


def test_sampled_labels_match_hesskit_gnb(task):
    model = task.model(0).double()
    params = list(model.parameters())
    logits = model(task.train[0][:4])
    g = torch.autograd.grad(seeded_label_loss(logits, seed=11), params, retain_graph=True)
    ours = torch.cat([(logits[..., 0].numel() * t**2).reshape(-1) for t in g])
    theirs = hk.gauss_newton_bartlett(logits, params, num_samples=1, seed=11).value
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=0)


def test_make_optimizer_defaults():
    p = [torch.nn.Parameter(torch.ones(2))]
    assert make_optimizer("sophia-g", p, 1e-3).param_groups[0]["gamma"] == 0.05
    assert make_optimizer("sophia-h", p, 1e-3).param_groups[0]["gamma"] == 0.01
    assert make_optimizer("sophia-g-official", p, 1e-3).param_groups[0]["rho"] == 0.05
    assert isinstance(make_optimizer("adamw", p, 1e-3), torch.optim.AdamW)
    assert step_seed(0, 1) != step_seed(0, 2)


def test_sophia_g_curvature_is_never_negative_sophia_h_can_be(task):
    g = train_lm(task, "sophia-g", 1e-2, steps=STEPS, batch_size=8, update_every=3)
    h = train_lm(task, "sophia-h", 1e-2, steps=STEPS, batch_size=8, update_every=3)
    assert g.extra["negative_h"] == 0.0 and h.extra["negative_h"] > 0.0
    assert g.extra["refreshes"] == h.extra["refreshes"] == 4  # steps 1, 4, 7, 10
    official = train_lm(task, "sophia-g-official", 1e-2, steps=STEPS, batch_size=8, update_every=5)
    assert official.extra["refreshes"] == 2  # after steps 5 and 10
    assert (official.per_step["win_rate"][:5] == 0).all()  # pure sign steps before the first refresh


# --------------------------------------------------------------------------- progress
def test_train_lm_reports_every_step(task, progress_to):
    calls = []
    progress_to(lambda done, total, what="": calls.append((done, total, what)))
    train_lm(task, "sophia-h", 1e-2, steps=5, batch_size=8)
    assert calls == [(t, 5, "Sophia-H step") for t in range(1, 6)]


def test_step_cost_rounds_are_paired_and_clock_is_checked(task):
    rounds = step_cost_rounds(task, {"adamw": 1e-3, "sophia-g": 1e-3}, blocks=3, block=2, batch_size=8)
    assert set(rounds) == {"adamw", "sophia-g"} and all(r.shape == (3,) and (r > 0).all() for r in rounds.values())
    wall = step_cost(task, {"adamw": 1e-3}, blocks=2, block=2, batch_size=8, clock="wall")
    assert 0 < wall["adamw"] < 1
    with pytest.raises(ValueError, match="clock"):
        step_cost_rounds(task, {"adamw": 1e-3}, blocks=1, block=1, clock="gpu")
