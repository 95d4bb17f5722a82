import matplotlib

matplotlib.use("Agg")

# Notebook 08's experiments: exact Fisher blocks against their Kronecker approximations, the digits
# task and the shared training protocol (same weights, same batches, interleaved runs), step kinds,
# run statistics, the lr sweep and which layers K-FAC preconditions. The explorer:
# tests/widgets/test_kfac_explorer.py.

import dataclasses  # noqa: E402
import math  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

import hesskit as hk  # noqa: E402
from hesskit.experiments.tasks import digits_task, evaluate  # noqa: E402
from hesskit.experiments.training import batch_order  # noqa: E402
from hesskit.experiments.kfac import (  # noqa: E402
    LABELS,
    OPTIMIZERS,
    fisher_block,
    make_optimizer,
    preconditioning_table,
    run_settings,
    step_kinds,
    train,
    train_together,
    true_fisher_factors,
    tune,
)
from fixtures.kfac import task  # noqa: E402,F401 (pytest fixtures)
DT = torch.float64


# --------------------------------------------------------------------------- Fisher blocks
@pytest.fixture(scope="module")
def small_mlp():
    (x, y), _ = hk.data.digits(flatten=True)
    torch.manual_seed(0)
    return hk.models.MLP(64, (3,), 10).to(DT), x[:32].to(DT), y[:32]


@pytest.mark.parametrize("fisher", ["empirical", "true"])
@pytest.mark.parametrize("layer", ["1", "3"])
def test_one_sample_kronecker_block_is_exact_and_many_are_not(small_mlp, fisher, layer):
    model, x, y = small_mlp
    one = fisher_block(model, x[:1], y[:1], layer, fisher)
    assert one.exact.shape == one.kronecker.shape and one.exact.shape[0] == one.factor.num_params
    assert one.relative_error < 1e-12
    many = fisher_block(model, x, y, layer, fisher)
    assert 1e-3 < many.relative_error < 1.0
    assert not many.exact.requires_grad and torch.allclose(many.exact, many.exact.T, atol=1e-14)


def test_identical_inputs_make_the_kronecker_block_exact(small_mlp):
    model, x, _ = small_mlp
    block = fisher_block(model, x[:1].repeat(6, 1), torch.arange(6), "1", "empirical")
    assert block.relative_error < 1e-12


