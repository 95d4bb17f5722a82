"""The curvature core: operators and the estimators built on their products.

- `operators`: the Hessian, GGN and empirical Fisher of a model's loss over data
  (`HessianOperator`, `GGNOperator`, `EmpiricalFisherOperator`), of one computed loss's graph
  (`LossHessianOperator`, `LossGGNOperator`, `LossEmpiricalFisherOperator`) and the base class `MatrixFreeOperator`;
- `trace`: trace (Hutchinson, Hutch++, XTrace, per-block), diagonal (Hutchinson, XDiag) and the
  Gauss-Newton-Bartlett diagonal;
- `eigen`: extreme eigenpairs (Lanczos, block Lanczos, power iteration);
- `density`: spectral density (stochastic Lanczos quadrature);
- `kfac`: K-FAC factors (`KroneckerOperator`); `mfac`: M-FAC's inverse (`MFACInverseOperator`);
- `results`: what the estimators return; `probes`: counted products, seeds and probe vectors.

Everything here is re-exported at the top level (`hk.trace`, `hk.HessianOperator`, ...). The core
imports nothing from the packages above it (optim, quant, prune, experiments, widgets).
"""

from .density import spectral_density
from .eigen import eigenvalues, power_iteration
from .kfac import KroneckerOperator, kfac_factors
from .mfac import MFACInverseOperator
from .operators import (
    CurvatureOperator,
    EmpiricalFisherOperator,
    GGNOperator,
    HessianOperator,
    LossEmpiricalFisherOperator,
    LossGGNOperator,
    LossHessianOperator,
    MatrixFreeOperator,
    NonFiniteError,
    layer_groups,
)
from .results import BlockTraceResult, DiagonalResult, EigenResult, SpectralDensityResult, TraceResult
from .trace import diagonal, gauss_newton_bartlett, trace

__all__ = [
    "CurvatureOperator",
    "HessianOperator",
    "GGNOperator",
    "EmpiricalFisherOperator",
    "MatrixFreeOperator",
    "NonFiniteError",
    "LossHessianOperator",
    "LossGGNOperator",
    "LossEmpiricalFisherOperator",
    "MFACInverseOperator",
    "KroneckerOperator",
    "kfac_factors",
    "layer_groups",
    "trace",
    "diagonal",
    "gauss_newton_bartlett",
    "eigenvalues",
    "power_iteration",
    "spectral_density",
    "TraceResult",
    "BlockTraceResult",
    "DiagonalResult",
    "EigenResult",
    "SpectralDensityResult",
]
