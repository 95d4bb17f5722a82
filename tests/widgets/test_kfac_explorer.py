import matplotlib

matplotlib.use("Agg")

# Notebook 08's explorer driven through every control, its reuse of runs trained elsewhere, and the
# training progress it shows. What it computes: tests/experiments/test_kfac.py.

import math  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from hesskit.experiments.kfac import OPTIMIZERS, train  # noqa: E402
from hesskit.widgets.kfac import KFACExplorer  # noqa: E402
from fixtures.kfac import task  # noqa: E402,F401 (pytest fixtures)

STEPS = 12


@pytest.fixture(scope="module")
def explorer(task):
    ex = KFACExplorer(task, steps=STEPS, kfac_lr=1e-2, mkor_lr=0.1, batch_size=32, eval_every=4,
                      baseline_lrs={"sgd": 0.1, "adamw": 1e-2})
    ex.show()
    return ex


# --------------------------------------------------------------------------- the explorer
@pytest.fixture
def cheap_png(monkeypatch):
    """Skip the PNG encoding in the tests that sweep the controls (render still computes and
    draws the figure, so errors in draw() fail; test_explorer_first_render checks the real PNG)."""
    import hesskit.widgets.explorer as base

    monkeypatch.setattr(base, "figure_output", lambda figure: {"output_type": "display_data", "data": {},
                                                                "metadata": {}})


def _names(result):
    return [r.optimizer for r in result["runs"]]


def _run(result, name):
    return next(r for r in result["runs"] if r.optimizer == name)


def test_explorer_first_render(explorer):
    result = explorer.result
    assert _names(result) == list(OPTIMIZERS)
    assert len({r.evals["train_loss"][0] for r in result["runs"]}) == 1  # same initial weights for all
    assert all(len(r.log.loss) == STEPS and np.isfinite(r.evals["train_loss"]).all() for r in result["runs"])
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
    baselines = {r.optimizer: r.lr for r in explorer.result["runs"] if r.optimizer in ("sgd", "adamw")}
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
            assert run.evals["train_loss"][-1] > 0.9 * run.evals["train_loss"][0]


def test_explorer_schedules(explorer, cheap_png):
    fe, ie, me = (explorer.controls[k] for k in ("factor_every", "inverse_every", "mkor_every"))
    fe.value, ie.value, me.value = fe.min, ie.min, me.min  # 1: every step is an inverse step
    result = explorer.result
    assert all((_run(result, name).per_step["kinds"] == "inverse").all() for name in ("kfac", "mkor"))
    assert math.isnan(result["timing"]["kfac"]["plain"]) and result["timing"]["kfac"]["inverse"] > 0
    fe.value, ie.value, me.value = fe.max, ie.max, me.max  # beyond the run: only step 0 refreshes
    kfac, mkor = _run(explorer.result, "kfac"), _run(explorer.result, "mkor")
    for run in (kfac, mkor):
        assert run.per_step["kinds"][0] == "inverse" and (run.per_step["kinds"][1:] == "plain").all()
    assert kfac.settings["factor_every"] == fe.max and kfac.settings["inverse_every"] == ie.max
    assert mkor.settings["inverse_every"] == me.max


def test_explorer_mkor_interval_is_its_own(explorer, cheap_png):
    """The K-FAC and MKOR refresh intervals are separate controls."""
    ie, me = explorer.controls["inverse_every"], explorer.controls["mkor_every"]
    ie.value, me.value = 3, 5
    kfac, mkor = _run(explorer.result, "kfac"), _run(explorer.result, "mkor")
    assert list(np.flatnonzero(kfac.per_step["kinds"] == "inverse")) == [0, 3, 6, 9]
    assert list(np.flatnonzero(mkor.per_step["kinds"] == "inverse")) == [0, 5, 10]
    assert kfac.settings["inverse_every"] == 3 and mkor.settings["inverse_every"] == 5


def test_explorer_fisher_options(explorer, cheap_png):
    losses = {}
    for option in ("mc", "empirical"):
        explorer.controls["fisher"].value = option
        run = _run(explorer.result, "kfac")
        assert run.settings["fisher"] == option and explorer.result["settings"]["fisher"] == option
        assert _run(explorer.result, "mkor").settings["fisher"] == option
        losses[option] = run.log.loss
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
