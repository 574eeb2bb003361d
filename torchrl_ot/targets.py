"""``MassSplittingTarget``: the optimal policy update of Corollary 3 (eq. 9-10) for discrete actions."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tensordict import TensorDictBase
from tensordict.utils import NestedKey
from torch import Tensor

from torchrl_ot.costs import TransportCost
from torchrl_ot.dual import KeyedModule
from torchrl_ot.functional import DualSolution, tabular_ot_update, tabular_problem, transport_plan
from torchrl_ot.keys import SolutionKeys, write_solution
from torchrl_ot.validation import (
    check_bool,
    check_same_device,
    check_shape,
    entry_name,
    finite_checks,
    get_entry,
    get_sample_weight,
    raise_first_failed,
    simplex_checks,
)

__all__ = ["MassSplittingTarget"]


class MassSplittingTarget(KeyedModule):
    """Compute the optimal policy inside the OT trust region at a batch of states.

    For each state s in the batch (any batch shape, flattened) it reads the current action
    probabilities ``probs`` ``[*B, A]``, the advantage of every action ``action_advantage``
    ``[*B, A]`` and optionally a state weight ``state_weight`` ``[*B]`` (uniform if absent),
    solves the dual over all (state, action) samples with candidates = all actions, and writes the
    mass-split target ``target_probs`` ``[*B, A]`` (eq. 10) with the diagnostics of
    :class:`~torchrl_ot.DualSolver`; ``ot_transport`` is what the written target moves (with ``split=False``,
    WPO's own plan, which can exceed epsilon). This is step 5, case 1 (tabular) and case 2 (policy network:
    regress onto ``target_probs``) of Section 5. Refused, naming the entry: inputs of other shapes (``probs`` of
    shape ``[*B]`` would be read as one state with many actions), non-floating dtypes, entries on several
    devices, NaN or inf, ``probs`` rows off the simplex, negative state weights.

    Args:
        cost: a discrete :class:`~torchrl_ot.costs.TransportCost` (its ``matrix(A)`` is used).
        epsilon: trust-region radius (> 0).
        split: ``True`` for mass splitting; ``False`` for the WPO rule (no splitting): all of an action's mass
            goes to one maximiser, so the update can leave the trust region.

    >>> import torch
    >>> from tensordict import TensorDict
    >>> from torchrl_ot.costs import DiscreteMetricCost
    >>> td = TensorDict({"probs": torch.tensor([[0.5, 0.5]]),
    ...                  "action_advantage": torch.tensor([[-1.0, 1.0]])}, batch_size=[1])
    >>> MassSplittingTarget(cost=DiscreteMetricCost(), epsilon=0.2)(td)["target_probs"]
    tensor([[0.3000, 0.7000]])
    """

    @dataclass
    class _AcceptedKeys(SolutionKeys):
        """Configurable keys (change with :meth:`set_keys`).

        Attributes:
            probs: input ``[*B, A]`` current action probabilities. Defaults to ``"probs"``.
            action_advantage: input ``[*B, A]`` advantages of every action.
                Defaults to ``"action_advantage"``.
            state_weight: optional input ``[*B]`` state weights. Defaults to ``"state_weight"``.
            target_probs: output ``[*B, A]``. Defaults to ``"target_probs"``.
            multiplier, dual_value, split, transport: diagnostics (:class:`~torchrl_ot.keys.SolutionKeys`).
        """

        probs: NestedKey = "probs"
        action_advantage: NestedKey = "action_advantage"
        state_weight: NestedKey = "state_weight"
        target_probs: NestedKey = "target_probs"

    _in_fields = ("probs", "action_advantage")
    _out_fields = ("target_probs", "multiplier", "dual_value", "split", "transport")

    def __init__(self, *, cost: TransportCost, epsilon: float, split: bool = True) -> None:
        super().__init__()
        if not isinstance(cost, TransportCost) or not cost.discrete:
            raise ValueError(
                "cost must be a discrete TransportCost (DiscreteMetricCost, IndexDistanceCost, "
                f"MatrixCost, or CallableCost(discrete=True)), got {cost!r}"
            )
        check_bool("split", split)
        self.cost, self.epsilon, self.split = cost, epsilon, split

    def solve(self, td: TensorDictBase) -> tuple[Tensor, DualSolution, Tensor]:
        """Compute without writing anything: the target ``[*B, A]``, the :class:`DualSolution` and the
        transport of the target (the solution's ``transport``, or WPO's own plan's with ``split=False``)."""
        probs, adv, weight = self._inputs(td)
        batch, n = probs.shape[:-1], probs.shape[-1]
        flat_p = probs.reshape(-1, n)
        if weight is None:
            weight = torch.full(flat_p.shape[:1], 1.0 / max(flat_p.shape[0], 1), dtype=probs.dtype,
                                device=probs.device)
        cost = self.cost.matrix(n, dtype=probs.dtype).to(probs.device)
        flat_adv, weight = adv.reshape(-1, n).to(probs.dtype), weight.reshape(-1).to(probs.dtype)
        target, solution = tabular_ot_update(flat_p, flat_adv, weight, cost, self.epsilon, split=self.split)
        transport = solution.transport
        if not self.split:  # WPO's plan moves more than the split optimum: report what it moves
            _, c_flat, w_flat = tabular_problem(flat_p, flat_adv, weight, cost)
            plan = transport_plan(solution, n, split=False)
            transport = (w_flat * (plan * c_flat).sum(-1)).sum()
        return target.reshape(*batch, n), solution, transport

    def _inputs(self, td: TensorDictBase) -> tuple[Tensor, Tensor, Tensor | None]:
        """``probs``, ``action_advantage`` (detached) and ``state_weight`` (or None), refused by key when missing,
        not floating, not shaped ``[*batch_size, A]`` / ``[*batch_size]`` (``probs`` of shape ``[*batch_size]``
        would be read as one state with many actions), on several devices, or with values that are not finite,
        probabilities (``probs``) or non-negative (``state_weight``)."""
        keys, owner = self.tensor_keys, type(self).__name__
        batch = tuple(td.batch_size)
        if td.batch_size.numel() == 0:
            raise ValueError(f"{owner} got an empty batch (batch_size {batch})")
        probs = get_entry(td, keys.probs, owner, floating=True).detach()
        dims = ", ".join([*map(str, batch), "A"])
        check_shape(entry_name(keys.probs, owner), probs, (*batch, None), what=f"[*batch_size, A] = [{dims}]")
        adv = get_entry(td, keys.action_advantage, owner, floating=True).detach()
        check_shape(entry_name(keys.action_advantage, owner), adv, tuple(probs.shape),
                    what=f"{list(probs.shape)}, that of {keys.probs!r}")
        tensors = {repr(keys.probs): probs, repr(keys.action_advantage): adv}
        checks = simplex_checks(probs, entry_name(keys.probs, owner))
        checks += finite_checks(adv, entry_name(keys.action_advantage, owner))
        weight = get_sample_weight(td, keys.state_weight, owner, batch, tensors, checks)
        weight = None if weight is None else weight.detach()
        check_same_device(**tensors)
        # Once per batch, like the solve itself: one device sync for every value check.
        raise_first_failed(checks)
        return probs, adv, weight

    def forward(self, td: TensorDictBase) -> TensorDictBase:
        target, solution, transport = self.solve(td)
        td.set(self.tensor_keys.target_probs, target)
        write_solution(td, self.tensor_keys, solution, target.shape[:-1], transport=transport)
        return td
