"""M-FAC: exact inverse-Hessian-vector products of a damped empirical Fisher over m gradients.

The dynamic algorithm of Frantar, Kurtic & Alistarh, "M-FAC: Efficient Matrix-Free
Approximations of Second-Order Information", NeurIPS 2021 (arXiv 2107.03356): keep the last m
gradients g_1..g_m (a ring buffer G, m x d) and use

    F = damping * I + (1/m) sum_i g_i g_i^T = damping * I + (1/m) G^T G

as the curvature. By the Woodbury identity, with the small m x m matrix K = m*damping*I + G G^T,

    F^{-1} x = ( x - G^T K^{-1} (G x) ) / damping,

so a product costs two passes over G (O(dm)) and one m x m solve (O(m^2)), and no d x d
matrix is ever formed.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .._checks import check_count, check_damping
from .operators import MatrixFreeOperator

__all__ = ["MFACInverseOperator"]


class MFACInverseOperator(MatrixFreeOperator):
    r"""The inverse of a damped empirical Fisher over a sliding window of m gradients, as an operator.

        F = damping * I + (1/m) sum_{i=1}^m g_i g_i^T,        `inv @ x` = F^{-1} x

    (M-FAC's dynamic algorithm, Frantar, Kurtic & Alistarh, NeurIPS 2021). `inv @ x` takes x of
    shape (d,) or (d, k) and works with every hesskit estimator (`hk.trace(inv)`,
    `hk.eigenvalues(inv)`, `inv.dense()` for small d, `inv.to_scipy()`).

    * `update(g)` swaps g into the ring buffer in place of the oldest gradient: one row and one
      column of the m x m Gram matrix G G^T change (O(dm)), and K = m*damping*I + G G^T is
      refactorised by a float64 Cholesky (O(m^3)) at the next product.
    * `inv @ x` then costs O(dm + m^2) via Woodbury: F^{-1} x = (x - G^T K^{-1} G x) / damping.
    * `update_and_apply(g)` does both (the official `update_mul`), but as F^{-1} g = m G^T K^{-1} e_s
      for the gradient just written to row s: two passes over G, and no cancellation.

    While the window is filling, m stays fixed and the rows not yet written are zero, so after
    n < m updates F = damping*I + (1/m) sum_{i<=n} g_i g_i^T. This is the official code's
    convention (its window starts as an m x d matrix of zeros).

    Differences from the official code (IST-DASLab/M-FAC, `optim.HInvFastUpMulti`): it factorises
    (K / damping) with an *unpivoted* LU (`torch.lu(pivot=False)`), which PyTorch implements only
    on CUDA, and substitutes through it with a Python loop over m (or a CUDA extension). Here K is
    symmetric positive definite, so a Cholesky factorisation in float64 (`torch.linalg.cholesky`,
    CPU and CUDA) solves it; if rounding in a float32 Gram matrix makes K numerically indefinite,
    a pivoted LU is used for that factorisation instead (`factorization` says which). The Gram matrix
    keeps the window's dtype (its entries are dot products computed in that dtype); only the
    m x m algebra runs in float64. In float32 the subtraction x - G^T K^{-1} G x cancels when
    damping is much smaller than the squared gradient norms, as in the official code, so expect
    float32 products to have a relative error of about eps32 * |x| / (damping * |F^{-1} x|)
    (within 2x of the error measured in notebook 09); the
    optimizer's product with a gradient of the window (`update_and_apply`) avoids that subtraction.

    Args:
        dim: d, the number of parameters (the length of each gradient).
        num_grads: m, the window size (official default 1024; 32 here, a CPU-sized window whose
            memory is 32 copies of the model).
        damping: lambda > 0 (default 1e-4; the official optimizer and pruning script use 1e-5,
            which in float32 makes general products `inv @ x` lose digits, see above).
        dtype, device: of the stored gradients and of the products (default: torch's default
            dtype, CPU).
    """

    kind = "mfac_inverse"

    def __init__(self, dim: int, num_grads: int = 32, damping: float = 1e-4, dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None):
        dim = check_count("dim", dim)
        self.num_grads = check_count("num_grads", num_grads)
        self.damping = check_damping(damping)
        dtype = torch.get_default_dtype() if dtype is None else dtype
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise TypeError(f"dtype: expected a floating-point torch.dtype, got {dtype!r}")
        device = torch.device("cpu" if device is None else device)
        super().__init__(dim, dtype, device)
        self.grads = torch.zeros(self.num_grads, dim, dtype=dtype, device=device)  # G, the ring buffer
        self.gram = torch.zeros(self.num_grads, self.num_grads, dtype=dtype, device=device)  # G G^T
        self.count = 0  # gradients inserted so far; the next one goes to row count % m
        self._factor: tuple[str, Tensor, Tensor | None] | None = None
        self._factor_damping = None

    # ----------------------------------------------------------------- the window
    @property
    def num_filled(self) -> int:
        """How many rows of the window hold a gradient (min(count, m)); the others are zero."""
        return min(self.count, self.num_grads)

    @property
    def factorization(self) -> str:
        """"cholesky" (the usual case) or "lu" (K was numerically indefinite), for the current window."""
        return self._factorize()[0]

    def _check_gradient(self, g: Any) -> Tensor:
        if not isinstance(g, Tensor):
            raise TypeError(f"g: expected a torch.Tensor of shape ({self.shape[0]},), got {type(g).__name__}")
        if g.dim() != 1 or g.shape[0] != self.shape[0]:
            raise ValueError(f"g: expected a flat gradient of shape ({self.shape[0]},), got {tuple(g.shape)}")
        return g.detach().to(device=self.device, dtype=self.dtype)

    def update(self, g: Tensor) -> Tensor:
        """Swap the flat gradient g (shape (d,)) in place of the oldest one. Returns G g (m,), the new Gram row.

        O(dm): the row g_slot and the Gram row/column (G G^T)[slot, :] = G g change; the
        m x m refactorisation (O(m^3)) happens at the next product.
        """
        return self._insert(self._check_gradient(g))

    def _insert(self, g: Tensor) -> Tensor:
        slot = self.count % self.num_grads
        row = self.grads @ g  # with the old row s still there: a nan or inf in g reaches every entry
        if not torch.isfinite(row).all():
            raise ValueError("g: the gradient contains nan or inf (or its norm overflows); it was not added to the window")
        self.grads[slot] = g
        row[slot] = torch.dot(g, g)
        self.gram[slot, :] = row
        self.gram[:, slot] = row
        self.count += 1
        self._factor = None
        return row

    def update_and_apply(self, g: Tensor) -> Tensor:
        """`update(g)`, then F^{-1} g with the new window (the official `update_mul`).

        Since g = G^T e_s is row s of the window, F^{-1} g = m G^T K^{-1} e_s (check: F G^T c =
        G^T (K/m) c). That needs no product G g beyond the Gram row, and unlike Woodbury's
        (g - G^T K^{-1} G g) / damping it subtracts nothing, so float32 keeps its accuracy.
        """
        self._insert(self._check_gradient(g))
        slot = (self.count - 1) % self.num_grads
        unit = torch.zeros(self.num_grads, 1, dtype=torch.float64, device=self.device)
        unit[slot] = self.num_grads
        return self.grads.T @ self._solve_small(unit)[:, 0].to(self.dtype)

    def set_window(self, grads: Tensor, gram: Tensor, count: int) -> None:
        """Take `grads` (m, dim) and its Gram matrix `gram` (m, m) as the window, with `count`
        gradients inserted so far (a restored optimizer state, or a window filled at once). The
        tensors are kept, not copied; the factorization is recomputed at the next product."""
        m = self.num_grads
        if not isinstance(grads, Tensor) or tuple(grads.shape) != (m, self.shape[0]):
            raise ValueError(f"grads: expected a tensor of shape ({m}, {self.shape[0]}), got "
                             f"{getattr(grads, 'shape', type(grads).__name__)}")
        if not isinstance(gram, Tensor) or tuple(gram.shape) != (m, m):
            raise ValueError(f"gram: expected a tensor of shape ({m}, {m}), got {getattr(gram, 'shape', type(gram).__name__)}")
        self.grads, self.gram, self.count = grads, gram, check_count("count", count, minimum=0)
        self._factor = None

    def reset(self) -> None:
        """Empty the window (F = damping * I)."""
        self.grads.zero_()
        self.gram.zero_()
        self.count = 0
        self._factor = None

    # ----------------------------------------------------------------- products
    def _factorize(self) -> tuple[str, Tensor, Tensor | None]:
        """Factor K = m*damping*I + G G^T in float64: Cholesky, or a pivoted LU if rounding broke definiteness."""
        if self._factor is None or self._factor_damping != self.damping:
            K = self.gram.to(torch.float64, copy=True)
            K.diagonal().add_(self.num_grads * self.damping)
            L, info = torch.linalg.cholesky_ex(K)
            if int(info) == 0:
                self._factor = ("cholesky", L, None)
            else:
                LU, pivots = torch.linalg.lu_factor(K)
                self._factor = ("lu", LU, pivots)
            self._factor_damping = self.damping
        return self._factor

    def _solve_small(self, rhs: Tensor) -> Tensor:
        """K^{-1} rhs for an (m, k) right-hand side, in float64."""
        kind, factor, pivots = self._factorize()
        rhs = rhs.to(torch.float64)
        return torch.cholesky_solve(rhs, factor) if kind == "cholesky" else torch.linalg.lu_solve(factor, pivots, rhs)

    def _matmat(self, V: Tensor) -> Tensor:
        """Woodbury: F^{-1} V = (V - G^T K^{-1} (G V)) / damping."""
        with torch.no_grad():
            Y = self._solve_small(self.grads @ V)
            return (V - self.grads.T @ Y.to(self.dtype)) / self.damping

    def inverse_product(self, x: Tensor) -> Tensor:
        """F^{-1} x for x of shape (d,) or (d, k); the same as `self @ x`."""
        return self @ x

    def fisher_product(self, x: Tensor) -> Tensor:
        """F x = damping * x + (1/m) G^T (G x), the damped Fisher itself (for checks and teaching)."""
        X = self._check_product_input(x)
        with torch.no_grad():
            out = self.damping * X + self.grads.T @ (self.grads @ X) / self.num_grads
        return out.reshape(x.shape)

    def inverse_diagonal(self) -> Tensor:
        """diag(F^{-1}) exactly, in O(d m^2): (1 - sum_ij G_iq (K^{-1})_ij G_jq) / damping for each q.

        The denominators of optimal-brain-surgeon saliencies w_q^2 / (2 [F^{-1}]_qq) (WoodFisher, M-FAC).
        """
        with torch.no_grad():
            G = self.grads.double()
            return ((1 - (G * self._solve_small(G)).sum(dim=0)) / self.damping).to(self.dtype)

    def _check_product_input(self, x: Any) -> Tensor:
        if not isinstance(x, Tensor):
            n = self.shape[0]
            raise TypeError(f"x: expected a torch.Tensor of shape ({n},) or ({n}, k), got {type(x).__name__}")
        n = self.shape[0]
        if x.dim() not in (1, 2) or x.shape[0] != n:
            raise ValueError(f"x: expected shape ({n},) or ({n}, k), got {tuple(x.shape)}")
        return x.to(device=self.device, dtype=self.dtype).reshape(n, -1)

    # ----------------------------------------------------------------- from a model
    @classmethod
    def from_model(cls, model: torch.nn.Module, criterion: Any, data: Any, num_grads: int | None = None,
                   damping: float = 1e-4, *, params: Any = None, mode: str | None = None,
                   per_sample: bool = True, output_fn: Any = None) -> MFACInverseOperator:
        """The inverse of the damped empirical Fisher of a model, filled from `data`.

        With `per_sample=True` (default) the window holds the first `num_grads` per-sample
        gradients g_i = grad of criterion(model(x_i), y_i) in data order (computed in one vmapped
        pass per batch by `hk.EmpiricalFisherOperator`'s machinery). With `num_grads=None` every
        sample is used, and then F = damping * I + `hk.EmpiricalFisherOperator(model, criterion,
        data)` exactly: the inverse that optimal-brain-surgeon pruning needs. With
        `per_sample=False` each row is a batch's mean-loss gradient instead (one backward per
        batch; the official pruning script's choice, cheaper but a coarser Fisher).

        `params`, `mode` and `output_fn` are as in `hk.CurvatureOperator` (dict inputs, Hugging Face
        ModelOutputs and sequence criteria work the same way); the model is left as it was.
        """
        from .operators import EmpiricalFisherOperator

        if num_grads is not None:
            num_grads = check_count("num_grads", num_grads)
        damping = check_damping(damping)
        op = EmpiricalFisherOperator(model, criterion, data, params, mode=mode, cache_memory=0, output_fn=output_fn)
        rows: list[Tensor] = []
        if per_sample:
            rows.append(op.per_sample_gradients(num_grads))
        else:
            for _, gradient in op.batch_gradients():
                rows.append(gradient[None])
                if num_grads is not None and len(rows) >= num_grads:
                    break
        G = torch.cat(rows)
        what = "samples" if per_sample else "batches"
        if num_grads is not None and len(G) < num_grads:
            raise ValueError(f"num_grads: data has only {len(G)} {what}, fewer than num_grads={num_grads}")
        G = G[:num_grads] if num_grads is not None else G
        if not torch.isfinite(G).all():
            raise ValueError("data: a gradient contains nan or inf")
        inv = cls(op.shape[0], num_grads=len(G), damping=damping, dtype=op.dtype, device=op.device)
        gram = G @ G.T
        inv.set_window(G.to(op.dtype, copy=True), ((gram + gram.T) / 2).to(op.dtype), len(G))
        return inv

    def __repr__(self) -> str:
        return (f"MFACInverseOperator(dim={self.shape[0]}, num_grads={self.num_grads}, filled={self.num_filled}, "
                f"damping={self.damping:g}, dtype={self.dtype}, device={self.device})")
