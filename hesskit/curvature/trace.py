"""Randomised trace and diagonal estimation with a fixed budget and an honest standard error."""

from __future__ import annotations

import math
import time
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import Tensor

from .probes import DISTRIBUTIONS, Counted, make_generator, probes
from .._checks import check_choice, check_count
from ..progress import progress_bar
from .results import BlockTraceResult, DiagonalResult, TraceResult

__all__ = ["trace", "diagonal", "gauss_newton_bartlett"]

_CHUNK = 32  # probe columns multiplied at once: bounds memory at n x 32


def probe_products(A: Counted, num: int, distribution: str, gen: torch.Generator,
                   basis: Tensor | None = None) -> Iterator[Tensor]:
    """z * (A z) for `num` random probes z, as (n, c) chunks of at most _CHUNK probe columns (which
    bounds memory at n x _CHUNK); with a basis Q the probes are first deflated, z <- (I - Q Q^T) z.
    The one loop behind Hutchinson's trace, its per-block traces and its diagonal."""
    for start in range(0, num, _CHUNK):
        Z = probes(A.n, min(_CHUNK, num - start), distribution, gen, A)
        if basis is not None:
            Z = Z - basis @ (basis.T @ Z)
        yield Z * (A @ Z)


def _quadratic_forms(A: Counted, num: int, distribution: str, gen: torch.Generator, basis: Tensor | None = None,
                     offset: float = 0.0) -> Tensor:
    """z^T P A P z for `num` random probes z, with P = I - Q Q^T when a basis Q is given. The
    running trace estimate (offset + mean so far) goes next to the progress bar."""
    samples = []
    for ZAZ in probe_products(A, num, distribution, gen, basis):
        samples.append(ZAZ.sum(dim=0))
        A.show(f"trace ≈ {offset + torch.cat(samples).double().mean().item():.5g}")
    return torch.cat(samples).double()


def _mean_and_stderr(samples: Tensor) -> tuple[float, float]:
    mean = samples.mean().item()
    stderr = (samples.std() / math.sqrt(len(samples))).item() if len(samples) > 1 else math.nan
    return mean, stderr


def hutchinson_trace(A: Counted, num_matvecs: int, distribution: str, gen: torch.Generator) -> tuple[float, float, int]:
    """Hutchinson (1989): tr(A) = E[z^T A z] for probes with E[z z^T] = I."""
    return (*_mean_and_stderr(_quadratic_forms(A, num_matvecs, distribution, gen)), num_matvecs)


def hutchpp_trace(A: Counted, num_matvecs: int, distribution: str, gen: torch.Generator) -> tuple[float, float, int]:
    """Hutch++ (Meyer, Musco, Musco & Woodruff 2021): exact trace on a sketched top subspace
    plus Hutchinson on the rest.

    With m products: Q = orth(A S) for m/3 probes S; tr(Q^T A Q) exactly (m/3 products); then
    Hutchinson on (I - QQ^T) A (I - QQ^T) with the remaining probes. The standard error comes
    from the Hutchinson part (the rest is exact given Q).
    """
    k = num_matvecs // 3
    sketch = A @ probes(A.n, k, distribution, gen, A)
    Q = torch.linalg.qr(sketch).Q
    top = (Q * (A @ Q)).sum().item()
    rest, stderr = _mean_and_stderr(_quadratic_forms(A, num_matvecs - 2 * k, distribution, gen, basis=Q, offset=top))
    return top + rest, stderr, num_matvecs - 2 * k


