"""Hessian-based pruning: magnitude, OBD, OBS with the damped empirical Fisher (WoodFisher, M-FAC),
the exact sequential OBS with a dense matrix, and gradual pruning with masked fine-tuning.

    import hesskit as hk
    pruned = hk.prune.obs(model, nn.CrossEntropyLoss(), (x, y), sparsity=0.9, num_grads=256)
    hk.prune.sparsity(pruned).overall        # 0.9
"""

from .pruning import (
    FisherInverse,
    GradualHistory,
    Sparsity,
    gradual,
    magnitude,
    obd,
    obd_diagonal,
    obs,
    obs_dense,
    obs_with_inverse,
    per_sample_gradients,
    prunable_layers,
    sparsity,
)

__all__ = [
    "magnitude",
    "obd",
    "obd_diagonal",
    "obs",
    "obs_with_inverse",
    "obs_dense",
    "gradual",
    "sparsity",
    "prunable_layers",
    "per_sample_gradients",
    "FisherInverse",
    "Sparsity",
    "GradualHistory",
]
