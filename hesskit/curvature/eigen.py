"""Extreme eigenpairs: thick-restart Lanczos (the default), block Lanczos for repeated eigenvalues,
and power iteration with deflation."""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import Tensor

from .probes import Counted, make_generator
from .._checks import check_choice, check_count
from ..progress import progress_bar
from .results import EigenResult

__all__ = ["eigenvalues", "power_iteration"]

WHICH = ("largest", "smallest", "magnitude")


def _rank(theta: Tensor, which: str) -> Tensor:
    """Indices of Ritz values, most wanted first."""
    key = {"largest": -theta, "smallest": theta, "magnitude": -theta.abs()}[which]
    return torch.argsort(key)


def _random_unit(A: Counted, gen: torch.Generator, against: Tensor | None = None) -> Tensor:
    """A random unit vector, orthogonal to the rows of `against` if given."""
    v = torch.randn(A.n, generator=gen, dtype=torch.float64).to(device=A.device, dtype=A.dtype)
    for _ in range(2):
        if against is not None and len(against) > 0:
            v = v - (against @ v) @ against
    return v / v.norm()


def lanczos_step(A: Counted, V: Tensor, j: int, H: Tensor) -> Tensor:
    """Multiply the basis vector V[j] by A and orthogonalise the result against V[:j+1].

    The basis vectors are the rows of V. The projections fill column and row j of the projected
    matrix H = V A V^T. Gram-Schmidt is run twice ("twice is enough", Giraud et al. 2005), which
    keeps the basis orthonormal to working precision: full reorthogonalisation, so no spurious
    copies of eigenvalues appear. Returns the residual w with A V_j^T = V_j^T H_j + w e_j^T.
    """
    basis = V[: j + 1]
    w = A @ V[j]
    h = basis @ w
    w = w - h @ basis
    correction = basis @ w
    w = w - correction @ basis
    h = (h + correction).double().cpu()
    H[: j + 1, j] = h
    H[j, : j + 1] = h
    return w


