import matplotlib

matplotlib.use("Agg")

# Notebook 13's pruning explorer: every control driven through its extremes, the explorer's cached
# one-shot OBS equal to hk.prune.obs with the same samples, block size 1 equal to OBD with the damped
# empirical-Fisher diagonal, a large damping equal to magnitude pruning, and the progress of a new OBS
# curve. What it computes: tests/experiments/test_pruning_experiments.py.

import pytest  # noqa: E402
import torch  # noqa: E402

from hesskit import prune  # noqa: E402
from hesskit.experiments.tasks import evaluate  # noqa: E402
from hesskit.widgets.pruning import PruningExplorer  # noqa: E402
from fixtures.pruning import CRITERION, flat, setup  # noqa: E402,F401 (pytest fixtures)


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
    direct = prune.obs(model, CRITERION, data, 0.8, num_grads=64, seed=0, damping=1e-5, block_size=128,
                       num_recomputations=1)
    torch.testing.assert_close(flat(explorer.prune("obs", 0.8, 64, 1e-5, 128)), flat(direct), rtol=1e-4, atol=1e-5)
    assert torch.equal(flat(explorer.prune("obs", 0.8, 64, 1e-5, 128)) == 0, flat(direct) == 0)
    assert r["accuracy"] == pytest.approx(evaluate(direct, test, CRITERION).accuracy)

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
    full = prune.obs(model, CRITERION, data, sparsity.value, damping=1e-5, block_size=None, num_recomputations=1)
    torch.testing.assert_close(flat(explorer.prune("obs", sparsity.value, 200, 1e-5, n)), flat(full),
                               rtol=1e-4, atol=1e-5)
    assert explorer.figure is not None
    (output,) = explorer.output.outputs
    assert output["data"]["image/png"].startswith("iVBOR")


def test_block_size_one_is_obd_and_large_damping_is_magnitude(setup, explorer):
    model, data, _ = setup
    m, damping, s = 64, 1e-3, 0.6
    # c = 1: [F^-1]_qq = 1 / (damping + mean_i g_iq^2), a diagonal inverse: OBD's saliency, no update
    G = explorer.grads[:m].double()
    obd = prune.obd(model, CRITERION, data, s, curvature=damping + G.pow(2).mean(dim=0))
    one = explorer.prune("obs", s, m, damping, 1)
    assert torch.equal(flat(one) == 0, flat(obd) == 0)
    torch.testing.assert_close(flat(one), flat(obd))  # the kept weights did not move
    # damping much larger than the empirical Fisher: F^-1 ~ I / damping, saliency ~ damping w^2 / 2
    assert explorer.grads.double().pow(2).mean(dim=0).max() < 0.1
    big = explorer.prune("obs", s, m, 1.0, 32)
    mag = prune.magnitude(model, s)
    assert (flat(big) == 0).eq(flat(mag) == 0).double().mean() > 0.99
    kept = (flat(big) != 0) & (flat(mag) != 0)  # the update is O(Fisher / damping) relative to w: small
    assert (flat(big) - flat(mag))[kept].abs().max() < 0.05 * flat(model).abs().max()
    explorer.controls["damping"].value = 10 ** explorer.controls["damping"].min
    assert explorer.result["damping"] == pytest.approx(1e-9)


def test_explorer_rejects_more_gradients_than_samples(setup):
    model, _, test = setup
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


