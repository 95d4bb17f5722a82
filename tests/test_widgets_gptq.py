import matplotlib

matplotlib.use("Agg")

# Notebook 14's GPTQ explorer, driven through every control's extremes, and the experiment functions
# behind it (GPTQ vs round-to-nearest, layer-wise errors, sweeps), checked against direct computations.

import copy  # noqa: E402
import math  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from hesskit.quant.gptq import gptq, round_to_nearest  # noqa: E402
from hesskit.widgets.gptq import (  # noqa: E402
    GPTQExplorer,
    digits_task,
    evaluate,
    gptq_sweep,
    gptq_vs_rtn,
    layer_errors,
)

LAYERS = ["1", "3", "5"]


@pytest.fixture(scope="module")
def task():
    return digits_task(seed=0, steps=300)


def test_digits_task_is_seeded_and_trained(task):
    again = digits_task(seed=0, steps=300)
    assert all(torch.equal(a, b) for a, b in zip(task.model.parameters(), again.model.parameters()))
    assert not task.model.training and [m.weight.shape[1] for m in (task.model[1], task.model[3])] == [64, 128]
    accuracy, loss = evaluate(task.model, task.test)
    assert accuracy > 90 and loss < 0.5
    assert task.calibration(16).shape == (16, 64) and torch.equal(task.calibration(16), task.train[0][:16])
    with pytest.raises(ValueError, match="num_samples"):
        task.calibration(0)
    with pytest.raises(ValueError, match="num_samples"):
        task.calibration(len(task.train[0]) + 1)
    with pytest.raises(ValueError, match="steps"):
        digits_task(steps=-1)


def test_evaluate_and_layer_errors_against_direct_computation(task):
    x, y = task.test
    model = copy.deepcopy(task.model).train()
    accuracy, loss = evaluate(model, task.test)
    assert model.training  # the mode is restored
    with torch.no_grad():
        logits = task.model(x)
    assert accuracy == pytest.approx(100 * (logits.argmax(1) == y).float().mean().item())
    assert loss == pytest.approx(nn.functional.cross_entropy(logits, y).item())

    assert layer_errors(task.model, copy.deepcopy(task.model), x) == {n: 0.0 for n in LAYERS}
    q = round_to_nearest(task.model, 3)
    errors = layer_errors(task.model, q, x)
    with torch.no_grad():  # the last layer's input in the quantized model, by hand
        h = torch.relu(q[3](torch.relu(q[1](x)))).double()
    W, Q = task.model[5].weight.double(), q[5].weight.double()
    expected = ((h @ (W - Q).T).pow(2).sum() / (h @ W.T).pow(2).sum()).item()
    assert errors["5"] == pytest.approx(expected, rel=1e-10)
    with pytest.raises(ValueError, match="quantized"):
        layer_errors(task.model, nn.Sequential(nn.Linear(64, 10)), x)


def test_gptq_beats_rtn_layer_by_layer(task):
    calib = task.calibration(128)
    c = gptq_vs_rtn(task.model, calib, task.test, (2, 8), symmetric=True)
    assert c.bits == [2, 8] and len(c.rtn_accuracy) == len(c.gptq_loss) == len(c.seconds) == 2
    assert (c.float_accuracy, c.float_loss) == evaluate(task.model, task.test)
    assert (c.gptq_accuracy[0], c.gptq_loss[0]) == evaluate(gptq(task.model, calib, 2, symmetric=True), task.test)
    assert (c.rtn_accuracy[0], c.rtn_loss[0]) == evaluate(round_to_nearest(task.model, 2, symmetric=True), task.test)
    for n in LAYERS:  # GPTQ's objective, on held-out inputs, at 2 bits
        assert c.gptq_errors[0][n] < 0.5 * c.rtn_errors[0][n]
    assert c.gptq_loss[0] < c.rtn_loss[0]
    assert abs(c.gptq_accuracy[1] - c.float_accuracy) < 1.5 and abs(c.rtn_accuracy[1] - c.float_accuracy) < 1.5
    with pytest.raises(ValueError, match="bits_list"):
        gptq_vs_rtn(task.model, calib, task.test, [])


