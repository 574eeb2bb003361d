"""What every loss of the project shares (OT-TRPO's and the TRPO baseline's): TorchRL's actor-critic plumbing.

The functional conversion of the networks, the value estimator, the keys TorchRL's A2C/PPO losses read, the
critic's regression, the refusal of NaN inputs, and the actor's parameters as one flat vector (for a step that
is taken, measured and backtracked as a whole: TRPO's line search, OT-TRPO's projection into the radius).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from tensordict import TensorDictBase
from tensordict.nn import ProbabilisticTensorDictModule, TensorDictModule
from tensordict.utils import NestedKey
from torch import Tensor, nn
from torch.nn.utils import parameters_to_vector
from torchrl.objectives.common import LossModule
from torchrl.objectives.utils import (
    ValueEstimators,
    _cache_values,
    _get_default_device,
    dispatch_value_estimator,
    distance_loss,
)

from torchrl_ot.validation import check_choice, check_finite_entries, check_real

__all__ = ["ActorCriticKeys", "ActorCriticLoss", "get_flat_params", "log_prob_per_sample", "set_flat_params"]


def get_flat_params(params: Sequence[Tensor]) -> Tensor:
    """The parameters as one detached vector (a copy: later in-place updates leave it alone)."""
    return parameters_to_vector(params).detach().clone()


def set_flat_params(params: Sequence[Tensor], flat: Tensor) -> None:
    """Copy ``flat`` into ``params`` in place (bit exact). Not ``vector_to_parameters``: it rebinds each
    ``param.data`` to a view of ``flat``, so tensors sharing the old storage (e.g. a collector's weights) go stale."""
    sizes = [p.numel() for p in params]
    if flat.numel() != sum(sizes):
        raise ValueError(f"flat has {flat.numel()} entries, the parameters {sum(sizes)}")
    with torch.no_grad():
        for p, chunk in zip(params, flat.split(sizes), strict=True):
            p.copy_(chunk.view_as(p))


def log_prob_per_sample(dist, action: Tensor, n: int) -> Tensor:
    """Per-sample log-probability ``[n]`` (Normal without Independent: summed over action dimensions)."""
    if action.dim() == len(dist.batch_shape) + len(dist.event_shape) + 1 and action.shape[-1] == 1:
        action = action.squeeze(-1)  # a Categorical index stored as [n, 1] would otherwise broadcast to [n, n]
    return dist.log_prob(action).reshape(n, -1).sum(-1)


@dataclass
class ActorCriticKeys:
    """The keys TorchRL's A2C/PPO losses read (change with ``set_keys``; value-estimator keys are forwarded)."""

    advantage: NestedKey = "advantage"
    value_target: NestedKey = "value_target"
    value: NestedKey = "state_value"
    action: NestedKey = "action"
    reward: NestedKey = "reward"
    done: NestedKey = "done"
    terminated: NestedKey = "terminated"
    sample_log_prob: NestedKey = "action_log_prob"


class ActorCriticLoss(LossModule):
    """Base of the project's losses: networks (functional or not), value estimator, critic loss, flat parameters.

    ``networks`` maps attribute names (``actor_network``, ``critic_network``, optional others) to modules; the
    first must be a probabilistic actor (pi_old is rebuilt from its stored distribution parameters).
    """

    _AcceptedKeys = ActorCriticKeys
    default_keys = ActorCriticKeys
    tensor_keys: ActorCriticKeys
    default_value_estimator = ValueEstimators.GAE
    SUPPORTED_VALUE_ESTIMATORS = (ValueEstimators.TD0, ValueEstimators.TD1, ValueEstimators.TDLambda,
                                  ValueEstimators.GAE)

    def __init__(self, networks: dict[str, TensorDictModule], *, entropy_coeff: float | None, critic_coeff: float,
                 loss_critic_type: str, reduction: str, functional: bool) -> None:
        check_real("critic_coeff", critic_coeff, low=0)
        check_real("entropy_coeff", entropy_coeff, allow_none=True)
        check_choice("loss_critic_type", loss_critic_type, ("l1", "l2", "smooth_l1"))
        check_choice("reduction", reduction, ("mean", "sum", "none"))
        actor = networks["actor_network"]
        dist_modules = [m for m in actor.modules() if isinstance(m, ProbabilisticTensorDictModule)]
        if not dist_modules:
            raise ValueError("actor_network must be a probabilistic actor (e.g. torchrl's ProbabilisticActor)")
        self._functional = functional
        super().__init__()
        for name, net in networks.items():
            self.convert_to_functional(net, name) if functional else setattr(self, name, net)
        if not functional:
            self.target_critic_network_params = None  # read by the value estimator call, as in A2C
        self.loss_critic_type, self.reduction = loss_critic_type, reduction
        device = _get_default_device(self)
        self.register_coeff_buffer("entropy_coeff", entropy_coeff, device=device)
        self.register_coeff_buffer("critic_coeff", critic_coeff, device=device)
        self._dist_keys = list(dist_modules[-1].in_keys)
        if getattr(actor, "log_prob_keys", None):
            self.set_keys(sample_log_prob=actor.log_prob_keys[0], action=actor.dist_sample_keys[0])

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

    def _estimate_advantage(self, td: TensorDictBase) -> None:
        """Run the value estimator into ``td`` (advantage and value target) with the critic's detached parameters."""
        self.value_estimator(td, params=self._cached_detach_critic_network_params,
                             target_params=self.target_critic_network_params)

    def _params(self, name: str):
        """Context that loads ``name``'s parameters into its (stateless) module when functional."""
        if not self.functional:
            return contextlib.nullcontext()
        return getattr(self, f"{name}_params").to_module(getattr(self, name), preserve_module_state=False)

    def _run(self, name: str, td: TensorDictBase) -> TensorDictBase:
        """Network ``name`` on a selection of ``td`` (what it writes stays out of ``td``)."""
        net = getattr(self, name)
        with self._params(name):
            return net(td.select(*net.in_keys, strict=False))

    def _current_dist(self, td: TensorDictBase):
        with self._params("actor_network"):
            # select() builds a new tensordict: what get_dist writes into it stays out of td.
            return self.actor_network.get_dist(td.select(*self.actor_network.in_keys, strict=False))

    def _critic_loss(self, critic_out: TensorDictBase, td: TensorDictBase) -> Tensor:
        """Per-sample regression of V(s) onto the value target, ``loss_critic_type`` (before ``critic_coeff``)."""
        value = critic_out.get(self.tensor_keys.value)
        return distance_loss(value, td.get(self.tensor_keys.value_target).to(value.dtype), self.loss_critic_type)

    def _check_entries(self, td, keys) -> None:
        check_finite_entries(td, keys, type(self).__name__)

    def _old_log_prob(self, flat: TensorDictBase, old) -> Tensor:
        """log pi_old(a_b|s_b) ``[n]``: the stored ``sample_log_prob`` (the behaviour's), else ``old``'s."""
        stored = flat.get(self.tensor_keys.sample_log_prob, None)
        n = flat.numel()
        logp = log_prob_per_sample(old, flat.get(self.tensor_keys.action), n) if stored is None else stored.reshape(n)
        return logp.detach()

    def _actor_params(self) -> list[nn.Parameter]:
        # The very Parameter objects the actor runs with (functional: those loaded by to_module).
        values = self.actor_network_params.values(True, True) if self.functional else self.actor_network.parameters()
        return [p for p in values if isinstance(p, nn.Parameter) and p.requires_grad]

    def actor_parameters(self) -> Tensor:
        """The actor's parameters as one detached vector (take it before an update to undo or shorten it)."""
        return get_flat_params(self._actor_params())
