import matplotlib

matplotlib.use("Agg")

import dataclasses  # noqa: E402
import math  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

import hesskit as hk  # noqa: E402
from hesskit.widgets.kfac import (  # noqa: E402
    OPTIMIZERS,
    KFACExplorer,
    batch_order,
    best_run,
    digits_task,
    fisher_block,
    lr_sweep,
    make_optimizer,
    preconditioning_table,
    step_kinds,
    train,
    train_together,
    true_fisher_factors,
)

STEPS = 12
DT = torch.float64



@pytest.fixture(scope="module")
def task():
    return digits_task("mlp", hidden=(8,))


@pytest.fixture(scope="module")
def explorer(task):
    ex = KFACExplorer(task, steps=STEPS, kfac_lr=1e-2, mkor_lr=0.1, batch_size=32, eval_every=4,
                      baseline_lrs={"sgd": 0.1, "adamw": 1e-2})
    ex.show()
    return ex


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
    assert task.x.shape == (1438, 64) and task.x_test.shape == (359, 64)
    assert task.num_params == 64 * 8 + 8 + 8 * 10 + 10
    a, b = batch_order(50, 20, 8, seed=3), batch_order(50, 20, 8, seed=3)
    assert all(torch.equal(p, q) for p, q in zip(a, b)) and len(a) == 20
    assert len(set(torch.cat(a[:6]).tolist())) == 48  # no repeats within an epoch
    with pytest.raises(ValueError, match="batch_size"):
        batch_order(10, 2, 11, seed=0)
    cnn = digits_task("cnn", channels=(2, 3))
    assert cnn.x.shape[1:] == (1, 8, 8) and cnn.model()(cnn.x[:2]).shape == (2, 10)
    for name in ("kfac", "mkor"):  # Conv2d layers are preconditioned too (KFC)
        run = train(cnn, name, 1e-2, steps=3, batch_size=8, factor_every=1, inverse_every=2, eval_every=3)
        assert np.isfinite(run.train_loss).all() and not run.diverged
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
    first = batch_order(len(task.x), 1, 16, seed=5)[0]
    expected = F.cross_entropy(model(task.x[first]), task.y[first]).item()
    for run in runs.values():
        assert run.batch_loss[0] == pytest.approx(expected, rel=1e-6)
        assert run.train_loss[0] == runs["sgd"].train_loss[0] and run.test_accuracy[0] == runs["sgd"].test_accuracy[0]
        assert run.eval_steps.tolist() == [0, 1, 2, 3] and np.isfinite(run.train_loss).all()
        assert (run.step_seconds > 0).all() and (run.step_cpu_seconds >= 0).all()


def test_training_is_deterministic_and_mc_differs(task):
    a = train(task, "kfac", 1e-2, steps=6, batch_size=16, factor_every=2, inverse_every=3, fisher="mc", seed=1)
    b = train(task, "kfac", 1e-2, steps=6, batch_size=16, factor_every=2, inverse_every=3, fisher="mc", seed=1)
    c = train(task, "kfac", 1e-2, steps=6, batch_size=16, factor_every=2, inverse_every=3, seed=1)
    assert np.array_equal(a.batch_loss, b.batch_loss) and np.array_equal(a.train_loss, b.train_loss)
    assert a.batch_loss[0] == c.batch_loss[0] and not np.array_equal(a.batch_loss, c.batch_loss)


def test_interleaved_runs_equal_separate_runs(task):
    configs = [dict(name="kfac", lr=1e-2, factor_every=2), dict(name="adamw", lr=1e-2), dict(name="mkor", lr=0.1)]
    together = train_together(task, configs, steps=7, batch_size=16, eval_every=2)
    for config, run in zip(configs, together):
        alone = train(task, steps=7, batch_size=16, eval_every=2, **config)
        assert run.name == config["name"] and np.array_equal(run.batch_loss, alone.batch_loss)
        assert np.array_equal(run.train_loss, alone.train_loss) and run.settings == alone.settings
    assert together[0].eval_steps.tolist() == [0, 1, 3, 5, 7]
    cpu = together[0].eval_cpu_seconds
    assert cpu[0] == 0 and (np.diff(cpu) >= 0).all() and math.isnan(together[0].seconds_to(-1.0, clock="cpu"))


