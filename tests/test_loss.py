"""OTTrustRegionLoss: keys, gradient isolation, numerical contracts, reductions, bad input, smoke training.

Conventions follow TorchRL's loss tests (test_a2c / test_tqc): tiny networks built from
``ProbabilisticActor`` / ``ValueOperator``, hand-built tensordicts, fixed seeds. The numbers the loss
produces are checked against values computed here by hand (Gaussian hinge) or by the functional core
(``tabular_ot_update`` for the categorical target).
"""

from __future__ import annotations

import pytest
import torch
from tensordict import TensorDict
from tensordict.nn import TensorDictModule
from torch import nn
from torch.distributions import Categorical, Normal
from torchrl.envs.utils import ExplorationType, set_exploration_type
from torchrl.modules import NormalParamExtractor, OneHotCategorical, ProbabilisticActor, TanhNormal, ValueOperator
from torchrl.objectives.utils import ValueEstimators

from torchrl_ot.costs import DiscreteMetricCost, EuclideanCost
from torchrl_ot.functional import tabular_ot_update
from torchrl_ot.loss import OTTrustRegionLoss

POLICIES = ["gaussian", "categorical", "sampled"]
OBS, N_ACT = 3, 3


# ------------------------------------------------------------------------------------------------
# builders


def _gaussian_actor(obs_dim=OBS, dist=Normal, linear=None):
    linear = linear or nn.Linear(obs_dim, 2)
    net = TensorDictModule(nn.Sequential(linear, NormalParamExtractor()), ["observation"], ["loc", "scale"])
    return ProbabilisticActor(net, in_keys=["loc", "scale"], distribution_class=dist)


def _categorical_actor(obs_dim=OBS, n=N_ACT, linear=None):
    net = TensorDictModule(linear or nn.Linear(obs_dim, n), ["observation"], ["logits"])
    return ProbabilisticActor(net, in_keys=["logits"], distribution_class=Categorical)


class _QuadraticAdvantage(nn.Module):
    """A(s, a) linear in (s, a, a^2): able to represent the bandit's quadratic advantage exactly."""

    def __init__(self, obs_dim):
        super().__init__()
        self.linear = nn.Linear(obs_dim + 2, 1)

    def forward(self, obs, action):
        return self.linear(torch.cat([obs, action, action * action], -1))


def _make_loss(policy, *, obs_dim=OBS, epsilon=0.01, **kwargs):
    critic = ValueOperator(nn.Linear(obs_dim, 1), in_keys=["observation"])
    if policy == "categorical":
        actor, cost = _categorical_actor(obs_dim), DiscreteMetricCost()
        head = TensorDictModule(nn.Linear(obs_dim, N_ACT), ["observation"], ["action_advantage"])
    else:
        actor, cost = _gaussian_actor(obs_dim), EuclideanCost()
        head = None
        if policy == "sampled":
            head = TensorDictModule(_QuadraticAdvantage(obs_dim), ["observation", "action"], ["action_advantage"])
    return OTTrustRegionLoss(actor, critic, cost=cost, epsilon=epsilon, policy=policy, advantage_network=head,
                             **kwargs)


def _fixed_actor(w, b):
    """Gaussian actor on 2-d observations with loc = w . s + b and a constant scale (row 1 of the Linear is 0)."""
    lin = nn.Linear(2, 2)
    with torch.no_grad():
        lin.weight.copy_(torch.stack([w, torch.zeros(2)]))
        lin.bias.copy_(torch.tensor([b, 0.0]))
    return _gaussian_actor(2, linear=lin), lin


def _data(policy, batch=(6,), seed=0, with_next=False):
    g = torch.Generator().manual_seed(seed)
    if policy == "categorical":
        action = torch.randint(N_ACT, batch, generator=g)
    else:
        action = torch.randn(*batch, 1, generator=g)
    td = TensorDict({"observation": torch.randn(*batch, OBS, generator=g), "action": action}, batch_size=batch)
    if with_next:
        td["next"] = TensorDict({
            "observation": torch.randn(*batch, OBS, generator=g), "reward": torch.randn(*batch, 1, generator=g),
            "done": torch.zeros(*batch, 1, dtype=torch.bool), "terminated": torch.zeros(*batch, 1, dtype=torch.bool),
        }, batch_size=batch)
    else:
        adv = 2 * torch.randn(*batch, 1, generator=g)
        td["advantage"] = adv - adv.mean()  # some positive advantages, so the trust region can bind
        td["value_target"] = torch.randn(*batch, 1, generator=g)
    return td


def _grads(params):
    return [p.grad for p in params.values(True, True)]


