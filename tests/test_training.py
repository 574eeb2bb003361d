"""torchrl_ot.training on its own: the batched critic, and the per-algorithm objects' hooks on one
collected batch (the recipe runs them end to end: tests/test_recipe_train.py)."""

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from torchrl.collectors import Collector
from torchrl.objectives import A2CLoss, ClipPPOLoss

from torchrl_ot import DiscreteMetricCost, OTTrustRegionLoss, TRPOLoss
from torchrl_ot.training import (
    A2C,
    PPO,
    TRPO,
    OTTrustRegion,
    ValueAndAdvantage,
    algorithm_class,
    check_config,
    make_algorithm,
    make_env,
    make_networks,
    mlp,
    normalize_advantage,
    resolve_policy,
)

CONF = Path(__file__).resolve().parents[1] / "recipes" / "conf" / "train"


def _cfg(*overrides):
    with initialize_config_dir(config_dir=str(CONF), version_base=None):
        return compose("config", overrides=["num_envs=2", *overrides])


def _built(*overrides):
    """The recipe's algorithm for ``overrides`` and one collected batch of 64 frames with its advantages."""
    cfg = _cfg(*overrides)
    torch.manual_seed(0)
    probe = make_env(cfg.env.name, 0, None, cfg, num_envs=1)
    discrete = probe.action_spec_unbatched.domain == "discrete"
    policy = resolve_policy(cfg, discrete)
    actor, critic, head = make_networks(probe, cfg, policy)
    probe.close()
    algorithm = make_algorithm(cfg, policy, discrete, actor, critic, head)
    collector = Collector(make_env(cfg.env.name, 0, None, cfg, num_envs=2), actor, frames_per_batch=64,
                          total_frames=64, auto_register_policy_transforms=False)
    batch = next(iter(collector))
    collector.shutdown()
    with torch.no_grad():
        algorithm.loss_module.value_estimator(batch)
    return algorithm, batch


def _actor_vector(algorithm):
    return torch.cat([p.detach().flatten() for p in algorithm.loss_module.actor_network.parameters()])


@pytest.mark.parametrize(("algo", "cls", "loss_cls"), [("ot_trpo", OTTrustRegion, OTTrustRegionLoss),
                                                       ("wpo", OTTrustRegion, OTTrustRegionLoss),
                                                       ("ppo", PPO, ClipPPOLoss), ("a2c", A2C, A2CLoss),
                                                       ("trpo", TRPO, TRPOLoss)])
def test_make_algorithm_builds_each_algorithms_own_loss(algo, cls, loss_cls):
    algorithm, _ = _built("env=CartPole-v1", f"algo={algo}")
    assert type(algorithm) is cls and isinstance(algorithm.loss_module, loss_cls)
    summary = algorithm.summary()
    if cls is OTTrustRegion:
        assert isinstance(algorithm.cost, DiscreteMetricCost)  # cost=auto on discrete actions
        assert summary["cost_fn"] == repr(algorithm.cost) and summary["epsilon"] == algorithm.cfg.algo.epsilon
        assert summary["cost"] is None  # the config group's name is Hydra's, outside a run unknown
    else:
        assert algorithm.cost is None and summary == {"cost": None, "cost_fn": None, "epsilon": None}


@pytest.mark.parametrize(("env", "override", "mirror"), [("Pendulum-v1", None, True), ("CartPole-v1", None, False),
                                                      ("Pendulum-v1", "algo.mirror=false", False),
                                                      ("CartPole-v1", "algo=wpo", False)])
def test_recipe_mirror_auto_is_on_for_gaussian_policies_only(env, override, mirror):
    algorithm, _ = _built(f"env={env}", *([override] if override else []))
    assert getattr(algorithm.loss_module, "mirror", False) is mirror  # only the Gaussian loss has the option
    assert algorithm.cfg.algo.max_step_extension == 8.0  # the recipe's default lengthening


def test_unknown_algo_and_bad_config_are_refused_before_building():
    with pytest.raises(ValueError, match="unknown algo.name='sac'.*ot_trpo"):
        algorithm_class("sac")
    with pytest.raises(ValueError, match="algo.epsilon must be positive"):
        check_config(_cfg("algo.epsilon=0"))
    with pytest.raises(ValueError, match="algo.mirror must be auto, true or false, got 'yes'"):
        check_config(_cfg("algo.mirror=yes"))
    with pytest.raises(ValueError, match="frames_per_batch=100 must be divisible by num_minibatches=32"):
        check_config(_cfg("frames_per_batch=100"))
    check_config(_cfg("algo=a2c", "frames_per_batch=100"))  # A2C's one minibatch divides any batch


