"""``ReturnScaling``: rewards divided by the running standard deviation of the discounted return."""

from __future__ import annotations

import math

import torch
from tensordict import TensorDict, TensorDictBase
from torchrl.envs import Transform

__all__ = ["ReturnScaling", "new_return_stats"]


def new_return_stats() -> TensorDict:
    """Fresh statistics of the discounted return, as stable-baselines3's ``RunningMeanStd()`` starts them
    (mean 0, variance 1, count 1e-4), in float64.

    >>> new_return_stats()["var"]
    tensor(1., dtype=torch.float64)
    """
    f64 = torch.float64
    return TensorDict({"mean": torch.zeros((), dtype=f64), "var": torch.ones((), dtype=f64),
                       "count": torch.tensor(1e-4, dtype=f64)}, batch_size=[])


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
        missing = [name for name in ("mean", "var", "count") if stats.get(name, None) is None]
        if missing:
            raise ValueError(f"stats must hold mean, var and count (new_return_stats' layout); missing {missing}")
        super().__init__(in_keys=["reward"], out_keys=["reward"])
        self.stats, self.gamma, self.eps, self.clip, self.frozen = stats, float(gamma), float(eps), float(clip), frozen
        self.returns: torch.Tensor | None = None

    def _update(self, returns: torch.Tensor) -> None:
        mean, var, count = self.stats["mean"], self.stats["var"], self.stats["count"]
        batch_mean, batch_var, batch_count = returns.mean(), returns.var(unbiased=False), returns.numel()
        delta = batch_mean - mean
        total = count + batch_count
        m2 = var * count + batch_var * batch_count + delta.pow(2) * count * batch_count / total
        mean.add_(delta * batch_count / total)
        var.copy_(m2 / total)
        count.copy_(total)

    def _step(self, tensordict: TensorDictBase, next_tensordict: TensorDictBase) -> TensorDictBase:
        reward = next_tensordict.get("reward")
        r = reward.to(torch.float64)
        if self.returns is None or self.returns.shape != r.shape:
            self.returns = torch.zeros_like(r)
        self.returns = self.returns * self.gamma + r
        if not self.frozen:
            self._update(self.returns)
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
