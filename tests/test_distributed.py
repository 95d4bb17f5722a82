"""Data-parallel curvature: two gloo processes on a ragged split of the data against one process
on all of it (tests/distributed_cases.py says what each process computes). The operators'
products, and every estimator with the same seed, must agree to float64 rounding, on both
processes bit for bit."""

from __future__ import annotations

import socket

import pytest
import torch
import torch.multiprocessing as mp

import hesskit as hk
from distributed_cases import OPTIMIZERS, estimates, global_batches, problem, run, train

KINDS = ("HessianOperator", "GGNOperator", "EmpiricalFisherOperator")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    outdir = tmp_path_factory.mktemp("dist")
    mp.start_processes(run, args=(2, _free_port(), str(outdir)), nprocs=2, join=True, start_method="spawn")
    results = [torch.load(outdir / f"rank{r}.pt", weights_only=False) for r in range(2)]
    for r, res in enumerate(results):
        assert "crash" not in res, f"process {r} crashed:\n{res['crash']}"
    return results


def _close(a, b, rtol=1e-6):
    a, b = torch.as_tensor(a), torch.as_tensor(b)
    scale = max(b.abs().max().item(), 1e-30)
    assert (a - b).abs().max().item() <= rtol * scale, (a, b)


def _same(a, b):
    assert torch.equal(torch.as_tensor(a), torch.as_tensor(b))


@pytest.mark.parametrize("kind", KINDS)
def test_two_processes_equal_one_process_on_the_union(ranks, kind):
    model, criterion, batches = problem()
    single = getattr(hk, kind)(model, criterion, batches)
    V = torch.randn(single.shape[0], 2, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    r0, r1 = ranks[0][kind], ranks[1][kind]
    seeds = dict(eig=r0["eig_seed"], trace=r0["trace_seed"], diag=r0["diag_seed"], density=r0["density_seed"])
    ref = estimates(single, V, seeds)
    for key in ("matmat", "matvec", "eig_values", "trace", "diag", "nodes", "weights"):
        _same(r0[key], r1[key])  # every process has the same result, to the bit
        _close(r0[key], ref[key], rtol=1e-10 if key != "eig_values" else 1e-8)
    for key in ("eig_seed", "trace_seed", "diag_seed", "density_seed", "eig_products"):
        assert r0[key] == r1[key] == ref[key]  # seeds drawn on process 0 were shared


def test_exact_diagonal_dense_and_blocks(ranks):
    model, criterion, batches = problem()
    _same(ranks[0]["dense"], ranks[1]["dense"])
    H = hk.HessianOperator(model, criterion, batches).dense()
    _close(ranks[0]["dense"], H, 1e-10)
    _close(ranks[0]["exact_diagonal"], hk.GGNOperator(model, criterion, batches).exact_diagonal(), 1e-10)
    V = torch.randn(H.shape[0], 2, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    _close(ranks[1]["block"], H[-24:, -24:] @ V[:24], 1e-10)


def test_a_ddp_model_is_unwrapped_and_uses_its_group(ranks):
    model, criterion, batches = problem()
    op = hk.HessianOperator(model, criterion, batches, params=["2.weight", "2.bias"])
    n = sum(p.numel() for p in model.parameters())
    V = torch.randn(n, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    for res in ranks:
        assert res["ddp"]["names"] == ["2.weight", "2.bias"] and res["ddp"]["processes"] == 2
        _close(res["ddp"]["matmat"], op @ V[-24:], 1e-10)
        assert res["ddp_grads_untouched"]  # no DDP hook wrote .grad


def test_a_failure_on_one_process_raises_on_every_process(ranks):
    assert ranks[1]["failure"].startswith("ValueError") and "cannot take the inputs" in ranks[1]["failure"]
    assert ranks[0]["failure"].startswith("RankFailedError") and "[1]" in ranks[0]["failure"]
    model, criterion, batches = problem()
    n = sum(p.numel() for p in model.parameters())
    V = torch.randn(n, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    expected = hk.HessianOperator(model, criterion, batches) @ V[:, 0]
    for res in ranks:  # the group is still usable afterwards
        _close(res["after_failure"], expected, 1e-10)


def test_process_group_needs_an_initialised_group():
    model, criterion, batches = problem()
    with pytest.raises(ValueError, match="process_group: torch.distributed is not initialised"):
        hk.HessianOperator(model, criterion, batches, process_group=object())


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_optimizers_on_a_ddp_model_step_as_one_process_on_the_global_batch(ranks, name):
    _same(ranks[0]["opt_" + name], ranks[1]["opt_" + name])  # the replicas stay identical
    if name == "sophia-g":  # labels are drawn per process: the same estimator, other samples
        return
    model, criterion, _ = problem()
    single = train(name, model, criterion, global_batches(None))
    start = torch.cat([p.detach().reshape(-1) for p in problem()[0].parameters()])
    assert (single - start).abs().max() > 1e-3  # it moved
    _close(ranks[0]["opt_" + name], single, 1e-9)


def test_an_optimizer_without_process_group_warns_in_a_multi_process_job(ranks):
    assert any("drift apart" in w and "process_group" in w for w in ranks[0]["no_group_warning"])


def test_optimizers_without_distributed_support_refuse_a_group():
    model, _, _ = problem()
    for make in (lambda: hk.optim.NewtonCG(model.parameters(), process_group=object()),
                 lambda: hk.optim.KFAC(model, process_group=object()),
                 lambda: hk.optim.MKOR(model, process_group=object())):
        with pytest.raises(TypeError, match="process_group"):
            make()
