"""``env_engine=fused`` (FusedVecEnv) against TorchRL's GymWrapper and transforms: the same specs, batches and
statistics, bit for bit, through resets of some copies and of all of them."""

from pathlib import Path

import gymnasium as gym
import pytest
import torch
from hydra import compose, initialize_config_dir
from torchrl.collectors import Collector
from torchrl.envs import TransformedEnv

from torchrl_ot.training import (
    FusedVecEnv,
    make_env,
    make_networks,
    new_obs_stats,
    new_return_stats,
    resolve_env_engine,
    resolve_policy,
)

CONF = Path(__file__).resolve().parents[1] / "recipes" / "conf" / "train"


def _cfg(*overrides):
    with initialize_config_dir(config_dir=str(CONF), version_base=None):
        return compose("config", overrides=list(overrides))


def _pair(name, *overrides, num_envs=3, stats=True, frozen=False, return_stats=False):
    """(fused env, TorchRL stack, their statistics) built alike from the recipe's config."""
    out = []
    for engine in ("fused", "torchrl"):
        cfg = _cfg(f"env={name}", f"env_engine={engine}", *overrides)
        probe = make_env(name, 0, None, cfg, num_envs=1)
        obs_stats = new_obs_stats(probe.observation_spec["observation"].shape[-1]) if stats else None
        if obs_stats is not None and frozen:  # frozen statistics must already hold something
            obs_stats["loc", "observation"] += 0.5
            obs_stats["var", "observation"] += 2.0
            obs_stats["count", "observation"] += 1000
        ret = new_return_stats() if return_stats else None
        out.append((make_env(name, 7, obs_stats, cfg, num_envs=num_envs, frozen=frozen, return_stats=ret),
                    obs_stats, ret))
    return out


def _assert_same(a, b):
    assert set(a.keys(True, True)) == set(b.keys(True, True))
    for key in a.keys(True, True):
        x, y = a.get(key), b.get(key)
        assert x.dtype == y.dtype and x.shape == y.shape, key
        assert torch.equal(x, y), key


@pytest.mark.parametrize(("name", "overrides", "kwargs"), [
    ("CartPole-v1", (), {}),  # float32 observations, discrete actions, many partial resets
    ("Hopper-v5", (), {}),  # float64 observations (cast), Box actions, early terminations
    ("Pendulum-v1", (), {"stats": False}),  # no normalisation; every copy truncated at once
    ("CartPole-v1", (), {"frozen": True}),  # evaluation's frozen statistics
    ("Taxi-v4", (), {}),  # one-hot tabular states
    ("Pendulum-v1", ("reward_scaling.enabled=true", "action_bound=clip"), {"return_stats": True}),  # transforms on top
])
def test_fused_env_equals_the_transformed_stack(name, overrides, kwargs):
    (fused, fused_stats, fused_ret), (stack, stack_stats, stack_ret) = _pair(name, *overrides, **kwargs)
    base = fused.base_env if isinstance(fused, TransformedEnv) else fused
    assert isinstance(base, FusedVecEnv) and not isinstance(stack.base_env, FusedVecEnv)
    for attr in ("full_observation_spec", "full_action_spec", "full_reward_spec", "full_done_spec",
                 "full_state_spec"):
        assert getattr(fused, attr) == getattr(stack, attr), attr
    rollouts = []
    for env in (fused, stack):
        torch.manual_seed(0)  # the same random actions
        rollouts.append(env.rollout(300 if name != "Pendulum-v1" else 450, break_when_any_done=False))
    _assert_same(*rollouts)
    done = rollouts[0]["next", "done"].squeeze(-1)
    assert done.any(), "the rollout never reset a copy"
    if name in ("CartPole-v1", "Hopper-v5"):
        assert (done.sum(0) % 3 != 0).any() or (done.any(0) & ~done.all(0)).any()  # some resets were partial
    for a, b in ((fused_stats, stack_stats), (fused_ret, stack_ret)):
        if a is not None:
            _assert_same(a, b)


def test_fused_env_in_a_collector_matches_with_the_recipes_actor():
    cfg = {engine: _cfg("env=CartPole-v1", f"env_engine={engine}") for engine in ("fused", "torchrl")}
    probe = make_env("CartPole-v1", 0, None, cfg["fused"], num_envs=1)
    torch.manual_seed(0)
    actor = make_networks(probe, cfg["fused"], resolve_policy(cfg["fused"], True))[0]
    batches, stats = [], []
    for engine in ("fused", "torchrl"):
        obs_stats = new_obs_stats(4)
        env = make_env("CartPole-v1", 3, obs_stats, cfg[engine], num_envs=4)
        torch.manual_seed(1)
        collector = Collector(env, actor, frames_per_batch=256, total_frames=512)
        batches.append(torch.cat([batch for batch in collector], -1))
        collector.shutdown()
        stats.append(obs_stats)
    _assert_same(*batches)
    _assert_same(*stats)


def test_env_engine_is_checked():
    assert resolve_env_engine(_cfg()) == "fused"
    assert resolve_env_engine(_cfg("collector.backend=ray")) == "torchrl"
    with pytest.raises(ValueError, match="env_engine must be one of"):
        resolve_env_engine(_cfg("env_engine=envpool"))
    with pytest.raises(ValueError, match="collector.backend=ray"):
        resolve_env_engine(_cfg("env_engine=fused", "collector.backend=ray"))


def test_fused_env_refuses_an_autoresetting_vector_env():
    vec = gym.make_vec("CartPole-v1", num_envs=2, vectorization_mode="sync")
    with pytest.raises(ValueError, match="autoreset_mode"):
        FusedVecEnv(vec, obs_stats=None)
    vec.close()


@pytest.mark.parametrize(("kwargs", "name"), [({"decay": 0.0}, "decay"), ({"decay": 1.5}, "decay"),
                                              ({"eps": 0.0}, "eps"), ({"eps": float("nan")}, "eps"),
                                              ({"clip": -1.0}, "clip"), ({"clip": float("nan")}, "clip")])
def test_fused_env_refuses_bad_normalisation_settings_by_name(kwargs, name):
    vec = gym.make_vec("CartPole-v1", num_envs=2, vectorization_mode="sync",
                       vector_kwargs={"autoreset_mode": gym.vector.AutoresetMode.DISABLED})
    with pytest.raises(ValueError, match=name):
        FusedVecEnv(vec, obs_stats=new_obs_stats(4), **kwargs)
    vec.close()
