"""One class per policy setting: the factory, the setting-specific keywords, epsilon checked on every assignment,
and the template hooks a new setting implements."""

from __future__ import annotations

import pytest
import torch
from tensordict import TensorDict
from tensordict.nn import TensorDictModule
from torch import nn
from torch.distributions import Categorical, Normal
from torchrl.modules import NormalParamExtractor, ProbabilisticActor, ValueOperator

from torchrl_ot import (
    CategoricalOTLoss,
    DiscreteMetricCost,
    DualSolver,
    EuclideanCost,
    GaussianOTLoss,
    MassSplittingTarget,
    OTTrustRegionLoss,
    SampledOTLoss,
)
from torchrl_ot.loss.gaussian import GaussianTransportMixin

OBS, N_ACT = 3, 3
CLASSES = {"gaussian": GaussianOTLoss, "categorical": CategoricalOTLoss, "sampled": SampledOTLoss}


class _ObsAction(nn.Linear):
    """A(s, a) linear in (s, a)."""

    def __init__(self) -> None:
        super().__init__(OBS + 1, 1)

    def forward(self, observation, action):
        return super().forward(torch.cat([observation, action], -1))


def _networks(policy):
    torch.manual_seed(0)
    critic = ValueOperator(nn.Linear(OBS, 1), in_keys=["observation"])
    if policy == "categorical":
        actor = ProbabilisticActor(TensorDictModule(nn.Linear(OBS, N_ACT), ["observation"], ["logits"]),
                                   in_keys=["logits"], distribution_class=Categorical)
        return actor, critic, TensorDictModule(nn.Linear(OBS, N_ACT), ["observation"], ["action_advantage"])
    net = TensorDictModule(nn.Sequential(nn.Linear(OBS, 2), NormalParamExtractor()), ["observation"], ["loc", "scale"])
    actor = ProbabilisticActor(net, in_keys=["loc", "scale"], distribution_class=Normal)
    if policy == "sampled":
        return actor, critic, TensorDictModule(_ObsAction(), ["observation", "action"], ["action_advantage"])
    return actor, critic, None


def _kwargs(policy):
    actor, critic, head = _networks(policy)
    cost = DiscreteMetricCost() if policy == "categorical" else EuclideanCost()
    kwargs = {"cost": cost, "epsilon": 0.05}
    if head is not None:
        kwargs["advantage_network"] = head
    return (actor, critic), kwargs


def _data(policy, n=12):
    g = torch.Generator().manual_seed(3)
    action = torch.randint(N_ACT, (n,), generator=g) if policy == "categorical" else torch.randn(n, 1, generator=g)
    return TensorDict({"observation": torch.randn(n, OBS, generator=g), "action": action,
                       "advantage": torch.randn(n, 1, generator=g), "value_target": torch.randn(n, 1, generator=g)},
                      batch_size=[n])


@pytest.mark.parametrize("policy", list(CLASSES))
def test_factory_builds_the_setting_class_with_the_same_numbers(policy):
    args, kwargs = _kwargs(policy)
    built = OTTrustRegionLoss(*args, policy=policy, **kwargs)
    assert type(built) is CLASSES[policy] and isinstance(built, OTTrustRegionLoss) and built.policy == policy
    outs = []
    for loss in (built, CLASSES[policy](*_kwargs(policy)[0], **_kwargs(policy)[1])):
        torch.manual_seed(5)  # the sampled setting draws candidates
        data = _data(policy)
        loss.solve_multiplier(data)
        outs.append(loss(data))
    for key in outs[0].keys():
        torch.testing.assert_close(outs[0][key], outs[1][key], rtol=0, atol=0)


def test_factory_accepts_other_settings_options_at_their_defaults_only():
    args, kwargs = _kwargs("categorical")
    # What the single-class loss took for every setting, at its defaults: accepted, ignored.
    loss = OTTrustRegionLoss(*args, policy="categorical", mirror=False, num_candidates=8, **kwargs)
    assert type(loss) is CategoricalOTLoss and not hasattr(loss, "num_candidates")
    with pytest.raises(ValueError, match=r"mirror=True is an option of policy='gaussian' only.*'categorical'"):
        OTTrustRegionLoss(*args, policy="categorical", mirror=True, **kwargs)
    args, kwargs = _kwargs("gaussian")
    with pytest.raises(ValueError, match=r"num_candidates=4 is an option of policy='sampled' only"):
        OTTrustRegionLoss(*args, num_candidates=4, **kwargs)
    with pytest.raises(ValueError, match=r"split=False is an option of policy='categorical' only"):
        OTTrustRegionLoss(*args, split=False, **kwargs)
    with pytest.raises(ValueError, match="advantage_network"):
        GaussianOTLoss(*args, advantage_network=_networks("categorical")[2], **kwargs)
    with pytest.raises(TypeError):  # a setting's class takes only its own keywords
        GaussianOTLoss(*args, split=True, **kwargs)
    assert type(GaussianOTLoss(*args, policy="gaussian", **kwargs)) is GaussianOTLoss  # its own name is fine
    with pytest.raises(ValueError, match="GaussianOTLoss is policy='gaussian'"):
        GaussianOTLoss(*args, policy="sampled", **kwargs)


