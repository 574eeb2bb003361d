"""The environments of a training run: TorchRL envs over gymnasium vector envs, their observation
statistics, and the deterministic evaluation.

Every env is built fresh from ``(name, seed, statistics)``: nothing else carries over between two
of them, which is what lets a run resume exactly from a checkpoint (``recipes/train.py``).
"""

from __future__ import annotations

import difflib

import gymnasium as gym
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from tensordict import TensorDict
from tensordict.nn import TensorDictModuleBase
from torchrl.envs import (
    ClipTransform,
    Compose,
    DoubleToFloat,
    EnvBase,
    ExplorationType,
    GymWrapper,
    RewardSum,
    StepCounter,
    TransformedEnv,
    set_exploration_type,
)

from torchrl_ot.envs import (  # importing torchrl_ot.envs registers NChain-v0
    OneHotObservation,
    WithoutInfo,
    check_env_kwargs,
)
from torchrl_ot.tabular import episode_limit, make_vec_env
from torchrl_ot.training.obs_norm import RunningObsNorm
from torchrl_ot.training.reward_scaling import ReturnScaling
from torchrl_ot.training.vec_env import FusedVecEnv

EVAL_SEED_OFFSET = 10_000

#: ``env_engine``. fused: :class:`~torchrl_ot.training.FusedVecEnv` (the normalisation, clip, episode return and
#: step count in the env's own step); torchrl: ``TransformedEnv(GymWrapper(vec), Compose(...))`` of TorchRL's
#: transforms; auto: fused, except on Ray (whose statistics sync reads the transforms).
ENV_ENGINES = ("auto", "fused", "torchrl")


def resolve_env_engine(cfg: DictConfig) -> str:
    """``fused`` or ``torchrl``: the engine ``cfg.env_engine`` names (``auto``: torchrl with
    ``collector.backend=ray``, else fused). Both give the same batches, bit for bit."""
    engine = cfg.get("env_engine", "auto")
    if engine not in ENV_ENGINES:
        raise ValueError(f"env_engine must be one of {ENV_ENGINES}, got {engine!r}")
    on_ray = (cfg.get("collector") or {}).get("backend", "local") == "ray"
    if engine == "fused" and on_ray:
        raise ValueError("env_engine=fused does not run on collector.backend=ray (its statistics sync reads "
                         "TorchRL's transforms): use env_engine=auto or torchrl")
    if engine == "auto":
        return "torchrl" if on_ray else "fused"
    return engine


def check_env_name(name: str) -> None:
    """Refuse an unknown gymnasium id up front, suggesting close matches.

    >>> check_env_name("CartPol-v1")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: unknown gymnasium environment env.name='CartPol-v1'; did you mean one of ['CartPole-v1', ...
    """
    if name not in gym.registry:
        close = difflib.get_close_matches(name, list(gym.registry), n=5, cutoff=0.6)
        hint = f"; did you mean one of {close}?" if close else ""
        raise ValueError(f"unknown gymnasium environment env.name={name!r}{hint} "
                         "(any id registered with gymnasium works, e.g. env.name=Acrobot-v1)")


