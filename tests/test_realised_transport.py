"""The trust-region constraint of Problem (P) for a fitted network, and the projection that enforces it.

``categorical_transport`` is checked against an independent exact solver (scipy's LP, per state);
``gaussian_transport_bound`` against the exact 1-D optimal transport (in one dimension the monotone,
synchronous coupling is optimal, so quadrature over the noise gives the exact discrepancy).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.optimize import linprog
from scipy.special import roots_hermitenorm
from tensordict import TensorDict
from tensordict.nn import TensorDictModule
from torch import nn
from torch.distributions import Categorical
from torchrl.modules import NormalParamExtractor, ProbabilisticActor, TanhNormal, ValueOperator

from torchrl_ot.costs import DiscreteMetricCost, EuclideanCost, IndexDistanceCost, L1Cost, MatrixCost
from torchrl_ot.functional import categorical_transport, gaussian_transport_bound
from torchrl_ot.loss import OTTrustRegionLoss
from torchrl_ot.trpo import set_flat_params


def _lp_transport(p: np.ndarray, q: np.ndarray, c: np.ndarray) -> float:
    """min <P, c> over couplings of p and q, as a linear program (shares no code with the closed forms or POT)."""
    n = len(p)
    rows = [np.kron(np.eye(n)[i], np.ones(n)) for i in range(n)] + [np.kron(np.ones(n), np.eye(n)[j]) for j in range(n)]
    res = linprog(c.reshape(-1), A_eq=np.array(rows), b_eq=np.concatenate([p, q]), bounds=(0, None), method="highs")
    assert res.status == 0
    return float(res.fun)


@pytest.mark.parametrize("cost", [DiscreteMetricCost(), IndexDistanceCost(p=1), IndexDistanceCost(p=2),
                                  MatrixCost(torch.tensor([[0.0, 3.0, 1.0], [0.5, 0.0, 2.0], [4.0, 1.0, 0.0]])),
                                  MatrixCost(torch.tensor([[0.0, 2.0], [0.5, 0.0]]))],
                         ids=["discrete", "index1", "index2", "matrix3", "matrix2"])
def test_categorical_transport_equals_an_lp_per_state(cost):
    n = 2 if getattr(cost, "cost_matrix", torch.zeros(3, 3)).shape[0] == 2 else 3
    g = torch.Generator().manual_seed(0)
    old = torch.softmax(torch.randn(7, n, generator=g, dtype=torch.float64), -1)
    new = torch.softmax(torch.randn(7, n, generator=g, dtype=torch.float64), -1)
    new[0] = old[0]  # an unchanged state moves nothing
    matrix = cost.matrix(n)
    got = categorical_transport(old, new, matrix)
    want = [_lp_transport(a, b, matrix.numpy()) for a, b in zip(old.numpy(), new.numpy(), strict=True)]
    assert got.tolist() == pytest.approx(want, abs=1e-9)
    assert got[0] == 0


def test_categorical_transport_refuses_bad_input():
    p = torch.full((2, 3), 1 / 3, dtype=torch.float64)
    with pytest.raises(ValueError, match="new must have old's shape"):
        categorical_transport(p, p[:, :2], DiscreteMetricCost().matrix(3))
    with pytest.raises(ValueError, match=r"cost must be a \[3, 3\]"):
        categorical_transport(p, p, DiscreteMetricCost().matrix(2))
    with pytest.raises(ValueError, match="old"):
        categorical_transport(p * float("nan"), p, DiscreteMetricCost().matrix(3))


def _exact_1d(m0, s0, m1, s1, low, high, p):
    """Exact C between two 1-D TanhNormals (cost |a - b|^p): the monotone coupling, by Gauss-Hermite quadrature."""
    z, w = roots_hermitenorm(200)
    w = w / w.sum()
    squash = lambda x: low + (high - low) * (np.tanh(x) + 1) / 2
    return float((w * np.abs(squash(m0 + s0 * z) - squash(m1 + s1 * z)) ** p).sum())


@pytest.mark.parametrize(("cost", "p"), [(EuclideanCost(), 2), (EuclideanCost(p=1), 1), (L1Cost(), 1)])
@pytest.mark.parametrize("bounds", [(-1.0, 1.0), (-2.0, 2.0)])
def test_gaussian_bound_is_above_the_exact_1d_transport(cost, p, bounds):
    low, high = bounds
    g = torch.Generator().manual_seed(1)
    m0, m1 = torch.randn(20, 1, generator=g, dtype=torch.float64), torch.randn(20, 1, generator=g, dtype=torch.float64)
    s = torch.rand(20, 1, generator=g, dtype=torch.float64) + 0.1
    bound = gaussian_transport_bound(m0, s, m1, s, cost, lipschitz=(high - low) / 2)
    exact = [_exact_1d(a, b, c, b, low, high, p) for a, b, c in zip(m0.view(-1).tolist(), s.view(-1).tolist(),
                                                                  m1.view(-1).tolist(), strict=True)]
    assert (bound.numpy() >= np.array(exact) - 1e-9).all()
    # without the squashing the bound is exact: W_p^p of two Gaussians with the same scale is |dm|^p
    plain = gaussian_transport_bound(m0, s, m1, s, cost)
    assert plain.numpy() == pytest.approx((m1 - m0).abs().pow(p).view(-1).numpy())


def test_gaussian_bound_with_different_scales_is_the_w2_of_the_gaussians():
    m0, m1 = torch.tensor([[0.0, 1.0]]), torch.tensor([[0.5, 1.0]])
    s0, s1 = torch.tensor([[1.0, 1.0]]), torch.tensor([[0.5, 2.0]])
    got = gaussian_transport_bound(m0, s0, m1, s1, EuclideanCost())
    assert got.item() == pytest.approx(0.25 + 0.25 + 1.0)  # |dm|^2 + |ds|^2, the Gaussians' exact W2^2
    exact = _exact_1d(0.0, 1.0, 0.5, 0.5, -1.0, 1.0, 2) + _exact_1d(1.0, 1.0, 1.0, 2.0, -1.0, 1.0, 2)
    assert gaussian_transport_bound(m0, s0, m1, s1, EuclideanCost(), lipschitz=1.0).item() >= exact
    with pytest.raises(ValueError, match="scales differ"):
        gaussian_transport_bound(m0, s0, m1, s1, L1Cost())
    with pytest.raises(ValueError, match="EuclideanCost or L1Cost"):
        gaussian_transport_bound(m0, s0, m1, s0, DiscreteMetricCost())
    with pytest.raises(ValueError, match="broadcast"):
        gaussian_transport_bound(m0, s0, torch.zeros(1, 3), s0, EuclideanCost())
    with pytest.raises(ValueError, match="new_scale"):
        gaussian_transport_bound(m0, s0, m1, -s1, EuclideanCost())
    with pytest.raises(ValueError, match="old_loc"):
        gaussian_transport_bound(m0 * float("nan"), s0, m1, s1, EuclideanCost())
    with pytest.raises(ValueError, match="lipschitz"):
        gaussian_transport_bound(m0, s0, m1, s0, EuclideanCost(), lipschitz=-1.0)


# ------------------------------------------------------------------------------------------------
# the loss: realised_transport and project_into_trust_region on tiny fixed networks

OBS = 3


def _loss(policy, epsilon):
    torch.manual_seed(0)
    critic = ValueOperator(nn.Linear(OBS, 1), in_keys=["observation"])
    if policy == "categorical":
        actor = ProbabilisticActor(TensorDictModule(nn.Linear(OBS, 3), ["observation"], ["logits"]),
                                   in_keys=["logits"], distribution_class=Categorical)
        head = TensorDictModule(nn.Linear(OBS, 3), ["observation"], ["action_advantage"])
        return OTTrustRegionLoss(actor, critic, cost=DiscreteMetricCost(), epsilon=epsilon, policy=policy,
                                 advantage_network=head)
    net = TensorDictModule(nn.Sequential(nn.Linear(OBS, 4), NormalParamExtractor()), ["observation"], ["loc", "scale"])
    actor = ProbabilisticActor(net, in_keys=["loc", "scale"], distribution_class=TanhNormal,
                               distribution_kwargs={"low": -2.0, "high": 2.0})
    return OTTrustRegionLoss(actor, critic, cost=EuclideanCost(), epsilon=epsilon)


def _batch(policy, n=16):
    g = torch.Generator().manual_seed(3)
    action = torch.randint(3, (n,), generator=g) if policy == "categorical" else torch.rand(n, 2, generator=g) * 2 - 1
    return TensorDict({"observation": torch.randn(n, OBS, generator=g), "action": action,
                       "advantage": torch.randn(n, 1, generator=g), "value_target": torch.zeros(n, 1)}, [n])


def _perturb(loss, scale):
    with torch.no_grad():
        for p in loss._actor_params():
            p.add_(scale * torch.randn_like(p))


@pytest.mark.parametrize("policy", ["categorical", "gaussian"])
def test_realised_transport_by_hand(policy):
    loss = _loss(policy, 0.05)
    td = _batch(policy)
    loss.solve_multiplier(td)
    assert loss.realised_transport(td).item() == 0  # nothing moved yet
    _perturb(loss, 0.3)
    got = loss.realised_transport(td).item()
    with loss._params("actor_network"):
        new = loss.actor_network(td.select("observation").clone())
    if policy == "categorical":
        old_p, new_p = torch.softmax(td["logits"], -1), torch.softmax(new["logits"], -1)
        want = 0.5 * (old_p - new_p).abs().sum(-1).mean()  # the 0/1 metric's transport: total variation
    else:
        # squared Euclidean, actions in [-2, 2]: 2^2 (|dloc|^2 + |dscale|^2) per state
        want = (4 * ((new["loc"] - td["loc"]) ** 2 + (new["scale"] - td["scale"]) ** 2).sum(-1)).mean()
    assert got == pytest.approx(want.item(), rel=1e-6)


def test_realised_transport_needs_the_recorded_pi_old():
    loss = _loss("categorical", 0.05)
    with pytest.raises(ValueError, match="solve_multiplier"):
        loss.realised_transport(_batch("categorical"))
    with pytest.raises(ValueError, match="surrogate needs pi_old"):
        loss.surrogate(_batch("categorical"))


@pytest.mark.parametrize("policy", ["categorical", "gaussian"])
def test_projection_keeps_the_largest_step_inside_the_radius(policy):
    loss = _loss(policy, 0.05)
    td = _batch(policy)
    loss.solve_multiplier(td)
    theta_old = loss.actor_parameters()
    critic_before = [p.detach().clone() for p in loss.critic_network_params.values(True, True)]
    _perturb(loss, 0.5)
    theta_new = loss.actor_parameters()
    assert loss.realised_transport(td) > loss.epsilon  # the fitted step left the trust region
    info = loss.project_into_trust_region(td, theta_old, backtrack_coeff=0.8, max_backtracks=30)
    frac = info["step_fraction"].item()
    assert 0 < frac < 1 and info["backtracks"].item() > 0
    assert loss.realised_transport(td).item() == info["realised_transport"].item() <= loss.epsilon
    assert torch.allclose(loss.actor_parameters(), theta_old + frac * (theta_new - theta_old), atol=1e-6)
    # the next larger step was outside: the search keeps the largest admissible one
    set_flat_params(loss._actor_params(), theta_old + frac / 0.8 * (theta_new - theta_old))
    assert loss.realised_transport(td) > loss.epsilon
    assert all(torch.equal(a, b) for a, b in zip(critic_before, loss.critic_network_params.values(True, True),
                                                 strict=True))


def test_projection_undoes_a_step_it_cannot_shrink_inside():
    loss = _loss("categorical", 1e-4)
    td = _batch("categorical")
    loss.solve_multiplier(td)
    theta_old = loss.actor_parameters()
    _perturb(loss, 1.0)
    info = loss.project_into_trust_region(td, theta_old, max_backtracks=2)
    assert info["step_fraction"].item() == 0 and info["backtracks"].item() == 3
    assert torch.equal(loss.actor_parameters(), theta_old)  # restored bit for bit
    assert info["realised_transport"].item() == 0


def test_projection_leaves_a_step_already_inside():
    loss = _loss("gaussian", 10.0)
    td = _batch("gaussian")
    loss.solve_multiplier(td)
    theta_old = loss.actor_parameters()
    _perturb(loss, 0.01)
    theta_new = loss.actor_parameters()
    info = loss.project_into_trust_region(td, theta_old)
    assert info["step_fraction"].item() == 1 and info["backtracks"].item() == 0
    assert torch.equal(loss.actor_parameters(), theta_new)


@pytest.mark.parametrize(("kwargs", "match"), [({"backtrack_coeff": 1.0}, "backtrack_coeff"),
                                               ({"max_backtracks": -1}, "max_backtracks")])
def test_projection_refuses_bad_arguments(kwargs, match):
    loss = _loss("categorical", 0.05)
    td = _batch("categorical")
    loss.solve_multiplier(td)
    with pytest.raises(ValueError, match=match):
        loss.project_into_trust_region(td, loss.actor_parameters(), **kwargs)
    with pytest.raises(ValueError, match="theta_old"):
        loss.project_into_trust_region(td, torch.zeros(3))
    theta = loss.actor_parameters()
    with pytest.raises(ValueError, match="NaN"):
        loss.project_into_trust_region(td, torch.full_like(theta, float("nan")))
    assert torch.equal(loss.actor_parameters(), theta)  # refused before touching anything


@pytest.mark.parametrize("policy", ["categorical", "gaussian"])
def test_extension_lengthens_a_short_step_to_the_radius_without_losing_objective(policy):
    loss = _loss(policy, 0.05)
    td = _batch(policy)
    loss.solve_multiplier(td)
    if policy == "categorical":  # the target follows the head: let the batch's advantages be the head's too
        head = loss._head(td, td["ot_behaviour_probs"])
        td["advantage"] = head.gather(-1, td["action"][:, None]).detach()
    theta_old = loss.actor_parameters()
    optim = torch.optim.SGD(loss.parameters(), lr=0.02)
    for _ in range(2):  # a short fitted step: inside the radius, and better than theta_old
        optim.zero_grad()
        loss(td)["loss_objective"].backward()
        optim.step()
    theta_fit = loss.actor_parameters()

    def objective(theta):  # the importance-sampled surrogate, by hand
        set_flat_params(loss._actor_params(), theta)
        with torch.no_grad(), loss._params("actor_network"):
            new = loss.actor_network.get_dist(td.select("observation").clone())
        old = loss.actor_network.build_dist_from_params(td.select(*loss._dist_keys))
        action = td["action"]
        logp_new, logp_old = new.log_prob(action), old.log_prob(action)
        if logp_new.dim() > 1:  # Normal without Independent: the action dimensions
            logp_new, logp_old = logp_new.sum(-1), logp_old.sum(-1)
        value = ((logp_new - logp_old).exp() * td["advantage"].squeeze(-1)).mean().item()
        assert loss.surrogate(td).item() == pytest.approx(value, rel=1e-5, abs=1e-7)
        return value

    fitted_value, fitted_moved = objective(theta_fit), loss.realised_transport(td).item()
    assert fitted_moved < 0.5 * loss.epsilon and fitted_value > objective(theta_old)
    set_flat_params(loss._actor_params(), theta_fit)
    info = loss.project_into_trust_region(td, theta_old, backtrack_coeff=0.8, max_extension=8.0)
    frac = info["step_fraction"].item()
    assert frac > 1 and info["backtracks"].item() == 0
    kept = loss.actor_parameters()
    torch.testing.assert_close(kept, theta_old + frac * (theta_fit - theta_old))
    assert loss.realised_transport(td).item() == pytest.approx(info["realised_transport"].item())
    assert fitted_moved < info["realised_transport"].item() <= loss.epsilon  # longer, still inside
    assert objective(kept) >= fitted_value
    # the next step out was refused: outside the radius, worse, or beyond max_extension
    longer = theta_old + frac * (1 / 0.8) * (theta_fit - theta_old)  # the very next trial
    worse = objective(longer) < objective(kept)
    set_flat_params(loss._actor_params(), longer)
    assert frac / 0.8 > 8.0 + 1e-9 or worse or loss.realised_transport(td).item() > loss.epsilon


def test_extension_off_by_default_and_checked():
    loss = _loss("gaussian", 10.0)
    td = _batch("gaussian")
    loss.solve_multiplier(td)
    with pytest.raises(ValueError, match="max_extension"):
        loss.project_into_trust_region(td, loss.actor_parameters(), max_extension=0.5)


def _fitted_step(policy, lr=0.02, steps=2):
    """A loss with a fitted step (by default short: inside the radius, better on the batch than theta_old)."""
    loss = _loss(policy, 0.05)
    td = _batch(policy)
    loss.solve_multiplier(td)
    if policy == "categorical":
        head = loss._head(td, td["ot_behaviour_probs"])
        td["advantage"] = head.gather(-1, td["action"][:, None]).detach()
    theta_old = loss.actor_parameters()
    optim = torch.optim.SGD(loss.parameters(), lr=lr)
    for _ in range(steps):
        optim.zero_grad()
        loss(td)["loss_objective"].backward()
        optim.step()
    return loss, td, theta_old, loss.actor_parameters()


@pytest.mark.parametrize("policy", ["categorical", "gaussian"])
@pytest.mark.parametrize("start", ["backtracked", "extended"])
def test_boundary_trial_moves_closer_to_the_radius_inside_it_without_losing_surrogate(policy, start):
    if start == "backtracked":  # a long fitted step, outside: the grid shortens it
        loss, td, theta_old, theta_fit = _fitted_step(policy, lr=0.5, steps=10)
        assert loss.realised_transport(td) > loss.epsilon
        kwargs = {"max_backtracks": 30}
    else:  # a short fitted step: the grid lengthens it
        loss, td, theta_old, theta_fit = _fitted_step(policy)
        kwargs = {"max_extension": 1000.0}  # the radius, not the cap, stops the grid
    grid = loss.project_into_trust_region(td, theta_old, **kwargs)
    grid_surrogate = loss.surrogate(td).item()
    set_flat_params(loss._actor_params(), theta_fit)
    info = loss.project_into_trust_region(td, theta_old, boundary_trial=True, **kwargs)
    frac, grid_frac = info["step_fraction"].item(), grid["step_fraction"].item()
    refused = grid_frac / 0.8
    assert grid_frac < frac < refused  # strictly between the grid's kept length and its first refused one
    torch.testing.assert_close(loss.actor_parameters(), theta_old + frac * (theta_fit - theta_old))
    assert grid["realised_transport"].item() < info["realised_transport"].item() <= loss.epsilon
    assert loss.realised_transport(td).item() == pytest.approx(info["realised_transport"].item())
    assert loss.surrogate(td).item() >= grid_surrogate
    # The squared Euclidean bound grows about quadratically in the length, as the trial assumes; total variation
    # about linearly, so that the trial falls short of 0.99 there (on the safe side).
    assert info["realised_transport"].item() / loss.epsilon > (0.95 if policy == "gaussian" else 0.85)


def test_boundary_trial_outside_the_radius_is_refused_bit_for_bit(monkeypatch):
    loss, td, theta_old, theta_fit = _fitted_step("gaussian")
    grid = loss.project_into_trust_region(td, theta_old, max_extension=8.0)
    kept = loss.actor_parameters()
    set_flat_params(loss._actor_params(), theta_fit)
    real = loss.realised_transport
    calls = []

    def measured(batch):  # the grid's trials as they are; the boundary trial (the last call) just outside
        calls.append(1)
        value = real(batch)
        return value if len(calls) <= n_grid else torch.as_tensor(loss.epsilon * 1.01, dtype=value.dtype)

    counting = []
    monkeypatch.setattr(loss, "realised_transport", lambda b: counting.append(1) or real(b))
    loss.project_into_trust_region(td, theta_old, max_extension=8.0)
    n_grid = len(counting)
    set_flat_params(loss._actor_params(), theta_fit)
    monkeypatch.setattr(loss, "realised_transport", measured)
    info = loss.project_into_trust_region(td, theta_old, max_extension=8.0, boundary_trial=True)
    assert len(calls) == n_grid + 1  # one more trial was measured ...
    assert torch.equal(loss.actor_parameters(), kept)  # ... and refused: the grid's step, bit for bit
    assert info["step_fraction"].item() == grid["step_fraction"].item()


def test_boundary_trial_off_by_default_and_checked():
    loss = _loss("gaussian", 10.0)
    td = _batch("gaussian")
    loss.solve_multiplier(td)
    with pytest.raises(ValueError, match="boundary_trial"):
        loss.project_into_trust_region(td, loss.actor_parameters(), boundary_trial=1)