def test_true_fisher_factors_are_the_exact_label_expectation():
    """Softmax regression: A = mean a_bar a_bar^T and G = mean_n (diag p_n - p_n p_n^T) exactly,
    and the mean of many fisher='mc' draws approaches them."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4)).to(DT)
    x = torch.randn(5, 3, generator=torch.Generator().manual_seed(1), dtype=DT)
    f = true_fisher_factors(model, x)["0"]
    abar = torch.cat([x, torch.ones(5, 1, dtype=DT)], dim=1)
    with torch.no_grad():
        p = torch.softmax(model(x), dim=1)
    G = (torch.diag_embed(p) - p[:, :, None] * p[:, None, :]).mean(0)
    assert torch.allclose(f.A, abar.T @ abar / 5, atol=1e-13) and torch.allclose(f.G, G, atol=1e-13)
    draws = torch.stack([hk.kfac_factors(model, nn.CrossEntropyLoss(), (x, torch.zeros(5, dtype=torch.long)),
                                         fisher="mc", seed=s)["0"].G for s in range(400)])
    se = draws.std(0) / math.sqrt(len(draws)) + 1e-12
    assert ((draws.mean(0) - G).abs() <= 5 * se).all()


def test_fisher_block_rejects_bad_arguments(small_mlp):
    model, x, y = small_mlp
    with pytest.raises(ValueError, match="fisher"):
        fisher_block(model, x, y, "1", "mc")
    with pytest.raises(ValueError, match="layer"):
        fisher_block(model, x, y, "7")


# --------------------------------------------------------------------------- the protocol
def test_task_and_batch_order(task):
    assert task.train[0].shape == (1438, 64) and task.test[0].shape == (359, 64)
    assert task.num_params() == 64 * 8 + 8 + 8 * 10 + 10
    a, b = batch_order(50, 20, 8, seed=3), batch_order(50, 20, 8, seed=3)
    assert all(torch.equal(p, q) for p, q in zip(a, b)) and len(a) == 20
    assert len(set(torch.cat(a[:6]).tolist())) == 48  # no repeats within an epoch
    with pytest.raises(ValueError, match="batch_size"):
        batch_order(10, 2, 11, seed=0)
    cnn = digits_task("cnn", channels=(2, 3))
    assert cnn.train[0].shape[1:] == (1, 8, 8) and cnn.model()(cnn.train[0][:2]).shape == (2, 10)
    for name in ("kfac", "mkor"):  # Conv2d layers are preconditioned too (KFC)
        run = train(cnn, name, 1e-2, steps=3, batch_size=8, factor_every=1, inverse_every=2, eval_every=3)
        assert np.isfinite(run.evals["train_loss"]).all() and not run.diverged
    with pytest.raises(ValueError, match="architecture"):
        digits_task("rnn")


def test_make_optimizer_types_and_unknown_name(task):
    model = task.model()
    kinds = {"kfac": hk.optim.KFAC, "mkor": hk.optim.MKOR, "sgd": torch.optim.SGD, "adamw": torch.optim.AdamW}
    for name, cls in kinds.items():
        assert isinstance(make_optimizer(name, model, 0.1), cls)
    with pytest.raises(ValueError, match="optimizer"):
        make_optimizer("lbfgs", model, 0.1)


def test_step_kinds_follow_the_schedules():
    assert (step_kinds("kfac", 101) == "inverse").sum() == 2 and (step_kinds("mkor", 21) == "inverse").sum() == 3
    kfac = step_kinds("kfac", 20, factor_every=5, inverse_every=10)
    assert list(np.flatnonzero(kfac == "inverse")) == [0, 10]
    assert list(np.flatnonzero(kfac == "factors")) == [5, 15]
    assert (kfac == "plain").sum() == 16
    assert list(np.flatnonzero(step_kinds("mkor", 20, inverse_every=7) == "inverse")) == [0, 7, 14]
    assert (step_kinds("adamw", 20) == "plain").all()


def test_every_optimizer_starts_from_the_same_weights_and_batches(task):
    runs = {name: train(task, name, 1e-2, steps=3, batch_size=16, seed=5, eval_every=1) for name in OPTIMIZERS}
    model = task.model(5)
    (x, y) = task.train
    first = batch_order(len(x), 1, 16, seed=5)[0]
    expected = F.cross_entropy(model(x[first]), y[first]).item()
    for run in runs.values():
        assert run.log.loss[0] == pytest.approx(expected, rel=1e-6)
        assert run.evals["train_loss"][0] == runs["sgd"].evals["train_loss"][0]
        assert run.evals["test_accuracy"][0] == runs["sgd"].evals["test_accuracy"][0]
        assert run.eval_steps.tolist() == [0, 1, 2, 3] and np.isfinite(run.evals["train_loss"]).all()
        assert (run.log.seconds > 0).all() and (run.log.cpu_seconds >= 0).all()
        assert run.name == LABELS[run.optimizer] and run.label == f"{LABELS[run.optimizer]} (lr 0.01)"


def test_training_is_deterministic_and_mc_differs(task):
    a = train(task, "kfac", 1e-2, steps=6, batch_size=16, factor_every=2, inverse_every=3, fisher="mc", seed=1)
    b = train(task, "kfac", 1e-2, steps=6, batch_size=16, factor_every=2, inverse_every=3, fisher="mc", seed=1)
    c = train(task, "kfac", 1e-2, steps=6, batch_size=16, factor_every=2, inverse_every=3, seed=1)
    assert np.array_equal(a.log.loss, b.log.loss) and np.array_equal(a.evals["train_loss"], b.evals["train_loss"])
    assert a.log.loss[0] == c.log.loss[0] and not np.array_equal(a.log.loss, c.log.loss)


def test_interleaved_runs_equal_separate_runs(task):
    configs = [dict(name="kfac", lr=1e-2, factor_every=2), dict(name="adamw", lr=1e-2), dict(name="mkor", lr=0.1)]
    together = train_together(task, configs, steps=7, batch_size=16, eval_every=2)
    for config, run in zip(configs, together):
        alone = train(task, steps=7, batch_size=16, eval_every=2, **config)
        assert run.optimizer == config["name"] and np.array_equal(run.log.loss, alone.log.loss)
        assert np.array_equal(run.evals["train_loss"], alone.evals["train_loss"]) and run.settings == alone.settings
    assert together[0].eval_steps.tolist() == [0, 1, 3, 5, 7]
    cpu = together[0].eval_seconds("cpu")
    assert cpu[0] == 0 and (np.diff(cpu) >= 0).all() and math.isnan(together[0].seconds_to(-1.0, clock="cpu"))


def test_run_settings_and_evaluation(task):
    run = train(task, "mkor", 0.1, steps=3, batch_size=16, eval_every=2)
    assert run.settings == run_settings("mkor", steps=3, batch_size=16, eval_every=2)
    assert run.settings["inverse_every"] == 10 and run_settings("sgd") == dict(batch_size=64, seed=0, steps=300,
                                                                                 eval_every=10)
    model = task.model(0)
    on_train = task.evaluate(model, task.train, chunk=100)  # in chunks: the same numbers
    assert on_train.loss == pytest.approx(F.cross_entropy(model(task.train[0]), task.train[1]).item(), rel=1e-6)
    test, scored = task.evaluate(model, task.test, chunk=100), evaluate(model, task.test)
    assert test.loss == pytest.approx(scored.loss, rel=1e-6) and test.accuracy == scored.accuracy
    assert run.evals["train_loss"][0] == task.evaluate(model, task.train, chunk=128).loss


@pytest.mark.parametrize("name", ["sgd", "kfac"])
def test_divergence_is_reported(task, name):
    """A non-finite loss stops the run: torch's optimizers return it, hesskit's raise FloatingPointError."""
    x, y = task.train
    broken = dataclasses.replace(task, train=(torch.full_like(x, math.nan), y))
    run = train(broken, name, 0.1, steps=5, batch_size=16)
    assert run.diverged and math.isnan(run.log.loss[0]) and np.isnan(run.log.loss[1:]).all()
    assert run.final_loss == math.inf and math.isnan(run.final("test_accuracy"))


def test_run_statistics(task):
    run = train(task, "kfac", 1e-2, steps=10, batch_size=16, factor_every=2, inverse_every=5, eval_every=2)
    for clock in ("cpu", "wall"):
        assert run.step_time(clock=clock) <= run.step_time(statistic="max", clock=clock)
        assert run.step_time("inverse", clock=clock) >= 0 and run.step_time("factors", clock=clock) >= 0
    assert math.isnan(train(task, "sgd", 0.1, steps=3, batch_size=16).step_time("inverse", clock="cpu"))
    with pytest.raises(ValueError, match="clock"):
        run.step_time(clock="gpu")
    train_loss = run.evals["train_loss"]
    reached = run.steps_to(train_loss[3])
    assert reached <= run.eval_steps[3] and run.seconds_to(train_loss[3]) <= run.eval_seconds()[3]
    assert math.isnan(run.steps_to(-1.0)) and math.isnan(run.seconds_to(-1.0))
    with pytest.raises(ValueError, match="steps"):
        train(task, "sgd", 0.1, steps=0)


def test_tune_and_best_run(task):
    tuning = tune(task, ["sgd", "adamw"], [1e-3, 0.1], steps=6, batch_size=16)
    for name, runs in tuning.runs.items():
        assert [r.lr for r in runs] == [1e-3, 0.1]
        assert tuning.best(name) is min(runs, key=lambda r: r.final_loss)  # the first of equals
    alone = tuning.train("sgd", 0.1)  # trained alone, the run equals the interleaved one
    np.testing.assert_array_equal(alone.evals["train_loss"], tuning.runs["sgd"][1].evals["train_loss"])
    np.testing.assert_array_equal(alone.log.loss, tuning.runs["sgd"][1].log.loss)


def test_preconditioning_table_on_a_transformer():
    torch.manual_seed(0)
    gpt = hk.models.CharTransformerLM(vocab=7, dim=8, blocks=1, heads=2, max_length=6)
    rows = {r["module"]: r for r in preconditioning_table(gpt)}
    assert sum(r["params"] for r in rows.values()) == sum(p.numel() for p in gpt.parameters())
    for name in ("position", "blocks.0.norm1", "blocks.0.norm2", "norm_out"):
        assert rows[name]["step"].startswith("fallback SGD")
    for name in ("blocks.0.attn.qkv", "blocks.0.attn.out", "blocks.0.mlp.0", "blocks.0.mlp.2", "head"):
        assert rows[name]["step"] == "K-FAC" and rows[name]["type"] == "Linear"
    assert rows["embed"]["step"] == "K-FAC"  # the linear layer of one-hot inputs: a diagonal A
    assert rows["embed"]["type"] == "Embedding" and rows["blocks.0.norm1"]["type"] == "LayerNorm"
    with pytest.warns(UserWarning, match="fallback step"):
        opt = hk.optim.KFAC(gpt)
    assert sorted(opt.fallback_layers) == sorted(n for n, r in rows.items() if r["step"] != "K-FAC")


# --------------------------------------------------------------------------- progress
def test_train_together_reports_the_steps_of_all_runs(task, progress_to):
    calls = []
    progress_to(lambda done, total, what="": calls.append((done, total)))
    train_together(task, [dict(name="sgd", lr=0.1), dict(name="adamw", lr=1e-2, steps=4)], steps=8, batch_size=16,
                   eval_every=4)
    done = [d for d, _ in calls]
    assert all(total == 12 for _, total in calls) and done == sorted(done) and done[-1] == 12