def _none_or_zero(grads):
    return all(g is None or bool((g == 0).all()) for g in grads)


def _some_nonzero(grads):
    return any(g is not None and bool((g != 0).any()) for g in grads)


# ------------------------------------------------------------------------------------------------
# keys


def test_in_and_out_keys():
    loss = _make_loss("sampled", entropy_coeff=0.01)
    for key in ["observation", "action", ("next", "reward"), ("next", "done"), ("next", "terminated"),
                ("next", "observation")]:
        assert key in loss.in_keys
    assert loss.out_keys == ["loss_objective", "loss_critic", "entropy", "loss_entropy", "ot_multiplier",
                             "ot_split", "ot_transport", "ot_active_fraction"]
    out = loss(_data("sampled"))
    assert set(out.keys()) == set(loss.out_keys)
    assert loss.tensor_keys.sample_log_prob == "action_log_prob"


def test_set_keys_renames_advantage_and_solution_keys():
    loss = _make_loss("gaussian")
    loss.make_value_estimator(ValueEstimators.GAE, gamma=0.9, lmbda=0.9)
    loss.set_keys(advantage="adv2", multiplier="lam")
    assert loss.value_estimator.tensor_keys.advantage == "adv2"  # forwarded to the estimator
    td = _data("gaussian")
    td.rename_key_("advantage", "adv2")
    # No ("next", ...) entries: had the loss ignored "adv2" it would run the estimator and fail.
    sol = loss.solve_multiplier(td)
    assert "lam" in td.keys() and "ot_multiplier" not in td.keys()
    torch.testing.assert_close(td["lam"][0], sol.multiplier.float())
    assert torch.isfinite(loss(td)["loss_objective"])
    with pytest.raises(ValueError, match="not an accepted"):
        loss.set_keys(advantages="x")


# ------------------------------------------------------------------------------------------------
# gradients


@pytest.mark.parametrize("policy", POLICIES)
def test_gradient_isolation(policy):
    torch.manual_seed(0)
    loss = _make_loss(policy, epsilon=1e-3)
    td = _data(policy)
    critic_params = [loss.critic_network_params] + ([loss.advantage_network_params] if policy != "gaussian" else [])
    out = loss(td)
    assert out["ot_multiplier"] > 0  # the trust region binds, so the objective has a gradient
    out["loss_objective"].backward()
    assert _some_nonzero(_grads(loss.actor_network_params))
    assert all(_none_or_zero(_grads(p)) for p in critic_params)
    loss.zero_grad(set_to_none=True)
    loss(td)["loss_critic"].backward()
    assert _none_or_zero(_grads(loss.actor_network_params))
    assert all(_some_nonzero(_grads(p)) for p in critic_params)


# ------------------------------------------------------------------------------------------------
# numerical contracts


def test_gaussian_hinge_matches_hand_computation():
    # Fixed Linear actor: loc = w . s + b (row 0), scale from row 1. Squared Euclidean cost.
    obs = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [0.5, -1.0]])
    action = torch.tensor([[0.9], [-0.4], [1.3], [0.2]])
    adv = torch.tensor([1.0, -0.5, 2.0, 0.3])
    eps = 0.05
    w_old, b_old = torch.tensor([0.2, -0.1]), 0.1


    td = TensorDict({"observation": obs, "action": action, "advantage": adv[:, None],
                     "value_target": torch.zeros(4, 1)}, batch_size=[4])
    critic = ValueOperator(nn.Linear(2, 1), in_keys=["observation"])
    old_loss = OTTrustRegionLoss(_fixed_actor(w_old, b_old)[0], critic, cost=EuclideanCost(), epsilon=eps,
                                 normalize_advantage=False)  # the hinge on these very advantages
    sol = old_loss.solve_multiplier(td)

    # lam* by brute force: G is piecewise linear and convex, minimised at 0 or a breakpoint A_b / c_b.
    c_old = ((obs @ w_old + b_old) - action[:, 0]) ** 2
    G = lambda lam: lam * eps + (adv - lam * c_old).clamp_min(0).mean()
    breaks = [0.0] + [float(a / c) for a, c in zip(adv, c_old, strict=True) if a > 0]
    lam = min(breaks, key=G)
    assert lam > 0
    torch.testing.assert_close(sol.multiplier.float(), torch.tensor(lam))
    torch.testing.assert_close(sol.transport.float(), torch.tensor(eps))  # binding: moves exactly epsilon

    # A later epoch: the actor has moved (m_theta != m_old) and the stored lam* is used as data.
    w_new, b_new = torch.tensor([0.5, 0.3]), 0.2
    new_actor, lin = _fixed_actor(w_new, b_new)
    loss = OTTrustRegionLoss(new_actor, critic, cost=EuclideanCost(), epsilon=eps)
    out = loss(td)
    m = obs @ w_new + b_new
    term = adv - lam * (m - action[:, 0]) ** 2
    torch.testing.assert_close(out["loss_objective"], -term.clamp_min(0).mean())
    torch.testing.assert_close(out["ot_active_fraction"], (term > 0).float().mean())
    out["loss_objective"].backward()
    # d/dw of -(1/B) sum_{active} (A_b - lam (w.s_b + b - a_b)^2) = (1/B) sum_{active} 2 lam (m_b - a_b) s_b
    active = (term > 0).float()
    grad_w = (2 * lam * active * (m - action[:, 0]))[:, None] * obs
    torch.testing.assert_close(lin.weight.grad[0], grad_w.mean(0))
    torch.testing.assert_close(lin.bias.grad[0], (2 * lam * active * (m - action[:, 0])).mean())
    assert _none_or_zero([lin.weight.grad[1], lin.bias.grad[1]])  # the scale does not enter the hinge


