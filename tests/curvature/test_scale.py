"""The memory budget for cached batch states (`cache_memory`) and the progress bars.

Results must not depend on the budget: the same products, to the bit, whether no batch, some
batches or every batch is cached."""

from __future__ import annotations

import gc

import pytest
import torch
from conftest import KINDS, live_tensors, ragged, tensors_around
from torch import nn

import hesskit as hk


def _five_batches():
    torch.manual_seed(0)
    (x, y), _ = hk.data.digits(seed=0)
    model = hk.models.SmallCNN((2, 3), activation="tanh").double()
    return model, nn.CrossEntropyLoss(), ragged(x[:40].double(), y[:40], [8, 8, 8, 8, 8])


@pytest.mark.parametrize("kind", list(KINDS))
def test_products_do_not_depend_on_the_budget(kind):
    model, criterion, batches = _five_batches()
    probe = KINDS[kind](model, criterion, batches, cache_memory=float("inf"))
    V = torch.randn(probe.shape[0], 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    full = probe @ V
    sizes = [probe.state_bytes[i] for i in range(5)]
    assert probe.cached_batches == [0, 1, 2, 3, 4] and probe.cached_bytes == sum(sizes)
    two = sizes[0] + sizes[1] + sizes[2] // 2  # room for two batches and half of a third
    for budget, cached in ((0, []), (two, [0, 1]), (float("inf"), [0, 1, 2, 3, 4])):
        op = KINDS[kind](model, criterion, batches, cache_memory=budget)
        for _ in range(2):  # the first product builds the cache, the second uses it
            assert torch.equal(op @ V, full)
            assert op.cached_batches == cached
        assert op.cached_bytes <= budget


def test_the_measured_size_is_the_graph_and_grows_with_the_batch():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 256), nn.Tanh(), nn.Linear(256, 256), nn.Tanh(), nn.Linear(256, 3)).double()
    x, y = torch.randn(512, 20, dtype=torch.float64), torch.randint(0, 3, (512,))
    op = hk.HessianOperator(model, nn.CrossEntropyLoss(), [(x[:128], y[:128]), (x[128:], y[128:])],
                            cache_memory=float("inf"))
    op @ torch.randn(op.shape[0], dtype=torch.float64)
    small, large = op.state_bytes[0], op.state_bytes[1]
    activations = 128 * (256 + 256) * 8  # the hidden activations of batch 0, saved at least once
    assert small > activations + op.shape[0] * 8  # plus the flat gradient that is kept
    kept = op.shape[0] * 8  # the flat gradient: the only part that does not grow with the batch
    assert abs((large - kept) / (small - kept) - 3) < 0.03  # 384 samples against 128
    ef = hk.EmpiricalFisherOperator(model, nn.CrossEntropyLoss(), (x[:64], y[:64]), cache_memory=float("inf"))
    ef @ torch.randn(ef.shape[0], dtype=torch.float64)
    assert ef.state_bytes[0] == 64 * ef.shape[0] * 8  # the per-sample gradients, exactly


def test_with_no_budget_no_graph_outlives_its_product():
    model, criterion, batches = _five_batches()
    op = hk.HessianOperator(model, criterion, batches, cache_memory=0)
    v = torch.randn(op.shape[0], dtype=torch.float64)
    op @ v
    before, after = tensors_around(lambda: op @ v, 20)
    assert after <= before + 2
    assert op.cached_batches == [] and op.state_bytes == {}  # nothing is measured without a budget


def test_default_budgets():
    model, criterion, batches = _five_batches()
    op = hk.HessianOperator(model, criterion, batches)
    assert op.cache_memory is None and op.budget > 2**20  # a share of the memory available here
    op @ torch.randn(op.shape[0], dtype=torch.float64)
    assert op.cached_batches == [0, 1, 2, 3, 4]  # a small model fits
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    loader = hk.data.loader(x, y, batch_size=8)
    assert hk.HessianOperator(model, criterion, loader).budget == 0  # a DataLoader may reshuffle: no cache
    cached = hk.HessianOperator(model, criterion, loader, cache_memory=float("inf"))
    cached @ torch.randn(cached.shape[0], dtype=torch.float64)
    assert cached.cached_batches == [0, 1, 2, 3, 4]


