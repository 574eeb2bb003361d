"""``natural_step``: step 5 as one natural-gradient step in the transport's metric, to the radius.

On tiny fixed networks: the direction equals a direct solve of the damped Gauss-Newton system built by hand from
the actor's Jacobian, the step is the quadratic model's length to epsilon (or a kept fraction of it), every kept
step is inside the radius and no worse on the batch's surrogate, a refused one restores theta_old bit for bit.
"""

from __future__ import annotations

import math

import pytest
import torch
from omegaconf import OmegaConf
from tensordict import TensorDict
from tensordict.nn import TensorDictModule
from torch import nn
from torch.distributions import Categorical
from torchrl.modules import NormalParamExtractor, ProbabilisticActor, TanhNormal, ValueOperator

from torchrl_ot.costs import DiscreteMetricCost, EuclideanCost
from torchrl_ot.loss import OTTrustRegionLoss
from torchrl_ot.training.algorithms import OTTrustRegion

OBS, N = 3, 32


def _loss(epsilon=0.05, cost=None, mirror=False, seed=0, normalize_advantage=True):
    torch.manual_seed(seed)
    critic = ValueOperator(nn.Linear(OBS, 1), in_keys=["observation"])
    net = TensorDictModule(nn.Sequential(nn.Linear(OBS, 4), NormalParamExtractor()), ["observation"],
                           ["loc", "scale"])
    actor = ProbabilisticActor(net, in_keys=["loc", "scale"], distribution_class=TanhNormal,
                               distribution_kwargs={"low": -2.0, "high": 2.0})
    return OTTrustRegionLoss(actor, critic, cost=cost or EuclideanCost(), epsilon=epsilon, mirror=mirror,
                             normalize_advantage=normalize_advantage)


def _batch(seed=3, sign=None):
    g = torch.Generator().manual_seed(seed)
    adv = torch.randn(N, 1, generator=g)
    if sign is not None:
        adv = sign * adv.abs()
    return TensorDict({"observation": torch.randn(N, OBS, generator=g),
                       "action": torch.rand(N, 2, generator=g) * 4 - 2, "advantage": adv,
                       "value_target": torch.zeros(N, 1)}, [N])


def _by_hand(loss, td, damping):
    """The step natural_step should take, built without its code: the hinge's gradient through the actor's
    functional form, the Gauss-Newton matrix (2/B) J^T L^2 J of the squared Euclidean W2 of (loc, scale),
    a direct linear solve, and the length at which the quadratic transport is epsilon."""
    linear = loss.actor_network.module[0].module[0]
    names = ["weight", "bias"]
    theta0 = torch.cat([getattr(linear, k).detach().reshape(-1) for k in names]).double()
    obs, action = td["observation"].double(), td["action"].double()
    adv, lam = td["advantage"].double().reshape(-1), td["ot_multiplier"].double().reshape(-1)
    loc0 = td["loc"].double()

    def loc_scale(theta):
        w, b = theta[:12].reshape(4, OBS), theta[12:]
        out = obs @ w.T + b
        loc, raw = out[:, :2], out[:, 2:]
        # NormalParamExtractor's biased softplus: 1 at 0, at least 0.01
        return loc, torch.nn.functional.softplus(raw + math.log(math.exp(0.99) - 1)) + 0.01

    def term(theta):
        loc, _ = loc_scale(theta)
        mean = 2.0 * torch.tanh(loc)  # TanhNormal on [-2, 2]: the deterministic action
        return adv - lam * ((mean - action) ** 2).sum(-1)

    # lam* is a breakpoint of the dual: the sample(s) defining it sit exactly on the hinge's kink at theta_old,
    # where rounding decides whether they count; both subgradients are right.
    at_kink = term(theta0).abs() < 1e-4
    active = term(theta0) > 0
    assert bool(at_kink.any())

    def moved(theta):  # L (loc, scale) with L = (high - low) / 2 = 2, flattened
        loc, scale = loc_scale(theta)
        return 2.0 * torch.cat([loc, scale], -1).reshape(-1)

    jac = torch.autograd.functional.jacobian(moved, theta0)  # [N * 4, 16]
    hess = 2.0 / N * jac.T @ jac
    steps = []
    for mask in (active & ~at_kink, active | at_kink):
        g = torch.autograd.functional.jacobian(lambda theta, mask=mask: (term(theta) * mask).mean(), theta0)
        x = torch.linalg.solve(hess + damping * torch.eye(len(theta0), dtype=torch.float64), g)
        steps.append(x * torch.sqrt(2 * loss.epsilon / (x @ hess @ x)))
    assert torch.allclose(loc_scale(theta0)[0], loc0, atol=1e-5)
    assert torch.allclose(loc_scale(theta0)[1], td["scale"].double(), atol=1e-5)
    return theta0, steps


