"""Interactive explorers for the notebooks: explicit ipywidgets wired to one `render()`.

The computation of each explorer lives here (tested by driving every control), the notebooks
only compose and explain. `fast_mode()` / `budget(full, fast)` shrink budgets under the tests.
"""

from ._base import Explorer, budget, fast_mode
from .hessian import HessianExplorer, mlp_hessian

__all__ = ["Explorer", "budget", "fast_mode", "HessianExplorer", "mlp_hessian"]
