"""``SampledOTLoss``: OT-TRPO with candidate actions drawn from the behaviour policy and a learned A(s, a)."""

from __future__ import annotations

import torch
from tensordict import TensorDictBase
from torch import Tensor
from torchrl.objectives.utils import distance_loss

from torchrl_ot.functional import DualSolution
from torchrl_ot.loss.base import OTTrustRegionLoss
from torchrl_ot.loss.gaussian import GaussianTransportMixin
from torchrl_ot.validation import check_positive_int, check_shape, entry_name, get_entry

__all__ = ["SampledOTLoss"]


class SampledOTLoss(GaussianTransportMixin, OTTrustRegionLoss, policy="sampled",
                    options={"advantage_network": None, "num_candidates": 8}):
    """OT-TRPO over sampled candidates: Section 5, step 4 case 3 and step 5 case 3, with a continuous ``cost``.

    ``advantage_network`` reads observation and action and writes ``A(s, a)`` ``[..., 1]``. Candidates:
    ``num_candidates`` draws from the behaviour policy plus ``a_b`` itself (cost 0, so the dual is always
    feasible). The loss is ``-(1/B) sum_b max_k (A(s_b, a'_k) - lam* c(a~_b, a'_k))`` with ``a~_b``
    reparameterised from the current ``pi_theta(.|s_b)``; the advantage network regresses onto the GAE advantage
    at the taken action. ``ot_active_fraction`` is the share of samples pulled towards a candidate other than their
    own action.

    Args:
        advantage_network: ``A(s, a)`` (required). num_candidates: behaviour draws per state (>= 1).
        The other arguments are :class:`~torchrl_ot.OTTrustRegionLoss`'s.
    """

    def __init__(self, actor_network, critic_network, *, cost, epsilon: float, advantage_network=None,
                 num_candidates: int = 8, **kwargs) -> None:
        if advantage_network is None:
            raise ValueError("policy='sampled' needs advantage_network (it is the advantage head A(s, a) of "
                             "Section 5, step 5 case 3)")
        check_positive_int("num_candidates", num_candidates)
        super().__init__(actor_network, critic_network, cost=cost, epsilon=epsilon,
                         advantage_network=advantage_network, **kwargs)
        self.num_candidates = num_candidates

    def _needed_keys(self) -> list:
        return [self.tensor_keys.candidates, self.tensor_keys.candidate_advantage]

    def _head(self, td: TensorDictBase) -> Tensor:
        return self._run("advantage_network", td).get(self.tensor_keys.action_advantage).squeeze(-1)

    def _candidates(self, flat: TensorDictBase, old, adv: Tensor) -> tuple[DualSolution, dict, None]:
        keys, dtype, n = self.tensor_keys, flat.get(self.tensor_keys.advantage).dtype, flat.numel()
        action = self._continuous_action(flat, old)
        # K draws from pi_old plus a_b itself (cost 0 from a_b: the dual is always feasible).
        cands = torch.cat([old.sample((self.num_candidates,)).transpose(0, 1), action.unsqueeze(1)], 1)
        k = cands.shape[1]
        sub = flat.select(*self.advantage_network.in_keys, strict=False).exclude(keys.action)
        sub = sub.unsqueeze(-1).expand(n, k).clone(False).set(keys.action, cands)
        cand_adv = self._head(sub).reshape(n, k).double()
        self._check_entries({keys.candidate_advantage: cand_adv}, [keys.candidate_advantage])
        cost = self.cost.to_candidates(action, cands).double()
        written = {keys.candidates: cands, keys.candidate_advantage: cand_adv.to(dtype)}
        return self._solve_candidates(cand_adv, cost), written, None

    def _objective(self, flat: TensorDictBase, dist, lam: Tensor, adv: Tensor, critic_out) -> tuple:
        keys, owner = self.tensor_keys, type(self).__name__
        action = self._continuous_action(flat, dist)
        n, d = action.shape[0], action.shape[-1]
        cands = get_entry(flat, keys.candidates, owner, floating=True)
        if cands.dim() != 3 or cands.shape[0] != n or cands.shape[-1] != d:  # the message only on failure
            check_shape(entry_name(keys.candidates, owner), cands, (n, None, d),
                        what=f"[n, K, d] = [{n}, K, {d}] (the batch flattened), as solve_multiplier writes it")
        cand_adv = get_entry(flat, keys.candidate_advantage, owner, floating=True)
        # [n, 1] would broadcast against the [n, K] costs without an error.
        if cand_adv.shape != cands.shape[:2]:
            check_shape(entry_name(keys.candidate_advantage, owner), cand_adv, tuple(cands.shape[:2]),
                        what=f"[n, K] = {list(cands.shape[:2])}, one per candidate of {keys.candidates!r}")
        term = cand_adv.detach() - lam.unsqueeze(-1) * self.cost.to_candidates(dist.rsample(), cands)
        objective, best = term.max(-1)
        active = best != cands.shape[1] - 1  # pulled towards a candidate other than its own action
        return objective, active, distance_loss(self._head(flat), adv, self.loss_critic_type)
