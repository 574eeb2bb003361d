"""``OTTrustRegionLoss``: the practical OT-TRPO update of Section 5 (Algorithm 1, steps 4-5) as a TorchRL loss."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tensordict import TensorDict, TensorDictBase, TensorDictParams
from tensordict.nn import ProbabilisticTensorDictModule, TensorDictModule, dispatch
from tensordict.utils import NestedKey
from torch import Tensor
from torchrl.objectives.utils import (
    ValueEstimators,
    _get_default_device,
    distance_loss,
)

from torchrl_ot._actor_critic import ActorCriticLoss
from torchrl_ot.costs import TransportCost
from torchrl_ot.functional import (
    DualSolution,
    _check_epsilon,
    categorical_transport,
    gaussian_transport_bound,
    solve_dual,
    tabular_ot_update,
    tabular_problem,
    transport_plan,
)
from torchrl_ot.trpo import get_flat_params, set_flat_params

__all__ = ["OTTrustRegionLoss"]

_POLICIES = ("gaussian", "categorical", "sampled")


def _deterministic(dist) -> Tensor:
    """The deterministic action m(s) of a distribution (TanhNormal: tanh of the loc; Normal: its mean)."""
    sample = getattr(dist, "deterministic_sample", None)
    return dist.mean if sample is None else sample


def _mirror(dist, mean: Tensor, action: Tensor) -> Tensor:
    """``2 m - a``, the mirror image of the action through the deterministic action, clamped to the
    distribution's action box [low, high] when it has one (TanhNormal)."""
    image = 2 * mean - action
    low, high = getattr(dist, "low", None), getattr(dist, "high", None)
    if low is not None and high is not None:
        image = torch.maximum(torch.minimum(image, high), low)
    return image


def _gaussian_params(dist) -> tuple[Tensor, Tensor]:
    """(loc, scale) of the Gaussian under a Normal, Independent(Normal) or TanhNormal distribution."""
    base = dist
    for attr in ("root_dist", "base_dist"):
        while hasattr(base, attr) and not isinstance(base, torch.distributions.Normal):
            base = getattr(base, attr)
    if not isinstance(base, torch.distributions.Normal):
        raise ValueError(f"realised_transport needs a categorical or a (Tanh)Normal policy, got {type(dist).__name__}")
    return base.loc, base.scale


def _lipschitz(dist) -> Tensor:
    """Per-coordinate Lipschitz constant of the map from the Gaussian to the action: (high - low) / 2 for
    TorchRL's TanhNormal (tanh, then affine onto [low, high]), 1 for a plain Normal."""
    low, high = getattr(dist, "low", None), getattr(dist, "high", None)
    if isinstance(dist, torch.distributions.TransformedDistribution) and low is not None and high is not None:
        return ((high - low) / 2).to(dist.loc.dtype)
    return torch.ones(())


