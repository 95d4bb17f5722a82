"""Second-order optimizers as `torch.optim.Optimizer`s, with one step contract.

    def closure():
        opt.zero_grad()
        return criterion(model(x), y)   # fresh forward pass, no backward
    opt.step(closure)

Curvature comes from hesskit's own estimators (`hk.diagonal`, `hk.gauss_newton_bartlett`,
`hk.LossHessianOperator`, K-FAC factors, `hk.MFACInverseOperator`); see each optimizer's docstring for its
update in equations, its defaults, its paper, and where public implementations disagree.
"""

from ._base import ClosureOptimizer, step_seed
from .closures import CLOSURES, make_closure
from .adahessian import AdaHessian
from .sophia import Sophia
from .kfac import KFAC, MKOR
from .mfac import MFAC
from .newton_cg import NewtonCG
from .regularized_newton import RegularizedNewton
from .alignment import hessian_alignment_penalty
from .training_order import RandomProjection, Trajectory, adam_step, estimate_order, train_adam

__all__ = ["ClosureOptimizer", "step_seed", "make_closure", "CLOSURES", "KFAC", "MKOR", "AdaHessian", "Sophia", "MFAC", "NewtonCG", "RegularizedNewton", "hessian_alignment_penalty",
           "train_adam", "estimate_order", "Trajectory", "RandomProjection", "adam_step"]
