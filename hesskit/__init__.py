"""hesskit: second-order methods for deep learning, for research and teaching.

    import hesskit as hk
    op = hk.HessianOperator(model, nn.CrossEntropyLoss(), (x, y))
    hk.eigenvalues(op, k=5).values, hk.trace(op, num_matvecs=99).value
"""

from . import data, models, widgets
from .density import spectral_density
from .eigen import eigenvalues, power_iteration
from .operators import CurvatureOperator, EmpiricalFisherOperator, GGNOperator, HessianOperator
from .results import DiagonalResult, EigenResult, SpectralDensityResult, TraceResult
from .trace import diagonal, trace

__version__ = "0.1.0"

__all__ = [
    "CurvatureOperator",
    "HessianOperator",
    "GGNOperator",
    "EmpiricalFisherOperator",
    "trace",
    "diagonal",
    "eigenvalues",
    "power_iteration",
    "spectral_density",
    "TraceResult",
    "DiagonalResult",
    "EigenResult",
    "SpectralDensityResult",
    "data",
    "models",
    "widgets",
]