@pytest.mark.parametrize("policy", list(CLASSES))
@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), float("inf"), True, "0.1", torch.tensor([0.1, 0.2])])
def test_epsilon_is_checked_on_every_assignment(policy, bad):
    args, kwargs = _kwargs(policy)
    loss = CLASSES[policy](*args, **kwargs)
    with pytest.raises(ValueError, match="epsilon"):
        loss.epsilon = bad
    assert loss.epsilon == 0.05  # unchanged by the refused assignment
    loss.epsilon = torch.tensor(0.02)
    data = _data(policy)
    sol = loss.solve_multiplier(data)
    assert float(sol.epsilon) == pytest.approx(0.02) and isinstance(loss.epsilon, float)


@pytest.mark.parametrize("module", [DualSolver(epsilon=0.1), MassSplittingTarget(cost=DiscreteMetricCost(),
                                                                                  epsilon=0.1)])
def test_solver_modules_check_epsilon_on_assignment(module):
    with pytest.raises(ValueError, match="epsilon"):
        module.epsilon = -0.5
    module.epsilon = 0.3
    assert module.epsilon == 0.3


def test_categorical_loss_writes_what_its_mass_splitting_target_writes():
    args, kwargs = _kwargs("categorical")
    for split in (True, False):
        loss = CategoricalOTLoss(*args, split=split, **kwargs)
        data = _data("categorical")
        loss.solve_multiplier(data)
        probs = data["ot_behaviour_probs"].double()
        head = loss._head(data, probs.float()).double()
        ref = MassSplittingTarget(cost=DiscreteMetricCost(), epsilon=0.05, split=split)(
            TensorDict({"probs": probs, "action_advantage": head}, batch_size=data.batch_size))
        torch.testing.assert_close(data["ot_target_probs"], ref["target_probs"].float())
        for key in ("ot_multiplier", "ot_split", "ot_transport"):
            torch.testing.assert_close(data[key], ref[key].float())
    with pytest.raises(ValueError, match="split"):
        loss.split = "no"


def test_a_new_setting_implements_only_its_hooks():
    """A setting is a subclass with ``policy=`` and three hooks. Here the Gaussian hinge written again on the
    policy's mean: for a Normal policy it must give GaussianOTLoss's numbers through the factory, solve, forward,
    the measure and the projection."""

    class MeanHingeOTLoss(GaussianTransportMixin, OTTrustRegionLoss, policy="test_mean_hinge", options={}):
        def _candidates(self, flat, old, adv):
            zero = torch.zeros_like(adv)
            cost = torch.stack([self.cost(old.mean, flat.get(self.tensor_keys.action)).double(), zero], -1)
            return self._solve_candidates(torch.stack([adv, zero], -1), cost), {}, None

        def _objective(self, flat, dist, lam, adv, critic_out):
            term = adv - lam * self.cost(dist.mean, flat.get(self.tensor_keys.action))
            return term.clamp_min(0), term > 0, None

    try:
        results = []
        for policy in ("test_mean_hinge", "gaussian"):
            args, kwargs = _kwargs("gaussian")
            loss = OTTrustRegionLoss(*args, policy=policy, **kwargs)
            data = _data("gaussian")
            sol = loss.solve_multiplier(data)
            theta_old = loss.actor_parameters()
            optim = torch.optim.SGD(loss.parameters(), lr=0.5)
            for _ in range(3):
                out = loss(data)
                optim.zero_grad()
                (out["loss_objective"] + out["loss_critic"]).backward()
                optim.step()
            proj = loss.project_into_trust_region(data, theta_old)
            results.append((type(loss).__name__, float(sol.multiplier), out, proj))
        assert results[0][0] == "MeanHingeOTLoss" and results[1][0] == "GaussianOTLoss"
        assert results[0][1] == results[1][1] > 0
        for key in results[1][2].keys():
            torch.testing.assert_close(results[0][2][key], results[1][2][key])
        for key in ("realised_transport", "step_fraction", "backtracks"):
            torch.testing.assert_close(results[0][3][key], results[1][3][key])
        with pytest.raises(ValueError, match="test_mean_hinge"):
            OTTrustRegionLoss(*args, policy="softmax", **kwargs)
    finally:
        OTTrustRegionLoss.settings.pop("test_mean_hinge")


@pytest.mark.parametrize("policy", list(CLASSES))
def test_an_empty_batch_is_refused(policy):
    # TensorDict.numel() is at least 1, so the check reads the batch size itself
    args, kwargs = _kwargs(policy)
    loss = CLASSES[policy](*args, **kwargs)
    with pytest.raises(ValueError, match="empty batch"):
        loss.solve_multiplier(_data(policy)[:0])
