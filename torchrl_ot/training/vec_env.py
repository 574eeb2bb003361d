"""``FusedVecEnv``: a gymnasium vector env as one TorchRL env with the training run's transforms in its own step.

The recipe's training env is, in TorchRL's terms, ``TransformedEnv(GymWrapper(vec), Compose(DoubleToFloat,
RunningObsNorm, ClipTransform, RewardSum(), StepCounter()))``. Each of those pieces reads and writes the step's
TensorDict through its own checks and spec lookups, and a partial reset (some copies done) runs every transform's
``_reset`` and a masked merge of each of them: on CartPole's 8 copies that machinery took about 60% of a
collector step (`docs/results.md`, section 5), for a few tensor operations of arithmetic. This env does the same
arithmetic on the tensors directly, in one ``_step`` and one ``_reset``, and leaves the rest to TorchRL's
:class:`~torchrl.envs.EnvBase` (its ``step``, ``step_and_maybe_reset`` and the merge of a partial reset), so that
collectors, rollouts and value estimators see the same env: the same specs, keys, values and gymnasium calls, bit
for bit (``tests/test_vec_env.py`` steps both side by side).
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np
import torch
from tensordict import TensorDict, TensorDictBase
from torchrl.data import Bounded, Categorical, Composite, Unbounded
from torchrl.envs import ClipTransform, EnvBase
from torchrl.envs.libs.gym import _gym_to_torchrl_spec_transform

from torchrl_ot.training.obs_norm import running_normalise

__all__ = ["FusedVecEnv"]


class FusedVecEnv(EnvBase):
    """``vec`` (a gymnasium vector env with ``AutoresetMode.DISABLED``: TorchRL resets finished copies) as a TorchRL
    env of batch ``[num_envs]``: float32 observations, normalised by :func:`~torchrl_ot.training.running_normalise`
    with ``obs_stats`` (updated in place unless ``frozen``; ``None``: no normalisation) and clipped to ``[-clip,
    clip]``; the reward as float32 ``[num_envs, 1]``; ``episode_reward`` (RewardSum's) and ``step_count``
    (StepCounter's) carried as state. Discrete actions are categorical (integers), Box actions float32.

    >>> import gymnasium as gym
    >>> from torchrl_ot.training import new_obs_stats
    >>> vec = gym.make_vec("CartPole-v1", num_envs=2, vectorization_mode="sync",
    ...                    vector_kwargs={"autoreset_mode": gym.vector.AutoresetMode.DISABLED})
    >>> env = FusedVecEnv(vec, obs_stats=new_obs_stats(4), decay=0.99999, eps=1e-2, clip=10.0)
    >>> _ = env.set_seed(0)
    >>> rollout = env.rollout(30, break_when_any_done=False)
    >>> rollout["next", "step_count"].shape, rollout["next", "episode_reward"].dtype
    (torch.Size([2, 30, 1]), torch.float32)
    """

    def __init__(self, vec: gym.vector.VectorEnv, *, obs_stats: TensorDict | None, decay: float = 0.99999,
                 eps: float = 1e-2, clip: float = 10.0, frozen: bool = False) -> None:
        if getattr(vec, "autoreset_mode", None) != gym.vector.AutoresetMode.DISABLED:
            raise ValueError("vec must be a gymnasium vector env with autoreset_mode=AutoresetMode.DISABLED (TorchRL "
                             f"resets the finished copies itself), got {getattr(vec, 'autoreset_mode', None)}")
        if obs_stats is not None:
            if not 0 < decay <= 1:
                raise ValueError(f"decay must lie in (0, 1], got {decay!r}")
            if not eps > 0:
                raise ValueError(f"eps must be positive, got {eps!r}")
            if not clip > 0:
                raise ValueError(f"clip must be positive, got {clip!r}")
        num_envs = vec.num_envs
        super().__init__(batch_size=torch.Size([num_envs]))
        self.vec, self.num_envs = vec, num_envs
        self.obs_stats, self.decay, self.eps, self.clip, self.frozen = obs_stats, float(decay), float(eps), clip, frozen
        if obs_stats is not None:
            self._loc, self._var, self._count = (obs_stats[name, "observation"] for name in ("loc", "var", "count"))
        self._make_specs()

    def _make_specs(self) -> None:
        # The conversion GymWrapper makes of the vector env's spaces, then the spec changes of DoubleToFloat
        # (float32) and ClipTransform (its bounds), so that the specs equal the transformed stack's.
        batch = self.batch_size
        obs = _gym_to_torchrl_spec_transform(self.vec.observation_space, categorical_action_encoding=True)
        if obs.dtype == torch.float64:
            obs = (Bounded(obs.space.low.float(), obs.space.high.float(), obs.shape, dtype=torch.float32)
                   if isinstance(obs, Bounded) else Unbounded(obs.shape, dtype=torch.float32))
        if self.obs_stats is not None:
            obs = ClipTransform(in_keys=["observation"], low=-self.clip, high=self.clip).transform_observation_spec(obs)
        episode_reward = Unbounded((*batch, 1), dtype=torch.float32)
        step_count = Bounded(0, torch.iinfo(torch.int64).max, (*batch, 1), dtype=torch.int64)
        self.observation_spec = Composite(observation=obs, episode_reward=episode_reward.clone(),
                                          step_count=step_count.clone(), shape=batch)
        self.state_spec = Composite(episode_reward=episode_reward, step_count=step_count, shape=batch)
        self.action_spec = _gym_to_torchrl_spec_transform(self.vec.action_space, categorical_action_encoding=True)
        self.reward_spec = Unbounded((*batch, 1), dtype=torch.float32)
        flag = Categorical(2, (*batch, 1), dtype=torch.bool)
        self.done_spec = Composite(done=flag.clone(), terminated=flag.clone(), truncated=flag, shape=batch)

    def _observe(self, obs: np.ndarray) -> torch.Tensor:
        obs = torch.from_numpy(np.asarray(obs))
        if obs.dtype == torch.float64:
            obs = obs.to(torch.float32)
        if self.obs_stats is None:
            return obs
        obs = running_normalise(obs, self._loc, self._var, self._count, decay=self.decay, eps=self.eps,
                                update=not self.frozen)
        return obs.clamp(-self.clip, self.clip)

    def _step(self, tensordict: TensorDictBase) -> TensorDictBase:
        action = tensordict.get("action").detach().cpu().numpy()
        obs, reward, terminated, truncated, _ = self.vec.step(action)
        shape = (self.num_envs, 1)
        terminated = torch.from_numpy(np.asarray(terminated, dtype=bool)).view(shape)
        truncated = torch.from_numpy(np.asarray(truncated, dtype=bool)).view(shape)
        reward = torch.as_tensor(np.asarray(reward), dtype=torch.float32).view(shape)
        return TensorDict._new_unsafe({
            "observation": self._observe(obs), "reward": reward,
            "done": terminated | truncated, "terminated": terminated, "truncated": truncated,
            "episode_reward": tensordict.get("episode_reward") + reward,
            "step_count": tensordict.get("step_count") + 1,
        }, batch_size=self.batch_size)

    def _reset(self, tensordict: TensorDictBase | None = None, **kwargs: Any) -> TensorDictBase:
        # As GymWrapper over a vector env without autoreset: a reset signal becomes gymnasium's reset_mask. Every
        # copy's observation comes back (and, as RunningObsNorm at a reset, all of them update the statistics);
        # EnvBase.reset keeps the entries of the copies that were not reset.
        reset = None if tensordict is None else tensordict.get("_reset", None)
        if reset is not None:
            kwargs.setdefault("options", {}).update({"reset_mask": reset.view(self.batch_size).numpy()})
        obs, _ = self.vec.reset(**kwargs)
        shape = (self.num_envs, 1)
        flag = torch.zeros(shape, dtype=torch.bool)
        return TensorDict._new_unsafe({
            "observation": self._observe(obs), "done": flag, "terminated": flag.clone(), "truncated": flag.clone(),
            "episode_reward": torch.zeros(shape), "step_count": torch.zeros(shape, dtype=torch.int64),
        }, batch_size=self.batch_size)

    def _set_seed(self, seed: int | None) -> None:
        self.vec.reset(seed=seed)  # as GymWrapper: seeding resets the copies (and nothing is normalised)

    def close(self, *, raise_if_closed: bool = True) -> None:
        self.vec.close()
        super().close(raise_if_closed=raise_if_closed)
