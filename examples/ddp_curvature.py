"""Data-parallel curvature and a data-parallel AdaHessian, with torch.distributed.

Run on one machine with two processes (CPU, gloo; on GPUs use the nccl backend):

    torchrun --nproc_per_node=2 examples/ddp_curvature.py

Each process loads its own shard of the training set. The Hessian operator of the union of the
shards is one object per process: a product is computed on the local shard and summed over the
processes, so the top eigenvalues, trace and spectral density printed by every process are the
same, and equal to what one process would get on the whole data set. Then the model, wrapped
in DistributedDataParallel, is trained with AdaHessian, whose gradient and Hessian diagonal are
averaged over the processes. HESSKIT_FAST=1 shrinks the budgets (the tests run it that way).
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch import nn

import hesskit as hk


def main() -> None:
    fast = os.environ.get("HESSKIT_FAST", "") not in ("", "0")
    backend = "nccl" if torch.cuda.is_available() and os.environ.get("HESSKIT_DEVICE") == "cuda" else "gloo"
    dist.init_process_group(backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", rank % max(torch.cuda.device_count(), 1)) if backend == "nccl" else torch.device("cpu")
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))

    # The same model on every process (same seed); each process takes every world-th batch of digits.
    torch.manual_seed(0)
    model = hk.models.SmallCNN((8, 16)).to(device)
    (x, y), (x_test, y_test) = hk.data.digits(seed=0)
    n = 256 if fast else len(x)
    batches = [(x[i : i + 64].to(device), y[i : i + 64].to(device)) for i in range(0, n, 64)]
    shard = batches[rank::world]
    criterion = nn.CrossEntropyLoss()

    # Curvature of the full training set, each process holding 1/world of it.
    op = hk.HessianOperator(model.eval(), criterion, shard, process_group=dist.group.WORLD)
    eig = hk.eigenvalues(op, k=3, tol=1e-3, seed=0)
    tr = hk.trace(op, num_matvecs=30 if fast else 150, seed=0)
    density = hk.spectral_density(op, num_runs=2 if fast else 5, num_steps=20 if fast else 60, seed=0)
    print(f"[process {rank}/{world}] {op}: {len(shard)} of {len(batches)} batches here\n"
          f"[process {rank}/{world}] top eigenvalues {[round(v, 4) for v in eig.values.tolist()]} "
          f"({eig.num_matvecs} products), trace {tr.value:.2f} ± {tr.stderr:.2f}, "
          f"largest SLQ node {density.nodes.max():.4f}", flush=True)

    # AdaHessian on a DistributedDataParallel model: pass the process group.
    ddp = nn.parallel.DistributedDataParallel(model.train())
    opt = hk.optim.AdaHessian(ddp.parameters(), lr=0.15, process_group=dist.group.WORLD)
    for step in range(5 if fast else 100):
        xb, yb = shard[step % len(shard)]

        def closure():
            opt.zero_grad()
            return criterion(ddp(xb), yb)

        loss = opt.step(closure)
    with torch.no_grad():
        accuracy = (model.eval()(x_test.to(device)).argmax(1) == y_test.to(device)).double().mean().item()
    weights = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    same = torch.zeros(1, device=device)
    reference = weights.clone()
    dist.broadcast(reference, src=0)
    same[0] = float(torch.equal(reference, weights))
    dist.all_reduce(same, op=dist.ReduceOp.MIN)
    print(f"[process {rank}/{world}] AdaHessian: last local loss {loss.item():.4f}, test accuracy {accuracy:.3f}, "
          f"replicas identical: {bool(same.item())}", flush=True)
    # Tear down only when every process is done: a process that destroys its group (or exits) while
    # another is still finishing a gloo collective can abort ("terminate called without an active
    # exception", seen in half of the runs without this barrier).
    del opt, ddp
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
