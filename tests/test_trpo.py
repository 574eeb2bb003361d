"""TRPOLoss: the natural-gradient step against an exact Fisher matrix, the trust region, rejection, contracts.

Tiny ``Linear(2, 2)`` actors (Categorical logits, or Normal / TanhNormal via ``NormalParamExtractor``) on a
handful of fixed states; float64 where numbers are compared to a direct solve.
"""

from __future__ import annotations

import copy

import pytest
import torch
from tensordict import TensorDict
from tensordict.nn import TensorDictModule
from torch import nn
from torch.distributions import Categorical, Normal, kl_divergence
from torchrl.envs.utils import ExplorationType, set_exploration_type
from torchrl.modules import NormalParamExtractor, ProbabilisticActor, TanhNormal, ValueOperator
from torchrl.objectives.utils import ValueEstimators

import torchrl_ot.trpo as trpo
from torchrl_ot.trpo import (
    TRPOLoss,
    conjugate_gradient,
    fisher_vector_product,
    flat_grad,
    get_flat_params,
    set_flat_params,
)

DISTS = [Categorical, Normal, TanhNormal]
OBS = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [-1.0, 0.5], [0.3, -0.7]])


def _actor(dist=Categorical, dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    lin = nn.Linear(2, 2).to(dtype)
    if dist is Categorical:
        net = TensorDictModule(lin, ["observation"], ["logits"])
        return ProbabilisticActor(net, in_keys=["logits"], distribution_class=dist)
    net = TensorDictModule(nn.Sequential(lin, NormalParamExtractor()), ["observation"], ["loc", "scale"])
    return ProbabilisticActor(net, in_keys=["loc", "scale"], distribution_class=dist)


def _loss(actor, **kwargs):
    critic = ValueOperator(nn.Linear(2, 1).to(next(actor.parameters()).dtype), in_keys=["observation"])
    return TRPOLoss(actor, critic, **kwargs)


def _data(dist=Categorical, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = OBS.shape[0]
    action = torch.randint(2, (n,), generator=g) if dist is Categorical else torch.rand(n, 1, generator=g) * 1.6 - 0.8
    adv = torch.randn(n, 1, generator=g, dtype=dtype)
    return TensorDict({"observation": OBS.to(dtype), "action": action if dist is Categorical else action.to(dtype),
                       "advantage": adv - adv.mean(), "value_target": torch.randn(n, 1, generator=g, dtype=dtype)},
                      batch_size=[n])


def _dist_at(actor, theta, td):
    """pi_theta for a flat parameter vector, differentiable in it (the actor's own parameters are put back after)."""
    params = TensorDict.from_module(actor).apply(torch.Tensor.detach)  # a new structure, same key order
    keys = list(params.keys(True, True))
    for key, chunk in zip(keys, theta.split([params.get(k).numel() for k in keys]), strict=True):
        params.set(key, chunk.view_as(params.get(key)))
    with params.to_module(actor):
        return actor.get_dist(td.select("observation").copy())


def _surrogate_and_kl(actor, theta, theta_old, td):
    old, new = _dist_at(actor, theta_old.detach(), td), _dist_at(actor, theta, td)
    action = td["action"]
    lp = lambda d: d.log_prob(action).reshape(len(td), -1).sum(-1)
    surrogate = (torch.exp(lp(new) - lp(old).detach()) * td["advantage"].reshape(-1)).mean()
    return surrogate, kl_divergence(old, new).reshape(len(td), -1).sum(-1).mean()


def _params(loss):
    return [p.detach().clone() for p in loss.actor_network_params.values(True, True)]


# ------------------------------------------------------------------------------------------------
# 1. the conjugate-gradient step equals (F + damping I)^-1 g solved directly, F the exact Fisher


@pytest.mark.parametrize("dist", [Categorical, Normal])
def test_cg_step_matches_direct_solve_with_exact_fisher(dist):
    actor, td = _actor(dist), _data(dist)
    reference = copy.deepcopy(actor)
    theta_old = get_flat_params(list(reference.parameters()))
    n, damping, max_kl = theta_old.numel(), 0.1, 1e-5
    # Exact Fisher: the Hessian of mean KL(pi_old || pi_theta) at theta_old, built explicitly.
    F = torch.autograd.functional.hessian(lambda t: _surrogate_and_kl(reference, t, theta_old, td)[1], theta_old)
    A = F + damping * torch.eye(n, dtype=F.dtype)
    theta = theta_old.clone().requires_grad_(True)
    g = torch.autograd.grad(_surrogate_and_kl(reference, theta, theta_old, td)[0], theta)[0]
    x_direct = torch.linalg.solve(A, g)

    # The pure functions: CG with double-backprop Fisher-vector products, n iterations.
    surrogate, kl = _surrogate_and_kl(reference, theta, theta_old, td)
    x_cg = conjugate_gradient(fisher_vector_product(kl, [theta], damping), g, n, residual_tol=0.0)
    torch.testing.assert_close(x_cg, x_direct, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(flat_grad(surrogate, [theta]), g)

    # End to end: actor_step applies s = sqrt(2 max_kl / x.Ax) x (a tiny radius: accepted at once).
    loss = _loss(actor, max_kl=max_kl, cg_iters=n, cg_damping=damping)
    info = loss.actor_step(td)
    assert bool(info["step_accepted"]) and int(info["backtracks"]) == 0
    step = torch.sqrt(2 * max_kl / (x_direct @ A @ x_direct)) * x_direct
    torch.testing.assert_close(get_flat_params(loss._actor_params()) - theta_old, step, rtol=1e-6, atol=1e-10)
    torch.testing.assert_close(info["step_norm"], step.norm(), rtol=1e-6, atol=0)


def test_kl_hessian_is_the_score_function_fisher():
    # For a categorical policy the Fisher is exactly mean_s sum_a pi(a|s) score score^T: F above is the Fisher.
    actor, td = _actor(Categorical), _data(Categorical)
    theta_old = get_flat_params(list(actor.parameters()))
    F = torch.autograd.functional.hessian(lambda t: _surrogate_and_kl(actor, t, theta_old, td)[1], theta_old)
    theta = theta_old.clone().requires_grad_(True)
    dist = _dist_at(actor, theta, td)
    fisher = torch.zeros_like(F)
    for s in range(len(td)):
        for a in range(2):
            score = torch.autograd.grad(dist.log_prob(torch.full((len(td),), a))[s], theta, retain_graph=True)[0]
            fisher += dist.probs[s, a].detach() * torch.outer(score, score) / len(td)
    torch.testing.assert_close(F, fisher, rtol=1e-10, atol=1e-12)


def test_conjugate_gradient_solves_spd_system():
    M = torch.randn(6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    A, b = M @ M.T + 0.5 * torch.eye(6, dtype=torch.float64), torch.arange(1.0, 7.0, dtype=torch.float64)
    torch.testing.assert_close(conjugate_gradient(lambda v: A @ v, b, 6, 0.0), torch.linalg.solve(A, b))


# ------------------------------------------------------------------------------------------------
# 2. the trust region holds and the surrogate improves


@pytest.mark.parametrize("dist", DISTS)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_actor_step_respects_max_kl_and_improves(dist, seed):
    actor, td, max_kl = _actor(dist, seed=seed), _data(dist, seed=seed), 0.02
    reference = copy.deepcopy(actor)
    theta_old = get_flat_params(list(reference.parameters()))
    loss = _loss(actor, max_kl=max_kl)
    info = loss.actor_step(td)
    theta = get_flat_params(loss._actor_params())
    with torch.no_grad():
        surrogate, kl = _surrogate_and_kl(reference, theta, theta_old, td)
        surrogate_old, _ = _surrogate_and_kl(reference, theta_old, theta_old, td)
    assert bool(info["step_accepted"])  # a generic batch: some step must be acceptable
    assert kl <= max_kl and surrogate > surrogate_old
    torch.testing.assert_close(info["kl"], kl)
    torch.testing.assert_close(info["improvement"], surrogate - surrogate_old)
    out = loss(td)  # forward compares with the stored behaviour policy: none stored here -> current = pi_new
    assert out["kl"] == 0


# ------------------------------------------------------------------------------------------------
# 3. a rejected step leaves the parameters bit-for-bit unchanged


def test_zero_advantage_step_is_rejected():
    loss, td = _loss(_actor(Normal)), _data(Normal)
    td["advantage"] = torch.zeros_like(td["advantage"])
    before = _params(loss)
    info = loss.actor_step(td)
    assert not bool(info["step_accepted"]) and info["improvement"] == 0 and info["step_norm"] == 0
    assert int(info["backtracks"]) == 0  # zero gradient: no line search at all
    assert all(torch.equal(a, b) for a, b in zip(before, _params(loss), strict=True))


def test_failed_line_search_restores_parameters_exactly(monkeypatch):
    # Good actions near the mean, bad ones far away: the step shrinks the scale, where the KL grows much
    # faster than its quadratic model. With a single try and no slack, the full step is refused.
    actor = _actor(Normal, dtype=torch.float32)
    obs = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [-1.0, 0.5]])
    td = TensorDict({"observation": obs, "action": torch.tensor([[0.05], [-0.05], [2.5], [-2.5]]),
                     "advantage": torch.tensor([[1.0], [1.0], [-1.0], [-1.0]])}, batch_size=[4])
    loss = _loss(actor, max_kl=1.0, backtrack_iters=1, cg_iters=6, cg_damping=0.0)
    writes = []
    monkeypatch.setattr(trpo, "set_flat_params", lambda p, f: (writes.append(f.clone()), set_flat_params(p, f)))
    before = _params(loss)
    info = loss.actor_step(td)
    assert not bool(info["step_accepted"]) and int(info["backtracks"]) == 1
    assert len(writes) == 2 and not torch.equal(writes[0], writes[1])  # a candidate was tried, then undone
    assert all(torch.equal(a, b) for a, b in zip(before, _params(loss), strict=True))
    # With room to backtrack, the same batch gives an accepted step inside the region.
    loss.backtrack_iters = 10
    info = loss.actor_step(td)
    assert bool(info["step_accepted"]) and int(info["backtracks"]) > 0 and info["kl"] <= 1.0


@pytest.mark.parametrize("error", [ValueError, RuntimeError])
def test_error_in_line_search_restores_parameters(monkeypatch, error):
    # A candidate whose evaluation fails (ValueError: torch's check of invalid distribution parameters) is
    # rejected; any other error propagates, but never leaves a candidate in place.
    loss, td = _loss(_actor(Normal)), _data(Normal)
    objective = loss._objective

    def failing(*args, **kwargs):
        if not torch.is_grad_enabled():  # the line search evaluates candidates under no_grad
            raise error("boom")
        return objective(*args, **kwargs)

    monkeypatch.setattr(loss, "_objective", failing)
    before = _params(loss)
    if error is ValueError:
        assert not bool(loss.actor_step(td)["step_accepted"])
    else:
        with pytest.raises(RuntimeError, match="boom"):
            loss.actor_step(td)
    assert all(torch.equal(a, b) for a, b in zip(before, _params(loss), strict=True))


# ------------------------------------------------------------------------------------------------
# 4. keys, gradient isolation, bad input, functional, entropy, smoke training


def test_keys_and_set_keys():
    loss = _loss(_actor(Normal, dtype=torch.float32), entropy_coeff=0.01)
    assert loss.tensor_keys.sample_log_prob == "action_log_prob"
    for key in ["observation", "action", ("next", "reward"), ("next", "done"), ("next", "observation")]:
        assert key in loss.in_keys
    assert loss.out_keys == ["loss_objective", "loss_critic", "kl", "entropy"]
    td = _data(Normal, dtype=torch.float32)
    assert set(loss(td).keys()) == set(loss.out_keys)
    loss.make_value_estimator(ValueEstimators.GAE, gamma=0.9, lmbda=0.9)
    loss.set_keys(advantage="adv2", value_target="vt2")
    assert loss.value_estimator.tensor_keys.advantage == "adv2"  # forwarded to the estimator
    td = td.rename_key_("advantage", "adv2").rename_key_("value_target", "vt2")
    # No ("next", ...) entries: had the loss ignored "adv2" it would run the estimator and fail.
    assert torch.isfinite(loss(td)["loss_objective"]) and bool(loss.actor_step(td)["step_accepted"])
    with pytest.raises(ValueError, match="not an accepted"):
        loss.set_keys(advantages="x")


def test_value_estimator_runs_when_advantage_is_missing():
    loss, td = _loss(_actor(Categorical, dtype=torch.float32)), _data(Categorical, dtype=torch.float32)
    td = td.exclude("advantage", "value_target")
    td["next"] = TensorDict({"observation": OBS.flip(0), "reward": torch.randn(5, 1),
                             "done": torch.zeros(5, 1, dtype=torch.bool),
                             "terminated": torch.zeros(5, 1, dtype=torch.bool)}, batch_size=[5])
    loss.make_value_estimator(ValueEstimators.TD0, gamma=0.9)
    assert torch.isfinite(loss(td)["loss_critic"]) and "advantage" not in td.keys()  # input not mutated
    assert bool(loss.actor_step(td)["step_accepted"])


def test_gradient_isolation():
    loss, td = _loss(_actor(Normal)), _data(Normal)
    out = loss(td)
    out["loss_critic"].backward(retain_graph=True)
    assert all(p.grad is None for p in loss.actor_network_params.values(True, True))
    assert all(p.grad is not None and bool(p.grad.any()) for p in loss.critic_network_params.values(True, True))
    loss.zero_grad(set_to_none=True)
    out["loss_objective"].backward()
    assert all(p.grad is None for p in loss.critic_network_params.values(True, True))
    assert any(p.grad is not None and bool(p.grad.any()) for p in loss.actor_network_params.values(True, True))


@pytest.mark.parametrize("kwargs", [{"max_kl": 0.0}, {"max_kl": -1.0}, {"max_kl": float("nan")}, {"cg_iters": 0},
                                    {"cg_damping": -0.1}, {"backtrack_iters": 0}, {"backtrack_coeff": 1.0},
                                    {"loss_critic_type": "l3"}, {"reduction": "max"}])
def test_bad_configuration(kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        _loss(_actor(), **kwargs)


@pytest.mark.parametrize("key", ["advantage", "observation"])
def test_nan_input_is_refused_without_touching_parameters(key):
    loss, td = _loss(_actor(Normal)), _data(Normal)
    td[key][1] = float("nan")
    before = _params(loss)
    with pytest.raises(ValueError, match="NaN"):
        loss.actor_step(td)
    with pytest.raises(ValueError, match="NaN"):
        loss(td)
    assert all(torch.equal(a, b) for a, b in zip(before, _params(loss), strict=True))


def test_non_finite_gradient_is_refused_without_touching_parameters():
    # Finite inputs, but a stored behaviour log-prob of -1e4 overflows the importance ratio: g is not finite.
    loss, td = _loss(_actor(Normal)), _data(Normal)
    td["action_log_prob"] = torch.full((len(td),), -1e4, dtype=torch.float64)
    before = _params(loss)
    with pytest.raises(ValueError, match="gradient"):
        loss.actor_step(td)
    assert all(torch.equal(a, b) for a, b in zip(before, _params(loss), strict=True))


def test_functional_and_stateful_agree():
    td = _data(TanhNormal)
    losses = [_loss(_actor(TanhNormal), functional=f) for f in (True, False)]
    infos = [loss.actor_step(td) for loss in losses]
    assert all(bool(i["step_accepted"]) for i in infos)
    torch.testing.assert_close(*[get_flat_params(loss._actor_params()) for loss in losses], rtol=0, atol=0)


def test_entropy_bonus_with_monte_carlo_entropy():
    # TanhNormal has no analytic entropy: the bonus uses one draw common to all line-search candidates.
    loss, td = _loss(_actor(TanhNormal), entropy_coeff=0.5), _data(TanhNormal)
    td["advantage"] = torch.zeros_like(td["advantage"])  # the entropy alone drives the step
    info = loss.actor_step(td)
    assert bool(info["step_accepted"]) and info["improvement"] > 0 and info["kl"] <= loss.max_kl
    assert torch.isfinite(loss(td)["entropy"])


def test_smoke_training_contextual_bandit():
    # Two contexts (one-hot), three arms; the best arm differs per context.
    torch.manual_seed(0)
    rewards = torch.tensor([[0.0, 1.0, 0.2], [1.0, 0.0, 0.5]])
    obs = torch.eye(2)
    net = TensorDictModule(nn.Linear(2, 3), ["observation"], ["logits"])
    actor = ProbabilisticActor(net, in_keys=["logits"], distribution_class=Categorical, return_log_prob=True)
    loss = _loss(actor, max_kl=0.05)
    expected = lambda: float((torch.softmax(net.module(obs), -1) * rewards).sum(-1).mean().detach())
    start = expected()
    for _ in range(4):
        with torch.no_grad(), set_exploration_type(ExplorationType.RANDOM):  # sample, not the mode
            td = actor(TensorDict({"observation": obs.repeat(32, 1)}, batch_size=[64]))
        r = rewards[td["observation"].argmax(-1), td["action"]]
        td["advantage"] = (r - r.mean()).unsqueeze(-1)
        info = loss.actor_step(td)
        assert info["kl"] <= 0.05
    assert expected() > start + 0.2
