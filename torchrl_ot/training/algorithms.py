"""What each algorithm does with a collected batch, around the minibatch epochs they all share.

Every update of ``recipes/train.py`` is the same loop: advantages, :meth:`Algorithm.before_epochs`,
``num_epochs`` x ``num_minibatches`` Adam steps on :meth:`Algorithm.minibatch_loss`, then
:meth:`Algorithm.after_epochs`. An :class:`Algorithm` owns its loss (with the value estimator) and
fills those hooks; the base class fills them with nothing, which is PPO and A2C:

- ``ot_trpo``, ``wpo``: before, normalise the advantages, set epsilon for the scheduled std and solve
  lambda* (eq. 12) once; after, project the actor into the trust region (or measure its transport)
  and set the std for the next batch.
- ``trpo``: before, normalise the advantages and take the actor's natural-gradient step; the
  minibatches then train the critic only.
- ``ppo``, ``a2c``: nothing around the epochs (ClipPPOLoss normalises per minibatch).
- ``bgpg``, ``wnpg``: before, the behaviour policy's M action draws per state and cleared dual vectors; each
  minibatch step is then BGPG's penalised loss (:class:`torchrl_ot.BGPGLoss`), for ``wnpg`` along its
  Wasserstein natural gradient (:class:`torchrl_ot.WNPGLoss`).

Build one with :func:`make_algorithm`; :func:`make_loss` is its loss alone.
"""

from __future__ import annotations

import math

import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig
from tensordict import TensorDictBase
from tensordict.nn import TensorDictModule
from torchrl.modules import ProbabilisticActor, ValueOperator
from torchrl.objectives import A2CLoss, ClipPPOLoss, LossModule
from torchrl.objectives.utils import ValueEstimators

from torchrl_ot import (
    BGPGLoss,
    DiscreteMetricCost,
    EuclideanCost,
    OTTrustRegionLoss,
    TransportCost,
    TRPOLoss,
    WNPGLoss,
)
from torchrl_ot.bgpg import DUAL_WARM_STARTS
from torchrl_ot.training.optim import scheduled_lr
from torchrl_ot.validation import check_bool, check_choice, check_positive_int, check_real
from torchrl_ot.wnpg import DAMPING_SCHEDULES, KERNELS

# Batch entries that no loss reads once the advantages are computed (left out of the minibatches).
UNUSED_AFTER_ADVANTAGES = ("next", "collector", "done", "terminated", "truncated", "episode_reward", "step_count")


class Minibatches:
    """A collected batch as minibatches of ``size`` frames: successive :meth:`sample` calls walk through one
    random permutation of it (an epoch; the last minibatch of an epoch may be shorter), then the next.

    What TorchRL's ``ReplayBuffer(TensorStorage(batch), sampler=SamplerWithoutReplacement())`` gives, the same
    permutations from the same ``torch.randperm`` draws at the same moments (the first on the first call, the
    next as soon as one is used up, as its sampler does: that keeps every other random draw of a run where it
    was), by indexing the flat batch directly: no storage and sampler bookkeeping on every step. Without the
    entries no loss reads any more (``UNUSED_AFTER_ADVANTAGES``), which spares every minibatch their indexing.
    """

    def __init__(self, batch: TensorDictBase, size: int) -> None:
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"size (frames per minibatch) must be an int >= 1, got {size!r}")
        if batch.batch_size.numel() == 0:  # TensorDict.numel() is at least 1
            raise ValueError("batch is empty: no minibatches to draw")
        self.data = batch.reshape(-1).exclude(*UNUSED_AFTER_ADVANTAGES)
        self.size = size
        self._order: torch.Tensor | None = None

    def refresh(self, batch: TensorDictBase) -> None:
        """Draw from ``batch``'s current entries from now on (advantages recomputed), in the same order."""
        self.data = batch.reshape(-1).exclude(*UNUSED_AFTER_ADVANTAGES)

    def next_index(self) -> torch.Tensor:
        """The next minibatch's positions in the flat batch (``data``), as :meth:`sample` draws them."""
        if self._order is None:
            self._order = torch.randperm(self.data.numel())
        index, self._order = self._order[:self.size], self._order[self.size:]
        if self._order.numel() == 0:
            self._order = torch.randperm(self.data.numel())
        return index

    def sample(self) -> TensorDictBase:
        """The next minibatch."""
        return self.data[self.next_index()]


