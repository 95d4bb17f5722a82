"""Spectral density by stochastic Lanczos quadrature (SLQ)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from .probes import DISTRIBUTIONS, Counted, make_generator, probes
from .._checks import check_choice, check_count
from ..progress import progress_bar
from .eigen import lanczos_step
from .results import SpectralDensityResult

__all__ = ["spectral_density"]

DEFAULT_STEPS = 80  # Lanczos steps per run unless n is smaller (see spectral_density)


def lanczos_quadrature(A: Counted, v: torch.Tensor, num_steps: int) -> tuple[np.ndarray, np.ndarray]:
    """Gauss quadrature for the spectral measure of A seen from the unit vector v.

    num_steps Lanczos steps (full reorthogonalisation) give H = V A V^T; with H = S diag(theta) S^T,
    the nodes are theta and the weights S[0, :]^2, so v^T f(A) v ~ sum_j weights_j f(theta_j),
    exactly for polynomials of degree < 2 * num_steps. An early invariant subspace ends the
    run: the remaining nodes get weight zero.
    """
    V = torch.zeros(num_steps + 1, A.n, dtype=A.dtype, device=A.device)
    H = torch.zeros(num_steps, num_steps, dtype=torch.float64)
    V[0] = v
    steps = num_steps
    for j in range(num_steps):
        w = lanczos_step(A, V, j, H)
        beta = w.norm().item()
        if j + 1 < num_steps:
            if beta <= 1e-10 * max(H[: j + 1, : j + 1].abs().max().item(), 1e-30):
                steps = j + 1
                break
            V[j + 1] = w / beta
    theta, S = torch.linalg.eigh(H[:steps, :steps])
    nodes = np.full(num_steps, theta[-1].item())
    weights = np.zeros(num_steps)
    nodes[:steps] = theta.numpy()
    weights[:steps] = (S[0] ** 2).numpy()
    return nodes, weights


def spectral_density(
    op: Any, num_runs: int = 10, num_steps: int | None = None, distribution: str = "rademacher",
    seed: int | None = None, progress: bool = False,
) -> SpectralDensityResult:
    """The eigenvalue density of a symmetric operator by SLQ (Ubaru, Chen & Saad 2017;
    Ghorbani, Krishnan & Xiao 2019), with `num_runs * num_steps` products.

    Each run starts Lanczos from a normalised random probe. The result's `nodes` and `weights`
    have shape (num_runs, num_steps), each run's weights sum to 1, and
    `result.estimate_trace(f)` estimates tr f(A) with a standard error over runs.
    `result.density(grid, sigma)` and `result.plot()` smooth it with a Gaussian.
    `progress=True` shows a bar of the products, with the runs done and the largest node so far.

    Defaults (800 products on an operator with n >= 80). num_runs 10: enough runs for the
    standard error over runs that `estimate_trace` reports (PyHessian's `density` runs 1, with
    none). num_steps min(80, n): n steps make each run exact (the nodes are the eigenvalues),
    and measured on the held-out problems of tests/curvature/test_curvature_defaults.py (the
    Hessian, GGN and empirical Fisher of a 12-48-3 tanh regression MLP, n = 771; the Hessian and
    empirical Fisher of a trained digits MLP, n = 18,986), 80 steps put the extreme nodes on
    lambda_min and lambda_max to 4 digits and the estimates of tr A and tr A^2 within 1.7 standard
    errors of the exact values (PyHessian: 100 steps). seed None draws one (reported).
    """
    check_count("num_runs", num_runs)
    A = Counted(op)
    num_steps = min(DEFAULT_STEPS, A.n) if num_steps is None else check_count("num_steps", num_steps)
    A.bar = progress_bar(progress, num_runs * num_steps, "spectral density", group=A.group)
    if num_steps > A.n:
        raise ValueError(f"num_steps: expected at most n = {A.n} Lanczos steps, got {num_steps}")
    check_choice("distribution", distribution, DISTRIBUTIONS)
    seed, gen = make_generator(seed, A.group)
    nodes, weights = [], []
    for run in range(num_runs):
        v = probes(A.n, 1, distribution, gen, A)[:, 0]
        run_nodes, run_weights = lanczos_quadrature(A, v / v.norm(), num_steps)
        nodes.append(run_nodes)
        weights.append(run_weights)
        A.show(f"run {run + 1}/{num_runs}, largest node {max(n.max() for n in nodes):.5g}")
    return SpectralDensityResult(nodes=np.stack(nodes), weights=np.stack(weights), dim=A.n, **A.cost(seed))
