import matplotlib

matplotlib.use("Agg")

# Notebook 17's regularized-Newton explorer: every control driven through its callbacks, the runs it
# caches, the figure it draws. What it computes: tests/experiments/test_regularized_newton.py.

import math  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from hesskit.experiments.regularized_newton import logistic_problem, softmax_problem  # noqa: E402
from hesskit.widgets.regularized_newton import RegularizedNewtonExplorer  # noqa: E402

PROBLEMS = {"logistic": lambda d: logistic_problem(distance=d),
            "softmax": lambda d: softmax_problem(l2=0.1, distance=d, num_samples=100)}


@pytest.fixture
def explorer():
    return RegularizedNewtonExplorer(problem="logistic", curvature="Hessian", steps=25,
                                     baseline_steps={"gd": 40}, problems=PROBLEMS)


def test_explorer_renders_once_and_reads_its_runs(explorer):
    explorer.show()
    result = explorer.result
    main, base = result["main"], result["baseline"]
    assert main.method == "regnewton-hessian" and base.method == "newton-ls"
    assert main.settings["gamma"] == 1.0 and main.gap[0] == base.gap[0] == result["initial_gap"]
    assert result["iterations"][main.label] == main.iterations_to(1e-8) < 25
    assert result["closure_calls"][base.label] == base.cost_to(1e-8)
    assert len(explorer.figure.axes) == 3 and explorer.status.value == ""
    assert explorer.figure.axes[1].get_xlabel().startswith("closure calls")
    assert "retries" in explorer.figure.axes[2].get_title()
    assert len(explorer.output.outputs) == 1


def test_every_control(explorer):
    explorer.show()
    first = explorer.result["main"]
    explorer.controls["curvature"].value = "empirical Fisher"
    fisher = explorer.result["main"]
    assert fisher.method == "regnewton-fisher" and fisher.loss[0] == first.loss[0]
    assert explorer.result["baseline"] is explorer._cache[next(k for k in explorer._cache if k[2] == "newton-ls")]

    explorer.controls["gamma"].value = 1e4  # far too large: the first step needs retries
    big = explorer.result["main"]
    assert big.settings["gamma"] == pytest.approx(1e4) and big.per_step["retries"][0] >= 5
    assert big.per_step["gamma"][0] <= 1e4 / 2**5

    explorer.controls["distance"].value = 1000.0
    far = explorer.result
    assert far["initial_gap"] > 100 * first.gap[0]
    explorer.controls["baseline"].value = "Newton, no line search"
    assert math.isinf(explorer.result["iterations"]["Newton, no line search"])  # diverges from 1000 away
    explorer.controls["baseline"].value = "none"
    assert explorer.result["baseline"] is None and len(explorer.result["runs"]) == 1
    assert len(explorer.figure.axes[0].get_lines()) == 2  # the run and the 1e-8 line

    explorer.controls["distance"].value = 1.0
    explorer.controls["curvature"].value = "GGN"
    explorer.controls["problem"].value = "softmax"
    soft = explorer.result["main"]
    assert soft.problem.startswith("softmax") and soft.method == "regnewton-ggn" and soft.steps >= 1
    assert np.all(np.diff(soft.loss) <= 0)


def test_runs_are_cached(explorer):
    explorer.show()
    main = explorer.result["main"]
    explorer.controls["gamma"].value = 10.0
    explorer.controls["gamma"].value = 1.0  # back: the same run object, not a new one
    assert explorer.result["main"] is main