def minibatches(batch: TensorDictBase, size: int) -> Minibatches:
    """The batch's :class:`Minibatches` of ``size`` frames."""
    return Minibatches(batch, size)


def normalize_advantage(batch: TensorDictBase) -> None:
    """Standardise the batch's ``"advantage"`` in place, over the whole batch (before the update)."""
    adv = batch["advantage"]
    batch["advantage"] = (adv - adv.mean()) / adv.std().clamp_min(1e-8)


class Algorithm:
    """A loss trained by the shared minibatch epochs, and what the algorithm does before and after them.

    Subclasses build their loss in :meth:`make_loss` and override the hooks they need; the hooks add
    their diagnostics to ``row``, the update's record (logged, checkpointed, summarised), which holds
    ``"frames"`` (the frames collected so far) when they are called.

    Args:
        cfg: the recipe's config (``algo``, ``env.gamma``, ``estimator``, ``cost``, ...).
        policy: the policy setting, as :func:`torchrl_ot.training.resolve_policy` gives it.
        discrete: whether the env's actions are discrete.
        actor, critic, head: the networks, as :func:`torchrl_ot.training.make_networks` builds them.
    """

    #: The transport cost of the trust region (None: the algorithm has none).
    cost: TransportCost | None = None

    def __init__(self, cfg: DictConfig, policy: str, discrete: bool, actor: ProbabilisticActor,
                 critic: ValueOperator, head: TensorDictModule | None) -> None:
        self.cfg, self.policy = cfg, policy
        # TorchRL's functional losses swap their parameters into the modules on every call (to_module): useful
        # for target networks, which no on-policy loss here has; the plain modules hold the same parameters.
        self.functional = bool(cfg.get("loss_functional", False))
        self.loss_module = self.make_loss(actor, critic, head, discrete)
        estimator_kwargs = {"gamma": cfg.env.gamma}
        if cfg.estimator.lmbda is not None:
            estimator_kwargs["lmbda"] = cfg.estimator.lmbda
        self.loss_module.make_value_estimator(ValueEstimators[cfg.estimator.value_type], **estimator_kwargs)

    @classmethod
    def check_config(cls, cfg: DictConfig) -> None:
        """Refuse a bad ``cfg.algo`` before anything is built."""

    def make_loss(self, actor: ProbabilisticActor, critic: ValueOperator, head: TensorDictModule | None,
                  discrete: bool) -> LossModule:
        """The algorithm's loss on these networks (``__init__`` then adds the value estimator)."""
        raise NotImplementedError

    def before_epochs(self, batch: TensorDictBase, row: dict[str, float]) -> None:
        """Once the batch's advantages are computed, before its first minibatch step."""

    def minibatch_loss(self, out: TensorDictBase) -> torch.Tensor:
        """What a minibatch step minimises, from the loss's output: the sum of its ``loss_*`` terms."""
        return sum(v for k, v in out.items() if k.startswith("loss_"))

    def after_epochs(self, batch: TensorDictBase, row: dict[str, float]) -> None:
        """After the batch's last minibatch step, before the next batch is collected."""

    def progress(self, row: dict[str, float]) -> dict[str, str]:
        """What the progress bar shows of the update besides the returns."""
        return {}

    def summary(self) -> dict[str, str | float | None]:
        """The run summary's ``cost`` (the config choice), ``cost_fn`` and ``epsilon``."""
        return {"cost": None, "cost_fn": None, "epsilon": None}

    def state_dict(self) -> dict:
        """What the algorithm carries from batch to batch outside the networks and the optimiser (checkpointed
        for an exact resume; nothing for most)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`'s output."""