def test_ot_hooks_solve_once_before_and_measure_the_move_after():
    algorithm, batch = _built("env=CartPole-v1", "algo=ot_trpo")
    row = {"frames": 64}
    algorithm.before_epochs(batch, row)
    adv = batch["advantage"]
    assert adv.mean().item() == pytest.approx(0, abs=1e-5) and adv.std().item() == pytest.approx(1, rel=1e-4)
    assert row["multiplier"] >= 0 and row["epsilon"] == algorithm.cfg.algo.epsilon
    assert 0 < row["transport_over_epsilon"] <= 1 + 1e-6  # mass splitting: the exact update moves <= epsilon
    assert algorithm.progress(row) == {"lam": f"{row['multiplier']:.3g}"}
    # No minibatch step in between: the actor did not move, so neither the projection.
    before = _actor_vector(algorithm)
    algorithm.after_epochs(batch, row)
    assert row["realised_transport_over_epsilon"] == pytest.approx(0, abs=1e-6) and row["step_fraction"] == 1
    torch.testing.assert_close(_actor_vector(algorithm), before)


def test_ot_solve_radius_factor_solves_for_the_larger_radius_and_projects_to_epsilon():
    algorithm, batch = _built("env=Pendulum-v1", "algo=ot_trpo", "algo.epsilon=0.05", "algo.solve_radius_factor=4.0")
    reference = batch.clone()
    loss = algorithm.loss_module
    algorithm.before_epochs(batch, {"frames": 64})
    assert loss.epsilon == pytest.approx(0.05)  # the update's radius is back for the projection
    # lam* is the one of the radius 4 x 0.05 (solved here independently of the hook), below the radius' own
    normalize_advantage(reference)
    loss.epsilon = 0.2
    wide = loss.solve_multiplier(reference.clone()).multiplier.item()
    loss.epsilon = 0.05
    own = loss.solve_multiplier(reference.clone()).multiplier.item()
    assert batch["ot_multiplier"].flatten()[0].item() == pytest.approx(wide, rel=1e-6) and wide < own
    # A long step on the fitted objective, then the projection: the update stays inside epsilon.
    with torch.no_grad():
        for p in loss.actor_network.parameters():
            p.add_(0.5 * torch.randn_like(p))
    row = {"frames": 64}
    algorithm.after_epochs(batch, row)
    assert row["realised_transport_over_epsilon"] <= 1 + 1e-9


@pytest.mark.parametrize("value", ["0", "-1.0", "inf", "true"])
def test_ot_solve_radius_factor_refused_with_the_option_named(value):
    with pytest.raises(ValueError, match="solve_radius_factor"):
        OTTrustRegion.check_config(_cfg("algo=ot_trpo", f"algo.solve_radius_factor={value}"))


def test_ot_solve_radius_factor_needs_the_projection():
    with pytest.raises(ValueError, match="enforce_radius"):
        OTTrustRegion.check_config(_cfg("algo=ot_trpo", "algo.solve_radius_factor=4.0", "algo.enforce_radius=false"))


def test_ot_scale_schedule_sets_the_next_std_and_epsilon_with_its_square():
    algorithm, batch = _built("env=Pendulum-v1", "algo=ot_trpo", "total_frames=1000", "algo.init_scale=1.0",
                              "algo.final_scale=0.2", "algo.epsilon=0.3")
    row = {"frames": 500}
    algorithm.before_epochs(batch, row)
    assert row["scale"] == pytest.approx(1.0) and algorithm.loss_module.epsilon == pytest.approx(0.3)
    algorithm.after_epochs(batch, row)  # halfway: the std for the next batch is 1 - 0.8 / 2
    assert algorithm.log_scale.exp().detach() == pytest.approx(torch.full_like(algorithm.log_scale, 0.6))
    algorithm.before_epochs(batch, {"frames": 564})
    assert algorithm.loss_module.epsilon == pytest.approx(0.3 * 0.6**2, rel=1e-5)