def test_gaussian_mirror_candidate_matches_hand_computation():
    # As above, plus the mirrored candidate 2 m_old - a_b with advantage -A_b (plain Normal: no box to clamp to).
    obs = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [0.5, -1.0], [-1.0, 0.5]])
    action = torch.tensor([[0.9], [-0.4], [1.3], [0.2], [-0.8]])
    adv = torch.tensor([1.0, -2.5, 2.0, 0.3, -1.0])
    eps = 0.05


    td = TensorDict({"observation": obs, "action": action, "advantage": adv[:, None],
                     "value_target": torch.zeros(5, 1)}, batch_size=[5])
    critic = ValueOperator(nn.Linear(2, 1), in_keys=["observation"])
    w_old, b_old = torch.tensor([0.2, -0.1]), 0.1
    sol = OTTrustRegionLoss(_fixed_actor(w_old, b_old)[0], critic, cost=EuclideanCost(), epsilon=eps,
                            mirror=True, normalize_advantage=False).solve_multiplier(td)
    m_old = obs @ w_old + b_old
    image = 2 * m_old - action[:, 0]
    torch.testing.assert_close(td["ot_candidates"][:, 0], image)
    # lam* by brute force over the three-candidate dual: each sample's max(A - lam c, 0, -A - lam c') with
    # c' = c (a mirror is as far from the mean as the action): the hinge of |A_b|.
    c_old = (m_old - action[:, 0]) ** 2
    G = lambda lam: lam * eps + (adv.abs() - lam * c_old).clamp_min(0).mean()
    lam = min([0.0] + [float(a.abs() / c) for a, c in zip(adv, c_old, strict=True)], key=G)
    assert lam > 0
    torch.testing.assert_close(sol.multiplier.float(), torch.tensor(lam))

    new_actor, lin = _fixed_actor(torch.tensor([0.5, 0.3]), 0.2)
    out = OTTrustRegionLoss(new_actor, critic, cost=EuclideanCost(), epsilon=eps, mirror=True)(td)
    m = obs @ torch.tensor([0.5, 0.3]) + 0.2
    term = torch.maximum(adv - lam * (m - action[:, 0]) ** 2, -adv - lam * (m - image) ** 2)
    assert bool((adv < 0).any() & (term > 0).any())
    torch.testing.assert_close(out["loss_objective"], -term.clamp_min(0).mean())
    with pytest.raises(ValueError, match="mirror"):
        _make_loss("categorical", mirror=True)