class OTTrustRegion(Algorithm):
    """OT-TRPO (``algo=ot_trpo``, :class:`torchrl_ot.OTTrustRegionLoss`) and WPO (``algo=wpo``, the same
    loss without mass splitting): lambda* of the dual (eq. 12) solved once per batch, on the
    batch-normalised advantages, then the epochs on that fixed lambda*; after them the actor is
    projected into the trust region (``algo.enforce_radius``) or its realised transport measured.
    ``algo.solve_radius_factor`` (not in the paper; 1 by default) solves lambda* for that multiple of epsilon,
    the projection still holding the update to epsilon (``docs/equations.md``, departures).

    The paper's Gaussian case has a FIXED std (step 4 case 2): the hinge objective trains only the
    mean. ``algo.final_scale`` optionally anneals that std linearly in frames (set, never learned),
    and epsilon with its square: the radius stays the same multiple of the noise's own transport.
    ``algo.learn_scale`` (not in the paper) trains the std inside the trust region instead
    (:class:`~torchrl_ot.loss.GaussianOTLoss`); epsilon then follows the learned std's square the same way,
    and the schedule is not used.
    """

    @classmethod
    def check_config(cls, cfg: DictConfig) -> None:
        if not (cfg.algo.epsilon > 0 and math.isfinite(cfg.algo.epsilon)):
            raise ValueError(f"algo.epsilon must be positive and finite, got {cfg.algo.epsilon}")
        if cfg.algo.advantage_head not in ("in_critic", "separate"):
            raise ValueError(f"algo.advantage_head must be 'in_critic' or 'separate', got {cfg.algo.advantage_head!r}")
        horizon = cfg.algo.get("scale_anneal_frames")
        if horizon is not None and (isinstance(horizon, bool) or not isinstance(horizon, int) or horizon <= 0):
            raise ValueError(f"algo.scale_anneal_frames must be null (the std reaches algo.final_scale at "
                             f"total_frames) or a positive integer number of frames, got {horizon!r}")
        for key in ("enforce_radius", "boundary_trial"):
            if not isinstance(cfg.algo.get(key, False), bool):
                raise ValueError(f"algo.{key} must be true or false, got {cfg.algo.get(key)!r}")
        if cfg.algo.get("mirror", "auto") not in ("auto", True, False):
            raise ValueError(f"algo.mirror must be auto, true or false, got {cfg.algo.get('mirror')!r}")
        update = cfg.algo.get("actor_update", "epochs")
        if update not in ("epochs", "natural"):
            raise ValueError(f"algo.actor_update must be 'epochs' or 'natural', got {update!r}")
        factor = cfg.algo.get("solve_radius_factor", 1.0)
        if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not (0 < factor < math.inf):
            raise ValueError(f"algo.solve_radius_factor must be a positive finite number (1: lambda* for epsilon "
                             f"itself), got {factor!r}")
        if factor != 1.0 and not cfg.algo.enforce_radius:
            raise ValueError("algo.solve_radius_factor != 1 solves lambda* for a larger radius than the update may "
                             "take: it needs algo.enforce_radius=true (the projection holding the update to epsilon)")
        if update == "natural" and not cfg.algo.enforce_radius:
            raise ValueError("algo.actor_update=natural steps to the radius and stays inside it: it needs "
                             "algo.enforce_radius=true")

    def __init__(self, cfg: DictConfig, policy: str, discrete: bool, actor: ProbabilisticActor,
                 critic: ValueOperator, head: TensorDictModule | None) -> None:
        super().__init__(cfg, policy, discrete, actor, critic, head)
        self.theta_old: torch.Tensor | None = None
        self.natural = cfg.algo.get("actor_update", "epochs") == "natural"
        self.log_scale = None
        self.learn_scale = policy == "gaussian" and bool(cfg.algo.get("learn_scale", False))
        if policy == "gaussian" and (cfg.algo.final_scale is not None or self.learn_scale):
            self.log_scale = next(p for n, p in actor.named_parameters() if n.endswith("state_independent_scale"))

    def make_loss(self, actor: ProbabilisticActor, critic: ValueOperator, head: TensorDictModule | None,
                  discrete: bool) -> LossModule:
        algo = self.cfg.algo
        if self.cfg.cost.get("_target_") is None:  # cost=auto
            self.cost = DiscreteMetricCost() if discrete else EuclideanCost(p=2)
        else:
            self.cost = instantiate(self.cfg.cost)
        return OTTrustRegionLoss(
            actor, critic, cost=self.cost, epsilon=algo.epsilon, policy=self.policy, advantage_network=head,
            num_candidates=algo.num_candidates, split=algo.name == "ot_trpo",
            # auto: the mirror for Gaussian policies; an explicit true the loss refuses for other policies, naming both
            mirror=self.policy == "gaussian" if algo.get("mirror", "auto") == "auto" else algo.mirror,
            learn_scale=bool(algo.get("learn_scale", False)), scale_clip=algo.get("scale_clip", 0.2),
            squared_hinge=algo.get("squared_hinge", False),
            entropy_coeff=algo.entropy_coeff or None,
            critic_coeff=algo.critic_coeff, loss_critic_type=algo.loss_critic_type, functional=self.functional,
            # before_epochs normalises (algo.normalize_advantage) and solves itself, once per batch
            normalize_advantage=False, solve_on_estimate=False)

    def scheduled_scale(self, frames_done: int) -> float:
        """The Gaussian's std after ``frames_done`` frames (``algo.final_scale`` set): linear from
        ``algo.init_scale`` to ``algo.final_scale`` at ``algo.scale_anneal_frames`` (null: ``total_frames``),
        then constant."""
        horizon = self.cfg.algo.get("scale_anneal_frames") or self.cfg.total_frames
        frac = min(frames_done / horizon, 1.0)
        return self.cfg.algo.init_scale + frac * (self.cfg.algo.final_scale - self.cfg.algo.init_scale)

    def before_epochs(self, batch: TensorDictBase, row: dict[str, float]) -> None:
        loss, algo = self.loss_module, self.cfg.algo
        if algo.normalize_advantage:
            normalize_advantage(batch)
        if self.log_scale is not None:  # epsilon for the scale that collected this batch
            behaviour_scale = self.log_scale.detach().exp().mean().item()
            loss.epsilon = algo.epsilon * (behaviour_scale / algo.init_scale) ** 2
            row["scale"] = behaviour_scale
        factor = algo.get("solve_radius_factor", 1.0)
        if factor == 1.0:
            sol = loss.solve_multiplier(batch)
        else:  # lam* for a larger radius; the projection after the epochs still holds the update to epsilon
            radius = loss.epsilon
            loss.epsilon = radius * factor
            try:
                sol = loss.solve_multiplier(batch)
            finally:
                loss.epsilon = radius
        # The update's own transport (WPO's no-split plan can exceed epsilon; OT-TRPO's cannot).
        row.update(multiplier=sol.multiplier.item(), epsilon=loss.epsilon,
                   transport_over_epsilon=batch["ot_transport"].double().mean().item() / loss.epsilon)
        if self.natural:  # the actor's step, to the radius; the epochs then train the critic only
            step = loss.natural_step(batch, cg_iters=algo.get("cg_iters", 10), cg_damping=algo.get("cg_damping", 0.1))
            row["step_fraction"] = step["step_fraction"].item()
        elif algo.enforce_radius:
            self.theta_old = loss.actor_parameters()

    def minibatch_loss(self, out: TensorDictBase) -> torch.Tensor:
        if not self.natural:
            return super().minibatch_loss(out)
        # The actor moved in before_epochs: its objective would move it again.
        return sum(v for k, v in out.items() if k.startswith("loss_") and k not in ("loss_objective", "loss_entropy"))

    def after_epochs(self, batch: TensorDictBase, row: dict[str, float]) -> None:
        # What the fitted network moved (exact, or a bound), against the radius.
        loss = self.loss_module
        if self.natural:  # already inside: natural_step's own search
            moved = loss.realised_transport(batch)
        elif self.cfg.algo.enforce_radius:  # backtrack the actor's step until it is inside (or undo it)
            proj = loss.project_into_trust_region(batch, self.theta_old, backtrack_coeff=0.8,
                                                  max_extension=self.cfg.algo.get("max_step_extension", 1.0),
                                                  boundary_trial=self.cfg.algo.get("boundary_trial", False))
            moved = proj["realised_transport"]
            row["step_fraction"] = proj["step_fraction"].item()
        else:
            moved = loss.realised_transport(batch)
        row["realised_transport_over_epsilon"] = moved.item() / loss.epsilon
        if self.log_scale is not None and not self.learn_scale:  # the next batch: the scheduled scale
            with torch.no_grad():
                self.log_scale.fill_(math.log(self.scheduled_scale(row["frames"])))

    def progress(self, row: dict[str, float]) -> dict[str, str]:
        return {"lam": f"{row['multiplier']:.3g}"}

    def summary(self) -> dict[str, str | float | None]:
        # The cost's config group is Hydra's choice, not part of cfg (None outside a Hydra run).
        choice = HydraConfig.get().runtime.choices.get("cost") if HydraConfig.initialized() else None
        return {"cost": choice, "cost_fn": repr(self.cost), "epsilon": float(self.cfg.algo.epsilon)}