@pytest.mark.parametrize("name", ["sgd", "kfac"])
def test_divergence_is_reported(task, name):
    """A non-finite loss stops the run: torch's optimizers return it, hesskit's raise FloatingPointError."""
    broken = dataclasses.replace(task, x=torch.full_like(task.x, math.nan))
    run = train(broken, name, 0.1, steps=5, batch_size=16)
    assert run.diverged and math.isnan(run.batch_loss[0]) and np.isnan(run.batch_loss[1:]).all()
    assert run.final_loss == math.inf and math.isnan(run.final_accuracy)


def test_run_statistics(task):
    run = train(task, "kfac", 1e-2, steps=10, batch_size=16, factor_every=2, inverse_every=5, eval_every=2)
    for clock in ("cpu", "wall"):
        assert run.step_time(clock=clock) <= run.step_time(statistic="max", clock=clock)
        assert run.step_time("inverse", clock=clock) >= 0 and run.step_time("factors", clock=clock) >= 0
    assert math.isnan(train(task, "sgd", 0.1, steps=3, batch_size=16).step_time("inverse"))
    with pytest.raises(ValueError, match="clock"):
        run.step_time(clock="gpu")
    reached = run.steps_to(run.train_loss[3])
    assert reached <= run.eval_steps[3] and run.seconds_to(run.train_loss[3]) <= run.eval_seconds[3]
    assert math.isnan(run.steps_to(-1.0)) and math.isnan(run.seconds_to(-1.0))
    with pytest.raises(ValueError, match="steps"):
        train(task, "sgd", 0.1, steps=0)


def test_lr_sweep_and_best_run(task):
    sweep = lr_sweep(task, ["sgd", "adamw"], [1e-3, 0.1], steps=6, batch_size=16)
    for runs in sweep.values():
        assert [r.lr for r in runs] == [1e-3, 0.1]
        assert best_run(runs).final_loss == min(r.final_loss for r in runs)


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


# --------------------------------------------------------------------------- the explorer
@pytest.fixture
def cheap_png(monkeypatch):
    """Skip the PNG encoding in the tests that sweep the controls (render still computes and
    draws the figure, so errors in draw() fail; test_explorer_first_render checks the real PNG)."""
    import hesskit.widgets.explorer as base

    monkeypatch.setattr(base, "figure_output", lambda figure: {"output_type": "display_data", "data": {},
                                                                "metadata": {}})


def _names(result):
    return [r.name for r in result["runs"]]


def _run(result, name):
    return next(r for r in result["runs"] if r.name == name)


def test_explorer_first_render(explorer):
    result = explorer.result
    assert _names(result) == list(OPTIMIZERS)
    assert len({r.train_loss[0] for r in result["runs"]}) == 1  # same initial weights for all
    assert all(len(r.batch_loss) == STEPS and np.isfinite(r.train_loss).all() for r in result["runs"])
    for t in result["timing"].values():
        assert t["median"] <= t["max"] and t["mean"] <= t["max"]
    assert [r.lr for r in result["runs"]] == [1e-2, 0.1, 0.1, 1e-2]
    assert len(explorer.figure.axes) == 5
    labels = [ax.get_xlabel() for ax in explorer.figure.axes]
    assert "training wall-clock time (s)" in labels and "optimizer steps" in labels
    (output,) = explorer.output.outputs
    assert output["data"]["image/png"].startswith("iVBOR")


def test_explorer_lr_sliders(explorer, cheap_png):
    for control, name in (("kfac_lr", "kfac"), ("mkor_lr", "mkor")):
        slider = explorer.controls[control]
        for value in (slider.min, slider.max):
            slider.value = 10.0**value
            run = _run(explorer.result, name)
            assert run.lr == pytest.approx(10.0**value)
            if name == "kfac":  # the KL clip keeps even lr 1 finite
                assert not run.diverged and math.isfinite(run.final_loss)
    baselines = {r.name: r.lr for r in explorer.result["runs"] if r.name in ("sgd", "adamw")}
    assert baselines == {"sgd": 0.1, "adamw": 1e-2}  # the baselines stay at their own lrs
    explorer.controls["kfac_lr"].value = 1e-2


def test_explorer_damping_extremes(explorer, cheap_png):
    slider = explorer.controls["damping"]
    for value in (slider.max, slider.min):
        slider.value = 10.0**value
        run = _run(explorer.result, "kfac")
        assert run.settings["damping"] == pytest.approx(10.0**value)
        assert explorer.result["settings"]["damping"] == pytest.approx(10.0**value)
        if value == slider.max:  # damping 1: V ~ D / damping, tiny steps: barely any progress
            assert run.train_loss[-1] > 0.9 * run.train_loss[0]