def test_gaussian_squared_hinge_matches_hand_computation():
    # squared_hinge=True: the loss is -(1/B) sum_b max(A_b - lam* c(m_theta, a_b), 0)^2 (with the mirror, the larger
    # candidate's), lam* the same as the plain hinge's (the exact update does not change), and each active sample's
    # gradient is the plain hinge's times 2 (A_b - lam* c): its margin.
    obs = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [0.5, -1.0], [-1.0, 0.5]])
    action = torch.tensor([[0.9], [-0.4], [1.3], [0.2], [-0.8]])
    adv = torch.tensor([1.0, -2.5, 2.0, 0.3, -1.0])
    critic = ValueOperator(nn.Linear(2, 1), in_keys=["observation"])
    w_old, b_old, w_new, b_new = torch.tensor([0.2, -0.1]), 0.1, torch.tensor([0.5, 0.3]), 0.2
    outs, lams = {}, {}
    for squared in (False, True):
        td = TensorDict({"observation": obs, "action": action, "advantage": adv[:, None],
                         "value_target": torch.zeros(5, 1)}, batch_size=[5])
        kwargs = {"cost": EuclideanCost(), "epsilon": 0.05, "mirror": True, "squared_hinge": squared}
        lams[squared] = OTTrustRegionLoss(_fixed_actor(w_old, b_old)[0], critic, normalize_advantage=False,
                                          **kwargs).solve_multiplier(td).multiplier
        actor, lin = _fixed_actor(w_new, b_new)
        out = OTTrustRegionLoss(actor, critic, **kwargs)(td)
        out["loss_objective"].backward()
        outs[squared] = (out, lin.weight.grad[0].clone(), lin.bias.grad[0].clone(), td["ot_candidates"][:, 0])
    assert lams[True] == lams[False] > 0
    lam = float(lams[True])
    m = obs @ w_new + b_new
    image = outs[True][3]
    c_a, c_m = (m - action[:, 0]) ** 2, (m - image) ** 2
    term = torch.maximum(adv - lam * c_a, -adv - lam * c_m)
    margin = term.clamp_min(0)
    assert int((margin > 0).sum()) >= 2 and bool((margin == 0).any())
    out, grad_w, grad_b, _ = outs[True]
    torch.testing.assert_close(out["loss_objective"], -margin.pow(2).mean())
    # d/dm of -max(.)^2 = 2 margin lam dc/dm, dc/dm = 2 (m - target), target the active candidate
    target = torch.where(adv - lam * c_a >= -adv - lam * c_m, action[:, 0], image)
    dm = 2 * margin * lam * 2 * (m - target)
    torch.testing.assert_close(grad_w, (dm[:, None] * obs).mean(0))
    torch.testing.assert_close(grad_b, dm.mean())
    # the plain hinge's per-sample pull is lam dc/dm on the same active samples: the same direction per sample
    plain_dm = (margin > 0).float() * lam * 2 * (m - target)
    torch.testing.assert_close(outs[False][2], plain_dm.mean())
    with pytest.raises(ValueError, match="squared_hinge"):
        OTTrustRegionLoss(_fixed_actor(w_old, b_old)[0], critic, cost=EuclideanCost(), epsilon=0.05,
                          squared_hinge="yes")
    with pytest.raises(ValueError, match="squared_hinge"):
        _make_loss("categorical", squared_hinge=True)


def test_gaussian_mirror_is_clamped_to_the_action_box():
    critic = ValueOperator(nn.Linear(OBS, 1), in_keys=["observation"])
    loss = OTTrustRegionLoss(_gaussian_actor(dist=TanhNormal), critic, cost=EuclideanCost(), epsilon=0.01, mirror=True)
    td = _data("gaussian", batch=(64,))
    td["action"] = td["action"].clamp(-0.999, 0.999)
    td["advantage"] = torch.randn(64, 1)
    td["value_target"] = torch.zeros(64, 1)
    loss.solve_multiplier(td)
    image = td["ot_candidates"]
    assert bool((image.abs() <= 1).all())
    m = torch.tanh(td["loc"])
    torch.testing.assert_close(image, (2 * m - td["action"]).clamp(-1, 1))


def test_categorical_target_matches_tabular_update():
    torch.manual_seed(1)
    eps = 0.05
    loss = _make_loss("categorical", epsilon=eps)
    td = _data("categorical", seed=1)
    sol = loss.solve_multiplier(td)
    # Reference: pi_old, the centred head and the mass-split target, computed directly.
    lin_actor = loss.actor_network_params.to_module(loss.actor_network)
    with lin_actor, torch.no_grad():
        pi_old = loss.actor_network.get_dist(td.select("observation")).probs
    with loss.advantage_network_params.to_module(loss.advantage_network), torch.no_grad():
        h = loss.advantage_network(td.select("observation"))["action_advantage"]
    centred = h - (pi_old * h).sum(-1, keepdim=True)
    target, ref = tabular_ot_update(pi_old.double(), centred.double(), torch.full((6,), 1 / 6, dtype=torch.float64),
                                    DiscreteMetricCost().matrix(N_ACT), eps)
    assert ref.multiplier > 0
    torch.testing.assert_close(sol.multiplier, ref.multiplier)
    torch.testing.assert_close(td["ot_target_probs"], target.float())
    torch.testing.assert_close(td["ot_behaviour_probs"], pi_old)  # recorded for the minibatch steps' centring
    torch.testing.assert_close(td["ot_transport"][0], ref.transport.float())
    out = loss(td)
    torch.testing.assert_close(out["loss_objective"], (pi_old - target.float()).pow(2).sum(-1).mean())
    with loss.critic_network_params.to_module(loss.critic_network), torch.no_grad():
        value = loss.critic_network(td.select("observation"))["state_value"]
    head_taken = centred.gather(-1, td["action"][:, None])
    expected = ((value - td["value_target"]) ** 2).mean() + ((head_taken - td["advantage"]) ** 2).mean()
    torch.testing.assert_close(out["loss_critic"], expected)
    moved = (target.float() - pi_old).abs().amax(-1) > 1e-6
    torch.testing.assert_close(out["ot_active_fraction"], moved.float().mean())