class PPO(Algorithm):
    """TorchRL's ``ClipPPOLoss`` (``algo=ppo``), which normalises the advantages per minibatch itself."""

    def make_loss(self, actor: ProbabilisticActor, critic: ValueOperator, head: TensorDictModule | None,
                  discrete: bool) -> LossModule:
        algo = self.cfg.algo
        return ClipPPOLoss(actor, critic, clip_epsilon=algo.clip_epsilon, entropy_bonus=bool(algo.entropy_coeff),
                           entropy_coeff=algo.entropy_coeff, critic_coeff=algo.critic_coeff,
                           loss_critic_type=algo.loss_critic_type, normalize_advantage=algo.normalize_advantage,
                           functional=self.functional)


class A2C(Algorithm):
    """TorchRL's ``A2CLoss`` (``algo=a2c``); its config fixes one epoch of one minibatch, the whole batch."""

    def make_loss(self, actor: ProbabilisticActor, critic: ValueOperator, head: TensorDictModule | None,
                  discrete: bool) -> LossModule:
        algo = self.cfg.algo
        return A2CLoss(actor, critic, entropy_bonus=bool(algo.entropy_coeff), entropy_coeff=algo.entropy_coeff,
                       critic_coeff=algo.critic_coeff, loss_critic_type=algo.loss_critic_type,
                       functional=self.functional)


