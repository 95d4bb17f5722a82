import matplotlib

matplotlib.use("Agg")

"""Notebook 04's sharpness explorer: every control through its extreme values, results checked
against the dense Hessian of a tiny network, and the training progress in its status line. What
it computes: tests/experiments/test_sharpness.py."""

import copy  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

import hesskit as hk  # noqa: E402
from hesskit.widgets.sharpness import SharpnessExplorer  # noqa: E402
from fixtures.sharpness import SMALL  # noqa: E402


def dense_at(model, criterion, data, theta):
    probe = copy.deepcopy(model)
    torch.nn.utils.vector_to_parameters(theta, probe.parameters())
    return hk.HessianOperator(probe, criterion, data).dense()


def test_explorer_over_its_controls():
    explorer = SharpnessExplorer(**SMALL, steps=20, measure_every=5, trace_every=10, trace_matvecs=15, lr=0.1)
    explorer.show()
    first = explorer.result
    run = first["run"]
    assert first["threshold"] == pytest.approx(2 / 0.1)
    assert len(run.loss) == 21 and list(run.steps) == [0, 5, 10, 15, 20] and list(run.trace_steps) == [0, 10, 20]
    # the trace panel names the method that measured it: hk.trace's default
    assert run.trace_method == "xtrace"
    assert explorer.figure.axes[2].get_legend_handles_labels()[1] == ["tr H (xtrace, ±2 s.e.)"]
    model, criterion, data = explorer.model, explorer.criterion, explorer.data
    n = sum(p.numel() for p in model.parameters())

    lr = explorer.controls["lr"]
    lr.value = 10**lr.min  # FloatLogSlider: min and max are exponents
    small = explorer.result
    assert small["lr"] == pytest.approx(0.05) and not small["diverged"]
    assert np.all(np.diff(small["run"].loss) < 0), "GD with eta * lambda_max << 2 must decrease the loss every step"
    H = dense_at(model, criterion, data, small["run"].params)
    eig = torch.linalg.eigvalsh(H)
    assert small["final_sharpness"] == pytest.approx(eig[-1].item(), abs=1e-3 * eig.abs().max().item())
    assert abs(small["final_trace"] - H.trace().item()) <= 4 * small["run"].trace_stderr[-1] + 1e-8
    assert small["run"].params.shape == (n,)

    lr.value = 10**lr.max
    big = explorer.result
    assert big["lr"] == pytest.approx(5.0) and big["diverged"]
    assert big["run"].diverged_at == len(big["run"].loss) - 1 < 20
    assert not np.isfinite(big["run"].loss[-1]) or big["run"].loss[-1] > 1e3
    assert "DIVERGED" in explorer.figure._suptitle.get_text()

    lr.value = 10**lr.min
    assert explorer.result["run"] is small["run"]  # cached: same initialisation, same answer
    gd_loss = small["run"].loss
    options = [value for _, value in explorer.controls["batch_size"].options]
    assert options == [2, 4, 8, 16, 32]
    for b in options:
        explorer.controls["batch_size"].value = b
        result = explorer.result
        assert result["batch_size"] == result["run"].batch_size == b and not result["diverged"]
        assert result["run"].loss[-1] < result["run"].loss[0]
        assert np.isfinite(result["final_sharpness"]) and result["final_sharpness"] > 0
        assert (result["run"].loss == gd_loss).all() == (b == 32)  # only the full batch is GD
        labels = [ax.get_ylabel() for ax in explorer.figure.axes]
        assert labels == ["full-batch training loss (MSE)", "sharpness λ_max", "trace of the Hessian"]
        assert all(ax.get_xlabel() == "step" for ax in explorer.figure.axes)


def test_the_explorer_shows_training_progress():
    # the explorer's status line shows the bar while it trains
    explorer = SharpnessExplorer(**SMALL, steps=30, measure_every=10, trace_every=None, trace_matvecs=0, lr=0.1)
    explorer.show()
    seen = []
    explorer.status.observe(lambda change: seen.append(change["new"]), names="value")
    explorer.controls["batch_size"].value = 4
    assert any("SGD (batch 4) step" in s and "<progress" in s for s in seen)
    assert explorer.status.value == ""
