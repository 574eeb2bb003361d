"""The shared pipeline's options that the reference implementations use (reward scaling, clipped Gaussian
actions, RMSprop, the learning-rate horizon) and the baselines' published settings (recipes/conf/train/tuned)."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from gymnasium.wrappers.utils import RunningMeanStd
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from tensordict import TensorDict
from tensordict.nn import TensorDictModule
from torchrl.modules import IndependentNormal, TanhNormal
from torchrl.objectives.value import GAE

from torchrl_ot.training import (
    GRAD_CLIPS,
    ReturnScaling,
    ValueTargetScaling,
    check_config,
    clip_gradients,
    make_env,
    make_networks,
    make_optimizer,
    new_return_stats,
    scheduled_lr,
)

CONF = Path(__file__).resolve().parents[1] / "recipes" / "conf" / "train"


def _cfg(*overrides):
    with initialize_config_dir(config_dir=str(CONF), version_base=None):
        return compose("config", overrides=list(overrides))


def _reference_scaling(rewards, dones, gamma, eps, clip):
    """stable-baselines3's VecNormalize reward path, on gymnasium's RunningMeanStd (an independent Welford)."""
    rms, returns, out = RunningMeanStd(shape=()), np.zeros(rewards.shape[1]), []
    for r, d in zip(rewards, dones, strict=True):
        returns = returns * gamma + r
        rms.update(returns)
        out.append(np.clip(r / np.sqrt(rms.var + eps), -clip, clip))
        returns[d] = 0.0
    return np.stack(out), rms


@pytest.mark.parametrize(("gamma", "clip"), [(0.99, 10.0), (0.9999, 0.5), (0.0, 10.0)])
def test_return_scaling_matches_the_reference_step_by_step(gamma, clip):
    gen = np.random.default_rng(0)
    rewards = gen.normal(3.0, 2.0, size=(60, 4))
    dones = gen.random((60, 4)) < 0.1
    expected, rms = _reference_scaling(rewards, dones, gamma, 1e-8, clip)
    stats = new_return_stats()
    scaling = ReturnScaling(stats, gamma=gamma, clip=clip)
    got = []
    for r, d in zip(rewards, dones, strict=True):
        step = TensorDict({"reward": torch.tensor(r).unsqueeze(-1), "done": torch.tensor(d).unsqueeze(-1)}, [4])
        got.append(scaling._step(None, step)["reward"].squeeze(-1).numpy())
    np.testing.assert_allclose(np.stack(got), expected, rtol=1e-12)
    assert float(stats["var"]) == pytest.approx(float(rms.var), rel=1e-12)
    assert float(stats["count"]) == pytest.approx(float(rms.count), rel=1e-12)


def test_return_scaling_frozen_keeps_its_statistics_and_refuses_bad_arguments():
    stats = new_return_stats()
    stats["var"].fill_(4.0)
    scaling = ReturnScaling(stats, gamma=0.99, frozen=True)
    out = scaling._step(None, TensorDict({"reward": torch.tensor([[2.0]]), "done": torch.tensor([[False]])}, [1]))
    assert out["reward"].item() == pytest.approx(1.0) and float(stats["var"]) == 4.0
    with pytest.raises(ValueError, match="gamma"):
        ReturnScaling(new_return_stats(), gamma=1.5)
    with pytest.raises(ValueError, match="clip"):
        ReturnScaling(new_return_stats(), gamma=0.9, clip=0.0)
    with pytest.raises(ValueError, match="missing"):
        ReturnScaling(TensorDict({"mean": torch.zeros(())}, []), gamma=0.9)


def test_env_scales_rewards_after_summing_the_episode_return():
    cfg = _cfg("env=Pendulum-v1", "reward_scaling.enabled=true")
    raw = make_env("Pendulum-v1", 0, None, cfg, num_envs=2)
    stats = new_return_stats()
    scaled = make_env("Pendulum-v1", 0, None, cfg, num_envs=2, return_stats=stats)
    torch.manual_seed(0)
    a = raw.rollout(20, break_when_any_done=False)
    torch.manual_seed(0)
    b = scaled.rollout(20, break_when_any_done=False)
    assert torch.equal(a["next", "episode_reward"], b["next", "episode_reward"])  # logging sees the env's own
    rewards = a["next", "reward"].squeeze(-1).double().numpy().T  # [steps, copies]; no episode ends in 20 steps
    expected, _ = _reference_scaling(rewards, np.zeros(rewards.shape, bool), cfg.env.gamma, 1e-8, 10.0)
    np.testing.assert_allclose(b["next", "reward"].squeeze(-1).numpy().T, expected, rtol=1e-5)
    assert float(stats["count"]) == pytest.approx(40 + 1e-4)


def _reference_gae(rewards, values, next_values, dones, gamma, lmbda):
    """GAE along time (dim 1) with episodes cut at ``dones``: the textbook recursion, in numpy."""
    adv, last = np.zeros_like(rewards), np.zeros(rewards.shape[0])
    for t in reversed(range(rewards.shape[1])):
        not_done = 1.0 - dones[:, t]
        delta = rewards[:, t] + gamma * next_values[:, t] * not_done - values[:, t]
        last = delta + gamma * lmbda * not_done * last
        adv[:, t] = last
    return adv


def test_value_target_scaling_gives_raw_advantages_and_normalised_targets():
    # Tianshou's rew_norm: GAE on the raw rewards with the critic's outputs times s = sqrt(var + eps); the
    # critic's targets are the lambda-returns / s; the lambda-returns then update the statistics.
    gen = torch.Generator().manual_seed(0)
    obs, next_obs = torch.randn(2, 3, 7, 2, generator=gen, dtype=torch.float64)
    rewards = 5.0 * torch.randn(3, 7, 1, generator=gen, dtype=torch.float64)
    dones = torch.zeros(3, 7, 1, dtype=torch.bool)
    dones[0, 3] = dones[2, 5] = True
    linear = torch.nn.Linear(2, 1).double()
    critic = TensorDictModule(linear, ["observation"], ["state_value"])
    batch = TensorDict({"observation": obs, "next": {"observation": next_obs, "reward": rewards, "done": dones,
                                                     "terminated": dones}}, [3, 7])
    stats = new_return_stats()
    stats["var"].fill_(9.0)
    scaling = ValueTargetScaling(stats, eps=1e-8)
    estimator = GAE(gamma=0.9, lmbda=0.8, value_network=critic)
    scaling.attach(estimator)
    scaling.attach(estimator)  # idempotent: the critic is wrapped once
    with torch.no_grad():
        scaling.estimate(estimator, batch)
        v, v_next = linear(obs).squeeze(-1).numpy(), linear(next_obs).squeeze(-1).numpy()
    s = np.sqrt(9.0 + 1e-8)
    adv = _reference_gae(rewards.squeeze(-1).numpy(), s * v, s * v_next, dones.squeeze(-1).double().numpy(), 0.9, 0.8)
    # rtol 1e-6: TorchRL's GAE keeps gamma and lambda in float32.
    np.testing.assert_allclose(batch["advantage"].squeeze(-1).numpy(), adv, rtol=1e-6)
    np.testing.assert_allclose(batch["value_target"].squeeze(-1).numpy(), (adv + s * v) / s, rtol=1e-6)
    np.testing.assert_allclose(batch["state_value"].squeeze(-1).numpy(), v, rtol=1e-10)  # the critic's own units
    rms = RunningMeanStd(shape=())  # the prior: var 1, count 1e-4 (here var 9)
    rms.var = 9.0
    rms.update((adv + s * v).reshape(-1))
    assert float(stats["var"]) == pytest.approx(float(rms.var), rel=1e-6)
    assert float(stats["count"]) == pytest.approx(21 + 1e-4)
    with pytest.raises(ValueError, match="eps"):
        ValueTargetScaling(new_return_stats(), eps=-1.0)
    with pytest.raises(ValueError, match="value_network"):
        scaling.attach(torch.nn.Module())


def test_value_target_mode_leaves_the_env_rewards_raw_and_trains(tmp_path):
    root = CONF.parents[2]
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, str(root / "recipes" / "train.py"), "env=Pendulum-v1", "algo=a2c",
                           "total_frames=1024", "frames_per_batch=256", "num_envs=4", "eval_every=1024",
                           "eval_episodes=1", "checkpoint_every=1024", "progress=false", "seed=0",
                           "reward_scaling.enabled=true", "reward_scaling.mode=value_targets",
                           f"hydra.run.dir={out}"], cwd=root, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpt = torch.load(out / "checkpoint.pt", weights_only=False)
    # Four batches of 256 lambda-returns went into the statistics (the env scaled nothing: it has no stats).
    assert float(ckpt["return_stats"]["count"]) == pytest.approx(1024 + 1e-4)
    # Pendulum's returns are in the hundreds: the critic's targets are of order one, the advantages are not.
    assert float(ckpt["return_stats"]["var"]) > 100


def test_clipped_actions_reach_the_env_clipped_and_stay_raw_in_the_batch():
    cfg = _cfg("env=HalfCheetah-v5", "action_bound=clip")
    outs = []
    for value in (3.0, 1.0):  # HalfCheetah's control cost reads the action it gets: unclipped, 3.0 would cost more
        env = make_env("HalfCheetah-v5", 0, None, cfg, num_envs=1)
        td = env.reset()
        td["action"] = torch.full((1, 6), value)
        outs.append(env.step(td))
    assert torch.equal(outs[0]["next", "reward"], outs[1]["next", "reward"])
    assert torch.equal(outs[0]["next", "observation"], outs[1]["next", "observation"])
    assert (outs[0]["action"] == 3.0).all()  # the policy's own draw, for its log-probability


@pytest.mark.parametrize(("bound", "dist_class"), [("tanh", TanhNormal), ("clip", IndependentNormal)])
def test_action_bound_chooses_the_policy_distribution(bound, dist_class):
    cfg = _cfg("env=Pendulum-v1", f"action_bound={bound}", "algo=ppo")
    env = make_env("Pendulum-v1", 0, None, cfg, num_envs=1)
    actor, _, _ = make_networks(env, cfg, "ppo")
    td = actor(env.reset())
    dist = actor.get_dist(td)
    assert isinstance(dist, dist_class)
    if bound == "clip":  # a plain diagonal Gaussian: log-prob summed over the action's dimensions
        normal = torch.distributions.Normal(td["loc"], td["scale"])
        torch.testing.assert_close(td["action_log_prob"], normal.log_prob(td["action"]).sum(-1))


def test_rmsprop_and_the_learning_rate_horizon():
    cfg = OmegaConf.create({"optimizer": "rmsprop", "lr": 7e-4, "adam_eps": 1e-5, "adam_fused": False,
                            "anneal_lr": True, "lr_anneal_frames": 3_000_000, "frames_per_batch": 80})
    opt = make_optimizer([torch.nn.Parameter(torch.zeros(3))], cfg)
    assert isinstance(opt, torch.optim.RMSprop)
    assert opt.defaults["alpha"] == 0.99 and opt.defaults["eps"] == 1e-5 and opt.defaults["lr"] == 7e-4
    # 1M frames into a 3M-frame decay: 2/3 of the rate is left, whatever the run's own length.
    assert scheduled_lr(cfg, updates_done=12_500, total_batches=12_500) == pytest.approx(7e-4 * 2 / 3)
    cfg.lr_anneal_frames = None
    assert scheduled_lr(cfg, updates_done=6_250, total_batches=12_500) == pytest.approx(3.5e-4)
    cfg.anneal_lr = False
    assert scheduled_lr(cfg, updates_done=6_250, total_batches=12_500) == 7e-4


def test_per_network_clipping_keeps_the_actor_step_when_the_critic_gradient_is_large():
    torch.manual_seed(0)
    actor, critic = torch.nn.Linear(3, 2), torch.nn.Linear(3, 1)
    x = torch.randn(16, 3)
    grads = {}
    for mode in GRAD_CLIPS:
        for net in (actor, critic):
            net.zero_grad()
        (actor(x).pow(2).mean() + 1e4 * critic(x).pow(2).mean()).backward()  # the critic's norm dominates
        actor_params, critic_params = list(actor.parameters()), list(critic.parameters())
        raw = [p.grad.clone() for p in actor_params]
        groups = [actor_params + critic_params] if mode == "global" else [actor_params, critic_params]
        total = clip_gradients(groups, 0.5)
        full = torch.cat([p.grad.flatten() for p in actor_params + critic_params])
        grads[mode] = [p.grad.clone() for p in actor_params]
        if mode == "global":
            torch.testing.assert_close(full.norm(), torch.tensor(0.5))
        else:
            actor_norm = torch.cat([g.flatten() for g in raw]).norm()
            expected = [g * min(1.0, 0.5 / (float(actor_norm) + 1e-6)) for g in raw]
            for got, want in zip(grads[mode], expected, strict=True):
                torch.testing.assert_close(got, want)
            assert float(torch.cat([p.grad.flatten() for p in critic_params]).norm()) == pytest.approx(0.5, rel=1e-5)
        assert float(total) > 100  # the pre-clip norm over both, as logged
    ratio = torch.cat([g.flatten() for g in grads["per_network"]]).norm() / torch.cat(
        [g.flatten() for g in grads["global"]]).norm()
    assert ratio > 10  # under the global clip the critic's spike shrank the actor's gradient


@pytest.mark.parametrize(("override", "match"), [("optimizer=sgd", "optimizer"),
                                                 ("action_bound=squash", "action_bound"),
                                                 ("reward_scaling.mode=returns", "reward_scaling.mode"),
                                                 ("lr_anneal_frames=0", "lr_anneal_frames"),
                                                 ("grad_clip=actor", "grad_clip"),
                                                 ("max_grad_norm=-1", "max_grad_norm"),
                                                 ("max_grad_norm=nan", "max_grad_norm"),
                                                 ("lr=0", "lr"),
                                                 ("adam_eps=inf", "adam_eps"),
                                                 ("recompute_advantage=1", "recompute_advantage"),
                                                 ("recompute_advantage=true", "recompute_advantage"),
                                                 ("algo=trpo recompute_advantage=true", "algo='trpo'")])
def test_bad_pipeline_options_are_refused(override, match):
    with pytest.raises(ValueError, match=match):
        check_config(_cfg(*override.split()))


def test_published_settings_apply_per_algorithm_and_env_and_yield_to_the_command_line():
    a2c = _cfg("env=HalfCheetah-v5", "algo=a2c")
    assert (a2c.frames_per_batch, a2c.num_envs, a2c.optimizer, a2c.lr) == (80, 16, "rmsprop", 7e-4)
    assert a2c.reward_scaling.enabled and a2c.action_bound == "clip" and a2c.algo.entropy_coeff == 0.01
    assert a2c.reward_scaling.mode == "value_targets"  # Tianshou's rew_norm
    ppo = _cfg("env=Hopper-v5", "algo=ppo", "num_envs=8")
    assert ppo.num_envs == 8 and ppo.lr_anneal_frames == 3_072_000 and ppo.algo.critic_coeff == 0.25
    assert ppo.recompute_advantage and not ppo.algo.normalize_advantage
    trpo = _cfg("env=Swimmer-v5", "algo=trpo")
    assert (trpo.num_envs, trpo.num_epochs, trpo.num_minibatches, trpo.lr, trpo.anneal_lr) == (2, 20, 16, 1e-3, False)
    trpo = _cfg("env=HalfCheetah-v5", "algo=trpo")
    assert (trpo.num_envs, trpo.frames_per_batch, trpo.num_epochs, trpo.num_minibatches) == (16, 1024, 20, 1)
    assert trpo.algo.max_kl == 0.01 and trpo.reward_scaling.enabled and trpo.action_bound == "clip"
    assert _cfg("env=Hopper-v5", "algo=trpo").num_envs == 8  # the shared grid
    for untuned in (_cfg("env=CartPole-v1", "algo=ppo"), _cfg("env=HalfCheetah-v5", "algo=ot_trpo")):
        assert untuned.num_envs == 8 and not untuned.reward_scaling.enabled and untuned.action_bound == "tanh"
