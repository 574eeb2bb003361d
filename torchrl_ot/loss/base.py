"""``OTTrustRegionLoss``: the practical OT-TRPO update of Section 5 (Algorithm 1, steps 4-5) as a TorchRL loss.

This module holds what every policy setting shares: the exact solve for lam* once per collected batch
(:meth:`~OTTrustRegionLoss.solve_multiplier`) and the losses (:meth:`~OTTrustRegionLoss.forward`); what the fitted
network moved and the projection of its step into the radius come from
:class:`~torchrl_ot.loss.projection.TrustRegionProjection`. Each is a skeleton around one hook that a setting
implements: ``_candidates`` (step 4: the candidates, their advantages and costs, and the solution),
``_objective`` (step 5: the per-sample objective) and ``_transport`` (the OT discrepancy between pi_old and
pi_theta at a state). The settings live beside it: :mod:`~torchrl_ot.loss.gaussian`,
:mod:`~torchrl_ot.loss.categorical`, :mod:`~torchrl_ot.loss.sampled`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tensordict import TensorDict, TensorDictBase, TensorDictParams
from tensordict.nn import TensorDictModule, dispatch
from tensordict.utils import NestedKey
from torch import Tensor

from torchrl_ot._actor_critic import (
    ActorCriticKeys,
    ActorCriticLoss,
)
from torchrl_ot.costs import TransportCost
from torchrl_ot.dual import DualSolver
from torchrl_ot.functional import DualSolution
from torchrl_ot.keys import OTKeys, write_solution
from torchrl_ot.loss.projection import TrustRegionProjection
from torchrl_ot.validation import (
    check_bool,
    check_choice,
    check_draw_shape,
    check_entries_present,
    check_epsilon,
    check_per_sample,
    check_same_device,
    check_shape,
    check_tensor,
    entry_name,
    get_entry,
    raise_first_failed,
)

__all__ = ["OTTrustRegionLoss"]


class _SettingFactory(type(ActorCriticLoss)):
    """``OTTrustRegionLoss(..., policy=...)`` builds the setting's class (user code written against the single
    class keeps working); the options of the other settings are accepted at their defaults and refused
    otherwise, naming the setting they belong to."""

    def __init__(cls, name, bases, namespace, **kwargs) -> None:
        super().__init__(name, bases, namespace)  # the class keywords went to __init_subclass__

    def __call__(cls, *args, **kwargs):
        if cls is OTTrustRegionLoss:
            policy = kwargs.pop("policy", "gaussian")
            paper = ("gaussian", "categorical", "sampled")  # Section 5's order, then any added setting
            check_choice("policy", policy, sorted(cls.settings, key=lambda p: (p not in paper, paper.index(p)
                                                                                if p in paper else p)))
            cls = cls.settings[policy]
            for option, (default, owners) in OTTrustRegionLoss.setting_options.items():
                if option in kwargs and policy not in owners:
                    value = kwargs.pop(option)
                    if value is not default and value != default:
                        raise ValueError(f"{option}={value!r} is an option of policy={' or '.join(map(repr, owners))}"
                                         f" only, got policy={policy!r}")
        elif "policy" in kwargs:  # a setting's own class may be given its own name
            if kwargs.pop("policy") != getattr(cls, "policy", None):
                raise ValueError(f"{cls.__name__} is policy={getattr(cls, 'policy', None)!r}; build another setting "
                                 "with OTTrustRegionLoss(..., policy=...)")
        return super().__call__(*args, **kwargs)


class OTTrustRegionLoss(TrustRegionProjection, ActorCriticLoss, metaclass=_SettingFactory):
    """OT-TRPO loss: Algorithm 1 of the paper, step 4 (solve for lam*) and step 5 (update theta).

    The dual (eq. 12) ``G(lam) = lam * eps + sum_b w_b max_k (A_bk - lam c_bk)`` is solved *exactly* by
    :class:`~torchrl_ot.DualSolver` (or, for discrete actions, :class:`~torchrl_ot.MassSplittingTarget`) with
    uniform weights ``w_b = 1/B`` over the visited states (step 3: "we weight every visited state equally").
    One class per setting of Section 5 (``policy=`` here builds it):

    * :class:`~torchrl_ot.loss.GaussianOTLoss` (``"gaussian"``): the hinge of step 5 case 3 on the deterministic
      action; options ``mirror``, ``learn_scale``, ``scale_clip``, ``squared_hinge``;
    * :class:`~torchrl_ot.loss.CategoricalOTLoss` (``"categorical"``): regression onto the mass-split target
      (eq. 9-10); options ``advantage_network``, ``split``;
    * :class:`~torchrl_ot.loss.SampledOTLoss` (``"sampled"``): candidates drawn from pi_old (step 4 case 3);
      options ``advantage_network``, ``num_candidates``.

    Where a setting has an advantage network it is a critic: ``loss_critic`` adds its regression
    ``(A(s_b, a_b) - A^GAE_b)^2`` at the taken action to the value loss. Only the actor gets gradients from
    ``loss_objective``; only the critics from ``loss_critic``.

    **Solve once, then optimise.** :meth:`solve_multiplier` computes lam* (and the setting's target or
    candidates) exactly ONCE per collected batch, before the epochs, and writes them into the batch as data
    (``ot_multiplier`` etc. expanded over the batch, and pi_old's distribution parameters if absent) so that
    minibatches sampled from it carry them; :meth:`forward` reads them, and calls :meth:`solve_multiplier` on its
    own copy of the input when they are absent. Departure from the paper: its step 5 is an exact argmax for a
    fixed lam*; several epochs of minibatch SGD on that fixed lam* only approximate it, so the fitted network's
    transport may differ from ``epsilon`` (``ot_transport`` reports the *exact* update's transport).
    :meth:`realised_transport` measures what the network moved, and :meth:`project_into_trust_region` backtracks
    the actor's step until it is inside the radius (an addition to the paper's step 5).

    Args:
        actor_network: a ``ProbabilisticActor``; critic_network: a ``ValueOperator``.
        cost: the :class:`~torchrl_ot.costs.TransportCost` ``c(a, a')``; epsilon: the radius (> 0; checked on
            every assignment to ``loss.epsilon`` too).
        policy: ``"gaussian"`` (default), ``"categorical"`` or ``"sampled"``: the setting's class is built, with
            the setting's own keywords (above).
        entropy_coeff: if set, adds ``loss_entropy = -entropy_coeff * entropy``.
        critic_coeff, loss_critic_type (``"l2"``, ``"l1"``, ``"smooth_l1"``), reduction (``"mean"``, ``"sum"``,
            ``"none"``), functional: as in TorchRL's A2C and PPO losses (the keywords of ``ClipPPOLoss`` that
            mean something here; its ``clip_epsilon`` becomes ``cost`` and ``epsilon``).
        normalize_advantage: (default True) :meth:`solve_multiplier` standardises the batch's advantage in place,
            over the whole batch (mean 0, std 1), before solving: lam* and the hinge then see the same standardised
            values. Unlike ``ClipPPOLoss`` (per minibatch, off by default), since lam* is a batch quantity, and on
            by default: on a raw GAE batch whose estimates are all <= 0 (an untrained critic, negative rewards) the
            Gaussian hinge has nothing to move toward, lam* = 0 and the actor gets no gradient at all.
        solve_on_estimate: (default True) :meth:`make_value_estimator` registers :meth:`solve_hook` on the
            estimator: every ``loss.value_estimator(batch)`` also solves lam* for that batch.

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
    >>> type(loss).__name__
    'GaussianOTLoss'
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
    class _AcceptedKeys(ActorCriticKeys, OTKeys):
        """Configurable tensordict keys (change with ``set_keys``; value-estimator keys are forwarded).

        ``advantage`` ... ``sample_log_prob`` are as in TorchRL's A2C/PPO; ``multiplier``, ``split`` and
        ``transport`` (:class:`~torchrl_ot.keys.OTKeys`) are written by ``solve_multiplier``, as are a setting's
        own entries (``action_advantage``, the output of an advantage network; ``ot_target_probs`` and
        ``ot_behaviour_probs``, "categorical"; ``ot_candidates`` ``[..., K, d]`` with their advantages
        ``ot_candidate_advantage`` ``[..., K]``, "sampled", or the mirror images, "gaussian" with ``mirror``).
        """

        action_advantage: NestedKey = "action_advantage"
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

    # Filled by the settings' modules: policy name -> class, and each setting-specific keyword -> (its default,
    # the policies that take it), for the factory.
    settings: dict[str, type[OTTrustRegionLoss]] = {}
    setting_options: dict[str, tuple[object, tuple[str, ...]]] = {}
    policy: str
    discrete_cost: bool = False

    def __init_subclass__(cls, *, policy: str | None = None, options: dict | None = None, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        if policy is not None:
            cls.policy = policy
            OTTrustRegionLoss.settings[policy] = cls
            for option, default in (options or {}).items():
                owners = OTTrustRegionLoss.setting_options.get(option, (default, ()))[1]
                OTTrustRegionLoss.setting_options[option] = (default, (*owners, policy))

    def __init__(self, actor_network: TensorDictModule, critic_network: TensorDictModule, *, cost: TransportCost,
                 epsilon: float, advantage_network: TensorDictModule | None = None,
                 entropy_coeff: float | None = None, critic_coeff: float = 1.0, loss_critic_type: str = "l2",
                 reduction: str = "mean", functional: bool = True, normalize_advantage: bool = True,
                 solve_on_estimate: bool = True) -> None:
        check_bool("normalize_advantage", normalize_advantage)
        check_bool("solve_on_estimate", solve_on_estimate)
        if type(self) is OTTrustRegionLoss:
            raise TypeError("OTTrustRegionLoss is built through policy=...; subclass it for a new setting")
        epsilon = float(check_epsilon(epsilon))
        if not isinstance(cost, TransportCost):
            raise ValueError(f"cost must be a torchrl_ot TransportCost, got {type(cost).__name__}")
        if cost.discrete != self.discrete_cost:
            raise ValueError(f"policy={self.policy!r} needs a {'discrete' if self.discrete_cost else 'continuous'} "
                             f"cost, got {type(cost).__name__}")
        networks = {"actor_network": actor_network, "critic_network": critic_network}
        if advantage_network is not None:
            networks["advantage_network"] = advantage_network
        super().__init__(networks, entropy_coeff=entropy_coeff, critic_coeff=critic_coeff,
                         loss_critic_type=loss_critic_type, reduction=reduction, functional=functional)
        self.cost, self._has_advantage_network = cost, advantage_network is not None
        self._solver = self._make_solver(epsilon)
        self.normalize_advantage, self.solve_on_estimate = normalize_advantage, solve_on_estimate
        self._solving = False  # inside solve_multiplier: its own call of the value estimator must not solve again

    def make_value_estimator(self, value_type=None, **hyperparams):
        """TorchRL's ``make_value_estimator``; with ``solve_on_estimate`` (the default) the estimator also solves
        lam* for the batch it runs on (:meth:`solve_hook`), so that a loop calling only
        ``loss.value_estimator(batch)`` and ``loss(minibatch)`` solves once per estimated batch."""
        super().make_value_estimator(value_type, **hyperparams)
        if self.solve_on_estimate and getattr(self, "_value_estimator", None) is not None:
            self._value_estimator.register_forward_hook(self.solve_hook)
        return self

    def solve_hook(self, module, args, output) -> None:
        """A forward hook for an advantage module (``adv_module.register_forward_hook(loss.solve_hook)``): once the
        module has written the advantage into a batch, :meth:`solve_multiplier` solves lam* on it and records the
        solution there, so the minibatches drawn from it carry it. TorchRL's PPO scripts estimate the advantage
        with their own ``GAE`` module, once per epoch: lam* is then solved once per epoch, on that epoch's
        advantages, always against the behaviour policy recorded in the batch (``loc``/``scale`` or ``logits``)."""
        if self._solving:
            return
        batch = output if isinstance(output, TensorDictBase) else args[0]
        self.solve_multiplier(batch)

    # ---------------------------------------------------------------------------------------------
    # the setting's hooks

    def _make_solver(self, epsilon: float):
        """The TensorDict module that solves step 4 exactly (it holds ``epsilon``)."""
        return DualSolver(epsilon=epsilon)

    def _needed_keys(self) -> list[NestedKey]:
        """What :meth:`forward` reads beyond the advantage and the solution (recorded by ``solve_multiplier``)."""
        return []

    def _candidates(self, flat: TensorDictBase, old, adv: Tensor) -> tuple[DualSolution, dict, Tensor | None]:
        """Step 4 on the flat batch (pi_old ``old``, float64 advantages ``adv``): the exact solution, the entries
        to record per sample (flat, ``[n, ...]``) and the transport to report (None: the solution's)."""
        raise NotImplementedError

    def _objective(self, flat: TensorDictBase, dist, lam: Tensor, adv: Tensor,
                   critic_out: TensorDictBase) -> tuple[Tensor, Tensor, Tensor | None]:
        """Step 5: the per-sample objective ``[n]`` (maximised), the mask of samples it moves and the advantage
        network's regression ``[n]`` (None without one)."""
        raise NotImplementedError

    def _transport(self, old, new) -> Tensor:
        """``C(old(.|s), new(.|s))`` per state ``[n]`` in float64 (exact, or an upper bound)."""
        raise NotImplementedError

    # ---------------------------------------------------------------------------------------------
    # shared machinery

    @property
    def epsilon(self) -> float:
        """The trust-region radius; an assignment is checked (positive, finite)."""
        return self._solver.epsilon

    @epsilon.setter
    def epsilon(self, value: float) -> None:
        self._solver.epsilon = value

    @property
    def in_keys(self) -> list[NestedKey]:
        keys = self.tensor_keys
        nxt = lambda k: ("next", *k) if isinstance(k, tuple) else ("next", k)
        nets = [self.actor_network, self.critic_network]
        nets += [self.advantage_network] if self._has_advantage_network else []
        out = [keys.action, nxt(keys.reward), nxt(keys.done), nxt(keys.terminated)]
        out += [k for net in nets for k in net.in_keys] + [nxt(k) for k in self.critic_network.in_keys]
        return list(dict.fromkeys(out))

    @property
    def out_keys(self) -> list[str]:
        ent = ["entropy", "loss_entropy"] if self.entropy_coeff is not None else []
        return ["loss_objective", "loss_critic", *ent, "ot_multiplier", "ot_split", "ot_transport",
                "ot_active_fraction"]

    def _behaviour_dist(self, td: TensorDictBase):
        """pi_old from its stored parameters (loc/scale, logits); missing ones are computed by the current
        actor without gradient and written into ``td``, so that solve_multiplier records pi_old for the epochs."""
        if not all(td.get(k, None) is not None for k in self._dist_keys):
            with torch.no_grad(), self._params("actor_network"):
                sub = td.select(*self.actor_network.in_keys, strict=False)
                self.actor_network.get_dist(sub)  # writes the distribution parameters into sub
            td.update(sub.select(*self._dist_keys))
        return self.actor_network.build_dist_from_params(td.select(*self._dist_keys).detach())

    def _advantage(self, td: TensorDictBase) -> Tensor:
        key, owner = self.tensor_keys.advantage, type(self).__name__
        # A floating dtype: solve_multiplier writes lam* etc. in the advantage's dtype (an integer lam* is wrong).
        adv = get_entry(td, key, owner, floating=True)
        check_per_sample(entry_name(key, owner), adv, td.batch_size)
        return adv.reshape(td.shape)

    def _continuous_action(self, flat: TensorDictBase, dist) -> Tensor:
        """The taken actions ``[n, d]``, refused unless floating and shaped like a draw of ``dist``: the costs
        would broadcast ``[n]`` against ``[n, 1]`` (or ``[n, 1]`` against ``[n, d]``)."""
        key, owner = self.tensor_keys.action, type(self).__name__
        action = get_entry(flat, key, owner, floating=True)
        check_draw_shape(entry_name(key, owner), action, dist, what="a draw of the policy, the batch flattened")
        return action

    def _input_keys(self) -> list[NestedKey]:
        """What every step reads: the taken action and the networks' inputs."""
        nets = [self.actor_network, self.critic_network]
        nets += [self.advantage_network] if self._has_advantage_network else []
        return list(dict.fromkeys([self.tensor_keys.action, *(k for net in nets for k in net.in_keys)]))

    def _check_step_inputs(self, td: TensorDictBase) -> dict[str, Tensor]:
        """Refuse, by key, a minibatch that :meth:`forward` would misread: a missing entry, a stored solution entry
        (``ot_multiplier`` ...) not of a floating dtype or not shaped ``[*batch_size]`` (it would broadcast against
        the per-sample terms). Returns the entries the loss reads itself, for the device check. No device sync:
        this runs every minibatch step."""
        keys, owner = self.tensor_keys, type(self).__name__
        own = [keys.advantage, keys.value_target, keys.action, keys.multiplier, keys.split, keys.transport,
               *self._needed_keys()]
        found = check_entries_present(td, [*self._input_keys(), *own], owner)
        entries = {repr(key): found[key] for key in own}
        for key in own:
            check_tensor(entry_name(key, owner), found[key])
        for key in (keys.multiplier, keys.split, keys.transport):
            x = found[key]
            check_tensor(entry_name(key, owner), x, floating=True)
            if x.shape != td.batch_size:
                check_shape(entry_name(key, owner), x, tuple(td.batch_size),
                            what=f"[*batch_size] = {list(td.batch_size)}, as solve_multiplier writes it")
        return entries

    def _check_critic_side(self, flat: TensorDictBase, critic_out: TensorDictBase, entries: dict[str, Tensor]) -> None:
        """``value_target`` shaped like the critic's output (distance_loss would broadcast ``[n]`` against ``[n, 1]``
        into ``[n, n]``), and the entries on the device the networks computed on."""
        key, owner = self.tensor_keys.value_target, type(self).__name__
        target = get_entry(flat, key, owner, floating=True)
        value = critic_out.get(self.tensor_keys.value)
        if target.shape != value.shape:
            check_shape(entry_name(key, owner), target, tuple(value.shape),
                        what=f"{list(value.shape)}, the critic's output (the batch flattened)")
        check_same_device(**entries, **{"the critic's output": value})

    # ---------------------------------------------------------------------------------------------
    # step 4: solve for lam* once per collected batch

    def solve_multiplier(self, tensordict: TensorDictBase) -> DualSolution:
        """Solve the dual (eq. 12) exactly for a collected batch and write the solution into it.

        Runs the value estimator first if the advantage is missing (writing the advantage and value target).
        Writes, expanded over the batch, ``ot_multiplier`` (lam*), ``ot_split`` (t*), ``ot_transport`` and the
        setting's own entries, plus pi_old's distribution parameters if absent. This is the one method that writes
        into its input. Returns the :class:`~torchrl_ot.functional.DualSolution` (computed in float64).
        """
        keys, owner = self.tensor_keys, type(self).__name__
        check_entries_present(tensordict, self._input_keys(), owner)
        self._check_entries(tensordict, self.in_keys)
        if tensordict.get(keys.advantage, None) is None:
            check_entries_present(tensordict, self.in_keys, owner,
                                  f" to estimate the advantage (there is no {keys.advantage!r})")
            self._solving = True
            try:
                self._estimate_advantage(tensordict)
            finally:
                self._solving = False
        self._check_entries(tensordict, [keys.advantage])
        if tensordict.batch_size.numel() == 0:  # TensorDict.numel() is at least 1
            raise ValueError("solve_multiplier got an empty batch")
        if self.normalize_advantage and tensordict.batch_size.numel() > 1:
            # Over the whole batch (lam* is a batch quantity), not per minibatch as ClipPPOLoss: the hinge then
            # has positive advantages to move toward even where every raw estimate is negative.
            adv = self._advantage(tensordict)
            tensordict.set(keys.advantage, ((adv - adv.mean()) / adv.std().clamp_min(1e-8)).reshape(
                tensordict.get(keys.advantage).shape))
        self._behaviour_dist(tensordict)  # records pi_old's parameters in the batch if absent
        self._check_behaviour_params(tensordict)
        batch, flat = tensordict.shape, tensordict.reshape(-1)
        adv = self._advantage(flat).double()
        with torch.no_grad():
            sol, written, transport = self._candidates(flat, self._behaviour_dist(flat), adv)
        write_solution(tensordict, keys, sol, batch, transport=transport, dtype=flat.get(keys.advantage).dtype)
        for key, value in written.items():
            tensordict.set(key, value.reshape(*batch, *value.shape[1:]))
        return sol

    def _check_behaviour_params(self, td: TensorDictBase) -> None:
        """Refuse, by key, pi_old's stored parameters (``loc``, ``scale``, ``logits`` ...) holding NaN or inf: they
        would surface as an error about a cost's argument or an internal entry, or as a raw RuntimeError from a
        draw. A categorical's logits may be -inf (a masked action). One device sync for all of them."""
        owner, checks = type(self).__name__, []
        for key in self._dist_keys:
            x = td.get(key)
            if isinstance(x, Tensor) and x.is_floating_point():
                masked = self.discrete_cost
                ok = (~torch.isnan(x) & (x != float("inf"))) if masked else torch.isfinite(x)
                what = "NaN or +inf (-inf: a masked action)" if masked else "NaN or inf"
                checks.append((ok.all(), lambda key=key, what=what: f"{entry_name(key, owner)} (a parameter of "
                                                                    f"pi_old) must not hold {what}"))
        raise_first_failed(checks)

    def _solve_candidates(self, cand_adv: Tensor, cost: Tensor) -> DualSolution:
        """The exact dual over ``[n, K]`` candidates with uniform weights, by the loss's :class:`DualSolver`."""
        keys = self._solver.tensor_keys
        return self._solver.solve(TensorDict({keys.advantage: cand_adv, keys.cost: cost}, batch_size=cost.shape[:1]))

    # ---------------------------------------------------------------------------------------------
    # step 5: the loss

    @dispatch()
    def forward(self, tensordict: TensorDictBase) -> TensorDictBase:
        """Losses (``loss_objective``, ``loss_critic``, ``loss_entropy``) and detached diagnostics.

        ``ot_multiplier``, ``ot_split`` and ``ot_transport`` are the batch means of the stored lam*, t* and
        exact-update transport (compare the latter with epsilon); ``ot_active_fraction`` is the share of samples
        the objective moves (the setting's docstring says which).

        Refused with a ``ValueError`` naming the entry (shape, dtype and device only: no device sync per step): a
        missing entry; an advantage or stored solution entry not of a floating dtype; an advantage not one value
        per sample, ``ot_multiplier`` / ``ot_split`` / ``ot_transport`` not ``[*batch_size]``, a ``value_target``
        not shaped like the critic's output, actions not shaped like a draw of the policy, a setting's stored
        entries not shaped as ``solve_multiplier`` writes them; entries on several devices. NaN or inf are refused
        through the one check of the losses' values (and by :meth:`solve_multiplier`, once per batch).
        """
        keys = self.tensor_keys
        td = tensordict
        needed = [keys.advantage, keys.multiplier, keys.split, keys.transport, *self._needed_keys()]
        # forward reads pi_old only through what solve_multiplier recorded; a missing piece means solving
        # here, on a copy: never into the caller's batch.
        if any(td.get(k, None) is None for k in needed):
            td = tensordict.clone(False)
            self.solve_multiplier(td)
        entries = self._check_step_inputs(td)
        batch, flat = td.shape, td.reshape(-1)
        dist = self._current_dist(flat)
        lam = flat.get(keys.multiplier).detach()
        adv = self._advantage(flat).detach()
        critic_out = self._run("critic_network", flat)
        self._check_critic_side(flat, critic_out, entries)
        try:
            objective, active, head_loss = self._objective(flat, dist, lam, adv, critic_out)
        except ValueError:
            # A cost refuses a NaN reaching it (a NaN observation makes a NaN mean) as "a must be finite": name the
            # entry it came from instead, as the check of the losses below does. A sync on this path only.
            self._check_entries(td, [*self.in_keys, keys.value_target, *needed])
            raise
        critic = self._critic_loss(critic_out, flat).reshape(flat.shape) + (0 if head_loss is None else head_loss)
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
        # matters reaches a loss, so a NaN input shows up here; only then look for the culprit by name. lam* and
        # the advantage join them: the Gaussian hinge clamps an infinite lam* c or a -inf advantage to a finite 0
        # (with a NaN gradient for the former).
        finite = torch.isfinite(torch.cat([*(out[name].detach().reshape(-1) for name in losses),
                                           lam.reshape(-1), adv.reshape(-1)])).all()
        if torch.compiler.is_compiling():
            # Under torch.compile the check would break the graph in two: it travels out as "ot_finite" and
            # the caller checks it (the recipe reruns the step eagerly to raise the error below by name).
            out["ot_finite"] = finite
        elif not bool(finite):
            self._check_entries(td, [*self.in_keys, keys.value_target, *needed])
            raise ValueError(f"{type(self).__name__} produced a non-finite loss from finite inputs (overflow?); "
                             "refusing a NaN update")
        for name, key in (("multiplier", keys.multiplier), ("split", keys.split), ("transport", keys.transport)):
            out[f"ot_{name}"] = flat.get(key).detach().float().mean()
        out["ot_active_fraction"] = active.float().mean()
        return TensorDict(out, batch_size=[])