def test_sampled_candidates_include_the_taken_action():
    torch.manual_seed(2)
    loss = _make_loss("sampled", num_candidates=5, epsilon=1e-3)
    td = _data("sampled", batch=(2, 3))
    sol = loss.solve_multiplier(td)
    cands, cadv = td["ot_candidates"], td["ot_candidate_advantage"]
    assert cands.shape == (2, 3, 6, 1) and cadv.shape == (2, 3, 6)
    assert torch.equal(cands[..., -1, :], td["action"])  # the taken action, at cost 0: always feasible
    with loss.advantage_network_params.to_module(loss.advantage_network), torch.no_grad():
        q = loss.advantage_network(TensorDict({"observation": td["observation"][..., None, :].expand(2, 3, 6, OBS),
                                               "action": cands}, [2, 3, 6]))["action_advantage"]
    torch.testing.assert_close(cadv, q.squeeze(-1))
    assert sol.multiplier > 0 and torch.isclose(sol.transport.float(), torch.tensor(1e-3))


def test_minibatches_reuse_the_stored_multiplier():
    loss = _make_loss("gaussian", epsilon=0.02)
    td = _data("gaussian", batch=(8,))
    sol = loss.solve_multiplier(td)
    out = loss(td[:3])  # a minibatch: lam* comes from the full batch, not re-solved on 3 samples
    torch.testing.assert_close(out["ot_multiplier"], sol.multiplier.float())
    assert not torch.isclose(loss.solve_multiplier(td[:3].exclude("ot_multiplier")).multiplier, sol.multiplier)


def test_categorical_keeps_pi_old_fixed_across_epochs():
    torch.manual_seed(6)
    loss = _make_loss("categorical", epsilon=0.05)
    td = _data("categorical")
    loss.solve_multiplier(td)
    assert "logits" in td.keys()  # pi_old is recorded in the batch, not re-read from the moving actor
    first = loss(td)
    with torch.no_grad():
        for p in loss.actor_network_params.values(True, True):
            p.add_(torch.randn_like(p))
    later = loss(td)
    # The centring of the head and the diagnostics use the stored pi_old; only the objective moves.
    torch.testing.assert_close(later["loss_critic"], first["loss_critic"])
    torch.testing.assert_close(later["ot_active_fraction"], first["ot_active_fraction"])
    assert not torch.isclose(later["loss_objective"], first["loss_objective"])


def test_categorical_one_hot_actions_match_indices():
    torch.manual_seed(7)
    loss = _make_loss("categorical", epsilon=0.05, functional=False)
    lin = nn.Linear(OBS, N_ACT)
    lin.load_state_dict(loss.actor_network.module[0].module.state_dict())
    net = TensorDictModule(lin, ["observation"], ["logits"])
    one_hot_actor = ProbabilisticActor(net, in_keys=["logits"], distribution_class=OneHotCategorical)
    one_hot = OTTrustRegionLoss(one_hot_actor, loss.critic_network, cost=DiscreteMetricCost(), epsilon=0.05,
                                policy="categorical", advantage_network=loss.advantage_network, functional=False)
    td = _data("categorical")
    td_oh = td.clone()
    td_oh["action"] = nn.functional.one_hot(td["action"], N_ACT)
    out, out_oh = loss(td), one_hot(td_oh)
    for key in ("loss_objective", "loss_critic", "ot_multiplier", "ot_active_fraction"):
        torch.testing.assert_close(out_oh[key], out[key])


def test_functional_and_stateful_agree():
    torch.manual_seed(8)
    loss = _make_loss("sampled", epsilon=1e-3)
    stateful = OTTrustRegionLoss(
        loss.get_stateful_net("actor_network"), loss.get_stateful_net("critic_network"), cost=EuclideanCost(),
        epsilon=1e-3, policy="sampled", advantage_network=loss.get_stateful_net("advantage_network"),
        functional=False)
    td = _data("sampled")
    loss.solve_multiplier(td)
    torch.manual_seed(0)
    out = loss(td)
    torch.manual_seed(0)
    out_s = stateful(td)
    for key in out.keys():
        torch.testing.assert_close(out_s[key], out[key])
    (out_s["loss_objective"] + out_s["loss_critic"]).backward()
    assert all(p.grad is not None for p in stateful.parameters())


