"""Interactive explorers for the notebooks: explicit ipywidgets wired to one `render()`.

Widgets are user interface only: controls, `render()` and drawing (`explorer.Explorer`, the
pattern every explorer follows). What an explorer computes lives in `hesskit.experiments`, one
module per notebook topic; a computation's `hesskit.progress.report(...)` calls show in the
status line of the explorer that renders it.
One module per notebook:

- `hessian`: 00, the dense Hessian and its layer blocks
- `trace_estimation`: 01, Hutchinson, Hutch++ and XTrace (`hk.trace`'s default)
- `eigenvalues`: 02, power iteration and Lanczos
- `spectral_density`: 03, stochastic Lanczos quadrature
- `sharpness`: 04, loss landscapes, edge of stability, SGD's stability bound
- `batch_size`: 05, mini-batch curvature and learning-rate scaling rules
- `adahessian`: 06, AdaHessian against AdamW and SGD
- `sophia`: 07, Sophia-G and Sophia-H on a tiny character language model
- `kfac`: 08, K-FAC and MKOR
- `mfac`: 09, M-FAC inverse-Hessian-vector products and Newton-CG
- `shootout`: 10, the fair comparison of every optimizer
- `hawq`: 11, HAWQ sensitivities and mixed-precision bit allocation
- `qbert`: 12, Q-BERT's group-wise quantization of a tiny transformer
- `pruning`: 13, OBD, OBS and M-FAC pruning
- `gptq`: 14, GPTQ against round-to-nearest
- `your_model`: 15, the second-order picture of a Hugging Face transformer (a small BERT)
- `hessian_alignment`: 16, HGP and Hutchinson Hessian alignment against ERM on colored digits
- `regularized_newton`: 17, the gradient-regularized Newton method with approximate Hessians
- `training_order`: 18, an order of the batches estimated by Taylor expansions of Adam (FUT) against retraining
"""

from .explorer import Explorer
from .adahessian import AdaHessianExplorer
from .batch_size import BatchSizeExplorer
from .eigenvalues import EigenExplorer
from .gptq import GPTQExplorer
from .hawq import HAWQExplorer
from .hessian_alignment import HessianAlignmentExplorer
from .hessian import HessianExplorer
from .kfac import KFACExplorer
from .mfac import MFACExplorer
from .pruning import PruningExplorer
from .qbert import QBERTExplorer
from .regularized_newton import RegularizedNewtonExplorer
from .sharpness import SharpnessExplorer
from .shootout import ShootoutExplorer
from .sophia import SophiaExplorer
from .spectral_density import DensityExplorer
from .trace_estimation import TraceExplorer
from .training_order import TrainingOrderExplorer
from .your_model import YourModelExplorer

__all__ = [
    "Explorer",
    "HessianExplorer",
    "TraceExplorer",
    "EigenExplorer",
    "DensityExplorer",
    "SharpnessExplorer",
    "BatchSizeExplorer",
    "AdaHessianExplorer",
    "SophiaExplorer",
    "KFACExplorer",
    "MFACExplorer",
    "ShootoutExplorer",
    "HAWQExplorer",
    "QBERTExplorer",
    "PruningExplorer",
    "GPTQExplorer",
    "YourModelExplorer",
    "HessianAlignmentExplorer",
    "RegularizedNewtonExplorer",
    "TrainingOrderExplorer",
]