class OTTrustRegionLoss(ActorCriticLoss):
    """OT-TRPO loss: Algorithm 1 of the paper, step 4 (solve for lam*) and step 5 (update theta).

    The dual (eq. 12) ``G(lam) = lam * eps + sum_b w_b max_k (A_bk - lam c_bk)`` is solved *exactly*
    by :func:`~torchrl_ot.functional.solve_dual` with uniform weights ``w_b = 1/B`` over the visited
    states (step 3: "we weight every visited state equally"). Three settings (argument ``policy``):

    * ``"gaussian"`` (step 4 case 2, step 5 case 3, Gaussian special case; GAE advantages): per
      sample two candidates, the taken action ``a_b`` (advantage ``A_b``, cost ``c(m_old(s_b), a_b)``)
      and the behaviour mean ``m_old(s_b)`` (advantage 0, cost 0): a hinge dual. The loss is
      ``-(1/B) sum_b max(A_b - lam* c(m_theta(s_b), a_b), 0)`` with ``m_theta`` the current policy's
      deterministic action. Note: when lam* = 0 (trust region not binding) this has no gradient;
      choose ``epsilon`` below the mean transport to positive-advantage actions. ``mirror=True`` (not in
      the paper) adds a third candidate, the mirror image ``2 m_old(s_b) - a_b`` (clamped to the action box)
      with the first-order advantage ``-A_b`` (for A locally linear in the action around the mean), so that
      negative-advantage samples push the mean away as positive ones pull it; the loss becomes
      ``max(A_b - lam* c(m_theta, a_b), 0, -A_b - lam* c(m_theta, 2 m_old - a_b))``.
    * ``"categorical"`` (step 5 case 2; discrete actions, needs a discrete ``cost``): an advantage
      head ``advantage_network`` writes ``h(s, .)`` ``[..., A]``, centred under the behaviour policy,
      ``A(s, .) = h(s, .) - sum_a pi_old(a|s) h(s, a)``. The mass-split target ``pi*`` (eq. 9-10) comes
      from :func:`~torchrl_ot.functional.tabular_ot_update`; the loss is
      ``(1/B) sum_b ||pi_theta(.|s_b) - pi*(.|s_b)||^2``. Instead of a separate ``advantage_network``
      the critic module may write ``action_advantage`` next to ``state_value``: one module call per
      step instead of two.
    * ``"sampled"`` (step 4 case 3, step 5 case 3): ``advantage_network`` reads observation and action
      and writes ``A(s, a)`` ``[..., 1]``. Candidates: ``num_candidates`` draws from the behaviour
      policy plus ``a_b`` itself (cost 0, so the dual is always feasible). The loss is
      ``-(1/B) sum_b max_k (A(s_b, a'_k) - lam* c(a~_b, a'_k))`` with ``a~_b`` reparameterised from
      the current ``pi_theta(.|s_b)``.

    In the last two settings the advantage network is a critic: ``loss_critic`` adds its regression
    ``(A(s_b, a_b) - A^GAE_b)^2`` at the taken action to the value loss (a per-state shift of the
    advantages changes neither lam* nor the target; centring only makes the regression well posed).
    Only the actor gets gradients from ``loss_objective``; only the critics from ``loss_critic``.

    **Solve once, then optimise.** :meth:`solve_multiplier` computes lam* (and the target ``pi*``, or
    the candidates and their advantages) exactly ONCE per collected batch, before the epochs, and
    writes them into the batch as data (``ot_multiplier`` etc. expanded over the batch, pi_old's
    distribution parameters if absent and, "categorical", pi_old's probabilities, as PPO stores
    log pi_old) so that minibatches sampled from it carry them; :meth:`forward`
    reads them, and calls :meth:`solve_multiplier` on its own copy of the input when they are absent.
    Departure from the paper: its step 5 is an exact argmax for a fixed lam*; several epochs of
    minibatch SGD on that fixed lam* only approximate it, so the realised transport of the fitted
    network may differ from ``epsilon`` (``ot_transport`` reports the *exact* update's transport).
    :meth:`realised_transport` measures what the network moved, and :meth:`project_into_trust_region`
    backtracks the actor's step until it is inside the radius (an addition to the paper's step 5).

    Args:
        actor_network: a ``ProbabilisticActor`` (Normal/TanhNormal for "gaussian" and "sampled",
            Categorical/OneHotCategorical for "categorical"). critic_network: a ``ValueOperator``.
        cost: the :class:`~torchrl_ot.costs.TransportCost` ``c(a, a')``; epsilon: the radius (> 0).
        policy: ``"gaussian"``, ``"categorical"`` or ``"sampled"``; advantage_network: the advantage
            head (required for the last two; "categorical" also takes it from a critic that writes
            ``action_advantage``); num_candidates: behaviour draws per state ("sampled").
        split: True (default) splits mass at the boundary with t* (Corollary 3, the exact optimum); False is
            the WPO rule (all of an action's mass to one maximiser), "categorical" only, kept as the
            baseline: its update can leave the trust region.
        entropy_coeff: if set, adds ``loss_entropy = -entropy_coeff * entropy``.
        critic_coeff, loss_critic_type (``"l2"``, ``"l1"``, ``"smooth_l1"``), reduction (``"mean"``,
            ``"sum"``, ``"none"``), functional: as in TorchRL's A2C loss.

    >>> import torch
    >>> from torch import nn
    >>> from tensordict import TensorDict
    >>> from tensordict.nn import TensorDictModule
    >>> from torchrl.modules import NormalParamExtractor, ProbabilisticActor, TanhNormal, ValueOperator
    >>> from torchrl_ot.costs import EuclideanCost
    >>> _ = torch.manual_seed(0)
    >>> net = TensorDictModule(nn.Sequential(nn.Linear(3, 2), NormalParamExtractor()), ["observation"],
    ...                        ["loc", "scale"])
    >>> actor = ProbabilisticActor(net, in_keys=["loc", "scale"], distribution_class=TanhNormal)
    >>> critic = ValueOperator(nn.Linear(3, 1), in_keys=["observation"])
    >>> loss = OTTrustRegionLoss(actor, critic, cost=EuclideanCost(), epsilon=0.01)
    >>> data = TensorDict({"observation": torch.randn(4, 3), "action": torch.tensor([[0.9], [-0.9], [0.5], [0.0]]),
    ...                    "advantage": torch.tensor([[1.0], [-1.0], [2.0], [0.5]]), "value_target": torch.zeros(4, 1)},
    ...                   batch_size=[4])
    >>> sol = loss.solve_multiplier(data)  # once per collected batch: lam* is now stored in data
    >>> bool(sol.multiplier > 0), round(sol.transport.item(), 6)  # binding: the exact update moves epsilon
    (True, 0.01)
    >>> out = loss(data)
    >>> sorted(out.keys())
    ['loss_critic', 'loss_objective', 'ot_active_fraction', 'ot_multiplier', 'ot_split', 'ot_transport']
    >>> out["loss_objective"].backward()
    """

    @dataclass
    class _AcceptedKeys:
        """Configurable tensordict keys (change with ``set_keys``; value-estimator keys are forwarded).

        ``advantage`` ... ``sample_log_prob`` are as in TorchRL's A2C/PPO; ``action_advantage`` is the
        output of ``advantage_network``; the ``ot_*`` entries are written by ``solve_multiplier``: lam*,
        t*, the exact update's transport, the target ``pi*`` and pi_old's probabilities ("categorical"),
        and the ``[..., K+1, d]`` candidates with their ``[..., K+1]`` advantages ("sampled").
        """

        advantage: NestedKey = "advantage"
        value_target: NestedKey = "value_target"
        value: NestedKey = "state_value"
        action: NestedKey = "action"
        reward: NestedKey = "reward"
        done: NestedKey = "done"
        terminated: NestedKey = "terminated"
        sample_log_prob: NestedKey = "action_log_prob"
        action_advantage: NestedKey = "action_advantage"
        multiplier: NestedKey = "ot_multiplier"
        split: NestedKey = "ot_split"
        transport: NestedKey = "ot_transport"
        target_probs: NestedKey = "ot_target_probs"
        behaviour_probs: NestedKey = "ot_behaviour_probs"
        candidates: NestedKey = "ot_candidates"
        candidate_advantage: NestedKey = "ot_candidate_advantage"

    default_keys = _AcceptedKeys
    tensor_keys: _AcceptedKeys
    # Declared so that convert_to_functional finds them (TorchRL warns about undeclared networks).
    actor_network: TensorDictModule
    critic_network: TensorDictModule
    advantage_network: TensorDictModule
    actor_network_params: TensorDictParams
    critic_network_params: TensorDictParams
    advantage_network_params: TensorDictParams
    target_actor_network_params: TensorDictParams
    target_critic_network_params: TensorDictParams
    target_advantage_network_params: TensorDictParams
    default_value_estimator = ValueEstimators.GAE
    SUPPORTED_VALUE_ESTIMATORS = (ValueEstimators.TD0, ValueEstimators.TD1, ValueEstimators.TDLambda,
                                  ValueEstimators.GAE)

    def __init__(
        self,
        actor_network: TensorDictModule,
        critic_network: TensorDictModule,
        *,
        cost: TransportCost,
        epsilon: float,
        policy: str = "gaussian",
        advantage_network: TensorDictModule | None = None,
        num_candidates: int = 8,
        split: bool = True,
        mirror: bool = False,
        entropy_coeff: float | None = None,
        critic_coeff: float = 1.0,
        loss_critic_type: str = "l2",
        reduction: str = "mean",
        functional: bool = True,
    ) -> None:
        epsilon = float(_check_epsilon(epsilon, torch.float64, torch.device("cpu")))
        if policy not in _POLICIES:
            raise ValueError(f"policy must be one of {_POLICIES}, got {policy!r}")
        if not isinstance(cost, TransportCost):
            raise ValueError(f"cost must be a torchrl_ot TransportCost, got {type(cost).__name__}")
        if cost.discrete != (policy == "categorical"):
            raise ValueError(f"policy={policy!r} needs a {'discrete' if policy == 'categorical' else 'continuous'} "
                             f"cost, got {type(cost).__name__}")
        # "categorical" may take the head from the critic module itself (writing V(s) and A(s, .)):
        # one module call per step instead of two.
        head_in_critic = (policy == "categorical" and advantage_network is None
                          and self.default_keys.action_advantage in getattr(critic_network, "out_keys", []))
        if (advantage_network is None and not head_in_critic) == (policy != "gaussian"):
            raise ValueError(f"policy={policy!r} {'needs' if policy != 'gaussian' else 'takes no'} advantage_network "
                             "(it is the advantage head A(s, .) of Section 5, step 5 cases 2-3"
                             + ("; or a critic_network that also writes 'action_advantage')" if policy == "categorical"
                                else ")"))
        if not isinstance(split, bool) or (not split and policy != "categorical"):
            raise ValueError(f"split=False (the WPO rule) needs policy='categorical', got split={split!r}, "
                             f"policy={policy!r}")
        if not isinstance(mirror, bool) or (mirror and policy != "gaussian"):
            raise ValueError(f"mirror=True (the mirrored candidate) needs policy='gaussian', got mirror={mirror!r}, "
                             f"policy={policy!r}")
        if isinstance(num_candidates, bool) or not isinstance(num_candidates, int) or num_candidates < 1:
            raise ValueError(f"num_candidates must be a positive int, got {num_candidates!r}")
        for name, value, valid in (("loss_critic_type", loss_critic_type, ("l1", "l2", "smooth_l1")),
                                   ("reduction", reduction, ("mean", "sum", "none"))):
            if value not in valid:
                raise ValueError(f"{name} must be one of {valid}, got {value!r}")
        # pi_old is rebuilt from its stored parameters (loc/scale, logits): needs a probabilistic actor.
        dist_modules = [m for m in actor_network.modules() if isinstance(m, ProbabilisticTensorDictModule)]
        if not dist_modules:
            raise ValueError("actor_network must be a probabilistic actor (e.g. torchrl's ProbabilisticActor)")
        self._functional = functional
        super().__init__()
        nets = {"actor_network": actor_network, "critic_network": critic_network}
        if advantage_network is not None:
            nets["advantage_network"] = advantage_network
        for name, net in nets.items():
            self.convert_to_functional(net, name) if functional else setattr(self, name, net)
        if not functional:
            self.target_critic_network_params = None  # read by the value estimator call, as in A2C
        self.cost, self.epsilon, self.policy, self.num_candidates = cost, epsilon, policy, num_candidates
        self.split, self.mirror = split, mirror
        self._head_name = "critic_network" if head_in_critic else "advantage_network"
        self.loss_critic_type, self.reduction = loss_critic_type, reduction
        device = _get_default_device(self)
        self.register_coeff_buffer("entropy_coeff", entropy_coeff, device=device)
        self.register_coeff_buffer("critic_coeff", critic_coeff, device=device)
        self._dist_keys = list(dist_modules[-1].in_keys)
        if getattr(actor_network, "log_prob_keys", None):
            self.set_keys(sample_log_prob=actor_network.log_prob_keys[0], action=actor_network.dist_sample_keys[0])

    @property
    def in_keys(self) -> list[NestedKey]:
        keys = self.tensor_keys
        nxt = lambda k: ("next", *k) if isinstance(k, tuple) else ("next", k)
        nets = [self.actor_network, self.critic_network]
        nets += [self.advantage_network] if self.policy != "gaussian" and self._head_name == "advantage_network" else []
        out = [keys.action, nxt(keys.reward), nxt(keys.done), nxt(keys.terminated)]
        out += [k for net in nets for k in net.in_keys] + [nxt(k) for k in self.critic_network.in_keys]
        return list(dict.fromkeys(out))

    @property
    def out_keys(self) -> list[str]:
        ent = ["entropy", "loss_entropy"] if self.entropy_coeff is not None else []
        return ["loss_objective", "loss_critic", *ent, "ot_multiplier", "ot_split", "ot_transport",
                "ot_active_fraction"]

    # ---------------------------------------------------------------------------------------------
    # helpers

    def _run(self, name: str, td: TensorDictBase) -> TensorDictBase:
        net = getattr(self, name)
        with self._params(name):
            return net(td.select(*net.in_keys, strict=False))

    def _current_dist(self, td: TensorDictBase):
        with self._params("actor_network"):
            # select() builds a new tensordict: what get_dist writes into it stays out of td.
            return self.actor_network.get_dist(td.select(*self.actor_network.in_keys, strict=False))

    def _behaviour_dist(self, td: TensorDictBase):
        """pi_old from its stored parameters (loc/scale, logits); missing ones are computed by the current
        actor without gradient and written into ``td``, so that solve_multiplier records pi_old for the epochs."""
        if not all(td.get(k, None) is not None for k in self._dist_keys):
            with torch.no_grad(), self._params("actor_network"):
                sub = td.select(*self.actor_network.in_keys, strict=False)
                self.actor_network.get_dist(sub)  # writes the distribution parameters into sub
            td.update(sub.select(*self._dist_keys))
        return self.actor_network.build_dist_from_params(td.select(*self._dist_keys).detach())

    def _head(self, td: TensorDictBase, old_probs: Tensor | None = None, ran: TensorDictBase | None = None) -> Tensor:
        """Advantage head output; "categorical": centred under pi_old, ``[B, A]``; "sampled": ``[B]``.
        ``ran``: the head network's output on ``td`` if already computed (a critic that writes the head)."""
        out = (self._run(self._head_name, td) if ran is None else ran).get(self.tensor_keys.action_advantage)
        if old_probs is None:
            return out.squeeze(-1)
        if out.shape != old_probs.shape:
            raise ValueError(f"the advantage head must give one advantage per action, shape {tuple(old_probs.shape)}; "
                             f"got {tuple(out.shape)}")
        # A(s, .) = h(s, .) - E_{pi_old} h(s, .): the head is free up to a per-state constant, which GAE fixes.
        return out - (old_probs * out).sum(-1, keepdim=True)

    @staticmethod
    def _check_finite(td: TensorDictBase | dict, keys) -> None:
        # A NaN would otherwise flow silently into lam* or the gradients: refuse it, naming the entry.
        for key in dict.fromkeys(keys):
            value = td.get(key, None)
            if isinstance(value, Tensor) and value.is_floating_point() and not bool(torch.isfinite(value).all()):
                raise ValueError(f"{key!r} reaching OTTrustRegionLoss contains NaN or inf; refusing a NaN update")

    def _advantage(self, td: TensorDictBase) -> Tensor:
        adv = td.get(self.tensor_keys.advantage)
        if adv.numel() != td.numel():
            raise ValueError(f"advantage must hold one value per sample (shape {tuple(td.shape)} or [..., 1]), "
                             f"got {tuple(adv.shape)}")
        return adv.reshape(td.shape)

    # ---------------------------------------------------------------------------------------------
    # step 4: solve for lam* once per collected batch

    def solve_multiplier(self, tensordict: TensorDictBase) -> DualSolution:
        """Solve the dual (eq. 12) exactly for a collected batch and write the solution into it.

        Runs the value estimator first if the advantage is missing (writing the advantage and value
        target). Writes, expanded over the batch, ``ot_multiplier`` (lam*), ``ot_split`` (t*),
        ``ot_transport``, and ``ot_target_probs`` with ``ot_behaviour_probs`` ("categorical") or
        ``ot_candidates`` / ``ot_candidate_advantage`` ("sampled"), plus pi_old's distribution parameters
        if absent. This is the one method that writes into its input. Returns the
        :class:`~torchrl_ot.functional.DualSolution` (computed in float64).
        """
        keys = self.tensor_keys
        self._check_finite(tensordict, self.in_keys)
        if tensordict.get(keys.advantage, None) is None:
            self.value_estimator(tensordict, params=self._cached_detach_critic_network_params,
                                 target_params=self.target_critic_network_params)
        self._check_finite(tensordict, [keys.advantage])
        if tensordict.numel() == 0:
            raise ValueError("solve_multiplier got an empty batch")
        self._behaviour_dist(tensordict)  # records pi_old's parameters in the batch if absent
        batch, flat = tensordict.shape, tensordict.reshape(-1)
        n = flat.numel()
        adv = self._advantage(flat).double()
        weight = torch.full((n,), 1.0 / n, dtype=torch.float64, device=adv.device)
        action = flat.get(keys.action)
        dtype = flat.get(keys.advantage).dtype
        written = {}
        with torch.no_grad():
            old = self._behaviour_dist(flat)
            if self.policy == "categorical":
                probs = old.probs.double()
                head = self._head(flat, probs.to(dtype)).double()
                matrix = self.cost.matrix(probs.shape[-1]).to(probs.device)
                target, sol = tabular_ot_update(probs, head, weight, matrix, self.epsilon, split=self.split)
                written[keys.target_probs] = target.to(dtype).reshape(*batch, -1)
                # pi_old's probabilities as data, as PPO stores log pi_old: every minibatch step reads them
                # (the head's centring) and rebuilding the distribution there costs more than the step's loss.
                written[keys.behaviour_probs] = probs.to(dtype).reshape(*batch, -1)
                if not self.split:  # WPO's own plan moves more than the split optimum: report what it moves
                    _, c_flat, w_flat = tabular_problem(probs, head, weight, matrix)
                    plan = transport_plan(sol, probs.shape[-1], split=False)
                    realised = (w_flat * (plan * c_flat).sum(-1)).sum()
            else:
                if self.policy == "gaussian":
                    # Candidates [a_b, m_old(s_b)]: advantages [A_b, 0], costs [c(m_old, a_b), 0].
                    zero = torch.zeros_like(adv)
                    mean = _deterministic(old)
                    cand_adv = torch.stack([adv, zero], -1)
                    cost = torch.stack([self.cost(mean, action).double(), zero], -1)
                    if self.mirror:  # a third: the mirror image of a_b through m_old, advantage -A_b
                        image = _mirror(old, mean, action)
                        cand_adv = torch.cat([cand_adv, -adv[:, None]], -1)
                        cost = torch.cat([cost, self.cost(mean, image).double()[:, None]], -1)
                        written[keys.candidates] = image.reshape(*batch, *image.shape[1:])
                else:
                    # K draws from pi_old plus a_b itself (cost 0 from a_b: the dual is always feasible).
                    cands = torch.cat([old.sample((self.num_candidates,)).transpose(0, 1), action.unsqueeze(1)], 1)
                    k = cands.shape[1]
                    sub = flat.select(*self.advantage_network.in_keys, strict=False).exclude(keys.action)
                    sub = sub.unsqueeze(-1).expand(n, k).clone(False).set(keys.action, cands)
                    cand_adv = self._head(sub).reshape(n, k).double()
                    self._check_finite({keys.candidate_advantage: cand_adv}, [keys.candidate_advantage])
                    cost = self.cost.to_candidates(action, cands).double()
                    written[keys.candidates] = cands.reshape(*batch, *cands.shape[1:])
                    written[keys.candidate_advantage] = cand_adv.to(dtype).reshape(*batch, k)
                sol = solve_dual(cand_adv, cost, weight, self.epsilon)
        fields = {"multiplier": sol.multiplier, "split": sol.split,
                  "transport": sol.transport if self.split else realised}
        for field, value in fields.items():
            # Real storage (not a stride-0 view), so that samplers and in-place transforms see plain data.
            written[getattr(keys, field)] = value.to(dtype).expand(batch).clone()
        for key, value in written.items():
            tensordict.set(key, value)
        return sol

    @torch.no_grad()
    def realised_transport(self, tensordict: TensorDictBase) -> Tensor:
        """The trust-region constraint of Problem (P) for the CURRENT network: ``(1/B) sum_b C(pi_old(.|s_b),
        pi_theta(.|s_b))`` over the batch's states, C the OT discrepancy of eq. 1 under ``cost``.

        ``ot_transport`` is the transport of the exact update (eq. 9-10), which the network is fitted to;
        this is what the fitted network actually moved, so ``realised_transport(batch) <= epsilon`` is the
        check that an update stayed inside its trust region. Call it after the optimisation epochs on the
        batch that :meth:`solve_multiplier` recorded pi_old in. "categorical": exact
        (:func:`~torchrl_ot.functional.categorical_transport`); Normal / TanhNormal policies: an upper bound
        through the synchronous coupling (:func:`~torchrl_ot.functional.gaussian_transport_bound`), so a
        value <= epsilon proves the update inside. Returns a float64 scalar.
        """
        if not all(tensordict.get(k, None) is not None for k in self._dist_keys):
            raise ValueError(f"realised_transport needs pi_old's parameters {self._dist_keys} in the batch: call "
                             "solve_multiplier on it before the update")
        flat = tensordict.reshape(-1)
        old = self.actor_network.build_dist_from_params(flat.select(*self._dist_keys))
        new = self._current_dist(flat)
        if self.policy == "categorical":
            n = old.probs.shape[-1]
            per_state = categorical_transport(old.probs.double(), new.probs.double(),
                                              self.cost.matrix(n).to(old.probs.device))
            return per_state.mean()
        (loc0, scale0), (loc1, scale1) = (_gaussian_params(d) for d in (old, new))
        per_state = gaussian_transport_bound(loc0.double(), scale0.double(), loc1.double(), scale1.double(),
                                             self.cost, _lipschitz(new).double())
        return per_state.mean()

    def actor_parameters(self) -> Tensor:
        """The actor's parameters as one detached vector: take it before the epochs, for
        :meth:`project_into_trust_region`."""
        return get_flat_params(self._actor_params())

    @torch.no_grad()
    def project_into_trust_region(self, tensordict: TensorDictBase, theta_old: Tensor, *,
                                  backtrack_coeff: float = 0.8, max_backtracks: int = 10) -> TensorDictBase:
        """Make the fitted update satisfy Problem (P)'s constraint on the batch: after the epochs, keep the
        largest step ``theta_old + backtrack_coeff**i (theta - theta_old)``, ``i = 0..max_backtracks``, whose
        :meth:`realised_transport` is at most ``epsilon``; if none is, restore ``theta_old`` (no update, zero
        transport). The actor's parameters change in place; the critics are untouched.

        This is how the network update is kept *provably* inside the trust region (exactly for categorical
        policies; through an upper bound for Gaussian ones): the paper's step 5 fits the network to the exact
        update by gradient steps, and nothing in that fit bounds what the network moves at the batch's states
        (measured: up to 1.9 epsilon on CartPole). Returns ``realised_transport`` (of the kept parameters),
        ``step_fraction`` (the kept fraction of the step: 1, a power of ``backtrack_coeff``, or 0) and
        ``backtracks``.
        """
        if not 0 < backtrack_coeff < 1:
            raise ValueError(f"backtrack_coeff must lie in (0, 1), got {backtrack_coeff!r}")
        if isinstance(max_backtracks, bool) or not isinstance(max_backtracks, int) or max_backtracks < 0:
            raise ValueError(f"max_backtracks must be a non-negative int, got {max_backtracks!r}")
        params = self._actor_params()
        theta_new = get_flat_params(params)
        if theta_old.shape != theta_new.shape:
            raise ValueError(f"theta_old must be the actor's flat parameters ({theta_new.numel()} entries, from "
                             f"actor_parameters()), got shape {tuple(theta_old.shape)}")
        for name, theta in (("theta_old", theta_old), ("the actor's parameters", theta_new)):
            if not bool(torch.isfinite(theta).all()):  # neither end of the step may bring a NaN in
                raise ValueError(f"{name} contain NaN or inf; refusing to project a NaN update")
        step = theta_new - theta_old
        for i in range(max_backtracks + 1):
            fraction = backtrack_coeff**i
            if i:
                set_flat_params(params, theta_old + fraction * step)
            moved = self.realised_transport(tensordict)
            if bool(moved <= self.epsilon):
                break
        else:
            set_flat_params(params, theta_old)
            moved, fraction, i = self.realised_transport(tensordict), 0.0, max_backtracks + 1
        return TensorDict({"realised_transport": moved, "step_fraction": torch.tensor(float(fraction)),
                           "backtracks": torch.tensor(i)}, batch_size=[])

    # ---------------------------------------------------------------------------------------------
    # step 5: the loss

    @dispatch()
    def forward(self, tensordict: TensorDictBase) -> TensorDictBase:
        """Losses (``loss_objective``, ``loss_critic``, ``loss_entropy``) and detached diagnostics.

        ``ot_multiplier``, ``ot_split`` and ``ot_transport`` are the batch means of the stored lam*, t* and
        exact-update transport (compare the latter with epsilon). ``ot_active_fraction``: "gaussian", the
        share of samples with ``A_b - lam* c(m_theta, a_b) > 0`` (the ones with a gradient); "sampled",
        the share pulled towards a candidate other than their own action; "categorical", the share of
        states whose target differs from pi_old.
        """
        keys = self.tensor_keys
        td = tensordict
        needed = [keys.advantage, keys.multiplier, keys.split, keys.transport]
        needed += {"categorical": [keys.target_probs, keys.behaviour_probs],
                   "sampled": [keys.candidates, keys.candidate_advantage]}.get(self.policy, [])
        needed += [keys.candidates] if self.mirror else []
        # forward reads pi_old only through what solve_multiplier recorded (pi_old's probabilities,
        # the candidates); a missing piece means solving here, on a copy: never into the caller's batch.
        if any(td.get(k, None) is None for k in needed):
            td = tensordict.clone(False)
            self.solve_multiplier(td)
        batch, flat = td.shape, td.reshape(-1)
        dist = self._current_dist(flat)
        lam = flat.get(keys.multiplier).detach()
        adv = self._advantage(flat).detach()
        action = flat.get(keys.action)
        head_loss = None
        critic_out = self._run("critic_network", flat)
        if self.policy == "categorical":
            old_probs = flat.get(keys.behaviour_probs).detach()
            target = flat.get(keys.target_probs).detach()
            objective = -(dist.probs - target).pow(2).sum(-1)
            active = (target - old_probs).abs().amax(-1) > 1e-6
            head = self._head(flat, old_probs, critic_out if self._head_name == "critic_network" else None)
            # The taken action is stored as an index [B] / [B, 1] (Categorical) or one-hot [B, A] (OneHotCategorical).
            one_hot = action.dim() == 2 and action.shape[-1] == head.shape[-1] > 1
            index = action.argmax(-1) if one_hot else action.reshape(-1).long()
            taken = head.gather(-1, index.unsqueeze(-1)).squeeze(-1)
            head_loss = distance_loss(taken, adv, self.loss_critic_type)
        else:
            if self.policy == "gaussian":
                # The hinge of step 5 case 3: max(A_b - lam* c(m_theta(s_b), a_b), 0).
                mean = _deterministic(dist)
                term = adv - lam * self.cost(mean, action)
                if self.mirror:  # ... and the mirrored candidate: max(., -A_b - lam* c(m_theta, image_b))
                    term = torch.maximum(term, -adv - lam * self.cost(mean, flat.get(keys.candidates)))
                objective, active = term.clamp_min(0), term > 0
            else:
                cands = flat.get(keys.candidates)
                term = flat.get(keys.candidate_advantage).detach() - lam.unsqueeze(-1) * self.cost.to_candidates(
                    dist.rsample(), cands)
                objective, best = term.max(-1)
                active = best != cands.shape[1] - 1  # pulled towards a candidate other than its own action
                head_loss = distance_loss(self._head(flat), adv, self.loss_critic_type)
        value = critic_out.get(keys.value)
        critic = distance_loss(value, flat.get(keys.value_target).to(value.dtype), self.loss_critic_type)
        critic = critic.reshape(flat.shape) + (0 if head_loss is None else head_loss)
        losses = {"loss_objective": -objective, "loss_critic": self.critic_coeff * critic}
        out = {}
        if self.entropy_coeff is not None:
            try:
                entropy = dist.entropy()
            except NotImplementedError:  # e.g. TanhNormal: a one-sample Monte-Carlo estimate, as in TorchRL's A2C
                entropy = -dist.log_prob(dist.rsample())
            entropy = entropy.reshape(flat.numel(), -1).sum(-1)  # Normal without Independent: sum the event dims
            losses["loss_entropy"] = -self.entropy_coeff * entropy
            out["entropy"] = entropy.detach().mean()
        for name, loss in losses.items():
            out[name] = self._reduce_loss(loss.reshape(batch), td)
        # One check (one sync) per step on the outputs instead of one per input key: every input that
        # matters reaches a loss, so a NaN input shows up here; only then look for the culprit by name.
        if not bool(torch.isfinite(torch.cat([out[name].detach().reshape(-1) for name in losses])).all()):
            self._check_finite(td, [*self.in_keys, keys.value_target, *needed])
            raise ValueError("OTTrustRegionLoss produced a non-finite loss from finite inputs (overflow?); "
                             "refusing a NaN update")
        for name, key in (("multiplier", keys.multiplier), ("split", keys.split), ("transport", keys.transport)):
            out[f"ot_{name}"] = flat.get(key).detach().float().mean()
        out["ot_active_fraction"] = active.float().mean()
        return TensorDict(out, batch_size=[])