def test_restrict_keeps_the_budget_and_clear_cache_releases():
    model, criterion, batches = _five_batches()
    op = hk.GGNOperator(model, criterion, batches, cache_memory=1234)
    assert op.restrict(op.param_names[:1]).cache_memory == 1234
    full = hk.GGNOperator(model, criterion, batches, cache_memory=float("inf"))
    full @ torch.randn(full.shape[0], dtype=torch.float64)
    full.clear_cache()
    assert full.cached_batches == [] and full.cached_bytes == 0


@pytest.mark.parametrize("bad", [-1, float("nan"), "1GB", True])
def test_bad_budget_is_refused(bad):
    model, criterion, batches = _five_batches()
    with pytest.raises(ValueError, match="cache_memory"):
        hk.HessianOperator(model, criterion, batches, cache_memory=bad)


# ------------------------------------------------------------------- progress bars
def _estimators(op):
    return {
        "trace": lambda **kw: hk.trace(op, num_matvecs=9, seed=0, **kw),
        "diagonal": lambda **kw: hk.diagonal(op, num_matvecs=4, seed=0, **kw),
        "eigenvalues": lambda **kw: hk.eigenvalues(op, k=1, seed=0, **kw),
        "power_iteration": lambda **kw: hk.power_iteration(op, k=1, max_iters=5, tol=1e-1, seed=0, **kw),
        "spectral_density": lambda **kw: hk.spectral_density(op, num_runs=2, num_steps=5, seed=0, **kw),
        "dense": lambda **kw: op.dense(**kw),
    }


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("name", ["trace", "diagonal", "eigenvalues", "power_iteration", "spectral_density", "dense"])
def test_progress_is_off_by_default_and_shows_products_when_asked(name, capfd):
    model, criterion, batches = _five_batches()
    op = hk.HessianOperator(model, criterion, batches[:1])
    run = _estimators(op)[name]
    quiet = run()
    assert capfd.readouterr().err == ""
    shown = run(progress=True)
    err = capfd.readouterr().err
    assert "product" in err and "%" in err  # a tqdm bar (stderr, text outside notebooks)
    if name != "dense":
        assert shown.num_matvecs == quiet.num_matvecs and shown.seed == quiet.seed
    if name == "trace":
        assert "trace ≈" in err  # the running estimate


def test_progress_must_be_a_bool():
    with pytest.raises(TypeError, match="progress"):
        hk.trace(torch.eye(3, dtype=torch.float64), num_matvecs=3, progress="yes")


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("name", ["trace", "eigenvalue", "qbert", "measured", "obs", "gptq"])
def test_compression_progress_is_off_by_default_and_shows_when_asked(name, capfd):
    torch.manual_seed(0)
    model = hk.models.MLP(4, (6,), 3, activation="tanh").double()
    x, y = hk.data.classification(n=24, dim=4, num_classes=3, seed=1)
    data, criterion = (x.double(), y), nn.CrossEntropyLoss()
    runs = {
        "trace": lambda **kw: hk.quant.sensitivities(model, criterion, data, num_matvecs=4, **kw),
        "eigenvalue": lambda **kw: hk.quant.sensitivities(model, criterion, data, "eigenvalue", **kw),
        "qbert": lambda **kw: hk.quant.sensitivities(model, criterion, data, "qbert", num_subsets=2, **kw),
        "measured": lambda **kw: hk.quant.sensitivities(model, criterion, data, "measured", bits=2, **kw),
        "obs": lambda **kw: hk.prune.obs(model, criterion, data, 0.5, **kw),
        "gptq": lambda **kw: hk.quant.gptq(model, x.double(), 3, **kw),
    }
    runs[name]()
    assert capfd.readouterr().err == ""
    runs[name](progress=True)
    err = capfd.readouterr().err
    assert "100%" in err, err


def test_measuring_a_graph_does_not_keep_it_alive():
    model, criterion, batches = _five_batches()
    v = torch.randn(sum(p.numel() for p in model.parameters()), dtype=torch.float64)
    gc.collect()
    gc.disable()  # a reference cycle would survive until a collection: none may be needed
    try:
        before = live_tensors()
        for _ in range(3):
            op = hk.HessianOperator(model, criterion, batches, cache_memory=float("inf"))
            op @ v
            assert op.cached_batches == [0, 1, 2, 3, 4]
            del op
        after = live_tensors()
    finally:
        gc.enable()
    assert after <= before + 2, (before, after)