class TRPO(Algorithm):
    """KL-constrained TRPO (``algo=trpo``, :class:`torchrl_ot.TRPOLoss`): one natural-gradient step of the
    actor (conjugate gradient, line search) on the whole batch before the epochs, which then train
    the critic only."""

    def make_loss(self, actor: ProbabilisticActor, critic: ValueOperator, head: TensorDictModule | None,
                  discrete: bool) -> LossModule:
        algo = self.cfg.algo
        return TRPOLoss(actor, critic, max_kl=algo.max_kl, cg_iters=algo.cg_iters, cg_damping=algo.cg_damping,
                        backtrack_iters=algo.backtrack_iters, backtrack_coeff=algo.backtrack_coeff,
                        entropy_coeff=algo.entropy_coeff or None, critic_coeff=algo.critic_coeff,
                        loss_critic_type=algo.loss_critic_type, functional=self.functional)

    def before_epochs(self, batch: TensorDictBase, row: dict[str, float]) -> None:
        if self.cfg.algo.normalize_advantage:
            normalize_advantage(batch)
        info = self.loss_module.actor_step(batch)
        row.update(kl=float(info["kl"]), step_accepted=float(info["step_accepted"]))

    def minibatch_loss(self, out: TensorDictBase) -> torch.Tensor:
        # The actor moved in before_epochs: its objective would move it again.
        return sum(v for k, v in out.items() if k.startswith("loss_") and k != "loss_objective")


