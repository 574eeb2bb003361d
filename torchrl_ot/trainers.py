"""OT-TRPO in TorchRL's ``Trainer``: the hooks that solve lambda* once per batch and keep the update in its radius.

:class:`OTTRPOTrainer` is TorchRL's ``OnPolicyTrainer`` (the base of its ``PPOTrainer``) with three hooks, each
usable on its own with any ``torchrl.trainers.Trainer``:

* :class:`SolveMultiplierHook` (``batch_process``, once per collected batch): the advantages, then step 4 of
  Algorithm 1, ``loss.solve_multiplier(batch)``: lambda* solved exactly and written into the batch, so that the
  minibatches the trainer's replay buffer draws from it carry it; it also keeps theta_old, the trust region's centre.
* :class:`TrustRegionProjectionHook` (``post_steps``, after the batch's optimisation steps and before the collector gets
  the new weights): ``loss.project_into_trust_region(batch, theta_old)``, every update provably inside the radius.
* :class:`OTLogHook` (``post_steps_log``): lambda*, t*, the exact update's transport and the fitted network's
  (``realised_transport_over_epsilon``), through the trainer's TorchRL logger.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from tensordict import TensorDictBase
from torchrl.objectives.value import GAE
from torchrl.trainers import Trainer, TrainerHookBase
from torchrl.trainers.algorithms import OnPolicyTrainer

from torchrl_ot.loss import OTTrustRegionLoss
from torchrl_ot.validation import check_bool, check_real

__all__ = ["OTLogHook", "OTTRPOTrainer", "SolveMultiplierHook", "TrustRegionProjectionHook"]


def _check_loss(loss_module) -> None:
    if not isinstance(loss_module, OTTrustRegionLoss):
        raise ValueError(f"loss_module must be a torchrl_ot OTTrustRegionLoss, got {type(loss_module).__name__}")


class SolveMultiplierHook(TrainerHookBase):
    """``batch_process``: estimate the batch's advantages, then solve lambda* for it exactly (eq. 12), once.

    ``value_estimator`` writes ``advantage`` and ``value_target`` into the batch (TorchRL's ``GAE`` or any of its value
    estimators; None: the loss's own, ``loss.make_value_estimator``). The solve standardises the advantages first when
    the loss has ``normalize_advantage`` (its default). ``calls`` counts the solves; ``batch`` and ``theta_old`` are the
    batch and the actor's parameters the current update started from (for :class:`TrustRegionProjectionHook`).

    Args:
        loss: the :class:`~torchrl_ot.OTTrustRegionLoss` the trainer optimises.
        value_estimator: the advantage module, or None for ``loss.value_estimator``.
    """

    def __init__(self, loss: OTTrustRegionLoss,
                 value_estimator: Callable[[TensorDictBase], TensorDictBase] | None = None) -> None:
        _check_loss(loss)
        if value_estimator is None and getattr(loss, "_value_estimator", None) is None:
            raise ValueError("value_estimator is None and the loss has none: pass one (e.g. torchrl's GAE) or call "
                             "loss.make_value_estimator(...) first")
        self.loss, self.value_estimator = loss, value_estimator
        self.calls = 0
        self.batch: TensorDictBase | None = None
        self.theta_old: torch.Tensor | None = None

    def __call__(self, batch: TensorDictBase) -> TensorDictBase:
        loss = self.loss
        # The loss's own estimator may carry its solve_hook (solve_on_estimate): one solve per batch, not two.
        loss._solving = True
        try:
            with torch.no_grad():
                if self.value_estimator is None:
                    loss._estimate_advantage(batch)
                else:
                    self.value_estimator(batch)
        finally:
            loss._solving = False
        loss.solve_multiplier(batch)
        self.calls += 1
        self.batch, self.theta_old = batch, loss.actor_parameters()
        return batch

    def state_dict(self) -> dict[str, Any]:
        return {"calls": self.calls}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.calls = int(state_dict.get("calls", 0))

    def register(self, trainer: Trainer, name: str = "ot_solve_multiplier") -> None:
        trainer.register_op("batch_process", self)
        trainer.register_module(name, self)


class _StatelessHook(TrainerHookBase):
    """A hook with nothing to checkpoint (what it needs lives in the SolveMultiplierHook it reads)."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        pass


class TrustRegionProjectionHook(_StatelessHook):
    """``post_steps``: after the batch's optimisation steps, ``loss.project_into_trust_region`` on the batch and the
    theta_old that ``solve`` kept; registered ahead of the trainer's other ``post_steps`` operations, so that the
    collector's weight update sends the projected actor. ``last`` holds the projection's output.

    Args:
        solve: the trainer's :class:`SolveMultiplierHook`.
        max_extension, boundary_trial: as in ``project_into_trust_region`` (defaults: off).
    """

    def __init__(self, solve: SolveMultiplierHook, *, max_extension: float = 1.0, boundary_trial: bool = False) -> None:
        if not isinstance(solve, SolveMultiplierHook):
            raise ValueError(f"solve must be a SolveMultiplierHook, got {type(solve).__name__}")
        check_real("max_extension", max_extension, low=1.0)
        check_bool("boundary_trial", boundary_trial)
        self.solve, self.max_extension, self.boundary_trial = solve, float(max_extension), boundary_trial
        self.last: TensorDictBase | None = None

    def __call__(self) -> None:
        if self.solve.batch is None:
            return
        self.last = self.solve.loss.project_into_trust_region(self.solve.batch, self.solve.theta_old,
                                                              max_extension=self.max_extension,
                                                              boundary_trial=self.boundary_trial)

    def register(self, trainer: Trainer, name: str = "ot_projection") -> None:
        trainer.register_op("post_steps", self)
        # Ahead of the weight update that OnPolicyTrainer registers there: the collector must get the projected actor.
        trainer._post_steps_ops.insert(0, trainer._post_steps_ops.pop())
        trainer.register_module(name, self)


class OTLogHook(_StatelessHook):
    """``post_steps_log``: lambda*, t*, the exact update's transport over epsilon and, if there is a projection, the
    fitted network's (``realised_transport_over_epsilon``) and the kept ``step_fraction``."""

    def __init__(self, solve: SolveMultiplierHook, projection: TrustRegionProjectionHook | None = None) -> None:
        self.solve, self.projection = solve, projection

    def __call__(self, batch: TensorDictBase) -> dict[str, float]:
        loss, keys, data = self.solve.loss, self.solve.loss.tensor_keys, self.solve.batch
        if data is None:
            return {}
        out = {"ot_multiplier": data.get(keys.multiplier).float().mean().item(),
               "ot_split": data.get(keys.split).float().mean().item(),
               "ot_transport_over_epsilon": data.get(keys.transport).double().mean().item() / loss.epsilon}
        if self.projection is not None and self.projection.last is not None:
            out["realised_transport_over_epsilon"] = self.projection.last["realised_transport"].item() / loss.epsilon
            out["step_fraction"] = self.projection.last["step_fraction"].item()
        return out

    def register(self, trainer: Trainer, name: str = "ot_log") -> None:
        trainer.register_op("post_steps_log", self)
        trainer.register_module(name, self)


class OTTRPOTrainer(OnPolicyTrainer):
    """TorchRL's on-policy trainer for :class:`~torchrl_ot.OTTrustRegionLoss`: Algorithm 1 with TorchRL's collector,
    replay buffer, optimiser steps, logger and checkpoints.

    Per collected batch: GAE (``gae``, else one on the loss's critic, ``gamma``, ``lmbda``, not averaged: the loss
    standardises) and lambda* exactly once (:class:`SolveMultiplierHook`), ``num_epochs`` passes of the replay buffer's
    minibatches summing the loss's ``loss_*`` entries, then, with ``enforce_radius`` (default), the projection into the
    trust region (:class:`TrustRegionProjectionHook`) before the collector's weights are updated; the OT diagnostics are
    logged (:class:`OTLogHook`). The other keywords are ``OnPolicyTrainer``'s (``collector``, ``total_frames``,
    ``frame_skip``, ``optim_steps_per_batch``, ``optimizer``, ``logger``, ``replay_buffer``, ``save_trainer_file``,
    ...); ``add_gae`` is not taken (the solve hook runs the advantages itself).

    Args:
        loss_module: the :class:`~torchrl_ot.OTTrustRegionLoss`.
        enforce_radius: project every update into the radius (the recipe's default too).
        max_step_extension, boundary_trial: the projection's options (off by default).
    """

    _algo_name = "OT-TRPO"
    _default_num_epochs = 10

    def __init__(self, *, loss_module: OTTrustRegionLoss, gamma: float = 0.99, lmbda: float = 0.95,
                 gae: Callable[[TensorDictBase], TensorDictBase] | None = None, enforce_radius: bool = True,
                 max_step_extension: float = 1.0, boundary_trial: bool = False, **kwargs) -> None:
        _check_loss(loss_module)
        check_bool("enforce_radius", enforce_radius)
        if "add_gae" in kwargs:
            raise ValueError("OTTRPOTrainer takes no add_gae: its SolveMultiplierHook estimates the advantages (pass "
                             "gae= for another estimator)")
        if gae is None:
            gae = GAE(gamma=gamma, lmbda=lmbda, value_network=loss_module.critic_network, average_gae=False)
        super().__init__(loss_module=loss_module, gamma=gamma, lmbda=lmbda, add_gae=False, **kwargs)
        self.solve_hook = SolveMultiplierHook(loss_module, gae)
        self.solve_hook.register(self)
        self.projection_hook = None
        if enforce_radius:
            self.projection_hook = TrustRegionProjectionHook(self.solve_hook, max_extension=max_step_extension,
                                                             boundary_trial=boundary_trial)
            self.projection_hook.register(self)
        OTLogHook(self.solve_hook, self.projection_hook).register(self)
