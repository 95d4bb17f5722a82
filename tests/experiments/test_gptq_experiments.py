import matplotlib

matplotlib.use("Agg")

# Notebook 14's GPTQ experiments (the seeded task, GPTQ vs round-to-nearest, layer-wise errors, sweeps),
# checked against direct computations. The explorer: tests/widgets/test_gptq_explorer.py.

import copy  # noqa: E402
import math  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from hesskit.data import digits  # noqa: E402
from hesskit.quant.gptq import gptq, round_to_nearest  # noqa: E402
from hesskit.experiments.gptq import (  # noqa: E402
    trained_digits,
    gptq_sweep,
    gptq_vs_rtn,
    layer_errors,
)
from hesskit.experiments.tasks import digits_mlp, evaluate, fit_classifier  # noqa: E402
from fixtures.gptq import LAYERS, task  # noqa: E402,F401 (pytest fixtures)


def test_digits_task_is_seeded_and_trained(task):
    again = trained_digits(seed=0, steps=300)
    assert all(torch.equal(a, b) for a, b in zip(task.model.parameters(), again.model.parameters()))
    assert not task.model.training and [m.weight.shape[1] for m in (task.model[1], task.model[3])] == [64, 128]
    (x, y), _ = digits(flatten=True, seed=0)  # the shared trainer on the seeded split, nothing else
    direct = fit_classifier(digits_mlp((128, 64), "relu", seed=0), (x, y), 300, 2e-3, batch_size=64, seed=0)
    assert all(torch.equal(a, b) for a, b in zip(task.model.parameters(), direct.parameters()))
    metrics = evaluate(task.model, task.test)
    assert metrics.percent > 90 and metrics.loss < 0.5
    assert task.calibration(16).shape == (16, 64) and torch.equal(task.calibration(16), task.train[0][:16])
    with pytest.raises(ValueError, match="num_samples"):
        task.calibration(0)
    with pytest.raises(ValueError, match="num_samples"):
        task.calibration(len(task.train[0]) + 1)
    with pytest.raises(ValueError, match="steps"):
        trained_digits(steps=-1)


def test_layer_errors_against_direct_computation(task):
    x, _ = task.test
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
    def scored(model):
        metrics = evaluate(model, task.test)
        return metrics.percent, metrics.loss

    assert (c.float_accuracy, c.float_loss) == scored(task.model)
    assert (c.gptq_accuracy[0], c.gptq_loss[0]) == scored(gptq(task.model, calib, 2, symmetric=True))
    assert (c.rtn_accuracy[0], c.rtn_loss[0]) == scored(round_to_nearest(task.model, 2, symmetric=True))
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
    metrics = evaluate(gptq(task.model, calib, 3), task.test)
    assert (sizes.accuracy[1], sizes.loss[1]) == (metrics.percent, metrics.loss)
    assert sizes.total_error()[0] > sizes.total_error()[1]  # 16 samples for 64 and 128 inputs: overfits
    groups = gptq_sweep(task.model, calib, task.test, 2, "group_size", [None, 8], symmetric=True)
    assert groups.total_error()[1] < groups.total_error()[0]
    with pytest.raises(ValueError, match="option"):
        gptq_sweep(task.model, calib, task.test, 3, "bits", [2])
    with pytest.raises(ValueError, match="calibration sizes"):
        gptq_sweep(task.model, calib, task.test, 3, "calibration_samples", [65])
