"""``TRPOLoss``: KL-constrained trust region policy optimisation (Schulman et al., 2015), the baseline of OT-TRPO."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from tensordict import TensorDict, TensorDictBase, TensorDictParams
from tensordict.nn import TensorDictModule, dispatch
from tensordict.utils import NestedKey
from torch import Tensor
from torch.distributions import Distribution, kl_divergence
from torchrl.modules.distributions.utils import has_analytic_entropy

from torchrl_ot._actor_critic import (
    ActorCriticKeys,
    ActorCriticLoss,
    get_flat_params,
    log_prob_per_sample,
    set_flat_params,
)
from torchrl_ot.validation import (
    check_draw_shape,
    check_entries_present,
    check_per_sample,
    check_positive_int,
    check_real,
    check_same_device,
    check_shape,
    check_tensor,
    draw_shape,
    entry_name,
    get_entry,
)

__all__ = ["TRPOLoss", "conjugate_gradient", "fisher_vector_product", "flat_grad", "get_flat_params",
           "set_flat_params"]


def flat_grad(output: Tensor, params: Sequence[Tensor], *, create_graph: bool = False,
              retain_graph: bool | None = None) -> Tensor:
    """d output / d params as one vector (zeros for parameters ``output`` does not depend on)."""
    grads = torch.autograd.grad(output, params, create_graph=create_graph, retain_graph=retain_graph,
                                allow_unused=True, materialize_grads=True)
    return torch.cat([g.reshape(-1) for g in grads])


def fisher_vector_product(kl: Tensor, params: Sequence[Tensor], damping: float) -> Callable[[Tensor], Tensor]:
    """``v -> (H + damping I) v`` with ``H`` the Hessian of ``kl`` w.r.t. ``params``, by double backprop.

    With ``kl = mean KL(pi_old || pi_theta)`` evaluated at ``theta = theta_old``, ``H`` is the Fisher matrix.
    """
    grad = flat_grad(kl, params, create_graph=True)  # built once, its graph reused for every product
    return lambda v: flat_grad(grad @ v, params, retain_graph=True) + damping * v


def conjugate_gradient(Avp: Callable[[Tensor], Tensor], b: Tensor, iters: int = 10,
                       residual_tol: float = 1e-10) -> Tensor:
    """Solve ``A x = b``, ``A`` symmetric positive definite given as ``v -> A v``: exact (up to rounding) after
    ``len(b)`` iterations; stops early once ``|r|^2 <= residual_tol``."""
    x, r, p = torch.zeros_like(b), b.clone(), b.clone()
    rr = r @ r
    for _ in range(iters):
        if rr <= residual_tol:
            break
        Ap = Avp(p)
        pAp = p @ Ap
        if pAp <= 0:  # A not positive definite along p (e.g. no damping): stop rather than divide by <= 0
            break
        alpha = rr / pAp
        x, r = x + alpha * p, r - alpha * Ap
        rr_new = r @ r
        p, rr = r + (rr_new / rr) * p, rr_new
    return x


def _kl(old: Distribution, new: Distribution, n: int) -> Tensor:
    """Per-sample analytic KL(old || new) ``[n]``, summed over action dimensions (TanhNormal: see TRPOLoss)."""
    return kl_divergence(old, new).reshape(n, -1).sum(-1)


def _entropy(dist: Distribution, n: int, seed: int | None = None) -> Tensor:
    """Per-sample entropy ``[n]``: analytic if available, else a one-draw Monte-Carlo estimate (TanhNormal). A
    ``seed`` makes the draw common to all line-search candidates (fresh noise could accept a step on noise alone)."""
    if has_analytic_entropy(dist):
        return dist.entropy().reshape(n, -1).sum(-1)
    with torch.random.fork_rng(enabled=seed is not None):
        if seed is not None:
            torch.manual_seed(seed)
        return -log_prob_per_sample(dist, dist.rsample(), n)


class TRPOLoss(ActorCriticLoss):
    """TRPO: maximise ``L(theta) = mean_b exp(log pi_theta(a_b|s_b) - log pi_old(a_b|s_b)) A_b`` subject to
    ``mean_b KL(pi_old(.|s_b) || pi_theta(.|s_b)) <= max_kl``.

    The actor is NOT trained by an optimiser: :meth:`actor_step` updates it in place on the whole batch:
    ``g = grad L``; ``x ~= (F + cg_damping I)^-1 g`` by ``cg_iters`` conjugate-gradient iterations with
    Fisher-vector products (double backprop of the mean KL at ``theta_old``); ``s = sqrt(2 max_kl / x.(F +
    cg_damping I) x) x``; the first of ``theta_old + backtrack_coeff^i s``, ``i < backtrack_iters``, that both
    improves ``L`` and has mean KL ``<= max_kl`` is kept, else ``theta_old`` is restored exactly.
    :meth:`forward` gives ``loss_critic`` (for the critic's optimiser), ``loss_objective = -L`` and ``kl`` (for
    logging), and ``entropy`` if ``entropy_coeff`` is set; the bonus ``entropy_coeff * mean entropy`` is then
    added to ``L`` in :meth:`actor_step` (as in OpenAI baselines' TRPO), not to ``loss_objective``.

    pi_old is, in :meth:`actor_step`, the actor at the parameters it is called with (the trust region's
    centre); in :meth:`forward`, the behaviour policy rebuilt from the stored ``loc``/``scale`` (``logits``),
    else the current actor. ``log pi_old(a_b|s_b)`` in ``L`` is the stored ``action_log_prob`` if present
    (importance weights w.r.t. the behaviour policy), else pi_old's. The KL is the analytic
    ``torch.distributions.kl_divergence``; for TanhNormal torch computes it as the KL of the underlying
    Normals, which is EXACT (tanh is a bijection shared by both sides, and KL is invariant under it).

    Args:
        actor_network: a probabilistic actor (``ProbabilisticActor``); critic_network: a ``ValueOperator``.
        max_kl: trust-region radius (> 0); cg_iters (>= 1), cg_damping (>= 0): conjugate gradient and the
            damping added to F; backtrack_iters (>= 1), backtrack_coeff (in (0, 1)): the line search;
            entropy_coeff: the entropy bonus weight or None. critic_coeff, loss_critic_type (``"l2"``, ``"l1"``,
            ``"smooth_l1"``), reduction (``"mean"``, ``"sum"``, ``"none"``), functional: as in TorchRL's A2C.

    >>> import torch
    >>> from torch import nn
    >>> from tensordict import TensorDict
    >>> from tensordict.nn import TensorDictModule
    >>> from torchrl.modules import NormalParamExtractor, ProbabilisticActor, TanhNormal, ValueOperator
    >>> _ = torch.manual_seed(0)
    >>> net = TensorDictModule(nn.Sequential(nn.Linear(3, 2), NormalParamExtractor()), ["observation"],
    ...                        ["loc", "scale"])
    >>> actor = ProbabilisticActor(net, in_keys=["loc", "scale"], distribution_class=TanhNormal)
    >>> critic = ValueOperator(nn.Linear(3, 1), in_keys=["observation"])
    >>> loss = TRPOLoss(actor, critic, max_kl=0.01)
    >>> data = TensorDict({"observation": torch.randn(8, 3), "action": torch.rand(8, 1) * 1.8 - 0.9,
    ...                    "advantage": torch.randn(8, 1), "value_target": torch.zeros(8, 1)}, batch_size=[8])
    >>> sorted(loss(data).keys())
    ['kl', 'loss_critic', 'loss_objective']
    >>> info = loss.actor_step(data)  # in place on the actor's parameters
    >>> bool(info["step_accepted"]), bool(info["kl"] <= 0.01), bool(info["improvement"] > 0)
    (True, True, True)
    """

    @dataclass
    class _AcceptedKeys(ActorCriticKeys):
        """Configurable tensordict keys (change with ``set_keys``; value-estimator keys are forwarded): those of
        TorchRL's A2C/PPO losses."""

    default_keys = _AcceptedKeys
    tensor_keys: _AcceptedKeys
    # Declared so that convert_to_functional finds them (TorchRL warns about undeclared networks).
    actor_network: TensorDictModule
    critic_network: TensorDictModule
    actor_network_params: TensorDictParams
    critic_network_params: TensorDictParams
    target_actor_network_params: TensorDictParams
    target_critic_network_params: TensorDictParams
    def __init__(self, actor_network: TensorDictModule, critic_network: TensorDictModule, *, max_kl: float = 0.01,
                 cg_iters: int = 10, cg_damping: float = 0.1, backtrack_iters: int = 10, backtrack_coeff: float = 0.5,
                 critic_coeff: float = 1.0, loss_critic_type: str = "l2", entropy_coeff: float | None = None,
                 reduction: str = "mean", functional: bool = True) -> None:
        check_real("max_kl", max_kl, low=0, low_open=True)
        check_positive_int("cg_iters", cg_iters)
        check_real("cg_damping", cg_damping, low=0)
        check_positive_int("backtrack_iters", backtrack_iters)
        check_real("backtrack_coeff", backtrack_coeff, low=0, low_open=True, high=1, high_open=True)
        super().__init__({"actor_network": actor_network, "critic_network": critic_network},
                         entropy_coeff=entropy_coeff, critic_coeff=critic_coeff, loss_critic_type=loss_critic_type,
                         reduction=reduction, functional=functional)
        self.max_kl, self.cg_iters, self.cg_damping = float(max_kl), cg_iters, float(cg_damping)
        self.backtrack_iters, self.backtrack_coeff = backtrack_iters, float(backtrack_coeff)

    @property
    def in_keys(self) -> list[NestedKey]:
        keys = self.tensor_keys
        nxt = lambda k: ("next", *k) if isinstance(k, tuple) else ("next", k)
        out = [keys.action, nxt(keys.reward), nxt(keys.done), nxt(keys.terminated), *self.actor_network.in_keys,
               *self.critic_network.in_keys, *[nxt(k) for k in self.critic_network.in_keys]]
        return list(dict.fromkeys(out))

    @property
    def out_keys(self) -> list[str]:
        return ["loss_objective", "loss_critic", "kl", *(["entropy"] if self.entropy_coeff is not None else [])]

    def _prepare(self, tensordict: TensorDictBase, *extra: NestedKey) -> TensorDictBase:
        """A flat shallow copy with the advantage (run the value estimator if missing), NaN/inf refused (one sync),
        and refused by key: a missing entry (the action, the networks' inputs, ``extra``), an advantage or stored
        log-probability not floating or not one value per sample, entries on several devices."""
        keys, owner = self.tensor_keys, type(self).__name__
        td = tensordict.clone(False)  # never mutate the caller's batch
        check_entries_present(td, [keys.action, *self.actor_network.in_keys, *self.critic_network.in_keys], owner)
        if td.get(keys.advantage, None) is None:
            check_entries_present(td, self.in_keys, owner,
                                  f" to estimate the advantage (there is no {keys.advantage!r})")
            self._estimate_advantage(td)
        check_entries_present(td, extra, owner)
        if td.batch_size.numel() == 0:
            raise ValueError(f"{owner} got an empty batch")
        self._check_entries(td, [*self.actor_network.in_keys, *self._dist_keys, keys.action, keys.advantage,
                                 keys.sample_log_prob, keys.value_target])
        entries = {}
        for key in (keys.advantage, keys.sample_log_prob):
            x = td.get(key, None)
            if x is not None:
                check_tensor(entry_name(key, owner), x, floating=True)
                check_per_sample(entry_name(key, owner), x, td.batch_size)
                entries[repr(key)] = x
        entries[repr(keys.action)] = get_entry(td, keys.action, owner)
        for key in (keys.value_target, *self._dist_keys):
            x = td.get(key, None)
            if x is not None:
                check_tensor(entry_name(key, owner), x, floating=True)
                entries[repr(key)] = x
        check_same_device(**entries)
        return td.reshape(-1)

    def _check_dists(self, flat: TensorDictBase, old: Distribution, new: Distribution) -> None:
        """The taken actions shaped like a draw of the policy, and pi_old's draws like pi_theta's: log_prob and the
        KL would broadcast ``[n]`` against ``[n, 1]`` (or stored ``[n, 1]`` parameters against ``[n, d]``) and sum."""
        owner = type(self).__name__
        if draw_shape(old) != draw_shape(new):
            raise ValueError(f"pi_old's parameters {self._dist_keys} (input of {owner}) give draws of shape "
                             f"{list(draw_shape(old))}, the current policy {list(draw_shape(new))}")
        check_draw_shape(entry_name(self.tensor_keys.action, owner), flat.get(self.tensor_keys.action), new,
                         what="a draw of the policy, the batch flattened")

    def _objective(self, flat: TensorDictBase, old: Distribution, logp_old: Tensor,
                   seed: int | None = None) -> tuple[Tensor, Tensor, Distribution]:
        """Per-sample surrogate ``ratio * A`` (plus the entropy bonus if configured and a ``seed`` is given, i.e. in
        actor_step) and KL(pi_old || pi_theta) ``[n]``, with the current actor."""
        n = flat.numel()
        dist = self._current_dist(flat)
        self._check_dists(flat, old, dist)
        ratio = torch.exp(log_prob_per_sample(dist, flat.get(self.tensor_keys.action), n) - logp_old)
        surrogate = ratio * flat.get(self.tensor_keys.advantage).reshape(n).detach()
        if seed is not None and self.entropy_coeff is not None:
            surrogate = surrogate + self.entropy_coeff * _entropy(dist, n, seed)
        return surrogate, _kl(old, dist, n), dist

    @dispatch()
    def forward(self, tensordict: TensorDictBase) -> TensorDictBase:
        """``loss_objective`` (-surrogate), ``loss_critic``, and the detached ``kl`` and ``entropy``.

        Refused with a ``ValueError`` naming the entry: a missing entry, NaN or inf, an advantage or stored
        log-probability not floating or not one value per sample, actions not shaped like a draw of the policy,
        stored pi_old parameters giving draws of another shape, a ``value_target`` not shaped like the critic's
        output, entries on several devices.
        """
        keys, owner = self.tensor_keys, type(self).__name__
        flat = self._prepare(tensordict, keys.value_target)
        n = flat.numel()
        if all(flat.get(k, None) is not None for k in self._dist_keys):
            old = self.actor_network.build_dist_from_params(flat.select(*self._dist_keys).detach())
        else:
            with torch.no_grad():
                old = self._current_dist(flat)
        if flat.get(keys.sample_log_prob, None) is None:  # _old_log_prob reads the action with pi_old
            check_draw_shape(entry_name(keys.action, owner), flat.get(keys.action), old,
                             what=f"a draw of pi_old, from the stored {self._dist_keys} if there are any")
        surrogate, kl, dist = self._objective(flat, old, self._old_log_prob(flat, old))
        critic_out = self._run("critic_network", flat)
        value = critic_out.get(keys.value)
        # [n] against the critic's [n, 1] would broadcast into [n, n] in distance_loss.
        if flat.get(keys.value_target).shape != value.shape:
            check_shape(entry_name(keys.value_target, owner), flat.get(keys.value_target), tuple(value.shape),
                        what=f"{list(value.shape)}, the critic's output (the batch flattened)")
        critic = self._critic_loss(critic_out, flat)
        shape = tensordict.shape
        out = {"loss_objective": self._reduce_loss(-surrogate.reshape(shape), tensordict),
               "loss_critic": self._reduce_loss(self.critic_coeff * critic.reshape(shape), tensordict),
               "kl": self._reduce_loss(kl.detach(), flat, reduction="mean")}
        if self.entropy_coeff is not None:
            out["entropy"] = self._reduce_loss(_entropy(dist, n).detach(), flat, reduction="mean")
        return TensorDict(out, batch_size=[])

    def actor_step(self, tensordict: TensorDictBase) -> TensorDictBase:
        """One TRPO update of the actor's parameters, in place, on the whole batch (see the class docstring).

        Returns ``kl`` and ``improvement`` (of the accepted step; 0 if rejected), ``step_accepted``, ``backtracks``
        (shrinkings before acceptance; ``backtrack_iters`` if the line search failed, 0 if the gradient is exactly
        zero) and ``step_norm`` (of the applied step). NaN/inf inputs or gradients raise ValueError first.
        """
        flat = self._prepare(tensordict)
        params = self._actor_params()
        theta_old = get_flat_params(params)
        with torch.no_grad():
            old = self._current_dist(flat)  # pi_old: the centre of the trust region, fixed (no graph)
        logp_old = self._old_log_prob(flat, old)
        # Common noise for a Monte-Carlo entropy across all evaluations below (drawn only if an entropy is used).
        seed = int(torch.randint(2**62, ())) if self.entropy_coeff is not None else 0
        mean = lambda x: self._reduce_loss(x, flat, reduction="mean")  # honours loss masks in the batch
        surrogate, kl, _ = self._objective(flat, old, logp_old, seed)
        surrogate, kl = mean(surrogate), mean(kl)
        g = flat_grad(surrogate, params, retain_graph=True)
        if not bool(torch.isfinite(g).all()):
            raise ValueError("the gradient of the TRPO surrogate contains NaN or inf; refusing a NaN update")
        zero, dtype = theta_old.new_zeros(()), theta_old.dtype
        info = {"kl": zero, "improvement": zero, "step_accepted": torch.tensor(False),
                "backtracks": torch.tensor(0), "step_norm": zero}
        if not bool(g.any()):  # zero gradient (e.g. all advantages zero): no direction can improve L
            return TensorDict(info, batch_size=[])
        fvp = fisher_vector_product(kl, params, self.cg_damping)
        x = conjugate_gradient(fvp, g, self.cg_iters)
        xFx = x @ fvp(x)
        if not (bool(torch.isfinite(x).all()) and torch.isfinite(xFx) and xFx > 0):
            raise ValueError(f"the natural-gradient direction is not finite or x.Fx = {float(xFx)} <= 0")
        step = torch.sqrt(2 * self.max_kl / xFx) * x
        old_value, accepted = surrogate.detach(), False
        try:
            for i in range(self.backtrack_iters):
                candidate = step * self.backtrack_coeff**i
                set_flat_params(params, theta_old + candidate)
                try:
                    with torch.no_grad():
                        new_surrogate, new_kl, _ = self._objective(flat, old, logp_old, seed)
                except ValueError:  # invalid distribution parameters here (torch's argument checks): reject it
                    continue
                gain, new_kl = mean(new_surrogate) - old_value, mean(new_kl)
                if bool(torch.isfinite(gain) & torch.isfinite(new_kl) & (gain > 0) & (new_kl <= self.max_kl)):
                    info.update(kl=new_kl.to(dtype), improvement=gain.to(dtype), step_accepted=torch.tensor(True),
                                backtracks=torch.tensor(i), step_norm=candidate.norm())
                    accepted = True
                    break
        finally:  # no acceptable step, or an error: restore theta_old exactly
            if not accepted:
                set_flat_params(params, theta_old)
                info["backtracks"] = torch.tensor(self.backtrack_iters)
        return TensorDict(info, batch_size=[])