def test_ot_scale_schedule_reaches_final_scale_at_scale_anneal_frames_then_stays():
    algorithm, batch = _built("env=Pendulum-v1", "algo=ot_trpo", "total_frames=1000", "algo.init_scale=1.0",
                              "algo.final_scale=0.2", "algo.epsilon=0.3", "algo.scale_anneal_frames=400")
    assert algorithm.scheduled_scale(200) == pytest.approx(0.6)  # halfway to 400 frames, not to 1000
    assert algorithm.scheduled_scale(400) == pytest.approx(0.2) and algorithm.scheduled_scale(900) == pytest.approx(0.2)
    row = {"frames": 100}
    algorithm.before_epochs(batch, row)
    algorithm.after_epochs(batch, row)
    assert algorithm.log_scale.exp().detach() == pytest.approx(torch.full_like(algorithm.log_scale, 0.8))


@pytest.mark.parametrize("value", [0, -5, 2.5, True])
def test_ot_scale_anneal_frames_refuses_a_non_positive_or_non_integer_horizon(value):
    with pytest.raises(ValueError, match="algo.scale_anneal_frames"):
        check_config(_cfg("env=Pendulum-v1", "algo=ot_trpo", "algo.final_scale=0.2",
                          f"algo.scale_anneal_frames={value}"))


def test_trpo_steps_the_actor_before_the_epochs_which_then_train_the_critic_only():
    algorithm, batch = _built("env=CartPole-v1", "algo=trpo")
    before = _actor_vector(algorithm)
    row = {"frames": 64}
    algorithm.before_epochs(batch, row)
    assert row["kl"] <= algorithm.cfg.algo.max_kl + 1e-6 and row["step_accepted"] in (0.0, 1.0)
    assert (not torch.equal(_actor_vector(algorithm), before)) == bool(row["step_accepted"])
    out = algorithm.loss_module(batch.reshape(-1))
    assert algorithm.minibatch_loss(out) == out["loss_critic"]
    ppo, _ = _built("env=CartPole-v1", "algo=ppo")
    out = ppo.loss_module(batch.reshape(-1))
    assert ppo.minibatch_loss(out) == sum(v for k, v in out.items() if k.startswith("loss_"))


