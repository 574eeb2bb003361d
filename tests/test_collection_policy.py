"""The collector's lean sampling step (``CollectionPolicy``) writes what the actor writes, draw for draw: a
categorical and a tanh-Gaussian actor as the recipe builds them, over a TorchRL collector too, and the actor
itself under a deterministic exploration type."""

import functools

import pytest
import torch
from omegaconf import OmegaConf
from tensordict import TensorDict
from tensordict.nn import TensorDictModule
from torch import nn
from torchrl.collectors import Collector
from torchrl.envs import ExplorationType, set_exploration_type
from torchrl.modules import ProbabilisticActor

from torchrl_ot.training import make_env, make_networks, new_obs_stats
from torchrl_ot.training.collection_policy import CollectionPolicy

CFG = OmegaConf.create({"num_cells": [16, 16], "algo": {"init_scale": 1.0}, "action_bound": "tanh",
                        "obs_norm": {"decay": 0.99, "eps": 0.01, "clip": 10.0}})


def _actor(env_name: str, action_bound: str = "tanh"):
    cfg = OmegaConf.merge(CFG, {"env": {"name": env_name}, "action_bound": action_bound})
    torch.manual_seed(3)
    probe = make_env(env_name, 0, None, cfg, num_envs=1)
    return make_networks(probe, cfg, "ppo")[0], probe, cfg


@pytest.mark.parametrize(("env_name", "action_bound"), [("CartPole-v1", "tanh"), ("Pendulum-v1", "tanh"),
                                                        ("Pendulum-v1", "clip")])
def test_same_entries_and_draws_as_the_actor(env_name, action_bound):
    actor, probe, _ = _actor(env_name, action_bound)
    td = TensorDict({"observation": torch.randn(16, probe.observation_spec["observation"].shape[-1])}, [16])
    with torch.no_grad():
        torch.manual_seed(0)
        expected = actor(td.clone())
        torch.manual_seed(0)
        got = CollectionPolicy(actor)(td.clone())
        after = torch.rand(())  # the RNG advanced exactly as the actor's draw advances it
        torch.manual_seed(0)
        actor(td.clone())
        assert torch.rand(()) == after
    assert sorted(got.keys()) == sorted(expected.keys())
    for key in expected.keys():
        assert torch.equal(got[key], expected[key]), key


def test_deterministic_exploration_defers_to_the_actor():
    actor, probe, _ = _actor("Pendulum-v1")
    td = TensorDict({"observation": torch.randn(4, 3)}, [4])
    with torch.no_grad(), set_exploration_type(ExplorationType.DETERMINISTIC):
        got = CollectionPolicy(actor)(td.clone())["action"]
        assert torch.equal(got, actor(td.clone())["action"])
    # The deterministic action of the TanhNormal is the squashed loc: no draw involved.
    assert torch.equal(got, 2.0 * torch.tanh(actor.module[0](td.clone())["loc"]))


def test_collector_batches_equal_with_either_policy():
    actor, probe, cfg = _actor("CartPole-v1")
    batches = []
    for policy in (actor, CollectionPolicy(actor)):
        torch.manual_seed(0)
        env_fn = functools.partial(make_env, "CartPole-v1", 5, new_obs_stats(4), cfg, num_envs=4)
        collector = Collector(env_fn, policy, frames_per_batch=64, total_frames=128,
                              auto_register_policy_transforms=False)
        batches.append([b.clone() for b in collector])
        collector.shutdown()
    for slow, fast in zip(*batches, strict=True):
        assert set(slow.keys(True, True)) == set(fast.keys(True, True))
        for key in slow.keys(True, True):
            assert torch.equal(slow[key], fast[key]), key


def test_refuses_what_it_cannot_mirror():
    with pytest.raises(ValueError, match="actor must be a ProbabilisticActor"):
        CollectionPolicy(TensorDictModule(nn.Linear(2, 2), ["observation"], ["logits"]))
    logits = TensorDictModule(nn.Linear(2, 2), ["observation"], ["logits"])
    no_log_prob = ProbabilisticActor(logits, in_keys=["logits"], distribution_class=torch.distributions.Categorical)
    with pytest.raises(ValueError, match="log-probability"):
        CollectionPolicy(no_log_prob)
