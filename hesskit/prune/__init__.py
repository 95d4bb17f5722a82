"""Hessian-based pruning: magnitude, OBD, OBS with the damped empirical Fisher (WoodFisher, M-FAC),
the exact sequential OBS with a dense matrix, and gradual pruning with masked fine-tuning.

    import hesskit as hk
    pruned = hk.prune.obs(model, nn.CrossEntropyLoss(), (x, y), sparsity=0.9)   # 54 OBS steps: M-FAC's schedule
    hk.prune.sparsity(pruned).overall        # 0.9
    pruned.compression.layers                # {layer name: type} of the layers pruned

Hugging Face models work as they are: GPT-2's Conv1D layers prune as the nn.Linear they are, inputs
may be dicts, and `output_fn=` (default: a ModelOutput's logits) picks what the criterion sees.

`hk.prune` holds what a user calls: the pruning methods, the curvature they reuse across
sparsities (`obd_diagonal` for `obd`, `FisherInverse` and the `per_sample_gradients` it is built
from for `obs_with_inverse`), the layers and the sparsity report. The helpers stay in
`hesskit.prune.pruning`: `pruning_order` (the operators' order of the weights to the pruning
order, for Conv1D models), `sparsity_schedule`, `default_recomputations` (the number of steps `obs`
takes by default) and `is_prunable`.
"""

from .pruning import (FisherInverse, GradualHistory, Sparsity, gradual, magnitude, obd, obd_diagonal, obs, obs_dense,
                      obs_with_inverse, per_sample_gradients, prunable_layers, sparsity)

__all__ = [
    # prune a copy
    "magnitude",
    "obd",
    "obs",
    "obs_dense",
    "gradual",
    # reuse one curvature for many sparsities
    "obd_diagonal",
    "per_sample_gradients",
    "FisherInverse",
    "obs_with_inverse",
    # what is pruned, and how much
    "prunable_layers",
    "sparsity",
    "Sparsity",
    "GradualHistory",
]