def test_sweeps_record_failures_and_reject_bad_options(task):
    calib = task.calibration(64)
    s = gptq_sweep(task.model, calib, task.test, 3, "damping", [0.0, 0.01])
    assert math.isnan(s.accuracy[0]) and s.errors[0] == {} and "raise damping" in s.failures[0]
    assert 1 not in s.failures and set(s.errors[1]) == set(LAYERS) and s.accuracy[1] > 80
    assert math.isnan(s.total_error()[0]) and s.total_error()[1] == pytest.approx(sum(s.errors[1].values()))
    sizes = gptq_sweep(task.model, calib, task.test, 3, "calibration_samples", [16, 64])
    assert (sizes.accuracy[1], sizes.loss[1]) == evaluate(gptq(task.model, calib, 3), task.test)
    assert sizes.total_error()[0] > sizes.total_error()[1]  # 16 samples for 64 and 128 inputs: overfits
    groups = gptq_sweep(task.model, calib, task.test, 2, "group_size", [None, 8], symmetric=True)
    assert groups.total_error()[1] < groups.total_error()[0]
    with pytest.raises(ValueError, match="option"):
        gptq_sweep(task.model, calib, task.test, 3, "bits", [2])
    with pytest.raises(ValueError, match="calibration sizes"):
        gptq_sweep(task.model, calib, task.test, 3, "calibration_samples", [65])


def test_explorer_over_its_controls(task):
    explorer = GPTQExplorer(task)
    explorer.show()
    r = explorer.result
    assert (r["bits"], r["group_size"], r["damping"], r["act_order"], r["calibration_samples"], r["symmetric"]) == (
        2, None, 0.01, False, 128, False)
    assert r["failure"] is None and set(r["gptq_errors"]) == set(LAYERS)
    assert all(r["gptq_errors"][n] < r["rtn_errors"][n] for n in LAYERS)
    ax_acc, ax_err = explorer.figure.axes
    assert ax_acc.get_ylabel() == "test accuracy (%)" and ax_err.get_yscale() == "log"
    assert ax_err.get_xlabel().startswith("layer") and ax_err.get_ylabel()

    c = explorer.controls
    c["symmetric"].value = True  # the symmetric 2-bit grid: RTN collapses, GPTQ compensates
    assert explorer.result["gptq_loss"] < explorer.result["rtn_loss"]
    c["bits"].value = c["bits"].max
    assert abs(explorer.result["gptq_accuracy"] - explorer.result["float_accuracy"]) < 1.5
    c["bits"].value = c["bits"].min
    assert [g for _, g in c["group_size"].options] == [0, 32, 16, 8]
    for _, g in c["group_size"].options:
        c["group_size"].value = g
        assert explorer.result["group_size"] == (g or None) and explorer.result["failure"] is None
    for value in (c["damping"].min, c["damping"].max):
        c["damping"].value = 10**value
        assert explorer.result["damping"] == pytest.approx(10**value) and explorer.result["failure"] is None
    c["act_order"].value = True
    assert explorer.result["act_order"] is True
    for n in (c["calibration_samples"].options[0], c["calibration_samples"].options[-1]):
        c["calibration_samples"].value = n
        assert explorer.result["calibration_samples"] == n and math.isfinite(explorer.result["gptq_accuracy"])
    assert c["calibration_samples"].options[-1] == 1024

    failed = explorer.compute(2, 0, 0.0, False, 16, False)  # damping 0 and 16 samples for 64 inputs
    assert "raise damping" in failed["failure"] and math.isnan(failed["gptq_accuracy"])
    fig = explorer.draw(failed)
    assert any("GPTQ failed" in t.get_text() for t in fig.axes[1].texts)

    with pytest.raises(ValueError, match="calibration_samples"):
        GPTQExplorer(task, calibration_samples=100)
    with pytest.raises(ValueError, match="group_size"):
        GPTQExplorer(task, group_size=7)
