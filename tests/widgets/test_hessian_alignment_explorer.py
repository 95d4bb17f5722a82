import matplotlib

matplotlib.use("Agg")

# Notebook 16's explorer driven through its controls, its reuse of runs trained elsewhere, and the
# error it shows. What it computes: tests/experiments/test_hessian_alignment.py.

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from hesskit.experiments.hessian_alignment import colored_digits, train_domains  # noqa: E402
from hesskit.widgets import HessianAlignmentExplorer  # noqa: E402

STEPS = 6
SETTINGS = dict(batch_size=64, hidden=8)


@pytest.fixture(scope="module")
def task():
    return colored_digits(seed=0, copies=1)


@pytest.fixture(scope="module")
def explorer(task):
    ex = HessianAlignmentExplorer(task, steps=STEPS, eval_every=3, anneal_steps=3, **SETTINGS)
    ex.show()
    return ex


def test_explorer_first_render(explorer):
    r = explorer.result
    assert r["aligned"].optimizer == "hgp" and r["erm"].optimizer == "erm"
    assert r["aligned"].evals["test_loss"][0] == r["erm"].evals["test_loss"][0]  # same initial weights
    assert set(r["test_accuracy"]) == {"HGP", "ERM"} and all(0 <= v <= 1 for v in r["test_accuracy"].values())
    assert all(np.isfinite(v) for v in r["test_gap"].values())
    assert len(explorer.figure.axes) == 3
    assert explorer.figure.axes[0].get_ylabel() == "accuracy (%)"
    assert explorer.figure.axes[1].get_ylabel() == "spectral norm (exact, float64)"
    (output,) = explorer.output.outputs
    assert output["data"]["image/png"].startswith("iVBOR")
    assert explorer.status.value == ""


def test_explorer_method_toggle_and_weight_extremes(explorer):
    explorer.controls["method"].value = "Hutchinson (diag H)"
    assert explorer.result["aligned"].optimizer == "hutchinson"
    assert explorer.result["aligned"].settings["num_probes"] == 300
    slider = explorer.controls["alpha"]
    for value in (slider.min, slider.max):
        slider.value = 10**value
        assert explorer.result["aligned"].settings["alpha"] == pytest.approx(10**value)
    slider.value = 1.0
    beta = explorer.controls["beta"]
    beta.value = 10**beta.min
    assert explorer.result["aligned"].settings["beta"] == pytest.approx(10**beta.min)
    beta.value = 1.0
    explorer.controls["method"].value = "HGP (H g)"


def test_explorer_schedule_controls(explorer):
    weight, anneal = explorer.controls["penalty_weight"], explorer.controls["anneal_steps"]
    weight.value = 10**weight.min  # weight 1: no switch
    assert explorer.result["aligned"].settings["penalty_weight"] == pytest.approx(1.0)
    anneal.value = anneal.max
    assert explorer.result["aligned"].settings["anneal_steps"] == STEPS
    assert explorer.result["anneal_steps"] == STEPS
    weight.value, anneal.value = 1e4, 3


def test_explorer_reuses_runs_trained_elsewhere(task):
    ex = HessianAlignmentExplorer(task, steps=STEPS, eval_every=3, anneal_steps=3, **SETTINGS)
    runs = [train_domains(task, m, steps=STEPS, eval_every=3, anneal_steps=3, **SETTINGS) for m in ("erm", "hgp")]
    ex.add_runs(runs)
    ex.show()
    assert ex.result["aligned"] is runs[1] and ex.result["erm"] is runs[0]
    ex.add_runs([train_domains(task, "erm", steps=STEPS, eval_every=2, **SETTINGS)])  # other checkpoints: ignored
    assert ex._run("erm") is runs[0]


def test_explorer_shows_an_error_in_its_status_line(task):
    ex = HessianAlignmentExplorer(task, steps=STEPS, eval_every=3, center="median", **SETTINGS)
    with pytest.raises(ValueError, match="center: expected one of"):
        ex.show()
    assert "⚠" in ex.status.value
    assert not any(c.disabled for c in ex.controls.values())


def test_explorer_ignores_runs_with_other_settings(task):
    ex = HessianAlignmentExplorer(task, steps=STEPS, eval_every=3, anneal_steps=3, **SETTINGS)
    other_lr = train_domains(task, "hgp", steps=STEPS, eval_every=3, anneal_steps=3, lr=3e-3, **SETTINGS)
    other_task = train_domains(colored_digits(seed=1, copies=1), "erm", steps=STEPS, eval_every=3, **SETTINGS)
    unmeasured = train_domains(task, "erm", steps=STEPS, eval_every=3, measure=False, **SETTINGS)
    ex.add_runs([other_lr, other_task, unmeasured])
    assert ex._cache == {}