def lanczos(
    A: Counted, k: int, which: str, tol: float, max_matvecs: int, basis_size: int, gen: torch.Generator,
    start: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Thick-restart Lanczos (Wu & Simon 2000) with full reorthogonalisation.

    Grows an orthonormal Krylov basis (the rows of V) one product at a time and takes Ritz
    pairs from the eigendecomposition of H = V A V^T. Ritz pair i has residual ||A y_i - theta_i y_i|| =
    ||w|| |S[-1, i]|, and stops when every wanted pair has residual <= tol * ||A|| (||A|| is
    estimated by the largest |Ritz value|); a residual r bounds the eigenvalue error by r (and
    by r^2 / gap). When the basis is full, it keeps the most wanted Ritz vectors and continues
    from the residual direction: H restarts as their Ritz values on the diagonal, and the next
    step's projections fill in the coupling (an "arrowhead") by themselves.

    A small residual proves that a Ritz value is close to *an* eigenvalue, not to the wanted
    one: a Krylov space of a few vectors may not yet have seen the top eigenvector (Parlett's
    "misconvergence"). So convergence is accepted only after at least k + 5 products
    (restarts included).
    """
    n, m = A.n, basis_size
    V = torch.zeros(m + 1, n, dtype=A.dtype, device=A.device)
    H = torch.zeros(m, m, dtype=torch.float64)
    V[0] = _random_unit(A, gen) if start is None else start / start.norm()
    j, anorm = 0, 0.0
    min_steps = min(n, k + 5)
    while True:
        w = lanczos_step(A, V, j, H)
        j += 1
        beta = w.norm().item()
        theta, S = torch.linalg.eigh(H[:j, :j])
        anorm = max(anorm, theta.abs().max().item())
        order = _rank(theta, which)
        residuals = beta * S[j - 1].abs()
        wanted = order[: min(k, j)]
        converged = residuals[wanted] <= tol * anorm
        A.show(f"λ ≈ {theta[wanted[0]].item():.6g}, residual/‖A‖ {residuals[wanted].max().item() / max(anorm, 1e-300):.1e}")
        if (A.num_matvecs >= min_steps and bool(converged.all())) or j == n or A.num_matvecs >= max_matvecs:
            break
        if beta <= 1e-10 * max(anorm, 1e-30):  # an invariant subspace: continue in a fresh direction
            V[j] = _random_unit(A, gen, against=V[:j])
        else:
            V[j] = w / beta
        if j == m:  # thick restart: keep the most wanted Ritz vectors, continue from V[m]
            keep = order[: min(m - 1, max(k + 1, (m + k) // 2))]
            V[: len(keep)] = S[:, keep].T.to(V) @ V[:m]
            V[len(keep)] = V[m]
            H.zero_()
            H[: len(keep), : len(keep)] = torch.diag(theta[keep])
            j = len(keep)
    vectors = V[:j].T @ S[:, wanted].to(V)
    return theta[wanted], vectors, residuals[wanted], converged


def _orthonormal_block(X: Tensor, V: Tensor, gen: torch.Generator, A: Counted) -> Tensor:
    """The rows of X made orthonormal and orthogonal to the rows of V (Gram-Schmidt twice, then
    QR). Directions X has lost (rank deficiency: an invariant subspace was found) are replaced by
    random ones, so the block keeps its size."""
    b = X.shape[0]
    for _ in range(2):
        if len(V):
            X = X - (X @ V.T) @ V
    Q, R = torch.linalg.qr(X.T)
    scale = max(X.norm(dim=1).max().item(), 1e-300)
    weak = R.diagonal().abs() <= 1e-10 * scale
    Q = Q.T
    for i in torch.nonzero(weak).flatten().tolist():
        Q[i] = _random_unit(A, gen, against=torch.cat([V, Q[:i]]))
    if weak.any():  # the replacements are orthogonal to V and the rows before them; re-orthonormalise the rest
        Q = _orthonormal_block(Q, V, gen, A) if b > 1 and not weak.all() else Q
    return Q


def block_lanczos(
    A: Counted, k: int, which: str, tol: float, max_matvecs: int, basis_size: int, block_size: int,
    gen: torch.Generator, start: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Block Lanczos with full reorthogonalisation and thick restarts (Golub & Underwood 1977;
    restarted as Wu & Simon 2000, in blocks).

    A Krylov space grown from a single vector holds one direction of each eigenspace, so
    single-vector Lanczos finds a repeated eigenvalue once, and then the next distinct one. A
    block of b vectors sees up to b copies. Each step multiplies the newest block by A (b
    products), keeps V and A V (the basis, as rows, and its products: twice the memory of
    single-vector Lanczos), and takes Ritz pairs from H = V A V^T. The residuals
    ||A y_i - theta_i y_i|| are computed from the stored products, not from a recurrence. The next
    block is the orthonormalised residuals of the b most wanted Ritz pairs, which span the same
    new Krylov directions as A times the last block; when the basis is full it restarts from the
    most wanted Ritz vectors (and their products, kept without new ones). As `lanczos`,
    convergence is accepted only after at least k + 5 products.
    """
    n, b = A.n, block_size
    X = torch.randn(b, n, generator=gen, dtype=torch.float64).to(device=A.device, dtype=A.dtype)
    if start is not None:
        X[0] = start
    V = torch.zeros(0, n, dtype=A.dtype, device=A.device)
    AV = torch.zeros_like(V)
    X = _orthonormal_block(X, V, gen, A)
    min_steps = min(n, k + 5)
    while True:
        AX = (A @ X.T).T
        V, AV = torch.cat([V, X]), torch.cat([AV, AX])
        H = V.double() @ AV.double().T
        theta, S = torch.linalg.eigh((H + H.T) / 2)
        order = _rank(theta, which)
        Y, AY = S.T.to(V) @ V, S.T.to(V) @ AV  # all Ritz vectors (rows) and A times them
        R = AY - theta.to(V)[:, None] * Y
        residuals = R.norm(dim=1).double().cpu()
        anorm = max(theta.abs().max().item(), 1e-300)
        wanted = order[: min(k, len(V))]
        converged = residuals[wanted] <= tol * anorm
        A.show(f"λ ≈ {theta[wanted[0]].item():.6g}, residual/‖A‖ {residuals[wanted].max().item() / anorm:.1e}")
        if (A.num_matvecs >= min_steps and bool(converged.all()) and len(wanted) == k) or len(V) >= n \
                or A.num_matvecs + b > max_matvecs:
            break
        # the next directions: residuals of the most wanted Ritz pairs that have not converged
        # (a converged pair's residual is rounding noise); of converged ones only if too few are left
        active = [i for i in order.tolist() if residuals[i] > tol * anorm] + \
                 [i for i in order.tolist() if residuals[i] <= tol * anorm]
        nxt = R[active[:b]]
        if len(V) + b > basis_size:  # thick restart on the most wanted Ritz vectors
            keep = order[: max(min(basis_size - b, max(k + b, basis_size // 2)), 1)]
            V, AV = Y[keep], AY[keep]
        b_now = min(b, n - len(V))
        X = _orthonormal_block(nxt[:b_now], V, gen, A)
    return theta[wanted], Y[wanted].T, residuals[wanted], converged


def eigenvalues(
    op: Any,
    k: int = 1,
    which: str = "largest",
    tol: float = 1e-3,
    max_matvecs: int | None = None,
    basis_size: int | None = None,
    seed: int | None = None,
    start: Tensor | None = None,
    progress: bool = False,
    block_size: int | None = None,
) -> EigenResult:
    """The k extreme eigenpairs of a symmetric operator by Lanczos.

    which: "largest" (algebraic, descending), "smallest" (algebraic, ascending: the most negative
    curvature first), or "magnitude" (largest |lambda|, descending).
    tol: a pair is converged when ||A v - lambda v|| <= tol * ||A||.
    max_matvecs: budget (default 20 * basis_size). If it runs out, a warning says how far the
    residuals are from tol and `converged` marks which pairs met it.
    basis_size: Krylov basis kept in memory, basis_size + 1 vectors of length n
    (default min(n, max(2k + 20, 40))).
    start: a starting vector (e.g. the previous top eigenvector when tracking lambda_max during
    training); default a random Gaussian vector from `seed`.

    block_size: vectors per Krylov step. 1 is single-vector thick-restart Lanczos; b >= 2 is
    block Lanczos (`block_lanczos`), which finds up to b copies of a repeated eigenvalue where
    single-vector Lanczos finds one. Default: min(k, 4) for which="smallest" (the smallest
    eigenvalues of GGN and Fisher matrices are a many-fold zero, and of most Hessians a cluster
    near it), 1 otherwise (a top eigenvalue of a network's Hessian is rarely repeated exactly, and
    one vector per step needs fewer products). Pass block_size >= the multiplicity you expect.
    A block basis needs room for several blocks: its default size is max(2k + 20, 40, k + 20b)
    vectors, kept twice (the basis and its products), so mind memory on large models. Measured on
    notebook 02's CNN Hessian (n = 1,210, the 10 smallest, a cluster near 0): 414 products with
    one vector and a basis of 40, 261-288 with blocks of 3-4 and a basis of 90-100.

    A residual bounds the distance to *some* eigenvalue; with a loose tol and nearly equal top
    eigenvalues, check a second seed before trusting which one was found.
    `progress=True` shows a bar of the products (up to the budget; convergence ends it early) with
    the leading Ritz value and the largest wanted residual.
    """
    A = Counted(op)
    check_choice("which", which, WHICH)
    check_count("k", k)
    if k > A.n:
        raise ValueError(f"k: expected at most n = {A.n} eigenpairs, got {k}")
    if not tol > 0:
        raise ValueError(f"tol: expected a positive tolerance, got {tol!r}")
    _warn_below_precision(tol, A.dtype)
    b = (min(k, 4) if which == "smallest" else 1) if block_size is None else check_count("block_size", block_size)
    b = min(b, A.n)
    default_basis = max(2 * k + 20, 40) if b == 1 else max(2 * k + 20, 40, k + 20 * b)
    m = min(A.n, default_basis) if basis_size is None else check_count("basis_size", basis_size)
    if m < A.n and m < k + 2 * b or m > A.n:
        raise ValueError(f"basis_size: expected k + 2 * block_size = {k + 2 * b} <= basis_size <= n = {A.n}, got {m}")
    max_matvecs = 20 * m if max_matvecs is None else check_count("max_matvecs", max_matvecs, k)
    A.bar = progress_bar(progress, max_matvecs, f"eigenvalues ({which})", group=A.group)
    seed, gen = make_generator(seed, A.group)
    if start is not None:
        if not isinstance(start, Tensor) or start.shape != (A.n,) or not torch.isfinite(start).all() or start.norm() == 0:
            raise ValueError(f"start: expected a finite, nonzero vector of shape ({A.n},)")
        start = start.detach().to(device=A.device, dtype=A.dtype)
    if b == 1:
        values, vectors, residuals, converged = lanczos(A, k, which, tol, max_matvecs, m, gen, start)
    else:
        values, vectors, residuals, converged = block_lanczos(A, k, which, tol, max_matvecs, m, b, gen, start)
    _warn_unconverged("eigenvalues", residuals, converged, tol, max_matvecs)
    return EigenResult(
        values=values.to(A.dtype), vectors=vectors, residuals=residuals.to(A.dtype), converged=converged,
        which=which, method="lanczos" if b == 1 else f"block lanczos (block size {b})", **A.cost(seed),
    )


def power_iteration(
    op: Any, k: int = 1, max_iters: int = 100, tol: float = 1e-3, seed: int | None = None,
    progress: bool = False,
) -> EigenResult:
    """The k eigenpairs of largest magnitude by power iteration with deflation (as PyHessian).

    For eigenvalue i: start from a random vector, repeat v <- A v, projected orthogonal to the
    eigenvectors already found and normalised, until ||A v - (v^T A v) v|| <= tol * ||A|| or
    `max_iters` products. Kept for teaching and comparison: Lanczos needs far fewer products.
    `progress=True` shows a bar of the products (up to k * max_iters) with the current estimate.
    """
    check_count("k", k)
    check_count("max_iters", max_iters)
    A = Counted(op, progress, k * max_iters, "power iteration")
    if k > A.n:
        raise ValueError(f"k: expected at most n = {A.n} eigenpairs, got {k}")
    if not tol > 0:
        raise ValueError(f"tol: expected a positive tolerance, got {tol!r}")
    seed, gen = make_generator(seed, A.group)
    Q = torch.zeros(0, A.n, dtype=A.dtype, device=A.device)  # eigenvectors found, as rows
    values, residuals, converged, anorm = [], [], [], 0.0
    for _ in range(k):
        v = _random_unit(A, gen, against=Q)
        for step in range(max_iters):
            w = A @ v
            theta = torch.dot(v, w).item()
            residual = (w - theta * v).norm().item()
            anorm = max(anorm, abs(theta))
            A.show(f"λ{len(values) + 1} ≈ {theta:.6g}, residual/‖A‖ {residual / max(anorm, 1e-300):.1e}")
            if residual <= tol * anorm or step == max_iters - 1:
                break  # v, theta and residual describe the same vector
            w = w - (Q @ w) @ Q
            v = w / w.norm()
        values.append(theta)
        residuals.append(residual)
        converged.append(residual <= tol * anorm)
        Q = torch.cat([Q, v[None]])
    residuals_t = torch.tensor(residuals, dtype=A.dtype)
    converged_t = torch.tensor(converged)
    _warn_unconverged("power_iteration", residuals_t, converged_t, tol, max_iters)
    return EigenResult(
        values=torch.tensor(values, dtype=A.dtype), vectors=Q.T, residuals=residuals_t, converged=converged_t,
        which="magnitude", method="power_iteration", **A.cost(seed),
    )


def _warn_below_precision(tol: float, dtype: torch.dtype) -> None:
    """Residuals from the Lanczos recurrence keep shrinking below what the dtype can deliver."""
    floor = 10 * torch.finfo(dtype).eps
    if tol < floor:
        warnings.warn(
            f"tol={tol:g} is below what {dtype} can resolve (about {floor:.1g} * ||A||): the reported residuals "
            "would understate the true ones. Use a float64 model for tighter tolerances.",
            stacklevel=3,
        )


def _warn_unconverged(name: str, residuals: Tensor, converged: Tensor, tol: float, budget: int) -> None:
    if not bool(converged.all()):
        bad = int((~converged).sum())
        warnings.warn(
            f"{name}: {bad} of {len(converged)} eigenpairs did not reach tol={tol:g} within the budget of "
            f"{budget}; largest residual {residuals.max().item():.3g}. See result.converged; raise the budget or tol.",
            stacklevel=3,
        )
