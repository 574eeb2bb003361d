"""Environments the paper uses that gymnasium no longer ships: NChain, registered as ``NChain-v0``; and the
check of the options the recipes pass to ``gymnasium.make`` (``env.kwargs``).

Importing :mod:`torchrl_ot` registers NChain, so ``gymnasium.make("NChain-v0")`` and TorchRL's
``GymEnv("NChain-v0")`` work like any other id.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces

__all__ = ["NChainEnv", "NCHAIN_ID", "OneHotObservation", "WithoutInfo", "check_env_kwargs"]


def check_env_kwargs(name: str, kwargs: Mapping[str, Any] | None) -> dict[str, Any]:
    """``kwargs`` for ``gymnasium.make(name, **kwargs)`` as a plain dict, refusing (``ValueError``) a non-mapping,
    a non-string key, and a key that the env's constructor does not take (unless it takes ``**kwargs``).

    >>> check_env_kwargs("FrozenLake-v1", {"map_name": "8x8", "is_slippery": False})
    {'map_name': '8x8', 'is_slippery': False}
    >>> check_env_kwargs("FrozenLake-v1", {"slippery": False})  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: env.kwargs.slippery: FrozenLake-v1 takes no such argument; it takes ['desc', 'is_slippery', ...
    """
    if kwargs is None:
        return {}
    if not isinstance(kwargs, Mapping):
        raise ValueError(f"env.kwargs must be a mapping of gymnasium.make's keyword arguments, got {kwargs!r}")
    out = dict(kwargs.items())
    for key in out:
        if not isinstance(key, str):
            raise ValueError(f"env.kwargs keys must be strings, got {key!r}")
    creator = gym.spec(name).entry_point
    if isinstance(creator, str):
        creator = gym.envs.registration.load_env_creator(creator)
    params = inspect.signature(creator).parameters
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        accepted = sorted(k for k, p in params.items() if p.kind is not inspect.Parameter.VAR_POSITIONAL)
        for key in out:
            if key not in accepted:
                raise ValueError(f"env.kwargs.{key}: {name} takes no such argument; it takes {accepted}")
    return out

NCHAIN_ID = "NChain-v0"


class NChainEnv(gym.Env):
    """The n-Chain of Strens (2000), with the dynamics of the former ``gym`` ``NChain-v0``.

    States ``0..n-1``, two actions: 0 = forward, 1 = back. With probability ``slip`` the agent
    takes the other action. Back gives ``small`` and returns to state 0; forward gives 0 and moves
    on, except at the last state, where it gives ``large`` and stays. Episodes never terminate;
    the registered id caps them at 1000 steps. ``P`` holds the transition table in gymnasium's
    toy-text format (``P[s][a] = [(prob, next_state, reward, terminated), ...]``).
    """

    metadata = {"render_modes": []}

    def __init__(self, n: int = 5, slip: float = 0.2, small: float = 2.0, large: float = 10.0) -> None:
        if n < 2:
            raise ValueError(f"n must be at least 2, got {n}")
        if not 0.0 <= slip <= 1.0:
            raise ValueError(f"slip must lie in [0, 1], got {slip}")
        self.n, self.slip, self.small, self.large = n, slip, float(small), float(large)
        self.observation_space = spaces.Discrete(n)
        self.action_space = spaces.Discrete(2)
        self.state = 0
        self.P = {s: {a: self._outcomes(s, a) for a in (0, 1)} for s in range(n)}

    def _move(self, state: int, action: int) -> tuple[int, float]:
        if action == 1:
            return 0, self.small
        if state < self.n - 1:
            return state + 1, 0.0
        return state, self.large

    def _outcomes(self, state: int, action: int) -> list[tuple[float, int, float, bool]]:
        kept = self._move(state, action)
        slipped = self._move(state, 1 - action)
        return [(1.0 - self.slip, *kept, False), (self.slip, *slipped, False)]

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        self.state = 0
        return self.state, {}

    def step(self, action):
        action = int(action)
        if action not in (0, 1):
            raise ValueError(f"action must be 0 (forward) or 1 (back), got {action}")
        if self.np_random.random() < self.slip:
            action = 1 - action
        self.state, reward = self._move(self.state, action)
        return self.state, reward, False, False, {}


def _register() -> None:
    if NCHAIN_ID not in gym.registry:
        gym.register(id=NCHAIN_ID, entry_point=NChainEnv, max_episode_steps=1000)


_register()


class OneHotObservation(gym.ObservationWrapper):
    """``Discrete(n)`` observations as one-hot ``float32`` vectors ``Box(0, 1, (n,))``: how the network
    recipes (``recipes/train.py``) and the network baselines see the tabular environments."""

    def __init__(self, env: gym.Env) -> None:
        super().__init__(env)
        if not isinstance(env.observation_space, spaces.Discrete):
            raise ValueError(f"OneHotObservation needs a Discrete observation space, got {env.observation_space}")
        self._n, self._start = int(env.observation_space.n), int(env.observation_space.start)
        self.observation_space = spaces.Box(0.0, 1.0, (self._n,), dtype=np.float32)

    def observation(self, observation) -> np.ndarray:
        one_hot = np.zeros(self._n, dtype=np.float32)
        one_hot[int(observation) - self._start] = 1.0
        return one_hot


class WithoutInfo(gym.Wrapper):
    """The env with empty ``info`` dicts. A gymnasium vector env merges every copy's info into arrays at every
    step, key by key (``SyncVectorEnv._add_info``): for 64 MuJoCo copies about 8% of the vector step, for
    entries that nothing of a training run reads (episode statistics come from TorchRL's transforms).

    >>> env = WithoutInfo(gym.make("CartPole-v1"))
    >>> env.reset(seed=0)[1], env.step(0)[-1]
    ({}, {})
    """

    def step(self, action: Any) -> tuple[Any, Any, bool, bool, dict[str, Any]]:
        obs, reward, terminated, truncated, _ = self.env.step(action)
        return obs, reward, terminated, truncated, {}

    def reset(self, **kwargs: Any) -> tuple[Any, dict[str, Any]]:
        obs, _ = self.env.reset(**kwargs)
        return obs, {}
