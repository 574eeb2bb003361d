"""BGPGLoss: the random-feature dual of the entropic Wasserstein distance against hand computations and POT's exact
entropic OT, the loss's penalty and its gradient against autograd on the hand-written formula, contracts, the
``algo=bgpg`` config checks and a recipe smoke run.

Tiny ``Linear(2, 4)`` actors (a Normal over 2 action dimensions via ``NormalParamExtractor``) on fixed states,
float64 where numbers are compared.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import ot
import pytest
import torch
from hydra import compose, initialize_config_dir
from tensordict import TensorDict
from tensordict.nn import TensorDictModule
from torch import nn
from torch.distributions import Normal
from torchrl.modules import NormalParamExtractor, ProbabilisticActor, ValueOperator

from torchrl_ot import BGPGLoss, EntropicWassersteinDual
from torchrl_ot.training import algorithm_class, check_config

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "recipes" / "conf" / "train"
OBS = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [-1.0, 0.5], [0.3, -0.7]], dtype=torch.float64)
F64 = torch.float64


def _actor(seed: int = 0) -> ProbabilisticActor:
    torch.manual_seed(seed)
    net = TensorDictModule(nn.Sequential(nn.Linear(2, 4).double(), NormalParamExtractor()), ["observation"],
                           ["loc", "scale"])
    return ProbabilisticActor(net, in_keys=["loc", "scale"], distribution_class=Normal)


def _loss(**kwargs) -> BGPGLoss:
    critic = ValueOperator(nn.Linear(2, 1).double(), in_keys=["observation"])
    kwargs = {"action_dim": 2, "num_action_samples": 3, "num_features": 4, "feature_bandwidth": 0.7,
              "functional": False, "generator": torch.Generator().manual_seed(1), **kwargs}
    return BGPGLoss(_actor(), critic, **kwargs)


def _data(seed: int = 0) -> TensorDict:
    g = torch.Generator().manual_seed(seed)
    n = OBS.shape[0]
    return TensorDict({"observation": OBS, "action": torch.randn(n, 2, generator=g, dtype=F64),
                       "action_log_prob": torch.randn(n, generator=g, dtype=F64) - 2,
                       "advantage": torch.randn(n, 1, generator=g, dtype=F64),
                       "value_target": torch.randn(n, 1, generator=g, dtype=F64),
                       "old_action_samples": torch.randn(n, 3, 2, generator=g, dtype=F64)}, batch_size=[n])


def _features(dual: EntropicWassersteinDual, z: torch.Tensor) -> torch.Tensor:
    """phi(z) = sqrt(2/D) cos(Omega z + b), written out coordinate by coordinate."""
    D = dual.omega.shape[0]
    proj = torch.stack([sum(dual.omega[k, i] * z[..., i] for i in range(z.shape[-1])) + dual.bias[k]
                        for k in range(D)], -1)
    return (2.0 / D) ** 0.5 * torch.cos(proj)


def _dual_integrand(dual, p1, p2, x, y, gamma):
    """Per state: mean_m [f(x_m) + g(y_m) - gamma exp((f + g - ||x_m - y_m||^2) / gamma)]."""
    f = (p1[:, None, :] * _features(dual, x)).sum(-1)
    g = (p2[:, None, :] * _features(dual, y)).sum(-1)
    c = ((x - y) ** 2).sum(-1)
    return (f + g - gamma * torch.exp((f + g - c) / gamma)).mean(-1)


# ------------------------------------------------------------------------------------------------
# 1. the random-feature dual


def test_random_features_approximate_the_gaussian_kernel_of_that_bandwidth():
    dual = EntropicWassersteinDual(2, num_features=20000, bandwidth=0.5, generator=torch.Generator().manual_seed(0),
                                   dtype=F64)
    x = torch.tensor([[0.0, 0.0], [0.3, -0.2], [0.5, 0.5], [1.0, 0.0]], dtype=F64)
    approx = dual.features(x) @ dual.features(x).T
    exact = torch.exp(-torch.cdist(x, x) ** 2 / (2 * 0.5**2))
    torch.testing.assert_close(approx, exact, atol=0.03, rtol=0)


@pytest.mark.parametrize("gamma", [1.0, 0.3])
def test_ascent_step_is_the_gradient_of_each_states_dual_objective(gamma):
    dual = EntropicWassersteinDual(2, num_features=4, bandwidth=0.7, smoothing=gamma,
                                   generator=torch.Generator().manual_seed(2), dtype=F64)
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(5, 3, 2, generator=g, dtype=F64), torch.randn(5, 3, 2, generator=g, dtype=F64)
    p1, p2 = torch.randn(5, 4, generator=g, dtype=F64), torch.randn(5, 4, generator=g, dtype=F64)
    new1, new2 = dual.ascent_step(p1, p2, x, y, lr=0.05)
    q1, q2 = p1.clone().requires_grad_(True), p2.clone().requires_grad_(True)
    # Each state's J_i depends on its own vectors only: the gradient of sum_i J_i is each state's own gradient.
    d1, d2 = torch.autograd.grad(_dual_integrand(dual, q1, q2, x, y, gamma).sum(), [q1, q2])
    torch.testing.assert_close(new1, p1 + 0.05 * d1, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(new2, p2 + 0.05 * d2, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(dual.estimate(p1, p2, x, y), _dual_integrand(dual, p1, p2, x, y, gamma))
    # ... and ascent: a small step raises every state's objective
    assert bool((dual.estimate(new1, new2, x, y) > dual.estimate(p1, p2, x, y)).all())


@pytest.mark.parametrize("gamma", [1.0, 0.5])
def test_dual_objective_against_pots_exact_entropic_transport(gamma):
    # Empirical measures of 6 and 7 points: POT's Sinkhorn gives the entropic plan pi and its scalings u, v; the
    # exact potentials f = gamma log(u / a), g = gamma log(v / b) must attain OT_gamma - gamma in our dual
    # objective, and any random-feature potentials stay below it (weak duality).
    dual = EntropicWassersteinDual(2, num_features=16, bandwidth=0.5, smoothing=gamma,
                                   generator=torch.Generator().manual_seed(0), dtype=F64)
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(6, 2)), rng.normal(size=(7, 2)) + 0.5
    a, b = np.full(6, 1 / 6), np.full(7, 1 / 7)
    C = ot.dist(x, y)  # squared Euclidean
    pi, log = ot.sinkhorn(a, b, C, reg=gamma, log=True, stopThr=1e-14, numItermax=100000)
    primal = float((pi * C).sum() + gamma * (pi * np.log(pi / np.outer(a, b))).sum())
    f, g = (torch.tensor(gamma * np.log(log[k] / w)) for k, w in (("u", a), ("v", b)))
    value = dual.objective(f[:, None], g[None, :], torch.tensor(C)).mean()  # the product measure a x b, all pairs
    assert float(value) + gamma == pytest.approx(primal, rel=1e-9, abs=1e-10)
    X, Y = torch.tensor(x), torch.tensor(y)
    for seed in range(5):
        p = torch.randn(2, 16, generator=torch.Generator().manual_seed(seed), dtype=F64)
        rff = dual.objective((dual.features(X) @ p[0])[:, None], (dual.features(Y) @ p[1])[None, :], torch.tensor(C))
        assert float(rff.mean()) + gamma <= primal + 1e-12


# ------------------------------------------------------------------------------------------------
# 2. the loss: surrogate, dual ascent, penalty and its gradient


def test_loss_equals_hand_computation_with_its_dual_steps_and_gradient():
    loss = _loss(dual_steps=2, dual_lr=0.3, penalty_coeff=0.7, clip_epsilon=0.2)
    td = _data()
    n, M, gamma = 5, 3, 1.0
    p0 = torch.randn(2, n, 4, generator=torch.Generator().manual_seed(5), dtype=F64)
    loss.duals = p0.clone()
    torch.manual_seed(11)
    out = loss(td)
    out["loss_wasserstein"].backward()
    grads = [p.grad.clone() for p in loss.actor_network.parameters()]

    # The same draws by hand: T=2 fresh sample() of pi_theta for the ascent, then rsample() for the estimate.
    actor = loss.actor_network
    params = list(actor.parameters())
    loc, scale = actor.module[0](td.select("observation"))["loc"], actor.module[0](td.select("observation"))["scale"]
    torch.manual_seed(11)
    with torch.no_grad():
        fresh = Normal(loc, scale).sample((2, M))  # [T, M, n, d]
    xi = (Normal(loc, scale).rsample((M,)) - loc) / scale  # the estimate's noise
    old = td["old_action_samples"]
    p1, p2 = p0[0], p0[1]
    for t in range(2):
        x = fresh[t].transpose(0, 1)
        f = (p1[:, None] * _features(loss.dual, x)).sum(-1)
        g = (p2[:, None] * _features(loss.dual, old)).sum(-1)
        w = 1 - torch.exp((f + g - ((x - old) ** 2).sum(-1)) / gamma)
        p1, p2 = (p1 + 0.3 * (w[..., None] * _features(loss.dual, x)).mean(1),
                  p2 + 0.3 * (w[..., None] * _features(loss.dual, old)).mean(1))
    torch.testing.assert_close(loss.duals, torch.stack([p1, p2]), rtol=1e-12, atol=1e-14)

    def penalty(weight, bias):
        h = OBS @ weight.T + bias
        # NormalParamExtractor's default scale map: softplus(x + inv_softplus(0.99)) + 0.01 (1.0 at x = 0), its
        # shift rounded through float32 by tensordict
        shift = float(torch.tensor(math.log(math.expm1(0.99)), dtype=torch.float32))
        mean, sd = h[:, :2], nn.functional.softplus(h[:, 2:] + shift) + 0.01
        x = (mean + sd * xi.detach()).transpose(0, 1)  # [n, M, d]
        return 0.7 * _dual_integrand(loss.dual, p1, p2, x, old, gamma).mean()

    weight, bias = (p.detach().clone().requires_grad_(True) for p in params)
    hand = penalty(weight, bias)
    torch.testing.assert_close(out["loss_wasserstein"].detach(), hand.detach(), rtol=1e-12, atol=1e-14)
    for got, want in zip(grads, torch.autograd.grad(hand, [weight, bias]), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-13)
    torch.testing.assert_close(out["wasserstein"], hand.detach() / 0.7)

    # the surrogate: PPO's pessimistic clip on the per-minibatch standardised advantages; the critic's l2
    adv = td["advantage"].reshape(-1)
    adv = (adv - adv.mean()) / (adv.std(unbiased=False) + 1e-8)
    ratio = torch.exp(Normal(loc, scale).log_prob(td["action"]).sum(-1) - td["action_log_prob"]).detach()
    surrogate = torch.minimum(ratio * adv, ratio.clamp(0.8, 1.2) * adv).mean()
    torch.testing.assert_close(out["loss_objective"], -surrogate, rtol=1e-12, atol=1e-14)
    value = loss.critic_network(td.select("observation"))["state_value"]
    torch.testing.assert_close(out["loss_critic"], 0.25 * ((value - td["value_target"]) ** 2).mean())
    torch.testing.assert_close(out["kl_approx"], 0.5 * (torch.log(ratio) ** 2).mean())


def test_start_batch_draws_the_stored_behaviour_and_clears_the_duals():
    loss = _loss()
    td = _data().exclude("old_action_samples")
    td["loc"] = torch.full((5, 2), 3.0, dtype=F64)  # a behaviour far from the current actor
    td["scale"] = torch.full((5, 2), 1e-6, dtype=F64)
    loss.duals = torch.ones(2, 5, 4, dtype=F64)
    loss.start_batch(td)
    assert td["old_action_samples"].shape == (5, 3, 2)
    torch.testing.assert_close(td["old_action_samples"], torch.full((5, 3, 2), 3.0, dtype=F64), atol=1e-4, rtol=0)
    assert loss.duals is None
    loss(td[:2])  # rows 0-1 ascend from zero; the next call's longer minibatch keeps them and adds zero rows
    first = loss.duals.clone()
    assert first.shape == (2, 2, 4) and bool(first.abs().sum() > 0)
    state = _loss(dual_warm_start="state")
    state.start_batch(td)
    assert td["dual_index"].tolist() == [0, 1, 2, 3, 4] and state.duals.shape == (2, 5, 4)
    state(td[torch.tensor([3, 1])])  # only frames 3 and 1 move
    moved = state.duals.abs().sum((0, 2)) > 0
    assert moved.tolist() == [False, True, False, True, False]


def test_minibatch_duals_with_zero_steps_and_zero_penalty_leave_plain_surrogate():
    loss = _loss(dual_steps=0, penalty_coeff=0.0, clip_epsilon=None)
    td = _data()
    out = loss(td)
    assert float(out["loss_wasserstein"]) == 0.0 and float(out["clip_fraction"]) == 0.0
    assert bool((loss.duals == 0).all())  # no ascent step: the vectors stay at zero
    # zero potentials: W estimate = -gamma mean exp(-c / gamma) < 0
    assert float(out["wasserstein"]) < 0


# ------------------------------------------------------------------------------------------------
# 3. contracts and the recipe's config


@pytest.mark.parametrize(("kwargs", "match"), [({"num_features": 0}, "num_features"),
                                               ({"feature_bandwidth": 0.0}, "bandwidth"),
                                               ({"smoothing": -1.0}, "smoothing"),
                                               ({"num_action_samples": 0}, "num_action_samples"),
                                               ({"dual_steps": -1}, "dual_steps"),
                                               ({"dual_warm_start": "episode"}, "dual_warm_start"),
                                               ({"clip_epsilon": 0.0}, "clip_epsilon"),
                                               ({"penalty_coeff": math.nan}, "penalty_coeff")])
def test_loss_refuses_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        _loss(**kwargs)


def test_loss_refuses_missing_or_misshapen_behaviour_samples():
    loss = _loss()
    with pytest.raises(ValueError, match="old_action_samples.*start_batch"):
        loss(_data().exclude("old_action_samples"))
    bad = _data()
    bad["old_action_samples"] = torch.zeros(5, 4, 2, dtype=F64)  # M = 4, not 3
    with pytest.raises(ValueError, match="old_action_samples"):
        loss(bad)
    with pytest.raises(ValueError, match="start_batch"):
        _loss(dual_warm_start="state")(_data())  # no dual_index


def _cfg(*overrides: str):
    with initialize_config_dir(config_dir=str(CONF), version_base=None):
        return compose("config", overrides=["env=Pendulum-v1", "algo=bgpg", *overrides])


def test_config_defaults_pass_and_are_the_codes():
    cfg = _cfg()
    check_config(cfg)
    algo = cfg.algo
    assert (algo.penalty_coeff, algo.num_action_samples, algo.num_features, algo.feature_bandwidth, algo.smoothing,
            algo.dual_steps, algo.dual_lr) == (0.1, 10, 100, 0.1, 1.0, 25, 0.05)


@pytest.mark.parametrize(("override", "match"), [("+algo.num_feature=50", r"unknown algo option.*num_feature"),
                                                 ("algo.num_features=0", "algo.num_features"),
                                                 ("algo.feature_bandwidth=0", "algo.feature_bandwidth"),
                                                 ("algo.smoothing=-1", "algo.smoothing"),
                                                 ("algo.dual_warm_start=episode", "algo.dual_warm_start"),
                                                 ("algo.num_action_samples=1.5", "algo.num_action_samples"),
                                                 ("algo.dual_steps=-1", "algo.dual_steps"),
                                                 ("algo.normalize_advantage=maybe", "algo.normalize_advantage")])
def test_config_refuses_bad_input_naming_the_key(override, match):
    with pytest.raises(ValueError, match=match):
        check_config(_cfg(override))


def test_refuses_discrete_actions():
    cfg = _cfg("env=CartPole-v1")
    with pytest.raises(ValueError, match="continuous-action baseline"):
        algorithm_class("bgpg")(cfg, "bgpg", True, None, None, None)


def test_recipe_runs_bgpg_on_pendulum(tmp_path):
    cmd = [sys.executable, str(ROOT / "recipes" / "train.py"), "progress=false", "env=Pendulum-v1", "algo=bgpg",
           "total_frames=512", "frames_per_batch=256", "num_envs=4", "num_epochs=1", "num_minibatches=2",
           "eval_every=512", "eval_episodes=1", "checkpoint_every=512", "algo.dual_steps=3",
           f"hydra.run.dir={tmp_path}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["algo"] == "bgpg" and summary["frames"] == 512 and math.isfinite(summary["final_return"])
    updates = torch.load(tmp_path / "checkpoint.pt", weights_only=False)["updates"]
    assert len(updates) == 2 and all(math.isfinite(u["wasserstein"]) and u["wasserstein"] < 0 for u in updates)
