"""DualSolver and MassSplittingTarget: keys, agreement with the functional core, no mutation."""

import pytest
import torch
from tensordict import TensorDict

from torchrl_ot import DiscreteMetricCost, DualSolver, EuclideanCost, IndexDistanceCost, MassSplittingTarget
from torchrl_ot.functional import solve_dual, tabular_ot_update


def _instance(seed=0, shape=(2, 5), k=4):
    g = torch.Generator().manual_seed(seed)
    adv = torch.randn(*shape, k, generator=g, dtype=torch.float64)
    cost = torch.rand(*shape, k, generator=g, dtype=torch.float64)
    cost[..., 0] = 0.0
    weight = torch.rand(*shape, generator=g, dtype=torch.float64)
    return adv, cost, weight


def test_dual_solver_matches_functional_and_flattens_batch():
    adv, cost, weight = _instance()
    td = TensorDict({"ot_advantage": adv, "ot_cost": cost, "ot_weight": weight}, batch_size=[2, 5])
    out = DualSolver(epsilon=0.05)(td)
    ref = solve_dual(adv.reshape(-1, 4), cost.reshape(-1, 4), weight.reshape(-1), 0.05)
    assert out["ot_multiplier"].shape == (2, 5)
    torch.testing.assert_close(out["ot_multiplier"][0, 0], ref.multiplier)
    torch.testing.assert_close(out["ot_dual_value"][1, 4], ref.dual_value)
    torch.testing.assert_close(out["ot_transport"][0, 0], ref.transport)
    assert torch.equal(out["ot_low_index"].reshape(-1), ref.low_index)
    assert torch.equal(out["ot_high_index"].reshape(-1), ref.high_index)
    assert ref.multiplier > 0  # the instance exercises the active constraint


def test_dual_solver_uniform_weight_when_absent():
    adv, cost, _ = _instance(1, shape=(6,))
    out = DualSolver(epsilon=0.1)(TensorDict({"ot_advantage": adv, "ot_cost": cost}, batch_size=[6]))
    ref = solve_dual(adv, cost, torch.full((6,), 1 / 6, dtype=torch.float64), 0.1)
    torch.testing.assert_close(out["ot_multiplier"][0], ref.multiplier)


def test_set_keys_renames_and_refuses_unknown():
    adv, cost, weight = _instance(2, shape=(3,))
    solver = DualSolver(epsilon=0.1).set_keys(advantage="adv", cost=("ot", "c"), multiplier="lam")
    assert solver.in_keys == ["adv", ("ot", "c")]
    assert "lam" in solver.out_keys
    td = TensorDict({"adv": adv, "ot": {"c": cost}}, batch_size=[3])
    assert "lam" in solver(td).keys()
    with pytest.raises(ValueError, match="not a key"):
        solver.set_keys(advantages="x")


def test_dual_solver_does_not_mutate_inputs():
    adv, cost, weight = _instance(3)
    td = TensorDict({"ot_advantage": adv.clone(), "ot_cost": cost.clone(), "ot_weight": weight.clone()},
                    batch_size=[2, 5])
    DualSolver(epsilon=0.05)(td)
    assert torch.equal(td["ot_advantage"], adv) and torch.equal(td["ot_cost"], cost)


@pytest.mark.parametrize("epsilon", [0.0, -1.0, float("nan"), float("inf")])
def test_modules_refuse_bad_epsilon(epsilon):
    with pytest.raises(ValueError, match="epsilon"):
        DualSolver(epsilon=epsilon)
    with pytest.raises(ValueError, match="epsilon"):
        MassSplittingTarget(cost=DiscreteMetricCost(), epsilon=epsilon)


@pytest.mark.parametrize("split", [True, False])
def test_mass_splitting_target_matches_tabular_update(split):
    g = torch.Generator().manual_seed(4)
    probs = torch.softmax(torch.randn(3, 7, 5, generator=g, dtype=torch.float64), -1)
    adv = torch.randn(3, 7, 5, generator=g, dtype=torch.float64)
    rho = torch.rand(3, 7, generator=g, dtype=torch.float64)
    td = TensorDict({"probs": probs, "action_advantage": adv, "state_weight": rho}, batch_size=[3, 7])
    out = MassSplittingTarget(cost=IndexDistanceCost(p=1), epsilon=0.1, split=split)(td)
    ref, sol = tabular_ot_update(probs.reshape(-1, 5), adv.reshape(-1, 5), rho.reshape(-1),
                                 IndexDistanceCost(p=1).matrix(5), 0.1, split=split)
    torch.testing.assert_close(out["target_probs"], ref.reshape(3, 7, 5))
    torch.testing.assert_close(out["ot_multiplier"][0, 0], sol.multiplier)
    torch.testing.assert_close(out["target_probs"].sum(-1), torch.ones(3, 7, dtype=torch.float64))


def test_mass_splitting_target_refuses_continuous_cost():
    with pytest.raises(ValueError, match="cost must be a discrete"):
        MassSplittingTarget(cost=EuclideanCost(), epsilon=0.1)
