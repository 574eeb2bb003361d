"""What the fitted network moved, and keeping it in the radius: the step after the epochs of every OT loss.

The paper's step 5 fits the network to the exact update by gradient steps; nothing in that fit bounds what the
network itself moves. :class:`TrustRegionProjection` measures it (:meth:`~TrustRegionProjection.realised_transport`,
Problem (P)'s constraint), backtracks a step that left the radius and, on request, lengthens one that used little
of it (:meth:`~TrustRegionProjection.project_into_trust_region`). A mixin of
:class:`~torchrl_ot.loss.OTTrustRegionLoss`, whose settings give the measure (``_transport``).
"""

from __future__ import annotations

import torch
from tensordict import TensorDict, TensorDictBase
from torch import Tensor

from torchrl_ot._actor_critic import get_flat_params, log_prob_per_sample, set_flat_params
from torchrl_ot.trpo import conjugate_gradient, flat_grad
from torchrl_ot.validation import (
    check_draw_shape,
    check_entries_present,
    check_per_sample,
    check_positive_int,
    check_real,
    check_same_device,
    check_tensor,
    draw_shape,
    entry_name,
    finite_checks,
    raise_first_failed,
)

__all__ = ["TrustRegionProjection"]


class TrustRegionProjection:
    """Measure and enforce Problem (P)'s constraint for the current network (mixed into the OT losses)."""

    def _check_behaviour(self, tensordict: TensorDictBase, name: str) -> None:
        if not all(tensordict.get(k, None) is not None for k in self._dist_keys):
            raise ValueError(f"{name} needs pi_old's parameters {self._dist_keys} in the batch: call "
                             "solve_multiplier on it before the update")
        check_entries_present(tensordict, self.actor_network.in_keys, f"{type(self).__name__}.{name}")
        if tensordict.batch_size.numel() == 0:
            raise ValueError(f"{name} got an empty batch")

    def _behaviour_and_current(self, flat: TensorDictBase, name: str):
        """pi_old from the recorded parameters and pi_theta, refused by key when the recorded parameters are not
        floating, finite (once per batch: this syncs) or shaped for the current policy (the transport bound and the
        ratios would broadcast them against it)."""
        old = self._behaviour(flat, name)
        return old, self._current_checked(flat, old, name)

    def _behaviour(self, flat: TensorDictBase, name: str):
        """pi_old from the recorded parameters, refused by key unless floating and finite."""
        owner = f"{type(self).__name__}.{name}"
        params = {key: flat.get(key) for key in self._dist_keys}
        checks = []
        for key, x in params.items():
            check_tensor(entry_name(key, owner), x, floating=True)
            checks += finite_checks(x, entry_name(key, owner))
        check_same_device(**{repr(k): x for k, x in params.items()})
        raise_first_failed(checks)
        return self.actor_network.build_dist_from_params(flat.select(*self._dist_keys))

    def _current_checked(self, flat: TensorDictBase, old, name: str):
        """pi_theta at the batch's states, refused unless its draws are shaped as ``old``'s."""
        new = self._current_dist(flat)
        if draw_shape(old) != draw_shape(new):
            raise ValueError(f"pi_old's parameters {self._dist_keys} (input of {type(self).__name__}.{name}) give "
                             f"draws of shape {list(draw_shape(old))}, the current policy {list(draw_shape(new))}: "
                             "they must be the ones solve_multiplier recorded for this actor")
        return new

    @torch.no_grad()
    def realised_transport(self, tensordict: TensorDictBase) -> Tensor:
        """The trust-region constraint of Problem (P) for the CURRENT network: ``(1/B) sum_b C(pi_old(.|s_b),
        pi_theta(.|s_b))`` over the batch's states, C the OT discrepancy of eq. 1 under ``cost``.

        ``ot_transport`` is the transport of the exact update (eq. 9-10), which the network is fitted to; this is
        what the fitted network actually moved, so ``realised_transport(batch) <= epsilon`` is the check that an
        update stayed inside its trust region. Call it after the optimisation epochs on the batch that
        :meth:`solve_multiplier` recorded pi_old in. Exact for a categorical policy, an upper bound for a Gaussian
        one (a value <= epsilon then still proves the update inside). Returns a float64 scalar.
        """
        return self._evaluate(self._search_batch(tensordict, "realised_transport"), surrogate=False)[0]

    def _search_batch(self, tensordict: TensorDictBase, name: str) -> dict:
        """What a step-length search evaluates every trial against, checked once: the flat batch, pi_old and (built
        on first use by :meth:`_evaluate`) the behaviour's log-probabilities of the taken actions."""
        self._check_behaviour(tensordict, name)
        flat = tensordict.reshape(-1)
        return {"flat": flat, "old": self._behaviour(flat, name), "name": name}

    @torch.no_grad()
    def _evaluate(self, batch: dict, *, surrogate: bool) -> tuple[Tensor, Tensor | None]:
        """:meth:`realised_transport` and, when ``surrogate``, :meth:`surrogate` of the current network from one
        forward pass over ``batch`` (:meth:`_search_batch`; the step-length searches need both at every length)."""
        flat, old, name = batch["flat"], batch["old"], batch["name"]
        new = self._current_checked(flat, old, name)
        moved = self._transport(old, new).mean()
        if not surrogate:
            return moved, None
        logp = log_prob_per_sample(new, self._checked_action(flat, new, name), flat.numel())
        if "old_log_prob" not in batch:
            self._check_log_prob(flat, f"{type(self).__name__}.{name}")
            batch["old_log_prob"] = self._old_log_prob(flat, old)
        ratio = torch.exp(logp - batch["old_log_prob"])
        return moved, (ratio * self._advantage(flat).detach()).double().mean()

    @torch.no_grad()
    def project_into_trust_region(self, tensordict: TensorDictBase, theta_old: Tensor, *,
                                  backtrack_coeff: float = 0.8, max_backtracks: int = 10,
                                  max_extension: float = 1.0, boundary_trial: bool = False) -> TensorDictBase:
        """Make the fitted update satisfy Problem (P)'s constraint on the batch: after the epochs, keep the
        largest step ``theta_old + backtrack_coeff**i (theta - theta_old)``, ``i = 0..max_backtracks``, whose
        :meth:`realised_transport` is at most ``epsilon``; if none is, restore ``theta_old`` (no update, zero
        transport). The actor's parameters change in place; the critics are untouched.

        ``max_extension > 1`` (an addition to the paper, off by default) also lengthens a fitted step that is
        inside the radius: along the same direction, steps of ``backtrack_coeff**-j`` (``j = 1, 2, ...``) times
        it, up to ``max_extension``, are taken while each stays inside the radius and does not lower the batch's
        surrogate, :meth:`surrogate`; the last such step is kept. The fitted network otherwise realises only a
        fraction of epsilon; no accepted step leaves the radius either way.

        ``boundary_trial`` (an addition to the paper, off by default): the grid of powers of ``backtrack_coeff``
        stops between ``backtrack_coeff**2`` and 1 of epsilon (transport grows about quadratically in the step
        length for the squared Euclidean cost), about 0.8 on average. After the search, one more length is then
        tried: the kept one times ``sqrt(0.99 epsilon / realised_transport)``, the length at which a transport
        quadratic in it would reach 0.99 epsilon, if that lies strictly between the kept length and the first
        refused one (or ``max(1, max_extension)``). It is kept only if it is inside the radius and the batch's
        surrogate does not fall below the kept step's: the guarantee is the search's.

        This is how the network update is kept *provably* inside the trust region (exactly for categorical
        policies; through an upper bound for Gaussian ones): the paper's step 5 fits the network to the exact
        update by gradient steps, and nothing in that fit bounds what the network moves at the batch's states.
        Returns ``realised_transport`` (of the kept parameters), ``step_fraction`` (the kept fraction of the step:
        1, a power of ``backtrack_coeff``, the boundary trial's length, or 0) and ``backtracks``.
        """
        check_real("backtrack_coeff", backtrack_coeff, low=0, low_open=True, high=1, high_open=True)
        check_positive_int("max_backtracks", max_backtracks, minimum=0)
        check_real("max_extension", max_extension, low=1.0)
        if not isinstance(boundary_trial, bool):
            raise ValueError(f"boundary_trial must be True or False, got {boundary_trial!r}")
        params = self._actor_params()
        theta_new = get_flat_params(params)
        check_tensor("theta_old", theta_old, floating=True)
        if theta_old.shape != theta_new.shape:
            raise ValueError(f"theta_old must be the actor's flat parameters ({theta_new.numel()} entries, from "
                             f"actor_parameters()), got shape {tuple(theta_old.shape)}")
        check_same_device(theta_old=theta_old, **{"the actor's parameters": theta_new})
        for name, theta in (("theta_old", theta_old), ("the actor's parameters", theta_new)):
            if not bool(torch.isfinite(theta).all()):  # neither end of the step may bring a NaN in
                raise ValueError(f"{name} contain NaN or inf; refusing to project a NaN update")
        step = theta_new - theta_old
        extend = max_extension > 1 and bool(step.any())  # a zero step has no length to extend
        batch = self._search_batch(tensordict, "realised_transport")  # checked once for every trial below
        for i in range(max_backtracks + 1):
            fraction = backtrack_coeff**i
            if i:
                set_flat_params(params, theta_old + fraction * step)
            # The fitted step's surrogate too when it may be lengthened (the extension compares against it).
            moved, value = self._evaluate(batch, surrogate=extend and i == 0)
            if bool(moved <= self.epsilon):
                break
        else:
            set_flat_params(params, theta_old)
            moved, fraction, i = self.realised_transport(tensordict), 0.0, max_backtracks + 1
        refused = fraction / backtrack_coeff if i else max_extension  # the first length refused (or the cap)
        if i == 0 and extend:
            moved, fraction, refused = self._extend(batch, params, theta_old, theta_new, moved, value,
                                                    backtrack_coeff, max_extension)
        if boundary_trial and fraction > 0 and bool(step.any()):
            moved, fraction = self._boundary_trial(tensordict, params, theta_old, step, moved, fraction, refused)
        return TensorDict({"realised_transport": moved, "step_fraction": torch.tensor(float(fraction)),
                           "backtracks": torch.tensor(i)}, batch_size=[])

    def natural_step(self, tensordict: TensorDictBase, *, cg_iters: int = 10, cg_damping: float = 0.1,
                     backtrack_coeff: float = 0.8, max_backtracks: int = 10) -> TensorDictBase:
        """Step 5 as one natural-gradient step in the metric of the transport cost, to the radius (an alternative
        to the minibatch epochs on the actor; not in the paper).

        The paper fits the network to the exact update (eq. 7, 10) by gradient steps; what the fitted network then
        moves is a fraction of epsilon. Here the fit is the linearised one, solved exactly: with ``g`` the
        gradient of step 5's objective (the setting's Lagrangian at the fixed lam*, whose per-sample gradient points
        at the exact update's targets) at ``theta_old`` and ``H`` the Hessian there of the smooth transport
        :meth:`_smooth_transport` (its minimum: a Gauss-Newton matrix, ``(2/B) J^T L^2 J`` for the squared
        Euclidean cost of a Gaussian), ``x ~= (H + cg_damping I)^-1 g`` by ``cg_iters`` conjugate-gradient
        iterations, and the step ``s = sqrt(2 epsilon / x.Hx) x`` is the one whose quadratic transport is epsilon:
        TRPO's step with the transport in place of the KL. Then, as :meth:`project_into_trust_region`, the first
        of the lengths ``1``, ``sqrt(0.99 epsilon / realised)`` (when the first trial lands outside, the length
        at which a quadratic transport would reach 0.99 epsilon) and ``backtrack_coeff**i`` times it (``i <=
        max_backtracks``) whose :meth:`realised_transport` is at most epsilon and whose :meth:`surrogate` does
        not fall is kept, else ``theta_old`` is restored exactly: no accepted step leaves the radius. A kept step
        short of the radius (the network is not linear in its parameters) gets the ``boundary_trial`` of
        :meth:`project_into_trust_region`, below the last length refused (or twice ``s``).

        Call it after :meth:`solve_multiplier` on the same batch, with the actor at pi_old. Returns
        ``realised_transport``, ``step_fraction`` (of ``s``; 0 if refused) and ``backtracks``.
        """
        check_positive_int("cg_iters", cg_iters)
        check_real("cg_damping", cg_damping, low=0)
        check_real("backtrack_coeff", backtrack_coeff, low=0, low_open=True, high=1, high_open=True)
        check_positive_int("max_backtracks", max_backtracks, minimum=0)
        self._check_behaviour(tensordict, "natural_step")
        keys = self.tensor_keys
        check_entries_present(tensordict, [keys.multiplier, *self._needed_keys()],
                              f"{type(self).__name__}.natural_step", " (recorded by solve_multiplier)")
        flat = tensordict.reshape(-1)
        params = self._actor_params()
        theta_old = get_flat_params(params)
        old, new = self._behaviour_and_current(flat, "natural_step")
        lam = flat.get(keys.multiplier).detach()
        adv = self._advantage(flat).detach()
        with torch.no_grad():
            critic_out = self._run("critic_network", flat)
        objective, _, _ = self._objective(flat, new, lam, adv, critic_out)
        g = flat_grad(objective.double().mean(), params).to(theta_old.dtype)
        zero = torch.zeros((), dtype=torch.float64)
        info = {"realised_transport": zero, "step_fraction": torch.tensor(0.0), "backtracks": torch.tensor(0)}
        if not bool(torch.isfinite(g).all()):
            raise ValueError("the gradient of step 5's objective contains NaN or inf; refusing a NaN update")
        if not bool(g.any()):  # no sample moves (lam* = 0 and the hinge flat, or all advantages zero)
            return TensorDict(info, batch_size=[])
        # The transport's gradient at its minimum is zero: build it with a graph, then differentiate it again.
        grad = flat_grad(self._smooth_transport(old, self._current_dist(flat)).mean(), params, create_graph=True)

        def hvp(v: Tensor) -> Tensor:
            return flat_grad(grad @ v.to(grad.dtype), params, retain_graph=True).to(v.dtype) + cg_damping * v

        # The length is set below, so only g's direction matters: unit norm makes CG's absolute residual
        # tolerance a relative one (g scales with lam*, which can be tiny).
        x = conjugate_gradient(hvp, g / g.norm(), cg_iters)
        xhx = x @ (hvp(x) - cg_damping * x)
        if not (bool(torch.isfinite(x).all()) and bool(torch.isfinite(xhx)) and bool(xhx > 0)):
            raise ValueError(f"the natural-gradient direction is not finite or x.Hx = {float(xhx)} <= 0")
        step = torch.sqrt(2 * self.epsilon / xhx) * x
        with torch.no_grad():
            start = self.surrogate(tensordict)
            lengths, tried, accepted, i = [1.0], [], None, 0
            try:
                while lengths:
                    fraction = lengths.pop(0)
                    tried.append(fraction)
                    set_flat_params(params, theta_old + fraction * step)
                    moved = self.realised_transport(tensordict)
                    inside = bool(moved <= self.epsilon)
                    if inside and bool(self.surrogate(tensordict) >= start):
                        accepted = (moved, fraction)
                        break
                    if i == 0 and not inside and bool(moved > 0):
                        lengths.append(fraction * min((0.99 * self.epsilon / float(moved)) ** 0.5, backtrack_coeff))
                    elif i < max_backtracks:
                        lengths.append(fraction * backtrack_coeff)
                    i += 1
            finally:  # refused, or an error: theta_old exactly
                if accepted is None:
                    set_flat_params(params, theta_old)
        if accepted is not None:
            # The search's lengths are the quadratic model's and powers of backtrack_coeff below it: the network's
            # curvature leaves the kept one short of the radius; one more trial toward it (kept only if inside and
            # no worse), capped by the last length refused, or at twice the model's.
            refused = 2.0 if i == 0 else tried[-2]
            moved, fraction = self._boundary_trial(tensordict, params, theta_old, step, *accepted, refused)
            info.update(realised_transport=moved, step_fraction=torch.tensor(float(fraction)),
                        backtracks=torch.tensor(i))
        else:
            info["backtracks"] = torch.tensor(i)
        return TensorDict(info, batch_size=[])

    def _smooth_transport(self, old, new) -> Tensor:
        """A transport per state ``[n]`` that is twice differentiable at ``new = old`` (for :meth:`natural_step`)."""
        raise ValueError(f"natural_step needs a transport that is smooth at zero; {type(self).__name__} with "
                         f"{self.cost!r} has none (use the minibatch epochs)")

    @torch.no_grad()
    def surrogate(self, tensordict: TensorDictBase) -> Tensor:
        """The batch's importance-sampled surrogate of Problem (P)'s objective for the CURRENT network,
        ``(1/B) sum_b pi_theta(a_b|s_b) / pi_old(a_b|s_b) A_b`` (TRPO's ``L``), ``pi_old`` the behaviour policy
        (its stored log-probabilities, else the parameters ``solve_multiplier`` recorded). It estimates the
        expected advantage of pi_theta from the batch's own samples, so it compares networks whatever the
        setting; the step-5 objectives of the settings are Lagrangians at a fixed lam* and do not."""
        return self._evaluate(self._search_batch(tensordict, "surrogate"), surrogate=True)[1]

    def _checked_action(self, flat: TensorDictBase, dist, name: str) -> Tensor:
        """The taken actions, refused by key unless shaped like a draw of ``dist``: ``log_prob`` would broadcast
        ``[n]`` against ``[n, 1]`` into ``[n, n]`` and sum it."""
        key, owner = self.tensor_keys.action, f"{type(self).__name__}.{name}"
        check_entries_present(flat, [key], owner)
        action = flat.get(key)
        check_tensor(entry_name(key, owner), action)
        check_draw_shape(entry_name(key, owner), action, dist, what="a draw of the policy, the batch flattened")
        return action

    def _check_log_prob(self, flat: TensorDictBase, owner: str) -> None:
        """The stored ``sample_log_prob``, when there is one, must be floating with one value per sample."""
        stored = flat.get(self.tensor_keys.sample_log_prob, None)
        if stored is not None:
            name = entry_name(self.tensor_keys.sample_log_prob, owner)
            check_tensor(name, stored, floating=True)
            check_per_sample(name, stored, flat.batch_size)

    def _extend(self, batch: dict, params, theta_old: Tensor, theta_new: Tensor, moved: Tensor,
                best: Tensor, coeff: float, max_extension: float) -> tuple[Tensor, float, float]:
        """Lengthen an admissible step (transport ``moved``, surrogate ``best``) by factors ``1 / coeff`` while it
        stays inside the radius and the batch's objective does not fall (see :meth:`project_into_trust_region`);
        returns the kept step's transport and length and the first length refused (``max_extension`` if none
        was), the parameters left at the kept step."""
        step = theta_new - theta_old
        fraction, scale = 1.0, 1.0 / coeff
        refused = max_extension
        while fraction * scale <= max_extension * (1 + 1e-12):
            set_flat_params(params, theta_old + fraction * scale * step)
            trial, value = self._evaluate(batch, surrogate=True)
            if not (bool(trial <= self.epsilon) and bool(value >= best)):
                refused = fraction * scale
                break
            fraction, moved, best = fraction * scale, trial, value
        # No longer step accepted: the fitted parameters themselves, bit for bit.
        set_flat_params(params, theta_new if fraction == 1.0 else theta_old + fraction * step)
        return moved, fraction, refused

    def _boundary_trial(self, tensordict: TensorDictBase, params, theta_old: Tensor, step: Tensor, moved: Tensor,
                        fraction: float, refused: float) -> tuple[Tensor, float]:
        """One more length after the search (see :meth:`project_into_trust_region`): kept if inside the radius and
        no worse on the batch's surrogate; returns the kept step's transport and length, the parameters at it."""
        ratio = float(moved) / float(self.epsilon)
        if not ratio > 0:  # nothing moved: no curvature to extrapolate from
            return moved, fraction
        trial_fraction = fraction * (0.99 / ratio) ** 0.5
        if not fraction * (1 + 1e-6) < trial_fraction < refused * (1 - 1e-6):
            return moved, fraction
        kept = get_flat_params(params)
        best = self.surrogate(tensordict)
        set_flat_params(params, theta_old + trial_fraction * step)
        trial = self.realised_transport(tensordict)
        if bool(trial <= self.epsilon) and bool(self.surrogate(tensordict) >= best):
            return trial, trial_fraction
        set_flat_params(params, kept)
        return moved, fraction