class ExchangeableSketch:
    """What XTrace and XDiag (Epperly, Tropp & Webber, SIAM J. Matrix Anal. Appl. 2024) build from
    s = m/2 probes W and m products: Y = A W, an orthonormal basis Q of range(Y) (Y = Q R) and
    Z = A Q. Every probe w_i serves twice. With S the columns of R^{-T}, normalised,

        P_i = Q (I - s_i s_i^T) Q^T

    is the projector onto the span of the *other* s - 1 columns of Y, so w_i is independent of P_i
    and can estimate what P_i misses, without bias ("leave one out"). `exact` is True when Y has
    lower rank than s: then range(Y) = range(A) (Y = A W with random W), and the trace and
    diagonal of A are those of Q_r Q_r^T A, no randomness left (Q_r: a basis of range(Y)).

    An odd budget spends its last product on one more probe z, deflated by the whole sketch:
    tr(Q^T A Q) + z^T (I - QQ^T) A (I - QQ^T) z (and its diagonal counterpart) is unbiased too and
    is averaged with the s leave-one-out estimates.

    The trace needs only s x s matrices (R, H = Q^T A Q, C = Q^T W, T = Z^T W and the w_i^T y_i),
    so `without(drop)` can recompute it for a sketch that never saw some probes (the jackknife
    below) at O(s^3) cost; the diagonal needs the n x s ones as well (`vectors=True`)."""

    def __init__(self, A: Counted, num_matvecs: int, distribution: str, gen: torch.Generator):
        s = num_matvecs // 2
        W = probes(A.n, s, distribution, gen, A)
        Y = A @ W
        Q, R = torch.linalg.qr(Y)
        Z = A @ Q
        sv = torch.linalg.svdvals(R)
        tol = 1e3 * torch.finfo(R.dtype).eps * sv.max()
        self.exact = bool(sv.min() <= tol)
        if self.exact:  # a basis of range(Y) inside span(Q), and A times it, with no new products
            U, sigma, _ = torch.linalg.svd(Y, full_matrices=False)
            Qr = U[:, : int((sigma > tol).sum())]
            self.Q, self.Z = Qr, Z @ (Q.T @ Qr)
            return
        self.vectors = (W, Y, Q, Z)
        self.R, self.H, self.C, self.T = R, (Q.T @ Z + Z.T @ Q) / 2, Q.T @ W, Z.T @ W
        self.wy, self.top = (W * Y).sum(dim=0), (Q * Z).sum()  # w_i^T y_i; tr(Q^T A Q)
        self.extra = None
        if num_matvecs % 2:
            z = probes(A.n, 1, distribution, gen, A)[:, 0]
            u = A @ z
            self.extra = (z, u, Q.T @ z, Q.T @ u, torch.dot(z, u))  # z, A z, Q^T z, Q^T A z, z^T A z

    @property
    def S(self) -> Tensor:
        Rinv_T = torch.linalg.solve_triangular(self.R, torch.eye(len(self.R), dtype=self.R.dtype, device=self.R.device),
                                               upper=True).T
        return Rinv_T / Rinv_T.norm(dim=0)

    def without(self, drop: Tensor, vectors: bool = False) -> "ExchangeableSketch":
        """The sketch the probes outside `drop` would have built, from the same products: range(Y
        without those columns) = range(Q U), with R[:, keep] = U R'. Only the s x s matrices unless
        `vectors` (the n x s ones, for the diagonal)."""
        keep = torch.ones(self.R.shape[1], dtype=torch.bool, device=self.R.device)
        keep[drop] = False
        U, R = torch.linalg.qr(self.R[:, keep])
        out = ExchangeableSketch.__new__(ExchangeableSketch)
        out.exact, out.R, out.H = False, R, U.T @ self.H @ U
        out.C, out.T, out.wy, out.top = U.T @ self.C[:, keep], U.T @ self.T[:, keep], self.wy[keep], out.H.trace()
        out.vectors = None
        if vectors:
            W, Y, Q, Z = self.vectors
            out.vectors = (W[:, keep], Y[:, keep], Q @ U, Z @ U)
        out.extra = None
        if self.extra is not None:
            z, u, qz, qu, zu = self.extra
            out.extra = (z, u, U.T @ qz, U.T @ qu, zu)
        return out

    def traces(self) -> Tensor:
        """The s leave-one-out estimates tr(P_i A) + ((I - P_i) w_i)^T A ((I - P_i) w_i) (and the
        odd budget's extra estimate, last)."""
        S, H, T = self.S, self.H, self.T
        top = self.top - ((H @ S) * S).sum(dim=0)  # tr(Q^T A Q) - s_i^T (Q^T A Q) s_i
        C = self.C - S * (S * self.C).sum(dim=0)  # (I - s_i s_i^T) Q^T w_i, column by column
        # (w - Q c)^T (y - Z c) with A symmetric: w^T y - 2 T_i^T c + c^T H c
        out = top + (self.wy - 2 * (T * C).sum(dim=0) + (C * (H @ C)).sum(dim=0))
        if self.extra is not None:  # tr(Q^T A Q) + z^T A z - 2 (Q^T z)^T (Q^T A z) + (Q^T z)^T H (Q^T z)
            _, _, qz, qu, zu = self.extra
            out = torch.cat([out, (self.top + zu - 2 * torch.dot(qz, qu) + qz @ H @ qz).reshape(1)])
        return out.double()

    def diagonals(self) -> Tensor:
        """The s leave-one-out estimates diag(P_i A) + w_i * ((I - P_i) A w_i), as columns (n, s)
        (and the odd budget's extra estimate, last)."""
        W, Y, Q, Z = self.vectors
        S, T = self.S, self.T
        QS, ZS = Q @ S, Z @ S
        QZ = (Q * Z).sum(dim=1, keepdim=True)
        out = QZ - QS * ZS + W * (Y - Q @ T + QS * (S * T).sum(dim=0))
        if self.extra is not None:  # diag(Q Z^T) + z * ((I - QQ^T) A z)
            z, u, _, qu, _ = self.extra
            out = torch.cat([out, QZ + (z * (u - Q @ qu))[:, None]], dim=1)
        return out.double()


