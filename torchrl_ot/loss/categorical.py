"""``CategoricalOTLoss``: OT-TRPO for a categorical policy, regressed onto the exact mass-split target."""

from __future__ import annotations

import torch
from tensordict import TensorDictBase
from torch import Tensor
from torchrl.objectives.utils import distance_loss

from torchrl_ot.functional import DualSolution, categorical_transport
from torchrl_ot.loss.base import OTTrustRegionLoss
from torchrl_ot.targets import MassSplittingTarget
from torchrl_ot.validation import check_bool, check_shape, entry_name, get_entry, raise_first_failed

__all__ = ["CategoricalOTLoss"]


class CategoricalOTLoss(OTTrustRegionLoss, policy="categorical", options={"advantage_network": None, "split": True}):
    """OT-TRPO for discrete actions: Section 5, step 5 case 2, with a discrete ``cost``.

    An advantage head writes ``h(s, .)`` ``[..., A]``, centred under the behaviour policy,
    ``A(s, .) = h(s, .) - sum_a pi_old(a|s) h(s, a)`` (the head is free up to a per-state constant, which GAE
    fixes). The mass-split target ``pi*`` (eq. 9-10) comes from :class:`~torchrl_ot.MassSplittingTarget`; the loss
    is ``(1/B) sum_b ||pi_theta(.|s_b) - pi*(.|s_b)||^2``, and the head regresses onto the GAE advantage at the
    taken action. ``ot_active_fraction`` is the share of states whose target differs from pi_old.
    ``solve_multiplier`` also records pi_old's probabilities (``ot_behaviour_probs``), as PPO stores log pi_old:
    every minibatch step reads them to centre the head.

    Args:
        advantage_network: the head, reading the observation; or None with a ``critic_network`` that also writes
            ``action_advantage`` next to ``state_value`` (one module call per step instead of two).
        split: True (default) splits mass at the boundary with t* (Corollary 3, the exact optimum); False is the
            WPO rule (all of an action's mass to one maximiser), kept as the baseline: its update can leave the
            trust region, and ``ot_transport`` then reports what its own plan moves.
        The other arguments are :class:`~torchrl_ot.OTTrustRegionLoss`'s.

    >>> import torch
    >>> from torch import nn
    >>> from tensordict import TensorDict
    >>> from tensordict.nn import TensorDictModule
    >>> from torchrl.modules import ProbabilisticActor, ValueOperator
    >>> from torchrl_ot.costs import DiscreteMetricCost
    >>> _ = torch.manual_seed(0)
    >>> actor = ProbabilisticActor(TensorDictModule(nn.Linear(3, 2), ["observation"], ["logits"]), in_keys=["logits"],
    ...                            distribution_class=torch.distributions.Categorical)
    >>> head = TensorDictModule(nn.Linear(3, 2), ["observation"], ["action_advantage"])
    >>> loss = CategoricalOTLoss(actor, ValueOperator(nn.Linear(3, 1), in_keys=["observation"]),
    ...                          advantage_network=head, cost=DiscreteMetricCost(), epsilon=0.05)
    >>> data = TensorDict({"observation": torch.randn(4, 3), "action": torch.tensor([0, 1, 1, 0]),
    ...                    "advantage": torch.randn(4, 1), "value_target": torch.zeros(4, 1)}, batch_size=[4])
    >>> round(loss.solve_multiplier(data).transport.item(), 6)   # the target moves exactly epsilon
    0.05
    >>> data["ot_target_probs"].shape
    torch.Size([4, 2])
    """

    discrete_cost = True

    def __init__(self, actor_network, critic_network, *, cost, epsilon: float, advantage_network=None,
                 split: bool = True, **kwargs) -> None:
        check_bool("split", split)
        head_in_critic = (advantage_network is None
                          and self.default_keys.action_advantage in getattr(critic_network, "out_keys", []))
        if advantage_network is None and not head_in_critic:
            raise ValueError("policy='categorical' needs advantage_network (it is the advantage head A(s, .) of "
                             "Section 5, step 5 case 2; or a critic_network that also writes 'action_advantage')")
        self._split_init = split  # read by _make_solver, which the base's __init__ calls
        super().__init__(actor_network, critic_network, cost=cost, epsilon=epsilon,
                         advantage_network=advantage_network, **kwargs)
        self._head_name = "critic_network" if head_in_critic else "advantage_network"

    def _make_solver(self, epsilon: float) -> MassSplittingTarget:
        return MassSplittingTarget(cost=self.cost, epsilon=epsilon, split=self._split_init)

    @property
    def split(self) -> bool:
        """True: the exact mass-splitting optimum; False: the WPO rule (checked on assignment)."""
        return self._solver.split

    @split.setter
    def split(self, value: bool) -> None:
        check_bool("split", value)
        self._solver.split = value

    def _needed_keys(self) -> list:
        return [self.tensor_keys.target_probs, self.tensor_keys.behaviour_probs]

    def _head(self, td: TensorDictBase, old_probs: Tensor, ran: TensorDictBase | None = None) -> Tensor:
        """The head's ``[B, A]`` advantages centred under pi_old (``ran``: its output on ``td`` if computed)."""
        out = (self._run(self._head_name, td) if ran is None else ran).get(self.tensor_keys.action_advantage)
        if out.shape != old_probs.shape:
            raise ValueError(f"the advantage head must give one advantage per action, shape {tuple(old_probs.shape)}; "
                             f"got {tuple(out.shape)}")
        return out - (old_probs * out).sum(-1, keepdim=True)

    def _candidates(self, flat: TensorDictBase, old, adv: Tensor) -> tuple[DualSolution, dict, Tensor]:
        keys, dtype = self.tensor_keys, flat.get(self.tensor_keys.advantage).dtype
        probs = old.probs.double()
        # The taken actions are read only by the steps, which cannot check their values without a sync: once here.
        index, rows = self._taken(flat, probs.shape[-1])
        name = entry_name(keys.action, type(self).__name__)
        if rows is None:
            n = probs.shape[-1]
            raise_first_failed([(((index >= 0) & (index < n)).all(),
                                 lambda: f"{name} must hold action indices in [0, {n - 1}]")])
        else:
            raise_first_failed([(((rows == 0) | (rows == 1)).all() & (rows.sum(-1) == 1).all(),
                                 lambda: f"{name} must hold one-hot rows (one 1 per row, 0 elsewhere)")])
        head = self._head(flat, probs.to(dtype)).double()
        solver_keys = self._solver.tensor_keys
        target, sol, transport = self._solver.solve(flat.empty().set(solver_keys.probs, probs)
                                                    .set(solver_keys.action_advantage, head))
        # pi_old's probabilities as data, as PPO stores log pi_old: every minibatch step reads them (the head's
        # centring) and rebuilding the distribution there costs more than the step's loss.
        return sol, {keys.target_probs: target.to(dtype), keys.behaviour_probs: probs.to(dtype)}, transport

    def _taken(self, flat: TensorDictBase, num_actions: int) -> tuple[Tensor, Tensor | None]:
        """The taken actions as indices ``[n]``, and the one-hot rows they were read from (None for indices).

        Stored as an index ``[n]`` / ``[n, 1]`` (Categorical) or a one-hot row ``[n, A]`` (OneHotCategorical);
        anything else is refused by key, as is a floating or bool index (``.long()`` would truncate 0.7 to 0)."""
        key, owner = self.tensor_keys.action, type(self).__name__
        name = entry_name(key, owner)
        action = get_entry(flat, key, owner)
        n = flat.batch_size.numel()
        if tuple(action.shape) not in ((n,), (n, 1), (n, num_actions)):  # the message only on failure: every step
            check_shape(name, action, (n,), (n, 1), (n, num_actions),
                        what=f"[{n}] or [{n}, 1] action indices, or [{n}, {num_actions}] one-hot rows (the batch "
                             "flattened)")
        if action.dim() == 2 and action.shape[-1] == num_actions > 1:
            return action.argmax(-1), action
        if action.is_floating_point() or action.dtype == torch.bool or action.is_complex():
            raise ValueError(f"{name} must hold integer action indices (an integer dtype), got {action.dtype}")
        return action.reshape(-1).long(), None

    def _objective(self, flat: TensorDictBase, dist, lam: Tensor, adv: Tensor, critic_out) -> tuple:
        keys, owner = self.tensor_keys, type(self).__name__
        probs = dist.probs
        stored = {}
        for key in (keys.behaviour_probs, keys.target_probs):
            # [n, 1] would broadcast against pi_theta's [n, A] in the squared distance without an error.
            x = stored[key] = get_entry(flat, key, owner, floating=True).detach()
            if x.shape != probs.shape:
                check_shape(entry_name(key, owner), x, tuple(probs.shape),
                            what=f"[n, A] = {list(probs.shape)}, the policy's (the batch flattened)")
        old_probs, target = stored[keys.behaviour_probs], stored[keys.target_probs]
        objective = -(probs - target).pow(2).sum(-1)
        active = (target - old_probs).abs().amax(-1) > 1e-6
        head = self._head(flat, old_probs, critic_out if self._head_name == "critic_network" else None)
        index, _ = self._taken(flat, head.shape[-1])
        taken = head.gather(-1, index.unsqueeze(-1)).squeeze(-1)
        return objective, active, distance_loss(taken, adv, self.loss_critic_type)

    def _transport(self, old, new) -> Tensor:
        n = old.probs.shape[-1]
        return categorical_transport(old.probs.double(), new.probs.double(), self.cost.matrix(n).to(old.probs.device))
