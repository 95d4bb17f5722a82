import matplotlib

matplotlib.use("Agg")

# Notebook 13's pruning explorer and the experiment functions behind it: every control driven
# through its extremes, the explorer's cached one-shot OBS equal to hk.prune.obs with the same
# samples, block size 1 equal to OBD with the damped empirical-Fisher diagonal, a large damping equal
# to magnitude pruning, and the recorded OBS path equal to hk.prune.obs with recomputations.

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from hesskit import prune  # noqa: E402
from hesskit.widgets.pruning import (  # noqa: E402
    PruningExplorer,
    compensation_ablation,
    evaluate,
    layer_weights,
    obs_path,
    obs_sweep,
    one_shot_curve,
    path_sparsities,
    train_digits_mlp,
)

CRITERION = nn.CrossEntropyLoss()


@pytest.fixture(scope="module")
def setup():
    """A 64-16-10 MLP (1,184 weights), 200 training digits for the curvature, 100 test digits."""
    model, (x, y), (x_test, y_test) = train_digits_mlp(hidden=(16,), steps=30)
    return model, (x[:200], y[:200]), (x_test[:100], y_test[:100])


def flat(model):
    return torch.cat([w.detach().reshape(-1) for w in layer_weights(model)])


@pytest.fixture(scope="module")
def explorer(setup):
    model, data, test = setup
    return PruningExplorer(model, CRITERION, data, test, sparsities=(0.3, 0.6, 0.9), num_grads=64,
                           grad_options=(8, 64, 200), block_options=(1, 32), obd_curvature="empirical_fisher")


def test_explorer_over_its_controls(setup, explorer):
    model, data, test = setup
    n = explorer.num_weights
    assert n == 64 * 16 + 16 * 10
    explorer.show()
    r = explorer.result
    assert (r["method"], r["num_grads"], r["block_size"], r["sparsity"]) == ("obs", 64, 128, 0.8)
    assert r["overall"] == round(0.8 * n) / n and set(r["layers"]) == {"1", "3"}
    assert len(explorer.figure.axes) == 2
    assert explorer.figure.axes[0].get_xlabel().startswith("sparsity")
    assert explorer.figure.axes[1].get_ylabel() == "weights pruned in the layer (%)"
    # the explorer's one-shot OBS is hk.prune.obs on the same m samples (seeded draw)
    direct = prune.obs(model, CRITERION, data, 0.8, num_grads=64, seed=0, damping=1e-5, block_size=128)
    torch.testing.assert_close(flat(explorer.prune("obs", 0.8, 64, 1e-5, 128)), flat(direct), rtol=1e-4, atol=1e-5)
    assert torch.equal(flat(explorer.prune("obs", 0.8, 64, 1e-5, 128)) == 0, flat(direct) == 0)
    assert r["accuracy"] == pytest.approx(evaluate(direct, CRITERION, test)[1])

    sparsity = explorer.controls["sparsity"]
    for value in (sparsity.min, sparsity.max):
        sparsity.value = value
        assert explorer.result["overall"] == round(round(value, 4) * n) / n
    method = explorer.controls["method"]
    for _, value in method.options:
        method.value = value
        assert explorer.result["method"] == value
        assert explorer.result["at_sparsity"][value] == explorer.result["accuracy"]
    method.value = "obs"

    grads = explorer.controls["num_grads"]
    assert grads.options == (8, 64, 200)  # 200: every sample of data
    for value in (grads.options[0], grads.options[-1]):
        grads.value = value
        assert explorer.result["num_grads"] == value
        assert explorer.inverse(value, 1e-5, 128).num_grads == value
    assert explorer.inverse(200, 1e-5, 128) is explorer.inverse(200, 1e-5, 128)  # cached

    blocks = explorer.controls["block_size"]
    assert [v for _, v in blocks.options] == [1, 32, 128, n]
    blocks.value = n  # no blocks: the full damped empirical Fisher
    full = prune.obs(model, CRITERION, data, sparsity.value, damping=1e-5, block_size=None)
    torch.testing.assert_close(flat(explorer.prune("obs", sparsity.value, 200, 1e-5, n)), flat(full),
                               rtol=1e-4, atol=1e-5)
    assert explorer.figure is not None
    (output,) = explorer.output.outputs
    assert output["data"]["image/png"].startswith("iVBOR")


