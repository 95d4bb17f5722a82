"""What each of two torch.distributed (gloo) processes computes in tests/test_distributed.py.

The problem is split ragged: process 0 holds batches of 10 and 7 samples, process 1 one batch of
13; one process on all three batches is the reference. `run(rank, ...)` saves every result of
its process to `outdir/rank{rank}.pt`, failures included, so the test compares them after the
processes have ended.
"""

from __future__ import annotations

import os
import traceback
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

import hesskit as hk

SIZES = {0: [10, 7], 1: [13]}  # samples per batch on each process: 17 against 13


def problem() -> tuple[nn.Module, nn.Module, list]:
    """(model, criterion, all batches in order: process 0's, then process 1's), float64."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double()
    x, y = hk.data.classification(n=30, dim=5, num_classes=3, seed=1)
    batches, start = [], 0
    for rank in (0, 1):
        for size in SIZES[rank]:
            batches.append((x[start : start + size].double(), y[start : start + size]))
            start += size
    return model, nn.CrossEntropyLoss(), batches


def shard(batches: list, rank: int) -> list:
    return batches[: len(SIZES[0])] if rank == 0 else batches[len(SIZES[0]) :]


def estimates(op, V: torch.Tensor, seeds: dict) -> dict:
    """Everything the test compares, for one operator (seeds None are drawn, and recorded)."""
    out = {"matmat": op @ V, "matvec": op @ V[:, 0]}
    eig = hk.eigenvalues(op, k=3, tol=1e-8, seed=seeds.get("eig"))
    tr = hk.trace(op, num_matvecs=30, seed=seeds.get("trace"))
    diag = hk.diagonal(op, num_matvecs=20, seed=seeds.get("diag"))
    dens = hk.spectral_density(op, num_runs=2, num_steps=12, seed=seeds.get("density"))
    out.update(eig_values=eig.values, eig_seed=eig.seed, eig_products=eig.num_matvecs, trace=tr.value,
               trace_stderr=tr.stderr, trace_seed=tr.seed, diag=diag.value, diag_seed=diag.seed, nodes=dens.nodes,
               weights=dens.weights, density_seed=dens.seed)
    return out


OPTIMIZERS = {
    "adahessian": lambda params, group: hk.optim.AdaHessian(params, lr=0.1, process_group=group),
    "sophia-h": lambda params, group: hk.optim.Sophia(params, lr=0.05, update_every=2, process_group=group),
    "sophia-g": lambda params, group: hk.optim.Sophia(params, lr=0.05, estimator="gnb", update_every=2,
                                                      process_group=group),
    "mfac": lambda params, group: hk.optim.MFAC(params, lr=1e-2, num_grads=4, damping=1e-1, process_group=group),
}


def train(name: str, model: nn.Module, criterion: nn.Module, batches: list, group=None, steps: int = 4) -> torch.Tensor:
    """`steps` steps of an optimizer, one batch each; the final parameters, flat."""
    opt = OPTIMIZERS[name](list(model.parameters()), group)
    for t in range(steps):
        x, y = batches[t % len(batches)]

        def closure():
            opt.zero_grad()
            logits = model(x)
            loss = criterion(logits, y)
            return (loss, logits) if name == "sophia-g" else loss

        opt.step(closure)
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def global_batches(rank: int | None) -> list:
    """Two global batches of 14 of the 30 samples; process r holds the r-th half of each (DDP's equal split)."""
    _, _, batches = problem()
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    out = []
    for b in range(2):
        lo = 14 * b if rank is None else 14 * b + 7 * rank
        size = 14 if rank is None else 7
        out.append((x[lo : lo + size], y[lo : lo + size]))
    return out


def run(rank: int, world: int, port: int, outdir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    results: dict = {}
    try:
        model, criterion, batches = problem()
        mine = shard(batches, rank)
        n = sum(p.numel() for p in model.parameters())
        V = torch.randn(n, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
        group = dist.group.WORLD
        for kind in ("HessianOperator", "GGNOperator", "EmpiricalFisherOperator"):
            op = getattr(hk, kind)(model, criterion, mine, process_group=group)
            results[kind] = estimates(op, V, {})
        ggn = hk.GGNOperator(model, criterion, mine, process_group=group)
        results["exact_diagonal"] = ggn.exact_diagonal()
        results["dense"] = hk.HessianOperator(model, criterion, mine, process_group=group, cache_memory=0).dense()
        results["block"] = dict(hk.HessianOperator(model, criterion, mine, process_group=group).blocks())["2"] @ V[:24]

        # a DistributedDataParallel model: its own group, names with or without "module."
        ddp = nn.parallel.DistributedDataParallel(model)
        op = hk.HessianOperator(ddp, criterion, mine, params=["module.2.weight", "2.bias"])
        results["ddp"] = dict(matmat=op @ V[-24:], names=op.param_names, processes=op._collective.world_size)
        results["ddp_grads_untouched"] = all(p.grad is None for p in model.parameters())

        # a failure on one process: every process raises, none hangs
        bad = mine if rank == 0 else [(torch.randn(4, 6, dtype=torch.float64), torch.zeros(4, dtype=torch.long))]
        try:
            hk.HessianOperator(model, criterion, bad, process_group=group) @ V[:, 0]
            results["failure"] = "no error"
        except Exception as exc:  # recorded for the test
            results["failure"] = f"{type(exc).__name__}: {exc}"
        results["after_failure"] = hk.HessianOperator(model, criterion, mine, process_group=group) @ V[:, 0]

        # optimizers on a DDP model, each process on its half of every global batch
        for name in OPTIMIZERS:
            fresh, _, _ = problem()
            ddp = nn.parallel.DistributedDataParallel(fresh)
            results["opt_" + name] = train(name, ddp, criterion, global_batches(rank), group)
        import warnings

        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fresh, _, _ = problem()
            opt = hk.optim.AdaHessian(fresh.parameters())
            opt.step(lambda: criterion(fresh(mine[0][0]), mine[0][1]))
        results["no_group_warning"] = [str(w.message) for w in caught]
    except Exception:
        results["crash"] = traceback.format_exc()
    finally:
        torch.save(results, Path(outdir) / f"rank{rank}.pt")
        dist.barrier()  # tear down together: a process leaving mid-collective can abort the other
        dist.destroy_process_group()