# ------------------------------------------------------------------------------------------------
# reductions and mutation


@pytest.mark.parametrize("policy", POLICIES)
def test_reductions(policy):
    torch.manual_seed(3)
    losses = {r: _make_loss(policy, reduction=r, entropy_coeff=0.01) for r in ("none", "sum", "mean")}
    for r in ("sum", "mean"):
        losses[r].load_state_dict(losses["none"].state_dict())
    td = _data(policy, batch=(2, 3))
    losses["none"].solve_multiplier(td)
    outs = {}
    for r, loss in losses.items():
        torch.manual_seed(0)  # the sampled objective draws a~ from pi_theta
        outs[r] = loss(td)
    for key in ("loss_objective", "loss_critic", "loss_entropy"):
        assert outs["none"][key].shape == (2, 3)
        torch.testing.assert_close(outs["sum"][key], outs["none"][key].sum())
        torch.testing.assert_close(outs["mean"][key], outs["none"][key].mean())


@pytest.mark.parametrize("policy", POLICIES)
def test_forward_does_not_mutate_input(policy):
    torch.manual_seed(4)
    loss = _make_loss(policy)
    loss.make_value_estimator(ValueEstimators.GAE, gamma=0.9, lmbda=0.9)
    td = _data(policy, with_next=True)
    before = td.clone()
    out = loss(td)  # runs the estimator and the dual on its own copy
    assert set(td.keys(True, True)) == set(before.keys(True, True))
    assert (td == before).all()
    assert all(torch.isfinite(v).all() for v in out.values())
    loss.solve_multiplier(td)  # the documented writer
    assert {"advantage", "value_target", "ot_multiplier", "ot_split", "ot_transport"} <= set(td.keys())
    # A solved batch is read as is, with or without pi_old's parameters: forward reads only what
    # solve_multiplier recorded, so both give the same losses and neither batch changes.
    torch.manual_seed(5)  # "sampled" draws a reparameterised action per call
    ref = loss(td)
    for batch in (td, td.exclude(*loss._dist_keys)):
        before = batch.clone()
        torch.manual_seed(5)
        out = loss(batch)
        assert set(batch.keys(True, True)) == set(before.keys(True, True)) and (batch == before).all()
        for name in ("loss_objective", "loss_critic"):
            torch.testing.assert_close(out[name], ref[name])


@pytest.mark.parametrize("value_type", [ValueEstimators.TD0, ValueEstimators.TD1, ValueEstimators.TDLambda,
                                        ValueEstimators.GAE])
def test_value_estimators(value_type):
    loss = _make_loss("gaussian")
    loss.make_value_estimator(value_type, gamma=0.9)
    assert loss.value_type == value_type
    out = loss(_data("gaussian", with_next=True))
    assert torch.isfinite(out["loss_critic"]) and torch.isfinite(out["loss_objective"])
    with pytest.raises(NotImplementedError):
        loss.make_value_estimator(ValueEstimators.VTrace)


# ------------------------------------------------------------------------------------------------
# bad input


@pytest.mark.parametrize("epsilon", [0.0, -1.0, float("nan"), float("inf")])
def test_bad_epsilon(epsilon):
    with pytest.raises(ValueError, match="epsilon"):
        _make_loss("gaussian", epsilon=epsilon)


def test_bad_configuration():
    actor, critic = _gaussian_actor(), ValueOperator(nn.Linear(OBS, 1), in_keys=["observation"])
    head = TensorDictModule(nn.Linear(OBS, N_ACT), ["observation"], ["action_advantage"])
    with pytest.raises(ValueError, match="gaussian.*categorical.*sampled"):
        OTTrustRegionLoss(actor, critic, cost=EuclideanCost(), epsilon=0.1, policy="softmax")
    with pytest.raises(ValueError, match="discrete"):
        OTTrustRegionLoss(_categorical_actor(), critic, cost=EuclideanCost(), epsilon=0.1, policy="categorical",
                          advantage_network=head)
    for policy, cost in (("categorical", DiscreteMetricCost()), ("sampled", EuclideanCost())):
        with pytest.raises(ValueError, match="advantage_network"):
            OTTrustRegionLoss(actor, critic, cost=cost, epsilon=0.1, policy=policy)
    with pytest.raises(ValueError, match="probabilistic actor"):
        OTTrustRegionLoss(TensorDictModule(nn.Linear(OBS, 1), ["observation"], ["loc"]), critic, cost=EuclideanCost(),
                          epsilon=0.1)
    with pytest.raises(ValueError, match="num_candidates"):
        OTTrustRegionLoss(actor, critic, cost=EuclideanCost(), epsilon=0.1, policy="sampled",
                          advantage_network=head, num_candidates=0)