def test_block_size_one_is_obd_and_large_damping_is_magnitude(setup, explorer):
    model, data, _ = setup
    m, damping, s = 64, 1e-3, 0.6
    # c = 1: [F^-1]_qq = 1 / (damping + mean_i g_iq^2), a diagonal inverse: OBD's saliency, no update
    G = explorer._grads[:m].double()
    obd = prune.obd(model, CRITERION, data, s, curvature=damping + G.pow(2).mean(dim=0))
    one = explorer.prune("obs", s, m, damping, 1)
    assert torch.equal(flat(one) == 0, flat(obd) == 0)
    torch.testing.assert_close(flat(one), flat(obd))  # the kept weights did not move
    # damping much larger than the empirical Fisher: F^-1 ~ I / damping, saliency ~ damping w^2 / 2
    assert explorer._grads.double().pow(2).mean(dim=0).max() < 0.1
    big = explorer.prune("obs", s, m, 1.0, 32)
    mag = prune.magnitude(model, s)
    assert (flat(big) == 0).eq(flat(mag) == 0).double().mean() > 0.99
    kept = (flat(big) != 0) & (flat(mag) != 0)  # the update is O(Fisher / damping) relative to w: small
    assert (flat(big) - flat(mag))[kept].abs().max() < 0.05 * flat(model).abs().max()
    explorer.controls["damping"].value = 10 ** explorer.controls["damping"].min
    assert explorer.result["damping"] == pytest.approx(1e-9)


def test_one_shot_curve_reuses_curvature_exactly(setup):
    model, data, test = setup
    sparsities = [0.4, 0.8]
    curve = one_shot_curve(model, CRITERION, data, test, sparsities, num_grads=50, block_size=32,
                           obd_curvature="empirical_fisher", seed=2)
    assert set(curve.accuracy) == {"magnitude", "obd", "obs"} and curve.dense == evaluate(model, CRITERION, test)
    for i, s in enumerate(sparsities):
        expected = {
            "magnitude": prune.magnitude(model, s),
            "obd": prune.obd(model, CRITERION, data, s, curvature="empirical_fisher"),
            "obs": prune.obs(model, CRITERION, data, s, num_grads=50, block_size=32, seed=2),
        }
        for label, pruned in expected.items():
            assert curve.accuracy[label][i] == pytest.approx(evaluate(pruned, CRITERION, test)[1]), label
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
        assert curve.accuracy["path"][j - 1] == pytest.approx(evaluate(direct, CRITERION, test)[1])
        assert prune.sparsity(direct).overall == round(targets[j - 1] * n) / n
    np.testing.assert_allclose(curve.sparsities["path"], targets)
    assert len(curve.layers["path"]) == 3 and curve.seconds["path"] > 0


def test_ablation_and_sweeps(setup):
    model, data, test = setup
    table = compensation_ablation(model, CRITERION, data, test, [0.5, 0.85], steps=2, num_grads=40, block_size=32)
    assert set(table) == {("magnitude", False), ("magnitude", True), ("obs", False), ("obs", True)}
    magnitude = [evaluate(prune.magnitude(model, s), CRITERION, test)[1] for s in (0.5, 0.85)]
    np.testing.assert_allclose(table[("magnitude", False)], magnitude)  # no saliency, no update: magnitude
    obs = prune.obs(model, CRITERION, data, 0.85, num_grads=40, block_size=32, num_recomputations=2, seed=0)
    assert table[("obs", True)][1] == pytest.approx(evaluate(obs, CRITERION, test)[1])
    accuracies = obs_sweep(model, CRITERION, data, test, 0.7, "damping", [1e-5, 1.0], num_grads=40)
    assert accuracies.shape == (2,) and ((0 <= accuracies) & (accuracies <= 1)).all()
    assert accuracies[1] == pytest.approx(evaluate(prune.obs(model, CRITERION, data, 0.7, num_grads=40, seed=0,
                                                             damping=1.0), CRITERION, test)[1])
    with pytest.raises(ValueError, match="name"):
        obs_sweep(model, CRITERION, data, test, 0.7, "lr", [1.0])


def test_training_is_seeded_and_evaluate_restores_the_mode(setup):
    a, _, _ = train_digits_mlp(hidden=(8,), steps=3, seed=1)
    b, _, _ = train_digits_mlp(hidden=(8,), steps=3, seed=1)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert not a.training
    a.train()
    model, _, test = setup
    evaluate(a, CRITERION, test)
    assert a.training
    with pytest.raises(ValueError, match="num_grads"):
        PruningExplorer(model, CRITERION, setup[1], test, num_grads=201)


# --------------------------------------------------------------------------- progress
def test_explorer_shows_progress_of_a_new_obs_curve(setup):
    model, data, test = setup
    ex = PruningExplorer(model, CRITERION, data, test, sparsities=(0.3, 0.6, 0.9), num_grads=64,
                         grad_options=(8, 64), block_options=(1, 32), obd_curvature="empirical_fisher")
    seen = []
    ex.status.observe(lambda change: seen.append(change["new"]), names="value")
    ex.show()  # the inverse, then one OBS-pruned model per sparsity of the curve
    bars = [v for v in seen if "<progress" in v]
    assert "OBS: block inverse 0/4" in bars[0] and "OBS curve: sparsity 4/4" in bars[-1]
    seen.clear()
    ex.controls["sparsity"].value = 0.6  # same settings: the curve is cached, nothing to report
    assert not any("<progress" in v for v in seen)
    assert ex.status.value == ""


def test_sweeps_report_one_unit_per_pruned_model(setup, progress_to):
    import hesskit.widgets.pruning as pruning

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
