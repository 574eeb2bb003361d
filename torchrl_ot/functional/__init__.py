"""Pure-tensor core of OT-TRPO: no TensorDict, no modules, every function checked against an independent solver.

* :mod:`~torchrl_ot.functional.dual`: the exact dual (eq. 12) over samples and candidates, :func:`solve_dual`,
  and the optimal plan it defines, :func:`transport_plan` (eq. 9-10);
* :mod:`~torchrl_ot.functional.tabular`: the direct parametrisation's exact update, :func:`tabular_ot_update`
  (Corollary 3);
* :mod:`~torchrl_ot.functional.distance`: what a fitted network moved, the constraint of Problem (P):
  :func:`categorical_transport` (exact) and :func:`gaussian_transport_bound` (an upper bound).
"""

from torchrl_ot.functional.distance import categorical_transport, gaussian_transport_bound
from torchrl_ot.functional.dual import DualSolution, dual_objective, solve_dual, transport_plan
from torchrl_ot.functional.tabular import tabular_ot_update, tabular_problem

__all__ = [
    "DualSolution",
    "categorical_transport",
    "dual_objective",
    "gaussian_transport_bound",
    "solve_dual",
    "tabular_ot_update",
    "tabular_problem",
    "transport_plan",
]