def make_env(name: str, seed: int, obs_stats: TensorDict | None, cfg: DictConfig, *, num_envs: int,
             frozen: bool = False, return_stats: TensorDict | None = None) -> EnvBase:
    """``num_envs`` synchronous gymnasium copies as one TorchRL env ``[num_envs]``, float32 observations,
    running normalisation, episode return/length; seeded (copy i gets ``seed + i``).

    ``return_stats`` (:func:`~torchrl_ot.training.new_return_stats`, shared and updated in place like
    ``obs_stats``): rewards scaled by :class:`~torchrl_ot.training.ReturnScaling` with ``cfg.env.gamma`` and
    ``cfg.reward_scaling.{eps,clip}``, after the episode return is summed (``episode_reward`` stays the
    env's own). ``None``: the env's rewards (evaluation always). With ``cfg.action_bound == "clip"`` the
    actions are clipped into the env's box on their way in (the batch keeps the policy's own draw).

    ``obs_stats`` (loc/var/count) is the single store of the normalisation statistics: the RunningObsNorm
    transform updates it in place (``shared_data``), so the run loop checkpoints it and the next fresh
    env continues from it. ``None``: no normalisation. ``frozen``: normalise without updating the
    statistics (evaluation). ``cfg`` gives ``obs_norm.decay``, ``obs_norm.eps`` and ``obs_norm.clip``.

    ``cfg.env_engine`` (:func:`resolve_env_engine`): the normalisation, clip, episode return and step count in one
    :class:`~torchrl_ot.training.FusedVecEnv` (fused), or as TorchRL's transforms over ``GymWrapper`` (torchrl,
    where the RunningObsNorm transform holds ``obs_stats``); the same values either way. The reward scaling and
    the action clip are TorchRL transforms on top in both.
    """
    env_kwargs = check_env_kwargs(name, OmegaConf.to_container(kw) if isinstance(kw := cfg.env.get("kwargs"),
                                                                                  DictConfig) else kw)

    def make_vec(tabular: bool) -> gym.vector.VectorEnv:
        # No info dicts: their per-step merge costs the vector env time and nothing here reads them.
        wrappers = [OneHotObservation, WithoutInfo] if tabular else [WithoutInfo]
        return make_vec_env(name, env_kwargs, num_envs=num_envs, wrappers=wrappers,
                            max_episode_steps=episode_limit(name) if tabular else None)

    try:
        vec = make_vec(tabular=False)
        if isinstance(vec.single_observation_space, gym.spaces.Discrete):
            # Tabular envs are seen as one-hot vectors (as the network baselines of the paper's discrete
            # experiments), with the tabular recipe's time limit (CliffWalking has none).
            vec.close()
            vec = make_vec(tabular=True)
    except (ModuleNotFoundError, gym.error.DependencyNotInstalled) as err:  # e.g. MuJoCo without imageio
        raise ModuleNotFoundError(f"environment {name!r} needs a missing package: {err}. "
                                  "MuJoCo envs need `pip install 'gymnasium[mujoco]'`.") from err
    obs_space, act_space = vec.single_observation_space, vec.single_action_space
    if not isinstance(obs_space, gym.spaces.Box) or len(obs_space.shape) != 1:
        raise ValueError(f"env.name={name!r}: this recipe needs a flat Box observation space, got {obs_space}")
    bounded_box = (isinstance(act_space, gym.spaces.Box) and len(act_space.shape) == 1
                   and np.isfinite(act_space.low).all() and np.isfinite(act_space.high).all())
    if not (isinstance(act_space, gym.spaces.Discrete) or bounded_box):  # TanhNormal needs finite bounds
        raise ValueError(f"env.name={name!r}: this recipe needs Discrete actions or a bounded flat Box, "
                         f"got {act_space}")
    if resolve_env_engine(cfg) == "fused":  # the same env as the stack below, in one step (FusedVecEnv)
        base = FusedVecEnv(vec, obs_stats=obs_stats, decay=cfg.obs_norm.decay, eps=cfg.obs_norm.eps,
                          clip=cfg.obs_norm.clip, frozen=frozen)
        transforms = []
    else:
        base = GymWrapper(vec, categorical_action_encoding=True)
        transforms = []
        if base.observation_spec["observation"].dtype == torch.float64:
            transforms.append(DoubleToFloat(in_keys=["observation"]))
        if obs_stats is not None:
            norm = RunningObsNorm(obs_stats, decay=cfg.obs_norm.decay, eps=cfg.obs_norm.eps, frozen=frozen)
            transforms += [norm, ClipTransform(in_keys=["observation"], low=-cfg.obs_norm.clip,
                                               high=cfg.obs_norm.clip)]
        transforms += [RewardSum(), StepCounter()]
    if return_stats is not None:
        transforms.append(ReturnScaling(return_stats, gamma=cfg.env.gamma, eps=cfg.reward_scaling.eps,
                                        clip=cfg.reward_scaling.clip))
    if cfg.get("action_bound", "tanh") == "clip" and isinstance(act_space, gym.spaces.Box):
        low, high = np.unique(act_space.low), np.unique(act_space.high)
        if low.size != 1 or high.size != 1:  # TorchRL's ClipTransform takes scalar bounds only
            raise ValueError(f"action_bound='clip' needs the same bounds on every action dimension; env.name={name!r} "
                             f"has low={act_space.low}, high={act_space.high} (use action_bound=tanh)")
        transforms.append(ClipTransform(in_keys_inv=["action"], low=float(low[0]), high=float(high[0])))
    env = TransformedEnv(base, Compose(*transforms)) if transforms else base
    env.set_seed(seed)
    return env


def new_obs_stats(obs_dim: int) -> TensorDict:
    """Zero statistics in VecNormV2's layout, which RunningObsNorm keeps (it bias-corrects the running
    moments, so zeros are a clean start).

    >>> new_obs_stats(3)["loc", "observation"]
    tensor([0., 0., 0.])
    """
    zeros = torch.zeros(obs_dim)
    return TensorDict({"loc": {"observation": zeros.clone()}, "var": {"observation": zeros.clone()},
                       "count": {"observation": torch.zeros((), dtype=torch.int64)}}, batch_size=[])


def evaluate(actor: TensorDictModuleBase, cfg: DictConfig, obs_stats: TensorDict | None,
             horizon: int, *, device: torch.device | None = None) -> list[float]:
    """First-episode returns of ``cfg.eval_episodes`` copies of the env run side by side with the
    deterministic policy for at most ``horizon`` steps, seeded ``cfg.seed + 10000`` every time
    (evaluations differ only through the policy), normalised with frozen statistics. The torch RNG is
    forked, so evaluating never changes what training does. ``device``: the actor's, when not the CPU (the
    env's steps are cast there and back, TorchRL's ``auto_cast_to_device``)."""
    # Before any training step the statistics are empty (count 0): let the evaluation's own copy warm up.
    frozen = obs_stats is not None and bool(obs_stats["count", "observation"] > 0)
    env = make_env(cfg.env.name, cfg.seed + EVAL_SEED_OFFSET, None if obs_stats is None else obs_stats.clone(),
                   cfg, num_envs=cfg.eval_episodes, frozen=frozen)
    with torch.random.fork_rng(devices=[]), torch.no_grad(), set_exploration_type(ExplorationType.DETERMINISTIC):
        rollout = env.rollout(horizon, actor, break_when_any_done=False,  # finished copies are reset
                              auto_cast_to_device=device is not None and device.type != "cpu")
    env.close()
    reward = rollout["next", "reward"].squeeze(-1).double()
    done = rollout["next", "done"].squeeze(-1).long()
    before_first = (done.cumsum(-1) - done) == 0  # rewards up to and including each copy's first done
    return (reward * before_first).sum(-1).tolist()
