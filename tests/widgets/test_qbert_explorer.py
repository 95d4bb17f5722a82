import matplotlib

matplotlib.use("Agg")

# Notebook 12's Q-BERT explorer driven through its controls: groupings, bits, fine-tuning on and off,
# the progress it shows, runs reused from elsewhere. It may not touch the trained model. What it
# computes: tests/experiments/test_qbert.py.

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from hesskit.experiments.qbert import (  # noqa: E402
    group_options,
    qat_finetune,
    quantize_transformer,
    transformer_size,
)
from hesskit.experiments.tasks import evaluate  # noqa: E402
from hesskit.widgets.qbert import QBERTExplorer  # noqa: E402
from fixtures.qbert import assert_untouched, snapshot, task  # noqa: E402,F401 (pytest fixtures)


# ----------------------------------------------------------------------------- the explorer
def test_explorer_over_its_controls(task):
    snap = snapshot(task.model)
    explorer = QBERTExplorer(task, bits=2, groups="1 per matrix", qat=False, steps=10, max_steps=20)
    explorer.show()
    r = explorer.result
    assert r["run"] is None and np.isnan(r["qat_accuracy"]) and r["bits"] == 2
    assert r["rtn_accuracy"] == evaluate(quantize_transformer(task.model, 2, None), task.test).accuracy
    assert len(explorer.figure.axes) == 3
    assert explorer.figure.axes[0].get_ylabel() == "test accuracy (%)"
    assert explorer.figure.axes[1].get_xlabel() == "model size (KB)"
    explorer.controls["groups"].value = "per row"  # through the control once, then compute() for speed
    assert explorer.result["groups"] == "per row" and explorer.result["size"] == transformer_size(task.model, 2, 1)
    for label, g in group_options(task.model).items():
        result = explorer.compute(**{**explorer.values(), "groups": label})
        assert result["groups"] == label and result["size"] == transformer_size(task.model, 2, g)
        assert result["rtn_accuracy"] == evaluate(quantize_transformer(task.model, 2, g), task.test).accuracy
    bits = explorer.controls["bits"]
    shown = []
    explorer.status.observe(lambda change: shown.append(change["new"]), names="value")
    bits.value = bits.max  # a new width: the round-to-nearest sweep over the groupings reports its progress
    assert any("rounding: grouping 4/4" in s for s in shown)
    explorer.status.unobserve_all()
    assert explorer.result["bits"] == 8 and abs(explorer.result["rtn_accuracy"] - task.test_metrics.accuracy) <= 0.02
    bits.value = bits.min
    shown = []  # the status line while the explorer computes: a progress bar for the sweep and every QAT run
    explorer.status.observe(lambda change: shown.append(change["new"]), names="value")
    explorer.controls["qat"].value = True
    assert any("QAT step 10/10" in s and "<progress" in s for s in shown)  # the last step always shows
    assert explorer.status.value == ""  # cleared when done
    run = explorer.result["run"]
    assert run.steps[-1] == 10 and explorer.result["qat_accuracy"] == run.final_accuracy
    assert len(explorer.figure.axes[2].lines) == 2  # the fine-tuning curve and the float32 line
    steps = explorer.controls["steps"]
    steps.value = steps.max
    assert explorer.result["run"].steps[-1] == 20
    assert explorer.compute(**{**explorer.values(), "steps": steps.min})["run"].steps.tolist() == [0]
    steps.value = 10
    assert explorer.result["run"] is run  # cached
    explorer.controls["qat"].value = False
    assert explorer.result["run"] is None
    assert_untouched(task.model, snap)
    (output,) = explorer.output.outputs
    assert output["data"]["image/png"].startswith("iVBOR")


def test_explorer_reuses_runs_and_checks_arguments(task):
    run = qat_finetune(task.model, task.train, task.test, 3, 2, steps=6, lr=1e-3, eval_every=3)
    explorer = QBERTExplorer(task, bits=3, groups="half head", qat=True, steps=6, max_steps=20)
    explorer.add_runs([run, qat_finetune(task.model, task.train, task.test, 3, 2, steps=6, lr=5e-3)])
    explorer.show()
    assert explorer.result["run"] is run  # the same lr: reused; the other lr is not
    with pytest.raises(ValueError, match="groups"):
        QBERTExplorer(task, groups="per block")
    with pytest.raises(ValueError, match="bits"):
        QBERTExplorer(task, bits=1)
    with pytest.raises(ValueError, match="steps"):
        QBERTExplorer(task, steps=30, max_steps=20)