def jackknife_stderr(replicates: Tensor) -> Tensor:
    """The delete-a-group jackknife's standard error (Quenouille 1956; Tukey 1958) from the g
    replicates theta_(-k) along dim 0 (the estimate recomputed without the k-th group of probes):
    sqrt((g - 1) / g * sum_k (theta_(-k) - mean)^2). For a statistic of independent probes it is
    conservative: in expectation it is at least the variance of the estimate from the probes of g-1
    groups (Efron & Stein 1981), so it errs on the side of wide intervals."""
    g = replicates.shape[0]
    return ((g - 1) / g * ((replicates - replicates.mean(dim=0)) ** 2).sum(dim=0)).sqrt()

TRACE_GROUPS = 50  # jackknife replicates of the trace: each costs O(s^3), no products
DIAGONAL_GROUPS = 10  # of the diagonal: each costs two (n, s) x (s, s) products of matrices


def probe_groups(s: int, g: int) -> tuple[Tensor, ...]:
    """The s probes' indices in min(g, s) contiguous groups (the probes are exchangeable)."""
    return torch.arange(s).chunk(min(g, s))


def xtrace(A: Counted, num_matvecs: int, distribution: str, gen: torch.Generator) -> tuple[float, float, int]:
    """XTrace (Epperly, Tropp & Webber 2024): the mean of the s = m/2 leave-one-out estimates of
    `ExchangeableSketch.traces`, each an unbiased Hutch++-type estimate whose sketch uses s - 1 of
    the probes and whose Hutchinson part uses the remaining one. Every product serves both parts,
    where Hutch++ spends two thirds of them on the sketch alone; on flat spectra it stays close to
    Hutchinson, on decaying ones it beats Hutch++.

    The s estimates share their probes, so their spread understates the error of their mean (the
    paper's error estimate: 0.6-0.9 of the true spread, measured). The standard error here is the
    jackknife's over up to `TRACE_GROUPS` groups of probes, conservative by Efron & Stein: 1.1-2.3
    times the true spread on flat, decaying and low-rank spectra at 10-60 products (up to 2.7 on
    notebook 01's MLP Hessian at 192), and +-1.96
    standard errors covered the truth in 84-100% of 300 seeds (90% or more from 31 products on;
    tests/curvature/test_xtrace.py).
    Returns (value, stderr, number of jackknife replicates: the degrees of freedom + 1)."""
    sketch = ExchangeableSketch(A, num_matvecs, distribution, gen)
    if sketch.exact:
        return (sketch.Q * sketch.Z).sum().item(), 0.0, num_matvecs // 2
    groups = probe_groups(num_matvecs // 2, TRACE_GROUPS)
    replicates = torch.stack([sketch.without(drop).traces().mean() for drop in groups])
    return sketch.traces().mean().item(), jackknife_stderr(replicates).item(), len(groups)


def unit_diagonal(A: Counted) -> Tensor:
    """diag(A) exactly, from the n unit vectors, `_CHUNK` at a time (n products)."""
    out = []
    for start in range(0, A.n, _CHUNK):
        c = min(_CHUNK, A.n - start)
        E = torch.zeros(A.n, c, dtype=A.dtype, device=A.device)
        E[torch.arange(start, start + c), torch.arange(c)] = 1
        out.append((A @ E)[start : start + c].diagonal())
    return torch.cat(out).double()


_METHODS = {"xtrace": xtrace, "hutch++": hutchpp_trace, "hutchinson": hutchinson_trace}
# the fewest products each method takes (XTrace/XDiag: 2 probes, each used twice; fewer only when
# the budget reaches n, where the answer is exact)
MIN_MATVECS = {"xtrace": 4, "hutch++": 3, "hutchinson": 1, "xdiag": 4}


def block_indices(op: Any, n: int, blocks: Any) -> dict[str, Tensor]:
    """{block name: the row indices of op it covers} for `blocks`: "module" or "parameter" (the
    operator's `layer_groups`), or a mapping from block names to parameter names of the operator
    or, for any operator, to row indices (a slice, a list or a tensor of ints)."""
    names = getattr(op, "param_names", None)
    if isinstance(blocks, str):
        if names is None:
            raise ValueError(f"blocks: {blocks!r} needs a curvature operator with named parameters; for a matrix "
                             "pass {name: row indices}")
        from .operators import layer_groups

        blocks = layer_groups(names, blocks)
    if not isinstance(blocks, Mapping) or not blocks:
        raise TypeError(f"blocks: expected 'module', 'parameter' or a non-empty mapping {{name: parameter names or row "
                        f"indices}}, got {type(blocks).__name__}")
    offsets = {name: rows for name, (rows, _) in parameter_rows(op).items()}
    out = {}
    for block, members in blocks.items():
        if isinstance(members, str):
            members = [members]
        if isinstance(members, slice):
            rows = torch.arange(n)[members]
        elif all(isinstance(m, str) for m in members):
            missing = [m for m in members if m not in offsets]
            if missing:
                raise ValueError(f"blocks[{block!r}]: {missing} are not parameters of the operator ({names})")
            rows = torch.tensor([i for m in members for i in offsets[m]], dtype=torch.long)
        else:
            rows = torch.as_tensor(list(members) if not isinstance(members, Tensor) else members, dtype=torch.long)
            if rows.numel() and (rows.min() < 0 or rows.max() >= n):
                raise ValueError(f"blocks[{block!r}]: row indices outside 0..{n - 1}")
        out[str(block)] = rows
    return out


def xdiag(A: Counted, num_matvecs: int, distribution: str, gen: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
    """XDiag (Epperly, Tropp & Webber 2024): the mean of the s = m/2 leave-one-out diagonal
    estimates of `ExchangeableSketch.diagonals`. Returns (the estimate, its leave-one-out columns
    (n, s), the jackknife replicates (g, n): the estimate without each of g = `DIAGONAL_GROUPS`
    groups of probes). Their spread is the standard error (`jackknife_stderr`): the columns share
    their probes, so theirs would understate it, as XTrace's do."""
    sketch = ExchangeableSketch(A, num_matvecs, distribution, gen)
    if sketch.exact:
        value = (sketch.Q * sketch.Z).sum(dim=1).double()
        return value, value[:, None], value[None]
    columns = sketch.diagonals()
    replicates = torch.stack([sketch.without(drop, vectors=True).diagonals().mean(dim=1)
                              for drop in probe_groups(num_matvecs // 2, DIAGONAL_GROUPS)])
    return columns.mean(dim=1), columns, replicates


def _block_samples(A: Counted, num_matvecs: int, method: str, distribution: str, gen: torch.Generator,
                   rows: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, float]]:
    """Per block, the random terms whose mean estimates its trace, and its standard error: the
    block sums of the diagonal estimator's terms, z * (A z) per Hutchinson probe (their standard
    error), or XDiag's leave-one-out columns (the jackknife's, over block sums of its replicates)."""
    if method == "xtrace":
        _, columns, replicates = xdiag(A, num_matvecs, distribution, gen)
        sums = {b: columns[idx.to(columns.device)].sum(dim=0) for b, idx in rows.items()}
        return sums, {b: jackknife_stderr(replicates[:, idx.to(replicates.device)].sum(dim=1)).item()
                      for b, idx in rows.items()}
    parts: dict[str, list[Tensor]] = {b: [] for b in rows}
    for ZAZ in probe_products(A, num_matvecs, distribution, gen):
        for b, idx in rows.items():
            parts[b].append(ZAZ[idx.to(ZAZ.device)].sum(dim=0).double())
    samples = {b: torch.cat(p) for b, p in parts.items()}
    return samples, {b: _mean_and_stderr(s)[1] for b, s in samples.items()}


def block_trace(A: Counted, op: Any, num_matvecs: int, method: str, distribution: str, gen: torch.Generator,
                blocks: Any) -> dict[str, Any]:
    """The fields of a BlockTraceResult (see `trace(blocks=...)`)."""
    if method == "hutch++":
        raise ValueError("method: per-block traces share their probes across blocks, which Hutch++'s separate sketch "
                         "and residual probes do not; use method='xtrace' (its leave-one-out diagonal, summed per "
                         "block) or 'hutchinson'")
    rows = block_indices(op, A.n, blocks)
    if method == "exact":
        diag = unit_diagonal(A)
        samples = {b: diag[idx.to(diag.device)].sum().reshape(1) for b, idx in rows.items()}
        stderr = {b: 0.0 for b in rows}
    else:
        samples, stderr = _block_samples(A, num_matvecs, method, distribution, gen, rows)
    return dict(values={b: s.mean().item() for b, s in samples.items()}, stderr=stderr,
                samples={b: s.cpu().numpy() for b, s in samples.items()}, sizes={b: len(r) for b, r in rows.items()},
                num_samples=len(next(iter(samples.values()))))


def _exchangeable_budget(A: Counted, num_matvecs: int, name: str) -> bool:
    """Check an XTrace/XDiag budget; True when it reaches n, where the n unit vectors give the exact
    answer with n products (cheaper than any sketch that size, and no error left)."""
    if num_matvecs >= A.n:
        return True
    if num_matvecs < MIN_MATVECS["xtrace"]:
        raise ValueError(f"num_matvecs: {name} needs at least 4 products (2 probes, each used twice), or n = {A.n} "
                         f"for the exact answer; got {num_matvecs}. With fewer, use method='hutchinson'")
    return False


def trace(
    op: Any,
    num_matvecs: int = 100,
    method: str = "xtrace",
    distribution: str = "rademacher",
    seed: int | None = None,
    progress: bool = False,
    blocks: Any = None,
) -> TraceResult | BlockTraceResult:
    """Estimate tr(op) with `num_matvecs` products.

    Methods (all unbiased; no adaptive early stop: the standard error tells how good the estimate
    is):
    - "xtrace" (default; Epperly, Tropp & Webber 2024): s = m/2 probes, each used twice, for a
      sketch of the top eigenspace whose trace is exact and a leave-one-out Hutchinson estimate of
      the rest. Its standard error is the jackknife's (conservative, see `xtrace`). An odd budget
      spends its last product on one more Hutchinson probe of the deflated rest; a budget of n or
      more computes the exact trace from the n unit vectors with n products (`method` then reads
      "exact", `stderr` 0). At least 4 products otherwise.
    - "hutch++" (Meyer, Musco, Musco & Woodruff 2021): m/3 products for the sketch, m/3 for its
      exact trace, m/3 Hutchinson probes of the rest; at least 3.
    - "hutchinson" (1989): the mean of z^T A z over m probes; any budget, one included.

    Where the default comes from: `choose_defaults` in bench/curvature.py (README, "The default
    estimators") measures all three methods on a spiked (a trained CNN's Hessian), a flat
    indefinite (a BatchNorm CNN's at initialisation) and a low-rank (an MLP's GGN) curvature
    matrix at 30, 99 and 300 products, 50 seeds each: XTrace is within 1.16x of the best
    everywhere, Hutch++ within 1.73x, Hutchinson up to 32x off. 100 products: about 1% error on
    a trained network's Hessian (README) for the cost of 100 Hessian-vector products; on the
    held-out problems of tests/curvature/test_curvature_defaults.py 0.2-4% on an untrained tanh
    regression MLP's indefinite Hessian (n = 771) and 0.05-0.2% on a trained digits MLP's
    (n = 18,986), each within 1 standard error. distribution "rademacher": the probe whose
    z^T A z has the least variance among i.i.d. unit-variance probes (Hutchinson 1989). seed None
    draws a fresh seed, reported in `result.seed`.

    `op` is a curvature operator or any square tensor. `progress=True` shows a bar of the
    products with the running estimate.

    `blocks` estimates the trace of every diagonal block (a layer's, a parameter's: "module",
    "parameter", or {name: parameter names or row indices}) from the same products and returns a
    `BlockTraceResult`, each block with its standard error. With XTrace a block's estimate is the
    sum over the block of XDiag's estimate (Hutch++'s separate probes cannot be shared, so it is
    refused). With Hutchinson, block b's estimate is the mean of z_b^T (A z)_b over the probes:
    the cross terms z_b^T A_bc z_c vanish in expectation (they add variance: sum_{c != b}
    ||A_bc||_F^2 per probe). HAWQ-V2's sensitivities (`hk.quant.sensitivities`) are these with
    Hutchinson.
    """
    check_choice("method", method, tuple(_METHODS))
    check_choice("distribution", distribution, DISTRIBUTIONS)
    A = Counted(op)
    check_count("num_matvecs", num_matvecs, 1 if method == "xtrace" else MIN_MATVECS[method])
    if method == "xtrace" and _exchangeable_budget(A, num_matvecs, "XTrace"):
        method = "exact"
    A.bar = progress_bar(progress, A.n if method == "exact" else num_matvecs, f"trace ({method})", group=A.group)
    seed, gen = make_generator(seed, A.group)
    if blocks is not None:
        fields = block_trace(A, op, num_matvecs, method, distribution, gen, blocks)
        return BlockTraceResult(method=method, distribution=distribution, **fields, **A.cost(seed))
    if method == "exact":
        value, stderr, num_samples = unit_diagonal(A).sum().item(), 0.0, A.n
    else:
        value, stderr, num_samples = _METHODS[method](A, num_matvecs, distribution, gen)
    A.show(f"trace ≈ {value:.5g}")
    return TraceResult(
        value=value, stderr=stderr, num_samples=num_samples, method=method, distribution=distribution, **A.cost(seed)
    )


def diagonal(
    op: Any, num_matvecs: int = 100, distribution: str = "rademacher", seed: int | None = None,
    progress: bool = False, method: str = "xdiag", blocks: Any = None,
) -> DiagonalResult:
    """Estimate diag(op) with `num_matvecs` products.

    - "xdiag" (default; Epperly, Tropp & Webber 2024): a sketch of A's range from s = m/2 probes,
      whose diagonal is exact, plus the probes' estimate of what it misses, leave-one-out, so each
      product serves both parts. The standard error of each entry is the jackknife's over
      `DIAGONAL_GROUPS` groups of probes (conservative: per entry 1.0-2.6 times the true spread,
      median 1.1-2.2, on the spectra of tests/curvature/test_xtrace.py). Odd budgets and budgets of n or more as `trace`'s XTrace.
    - "hutchinson": the mean of z * (A z) over probes (Bekas, Kokiopoulou & Saad 2007). Entry i
      has variance sum_{j != i} A_ij^2 per probe; `stderr` is the sample standard error of each
      entry. Any budget, one probe included (AdaHessian and Sophia-H draw one per step).

    Where the default comes from: `choose_defaults` in bench/curvature.py measures both on a
    spiked, a flat indefinite and a low-rank curvature matrix (README, "The default estimators").
    XDiag's worst case is 1.31x the best (the flat indefinite spectrum at 30 products: with
    nothing for the sketch to capture, XDiag is Hutchinson on half the probes, at most sqrt(2)
    worse); Hutchinson's is 26x on a trained CNN's Hessian and far more on a low-rank GGN.
    On the held-out problems of tests/curvature/test_curvature_defaults.py the relative error
    ||estimate - diag|| / ||diag|| at 100 products is about 0.4 on the untrained regression
    MLP's flat, indefinite Hessian (n = 771: the sketch has nothing to capture) and 0.04 on the
    trained digits MLP's (256 digits), with standard errors that cover it (the root mean square
    of error / stderr is 0.97 and 0.80). distribution and seed as `trace`'s.

    `blocks` ("module", "parameter" or {name: parameter names or row indices}, as `trace`'s)
    labels the estimate's entries by block: `result.block(name)` is that block's (value, stderr),
    shaped like the parameter when the block is one parameter. `progress=True` shows a bar of
    the products with the running sum of the diagonal (the trace it implies).
    """
    check_choice("distribution", distribution, DISTRIBUTIONS)
    check_choice("method", method, ("hutchinson", "xdiag"))
    A = Counted(op)
    check_count("num_matvecs", num_matvecs, 1)
    if method == "xdiag" and _exchangeable_budget(A, num_matvecs, "XDiag"):
        method = "exact"
    A.bar = progress_bar(progress, A.n if method == "exact" else num_matvecs, f"diagonal ({method})", group=A.group)
    rows = None if blocks is None else block_indices(op, A.n, blocks)
    seed, gen = make_generator(seed, A.group)
    if method == "hutchinson":
        mean, stderr = hutchinson_diag(A, num_matvecs, distribution, gen)
    elif method == "exact":
        mean = unit_diagonal(A)
        stderr = torch.zeros_like(mean)
    else:
        mean, _, replicates = xdiag(A, num_matvecs, distribution, gen)
        stderr = jackknife_stderr(replicates)
    A.show(f"sum ≈ {mean.sum().item():.5g}")
    return DiagonalResult(value=mean.to(A.dtype), stderr=stderr.to(A.dtype), distribution=distribution, method=method,
                          blocks=rows, block_shapes=None if rows is None else block_shapes(op, rows), **A.cost(seed))


def hutchinson_diag(A: Counted, num_matvecs: int, distribution: str, gen: torch.Generator) -> tuple[Tensor, Tensor]:
    """The mean of z * (A z) over `num_matvecs` probes and its per-entry standard error (nan with one
    probe), merged chunk by chunk."""
    count, mean, m2 = 0, torch.zeros(A.n, dtype=torch.float64, device=A.device), None
    for ZAZ in probe_products(A, num_matvecs, distribution, gen):
        S = ZAZ.double()
        # merge this chunk's mean and squared deviations (Chan, Golub & LeVeque 1983): stable
        c, chunk_mean = S.shape[1], S.mean(dim=1)
        chunk_m2 = ((S - chunk_mean[:, None]) ** 2).sum(dim=1)
        delta = chunk_mean - mean
        m2 = chunk_m2 if m2 is None else m2 + chunk_m2 + delta**2 * count * c / (count + c)
        mean = mean + delta * c / (count + c)
        count += c
        A.show(f"sum ≈ {mean.sum().item():.5g}")
    stderr = (m2 / (count - 1) / count).sqrt() if count > 1 else torch.full_like(mean, math.nan)
    return mean, stderr


def parameter_rows(op: Any) -> dict[str, tuple[range, tuple[int, ...]]]:
    """{parameter name: (its rows of op, its shape)} for a curvature operator; {} for a matrix."""
    out, start = {}, 0
    for name, p in zip(getattr(op, "param_names", None) or (), getattr(op, "params", ())):
        out[name] = (range(start, start + p.numel()), tuple(p.shape))
        start += p.numel()
    return out


def block_shapes(op: Any, rows: dict[str, Tensor]) -> dict[str, tuple[int, ...] | None]:
    """Per block, the shape of the parameter it is, when it is exactly one parameter of op (else None)."""
    shapes: dict[str, tuple[int, ...] | None] = {}
    spans = {(r.start, r.stop): shape for r, shape in parameter_rows(op).values()}
    for b, idx in rows.items():
        span = (int(idx[0]), int(idx[-1]) + 1) if len(idx) else None
        contiguous = span is not None and len(idx) == span[1] - span[0] and bool((idx.diff() == 1).all())
        shapes[b] = spans.get(span) if contiguous else None
    return shapes


def sampled_label_loss(logits: Tensor, gen: torch.Generator) -> Tensor:
    """Mean cross-entropy of `logits` (classes last) on labels drawn from their own softmax by `gen`.

    Its gradient g_hat is the "true Fisher" sample behind Sophia-G's Gauss-Newton-Bartlett
    estimate and K-FAC's fisher="mc": for each prediction E_y[(p - e_y)(p - e_y)^T] =
    diag(p) - p p^T, the Hessian of the cross-entropy in the logits.
    """
    import torch.nn.functional as F

    flat = logits.reshape(-1, logits.shape[-1])
    probs = torch.softmax(flat.detach().double(), dim=-1).cpu()
    if not torch.isfinite(probs).all():
        raise ValueError("logits: contain nan or inf")
    labels = torch.multinomial(probs, 1, generator=gen).squeeze(1).to(flat.device)
    return F.cross_entropy(flat, labels)


def gauss_newton_bartlett(
    logits: Tensor, params: Any, num_samples: int = 100, seed: int | None = None
) -> DiagonalResult:
    """Estimate the diagonal of the Gauss-Newton matrix of the mean cross-entropy of `logits`
    by the Gauss-Newton-Bartlett estimator (Liu et al. 2023, Sophia, Algorithm 2).

    For the N predictions in `logits` (shape (..., C), with their graph to `params`), draw
    labels y_i from the model's own softmax, take g = grad of (1/N) sum_i CE(logits_i, y_i),
    and return N * g * g, averaged over `num_samples` draws. Since E[(p - e_y)(p - e_y)^T] =
    diag(p) - p p^T is the Hessian of the cross-entropy in the logits, N E[g g^T] =
    (1/N) sum_i J_i^T (diag(p_i) - p_i p_i^T) J_i is exactly the GGN: the estimate is unbiased
    and never negative. Each sample costs one backward pass (counted in `num_matvecs`); the
    graph of `logits` is kept for the caller. Only for a softmax cross-entropy: the labels are
    drawn from softmax(logits), whatever loss the caller trains.

    num_samples default 100, measured: Sophia's Algorithm 2 draws one sample per estimate and
    averages estimates over steps (an EMA; `hk.optim.Sophia` passes num_samples=1), but one
    sample alone is noise: against the exact GGN diagonal (`GGNOperator.exact_diagonal`) of 256
    digits on six classifiers (digits MLPs and a SmallCNN, trained and at initialisation), the
    relative error ||estimate - diag|| / ||diag|| was 0.79-1.76 with 1 sample, 0.33-0.49 with 10
    and 0.11-0.19 with 100 (median of 3 seeds), and one sample has no standard error (nan). 100
    is also `hk.diagonal`'s default budget; on the same GGNs `hk.diagonal(hk.GGNOperator(...))`
    with its 100 products (each about three backward passes) was within 0.004-0.085. seed None
    draws one (reported).

    `stderr` is the spread over the draws. Where the model is confident the estimate is
    heavy-tailed (the curvature comes from rare labels, which a few draws may never pick), and
    the spread understates the error of such entries: on the trained digits MLP of
    tests/curvature/test_curvature_defaults.py 1-2% of the entries were beyond 4 standard errors
    with 128 digits, and with 32 digits 3% of them had the same value in all 100 draws.
    """
    from .._checks import check_graph_params

    start = time.perf_counter()
    params = check_graph_params(params)
    check_count("num_samples", num_samples)
    if not isinstance(logits, Tensor) or logits.dim() < 2 or not logits.requires_grad:
        raise ValueError("logits: expected model outputs of shape (..., classes) with their graph to params")
    seed, gen = make_generator(seed)
    num_predictions = logits[..., 0].numel()
    samples = []
    backward_time = 0.0
    for _ in range(num_samples):
        loss = sampled_label_loss(logits, gen)
        t0 = time.perf_counter()
        grads = torch.autograd.grad(loss, params, retain_graph=True, materialize_grads=True)
        backward_time += time.perf_counter() - t0
        g = torch.cat([t.reshape(-1) for t in grads])
        samples.append(num_predictions * g.double() ** 2)
    S = torch.stack(samples)
    stderr = S.std(dim=0) / math.sqrt(num_samples) if num_samples > 1 else torch.full_like(S[0], math.nan)
    return DiagonalResult(
        value=S.mean(dim=0).to(logits.dtype), stderr=stderr.to(logits.dtype), distribution="model labels",
        method="gauss_newton_bartlett", num_matvecs=num_samples, seed=seed, wall_time=time.perf_counter() - start, matvec_time=backward_time,
    )
