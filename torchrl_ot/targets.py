"""``MassSplittingTarget``: the optimal policy update of Corollary 3 (eq. 9-10) for discrete actions."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tensordict import TensorDictBase
from tensordict.utils import NestedKey

from torchrl_ot.costs import TransportCost
from torchrl_ot.dual import KeyedModule, write_solution
from torchrl_ot.functional import _check_epsilon, tabular_ot_update

__all__ = ["MassSplittingTarget"]


class MassSplittingTarget(KeyedModule):
    """Compute the optimal policy inside the OT trust region at a batch of states.

    For each state s in the batch (any batch shape, flattened) it reads the current action
    probabilities ``probs`` ``[*B, A]``, the advantage of every action ``action_advantage``
    ``[*B, A]`` and optionally a state weight ``state_weight`` ``[*B]`` (uniform if absent),
    solves the dual over all (state, action) samples with candidates = all actions, and writes the
    mass-split target ``target_probs`` ``[*B, A]`` (eq. 10) with the diagnostics of
    :class:`~torchrl_ot.DualSolver`. This is step 5, case 1 (tabular) and case 2 (policy network:
    regress onto ``target_probs``) of Section 5.

    Args:
        cost: a discrete :class:`~torchrl_ot.costs.TransportCost` (its ``matrix(A)`` is used).
        epsilon: trust-region radius (> 0).
        split: ``True`` for mass splitting; ``False`` for the WPO rule (no splitting).

    >>> import torch
    >>> from tensordict import TensorDict
    >>> from torchrl_ot.costs import DiscreteMetricCost
    >>> td = TensorDict({"probs": torch.tensor([[0.5, 0.5]]),
    ...                  "action_advantage": torch.tensor([[-1.0, 1.0]])}, batch_size=[1])
    >>> MassSplittingTarget(cost=DiscreteMetricCost(), epsilon=0.2)(td)["target_probs"]
    tensor([[0.3000, 0.7000]])
    """

    @dataclass
    class _AcceptedKeys:
        """Configurable keys (change with :meth:`set_keys`).

        Attributes:
            probs: input ``[*B, A]`` current action probabilities. Defaults to ``"probs"``.
            action_advantage: input ``[*B, A]`` advantages of every action.
                Defaults to ``"action_advantage"``.
            state_weight: optional input ``[*B]`` state weights. Defaults to ``"state_weight"``.
            target_probs: output ``[*B, A]``. Defaults to ``"target_probs"``.
            multiplier, dual_value, split, transport: diagnostics, as in ``DualSolver``.
        """

        probs: NestedKey = "probs"
        action_advantage: NestedKey = "action_advantage"
        state_weight: NestedKey = "state_weight"
        target_probs: NestedKey = "target_probs"
        multiplier: NestedKey = "ot_multiplier"
        dual_value: NestedKey = "ot_dual_value"
        split: NestedKey = "ot_split"
        transport: NestedKey = "ot_transport"

    _in_fields = ("probs", "action_advantage")
    _out_fields = ("target_probs", "multiplier", "dual_value", "split", "transport")

    def __init__(self, *, cost: TransportCost, epsilon: float, split: bool = True) -> None:
        super().__init__()
        if not isinstance(cost, TransportCost) or not cost.discrete:
            raise ValueError(
                "cost must be a discrete TransportCost (DiscreteMetricCost, IndexDistanceCost, "
                f"MatrixCost, or CallableCost(discrete=True)), got {cost!r}"
            )
        self.cost = cost
        self.epsilon = float(_check_epsilon(epsilon, torch.float64, torch.device("cpu")))
        self.split = bool(split)

    def forward(self, td: TensorDictBase) -> TensorDictBase:
        keys = self.tensor_keys
        probs = td.get(keys.probs).detach()
        adv = td.get(keys.action_advantage).detach()
        batch, n = probs.shape[:-1], probs.shape[-1]
        weight = td.get(keys.state_weight, None)
        flat_p = probs.reshape(-1, n)
        if weight is None:
            weight = torch.full(flat_p.shape[:1], 1.0 / max(flat_p.shape[0], 1), dtype=probs.dtype,
                                device=probs.device)
        cost = self.cost.matrix(n, dtype=probs.dtype).to(probs.device)
        target, solution = tabular_ot_update(
            flat_p, adv.reshape(-1, n).to(probs.dtype), weight.reshape(-1).to(probs.dtype), cost,
            self.epsilon, split=self.split,
        )
        td.set(keys.target_probs, target.reshape(*batch, n))
        write_solution(td, keys, solution, batch)
        return td
