"""Extreme eigenpairs: thick-restart Lanczos (the default), block Lanczos for repeated eigenvalues,
and power iteration with deflation."""

from __future__ import annotations

import warnings
from typing import Any, NamedTuple

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


def _key(value: float, which: str) -> float:
    """Larger is more wanted."""
    return {"largest": value, "smallest": -value, "magnitude": abs(value)}[which]


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


class Krylov(NamedTuple):
    """What a Lanczos run returns: its k most wanted Ritz pairs (vectors as columns), their
    residual norms and which met tol; and, from the basis it ended with, Ritz values `theta`, the
    leading Ritz vectors (rows, most wanted first) and A times them, from which another run can
    continue without new products."""

    values: Tensor
    vectors: Tensor
    residuals: Tensor
    converged: Tensor
    theta: Tensor
    basis: Tensor
    products: Tensor
    lift: int = 0


def lanczos(
    A: Counted, k: int, which: str, tol: float, max_matvecs: int, basis_size: int, gen: torch.Generator,
    start: Tensor | None = None, lead: int = 0,
) -> Krylov:
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
    (restarts included). It returns the `lead` most wanted Ritz vectors (at least k) and their
    products, with no new ones: A V^T = V^T H + w e_j^T, so A y_i = theta_i y_i + S[-1, i] w.
    `lift` is the number of products after which the leading Ritz value first ranked above the
    final k-th one by tol * ||A|| (0: never).
    """
    n, m = A.n, basis_size
    V = torch.zeros(m + 1, n, dtype=A.dtype, device=A.device)
    H = torch.zeros(m, m, dtype=torch.float64)
    V[0] = _random_unit(A, gen) if start is None else start / start.norm()
    j, anorm, leading = 0, 0.0, []
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
        leading.append((A.num_matvecs, theta[wanted[0]].item()))
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
    first = order[: max(len(wanted), min(j, lead))]
    Y = S[:, first].T.to(V) @ V[:j]
    AY = theta[first].to(V)[:, None] * Y + S[j - 1, first].to(V)[:, None] * w
    last = _key(theta[wanted[-1]].item(), which) + tol * anorm
    lift = next((count for count, value in leading if _key(value, which) > last), 0)
    k = len(wanted)
    return Krylov(theta[wanted], Y[:k].T, residuals[wanted], converged, theta[order], Y, AY, lift)


def _orthonormal_block(X: Tensor, V: Tensor, gen: torch.Generator, A: Counted) -> Tensor:
    """The rows of X made orthonormal and orthogonal to the rows of V: Gram-Schmidt row by row,
    twice against V and the rows before ("twice is enough", Giraud et al. 2005). A row that
    loses all but 1e-10 of its norm lies in the span already (an invariant subspace was found, or
    it is the rounding noise of a converged residual): normalising what is left would give a
    direction that is not orthogonal to V, so a random one replaces it and the block keeps its
    size."""
    Q = torch.zeros_like(X)
    for i in range(len(X)):
        basis = torch.cat([V, Q[:i]])
        x = X[i]
        for _ in range(2):
            x = x - (basis @ x) @ basis
        if not x.norm() > 1e-10 * X[i].norm():
            x = _random_unit(A, gen, against=basis)
        Q[i] = x / x.norm()
    return Q


def ritz_pairs(
    V: Tensor, AV: Tensor, which: str, count: int | None = None
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Rayleigh-Ritz on the rows of V, given their products AV (rows): the Ritz values, most
    wanted first, and for the `count` most wanted (default all) the Ritz vectors Y and A Y (rows)
    and the residual norms ||A y - theta y||, computed from the products themselves, not from a
    recurrence."""
    H = V.double() @ AV.double().T
    theta, S = torch.linalg.eigh((H + H.T) / 2)
    order = _rank(theta, which)
    theta, S = theta[order], S[:, order[:count]].to(V)
    Y, AY = S.T @ V, S.T @ AV
    residuals = (AY - theta[: len(Y)].to(V)[:, None] * Y).norm(dim=1).double().cpu()
    return theta, Y, AY, residuals


