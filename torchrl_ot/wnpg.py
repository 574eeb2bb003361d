"""``WNPGLoss``: the Wasserstein Natural Policy Gradient (Moskovitz, Arbel, Huszar and Gretton, ICLR 2021,
"Efficient Wasserstein Natural Gradients for Reinforcement Learning"), a baseline of OT-TRPO.

The gradient of BGPG's objective (:class:`torchrl_ot.BGPGLoss`: the surrogate, the behaviour-space Wasserstein
penalty and the critic's loss, as the WNPG code sums them) is preconditioned by the kernel estimate of the
Wasserstein information matrix of the behaviour embedding (Arbel et al., ICLR 2020, "Kernelized Wasserstein Natural
Gradient", their eqs. 10-12 and Proposition 5): with ``b`` basis points ``z_k`` drawn from the minibatch's
embeddings ``h_n(theta)`` and one coordinate ``j_k`` each,

    K[k, k'] = 1/L sum_{n, r} d^2k(z_k, h_n)/dx_{j_k} dy_r  d^2k(z_k', h_n)/dx_{j_k'} dy_r          (b x b)
    T[k]     = d/dtheta  1/L sum_n dk(z_k, h_n(theta))/dx_{j_k}                                    (b x P)
    nat_g    = (eps diag(D)^-1 + T^T K^+ T)^-1 g,   D_j = 1 / (||(K^+)^(1/2) T[:, j]|| + 1e-8)

computed by Woodbury through a ``b x b`` solve. The WNPG code (``tedmoskovitz/WNPG`` @ 396239b: ``ppo2_kwng2.py``,
``kwng_tf.py``, ``gaussian_tf.py``; the TF port of ``MichaelArbel/KWNG/kwng.py``) fixes what the papers leave open,
and these defaults are its: the embedding ``h(s) = (M reparameterised actions at s, V(s))``, the Gaussian kernel with
bandwidth ``10^log_bandwidth`` times the mean squared basis-to-batch distance (re-estimated every step),
``b = 5``, ``eps`` from 1e-5 adapted Levenberg-Marquardt style, the fallback to ``g`` when ``<g, nat_g> <= 0`` and
the rescale of ``nat_g`` to unit norm when its norm exceeds 0.5, then Adam on ``nat_g``.
``shared/design/wasserstein-baselines.md`` (section 2) records the sources, and the quirks Q1-Q5.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from tensordict import TensorDict, TensorDictBase
from tensordict.nn import TensorDictModule
from torch import Tensor, nn

from torchrl_ot.bgpg import BGPGLoss
from torchrl_ot.trpo import flat_grad
from torchrl_ot.validation import check_bool, check_choice, check_positive_int, check_real

__all__ = ["WNPGLoss", "WassersteinNaturalGradient", "gaussian_kernel_derivatives", "kwng_direction"]

#: ``kernel``: the kernels of the KWNG estimator (the code has the Gaussian one only).
KERNELS = ("gaussian",)
#: ``damping_schedule``: how eps adapts every 5 steps (see :class:`WassersteinNaturalGradient`).
DAMPING_SCHEDULES = ("decrease_only", "levenberg_marquardt", "fixed")


def gaussian_kernel_derivatives(basis: Tensor, points: Tensor, coords: Tensor,
                                bandwidth: float | Tensor) -> tuple[Tensor, Tensor]:
    """For ``k(x, y) = exp(-||x - y||^2 / (2 s))`` (``s = bandwidth``), the derivatives at ``x = basis[k]`` along
    coordinate ``j = coords[k]``, against every ``y = points[n]``: ``dk/dx_j [b, L]`` and ``d^2k/dx_j dy_r
    [b, L, d]`` (``gaussian_tf.py``'s ``_dkdxdy`` with a mask):

        dk/dx_j = -k (x - y)_j / s,    d^2k/dx_j dy_r = k (delta_jr / s - (x - y)_j (x - y)_r / s^2)
    """
    diff = basis.unsqueeze(1) - points.unsqueeze(0)  # [b, L, d]
    gram = torch.exp(-0.5 * diff.square().sum(-1) / bandwidth)
    along = diff.gather(-1, coords.view(-1, 1, 1).expand(-1, diff.shape[1], 1)).squeeze(-1)  # (x - y)_j [b, L]
    onehot = nn.functional.one_hot(coords, diff.shape[-1]).to(diff.dtype).unsqueeze(1)  # [b, 1, d]
    dkdx = -gram * along / bandwidth
    dkdxdy = gram.unsqueeze(-1) * (onehot / bandwidth - along.unsqueeze(-1) * diff / bandwidth**2)
    return dkdx, dkdxdy


def kwng_direction(g: Tensor, K: Tensor, T: Tensor, damping: float, *, diag_scaling: bool = True) -> Tensor:
    """``(damping diag(D)^-1 + T^T K^+ T)^-1 g`` for ``K [b, b]`` (symmetric PSD), ``T [b, P]``, ``g [P]``, by
    Woodbury as ``kwng_tf.py``'s ``compute_natural_gradient``: ``T~ = S^-1/2 V^T T`` from ``K = V S V^T``,
    ``D_j = 1 / (||T~[:, j]|| + 1e-8)`` (``diag_scaling``; else 1), then
    ``D (g - T~^T (T~ D T~^T + damping I)^-1 T~ D g) / damping``.

    In float64 (the code's ``kwng_long`` variant; its default runs float32). Eigen-directions of K below
    ``b * float64 eps`` times its largest eigenvalue are dropped, as a pseudo-inverse does: the code keeps every
    singular value > 0, which for a rounding-level negative eigenvalue would add ``+1/|lambda|`` instead.
    """
    check_real("damping", damping, low=0, low_open=True)
    g64, K64, T64 = g.double(), K.double(), T.double()
    S, V = torch.linalg.eigh(0.5 * (K64 + K64.T))
    keep = S > S.max().clamp_min(0) * K64.shape[0] * torch.finfo(torch.float64).eps
    Tt = (V[:, keep] * S[keep].rsqrt()).T @ T64  # [r, P]
    D = 1.0 / (Tt.norm(dim=0) + 1e-8) if diag_scaling else torch.ones_like(g64)
    G = (Tt * D) @ Tt.T + damping * torch.eye(Tt.shape[0], dtype=torch.float64, device=g.device)
    x = torch.linalg.solve(G, Tt @ (D * g64))
    return (D * (g64 - Tt.T @ x) / damping).to(g.dtype)


class WassersteinNaturalGradient:
    """The KWNG estimator of the Wasserstein natural gradient with its safeguards and adaptive damping, stateful
    across steps as the code's ``Model`` (``ppo2_kwng2.py``) and ``KWNGWrapper`` (``MichaelArbel/KWNG``).

    :meth:`__call__` (one step): adapt ``damping`` from the previous step; draw ``num_basis`` embedding rows as basis
    points and a coordinate for each; ``K``, ``T`` (``num_basis`` backward passes) and ``g``; ``nat_g`` by
    :func:`kwng_direction`; ``g`` instead if ``<g, nat_g> <= 0``; divided by its norm if that exceeds ``clip_norm``
    (unit norm, not ``clip_norm``: the code's ``clip_gradient``).

    Damping (the code's ``dumping``): ``red = 2 (old_loss - loss) / (lr <g, nat_g>_prev)``, its max kept; every
    ``damping_freq`` steps ``eps *= 0.85`` if that max > 0.75 (and eps > 1e-10), ``eps /= 0.85`` if < 0.25 (and eps
    < 1e5), then the max reset to 0. ``damping_schedule``: ``"levenberg_marquardt"`` does both (``MichaelArbel/KWNG``,
    the PyTorch original); ``"decrease_only"`` never increases eps, which is what the WNPG TF code runs (its second
    ``tf.cond`` overwrites the first's increase: quirk Q2); ``"fixed"`` never adapts. The code's first-step sentinel
    ``old_loss = -1`` (which also skips any step after a loss <= -1) is ``None`` here. ``old_loss`` is the previous
    step's loss, on the previous minibatch, as in the code.

    Args:
        num_basis (>= 1), log_bandwidth (finite: log10 multiplier of the adaptive bandwidth), damping (> 0),
        damping_schedule, diag_scaling, clip_norm (> 0 or None), kernel (``"gaussian"``).
    """

    def __init__(self, *, num_basis: int = 5, log_bandwidth: float = 0.0, damping: float = 1e-5,
                 damping_schedule: str = "decrease_only", diag_scaling: bool = True, clip_norm: float | None = 0.5,
                 kernel: str = "gaussian", damping_freq: int = 5, reduction_coeff: float = 0.85,
                 reduction_bounds: tuple[float, float] = (0.25, 0.75),
                 damping_bounds: tuple[float, float] = (1e-10, 1e5)) -> None:
        check_positive_int("num_basis", num_basis)
        check_real("log_bandwidth", log_bandwidth)
        check_real("damping", damping, low=0, low_open=True)
        check_choice("damping_schedule", damping_schedule, DAMPING_SCHEDULES)
        check_bool("diag_scaling", diag_scaling)
        check_real("clip_norm", clip_norm, low=0, low_open=True, allow_none=True)
        check_choice("kernel", kernel, KERNELS)
        check_positive_int("damping_freq", damping_freq)
        check_real("reduction_coeff", reduction_coeff, low=0, low_open=True, high=1, high_open=True)
        self.num_basis, self.log_bandwidth, self.damping = num_basis, float(log_bandwidth), float(damping)
        self.damping_schedule, self.diag_scaling, self.clip_norm, self.kernel = (damping_schedule, diag_scaling,
                                                                                 clip_norm, kernel)
        self.damping_freq, self.reduction_coeff = damping_freq, float(reduction_coeff)
        self.reduction_bounds, self.damping_bounds = reduction_bounds, damping_bounds
        self.old_loss: float | None = None
        self.dot_prod, self.counter, self.reduction_factor = 0.0, 0, 0.0

    def state_dict(self) -> dict[str, float | int | None]:
        """The adaptive state (damping and the reduction-ratio bookkeeping), for a checkpoint."""
        return {"damping": self.damping, "old_loss": self.old_loss, "dot_prod": self.dot_prod,
                "counter": self.counter, "reduction_factor": self.reduction_factor}

    def load_state_dict(self, state: dict[str, float | int | None]) -> None:
        for key, value in state.items():
            setattr(self, key, value)

    def adapt_damping(self, loss: float, lr: float) -> None:
        """The code's ``dumping(loss, lr)``, before this step's direction (see the class docstring)."""
        if self.old_loss is not None and lr * self.dot_prod != 0:
            self.reduction_factor = max(self.reduction_factor, 2.0 * (self.old_loss - loss) / (lr * self.dot_prod))
        self.counter += 1
        if self.old_loss is None or self.counter % self.damping_freq or self.damping_schedule == "fixed":
            return
        (low_red, high_red), (eps_min, eps_max) = self.reduction_bounds, self.damping_bounds
        grows = self.damping_schedule == "levenberg_marquardt"
        if self.reduction_factor < low_red and self.damping < eps_max and grows:
            self.damping /= self.reduction_coeff
        if self.reduction_factor > high_red and self.damping > eps_min:
            self.damping *= self.reduction_coeff
        self.reduction_factor = 0.0

    def matrices(self, embedding: Tensor, params: Sequence[Tensor], *, basis_index: Tensor | None = None,
                 coords: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """``K [b, b]``, ``T [b, P]`` and the bandwidth ``s`` for an embedding ``[L, d]`` differentiable in
        ``params``; basis rows and coordinates drawn uniformly (torch's generator) unless given."""
        L, d = embedding.shape
        if basis_index is None:
            basis_index = torch.randperm(L, device=embedding.device)[:min(self.num_basis, L)]
        if coords is None:
            coords = torch.randint(d, (basis_index.numel(),), device=embedding.device)
        basis = embedding.detach()[basis_index]
        # log10 s = log_bandwidth + log10(mean ||z_k - h_n||^2): the code's adaptive bandwidth, no gradient
        sq = (basis.unsqueeze(1) - embedding.detach().unsqueeze(0)).square().sum(-1)
        bandwidth = 10.0**self.log_bandwidth * sq.mean()
        _, dkdxdy = gaussian_kernel_derivatives(basis, embedding.detach(), coords, bandwidth)
        K = torch.einsum("knr,mnr->km", dkdxdy, dkdxdy) / L
        dkdx, _ = gaussian_kernel_derivatives(basis, embedding, coords, bandwidth)
        aux = dkdx.mean(1)
        T = torch.stack([flat_grad(aux[k], params, retain_graph=True) for k in range(aux.numel())])
        return K, T, bandwidth

    def __call__(self, loss: Tensor, embedding: Tensor, params: Sequence[Tensor], lr: float, *,
                 basis_index: Tensor | None = None, coords: Tensor | None = None) -> tuple[Tensor, dict[str, float]]:
        """The preconditioned gradient of ``loss`` w.r.t. ``params`` (one flat vector) and the step's diagnostics
        (``damping``, ``natural_fallback``, ``natural_rescaled``, ``natural_cosine``); the graph is kept."""
        self.adapt_damping(float(loss.detach()), lr)
        K, T, _ = self.matrices(embedding, params, basis_index=basis_index, coords=coords)
        g = flat_grad(loss, params, retain_graph=True)
        if not bool(torch.isfinite(g).all()):
            raise ValueError("the gradient of the WNPG loss contains NaN or inf; refusing a NaN update")
        nat = kwng_direction(g, K, T, self.damping, diag_scaling=self.diag_scaling)
        dot = float(g @ nat)
        fallback = not dot > 0  # also NaN: the Euclidean gradient, as the code
        direction = g if fallback else nat
        norm = float(direction.norm())
        rescaled = self.clip_norm is not None and self.clip_norm / (norm + 1e-6) < 1.0
        if rescaled:
            direction, dot = direction / norm, dot / norm
        self.dot_prod, self.old_loss = dot, float(loss.detach())
        cosine = float(g @ direction) / max(float(g.norm()) * float(direction.norm()), 1e-30)
        return direction, {"damping": self.damping, "natural_fallback": float(fallback),
                           "natural_rescaled": float(rescaled), "natural_cosine": cosine}


class WNPGLoss(BGPGLoss):
    """WNPG: :class:`BGPGLoss`'s objective (the same keys, outputs and defaults), trained along the Wasserstein
    natural gradient of a :class:`WassersteinNaturalGradient` over the actor's AND the critic's parameters (the code
    preconditions its one shared variable scope, and ``V(s)`` is part of the embedding: quirk Q4).

    :meth:`forward` also returns the differentiable ``embedding [n, M d + 1]``: per state, the M reparameterised
    actions of the penalty, flattened, and ``V(s)``. :meth:`natural_gradient_loss` turns the output into a scalar
    whose value is the loss and whose gradient is the natural gradient, so any loop's ``backward()`` then
    ``optimizer.step()`` takes the WNPG step (the code: Adam, lr 5e-5, on ``nat_g``); :meth:`natural_step` is that
    loop for one minibatch.

    Args:
        num_basis, log_bandwidth, damping, damping_schedule, diag_scaling, natural_clip (the estimator's
        ``clip_norm``), kernel: see :class:`WassersteinNaturalGradient`. The rest: as :class:`BGPGLoss`.

    >>> from torch import nn
    >>> from torchrl.modules import NormalParamExtractor, ProbabilisticActor, TanhNormal, ValueOperator
    >>> _ = torch.manual_seed(0)
    >>> net = TensorDictModule(nn.Sequential(nn.Linear(3, 2), NormalParamExtractor()), ["observation"],
    ...                        ["loc", "scale"])
    >>> actor = ProbabilisticActor(net, in_keys=["loc", "scale"], distribution_class=TanhNormal)
    >>> loss = WNPGLoss(actor, ValueOperator(nn.Linear(3, 1), in_keys=["observation"]), action_dim=1)
    >>> data = TensorDict({"observation": torch.randn(8, 3), "action": torch.rand(8, 1) * 1.8 - 0.9,
    ...                    "advantage": torch.randn(8, 1), "value_target": torch.zeros(8, 1)}, batch_size=[8])
    >>> loss.start_batch(data)
    >>> optim = torch.optim.Adam(loss.trainable_parameters(), lr=5e-5)
    >>> info = loss.natural_step(data, optim)
    >>> sorted(info.keys())
    ['damping', 'natural_cosine', 'natural_fallback', 'natural_rescaled']
    """

    _with_embedding = True

    def __init__(self, actor_network: TensorDictModule, critic_network: TensorDictModule, *, num_basis: int = 5,
                 log_bandwidth: float = 0.0, damping: float = 1e-5, damping_schedule: str = "decrease_only",
                 diag_scaling: bool = True, natural_clip: float | None = 0.5, kernel: str = "gaussian",
                 **kwargs) -> None:
        natural = WassersteinNaturalGradient(num_basis=num_basis, log_bandwidth=log_bandwidth, damping=damping,
                                             damping_schedule=damping_schedule, diag_scaling=diag_scaling,
                                             clip_norm=natural_clip, kernel=kernel)  # refused before building
        super().__init__(actor_network, critic_network, **kwargs)
        self.natural = natural

    def _embedding(self, draws: Tensor, value: Tensor) -> Tensor:
        n = draws.shape[0]
        return torch.cat([draws.reshape(n, -1), value.reshape(n, -1).to(draws.dtype)], -1)

    def natural_gradient(self, out: TensorDictBase, lr: float, **kwargs) -> tuple[Tensor, dict[str, float]]:
        """The natural gradient (flat, over :meth:`trainable_parameters`) of the sum of ``out``'s ``loss_*`` terms,
        ``out`` being this loss's output on a minibatch; ``lr`` is the optimiser's (for the damping's reduction
        ratio). ``kwargs`` (``basis_index``, ``coords``) go to :meth:`WassersteinNaturalGradient.matrices`."""
        loss = sum(v for k, v in out.items() if k.startswith("loss_"))
        return self.natural(loss, out["embedding"], self.trainable_parameters(), lr, **kwargs)

    def natural_gradient_loss(self, out: TensorDictBase, lr: float) -> tuple[Tensor, dict[str, float]]:
        """A scalar equal to the loss whose gradient w.r.t. :meth:`trainable_parameters` is the natural gradient
        (the loss's value plus ``<theta, nat_g>`` minus its own value), and the step's diagnostics."""
        loss = sum(v for k, v in out.items() if k.startswith("loss_"))
        nat, info = self.natural(loss, out["embedding"], self.trainable_parameters(), lr)
        params = self.trainable_parameters()
        linear = sum((p * c.view_as(p)).sum() for p, c in zip(params, nat.split([p.numel() for p in params]),
                                                               strict=True))
        return loss.detach() + linear - linear.detach(), info

    def natural_step(self, tensordict: TensorDictBase, optimizer: torch.optim.Optimizer) -> TensorDictBase:
        """One WNPG step on a minibatch: the natural gradient into the parameters' ``.grad``, then
        ``optimizer.step()`` (the code's ``apply_gradients``). Returns the diagnostics."""
        out = self(tensordict)
        surrogate, info = self.natural_gradient_loss(out, optimizer.param_groups[0]["lr"])
        optimizer.zero_grad()
        surrogate.backward()
        optimizer.step()
        return TensorDict({k: torch.tensor(v) for k, v in info.items()}, batch_size=[])

