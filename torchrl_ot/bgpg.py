"""``BGPGLoss``: Behavior-Guided Policy Gradient (Pacchiano et al., ICML 2020, "Learning to Score Behaviors for
Guided Policy Optimization"), a baseline of OT-TRPO: a policy-gradient surrogate plus a Wasserstein penalty between
the behaviour embeddings of the current and the previous policy, the distance estimated through its entropic dual
with random Fourier features (their Algorithm 1).

The BGPG authors' policy-gradient code was never published (their repository ``behaviorguidedRL/BGRL`` holds only an
evolution-strategies demo). The one public policy-gradient implementation of the penalty is the one in the WNPG code
(``tedmoskovitz/WNPG`` @ 396239b, ``ppo2_kwng2.py``), by the authors of the other baseline; this module follows it
line by line, and ``shared/design/wasserstein-baselines.md`` (sections 2-3) records where each choice comes from.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from tensordict import TensorDict, TensorDictBase, TensorDictParams
from tensordict.nn import TensorDictModule, dispatch
from tensordict.utils import NestedKey
from torch import Tensor, nn

from torchrl_ot._actor_critic import ActorCriticKeys, ActorCriticLoss, log_prob_per_sample
from torchrl_ot.validation import (
    check_bool,
    check_choice,
    check_entries_present,
    check_positive_int,
    check_real,
    check_shape,
    entry_name,
)

__all__ = ["BGPGLoss", "EntropicWassersteinDual"]

#: ``dual_warm_start``: which dual vector a minibatch row starts its ascent from (see :class:`BGPGLoss`).
DUAL_WARM_STARTS = ("row", "state")


class EntropicWassersteinDual(nn.Module):
    """The entropy-smoothed Wasserstein distance between two sample sets through its dual, the potentials being
    linear in random Fourier features (Pacchiano et al. 2020, Sec. 4 and Algorithm 1).

    With cost ``c(x, y) = ||x - y||^2`` and smoothing ``gamma``, the dual (their eq. 4, written as the WNPG code
    does, both potentials added) is

        WD_gamma(mu, nu) = max_{f, g} E_mu[f(x)] + E_nu[g(y)] - gamma E_{mu x nu}[exp((f(x) + g(y) - c(x, y)) / gamma)]

    (equal to the entropic OT cost minus ``gamma``), over ``f = p1 . phi``, ``g = p2 . phi`` with the random features
    ``phi(z) = sqrt(2 / D) cos(Omega z + b)``, ``Omega`` ~ N(0, 1 / bandwidth^2) entrywise and ``b`` ~ U(0, 2 pi):
    the RKHS of the Gaussian kernel of that bandwidth (Rahimi and Recht, 2007). ``Omega`` and ``b`` are drawn once,
    at construction (the code: once per run), and kept as buffers.

    Args:
        dim: the embedding's dimension (here the action's); num_features: ``D`` (>= 1); bandwidth: of the Gaussian
        kernel (> 0); smoothing: ``gamma`` (> 0); generator: the draws of ``Omega`` and ``b`` (default: torch's).

    >>> dual = EntropicWassersteinDual(2, num_features=8, bandwidth=0.5, smoothing=1.0)
    >>> x, y = torch.randn(3, 4, 2), torch.randn(3, 4, 2)  # 3 states x 4 samples x dim 2
    >>> p1, p2 = torch.zeros(3, 8), torch.zeros(3, 8)
    >>> p1, p2 = dual.ascent_step(p1, p2, x, y, lr=0.05)
    >>> dual.estimate(p1, p2, x, y).shape  # one estimate per state
    torch.Size([3])
    """

    omega: Tensor
    bias: Tensor

    def __init__(self, dim: int, *, num_features: int = 100, bandwidth: float = 0.1, smoothing: float = 1.0,
                 generator: torch.Generator | None = None, dtype: torch.dtype | None = None) -> None:
        check_positive_int("dim", dim)
        check_positive_int("num_features", num_features)
        check_real("bandwidth", bandwidth, low=0, low_open=True)
        check_real("smoothing", smoothing, low=0, low_open=True)
        super().__init__()
        self.num_features, self.bandwidth, self.smoothing = num_features, float(bandwidth), float(smoothing)
        dtype = dtype or torch.get_default_dtype()
        self.register_buffer("omega", torch.randn(num_features, dim, generator=generator, dtype=dtype) / bandwidth)
        self.register_buffer("bias", torch.rand(num_features, generator=generator, dtype=dtype) * 2 * math.pi)

    def features(self, z: Tensor) -> Tensor:
        """``phi(z) = sqrt(2 / D) cos(Omega z + b)``, ``[..., dim] -> [..., D]``."""
        if z.requires_grad:
            return math.sqrt(2.0 / self.num_features) * torch.cos(z @ self.omega.T + self.bias)
        # No graph to keep: one fused matmul + bias and in-place ops (the dual ascent's many draws)
        out = torch.addmm(self.bias, z.reshape(-1, z.shape[-1]), self.omega.T).cos_().mul_(
            math.sqrt(2.0 / self.num_features))
        return out.reshape(*z.shape[:-1], self.num_features)

    def objective(self, f: Tensor, g: Tensor, cost: Tensor) -> Tensor:
        """The dual's integrand ``f + g - gamma exp((f + g - c) / gamma)`` (elementwise; average it over pairs)."""
        return f + g - self.smoothing * torch.exp((f + g - cost) / self.smoothing)

    def _terms(self, p1: Tensor, p2: Tensor, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        phi_x, phi_y = self.features(x), self.features(y)  # [n, M, D]
        f, g = (phi_x * p1.unsqueeze(-2)).sum(-1), (phi_y * p2.unsqueeze(-2)).sum(-1)  # [n, M]
        return phi_x, phi_y, f, g, (x - y).square().sum(-1)

    def ascent_step(self, p1: Tensor, p2: Tensor, x: Tensor, y: Tensor, lr: float) -> tuple[Tensor, Tensor]:
        """One gradient-ascent step of each state's dual vectors ``p1, p2 [n, D]`` on its samples ``x, y [n, M, dim]``
        paired index-wise (independent draws: one sample of the product coupling), as the code's loop does:

            w = 1 - exp((f(x_m) + g(y_m) - c(x_m, y_m)) / gamma)
            p1 += lr mean_m w phi(x_m),   p2 += lr mean_m w phi(y_m)

        i.e. ``p += lr * d/dp mean_m[objective]``, state by state. Constant ``lr`` (the code's ``lr_beta``; the BGPG
        paper's Algorithm 1 decays it as ``lr / sqrt(t)``)."""
        phi_x, phi_y, f, g, cost = self._terms(p1, p2, x, y)
        w = (1 - torch.exp((f + g - cost) / self.smoothing)).unsqueeze(-1)
        return p1 + lr * (w * phi_x).mean(-2), p2 + lr * (w * phi_y).mean(-2)

    def ascend(self, p1: Tensor, p2: Tensor, xs: Tensor, y: Tensor, lr: float) -> tuple[Tensor, Tensor]:
        """``T = xs.shape[1]`` successive :meth:`ascent_step` calls, step ``t`` on the draws ``xs[:, t] [n, M, dim]``
        against the same ``y [n, M, dim]``: the same updates, with every feature map and cost computed up front in
        one batched call (they do not depend on the dual vectors), so the loop only does the cheap inner products."""
        phi_xs, phi_y = self.features(xs), self.features(y)  # [n, T, M, D], [n, M, D]
        cost = (xs - y.unsqueeze(1)).square().sum(-1)  # [n, T, M]
        for t in range(xs.shape[1]):
            phi_x = phi_xs[:, t]
            f, g = (phi_x * p1.unsqueeze(-2)).sum(-1), (phi_y * p2.unsqueeze(-2)).sum(-1)
            w = (1 - torch.exp((f + g - cost[:, t]) / self.smoothing)).unsqueeze(-1)
            p1, p2 = p1 + lr * (w * phi_x).mean(-2), p2 + lr * (w * phi_y).mean(-2)
        return p1, p2

    def estimate(self, p1: Tensor, p2: Tensor, x: Tensor, y: Tensor) -> Tensor:
        """Each state's estimate ``mean_m objective(f(x_m), g(y_m), c(x_m, y_m))`` ``[n]``, differentiable in ``x``
        (and ``y``): at the maximising potentials its gradient is that of WD_gamma (the envelope theorem)."""
        _, _, f, g, cost = self._terms(p1, p2, x, y)
        return self.objective(f, g, cost).mean(-1)


class BGPGLoss(ActorCriticLoss):
    """BGPG: minimise ``-L(theta) + penalty_coeff * WD_gamma(pi_theta(.|s), pi_old(.|s)) + critic loss``.

    ``L`` is the importance-weighted surrogate ``mean_b r_b A_b``, ``r_b = pi_theta(a_b|s_b) / pi_old(a_b|s_b)``
    (Pacchiano et al. 2020, Algorithm 2's ``F(theta)``), with PPO's pessimistic clip at ``clip_epsilon``: the code
    runs a PPO skeleton with ``cliprange=10``, so the clip only bites for ``r > 11`` (None: no clip). Its advantages
    are standardised per minibatch (``normalize_advantage``; the code's ``(A - mean) / (std + 1e-8)``).

    The behaviour embedding (left open by the paper for MuJoCo) is the code's: at each state ``s_b``,
    ``num_action_samples`` (M) actions of the policy, so the penalty is the mean over the minibatch's states of the
    per-state distance between M reparameterised draws of pi_theta and M draws of pi_old (stored once per batch in
    ``old_action_samples [*batch, M, d]`` by :meth:`start_batch`, as the code stores them while collecting), with the
    squared Euclidean cost. Its gradient is pathwise, through ``rsample``: the actor must be a reparameterisable
    continuous policy (Normal, or TanhNormal whose draws are the squashed actions the env receives).

    Each call first runs ``dual_steps`` (T) ascent steps of the dual vectors ``p1, p2 [rows, D]`` at the current
    policy (no gradient to theta; fresh draws of pi_theta each step, as the code: :meth:`EntropicWassersteinDual.
    ascent_step`), then gives ``loss_wasserstein = penalty_coeff * mean_b estimate_b`` with those vectors fixed and
    new reparameterised draws. The vectors are zero after :meth:`start_batch` (the code's ``clear_beta``, once per
    collected batch) and carried from minibatch to minibatch: ``dual_warm_start="row"`` keeps one per minibatch ROW,
    as the code does (its ``beta [nbatch_train, D]``: a row starts from whatever state held it in the previous
    minibatch); ``"state"`` keeps one per frame of the batch (read from ``dual_index``, written by start_batch).

    Defaults are the WNPG code's (``run_ppo_kwng.py``): M = 10, D = 100, bandwidth 0.1, gamma 1, T = 25, dual lr
    0.05, penalty 0.1, and ``critic_coeff = 0.25`` (its ``vf_coef 0.5`` times ppo2's ``0.5 (V - R)^2``). What the
    code has and this loss leaves out: the value clip at +/- 10 around the old value (never active at that width).

    Outputs: ``loss_objective``, ``loss_wasserstein``, ``loss_critic`` (and ``loss_entropy`` with ``entropy_coeff``),
    the detached ``wasserstein`` (the estimate before ``penalty_coeff``), ``kl_approx`` (the code's ``approxkl``,
    ``0.5 mean (log r)^2``) and ``clip_fraction``.

    Args:
        actor_network: a probabilistic actor with a reparameterisable continuous distribution; critic_network: a
            ``ValueOperator``. action_dim: the action's size (default: the actor's spec).
        penalty_coeff (>= 0), num_action_samples (M >= 1), num_features (D >= 1), feature_bandwidth (> 0),
        smoothing (gamma > 0), dual_steps (T >= 0), dual_lr (>= 0), dual_warm_start (``"row"``, ``"state"``):
            the penalty. clip_epsilon (> 0 or None), normalize_advantage: the surrogate.
        critic_coeff, loss_critic_type, entropy_coeff, reduction, functional: as in TorchRL's A2C/PPO losses.
        generator: the draws of the random features (default: torch's global generator).

    >>> from torch import nn
    >>> from torchrl.modules import NormalParamExtractor, ProbabilisticActor, TanhNormal, ValueOperator
    >>> _ = torch.manual_seed(0)
    >>> net = TensorDictModule(nn.Sequential(nn.Linear(3, 2), NormalParamExtractor()), ["observation"],
    ...                        ["loc", "scale"])
    >>> actor = ProbabilisticActor(net, in_keys=["loc", "scale"], distribution_class=TanhNormal)
    >>> loss = BGPGLoss(actor, ValueOperator(nn.Linear(3, 1), in_keys=["observation"]), action_dim=1)
    >>> data = TensorDict({"observation": torch.randn(8, 3), "action": torch.rand(8, 1) * 1.8 - 0.9,
    ...                    "advantage": torch.randn(8, 1), "value_target": torch.zeros(8, 1)}, batch_size=[8])
    >>> loss.start_batch(data)  # the behaviour's M draws per state, duals cleared
    >>> data["old_action_samples"].shape
    torch.Size([8, 10, 1])
    >>> out = loss(data)
    >>> sorted(k for k in out.keys() if k.startswith("loss_"))
    ['loss_critic', 'loss_objective', 'loss_wasserstein']
    """

    @dataclass
    class _AcceptedKeys(ActorCriticKeys):
        """Configurable tensordict keys (``set_keys``): TorchRL's A2C/PPO keys, plus ``old_action_samples`` (M
        behaviour draws per state, ``[*batch, M, d]``) and ``dual_index`` (``dual_warm_start="state"``)."""

        old_action_samples: NestedKey = "old_action_samples"
        dual_index: NestedKey = "dual_index"

    default_keys = _AcceptedKeys
    tensor_keys: _AcceptedKeys
    actor_network: TensorDictModule
    critic_network: TensorDictModule
    actor_network_params: TensorDictParams
    critic_network_params: TensorDictParams
    target_actor_network_params: TensorDictParams
    target_critic_network_params: TensorDictParams
    #: Whether :meth:`forward` also returns the differentiable behaviour ``embedding`` (WNPG's KWNG reads it).
    _with_embedding = False

    def __init__(self, actor_network: TensorDictModule, critic_network: TensorDictModule, *,
                 action_dim: int | None = None, penalty_coeff: float = 0.1, num_action_samples: int = 10,
                 num_features: int = 100, feature_bandwidth: float = 0.1, smoothing: float = 1.0, dual_steps: int = 25,
                 dual_lr: float = 0.05, dual_warm_start: str = "row", clip_epsilon: float | None = 10.0,
                 normalize_advantage: bool = True, critic_coeff: float = 0.25, loss_critic_type: str = "l2",
                 entropy_coeff: float | None = None, reduction: str = "mean", functional: bool = True,
                 generator: torch.Generator | None = None) -> None:
        check_real("penalty_coeff", penalty_coeff, low=0)
        check_positive_int("num_action_samples", num_action_samples)
        check_positive_int("dual_steps", dual_steps, minimum=0)
        check_real("dual_lr", dual_lr, low=0)
        check_choice("dual_warm_start", dual_warm_start, DUAL_WARM_STARTS)
        check_real("clip_epsilon", clip_epsilon, low=0, low_open=True, allow_none=True)
        check_bool("normalize_advantage", normalize_advantage)
        if action_dim is None:
            spec = getattr(actor_network, "spec", None)
            action_spec = spec.get("action", None) if spec is not None and hasattr(spec, "get") else spec
            if action_spec is None or not action_spec.shape:
                raise ValueError("action_dim is None and the actor has no action spec to read it from: pass "
                                 "action_dim (the size of one action)")
            action_dim = int(action_spec.shape[-1])
        super().__init__({"actor_network": actor_network, "critic_network": critic_network},
                         entropy_coeff=entropy_coeff, critic_coeff=critic_coeff, loss_critic_type=loss_critic_type,
                         reduction=reduction, functional=functional)
        dtype = next(iter(actor_network.parameters())).dtype
        self.dual = EntropicWassersteinDual(action_dim, num_features=num_features, bandwidth=feature_bandwidth,
                                            smoothing=smoothing, generator=generator, dtype=dtype)
        self.action_dim, self.penalty_coeff = action_dim, float(penalty_coeff)
        self.num_action_samples = num_action_samples
        self.dual_steps, self.dual_lr, self.dual_warm_start = dual_steps, float(dual_lr), dual_warm_start
        self.clip_epsilon, self.normalize_advantage = clip_epsilon, normalize_advantage
        #: The dual vectors ``[2, rows, D]`` (p1, p2) carried between calls; None: zeros from the next call on.
        self.duals: Tensor | None = None

    @property
    def in_keys(self) -> list[NestedKey]:
        keys = self.tensor_keys
        out = [keys.action, keys.sample_log_prob, keys.advantage, keys.value_target, keys.old_action_samples,
               *self.actor_network.in_keys, *self.critic_network.in_keys]
        return list(dict.fromkeys(out))

    @property
    def out_keys(self) -> list[str]:
        return ["loss_objective", "loss_wasserstein", "loss_critic", "wasserstein", "kl_approx", "clip_fraction",
                *(["loss_entropy", "entropy"] if self.entropy_coeff is not None else [])]

    @torch.no_grad()
    def start_batch(self, tensordict: TensorDictBase) -> None:
        """Once per collected batch, before its first minibatch: write ``old_action_samples`` (M draws of the
        behaviour policy per state, from its stored ``loc``/``scale`` if present, else the current actor) into
        ``tensordict`` in place, and clear the dual vectors (``dual_warm_start="state"``: one per frame, indexed by
        the ``dual_index`` it also writes)."""
        keys = self.tensor_keys
        check_entries_present(tensordict, self.actor_network.in_keys, type(self).__name__)
        flat = tensordict.reshape(-1)
        n = flat.numel()
        if all(flat.get(k, None) is not None for k in self._dist_keys):
            old = self.actor_network.build_dist_from_params(flat.select(*self._dist_keys))
        else:
            old = self._current_dist(flat)
        draws = old.sample((self.num_action_samples,)).movedim(0, 1)  # [n, M, d]
        tensordict.set(keys.old_action_samples, draws.reshape(*tensordict.shape, *draws.shape[1:]))
        self.duals = None
        if self.dual_warm_start == "state":
            index = torch.arange(n, device=draws.device)
            tensordict.set(keys.dual_index, index.reshape(tensordict.shape))
            self.duals = draws.new_zeros(2, n, self.dual.num_features)

    def _rows(self, flat: TensorDictBase, n: int, like: Tensor) -> Tensor:
        """Which stored dual vector each row of this call uses (allocating zeros for new ones)."""
        if self.dual_warm_start == "row":
            if self.duals is None or self.duals.shape[1] < n:
                grown = like.new_zeros(2, n, self.dual.num_features)
                if self.duals is not None:
                    grown[:, :self.duals.shape[1]] = self.duals
                self.duals = grown
            return torch.arange(n, device=like.device)
        index = flat.get(self.tensor_keys.dual_index, None)
        if index is None or self.duals is None:
            raise ValueError(f"dual_warm_start='state' reads one dual vector per frame of the batch: call start_batch "
                             f"on the collected batch first (it writes {self.tensor_keys.dual_index!r})")
        return index.reshape(n).long()

    def _prepare(self, tensordict: TensorDictBase) -> TensorDictBase:
        """A flat shallow copy with the advantage (the value estimator's if missing), entries checked by name."""
        keys, owner = self.tensor_keys, type(self).__name__
        td = tensordict.clone(False)
        check_entries_present(td, [keys.action, keys.value_target, *self.actor_network.in_keys,
                                   *self.critic_network.in_keys], owner)
        if td.get(keys.old_action_samples, None) is None:
            raise ValueError(f"{owner} needs {keys.old_action_samples!r} (M behaviour draws per state): call "
                             "start_batch on the collected batch before its minibatches")
        if td.get(keys.advantage, None) is None:
            self._estimate_advantage(td)
        if td.batch_size.numel() == 0:
            raise ValueError(f"{owner} got an empty batch")
        self._check_entries(td, [*self.actor_network.in_keys, keys.action, keys.advantage, keys.sample_log_prob,
                                 keys.value_target, keys.old_action_samples])
        flat = td.reshape(-1)
        n = flat.numel()
        samples = flat.get(keys.old_action_samples)
        check_shape(entry_name(keys.old_action_samples, owner), samples, (n, self.num_action_samples, self.action_dim),
                    what=f"[*batch, M={self.num_action_samples}, action_dim={self.action_dim}]")
        return flat

    def _embedding(self, draws: Tensor, value: Tensor) -> Tensor | None:
        """WNPG's behaviour embedding (None here): see :class:`torchrl_ot.WNPGLoss`."""
        return None

    @dispatch()
    def forward(self, tensordict: TensorDictBase) -> TensorDictBase:
        """The losses on a minibatch, after ``dual_steps`` ascent steps of its rows' dual vectors (see the class
        docstring). Refused with a ``ValueError`` naming the entry: a missing entry (``old_action_samples``: call
        :meth:`start_batch`), NaN or inf, ``old_action_samples`` not ``[*batch, M, action_dim]``."""
        keys = self.tensor_keys
        flat = self._prepare(tensordict)
        n, M = flat.numel(), self.num_action_samples
        dist = self._current_dist(flat)
        logp = log_prob_per_sample(dist, flat.get(keys.action), n)
        stored = flat.get(keys.sample_log_prob, None)
        log_ratio = logp - (logp.detach() if stored is None else stored.reshape(n).detach())
        ratio = log_ratio.exp()
        adv = flat.get(keys.advantage).reshape(n).detach()
        if self.normalize_advantage:  # the code's, per minibatch: numpy's std (ddof 0) + 1e-8
            adv = (adv - adv.mean()) / (adv.std(unbiased=False) + 1e-8) if n > 1 else adv - adv.mean()
        surrogate = ratio * adv
        if self.clip_epsilon is not None:  # PPO's pessimistic clip (the code's cliprange 10: bites only for r > 11)
            clipped = ratio.clamp(1 - self.clip_epsilon, 1 + self.clip_epsilon) * adv
            surrogate = torch.minimum(surrogate, clipped)

        old = flat.get(keys.old_action_samples).detach()
        rows = self._rows(flat, n, old)
        p1, p2 = self.duals[0, rows], self.duals[1, rows]
        with torch.no_grad():  # the dual ascent at the current theta: T fresh draws of pi_theta
            if self.dual_steps:
                fresh = dist.sample((self.dual_steps, M)).movedim(2, 0)  # [n, T, M, d]
                p1, p2 = self.dual.ascend(p1, p2, fresh, old, self.dual_lr)
                self.duals[0, rows], self.duals[1, rows] = p1, p2
        draws = dist.rsample((M,)).movedim(0, 1)  # [n, M, d], differentiable in theta
        wd = self.dual.estimate(p1, p2, draws, old)

        critic_out = self._run("critic_network", flat)
        value = critic_out.get(keys.value)
        if flat.get(keys.value_target).shape != value.shape:
            check_shape(entry_name(keys.value_target, type(self).__name__), flat.get(keys.value_target),
                        tuple(value.shape), what=f"{list(value.shape)}, the critic's output (the batch flattened)")
        critic = self._critic_loss(critic_out, flat)
        shape = tensordict.shape
        out = {"loss_objective": self._reduce_loss(-surrogate.reshape(shape), tensordict),
               "loss_wasserstein": self._reduce_loss(self.penalty_coeff * wd.reshape(shape), tensordict),
               "loss_critic": self._reduce_loss(self.critic_coeff * critic.reshape(shape), tensordict),
               "wasserstein": wd.detach().mean(),
               "kl_approx": 0.5 * log_ratio.detach().square().mean(),
               "clip_fraction": ((ratio.detach() - 1).abs() > (self.clip_epsilon or math.inf)).to(ratio.dtype).mean()}
        if self.entropy_coeff is not None:
            entropy = -log_prob_per_sample(dist, draws[:, 0], n)  # one-draw Monte-Carlo (TanhNormal has no closed form)
            out["loss_entropy"] = self._reduce_loss(-self.entropy_coeff * entropy.reshape(shape), tensordict)
            out["entropy"] = entropy.detach().mean()
        embedding = self._embedding(draws, value)
        if embedding is not None:
            out["embedding"] = embedding
        return TensorDict(out, batch_size=[])

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The actor's and the critic's trainable parameters, in that order (the very objects the networks run
        with; functional: those loaded by ``to_module``)."""
        if self.functional:
            critic = self.critic_network_params.values(True, True)
        else:
            critic = self.critic_network.parameters()
        return [*self._actor_params(), *[p for p in critic if isinstance(p, nn.Parameter) and p.requires_grad]]