def test_value_and_advantage_is_the_two_mlps_batched():
    torch.manual_seed(0)
    value, advantage = mlp(5, 1, [16, 8], 1.0), mlp(5, 3, [16, 8], 1.0)
    for layer in (m for net in (value, advantage) for m in net.modules() if isinstance(m, torch.nn.Linear)):
        torch.nn.init.normal_(layer.bias)  # nonzero biases: the batched module must add them per network
    grouped = ValueAndAdvantage(value, advantage)
    assert len(list(grouped.parameters())) == 6  # against 12 for the two MLPs
    for shape in ([7, 5], [2, 7, 5], [5]):
        obs = torch.randn(shape)
        v, a = grouped(obs)
        torch.testing.assert_close(v, value(obs), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(a, advantage(obs), rtol=1e-5, atol=1e-6)
    # Gradients reach each network's own slice, and never the value's padding.
    v, a = grouped(torch.randn(4, 5))
    (v.sum() + a.sum()).backward()
    assert not grouped.weights[2].grad[0, :, 1:].any() and grouped.weights[2].grad[1].abs().sum() > 0
    with pytest.raises(ValueError, match="same input and hidden sizes"):
        ValueAndAdvantage(mlp(5, 1, [16, 8], 1.0), mlp(5, 3, [16, 16], 1.0))
    relu = torch.nn.Sequential(torch.nn.Linear(5, 16), torch.nn.ReLU(), torch.nn.Linear(16, 8),
                               torch.nn.ReLU(), torch.nn.Linear(8, 3))
    with pytest.raises(ValueError, match="Tanh activations only"):
        ValueAndAdvantage(mlp(5, 1, [16, 8], 1.0), relu)


def test_minibatches_draw_torchrls_sampler_permutations_at_the_same_moments():
    from tensordict import TensorDict
    from torchrl.data import ReplayBuffer, TensorStorage
    from torchrl.data.replay_buffers.samplers import SamplerWithoutReplacement

    from torchrl_ot.training import Minibatches

    data = TensorDict({"observation": torch.arange(40.0)[:, None], "next": {"reward": torch.zeros(40, 1)}}, [40])
    draws = []
    for make in (lambda: ReplayBuffer(storage=TensorStorage(data.exclude("next")),
                                      sampler=SamplerWithoutReplacement(), batch_size=16),
                 lambda: Minibatches(data, 16)):
        torch.manual_seed(0)
        source = make()
        batches = [source.sample() for _ in range(7)]  # 16, 16, 8 per epoch: the last minibatch is shorter
        draws.append(([b["observation"].squeeze(-1).tolist() for b in batches], torch.rand(3).tolist()))
        assert "next" not in batches[0].keys()
    assert draws[0] == draws[1]  # the same minibatches, and the same random stream afterwards
    assert sorted(x for b in draws[1][0][:3] for x in b) == list(range(40))  # an epoch is a permutation


@pytest.mark.parametrize("frozen", [False, True])
def test_running_obs_norm_is_vecnormv2_bit_for_bit(frozen):
    import gymnasium as gym
    from torchrl.envs import Compose, GymWrapper, TransformedEnv, VecNormV2

    from torchrl_ot.training import new_obs_stats
    from torchrl_ot.training.obs_norm import RunningObsNorm

    rollouts, stats = [], []
    for make_norm in (lambda s: VecNormV2(in_keys=["observation"], decay=0.999, eps=1e-2, shared_data=s,
                                          reduce_batch_dims=True),
                      lambda s: RunningObsNorm(s, decay=0.999, eps=1e-2)):
        s = new_obs_stats(4)
        if frozen:  # statistics from an earlier run, no longer updated (the evaluation's env)
            s["loc", "observation"].copy_(torch.tensor([0.1, -0.2, 0.0, 0.3]))
            s["var", "observation"].copy_(torch.tensor([1.0, 2.0, 0.5, 1.5]))
            s["count", "observation"].fill_(500)
        norm = make_norm(s)
        vec = gym.make_vec("CartPole-v1", num_envs=3, vectorization_mode="sync",
                           vector_kwargs={"autoreset_mode": gym.vector.AutoresetMode.DISABLED})
        env = TransformedEnv(GymWrapper(vec), Compose(norm.freeze() if frozen else norm))
        env.set_seed(0)
        torch.manual_seed(0)
        # 60 random steps: CartPole's episodes end and reset on the way, which updates the statistics too
        rollouts.append(env.rollout(60, break_when_any_done=False))
        stats.append(s.clone())
        env.close()
    for key in ("observation", ("next", "observation")):
        assert torch.equal(rollouts[0][key], rollouts[1][key])
    assert (rollouts[0]["next", "done"]).any()  # resets happened
    for key in (("loc", "observation"), ("var", "observation"), ("count", "observation")):
        assert torch.equal(stats[0][key], stats[1][key])
    # every step and every reset (the first, and one after each step where a copy ended) counts the 3 copies
    resets = 1 + int(rollouts[1]["next", "done"].squeeze(-1).any(0).sum())
    assert int(stats[1]["count", "observation"]) == (500 if frozen else 3 * (60 + resets))


def test_record_missing_pandas_keeps_the_answers_and_touches_nothing_when_installed():
    import subprocess
    import sys

    code = """
import importlib.util, sys
before = importlib.util.find_spec("pandas")
from torchrl_ot.training import record_missing_pandas
record_missing_pandas()
after = importlib.util.find_spec("pandas")
assert (before is None) == (after is None), (before, after)
try:
    import pandas
    importable = True
except ImportError:
    importable = False
assert importable == (before is not None)
assert (sys.modules.get("pandas", 0) is None) == (before is None)
print("ok", before is None)
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.startswith("ok"), proc.stderr[-2000:]


@pytest.mark.parametrize("size", [0, -3, 2.5, True])
def test_minibatches_refuse_a_bad_size(size):
    from tensordict import TensorDict

    from torchrl_ot.training import Minibatches

    with pytest.raises(ValueError, match="size"):
        Minibatches(TensorDict({"observation": torch.zeros(8, 1)}, [8]), size)
    with pytest.raises(ValueError, match="empty"):
        Minibatches(TensorDict({"observation": torch.zeros(0, 1)}, [0]), 4)


def test_running_obs_norm_refuses_bad_arguments():
    from torchrl_ot.training import RunningObsNorm, new_obs_stats

    for kwargs, match in (({"decay": 0.0, "eps": 0.01}, "decay"), ({"decay": 1.5, "eps": 0.01}, "decay"),
                          ({"decay": 0.99, "eps": 0.0}, "eps"), ({"decay": 0.99, "eps": 0.01, "key": "pixels"},
                                                                  "missing")):
        with pytest.raises(ValueError, match=match):
            RunningObsNorm(new_obs_stats(3), **kwargs)