class BGPG(Algorithm):
    """Behavior-Guided Policy Gradient (``algo=bgpg``, :class:`torchrl_ot.BGPGLoss`): before the epochs, M draws
    of the behaviour policy per state and cleared dual vectors (the WNPG code's ``clear_beta``); every minibatch
    step then runs the dual ascent and minimises the surrogate + the Wasserstein penalty + the critic's loss, by
    the recipe's Adam step. Continuous actions only (the penalty's gradient goes through ``rsample``)."""

    #: The ``algo`` keys it reads (anything else is refused: a typo would silently run the defaults).
    KEYS = frozenset({"name", "init_scale", "num_epochs", "num_minibatches", "penalty_coeff", "num_action_samples",
                      "num_features", "feature_bandwidth", "smoothing", "dual_steps", "dual_lr", "dual_warm_start",
                      "clip_epsilon", "normalize_advantage", "entropy_coeff", "critic_coeff", "loss_critic_type"})
    loss_class: type[BGPGLoss] = BGPGLoss

    @classmethod
    def check_config(cls, cfg: DictConfig) -> None:
        algo = cfg.algo
        unknown = sorted(set(algo) - cls.KEYS)
        if unknown:
            raise ValueError(f"unknown algo option(s) {unknown} for algo={algo.name}; its options: {sorted(cls.KEYS)}")
        missing = sorted(cls.KEYS - {"num_epochs", "num_minibatches"} - set(algo))
        if missing:
            raise ValueError(f"algo={algo.name} needs algo option(s) {missing} (see recipes/conf/train/algo/)")
        for key, minimum in (("num_action_samples", 1), ("num_features", 1), ("dual_steps", 0)):
            check_positive_int(f"algo.{key}", algo[key], minimum=minimum)
        for key, low, low_open in (("penalty_coeff", 0, False), ("feature_bandwidth", 0, True), ("smoothing", 0, True),
                                   ("dual_lr", 0, False), ("critic_coeff", 0, False), ("init_scale", 0, True)):
            check_real(f"algo.{key}", algo[key], low=low, low_open=low_open)
        check_real("algo.clip_epsilon", algo.clip_epsilon, low=0, low_open=True, allow_none=True)
        check_real("algo.entropy_coeff", algo.entropy_coeff)
        check_choice("algo.dual_warm_start", algo.dual_warm_start, DUAL_WARM_STARTS)
        check_choice("algo.loss_critic_type", algo.loss_critic_type, ("l1", "l2", "smooth_l1"))
        check_bool("algo.normalize_advantage", algo.normalize_advantage)

    def __init__(self, cfg: DictConfig, policy: str, discrete: bool, actor: ProbabilisticActor,
                 critic: ValueOperator, head: TensorDictModule | None) -> None:
        if discrete:
            raise ValueError(f"algo={cfg.algo.name} is a continuous-action baseline (its penalty differentiates "
                             f"reparameterised actions); {cfg.env.name} has discrete actions")
        super().__init__(cfg, policy, discrete, actor, critic, head)
        self._wasserstein: list[torch.Tensor] = []

    def loss_kwargs(self) -> dict:
        algo = self.cfg.algo
        return dict(penalty_coeff=algo.penalty_coeff, num_action_samples=algo.num_action_samples,
                    num_features=algo.num_features, feature_bandwidth=algo.feature_bandwidth,
                    smoothing=algo.smoothing, dual_steps=algo.dual_steps, dual_lr=algo.dual_lr,
                    dual_warm_start=algo.dual_warm_start, clip_epsilon=algo.clip_epsilon,
                    normalize_advantage=algo.normalize_advantage, entropy_coeff=algo.entropy_coeff or None,
                    critic_coeff=algo.critic_coeff, loss_critic_type=algo.loss_critic_type, functional=self.functional)

    def make_loss(self, actor: ProbabilisticActor, critic: ValueOperator, head: TensorDictModule | None,
                  discrete: bool) -> LossModule:
        return self.loss_class(actor, critic, **self.loss_kwargs())

    def before_epochs(self, batch: TensorDictBase, row: dict[str, float]) -> None:
        self.loss_module.start_batch(batch)  # from the batch's stored loc/scale: the behaviour policy
        self._wasserstein = []

    def minibatch_loss(self, out: TensorDictBase) -> torch.Tensor:
        self._wasserstein.append(out["wasserstein"])
        return super().minibatch_loss(out)

    def after_epochs(self, batch: TensorDictBase, row: dict[str, float]) -> None:
        # The penalty's estimate (before penalty_coeff), averaged over the update's steps; one sync per batch.
        row["wasserstein"] = torch.stack(self._wasserstein).mean().item()

    def progress(self, row: dict[str, float]) -> dict[str, str]:
        return {"W": f"{row['wasserstein']:.3g}"}