@pytest.mark.parametrize("damping", [0.0, 0.1])
@pytest.mark.parametrize("epsilon", [0.01, 0.2])
def test_direction_and_length_equal_a_direct_solve(damping, epsilon):
    loss = _loss(epsilon)
    td = _batch()
    loss.solve_multiplier(td)
    theta0, steps = _by_hand(loss, td, damping)
    assert bool((td["ot_multiplier"] > 0).all())  # the radius binds: the hinge has a gradient
    info = loss.natural_step(td, cg_iters=16, cg_damping=damping)  # 16 = the actor's parameters: CG is exact
    fraction = info["step_fraction"].item()
    assert fraction > 0
    got = loss.actor_parameters().double() - theta0
    errors = [float((got - fraction * step).abs().max() / step.abs().max()) for step in steps]
    assert min(errors) < 2e-4, errors
    assert info["realised_transport"].item() <= loss.epsilon
    assert loss.realised_transport(td).item() == pytest.approx(info["realised_transport"].item())


def test_kept_step_is_inside_the_radius_and_no_worse():
    used = []
    for seed in range(4):
        for mirror in (False, True):
            loss = _loss(0.05, mirror=mirror, seed=seed)
            td = _batch(seed=seed + 10)
            loss.solve_multiplier(td)
            start = loss.surrogate(td).item()
            info = loss.natural_step(td)
            assert loss.realised_transport(td).item() <= loss.epsilon
            assert loss.surrogate(td).item() >= start
            used.append(info["realised_transport"].item() / loss.epsilon)
    # On 32 samples the surrogate can fall along the whole line (then no step); most batches take one, and the
    # model's length plus the boundary trial spend most of the radius (the epochs' fit spent 7-18% on MuJoCo).
    assert sum(u > 0.5 for u in used) >= 6, used


def test_refused_step_restores_theta_old_bit_for_bit(monkeypatch):
    loss = _loss()
    td = _batch()
    loss.solve_multiplier(td)
    theta_old = loss.actor_parameters()
    values = iter(range(100, 0, -1))  # every trial worse than the start
    monkeypatch.setattr(loss, "surrogate", lambda batch: torch.tensor(float(next(values)), dtype=torch.float64))
    info = loss.natural_step(td, max_backtracks=5)
    assert torch.equal(loss.actor_parameters(), theta_old)
    assert info["step_fraction"].item() == 0 and info["realised_transport"].item() == 0


def test_no_gradient_no_step():
    # Every advantage <= 0 (not standardised) and no mirror: the hinge is flat at 0, nothing to move toward.
    loss = _loss(0.05, normalize_advantage=False)
    td = _batch(sign=-1.0)
    loss.solve_multiplier(td)
    theta_old = loss.actor_parameters()
    info = loss.natural_step(td)
    assert torch.equal(loss.actor_parameters(), theta_old) and info["step_fraction"].item() == 0


def test_refuses_bad_input():
    loss = _loss()
    td = _batch()
    with pytest.raises(ValueError, match="solve_multiplier"):
        loss.natural_step(td.clone())  # pi_old not recorded
    loss.solve_multiplier(td)
    for kwargs, match in [({"cg_iters": 0}, "cg_iters"), ({"cg_damping": -1.0}, "cg_damping"),
                          ({"cg_damping": float("nan")}, "cg_damping"), ({"backtrack_coeff": 1.0}, "backtrack_coeff"),
                          ({"max_backtracks": -1}, "max_backtracks")]:
        with pytest.raises(ValueError, match=match):
            loss.natural_step(td, **kwargs)
    p1 = _loss(cost=EuclideanCost(p=1))
    td1 = _batch()
    p1.solve_multiplier(td1)
    with pytest.raises(ValueError, match="smooth at zero"):
        p1.natural_step(td1)
    critic = ValueOperator(nn.Linear(OBS, 1), in_keys=["observation"])
    actor = ProbabilisticActor(TensorDictModule(nn.Linear(OBS, 3), ["observation"], ["logits"]), in_keys=["logits"],
                               distribution_class=Categorical)
    head = TensorDictModule(nn.Linear(OBS, 3), ["observation"], ["action_advantage"])
    cat = OTTrustRegionLoss(actor, critic, cost=DiscreteMetricCost(), epsilon=0.05, policy="categorical",
                            advantage_network=head)
    tdc = TensorDict({"observation": torch.randn(8, OBS), "action": torch.randint(3, (8,)),
                      "advantage": torch.randn(8, 1), "value_target": torch.zeros(8, 1)}, [8])
    cat.solve_multiplier(tdc)
    with pytest.raises(ValueError, match="smooth at zero"):
        cat.natural_step(tdc)


def test_recipe_config_is_checked():
    base = {"epsilon": 0.1, "advantage_head": "in_critic", "enforce_radius": True}
    for algo, match in [({"actor_update": "adam"}, "algo.actor_update"),
                        ({"actor_update": "natural", "enforce_radius": False}, "algo.enforce_radius")]:
        with pytest.raises(ValueError, match=match):
            OTTrustRegion.check_config(OmegaConf.create({"algo": {**base, **algo}}))
    OTTrustRegion.check_config(OmegaConf.create({"algo": {**base, "actor_update": "natural"}}))


def test_with_natural_the_epochs_train_the_critic_only():
    algo = object.__new__(OTTrustRegion)
    out = {"loss_objective": torch.tensor(1.0), "loss_critic": torch.tensor(2.0), "loss_entropy": torch.tensor(4.0),
           "ot_multiplier": torch.tensor(8.0)}
    algo.natural = False
    assert algo.minibatch_loss(out).item() == 7.0
    algo.natural = True
    assert algo.minibatch_loss(out).item() == 2.0