class _TwoHeads(nn.Module):
    """One critic module writing V(s) and A(s, .), made of two independent linears so that it can be
    compared exactly with a separate critic and head holding the same weights."""

    def __init__(self, value: nn.Linear, head: nn.Linear):
        super().__init__()
        self.value, self.head = value, head

    def forward(self, obs):
        return self.value(obs), self.head(obs)


def test_categorical_head_inside_the_critic_equals_a_separate_head():
    torch.manual_seed(0)
    separate = _make_loss("categorical", epsilon=0.02)
    value = nn.Linear(OBS, 1)
    head = nn.Linear(OBS, N_ACT)
    actor = _categorical_actor()
    with torch.no_grad():  # the same weights as the separate loss
        for mod, params in ((value, separate.critic_network_params), (head, separate.advantage_network_params),
                            (actor.module[0].module, separate.actor_network_params)):
            flat = params.flatten_keys(".")
            for name, p in mod.named_parameters():
                p.copy_(next(v for k, v in flat.items() if k.endswith(name)))
    critic = ValueOperator(_TwoHeads(value, head), in_keys=["observation"],
                           out_keys=["state_value", "action_advantage"])
    shared = OTTrustRegionLoss(actor, critic, cost=DiscreteMetricCost(), epsilon=0.02, policy="categorical")
    assert "advantage_network" not in dict(shared.named_children())
    td = _data("categorical", batch=(8,))
    out_sep, out_sh = separate(td.clone()), shared(td.clone())
    assert out_sep["ot_multiplier"] > 0
    for key in ("loss_objective", "loss_critic", "ot_multiplier", "ot_split", "ot_transport", "ot_active_fraction"):
        torch.testing.assert_close(out_sh[key], out_sep[key])
    # loss_critic carries the head's regression: the head's weights get the same gradient in both
    out_sep["loss_critic"].backward()
    out_sh["loss_critic"].backward()
    g_sep = separate.advantage_network_params.flatten_keys(".")
    g_sh = shared.critic_network_params.flatten_keys(".")
    for name in ("weight", "bias"):
        torch.testing.assert_close(next(v.grad for k, v in g_sh.items() if k.endswith(f"head.{name}")),
                                   next(v.grad for k, v in g_sep.items() if k.endswith(name)))
    # and loss_objective does not reach the critic
    shared.zero_grad(set_to_none=True)
    shared(td.clone())["loss_objective"].backward()
    assert _none_or_zero(_grads(shared.critic_network_params))


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("key", ["advantage", "observation"])
def test_nan_inputs_are_refused(policy, key):
    loss = _make_loss(policy)
    td = _data(policy)
    td[key][1] = float("nan")
    with pytest.raises(ValueError, match=key):
        loss(td)
    with pytest.raises(ValueError, match=key):
        loss.solve_multiplier(td)


def test_nan_reward_is_refused_before_the_dual():
    loss = _make_loss("gaussian")
    td = _data("gaussian", with_next=True)
    td["next", "reward"][0] = float("nan")
    with pytest.raises(ValueError, match="reward"):
        loss(td)


# ------------------------------------------------------------------------------------------------
# smoke training on one-step bandits: a few dozen steps must raise the expected reward


def _train(loss, collect, *, iters, epochs, lr):
    """Collect a batch, solve lam* once, then a few full-batch epochs on the stored solution."""
    opt = torch.optim.Adam(loss.parameters(), lr=lr)
    for _ in range(iters):
        with torch.no_grad(), set_exploration_type(ExplorationType.RANDOM):
            td = collect(loss)
        loss.solve_multiplier(td)
        for _ in range(epochs):
            out = loss(td)
            total = sum(v for k, v in out.items() if k.startswith("loss_"))
            opt.zero_grad()
            total.backward()
            opt.step()


def _bandit_batch(loss, obs, reward_fn):
    """One-step episodes: every step terminates, so GAE gives A = r - V(s)."""
    n = obs.shape[0]
    td = TensorDict({"observation": obs}, [n])
    with loss.actor_network_params.to_module(loss.actor_network):
        loss.actor_network(td)
    done = torch.ones(n, 1, dtype=torch.bool)
    td["next"] = TensorDict({"observation": obs, "reward": reward_fn(td), "done": done, "terminated": done}, [n])
    return td


