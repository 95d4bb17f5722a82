import matplotlib

matplotlib.use("Agg")

# Notebook 13's pruning experiments: one-shot curves that reuse each method's curvature exactly, the
# recorded OBS path equal to hk.prune.obs with recomputations, the compensation ablation and the OBS
# sweeps, seeded training, and the progress every sweep reports. The explorer:
# tests/widgets/test_pruning_explorer.py.

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from hesskit import prune  # noqa: E402
from hesskit.data import digits  # noqa: E402
from hesskit.experiments.pruning import (  # noqa: E402
    compensation_ablation,
    obs_path,
    obs_sweep,
    one_shot_curve,
    path_sparsities,
    train_digits_mlp,
)
from hesskit.experiments.tasks import TrainedModel, digits_mlp, evaluate, fit_classifier  # noqa: E402
from fixtures.pruning import CRITERION, flat, setup  # noqa: E402,F401 (pytest fixtures)


def test_one_shot_curve_reuses_curvature_exactly(setup):
    model, data, test = setup
    sparsities = [0.4, 0.8]
    curve = one_shot_curve(model, CRITERION, data, test, sparsities, num_grads=50, block_size=32,
                           obd_curvature="empirical_fisher", seed=2)
    assert set(curve.accuracy) == {"magnitude", "obd", "obs"} and curve.dense == evaluate(model, test, CRITERION)
    for i, s in enumerate(sparsities):
        expected = {
            "magnitude": prune.magnitude(model, s),
            "obd": prune.obd(model, CRITERION, data, s, curvature="empirical_fisher"),
            "obs": prune.obs(model, CRITERION, data, s, num_grads=50, block_size=32, seed=2, num_recomputations=1),
        }
        for label, pruned in expected.items():
            assert curve.accuracy[label][i] == pytest.approx(evaluate(pruned, test, CRITERION).accuracy), label
            assert curve.layers[label][i] == pytest.approx(prune.sparsity(pruned).layers), label
    diag = prune.obd_diagonal(model, CRITERION, data, "hessian", num_matvecs=10, seed=1)
    assert diag.shape == (model[1].weight.numel() + model[3].weight.numel(),)
    with pytest.raises(ValueError, match="methods"):
        one_shot_curve(model, CRITERION, data, test, [0.5], methods=("snip",))
    with pytest.raises(ValueError, match="curvature"):
        prune.obd_diagonal(model, CRITERION, data, "kfac")


def test_obs_path_is_obs_with_recomputations(setup):
    model, data, test = setup
    targets = path_sparsities(0.9, 3)
    np.testing.assert_allclose(targets, [1 - 0.1 ** (1 / 3), 1 - 0.1 ** (2 / 3), 0.9])
    curve = obs_path(model, CRITERION, data, test, 0.9, steps=3, num_grads=40, block_size=32, seed=5)
    n = flat(model).numel()
    for j in (2, 3):  # after step j: exactly the j-step run to s_j
        direct = prune.obs(model, CRITERION, data, float(targets[j - 1]), num_grads=40, block_size=32, seed=5,
                           num_recomputations=j)
        assert curve.accuracy["path"][j - 1] == pytest.approx(evaluate(direct, test, CRITERION).accuracy)
        assert prune.sparsity(direct).overall == round(targets[j - 1] * n) / n
    np.testing.assert_allclose(curve.sparsities["path"], targets)
    assert len(curve.layers["path"]) == 3 and curve.seconds["path"] > 0


def test_ablation_and_sweeps(setup):
    model, data, test = setup
    table = compensation_ablation(model, CRITERION, data, test, [0.5, 0.85], steps=2, num_grads=40, block_size=32)
    assert set(table) == {("magnitude", False), ("magnitude", True), ("obs", False), ("obs", True)}
    magnitude = [evaluate(prune.magnitude(model, s), test, CRITERION).accuracy for s in (0.5, 0.85)]
    np.testing.assert_allclose(table[("magnitude", False)], magnitude)  # no saliency, no update: magnitude
    obs = prune.obs(model, CRITERION, data, 0.85, num_grads=40, block_size=32, num_recomputations=2, seed=0)
    assert table[("obs", True)][1] == pytest.approx(evaluate(obs, test, CRITERION).accuracy)
    accuracies = obs_sweep(model, CRITERION, data, test, 0.7, "damping", [1e-5, 1.0], num_grads=40)
    assert accuracies.shape == (2,) and ((0 <= accuracies) & (accuracies <= 1)).all()
    assert accuracies[1] == pytest.approx(evaluate(prune.obs(model, CRITERION, data, 0.7, num_grads=40, seed=0,
                                                             damping=1.0, num_recomputations=1), test,
                                                   CRITERION).accuracy)
    with pytest.raises(ValueError, match="name"):
        obs_sweep(model, CRITERION, data, test, 0.7, "lr", [1.0])


def test_training_is_seeded_and_is_the_shared_trainer():
    trained = train_digits_mlp(hidden=(8,), steps=3, seed=1)
    a, (x, y) = trained.model, trained.train
    b = train_digits_mlp(hidden=(8,), steps=3, seed=1).model
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert not a.training
    assert isinstance(trained, TrainedModel) and trained.seed == 1 and trained.config["steps"] == 3
    assert torch.equal(trained.calibration(5), x[:5])
    assert torch.equal(x, digits(flatten=True, seed=1)[0][0])
    direct = fit_classifier(digits_mlp((8,), "tanh", seed=1), (x, y), 3, 1e-2, optimizer="adamw")
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), direct.parameters()))


# --------------------------------------------------------------------------- progress
def test_sweeps_report_one_unit_per_pruned_model(setup, progress_to):
    model, data, test = setup
    calls = []
    progress_to(lambda done, total, what="": calls.append((done, total)))
    obs_sweep(model, CRITERION, data, test, 0.7, "damping", [1e-5, 1.0], num_grads=40)
    assert calls == [(1, 2), (2, 2)]
    calls.clear()
    compensation_ablation(model, CRITERION, data, test, [0.5], num_grads=40, block_size=32)
    assert calls == [(k, 4) for k in range(1, 5)]
    calls.clear()
    obs_path(model, CRITERION, data, test, 0.8, 3, num_grads=40, block_size=32)
    assert calls == [(1, 3), (2, 3), (3, 3)]
    calls.clear()
    one_shot_curve(model, CRITERION, data, test, [0.5], methods=("magnitude", "obs"), num_grads=40, block_size=32)
    assert calls == [(0, 2), (1, 2), (2, 2)]
