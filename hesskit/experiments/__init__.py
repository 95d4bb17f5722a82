"""What the notebooks and benchmarks compute: training runs, tasks and studies, one module per
notebook topic, above the library (curvature, optim, quant, prune) and below the widgets.

- `notebook`: fast mode (`fast_mode`, `budget`) and `claim`, which every notebook uses;
- `training`: the batch order, checkpoint plan and run record the training studies share.
"""

from .notebook import CLAIMS, budget, claim, claims_mode, fast_mode

__all__ = ["fast_mode", "budget", "claim", "claims_mode", "CLAIMS"]
