"""Hessian-based pruning: magnitude, OBD, OBS with the damped empirical Fisher (WoodFisher, M-FAC),
the exact sequential OBS with a dense matrix, and gradual pruning with masked fine-tuning.

    import hesskit as hk
    pruned = hk.prune.obs(model, nn.CrossEntropyLoss(), (x, y), sparsity=0.9, num_grads=256)
    hk.prune.sparsity(pruned).overall        # 0.9
"""

from .pruning import *  # noqa: F403 (the package exports exactly pruning.__all__)
from .pruning import __all__
