"""The Gaussian OT loss with a learned std (``learn_scale``): the spread's surrogate by hand, gradient isolation
(the hinge alone moves the mean, the spread term alone the std), the std's transport against its closed form
(W2^2 of diagonal Gaussians through the tanh), and the refusals."""

from __future__ import annotations

import math

import pytest
import torch
from tensordict import TensorDict
from tensordict.nn import AddStateIndependentNormalScale, TensorDictModule
from torch import nn
from torchrl.modules import IndependentNormal, ProbabilisticActor, TanhNormal, ValueOperator

from torchrl_ot.costs import EuclideanCost, L1Cost
from torchrl_ot.loss import OTTrustRegionLoss

OBS, ACT = 3, 2


def _actor(dist_class, **dist_kwargs):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(OBS, ACT), AddStateIndependentNormalScale(ACT, init_value=math.log(0.7)))
    return ProbabilisticActor(TensorDictModule(net, ["observation"], ["loc", "scale"]), in_keys=["loc", "scale"],
                              distribution_class=dist_class, distribution_kwargs=dist_kwargs or None)


def _loss(actor, learn_scale, epsilon=0.05, cost=None, **kwargs):
    critic = ValueOperator(nn.Linear(OBS, 1), in_keys=["observation"])
    return OTTrustRegionLoss(actor, critic, cost=cost or EuclideanCost(), epsilon=epsilon, learn_scale=learn_scale,
                             functional=False, **kwargs)


def _batch(n=32):
    g = torch.Generator().manual_seed(5)
    return TensorDict({"observation": torch.randn(n, OBS, generator=g), "action": torch.rand(n, ACT, generator=g) - 0.5,
                       "advantage": torch.randn(n, 1, generator=g), "value_target": torch.zeros(n, 1)}, [n])


def _log_std(actor):
    return next(p for name, p in actor.named_parameters() if name.endswith("state_independent_scale"))


@pytest.mark.parametrize("clip", [0.2, 0.05])
def test_spread_surrogate_equals_a_hand_computation(clip):
    actor = _actor(IndependentNormal)
    with_spread, hinge_only = _loss(actor, True, scale_clip=clip), _loss(actor, False)
    td = _batch()
    with_spread.solve_multiplier(td)
    with torch.no_grad():
        _log_std(actor).add_(torch.tensor([0.3, -0.2]))  # the std alone moves; the mean stays pi_old's
    diff = with_spread(td.clone())["loss_objective"] - hinge_only(td.clone())["loss_objective"]
    # By hand, with torch.distributions.Normal: r = N(a; loc_old, s_new) / N(a; loc_old, s_old), summed dims.
    new_scale = torch.exp(torch.tensor(math.log(0.7)) + torch.tensor([0.3, -0.2]))
    a, loc, s_old = td["action"], td["loc"], td["scale"]
    log_r = (torch.distributions.Normal(loc, new_scale).log_prob(a)
             - torch.distributions.Normal(loc, s_old).log_prob(a)).sum(-1)
    r, adv = log_r.exp(), td["advantage"].squeeze(-1)
    want = torch.minimum(r * adv, r.clamp(1 - clip, 1 + clip) * adv).mean()
    assert float(-diff) == pytest.approx(float(want), rel=1e-5)


def test_the_hinge_moves_the_mean_and_the_spread_term_the_std():
    grads = {}
    for learn in (False, True):
        actor = _actor(TanhNormal, low=-2.0, high=2.0)
        loss = _loss(actor, learn)
        td = _batch()
        loss.solve_multiplier(td)
        with torch.no_grad():  # away from pi_old so the hinge and the ratio both have gradients
            for p in actor.parameters():
                p.add_(0.05)
        loss(td)["loss_objective"].backward()
        grads[learn] = {name: None if p.grad is None else p.grad.clone() for name, p in actor.named_parameters()}
    for name, g in grads[False].items():
        if name.endswith("state_independent_scale"):  # the paper's fixed std: no gradient without learn_scale
            assert g is None or torch.count_nonzero(g) == 0
            assert torch.count_nonzero(grads[True][name]) == ACT
        else:  # the mean's parameters: the hinge's gradient, the same with or without the spread term
            torch.testing.assert_close(grads[True][name], g, rtol=1e-6, atol=1e-7)
            assert torch.count_nonzero(g) > 0


def test_the_std_s_transport_is_the_closed_form_w2():
    actor = _actor(TanhNormal, low=-2.0, high=2.0)
    loss = _loss(actor, True)
    td = _batch()
    loss.solve_multiplier(td)
    step = torch.tensor([0.25, -0.4])
    with torch.no_grad():
        _log_std(actor).add_(step)
    s0 = torch.tensor(0.7, dtype=torch.float64)
    s1 = s0 * step.double().exp()
    want = (2.0**2 * (s1 - s0) ** 2).sum()  # L = (high - low) / 2 = 2; the loc did not move; the same at every state
    assert loss.realised_transport(td).item() == pytest.approx(want.item(), rel=1e-6)
    # The projection counts it: a radius below it undoes or shortens the step, never keeps it outside.
    loss.epsilon = 0.5 * want.item()
    with torch.no_grad():
        _log_std(actor).sub_(step)
        theta_old = loss.actor_parameters().clone()
        _log_std(actor).add_(step)
    out = loss.project_into_trust_region(td, theta_old)
    assert out["realised_transport"].item() <= loss.epsilon
    assert 0 < out["step_fraction"].item() < 1


@pytest.mark.parametrize(("kwargs", "match"), [({"cost": L1Cost()}, "EuclideanCost"),
                                               ({"cost": EuclideanCost(p=1)}, "EuclideanCost"),
                                               ({"scale_clip": 1.5}, "scale_clip"),
                                               ({"scale_clip": True}, "scale_clip"),
                                               ({"learn_scale": 1}, "learn_scale")])
def test_learn_scale_refuses_bad_arguments(kwargs, match):
    actor = _actor(TanhNormal, low=-2.0, high=2.0)
    learn = kwargs.pop("learn_scale", True)
    with pytest.raises(ValueError, match=match):
        _loss(actor, learn, **kwargs)


def test_learn_scale_is_a_gaussian_option():
    from torch.distributions import Categorical
    actor = ProbabilisticActor(TensorDictModule(nn.Linear(OBS, 3), ["observation"], ["logits"]), in_keys=["logits"],
                               distribution_class=Categorical)
    head = TensorDictModule(nn.Linear(OBS, 3), ["observation"], ["action_advantage"])
    from torchrl_ot.costs import DiscreteMetricCost
    with pytest.raises(ValueError, match="learn_scale"):
        OTTrustRegionLoss(actor, ValueOperator(nn.Linear(OBS, 1), in_keys=["observation"]), cost=DiscreteMetricCost(),
                          epsilon=0.1, policy="categorical", advantage_network=head, learn_scale=True)
