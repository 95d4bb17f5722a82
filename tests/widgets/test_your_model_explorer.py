import matplotlib

matplotlib.use("Agg")

# Notebook 15's explorer driven through every control (an exception inside its Output widget would not
# fail the notebook test), and its argument checks. It may not touch the trained model. What it
# computes: tests/experiments/test_your_model.py.

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from hf_zoo import assert_unchanged, snapshot  # noqa: E402

import transformers  # noqa: E402,F401 (a test dependency: never skipped)

from hesskit.experiments.your_model import DIAGONAL_METHODS, EIGENVALUE, ESTIMATORS, TRACE_METHODS  # noqa: E402
from hesskit.widgets.your_model import YourModelExplorer  # noqa: E402
from fixtures.your_model import task  # noqa: E402,F401 (pytest fixtures)


def test_explorer_over_its_controls(task):
    model, data = task.trained.model, task.curvature_batches(1, 16)
    snap = snapshot(model)
    explorer = YourModelExplorer(model, data, estimator=ESTIMATORS[0], products=4, max_products=6)
    explorer.show()
    assert explorer.controls["estimator"].value == "XTrace trace"  # hk.trace's default comes first
    r = explorer.result
    assert r["group"] == "embeddings" and r["names"] == explorer.sets["embeddings"] and r["per_parameter"]
    assert len(explorer.figure.axes) == 2
    assert explorer.figure.axes[0].get_xlabel().startswith("Tr(H) / parameters")
    assert explorer.figure.axes[1].get_xlabel() == "Hessian-vector products used"
    raw = explorer.estimates("embeddings", ESTIMATORS[0], 4)["per"]
    np.testing.assert_allclose(r["values"] * r["sizes"], [raw[n]["value"] for n in r["names"]])
    for group in explorer.controls["group"].options:  # every group once, through compute for speed
        result = explorer.compute(**{**explorer.values(), "group": group})
        assert result["names"] == explorer.sets[group] and np.isfinite(result["values"]).all()
    explorer.controls["group"].value = "head"  # through the controls
    assert explorer.result["names"] == ["bert.pooler.dense", "classifier"]
    for estimator in ESTIMATORS:
        explorer.controls["estimator"].value = estimator
        result = explorer.result
        assert result["estimator"] == estimator and len(result["values"]) == 2
        title = explorer.figure.axes[0].get_title()
        if estimator in DIAGONAL_METHODS:
            assert all(result["entries"][n] is not None for n in result["names"])
            assert explorer.figure.axes[1].get_yscale() == "log" and "no error bar" in title
        else:
            assert result["budgets"][-1] == 4 and len(result["path"]) == len(result["budgets"])
            assert ("± 2 stderr" if estimator in TRACE_METHODS else "± residual") in title
            assert explorer.figure.axes[1].get_xlabel() == "Hessian-vector products used"
        quantity = "λ_max(H)" if estimator == EIGENVALUE else "Tr(GGN)" if estimator in DIAGONAL_METHODS else "Tr(H)"
        assert explorer.figure.axes[0].get_xlabel().startswith(quantity)
    explorer.controls["estimator"].value = EIGENVALUE
    top = explorer.result["values"].copy()
    explorer.controls["per_parameter"].value = False
    np.testing.assert_array_equal(explorer.result["values"], top)  # an eigenvalue is not divided by n
    explorer.controls["estimator"].value = "Hutch++ trace"
    total = explorer.result["values"]
    explorer.controls["per_parameter"].value = True
    np.testing.assert_allclose(explorer.result["values"] * explorer.result["sizes"], total)
    slider = explorer.controls["products"]
    slider.value = slider.max
    assert explorer.result["products"] == 6
    cached = len(explorer._cache)
    shown = []  # the status line while it computes: a bar counting the budgets of products of every estimate
    explorer.status.observe(lambda change: shown.append(change["new"]), names="value")
    slider.value = slider.min  # two modules at 3 products (3 // 4 and 3 // 2 give no smaller budget)
    assert any("products (budget) 6/6" in s and "<progress" in s for s in shown) and explorer.status.value == ""
    explorer.status.unobserve_all()
    slider.value = slider.max
    assert len(explorer._cache) == cached + 1  # the minimum is new, the maximum was cached
    # XTrace and XDiag need 4 products: at the slider's 3 each module gets 4, and nothing fails
    for estimator in ("XTrace trace", "GGN diagonal (XDiag)"):
        explorer.controls["estimator"].value = estimator
        slider.value = slider.min
        result = explorer.result
        assert result["products"] == 3 and result["num_matvecs"] == 2 * 4 and np.isfinite(result["values"]).all()
        assert explorer.status.value == "" and "8 products used" in explorer.figure.axes[0].get_title()
        slider.value = slider.max
    assert_unchanged(model, snap)
    (output,) = explorer.output.outputs
    assert output["data"]["image/png"].startswith("iVBOR")


def test_explorer_checks_its_arguments(task):
    data = task.curvature_batches(1, 8)
    with pytest.raises(ValueError, match="group"):
        YourModelExplorer(task.trained.model, data, group="decoder")
    with pytest.raises(ValueError, match="estimator"):
        YourModelExplorer(task.trained.model, data, estimator="exact")
    with pytest.raises(ValueError, match="products"):
        YourModelExplorer(task.trained.model, data, products=2)
