"""hesskit: second-order methods for deep learning, for research and teaching.

    import hesskit as hk
    op = hk.HessianOperator(model, nn.CrossEntropyLoss(), (x, y))
    hk.eigenvalues(op, k=5).values, hk.trace(op, num_matvecs=99).value

Subpackages: `hk.optim` (second-order optimizers), `hk.quant` (Hessian-aware quantization),
`hk.prune` (Hessian-based pruning), `hk.data`, `hk.models`, `hk.widgets` (the notebooks' explorers).
"""

from . import data, models, optim, prune, quant, widgets
from .density import spectral_density
from .eigen import eigenvalues, power_iteration
from .kfac import KroneckerFactor, kfac_factors
from .losses import SequenceCrossEntropy
from .mfac import MFACInverse
from .operators import (
    CurvatureOperator,
    EmpiricalFisherOperator,
    GGNOperator,
    HessianOperator,
    LossGGN,
    LossHessian,
    MatrixFreeOperator,
    NonFiniteError,
)
from .results import BlockTraceResult, DiagonalResult, EigenResult, SpectralDensityResult, TraceResult
from .trace import diagonal, gauss_newton_bartlett, trace

__version__ = "0.1.0"

__all__ = [
    "CurvatureOperator",
    "HessianOperator",
    "GGNOperator",
    "EmpiricalFisherOperator",
    "MatrixFreeOperator",
    "NonFiniteError",
    "LossHessian",
    "LossGGN",
    "MFACInverse",
    "KroneckerFactor",
    "kfac_factors",
    "SequenceCrossEntropy",
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
    "data",
    "models",
    "optim",
    "quant",
    "prune",
    "widgets",
]