class WNPG(BGPG):
    """Wasserstein Natural Policy Gradient (``algo=wnpg``, :class:`torchrl_ot.WNPGLoss`): BGPG's loss, its
    gradient preconditioned by the kernel estimate of the Wasserstein information matrix in every minibatch step.
    The step hands the recipe a scalar whose gradient is the natural gradient (already rescaled to unit norm above
    0.5, the code's safeguard); the recipe's clipping to ``max_grad_norm`` (0.5) then shortens such a step to 0.5,
    which Adam's normalisation all but undoes. The estimator's adaptive damping is checkpointed
    (:meth:`state_dict`), so a resumed run continues it."""

    KEYS = BGPG.KEYS | {"kernel", "num_basis", "log_bandwidth", "damping", "damping_schedule", "diag_scaling",
                        "natural_clip"}
    loss_class = WNPGLoss

    def state_dict(self) -> dict:
        return {"natural": self.loss_module.natural.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.loss_module.natural.load_state_dict(state["natural"])

    @classmethod
    def check_config(cls, cfg: DictConfig) -> None:
        super().check_config(cfg)
        algo = cfg.algo
        check_choice("algo.kernel", algo.kernel, KERNELS)
        check_choice("algo.damping_schedule", algo.damping_schedule, DAMPING_SCHEDULES)
        check_real("algo.damping", algo.damping, low=0, low_open=True)
        check_real("algo.log_bandwidth", algo.log_bandwidth)
        check_real("algo.natural_clip", algo.natural_clip, low=0, low_open=True, allow_none=True)
        check_bool("algo.diag_scaling", algo.diag_scaling)
        check_positive_int("algo.num_basis", algo.num_basis)
        num_minibatches = algo.get("num_minibatches") or cfg.num_minibatches
        rows = cfg.frames_per_batch // num_minibatches
        if algo.num_basis > rows:
            raise ValueError(f"algo.num_basis={algo.num_basis} basis points are drawn from a minibatch's "
                             f"{rows} states (frames_per_batch / num_minibatches): it must be in [1, {rows}]")

    def __init__(self, cfg: DictConfig, policy: str, discrete: bool, actor: ProbabilisticActor,
                 critic: ValueOperator, head: TensorDictModule | None) -> None:
        super().__init__(cfg, policy, discrete, actor, critic, head)
        self.lr = float(cfg.lr)
        self._info: list[dict[str, float]] = []

    def loss_kwargs(self) -> dict:
        algo = self.cfg.algo
        return {**super().loss_kwargs(), "kernel": algo.kernel, "num_basis": algo.num_basis,
                "log_bandwidth": algo.log_bandwidth, "damping": algo.damping,
                "damping_schedule": algo.damping_schedule, "diag_scaling": algo.diag_scaling,
                "natural_clip": algo.natural_clip}

    def before_epochs(self, batch: TensorDictBase, row: dict[str, float]) -> None:
        super().before_epochs(batch, row)
        # The optimiser's lr for this batch, as the recipe schedules it (the damping's reduction ratio reads it).
        total_batches = math.ceil(self.cfg.total_frames / self.cfg.frames_per_batch)
        self.lr = scheduled_lr(self.cfg, row["frames"] // self.cfg.frames_per_batch - 1, total_batches)
        self._info = []

    def minibatch_loss(self, out: TensorDictBase) -> torch.Tensor:
        self._wasserstein.append(out["wasserstein"])
        surrogate, info = self.loss_module.natural_gradient_loss(out, self.lr)
        self._info.append(info)
        return surrogate

    def after_epochs(self, batch: TensorDictBase, row: dict[str, float]) -> None:
        super().after_epochs(batch, row)
        for key in ("natural_fallback", "natural_rescaled", "natural_cosine"):
            row[key] = sum(i[key] for i in self._info) / len(self._info)
        row["damping"] = self.loss_module.natural.damping


ALGORITHMS: dict[str, type[Algorithm]] = {"ot_trpo": OTTrustRegion, "wpo": OTTrustRegion, "ppo": PPO, "a2c": A2C,
                                          "trpo": TRPO, "bgpg": BGPG, "wnpg": WNPG}


def algorithm_class(name: str) -> type[Algorithm]:
    """The :class:`Algorithm` for ``algo.name``.

    >>> algorithm_class("wpo").__name__
    'OTTrustRegion'
    """
    if name not in ALGORITHMS:
        raise ValueError(f"unknown algo.name={name!r} (one of {sorted(ALGORITHMS)})")
    return ALGORITHMS[name]


def make_algorithm(cfg: DictConfig, policy: str, discrete: bool, actor: ProbabilisticActor, critic: ValueOperator,
                   head: TensorDictModule | None) -> Algorithm:
    """The :class:`Algorithm` for ``cfg.algo.name``, its loss built on these networks."""
    return algorithm_class(cfg.algo.name)(cfg, policy, discrete, actor, critic, head)


def make_loss(cfg: DictConfig, policy: str, discrete: bool, actor: ProbabilisticActor, critic: ValueOperator,
              head: TensorDictModule | None) -> LossModule:
    """The loss for ``cfg.algo.name`` (OTTrustRegionLoss for ot_trpo and wpo, TorchRL's ClipPPOLoss and
    A2CLoss, TRPOLoss, BGPGLoss, WNPGLoss) with its value estimator: :func:`make_algorithm`'s, without the hooks."""
    return make_algorithm(cfg, policy, discrete, actor, critic, head).loss_module
