"""What the notebooks and benchmarks compute: training runs, tasks and studies, above the library
(curvature, optim, quant, prune) and below the widgets, which only show them.

Shared by every study:

- `notebook`: fast mode (`fast_mode`, `budget`) and `claim`, which every notebook uses;
- `training`: the one training loop (`training_steps`, its `StepLog`), the batch orders every
  optimizer sees and the run record's common readings;
- `tasks`: the classifier trainer that sets up a study (`fit_classifier`, `digits_mlp`) and one
  scoring rule (`evaluate` -> `Metrics`).

One module per notebook topic, each opening with the notebook it serves:

- `hessian` (00), `trace_estimation` (01), `eigenvalues` (02), `spectral_density` (03),
  `sharpness` (04), `batch_size` (05): the curvature notebooks;
- `adahessian` (06), `sophia` (07), `kfac` (08), `mfac` (09), `shootout` (10): the optimizers;
- `hawq` (11), `qbert` (12), `pruning` (13), `gptq` (14): compression;
- `your_model` (15): the second-order picture of a Hugging Face model;
- `hessian_alignment` (16): HGP and Hutchinson Hessian alignment against ERM on colored digits;
- `regularized_newton` (17): the gradient-regularized Newton method with approximate Hessians.
- `training_order` (18): batch orders estimated by Taylor expansions of Adam (FUT) against retraining.

Notebooks import a topic's studies from its module (`from hesskit.experiments.kfac import ...`).
"""

from .notebook import CLAIMS, budget, claim, claims_mode, fast_mode

__all__ = ["fast_mode", "budget", "claim", "claims_mode", "CLAIMS"]