def _mean_action(loss, obs):
    with loss.actor_network_params.to_module(loss.actor_network), torch.no_grad():
        dist = loss.actor_network.get_dist(TensorDict({"observation": obs}, [obs.shape[0]]))
    return dist.deterministic_sample if isinstance(dist, TanhNormal) else dist.mean


@pytest.mark.parametrize("policy", ["gaussian", "sampled"])
def test_smoke_training_continuous_bandit(policy):
    torch.manual_seed(0)
    lin = nn.Linear(1, 2)
    with torch.no_grad():  # start far from the optimum a = 0.5: mean -0.5, scale ~0.35
        lin.weight.zero_()
        lin.bias.copy_(torch.tensor([-0.5, -0.3]))
    dist = TanhNormal if policy == "gaussian" else Normal
    actor = _gaussian_actor(1, dist=dist, linear=lin)
    critic = ValueOperator(nn.Linear(1, 1), in_keys=["observation"])
    head = None
    if policy == "sampled":
        head = TensorDictModule(_QuadraticAdvantage(1), ["observation", "action"], ["action_advantage"])
    loss = OTTrustRegionLoss(actor, critic, cost=EuclideanCost(), epsilon=0.01, policy=policy,
                             advantage_network=head, num_candidates=8)
    loss.make_value_estimator(ValueEstimators.GAE, gamma=0.9, lmbda=0.9)
    obs = torch.ones(64, 1)
    reward = lambda td: -(td["action"] - 0.5) ** 2
    before = reward(TensorDict({"action": _mean_action(loss, obs[:1])}, [1])).item()
    _train(loss, lambda lo: _bandit_batch(lo, obs, reward), iters=12, epochs=4, lr=0.05)
    after = reward(TensorDict({"action": _mean_action(loss, obs[:1])}, [1])).item()
    assert after > before + 0.5, (before, after)


def test_smoke_training_contextual_bandit_categorical():
    torch.manual_seed(0)
    rewards = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])  # the best action depends on the context
    actor_lin, head_lin = nn.Linear(2, N_ACT), nn.Linear(2, N_ACT)
    for lin in (actor_lin, head_lin):  # uniform policy, zero advantages: the first target is pi_old itself
        nn.init.zeros_(lin.weight)
        nn.init.zeros_(lin.bias)
    head = TensorDictModule(head_lin, ["observation"], ["action_advantage"])
    critic = ValueOperator(nn.Linear(2, 1), in_keys=["observation"])
    loss = OTTrustRegionLoss(_categorical_actor(2, linear=actor_lin), critic, cost=DiscreteMetricCost(),
                             epsilon=0.1, policy="categorical", advantage_network=head)
    loss.make_value_estimator(ValueEstimators.GAE, gamma=0.9, lmbda=0.9)
    ctx = torch.arange(64) % 2
    obs = nn.functional.one_hot(ctx, 2).float()
    reward = lambda td: rewards[ctx, td["action"]][:, None]

    def expected_reward():
        with loss.actor_network_params.to_module(loss.actor_network), torch.no_grad():
            probs = loss.actor_network.get_dist(TensorDict({"observation": torch.eye(2)}, [2])).probs
        return (probs * rewards).sum(-1).mean().item()

    before = expected_reward()
    _train(loss, lambda lo: _bandit_batch(lo, obs, reward), iters=15, epochs=4, lr=0.1)
    after = expected_reward()
    assert after > before + 0.3, (before, after)


def test_split_false_is_the_categorical_wpo_rule_only():
    with pytest.raises(ValueError, match="split"):
        _make_loss("gaussian", split=False)
    loss = _make_loss("categorical", split=True)
    split_sol = loss.solve_multiplier(_data("categorical"))
    loss.split = False  # same networks, same data: only the rule differs
    td = _data("categorical")
    sol = loss.solve_multiplier(td)
    assert float(sol.multiplier) == pytest.approx(float(split_sol.multiplier))
    assert float(sol.multiplier) > 0 and float(split_sol.transport) == pytest.approx(0.01)  # binding
    # The reported transport is that of WPO's own plan, recomputed here from the target it wrote.
    old = loss._behaviour_dist(td).probs.double()
    moved = (old - td["ot_target_probs"].double()).clamp_min(0).sum(-1).mean()  # 0/1 cost: total variation
    assert float(td["ot_transport"][0]) == pytest.approx(float(moved), rel=1e-5)
    # Here the closest maximiser is "stay" for every action: WPO does not move, the exact update moves epsilon.
    assert float(moved) == 0.0
