"""The scale of returns: rewards divided by the running std of the discounted return (``ReturnScaling``,
stable-baselines3's way), or the critic's targets divided by the running std of the lambda-returns
(``ValueTargetScaling``, Tianshou's way)."""

from __future__ import annotations

import math

import torch
from tensordict import TensorDict, TensorDictBase
from tensordict.nn import TensorDictModuleBase
from torchrl.envs import Transform

__all__ = ["ReturnScaling", "ValueTargetScaling", "new_return_stats", "update_running_moments"]


def new_return_stats() -> TensorDict:
    """Fresh statistics of the discounted return, as stable-baselines3's ``RunningMeanStd()`` starts them
    (mean 0, variance 1, count 1e-4), in float64.

    >>> new_return_stats()["var"]
    tensor(1., dtype=torch.float64)
    """
    f64 = torch.float64
    return TensorDict({"mean": torch.zeros((), dtype=f64), "var": torch.ones((), dtype=f64),
                       "count": torch.tensor(1e-4, dtype=f64)}, batch_size=[])


def update_running_moments(stats: TensorDict, values: torch.Tensor) -> None:
    """Fold ``values`` (all of them, as one batch) into ``stats``' mean, variance and count in place: Chan et
    al.'s parallel formula, as stable-baselines3's and Tianshou's ``RunningMeanStd.update``.

    >>> stats = new_return_stats()
    >>> update_running_moments(stats, torch.tensor([1.0, 3.0], dtype=torch.float64))
    >>> round(float(stats["mean"]), 3), round(float(stats["var"]), 3)  # the prior (count 1e-4) barely counts
    (2.0, 1.0)
    """
    values = values.detach().to(torch.float64)
    mean, var, count = stats["mean"], stats["var"], stats["count"]
    batch_mean, batch_var, batch_count = values.mean(), values.var(unbiased=False), values.numel()
    delta = batch_mean - mean
    total = count + batch_count
    m2 = var * count + batch_var * batch_count + delta.pow(2) * count * batch_count / total
    mean.add_(delta * batch_count / total)
    var.copy_(m2 / total)
    count.copy_(total)


def _check_stats(stats: TensorDict) -> None:
    missing = [name for name in ("mean", "var", "count") if stats.get(name, None) is None]
    if missing:
        raise ValueError(f"stats must hold mean, var and count (new_return_stats' layout); missing {missing}")


class ReturnScaling(Transform):
    """Reward scaling by the discounted return's running standard deviation: stable-baselines3's
    ``VecNormalize(norm_reward=True)`` (which the rl-baselines3-zoo MuJoCo agents use), CleanRL's
    ``NormalizeReward`` + reward clipping, the "reward scaling" of Engstrom et al. (2020).

    At every step each env copy keeps its discounted return ``R = gamma * R + r`` (zeroed after the step
    that ends its episode, terminated or truncated); the copies' ``R`` update the running mean and variance
    (Chan et al.'s parallel formula, as ``RunningMeanStd.update``); the reward becomes
    ``clip(r / sqrt(var + eps), -clip, clip)``. The mean is not subtracted: the sign of rewards is kept.

    ``stats`` (``mean``, ``var``, ``count``: :func:`new_return_stats`) is updated in place, so a checkpoint
    or another env sharing it sees every update. The per-copy returns ``R`` live in the transform and
    start at 0: a fresh env starts them afresh, as each episode does. ``frozen`` scales without updating.
    TorchRL has no such transform: ``VecNormV2`` on ``"reward"`` standardises the reward itself.

    >>> stats = new_return_stats()
    >>> scaling = ReturnScaling(stats, gamma=0.5)
    >>> step = TensorDict({"reward": torch.tensor([[2.0], [4.0]]), "done": torch.tensor([[False], [True]])}, [2])
    >>> scaling._step(None, step)["reward"].squeeze(-1)  # divided by sqrt(var of the returns [2, 4], prior included)
    tensor([1.9996, 3.9991])
    >>> round(float(stats["var"]), 4), scaling.returns.squeeze(-1).tolist()  # copy 1's episode ended: R restarts
    (1.0004, [2.0, 0.0])
    """

    def __init__(self, stats: TensorDict, *, gamma: float, eps: float = 1e-8, clip: float = 10.0,
                 frozen: bool = False) -> None:
        if isinstance(gamma, bool) or not 0 <= gamma <= 1:
            raise ValueError(f"gamma must lie in [0, 1], got {gamma!r}")
        if not (eps > 0 and math.isfinite(eps)):
            raise ValueError(f"eps must be positive and finite, got {eps!r}")
        if not clip > 0:
            raise ValueError(f"clip must be positive (math.inf: no clipping), got {clip!r}")
        _check_stats(stats)
        super().__init__(in_keys=["reward"], out_keys=["reward"])
        self.stats, self.gamma, self.eps, self.clip, self.frozen = stats, float(gamma), float(eps), float(clip), frozen
        self.returns: torch.Tensor | None = None

    def stats_snapshot(self) -> TensorDict:
        """A copy of the statistics (what a Ray worker hands the learner: ``training.collection``)."""
        return self.stats.clone()

    def load_stats_(self, stats: TensorDictBase) -> None:
        """Overwrite the statistics in place with ``stats`` (same layout); the copies' returns ``R`` stay."""
        self.stats.update_(stats)

    def _step(self, tensordict: TensorDictBase, next_tensordict: TensorDictBase) -> TensorDictBase:
        reward = next_tensordict.get("reward")
        r = reward.to(torch.float64)
        if self.returns is None or self.returns.shape != r.shape:
            self.returns = torch.zeros_like(r)
        self.returns = self.returns * self.gamma + r
        if not self.frozen:
            update_running_moments(self.stats, self.returns)
        scaled = (r / (self.stats["var"] + self.eps).sqrt()).clamp(-self.clip, self.clip)
        done = next_tensordict.get("done", None)
        if done is not None:
            self.returns = self.returns.masked_fill(done.reshape(self.returns.shape), 0.0)
        next_tensordict.set("reward", scaled.to(reward.dtype))
        return next_tensordict

    def _reset(self, tensordict: TensorDictBase, tensordict_reset: TensorDictBase) -> TensorDictBase:
        return tensordict_reset

    def forward(self, tensordict: TensorDictBase) -> TensorDictBase:
        raise RuntimeError("ReturnScaling works inside an env (it keeps each copy's running return); "
                           "append it to a TransformedEnv")

    def extra_repr(self) -> str:
        return f"gamma={self.gamma}, eps={self.eps}, clip={self.clip}, frozen={self.frozen}"


