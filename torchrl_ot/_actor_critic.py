"""What OTTrustRegionLoss and TRPOLoss share: functional actor-critic plumbing in TorchRL's manner."""

from __future__ import annotations

import contextlib

from torch import nn
from torchrl.objectives.common import LossModule
from torchrl.objectives.utils import ValueEstimators, _cache_values, _get_default_device, dispatch_value_estimator


class ActorCriticLoss(LossModule):
    """Base of the project's losses: the ``functional`` flag, the value estimator and parameter loading.

    Subclasses set ``self._functional`` before ``super().__init__()`` and declare
    ``SUPPORTED_VALUE_ESTIMATORS``.
    """

    @property
    def functional(self) -> bool:
        return self._functional

    def make_value_estimator(self, value_type: ValueEstimators | None = None, **hyperparams):
        """Build the advantage estimator (TD0, TD1, TDLambda or GAE; default GAE), e.g. ``gamma=0.99, lmbda=0.95``."""
        value_type, hp = self._prepare_value_estimator_kwargs(value_type, **hyperparams)
        if value_type is None:
            return self
        hp.setdefault("device", _get_default_device(self))
        dispatch_value_estimator(self, value_type, supported=self.SUPPORTED_VALUE_ESTIMATORS, tensor_keys={
            name: getattr(self.tensor_keys, name) for name in self._value_estimator_default_keys}, **hp)
        return self

    @property
    @_cache_values
    def _cached_detach_critic_network_params(self):
        return self.critic_network_params.detach() if self.functional else None

    def _params(self, name: str):
        """Context that loads ``name``'s parameters into its (stateless) module when functional."""
        if not self.functional:
            return contextlib.nullcontext()
        return getattr(self, f"{name}_params").to_module(getattr(self, name), preserve_module_state=False)

    def _actor_params(self) -> list[nn.Parameter]:
        # The very Parameter objects the actor runs with (functional: those loaded by to_module).
        values = self.actor_network_params.values(True, True) if self.functional else self.actor_network.parameters()
        return [p for p in values if isinstance(p, nn.Parameter) and p.requires_grad]
