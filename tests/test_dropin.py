"""OTTrustRegionLoss as a drop-in for ClipPPOLoss in a plain TorchRL loop.

A loop that only calls the value estimator and ``loss(minibatch)`` must learn: lambda* is solved once per estimated
batch without an explicit call (``solve_on_estimate``), and a raw GAE batch whose advantages are all <= 0 still
moves the actor (``normalize_advantage``, on by default).
"""

from __future__ import annotations

import pytest
import torch
from tensordict import TensorDict
from tensordict.nn import AddStateIndependentNormalScale, TensorDictModule
from torch import nn
from torchrl.collectors import Collector
from torchrl.envs import Compose, DoubleToFloat, GymEnv, TransformedEnv
from torchrl.modules import MLP, ProbabilisticActor, TanhNormal, ValueOperator
from torchrl.objectives.value import GAE

from torchrl_ot import EuclideanCost, OTTrustRegionLoss


def _pendulum_batch(frames=256):
    torch.manual_seed(0)
    env = TransformedEnv(GymEnv("Pendulum-v1"), Compose(DoubleToFloat()))
    env.set_seed(0)
    policy_net = nn.Sequential(MLP(in_features=3, out_features=1, num_cells=[16], activation_class=nn.Tanh),
                               AddStateIndependentNormalScale(1, scale_lb=1e-4))
    actor = ProbabilisticActor(TensorDictModule(policy_net, ["observation"], ["loc", "scale"]),
                               in_keys=["loc", "scale"], spec=env.action_spec, distribution_class=TanhNormal,
                               return_log_prob=True, distribution_kwargs={"low": -2.0, "high": 2.0})
    critic = ValueOperator(MLP(in_features=3, out_features=1, num_cells=[16], activation_class=nn.Tanh),
                           in_keys=["observation"])
    collector = Collector(env, actor, frames_per_batch=frames, total_frames=frames)
    batch = next(iter(collector))
    collector.shutdown()
    return actor, critic, batch


def _ppo_style(actor, critic, **kwargs):
    # ClipPPOLoss's keywords, as TorchRL's sota-implementations/ppo/ppo_mujoco.py passes them (clip_epsilon -> cost
    # and epsilon).
    return OTTrustRegionLoss(actor_network=actor, critic_network=critic, cost=EuclideanCost(), epsilon=0.3,
                             loss_critic_type="l2", entropy_coeff=0.0, critic_coeff=1.0, reduction="mean",
                             functional=True, **kwargs)


def _actor_grad(loss, minibatch):
    loss.zero_grad()
    loss(minibatch)["loss_objective"].backward()
    return torch.cat([p.grad.reshape(-1) for p in loss._actor_params() if p.grad is not None])


@pytest.mark.parametrize("normalize", [True, False])
def test_raw_gae_batch_with_all_negative_advantages(normalize):
    actor, critic, batch = _pendulum_batch()
    loss = _ppo_style(actor, critic, normalize_advantage=normalize)
    loss.make_value_estimator(gamma=0.99, lmbda=0.95)
    raw = batch.clone()
    with torch.no_grad():
        GAE(gamma=0.99, lmbda=0.95, value_network=critic)(raw)
    assert bool((raw["advantage"] < 0).all())  # Pendulum's rewards are negative, the critic untrained
    with torch.no_grad():
        loss.value_estimator(batch)  # the only call before the minibatches: it also solves lambda*
    minibatch = batch.reshape(-1)[torch.randperm(256, generator=torch.Generator().manual_seed(0))[:64]]
    grad = _actor_grad(loss, minibatch)
    if normalize:  # the default: standardised over the batch, half the samples pull the mean
        assert float(batch["ot_multiplier"].mean()) > 0
        assert float(grad.abs().max()) > 0
    else:  # the failure it prevents: lambda* = 0, every hinge flat, the update silently does nothing
        assert float(batch["ot_multiplier"].mean()) == 0
        assert float(grad.abs().max()) == 0


def test_the_estimator_solves_exactly_once_per_call(monkeypatch):
    actor, critic, batch = _pendulum_batch()
    loss = _ppo_style(actor, critic)
    loss.make_value_estimator(gamma=0.99, lmbda=0.95)
    calls = []
    real = loss.solve_multiplier
    monkeypatch.setattr(loss, "solve_multiplier", lambda td: calls.append(1) or real(td))
    with torch.no_grad():
        loss.value_estimator(batch)
    assert len(calls) == 1 and "ot_multiplier" in batch.keys()
    # Standardised in place over the batch, and lambda* is the one of the standardised advantages.
    adv = batch["advantage"]
    assert float(adv.mean()) == pytest.approx(0, abs=1e-6) and float(adv.std()) == pytest.approx(1, rel=1e-5)
    check = _ppo_style(actor, critic, normalize_advantage=False, solve_on_estimate=False)
    again = check.solve_multiplier(batch.exclude("ot_multiplier", "ot_split", "ot_transport"))
    assert float(again.multiplier) == pytest.approx(float(batch["ot_multiplier"][0]), rel=1e-6)
    # solve_multiplier on a batch without advantages runs the estimator itself: still one solve, not two.
    calls.clear()
    fresh = batch.exclude("advantage", "value_target", "ot_multiplier", "ot_split", "ot_transport")
    loss.solve_multiplier(fresh)
    assert len(calls) == 1 and "ot_multiplier" in fresh.keys()


def test_solve_hook_on_torchrl_gae_and_off_switch():
    actor, critic, batch = _pendulum_batch()
    loss = _ppo_style(actor, critic, solve_on_estimate=False)
    loss.make_value_estimator(gamma=0.99, lmbda=0.95)
    with torch.no_grad():
        loss.value_estimator(batch)
    assert "ot_multiplier" not in batch.keys()  # off: the estimator only estimates
    adv_module = GAE(gamma=0.99, lmbda=0.95, value_network=critic)
    adv_module.register_forward_hook(loss.solve_hook)  # the one extra line in TorchRL's PPO script
    with torch.no_grad():
        adv_module(batch)
    assert "ot_multiplier" in batch.keys() and float(batch["ot_transport"][0]) == pytest.approx(0.3, rel=1e-5)


@pytest.mark.parametrize("name", ["normalize_advantage", "solve_on_estimate"])
def test_switches_are_checked(name):
    actor, critic = _pendulum_batch(16)[:2]
    with pytest.raises(ValueError, match=name):
        _ppo_style(actor, critic, **{name: 1})


def test_a_batch_of_one_is_not_standardised():
    actor, critic, batch = _pendulum_batch(16)
    one = TensorDict({k: batch.reshape(-1)[:1].get(k) for k in ("observation", "action", "loc", "scale")}, [1])
    one["advantage"] = torch.tensor([[2.5]])
    loss = _ppo_style(actor, critic)
    loss.solve_multiplier(one)
    assert float(one["advantage"]) == 2.5  # std of one value is undefined: left as it is
