"""hesskit: second-order methods for deep learning, for research and teaching.

    import hesskit as hk
    op = hk.HessianOperator(model, nn.CrossEntropyLoss(), (x, y))
    hk.eigenvalues(op, k=5).values, hk.trace(op, num_matvecs=99).value

Subpackages: `hk.curvature` (the core: operators and estimators, re-exported here), `hk.optim` (second-order optimizers), `hk.quant` (Hessian-aware quantization),
`hk.prune` (Hessian-based pruning), `hk.data`, `hk.models`, `hk.widgets` (the notebooks' explorers).
"""

from . import curvature, data, experiments, models, optim, progress, prune, quant, widgets
from .curvature import *  # noqa: F403 (the curvature core's names, at the top level)
from .curvature import __all__ as _CURVATURE
from .losses import SequenceCrossEntropy

__version__ = "0.1.0"

__all__ = [*_CURVATURE, "SequenceCrossEntropy", "curvature", "data", "models", "optim", "quant", "prune", "experiments", "widgets", "progress"]