def test_explorer_schedules(explorer, cheap_png):
    fe, ie, me = (explorer.controls[k] for k in ("factor_every", "inverse_every", "mkor_every"))
    fe.value, ie.value, me.value = fe.min, ie.min, me.min  # 1: every step is an inverse step
    result = explorer.result
    assert (_run(result, "kfac").kinds == "inverse").all() and (_run(result, "mkor").kinds == "inverse").all()
    assert math.isnan(result["timing"]["kfac"]["plain"]) and result["timing"]["kfac"]["inverse"] > 0
    fe.value, ie.value, me.value = fe.max, ie.max, me.max  # beyond the run: only step 0 refreshes
    kfac, mkor = _run(explorer.result, "kfac"), _run(explorer.result, "mkor")
    assert kfac.kinds[0] == "inverse" and (kfac.kinds[1:] == "plain").all()
    assert mkor.kinds[0] == "inverse" and (mkor.kinds[1:] == "plain").all()
    assert kfac.settings["factor_every"] == fe.max and kfac.settings["inverse_every"] == ie.max
    assert mkor.settings["inverse_every"] == me.max


def test_explorer_mkor_interval_is_its_own(explorer, cheap_png):
    """The K-FAC and MKOR refresh intervals are separate controls."""
    ie, me = explorer.controls["inverse_every"], explorer.controls["mkor_every"]
    ie.value, me.value = 3, 5
    kfac, mkor = _run(explorer.result, "kfac"), _run(explorer.result, "mkor")
    assert list(np.flatnonzero(kfac.kinds == "inverse")) == [0, 3, 6, 9]
    assert list(np.flatnonzero(mkor.kinds == "inverse")) == [0, 5, 10]
    assert kfac.settings["inverse_every"] == 3 and mkor.settings["inverse_every"] == 5


def test_explorer_fisher_options(explorer, cheap_png):
    losses = {}
    for option in ("mc", "empirical"):
        explorer.controls["fisher"].value = option
        run = _run(explorer.result, "kfac")
        assert run.settings["fisher"] == option and explorer.result["settings"]["fisher"] == option
        assert _run(explorer.result, "mkor").settings["fisher"] == option
        losses[option] = run.batch_loss
    assert losses["mc"][0] == losses["empirical"][0] and not np.array_equal(losses["mc"], losses["empirical"])


def test_explorer_show_every_option_and_none(explorer, cheap_png):
    show = explorer.controls["show"]
    for _, name in show.options:
        show.value = (name,)
        assert _names(explorer.result) == [name]
        assert len(explorer.figure.axes) == 5
    show.value = ()
    assert explorer.result["runs"] == [] and explorer.result["timing"] == {}
    show.value = tuple(OPTIMIZERS)
    assert _names(explorer.result) == list(OPTIMIZERS)


def test_explorer_reuses_runs(task, cheap_png):
    run = train(task, "sgd", 0.05, steps=4, batch_size=16, eval_every=2)
    ex = KFACExplorer(task, steps=4, batch_size=16, eval_every=2, baseline_lrs={"sgd": 0.05}, show=("sgd",))
    ex.add_runs([run])
    ex.show()
    assert ex.result["runs"][0] is run


# --------------------------------------------------------------------------- progress
def test_explorer_shows_training_progress(task):
    ex = KFACExplorer(task, steps=8, batch_size=16, eval_every=4, show=("kfac", "mkor"))
    seen = []
    ex.status.observe(lambda change: seen.append(change["new"]), names="value")
    ex.show()  # K-FAC and MKOR trained side by side: 16 steps in all
    bars = [v for v in seen if "<progress" in v]
    assert "training K-FAC, MKOR: step 0/16" in bars[0] and "training K-FAC, MKOR: step 16/16" in bars[-1]
    assert ex.status.value == ""
    seen.clear()
    ex.controls["show"].value = ("kfac",)  # cached: nothing to train
    assert not any("<progress" in v for v in seen)


def test_train_together_reports_the_steps_of_all_runs(task, progress_to):
    import hesskit.widgets.kfac as kfac

    calls = []
    progress_to(lambda done, total, what="": calls.append((done, total)))
    train_together(task, [dict(name="sgd", lr=0.1), dict(name="adamw", lr=1e-2, steps=4)], steps=8, batch_size=16,
                   eval_every=4)
    done = [d for d, _ in calls]
    assert all(total == 12 for _, total in calls) and done == sorted(done) and done[-1] == 12
