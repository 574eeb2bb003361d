"""The direct parametrisation (Section 5, step 5 case 1; Corollary 3): one exact mass-splitting update of a
tabular policy, through the dual of :mod:`torchrl_ot.functional.dual`."""

from __future__ import annotations

import torch
from torch import Tensor

from torchrl_ot.functional.dual import DualSolution, solve_dual, transport_plan
from torchrl_ot.validation import check_bool, check_finite, check_same_device, check_tensor

__all__ = ["tabular_ot_update", "tabular_problem"]


def tabular_problem(policy: Tensor, advantage: Tensor, state_weight: Tensor, cost: Tensor):
    """Flatten the direct-parametrisation problem (Corollary 3) into ``[S*A, A]`` samples.

    Sample (i, j) carries mass ``rho_i pi_ij``; candidate k has advantage ``A(s_i, a_k)`` and
    cost ``c(a_j, a_k)``. Returns ``(advantage, cost, weight)`` for :func:`solve_dual`. The inputs are
    checked as by :func:`tabular_ot_update` (a ``[1]`` state weight or a ``[1, 1]`` cost would otherwise
    broadcast silently).

    >>> import torch
    >>> adv, c, w = tabular_problem(torch.tensor([[0.25, 0.75]]), torch.tensor([[-1.0, 1.0]]), torch.ones(1),
    ...                             torch.tensor([[0.0, 1.0], [1.0, 0.0]]))
    >>> adv, c, w
    (tensor([[-1.,  1.],
            [-1.,  1.]]), tensor([[0., 1.],
            [1., 0.]]), tensor([0.2500, 0.7500]))
    """
    _check_tabular(policy, advantage, state_weight, cost)
    return _flatten(policy, advantage, state_weight, cost)


def _flatten(policy: Tensor, advantage: Tensor, state_weight: Tensor, cost: Tensor):
    S, A = policy.shape
    adv = advantage[:, None, :].expand(S, A, A).reshape(S * A, A)
    c = cost[None].expand(S, A, A).reshape(S * A, A)
    w = (state_weight[:, None] * policy).reshape(S * A)
    return adv, c, w


def _check_tabular(policy: Tensor, advantage: Tensor, state_weight: Tensor, cost: Tensor) -> None:
    for name, x in (("policy", policy), ("advantage", advantage), ("state_weight", state_weight),
                    ("cost", cost)):
        check_tensor(name, x, floating=True)
    check_same_device(policy=policy, advantage=advantage, state_weight=state_weight, cost=cost)
    if policy.dim() != 2 or policy.shape[0] == 0 or policy.shape[1] == 0:
        raise ValueError(f"policy must have shape [S, A] with S, A >= 1, got {tuple(policy.shape)}")
    S, A = policy.shape
    if advantage.shape != policy.shape:
        raise ValueError(f"advantage must have the policy's shape [{S}, {A}], got {tuple(advantage.shape)}")
    if state_weight.shape != (S,):
        raise ValueError(f"state_weight must have shape [{S}], got {tuple(state_weight.shape)}")
    if cost.shape != (A, A):
        raise ValueError(f"cost must have shape [{A}, {A}], got {tuple(cost.shape)}")
    check_finite(policy, "policy", nonneg=True)
    row = policy.sum(-1, dtype=torch.float64)
    # Rows of float16 / bfloat16 probabilities sum to 1 only to their resolution.
    tol = max(1e-5, A * torch.finfo(policy.dtype).eps)
    if bool(((row - 1).abs() > tol).any()):
        raise ValueError("policy rows must lie on the simplex (each row sums to 1)")
    check_finite(advantage, "advantage")
    check_finite(state_weight, "state_weight", nonneg=True)
    check_finite(cost, "cost", nonneg=True)
    if bool((cost.diagonal() != 0).any()):
        raise ValueError("cost must have a zero diagonal (c(a, a) = 0, Assumption 2)")


def tabular_ot_update(policy: Tensor, advantage: Tensor, state_weight: Tensor, cost: Tensor,
                      epsilon: float | Tensor, split: bool = True) -> tuple[Tensor, DualSolution]:
    """One exact OT-TRPO step for a tabular policy (Corollary 3, eq. 9-10).

    Args:
        policy: ``[S, A]`` current policy, rows on the simplex.
        advantage: ``[S, A]`` advantage estimates ``A(s, a)``.
        state_weight: ``[S]`` state weights ``rho(s) >= 0`` (e.g. discounted visitation).
        cost: ``[A, A]`` transport-cost matrix with a zero diagonal.
        epsilon: trust-region radius.
        split: ``True`` for the optimal mass-splitting update; ``False`` for the WPO rule.

    Returns:
        ``(new_policy, solution)``. States with ``rho(s) = 0`` enter neither the surrogate nor the
        constraint, so any update there is optimal; they get the same lam*-regularised transport
        maps as every other state (the limit of the problem as their weight goes to 0), which
        keeps unvisited states improving with the rest instead of freezing them.

    >>> import torch
    >>> pi = torch.full((1, 2), 0.5, dtype=torch.float64)
    >>> adv = torch.tensor([[-1.0, 1.0]], dtype=torch.float64)
    >>> cost = torch.tensor([[0.0, 1.0], [1.0, 0.0]], dtype=torch.float64)
    >>> new, sol = tabular_ot_update(pi, adv, torch.ones(1, dtype=torch.float64), cost, 0.2)
    >>> new   # 0.2 of mass moves from action 0 to action 1
    tensor([[0.3000, 0.7000]], dtype=torch.float64)
    """
    _check_tabular(policy, advantage, state_weight, cost)
    check_bool("split", split)
    S, A = policy.shape
    adv, c, w = _flatten(policy, advantage, state_weight, cost)
    solution = solve_dual(adv, c, w, epsilon)
    plan = transport_plan(solution, A, split=split).to(policy.dtype)
    new_policy = (policy.reshape(S * A, 1) * plan).reshape(S, A, A).sum(1)
    return new_policy, solution