def block_lanczos(
    A: Counted, k: int, which: str, tol: float, max_matvecs: int, basis_size: int, block_size: int,
    gen: torch.Generator, start: Tensor | None = None, warm: tuple[Tensor, Tensor] | None = None,
    fresh: bool = False,
) -> Krylov:
    """Block Lanczos with full reorthogonalisation and thick restarts (Golub & Underwood 1977;
    restarted as Wu & Simon 2000, in blocks).

    A Krylov space grown from a single vector holds one direction of each eigenspace, so
    single-vector Lanczos finds a repeated eigenvalue once, and then the next distinct one. A
    block of b vectors sees up to b copies. Each step multiplies the newest block by A (b
    products), keeps V and A V (the basis, as rows, and its products: twice the memory of
    single-vector Lanczos), and takes Ritz pairs from H = V A V^T (`ritz_pairs`). The next
    block is the orthonormalised residuals of the b most wanted Ritz pairs that have not
    converged, which span the same new Krylov directions as A times the last block; when the
    basis is full it restarts from the most wanted Ritz vectors (and their products, kept without
    new ones). `warm` = (basis, products) continues from another run's basis. As `lanczos`,
    convergence is accepted only after at least k + 5 products.
    """
    n, b = A.n, block_size
    if warm is None:
        X = torch.randn(b, n, generator=gen, dtype=torch.float64).to(device=A.device, dtype=A.dtype)
        if start is not None:
            X[0] = start
        V = torch.zeros(0, n, dtype=A.dtype, device=A.device)
        AV = torch.zeros_like(V)
        X = _orthonormal_block(X, V, gen, A)
    else:
        (V, AV), X = warm, None
    min_steps, anorm = min(n, k + 5), 0.0
    while True:
        if X is not None:
            AX = (A @ X.T).T
            V, AV = torch.cat([V, X]), torch.cat([AV, AX])
        theta, Y, AY, residuals = ritz_pairs(V, AV, which)
        anorm = max(anorm, theta.abs().max().item(), 1e-300)
        kk = min(k, len(V))
        converged = residuals[:kk] <= tol * anorm
        A.show(f"λ ≈ {theta[0].item():.6g}, residual/‖A‖ {residuals[:kk].max().item() / anorm:.1e}")
        if (A.num_matvecs >= min_steps and bool(converged.all()) and kk == k) or len(V) >= n \
                or A.num_matvecs + b > max_matvecs:
            break
        # the next directions: residuals of the most wanted Ritz pairs that have not converged
        # (a converged pair's residual is rounding noise); of converged ones only if too few are left
        done = residuals <= tol * anorm
        active = torch.cat([torch.nonzero(~done).flatten(), torch.nonzero(done).flatten()])[:b]
        nxt = AY[active] - theta.to(V)[active, None] * Y[active]
        if len(V) + b > basis_size:  # thick restart on the most wanted Ritz vectors
            keep = max(min(basis_size - b, max(k + b, basis_size // 2)), 1)
            V, AV = Y[:keep], AY[:keep]
        if fresh:  # the first block after a warm start: fresh random directions beside unconverged residuals
            fresh, unconverged = False, int((~done[:k]).sum())
            nxt = torch.cat([nxt[: max(1, unconverged)], torch.zeros(b, n, dtype=A.dtype, device=A.device)])
        X = _orthonormal_block(nxt[: min(b, n - len(V))], V, gen, A)
    return Krylov(theta[:kk], Y[:kk].T, residuals[:kk], converged, theta, Y, AY)


def copy_check(
    A: Counted, V: Tensor, AV: Tensor, size: int, steps: int, gen: torch.Generator
) -> tuple[Tensor, Tensor]:
    """Look for eigenvectors that a Krylov basis V (rows, with its products AV) cannot contain:
    `steps` block-Krylov steps (Golub & Underwood 1977) from `size` fresh random directions kept
    orthogonal to V, i.e. Lanczos on the deflated operator (I - V^T V) A (I - V^T V), for
    size * steps products. Returns the enlarged basis and its products.

    A Krylov space grown from one vector v holds only the projection of v on each eigenspace, so
    every other copy of a repeated eigenvalue is orthogonal to it: invisible to any number of
    further single-vector steps, but present with weight ~ 1/n in a fresh random direction,
    which A's powers amplify like Lanczos amplifies a top eigenvector (Kaniel-Paige-Saad)."""
    X = torch.randn(min(size, A.n - len(V)), A.n, generator=gen, dtype=torch.float64)
    X = _orthonormal_block(X.to(device=A.device, dtype=A.dtype), V, gen, A)
    for step in range(steps):
        AX = (A @ X.T).T
        V, AV = torch.cat([V, X]), torch.cat([AV, AX])
        if step == steps - 1 or len(V) >= A.n:
            break
        X = _orthonormal_block(AX[: A.n - len(V)], V, gen, A)
    return V, AV


def largest_cluster(theta: Tensor, k: int, width: float) -> int:
    """The most Ritz values in one cluster that holds one of the k most wanted: theta ranked most
    wanted first, its first 2k values sorted, neighbours closer than `width` chained."""
    values, index = theta[: 2 * k].sort()
    best, size, has_wanted = 1, 1, bool(index[0] < k)
    for gap, i in zip(values.diff().tolist(), index[1:].tolist()):
        size, has_wanted = (size + 1, has_wanted or i < k) if gap <= width else (1, i < k)
        best = max(best, size) if has_wanted else best
    return best


CLUSTER_WIDTH = 2.0  # Ritz values closer than CLUSTER_WIDTH * tol * ||A|| form a cluster
MAX_BLOCK = 8  # the largest block the automatic choice takes


def lanczos_then_blocks(
    A: Counted, k: int, which: str, tol: float, max_matvecs: int, basis_size: int, block_basis: Any,
    gen: torch.Generator, start: Tensor | None = None,
) -> tuple[Krylov, str]:
    """Single-vector Lanczos, then `copy_check` for wanted eigenvectors its Krylov space cannot
    hold, then `block_lanczos` from the same basis (no product wasted) if it finds some.

    The check runs when k >= 2 and `lanczos` converged (for k = 1 a hidden copy does not change
    the answer, nor when the k values agree to tol). It runs lift + 1 steps (at least 2), lift
    being the products after which the first run's leading Ritz value first ranked above its
    final k-th by tol * ||A||: as many steps as a random start needed to lift the top eigenvalue
    above the k-th, plus one for a copy's smaller share of a random vector (with lift steps it
    missed copies in 1-2 of 10 seeds on some of the spectra of `block_lanczos_table`'s kind; with
    lift + 1, none). Its block is one fresh direction, or c + 1 when c >= 2 of the wanted (and
    next) Ritz values cluster within CLUSTER_WIDTH * tol * ||A||: two values whose error bars
    tol * ||A|| overlap are one eigenvalue as far as tol can tell, and where one copy showed
    more may hide (one direction missed a 5-fold eigenvalue's last copies in 1-2 of 10 seeds
    where c + 1 found them). If no wanted Ritz value of the enlarged basis moved by more than
    tol * ||A|| and all still converge, the answer stands (the enlarged basis' Ritz pairs, no
    worse). Otherwise block Lanczos (block size: the new largest cluster + 1, at most MAX_BLOCK
    and what basis_size allows; its first block topped up with fresh random directions) runs to
    convergence, and the check repeats on its answer (at most k times). The check keeps its basis
    and products within the first run's basis_size + 1 vectors (the most wanted Ritz vectors,
    whose products are known). Returns the run and what ran, in words.
    """
    limit = basis_size + 1  # vectors the first run holds: the check keeps its basis and products within them
    run = lanczos(A, k, which, tol, max_matvecs, basis_size, gen, start, lead=limit // 2)
    steps, checked, blocks, clustered = max(2, run.lift + 1), 0, [], False
    lifted = run.lift > 0  # else the k values agree to tol, and a hidden copy cannot change them
    agree = k > 1 and not lifted and bool(run.converged.all())
    note = " (no copy check: the k values agree to tol)" if agree else ""
    while k > 1 and lifted and bool(run.converged.all()) and len(run.theta) < A.n and len(blocks) < k:
        c = largest_cluster(run.theta, k, CLUSTER_WIDTH * tol * run.theta.abs().max().item())
        clustered = clustered or (c > 1 and not blocks)
        steps = min(steps, limit // 2 - k)  # the check's basis and products fit in the first run's memory
        size = min(MAX_BLOCK, c + 1, max(1, (limit // 2 - k) // max(steps, 1))) if c > 1 else 1
        keep = min(len(run.basis), limit // 2 - size * steps)
        if steps < 2 or A.num_matvecs + size * steps > max_matvecs:
            note = " (copy check skipped: " + ("no room in the basis)" if steps < 2 else "budget spent)")
            break
        before = run.values
        V, AV = copy_check(A, run.basis[:keep], run.products[:keep], size, steps, gen)
        checked, run = checked + size * steps, None  # the first run's vectors can go
        theta, Y, AY, residuals = ritz_pairs(V, AV, which, k)
        anorm = theta.abs().max().item()
        converged = residuals <= tol * anorm
        if bool(converged.all()) and (theta[:k] - before).abs().max().item() <= tol * anorm:
            run = Krylov(theta[:k], Y.T, residuals, converged, theta, Y, AY)
            break
        b = min(MAX_BLOCK, largest_cluster(theta, k, CLUSTER_WIDTH * tol * anorm) + 1)
        b = min(b, max(1, (block_basis(b) - k) // 2))  # a basis_size given by the caller must hold k + 2b
        blocks.append(b)
        limit = 2 * block_basis(b)
        run = block_lanczos(A, k, which, tol, max_matvecs, block_basis(b), b, gen, warm=(V, AV), fresh=True)
    if blocks:
        why = "clustered Ritz values; " if clustered else ""
        return run, (f"lanczos, then block lanczos (block size {blocks[-1]}): {why}a copy check found wanted "
                     f"eigenvalues the single-vector basis had missed ({checked} check products)")
    if checked:
        return run, f"lanczos, then a copy check ({checked} products) that found nothing more"
    return run, "lanczos" + note


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

    block_size: vectors per Krylov step. 1 is single-vector thick-restart Lanczos (`lanczos`);
    b >= 2 is block Lanczos (`block_lanczos`), which finds up to b copies of a repeated eigenvalue.
    A Krylov space grown from one vector holds one direction per eigenspace, so single-vector
    Lanczos returns an exactly repeated eigenvalue once however long it runs, and a cluster
    narrower than about tol * ||A|| once at that tol, then the next distinct eigenvalues, with
    small true residuals: the answer looks converged. Default (None), measured by
    `block_lanczos_table` in bench/curvature.py (2 CPU cores, seed 0; seconds interleaved):
    - which="smallest": blocks of min(k, MAX_BLOCK) (the smallest eigenvalues of GGN and Fisher
      matrices are a many-fold zero, and of most Hessians a dense cluster near it: a block of b
      sees at most b copies, so the k smallest of a zero with multiplicity >= k need b = k).
      Notebook 02's MLP Hessian (n = 1,210, the 10 smallest, tol 1e-6): 414 products with one
      vector, 394, 340 and 280 with blocks of 2, 4 and 8. The 5 smallest of an MLP's GGN on 8
      samples (rank <= 72): 4 zeros with blocks of 4, all 5 with blocks of 8 (32 products). For
      k > MAX_BLOCK pass block_size >= the multiplicity you expect.
    - otherwise, k >= 2: `lanczos_then_blocks`: single-vector Lanczos, then a copy check, a few
      block-Krylov steps from fresh random directions kept orthogonal to the basis (`copy_check`;
      lift + 1 steps, lift being the products the first run took to lift its leading Ritz value
      above its k-th; one direction, or c + 1 when c wanted Ritz values lie within 2 tol ||A||).
      If the check turns up a wanted eigenvalue, block Lanczos continues from the same basis
      (block size: the largest cluster + 1, at most 8) and the check repeats; `result.method`
      says what ran. Without repeats the check costs its products and changes nothing else:
      3 on the trained SmallCNN's top 5 at tol 1e-3 (README's benchmark: 14 -> 17 products,
      0.069 -> 0.083 s; 12-31 -> 15-35 across the README's training table) and on a spread
      dense spectrum (14 -> 17). On dense spectra with a 5-fold or clustered (within 1e-4) top
      eigenvalue, single-vector Lanczos returned 3-4 of the 5 copies and the default all 5, in
      54-176 products, where the fixed block sizes that found them all took 32-232 (b = 4 or 8;
      b = 2 missed copies everywhere, b = 4 once); over 10 seeds on 10 spectra with repeated or
      clustered eigenvalues (n = 60 to 1,000, tol 1e-3 and 1e-8) it found every copy every time.
      It is a check, not a proof: a copy of an eigenvalue barely above the k-th can take more
      steps than lift + 1, as can any eigenvalue that a random start barely meets.
      block_size=1 runs single-vector Lanczos alone (the default before).
    - k = 1: single-vector Lanczos (a hidden copy of lambda_1 does not change lambda_1).
    On this CPU a block of b products costs b single ones (batched products lose to a loop, README
    "Batched products"), so seconds follow products: blocks win only where they need fewer. A
    block basis needs room for several blocks: its default size is max(2k + 20, 40, k + 20b)
    vectors, kept twice (the basis and its products), so mind memory on large models; the copy
    check keeps its basis and products within the basis_size + 1 vectors of the first run.

    Defaults k=1, which="largest": the sharpness lambda_max that most uses of a Hessian's
    spectrum start from. tol 1e-3 (PyHessian's tolerance; there on the relative change of the
    eigenvalue): the README's eigenvalue benchmarks reach an error of 1e-3 * ||A|| or better with
    it, and on the held-out problems of tests/curvature/test_curvature_defaults.py lambda_max
    came out within 1e-6 relative, in 6-19 products. basis_size: this module's choice, about
    twice scipy's eigsh default (ncv = max(2k + 1, 20)), so that restarts are rare for small k.
    max_matvecs 20 * basis_size: a cap that only slow convergence reaches (then a warning).
    seed None draws one (reported in the result).

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
    auto = block_size is None and which != "smallest"
    b = (min(k, MAX_BLOCK) if which == "smallest" else 1) if block_size is None else check_count("block_size", block_size)
    b = min(b, A.n)

    def default_basis(b: int) -> int:
        return min(A.n, max(2 * k + 20, 40) if b == 1 else max(2 * k + 20, 40, k + 20 * b))

    m = default_basis(b) if basis_size is None else check_count("basis_size", basis_size)
    if m < A.n and m < k + 2 * b or m > A.n:
        raise ValueError(f"basis_size: expected k + 2 * block_size = {k + 2 * b} <= basis_size <= n = {A.n}, got {m}")
    max_matvecs = 20 * m if max_matvecs is None else check_count("max_matvecs", max_matvecs, k)
    A.bar = progress_bar(progress, max_matvecs, f"eigenvalues ({which})", group=A.group)
    seed, gen = make_generator(seed, A.group)
    if start is not None:
        if not isinstance(start, Tensor) or start.shape != (A.n,) or not torch.isfinite(start).all() or start.norm() == 0:
            raise ValueError(f"start: expected a finite, nonzero vector of shape ({A.n},)")
        start = start.detach().to(device=A.device, dtype=A.dtype)
    if auto:
        block_basis = default_basis if basis_size is None else (lambda b: m)
        run, method = lanczos_then_blocks(A, k, which, tol, max_matvecs, m, block_basis, gen, start)
    elif b == 1:
        run, method = lanczos(A, k, which, tol, max_matvecs, m, gen, start), "lanczos"
    else:
        run = block_lanczos(A, k, which, tol, max_matvecs, m, b, gen, start)
        method = f"block lanczos (block size {b})"
    _warn_unconverged("eigenvalues", run.residuals, run.converged, tol, max_matvecs)
    return EigenResult(
        values=run.values.to(A.dtype), vectors=run.vectors, residuals=run.residuals.to(A.dtype),
        converged=run.converged, which=which, method=method, **A.cost(seed),
    )


def power_iteration(
    op: Any, k: int = 1, max_iters: int = 1000, tol: float = 1e-3, seed: int | None = None,
    progress: bool = False,
) -> EigenResult:
    """The k eigenpairs of largest magnitude by power iteration with deflation (as PyHessian).

    For eigenvalue i: start from a random vector, repeat v <- A v, projected orthogonal to the
    eigenvectors already found and normalised, until ||A v - (v^T A v) v|| <= tol * ||A|| or
    `max_iters` products. Kept for teaching and comparison: Lanczos needs far fewer products.
    `progress=True` shows a bar of the products (up to k * max_iters) with the current estimate.

    Defaults. tol 1e-3 is PyHessian's and `eigenvalues`'. The test is the residual, as in
    `eigenvalues`: stricter than PyHessian's, which stops when the eigenvalue changes by less than
    tol relatively (a residual r bounds the eigenvalue's error by about r^2 / gap). max_iters 1000
    per eigenvalue, measured: power iteration needs about log(tol) / log|lambda_2 / lambda_1|
    products, and on 20 operators (Hessian, GGN and empirical Fisher of the 12-48-3 tanh
    regression MLP over 3 seeds, of a trained 64-128-64-32-10 digits MLP, of a trained digits MLP
    and SmallCNN; the Hessian of the last two at initialisation) it took 6-315 products at tol
    1e-3, with seeds 0 and 1, the most where |lambda_2 / lambda_1| > 0.95 (untrained networks;
    the regression MLP's GGN: 0.987). PyHessian's 100 missed tol on 4 of the 20 with either seed
    (a warning and converged=False; the regression MLP initialised in float64 had a GGN
    eigenvalue 2.5e-3 off after 100 products). Products beyond
    convergence are never spent: the iteration stops at tol. seed None draws one (reported).
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
