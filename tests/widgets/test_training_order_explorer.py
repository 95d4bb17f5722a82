import matplotlib

matplotlib.use("Agg")

# Notebook 18's training-order explorer: every control driven through its callbacks, the runs it caches,
# the figure it draws. What it computes: tests/experiments/test_training_order.py.

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from hesskit.experiments.tasks import char_lm_task  # noqa: E402
from hesskit.experiments.training_order import (  # noqa: E402
    compare_order,
    curriculum_order,
    kendall_distance,
    order_setup,
    reversed_order,
    shuffled_order,
    swapped_order,
)
from hesskit.widgets import TrainingOrderExplorer  # noqa: E402

T = 6


@pytest.fixture(scope="module")
def kwargs():
    return {"task": char_lm_task(num_chars=3000), "num_batches": T, "batch_size": 4}


@pytest.fixture
def explorer(kwargs):
    return TrainingOrderExplorer(lrs=(2e-3, 5e-3), lr=5e-3, seed=1, setup_kwargs=kwargs)


def test_explorer_renders_once_and_reads_its_comparison(explorer, kwargs):
    explorer.show()
    result = explorer.result
    c = result["comparison"]
    assert c.order == shuffled_order(T, 1) and result["taylor_orders"] == (0, 1, 2) and result["lr"] == 5e-3
    direct = compare_order(order_setup(lr=5e-3, **kwargs), shuffled_order(T, 1))
    for k in (0, 1, 2):
        assert c.param_error[k] == pytest.approx(direct.param_error[k], rel=1e-12)
    assert c.heldout["retrained"] == pytest.approx(direct.heldout["retrained"], rel=1e-12)
    assert len(explorer.figure.axes) == 3 and explorer.status.value == "" and len(explorer.output.outputs) == 1
    ax_d, ax_l, ax_h = explorer.figure.axes
    assert len(ax_d.get_lines()) == 4 and len(ax_l.get_lines()) == 3  # reference + 3 estimates; 3 loss errors
    assert [t.get_text() for t in ax_h.get_xticklabels()] == ["reference", "retrained", "order 0", "order 1", "order 2"]
    heights = [p.get_height() for p in ax_h.patches]
    assert heights == pytest.approx([c.heldout[k] for k in ("reference", "retrained", 0, 1, 2)])
    assert "last Taylor term" in ax_d.get_title() and "Kendall distance" in ax_l.get_title()


def test_every_control(explorer):
    explorer.show()
    explorer.controls["order"].value = "reversed"
    c = explorer.result["comparison"]
    assert c.order == reversed_order(T) and c.kendall == 1.0

    explorer.controls["order"].value = "k random swaps"
    explorer.controls["swaps"].value = 3
    explorer.controls["seed"].value = 4
    c = explorer.result["comparison"]
    assert c.order == swapped_order(T, 3, 4) and c.kendall == pytest.approx(kendall_distance(c.order))

    explorer.controls["order"].value = "hard-first"
    setup = explorer.result["setup"]
    assert explorer.result["comparison"].order == curriculum_order(setup.difficulty, "hard-first")

    explorer.controls["shown"].value = "2 only"
    c = explorer.result["comparison"]
    assert set(c.estimates) == {2} and explorer.result["taylor_orders"] == (2,)
    assert len(explorer.figure.axes[0].get_lines()) == 2 and len(explorer.figure.axes[2].patches) == 3
    explorer.controls["shown"].value = "0 only"
    assert "last Taylor term" not in explorer.figure.axes[0].get_title()  # order 0 has no loss terms to compare

    explorer.controls["lr"].value = 2e-3
    small = explorer.result
    assert small["setup"].lr == 2e-3 and small["setup"] is explorer.setup(2e-3)
    assert small["setup"].reference.final.ne(setup.reference.final).any()


def test_runs_and_references_are_cached(explorer, kwargs):
    given = order_setup(lr=5e-3, **kwargs)
    cached = TrainingOrderExplorer(setups={5e-3: given}, lrs=(5e-3,), setup_kwargs=kwargs)
    cached.show()
    assert cached.result["setup"] is given
    first = cached.result["comparison"]
    cached.controls["seed"].value = 2
    cached.controls["seed"].value = 1  # back: the same comparison object, not a new run
    assert cached.result["comparison"] is first
    assert np.all(np.isfinite(first.step_distance[2]))


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="order"):
        TrainingOrderExplorer(order="sorted")
    with pytest.raises(ValueError, match="shown"):
        TrainingOrderExplorer(shown="3")
