"""Hessian-based pruning: magnitude, OBD, OBS with the damped empirical Fisher (WoodFisher, M-FAC),
the exact sequential OBS with a dense matrix, and gradual pruning with masked fine-tuning.

    import hesskit as hk
    pruned = hk.prune.obs(model, nn.CrossEntropyLoss(), (x, y), sparsity=0.9, num_grads=256)
    hk.prune.sparsity(pruned).overall        # 0.9
    pruned.compression.layers                # {layer name: type} of the layers pruned

Hugging Face models work as they are: GPT-2's Conv1D layers prune as the nn.Linear they are, inputs
may be dicts, and `output_fn=` (default: a ModelOutput's logits) picks what the criterion sees.
"""

from .pruning import *  # noqa: F403 (the package exports exactly pruning.__all__)
from .pruning import __all__
