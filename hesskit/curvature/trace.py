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
    diagonal of A are those of Q_r Q_r^T A, no randomness left (Q_r: a basis of range(Y))."""

    def __init__(self, A: Counted, num_matvecs: int, distribution: str, gen: torch.Generator):
        s = num_matvecs // 2
        self.W = probes(A.n, s, distribution, gen, A)
        self.Y = A @ self.W
        self.Q, R = torch.linalg.qr(self.Y)
        self.Z = A @ self.Q
        sv = torch.linalg.svdvals(R)
        tol = 1e3 * torch.finfo(R.dtype).eps * sv.max()
        self.exact = bool(sv.min() <= tol)
        if self.exact:  # a basis of range(Y) inside span(Q), and A times it, with no new products
            U, sigma, _ = torch.linalg.svd(self.Y, full_matrices=False)
            Qr = U[:, : int((sigma > tol).sum())]
            self.Q, self.Z = Qr, self.Z @ (self.Q.T @ Qr)
            return
        Rinv_T = torch.linalg.solve_triangular(R, torch.eye(s, dtype=R.dtype, device=R.device), upper=True).T
        self.S = Rinv_T / Rinv_T.norm(dim=0)
        self.H = (self.Q.T @ self.Z + self.Z.T @ self.Q) / 2  # Q^T A Q
        self.T = self.Z.T @ self.W  # Q^T A W = Q^T Y

    def traces(self) -> Tensor:
        """The s leave-one-out estimates tr(P_i A) + ((I - P_i) w_i)^T A ((I - P_i) w_i)."""
        Q, Z, W, Y, S, H, T = self.Q, self.Z, self.W, self.Y, self.S, self.H, self.T
        top = (Q * Z).sum() - ((H @ S) * S).sum(dim=0)  # tr(Q^T A Q) - s_i^T (Q^T A Q) s_i
        C = Q.T @ W
        C = C - S * (S * C).sum(dim=0)  # (I - s_i s_i^T) Q^T w_i, column by column
        # (w - Q c)^T (y - Z c) with A symmetric: w^T y - 2 T_i^T c + c^T H c
        rest = (W * Y).sum(dim=0) - 2 * (T * C).sum(dim=0) + (C * (H @ C)).sum(dim=0)
        return (top + rest).double()

    def diagonals(self) -> Tensor:
        """The s leave-one-out estimates diag(P_i A) + w_i * ((I - P_i) A w_i), as columns (n, s)."""
        Q, Z, W, Y, S, T = self.Q, self.Z, self.W, self.Y, self.S, self.T
        QS, ZS = Q @ S, Z @ S
        top = (Q * Z).sum(dim=1, keepdim=True) - QS * ZS
        rest = W * (Y - Q @ T + QS * (S * T).sum(dim=0))
        return (top + rest).double()


def xtrace(A: Counted, num_matvecs: int, distribution: str, gen: torch.Generator) -> tuple[float, float, int]:
    """XTrace (Epperly, Tropp & Webber 2024): the mean of the s = m/2 leave-one-out estimates of
    `ExchangeableSketch.traces`, each an unbiased Hutch++-type estimate whose sketch uses s - 1 of
    the probes and whose Hutchinson part uses the remaining one. Every product serves both parts,
    where Hutch++ spends two thirds of them on the sketch alone; on flat spectra it stays close to
    Hutchinson, on decaying ones it beats Hutch++. The standard error is that of the mean of the s
    (exchangeable, positively correlated) estimates, the paper's error estimate."""
    sketch = ExchangeableSketch(A, num_matvecs, distribution, gen)
    if sketch.exact:
        return (sketch.Q * sketch.Z).sum().item(), 0.0, num_matvecs // 2
    return (*_mean_and_stderr(sketch.traces()), num_matvecs // 2)


_METHODS = {"hutch++": hutchpp_trace, "hutchinson": hutchinson_trace, "xtrace": xtrace}


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
    offsets: dict[str, range] = {}
    if names is not None:
        start = 0
        for name, p in zip(names, op.params):
            offsets[name] = range(start, start + p.numel())
            start += p.numel()
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


def _block_samples(A: Counted, num_matvecs: int, method: str, distribution: str, gen: torch.Generator,
                   rows: dict[str, Tensor]) -> dict[str, Tensor]:
    """Per block, the random terms whose mean estimates its trace: the block sums of the
    diagonal estimator's terms, z * (A z) per Hutchinson probe, or XDiag's leave-one-out columns."""
    if method == "xtrace":
        sketch = ExchangeableSketch(A, num_matvecs, distribution, gen)
        D = (sketch.Q * sketch.Z).sum(dim=1, keepdim=True).double() if sketch.exact else sketch.diagonals()
        return {b: D[idx.to(D.device)].sum(dim=0) for b, idx in rows.items()}
    parts: dict[str, list[Tensor]] = {b: [] for b in rows}
    for ZAZ in probe_products(A, num_matvecs, distribution, gen):
        for b, idx in rows.items():
            parts[b].append(ZAZ[idx.to(ZAZ.device)].sum(dim=0).double())
    return {b: torch.cat(p) for b, p in parts.items()}


def block_trace(A: Counted, op: Any, num_matvecs: int, method: str, distribution: str, gen: torch.Generator,
                blocks: Any) -> dict[str, Any]:
    """The fields of a BlockTraceResult (see `trace(blocks=...)`)."""
    if method == "hutch++":
        raise ValueError("method: per-block traces share their probes across blocks, which Hutch++'s separate sketch "
                         "and residual probes do not; use method='xtrace' (its leave-one-out diagonal, summed per "
                         "block) or 'hutchinson'")
    rows = block_indices(op, A.n, blocks)
    samples = _block_samples(A, num_matvecs, method, distribution, gen, rows)
    stats = {b: _mean_and_stderr(s) if len(s) > 1 or method == "hutchinson" else (s.item(), 0.0)
             for b, s in samples.items()}
    return dict(values={b: v for b, (v, _) in stats.items()}, stderr={b: e for b, (_, e) in stats.items()},
                samples={b: s.cpu().numpy() for b, s in samples.items()}, sizes={b: len(r) for b, r in rows.items()},
                num_samples=len(next(iter(samples.values()))))


def trace(
    op: Any,
    num_matvecs: int = 99,
    method: str = "hutch++",
    distribution: str = "rademacher",
    seed: int | None = None,
    progress: bool = False,
    blocks: Any = None,
) -> TraceResult | BlockTraceResult:
    """Estimate tr(op) with exactly `num_matvecs` products.

    `method="hutch++"` (default, needs at least 3 products) has error O(1/m) on matrices with a
    few large eigenvalues, against Hutchinson's O(1/sqrt(m)). `method="xtrace"` (an even number
    of products, at most 2n) uses every product for both its sketch and its Hutchinson part
    (Epperly, Tropp & Webber 2024). There is no adaptive early stop:
    the standard error tells how good the estimate is. `op` is a curvature operator or any
    square tensor. `progress=True` shows a bar of the products with the running estimate.

    Where the default comes from: `choose_defaults` in bench/curvature.py (README, "The default
    estimators") measures all three methods on a spiked, a flat indefinite and a low-rank
    curvature matrix at 30, 99 and 300 products. XTrace is within 1.16x of the best everywhere,
    Hutch++ within 1.73x, Hutchinson up to 32x off. The default stays Hutch++ because XTrace
    refuses odd budgets and budgets above 2n, and its standard error is optimistic (0.66-0.87 of
    the true spread); pass `method="xtrace"` with an even budget for the smaller error.

    `blocks` estimates the trace of every diagonal block (a layer's, a parameter's: "module",
    "parameter", or {name: parameter names or row indices}) from the same products and returns a
    `BlockTraceResult`, each block with its standard error. With Hutchinson, block b's estimate
    is the mean of z_b^T (A z)_b over the probes: the cross terms z_b^T A_bc z_c vanish in
    expectation (they add variance: sum_{c != b} ||A_bc||_F^2 per probe); with XTrace it is the
    sum over the block of XDiag's estimate. HAWQ-V2's sensitivities (`hk.quant.sensitivities`)
    are these with Hutchinson.
    """
    check_choice("method", method, tuple(_METHODS))
    check_choice("distribution", distribution, DISTRIBUTIONS)
    check_count("num_matvecs", num_matvecs, {"hutch++": 3, "hutchinson": 1, "xtrace": 4}[method])
    A = Counted(op, progress, num_matvecs, f"trace ({method})")
    if method == "xtrace":
        _check_pairs(num_matvecs, A.n, "XTrace")
    seed, gen = make_generator(seed, A.group)
    if blocks is not None:
        fields = block_trace(A, op, num_matvecs, method, distribution, gen, blocks)
        return BlockTraceResult(method=method, distribution=distribution, **fields, **A.cost(seed))
    value, stderr, num_samples = _METHODS[method](A, num_matvecs, distribution, gen)
    return TraceResult(
        value=value, stderr=stderr, num_samples=num_samples, method=method, distribution=distribution, **A.cost(seed)
    )


def _check_pairs(num_matvecs: int, n: int, name: str) -> None:
    if num_matvecs % 2 or num_matvecs > 2 * n:
        raise ValueError(f"num_matvecs: {name} spends its products in pairs (s = m/2 probes, each used twice); "
                         f"expected an even number between 4 and 2n = {2 * n}, got {num_matvecs}")


def xdiag(A: Counted, num_matvecs: int, distribution: str, gen: torch.Generator) -> tuple[Tensor, Tensor]:
    """XDiag (Epperly, Tropp & Webber 2024): the mean of the s = m/2 leave-one-out diagonal
    estimates of `ExchangeableSketch.diagonals`, with the standard error of that mean per entry."""
    sketch = ExchangeableSketch(A, num_matvecs, distribution, gen)
    if sketch.exact:
        value = (sketch.Q * sketch.Z).sum(dim=1).double()
        return value, torch.zeros_like(value)
    D = sketch.diagonals()
    return D.mean(dim=1), D.std(dim=1) / math.sqrt(D.shape[1])


def diagonal(
    op: Any, num_matvecs: int = 100, distribution: str = "rademacher", seed: int | None = None,
    progress: bool = False, method: str = "hutchinson",
) -> DiagonalResult:
    """Estimate diag(op) as the mean of z * (A z) over probes (Bekas, Kokiopoulou & Saad 2007).

    With Rademacher probes, entry i has variance sum_{j != i} A_ij^2 per probe; the returned
    `stderr` is the sample standard error of each entry. `method="xdiag"` (an even number of
    products) is XDiag (Epperly, Tropp & Webber 2024): a sketch of A's range from half the probes,
    whose diagonal is exact, plus the probes' estimate of what it misses, leave-one-out, so each
    product serves both parts. `progress=True` shows a bar of the products with the running sum
    of the diagonal (the trace it implies).

    Where the default comes from: `choose_defaults` in bench/curvature.py measures both on a
    spiked, a flat indefinite and a low-rank curvature matrix. XDiag's worst case is 1.31x the
    best (a flat indefinite spectrum at 30 products), Hutchinson's 26x on a trained CNN's Hessian
    and far more on a low-rank GGN, so `method="xdiag"` is the better choice at an even budget;
    the default stays Hutchinson because it works with any budget, one probe included (AdaHessian
    and Sophia-H draw one per step).
    """
    check_choice("distribution", distribution, DISTRIBUTIONS)
    check_choice("method", method, ("hutchinson", "xdiag"))
    check_count("num_matvecs", num_matvecs, 4 if method == "xdiag" else 1)
    A = Counted(op, progress, num_matvecs, f"diagonal ({method})")
    seed, gen = make_generator(seed, A.group)
    if method == "xdiag":
        _check_pairs(num_matvecs, A.n, "XDiag")
        value, stderr = xdiag(A, num_matvecs, distribution, gen)
        A.show(f"sum ≈ {value.sum().item():.5g}")
        return DiagonalResult(value=value.to(A.dtype), stderr=stderr.to(A.dtype), distribution=distribution,
                              method=method, **A.cost(seed))
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
    if count > 1:
        stderr = (m2 / (count - 1) / count).sqrt()
    else:
        stderr = torch.full_like(mean, math.nan)
    return DiagonalResult(
        value=mean.to(A.dtype), stderr=stderr.to(A.dtype), distribution=distribution, method=method, **A.cost(seed)
    )


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
    logits: Tensor, params: Any, num_samples: int = 1, seed: int | None = None
) -> DiagonalResult:
    """Estimate the diagonal of the Gauss-Newton matrix of the mean cross-entropy of `logits`
    by the Gauss-Newton-Bartlett estimator (Liu et al. 2023, Sophia, Algorithm 2).

    For the N predictions in `logits` (shape (..., C), with their graph to `params`), draw
    labels y_i from the model's own softmax, take g = grad of (1/N) sum_i CE(logits_i, y_i),
    and return N * g * g. Since E[(p - e_y)(p - e_y)^T] = diag(p) - p p^T is the Hessian of the
    cross-entropy in the logits, N E[g g^T] = (1/N) sum_i J_i^T (diag(p_i) - p_i p_i^T) J_i is
    exactly the GGN: the estimate is unbiased and never negative. Each sample costs one
    backward pass (counted in `num_matvecs`); the graph of `logits` is kept for the caller.
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