class _InReturnUnits(TensorDictModuleBase):
    """The critic with its output multiplied by the scaling's current std: values in the env's return units."""

    def __init__(self, critic: TensorDictModuleBase, scaling: ValueTargetScaling) -> None:
        super().__init__()
        self.critic, self.scaling = critic, scaling
        self.in_keys, self.out_keys = list(critic.in_keys), list(critic.out_keys)

    def forward(self, tensordict: TensorDictBase) -> TensorDictBase:
        tensordict = self.critic(tensordict)
        value = tensordict.get(self.scaling.value_key)
        return tensordict.set(self.scaling.value_key, value * self.scaling.scale().to(value.dtype))


class ValueTargetScaling:
    """The critic learns the lambda-returns divided by their running standard deviation; the rewards and the
    advantages stay in the env's units. Tianshou's ``rew_norm`` (its A2C, PPO, NPG and TRPO, whose MuJoCo
    benchmark uses it), OpenAI Baselines' value normalisation without the mean.

    Per batch (:meth:`estimate`): with ``s = sqrt(var + eps)`` from the statistics so far, the value estimator
    sees the critic's outputs times ``s`` (:meth:`attach` installs that), so GAE's advantages and targets
    ``G = A + s V`` are in return units; then the batch's ``value_target`` becomes ``G / s`` (and
    ``state_value`` ``V``, the critic's own), and the ``G`` of the whole batch update the statistics. The
    mean is not subtracted, as in Tianshou. Unlike :class:`ReturnScaling` nothing changes the rewards, so an
    advantage keeps its size against the entropy bonus: with scaled rewards an entropy coefficient of 0.01 is
    tens of times stronger, and A2C's std grows without end (measured: ``docs/results.md``).

    ``stats``: :func:`new_return_stats`' layout, updated in place (checkpointed by the recipe).

    >>> from tensordict.nn import TensorDictModule
    >>> from torchrl.objectives.value import TD0Estimator
    >>> critic = TensorDictModule(lambda obs: torch.ones(obs.shape[:-1] + (1,)), ["observation"], ["state_value"])
    >>> stats = new_return_stats()
    >>> _ = stats["var"].fill_(4.0)  # s = 2: the estimator sees V = 2
    >>> scaling = ValueTargetScaling(stats, eps=0.0)
    >>> estimator = TD0Estimator(gamma=0.5, value_network=critic)
    >>> scaling.attach(estimator)
    >>> batch = TensorDict({"observation": torch.zeros(3, 1), "next": {"observation": torch.zeros(3, 1),
    ...     "reward": torch.ones(3, 1), "done": torch.zeros(3, 1, dtype=torch.bool),
    ...     "terminated": torch.zeros(3, 1, dtype=torch.bool)}}, [3])
    >>> scaling.estimate(estimator, batch)
    >>> batch["advantage"].squeeze(-1).tolist(), batch["value_target"].squeeze(-1).tolist()  # 1 + 0.5*2 - 2; 2/2
    ([0.0, 0.0, 0.0], [1.0, 1.0, 1.0])
    """

    def __init__(self, stats: TensorDict, *, eps: float = 1e-8, value_key: str = "state_value",
                 value_target_key: str = "value_target") -> None:
        if isinstance(eps, bool) or not (isinstance(eps, (int, float)) and 0 <= eps < math.inf):
            raise ValueError(f"eps must be a finite number >= 0, got {eps!r}")
        _check_stats(stats)
        self.stats, self.eps = stats, float(eps)
        self.value_key, self.value_target_key = value_key, value_target_key

    def scale(self) -> torch.Tensor:
        """``sqrt(var + eps)``, the std the critic's outputs are in units of (float64, 0-dim)."""
        return (self.stats["var"] + self.eps).sqrt()

    def attach(self, estimator: torch.nn.Module) -> None:
        """Make ``estimator`` (a TorchRL value estimator) read its value network's outputs times :meth:`scale`."""
        network = getattr(estimator, "value_network", None)
        if network is None:
            raise ValueError("estimator has no value_network to scale (a TorchRL value estimator built with one)")
        if not isinstance(network, _InReturnUnits):
            estimator.value_network = _InReturnUnits(network, self)

    def estimate(self, estimator: torch.nn.Module, batch: TensorDictBase) -> None:
        """Advantages in return units and normalised value targets for ``batch`` (in place); then the
        statistics take in the batch's lambda-returns."""
        scale = self.scale()
        estimator(batch)
        target = batch.get(self.value_target_key)
        batch.set(self.value_target_key, target / scale.to(target.dtype))
        value = batch.get(self.value_key, None)
        if value is not None:
            batch.set(self.value_key, value / scale.to(value.dtype))
        if not torch.isfinite(target).all():
            raise FloatingPointError("non-finite value targets: the statistics were left as they were")
        update_running_moments(self.stats, target)
