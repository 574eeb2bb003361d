"""Tests of the exact OT-TRPO dual solver and the tabular mass-splitting update.

Every number the solver produces is checked against something computed independently here:

* the linear program (discrete-P) solved with ``scipy.optimize.linprog`` (HiGHS);
* the dual ``G`` evaluated in numpy at *every* breakpoint (G is convex and piecewise linear, so
  its minimum over ``lam >= 0`` is at 0 or at a breakpoint), or, for large batches, a binary
  search over the sorted breakpoints (valid because G is convex);
* the exact OT discrepancy between the old and new policy, ``ot.emd2`` (POT) per state.

All instances are generated from fixed seeds.
"""

from __future__ import annotations

import math

import numpy as np
import ot
import pytest
import scipy.sparse as sp
import torch
from scipy.optimize import linprog

from torchrl_ot.costs import (
    DiscreteMetricCost,
    EuclideanCost,
    IndexDistanceCost,
    L1Cost,
    MatrixCost,
)
from torchrl_ot.functional import (
    DualSolution,
    dual_objective,
    solve_dual,
    tabular_ot_update,
    tabular_problem,
    transport_plan,
)

F64 = torch.float64
F32 = torch.float32

# ----------------------------------------------------------------------------------------------
# independent reference implementations (numpy / scipy / POT only)


def np_dual(lams, adv, cost, w, eps):
    """G(lam) = lam eps + sum_b w_b max_k (A_bk - lam c_bk) for every lam in ``lams`` (float64)."""
    adv, cost, w = (np.asarray(x, dtype=np.float64) for x in (adv, cost, w))
    lams = np.atleast_1d(np.asarray(lams, dtype=np.float64))
    B, K = adv.shape
    chunk = max(1, int(4_000_000 // (B * K)))
    out = np.empty(lams.shape[0])
    for s in range(0, lams.shape[0], chunk):
        lam = lams[s:s + chunk]
        inner = (adv[None] - lam[:, None, None] * cost[None]).max(-1)
        out[s:s + chunk] = lam * eps + inner @ w
    return out


def np_breakpoints(adv, cost):
    """All lam > 0 at which two lines of one sample cross: (A_j - A_k) / (c_j - c_k)."""
    adv, cost = np.asarray(adv, np.float64), np.asarray(cost, np.float64)
    K = adv.shape[1]
    out = []
    for j in range(K):
        for k in range(j + 1, K):
            dc = cost[:, j] - cost[:, k]
            da = adv[:, j] - adv[:, k]
            ok = dc != 0
            lam = da[ok] / dc[ok]
            out.append(lam[np.isfinite(lam) & (lam > 0)])
    bps = np.unique(np.concatenate(out)) if out else np.empty(0)
    return np.concatenate([[0.0], bps])


def np_min_dual(adv, cost, w, eps):
    """min_{lam >= 0} G(lam) by brute force over 0 and all breakpoints (G must be bounded below)."""
    bps = np_breakpoints(adv, cost)
    B, K = np.shape(adv)
    if bps.size * B * K <= 30_000_000:
        return float(np_dual(bps, adv, cost, w, eps).min())
    # Large instance: G restricted to the sorted breakpoints is unimodal (G is convex).
    lo, hi = 0, bps.size - 1
    while lo < hi:
        m = (lo + hi) // 2
        g0, g1 = np_dual(bps[m:m + 2], adv, cost, w, eps)
        if g0 <= g1:
            hi = m
        else:
            lo = m + 1
    return float(np_dual(bps[lo], adv, cost, w, eps)[0])


def np_low0_cost(adv, cost, w):
    """sum_b w_b c[b, closest maximiser of A_b] (the transport of the greedy update at lam = 0)."""
    adv, cost, w = (np.asarray(x, np.float64) for x in (adv, cost, w))
    top = adv.max(1, keepdims=True)
    cmin = np.where(adv == top, cost, np.inf).min(1)
    return float((w * cmin).sum())


def lp_optimum(adv, cost, w, eps):
    """Optimum of discrete-P: max sum_bk w_b A_bk g_bk s.t. sum_k g_bk = 1, sum w_b c_bk g_bk <= eps."""
    adv, cost, w = (np.asarray(x, np.float64) for x in (adv, cost, w))
    B, K = adv.shape
    a_eq = sp.kron(sp.eye(B, format="csr"), np.ones((1, K)), format="csr")
    res = linprog(
        -(w[:, None] * adv).ravel(),
        A_ub=(w[:, None] * cost).ravel()[None],
        b_ub=[eps],
        A_eq=a_eq,
        b_eq=np.ones(B),
        bounds=(0, None),
        method="highs",
        options={"primal_feasibility_tolerance": 1e-10, "dual_feasibility_tolerance": 1e-10},
    )
    assert res.status == 0, res.message
    return -float(res.fun)


def ot_audit(policy, new_policy, state_weight, cost):
    """sum_i rho_i OT_c(pi_i, pi_new_i) with an exact OT solver per state."""
    total = 0.0
    for i in range(policy.shape[0]):
        if state_weight[i] > 0:
            total += state_weight[i] * float(ot.emd2(policy[i], new_policy[i], cost))
    return total


def close(a, b, rel=1e-7, abs_=1e-9):
    return abs(a - b) <= rel * max(abs(a), abs(b)) + abs_


# ----------------------------------------------------------------------------------------------
# 1. exactness on random tabular instances

COST_FAMILIES = ("discrete", "index1", "index2", "matrix", "euclid1d", "euclid2d", "l1_2d")
EPS_REGIMES = ("tiny", "huge", "moderate", "boundary_above", "boundary_below")
N_TABULAR = 245


def make_cost_matrix(family, A, rng):
    if family == "discrete":
        return DiscreteMetricCost().matrix(A)
    if family == "index1":
        return IndexDistanceCost(p=1).matrix(A)
    if family == "index2":
        return IndexDistanceCost(p=2).matrix(A)
    if family == "matrix":
        if rng.random() < 0.5:  # integer costs: ties, and some zero off-diagonal entries
            m = rng.integers(0, 4, size=(A, A)).astype(np.float64)
        else:
            m = rng.uniform(0.0, 3.0, size=(A, A))
        np.fill_diagonal(m, 0.0)
        return MatrixCost(torch.tensor(m)).matrix(A)
    d = 1 if family == "euclid1d" else 2
    if rng.random() < 0.5:
        emb = torch.tensor(rng.integers(-2, 3, size=(A, d)), dtype=F64)
    else:
        emb = torch.tensor(rng.normal(size=(A, d)))
    cost = L1Cost() if family == "l1_2d" else EuclideanCost()
    return cost(emb[:, None, :], emb[None, :, :])


def make_tabular(n):
    rng = np.random.default_rng(10_000 + n)
    family = COST_FAMILIES[n % len(COST_FAMILIES)]
    regime = EPS_REGIMES[(n // len(COST_FAMILIES)) % len(EPS_REGIMES)]
    S, A = int(rng.integers(1, 7)), int(rng.integers(2, 6))
    cost = make_cost_matrix(family, A, rng).to(F64)
    if n % 2 == 0:
        adv = rng.integers(-2, 3, size=(S, A)).astype(np.float64)  # ties
    else:
        adv = rng.normal(size=(S, A))
    policy = rng.dirichlet(np.ones(A), size=S)
    policy[rng.random((S, A)) < 0.3] = 0.0
    for i in range(S):
        if rng.random() < 0.1:
            policy[i] = 0.0
            policy[i, rng.integers(A)] = 1.0
        if policy[i].sum() == 0:
            policy[i, rng.integers(A)] = 1.0
    policy /= policy.sum(1, keepdims=True)
    rho = rng.uniform(0.1, 1.0, size=S)
    rho[rng.random(S) < 0.25] = 0.0
    if rho.sum() == 0:
        rho[rng.integers(S)] = 1.0
    rho /= rho.sum()
    # flattened problem, built here independently of tabular_problem
    c_np = cost.numpy()
    f_adv = np.repeat(adv, A, axis=0)  # row (i, j) -> A[i]
    f_cost = np.tile(c_np, (S, 1))  # row (i, j) -> c[j]
    f_w = (rho[:, None] * policy).ravel()
    c_low0 = np_low0_cost(f_adv, f_cost, f_w)
    if regime == "tiny":
        eps = 1e-6
    elif regime == "huge":
        eps = 1e6
    elif regime == "moderate":
        eps = float(rng.uniform(0.05, 0.95)) * c_low0 if c_low0 > 0 else 0.1
    elif regime == "boundary_above":
        eps = c_low0 * (1 + 1e-12) if c_low0 > 0 else 1e-3
    else:
        eps = c_low0 * (1 - 1e-9) if c_low0 > 0 else 1e-6
    return dict(policy=policy, adv=adv, rho=rho, cost=c_np, eps=eps, f_adv=f_adv, f_cost=f_cost,
                f_w=f_w, c_low0=c_low0, family=family, regime=regime)


@pytest.mark.parametrize("n", range(N_TABULAR))
def test_tabular_exact_against_lp(n):
    inst = make_tabular(n)
    policy, adv, rho, cost, eps = (inst[k] for k in ("policy", "adv", "rho", "cost", "eps"))
    f_adv, f_cost, f_w = inst["f_adv"], inst["f_cost"], inst["f_w"]

    new_policy, sol = tabular_ot_update(
        torch.tensor(policy), torch.tensor(adv), torch.tensor(rho), torch.tensor(cost), eps
    )
    assert isinstance(sol, DualSolution)
    new = new_policy.numpy()
    lam = float(sol.multiplier)
    dual_value = float(sol.dual_value)
    assert math.isfinite(lam) and math.isfinite(dual_value) and lam >= 0

    # (c) the LP optimum, independently
    lp = lp_optimum(f_adv, f_cost, f_w, eps)
    # (a) dual value at lam* and G evaluated independently at lam*
    assert close(dual_value, lp), (dual_value, lp)
    assert close(float(np_dual(lam, f_adv, f_cost, f_w, eps)[0]), lp)
    # (b) surrogate of the mass-split policy
    surrogate = float((rho[:, None] * new * adv).sum())
    assert close(surrogate, lp), (surrogate, lp)
    # (d) audited transport within the trust region
    audit = ot_audit(policy, new, rho, cost)
    assert audit <= eps * (1 + 1e-9), (audit, eps)
    assert float(sol.transport) <= eps * (1 + 1e-9)
    # (e) rows on the simplex (unvisited states included)
    assert new.min() >= 0.0
    np.testing.assert_allclose(new.sum(1), 1.0, rtol=0, atol=1e-12)

    # lam* = 0 exactly iff the greedy (closest-maximiser) update already fits
    if inst["c_low0"] <= eps:
        assert lam == 0.0
    else:
        assert lam > 0.0
        # the constraint binds: the mass-split update spends exactly epsilon
        assert close(float(sol.transport), eps, rel=1e-9, abs_=0)
        assert close(audit, eps, rel=1e-7, abs_=1e-15)

    # lam* is a true minimiser of G
    bps = np_breakpoints(f_adv, f_cost)
    top = max(bps.max(), lam, 1.0)
    grid = np.concatenate([np.linspace(0.0, 2 * top, 201), bps,
                           [lam + 1e-6 * max(lam, 1.0), max(lam - 1e-6 * max(lam, 1.0), 0.0)]])
    g_star = float(np_dual(lam, f_adv, f_cost, f_w, eps)[0])
    g_grid = np_dual(grid, f_adv, f_cost, f_w, eps)
    assert g_star <= g_grid.min() + 1e-12 * (1 + abs(g_star)), (g_star, g_grid.min())


def test_tabular_instances_cover_the_regimes():
    """The generator really produces the advertised mix (otherwise the test above proves little)."""
    seen_families, seen_regimes = set(), set()
    n_zero_lam = n_pos_lam = n_zero_rho = n_zero_pi = 0
    for n in range(N_TABULAR):
        inst = make_tabular(n)
        seen_families.add(inst["family"])
        seen_regimes.add(inst["regime"])
        n_zero_lam += inst["c_low0"] <= inst["eps"]
        n_pos_lam += inst["c_low0"] > inst["eps"]
        n_zero_rho += bool((inst["rho"] == 0).any())
        n_zero_pi += bool((inst["policy"] == 0).any())
    assert seen_families == set(COST_FAMILIES)
    assert seen_regimes == set(EPS_REGIMES)
    assert min(n_zero_lam, n_pos_lam, n_zero_rho, n_zero_pi) >= 30


def test_tabular_problem_flattening():
    rng = np.random.default_rng(1)
    S, A = 3, 4
    policy = rng.dirichlet(np.ones(A), size=S)
    adv = rng.normal(size=(S, A))
    rho = rng.uniform(size=S)
    cost = IndexDistanceCost(p=1).matrix(A).numpy()
    f_adv, f_cost, f_w = tabular_problem(*(torch.tensor(x) for x in (policy, adv, rho, cost)))
    assert f_adv.shape == f_cost.shape == (S * A, A) and f_w.shape == (S * A,)
    for i in range(S):
        for j in range(A):
            b = i * A + j
            np.testing.assert_array_equal(f_adv[b].numpy(), adv[i])
            np.testing.assert_array_equal(f_cost[b].numpy(), cost[j])
            assert f_w[b].item() == rho[i] * policy[i, j]


def test_tabular_docstring_example():
    pi = torch.full((1, 2), 0.5, dtype=F64)
    adv = torch.tensor([[-1.0, 1.0]], dtype=F64)
    cost = torch.tensor([[0.0, 1.0], [1.0, 0.0]], dtype=F64)
    new, sol = tabular_ot_update(pi, adv, torch.ones(1, dtype=F64), cost, 0.2)
    torch.testing.assert_close(new, torch.tensor([[0.3, 0.7]], dtype=F64), rtol=0, atol=1e-15)
    assert sol.multiplier.item() == 2.0
    assert sol.dual_value.item() == pytest.approx(-0.5 * 1 + 0.5 * 1 + 0.2 * 2, abs=1e-15)


def _unvisited_instance():
    rng = np.random.default_rng(3)
    S, A = 4, 3
    policy = rng.dirichlet(np.ones(A), size=S)
    adv = rng.normal(size=(S, A))
    rho = np.array([0.5, 0.0, 0.5, 0.0])
    return policy, adv, rho, IndexDistanceCost(p=1).matrix(A).numpy()


def test_tabular_unvisited_states_do_not_influence_visited_ones():
    """States with rho = 0 are outside the problem: changing them changes nothing else."""
    policy, adv, rho, cost = _unvisited_instance()
    new, sol = tabular_ot_update(*(torch.tensor(x) for x in (policy, adv, rho, cost)), 0.05)
    policy2, adv2 = policy.copy(), adv.copy()
    policy2[rho == 0] = np.array([1.0, 0.0, 0.0])
    adv2[rho == 0] = 10.0 * np.random.default_rng(4).normal(size=(2, 3))
    new2, sol2 = tabular_ot_update(*(torch.tensor(x) for x in (policy2, adv2, rho, cost)), 0.05)
    assert float(sol2.multiplier) == float(sol.multiplier)
    assert float(sol2.dual_value) == pytest.approx(float(sol.dual_value), rel=1e-14)
    np.testing.assert_allclose(new2.numpy()[rho > 0], new.numpy()[rho > 0], rtol=0, atol=1e-15)
    for n in (new, new2):
        assert n.min() >= 0
        np.testing.assert_allclose(n.sum(1).numpy(), 1.0, rtol=0, atol=1e-12)


def test_tabular_unvisited_states_follow_the_same_transport_maps():
    """States with state_weight 0 are free in (P): they get the lam*-regularised maps of eq. 9-10."""
    policy, adv, rho, cost = (torch.tensor(x) for x in _unvisited_instance())
    new, sol = tabular_ot_update(policy, adv, rho, cost, 0.05)
    S, A = policy.shape
    plan = transport_plan(sol, A).reshape(S, A, A)
    expected = (policy[:, :, None] * plan).sum(1)
    torch.testing.assert_close(new, expected, rtol=0, atol=1e-14)
    unvisited = rho == 0
    assert unvisited.any() and not torch.equal(new[unvisited], policy[unvisited])
    # Each unvisited state's mass moves to maximisers of A - lam* c: never to a worse action.
    reg = adv[:, None, :] - sol.multiplier * cost[None]
    best = reg.amax(-1)
    chosen = reg.reshape(S * A, A).gather(1, sol.low_index[:, None]).reshape(S, A)
    torch.testing.assert_close(chosen, best)


def test_tabular_zero_state_weights_everywhere_no_nan():
    rng = np.random.default_rng(2)
    policy = torch.tensor(rng.dirichlet(np.ones(3), size=4))
    adv = torch.tensor(rng.normal(size=(4, 3)))
    new, sol = tabular_ot_update(policy, adv, torch.zeros(4, dtype=F64), DiscreteMetricCost().matrix(3), 0.1)
    assert sol.multiplier.item() == 0.0
    assert not torch.isnan(sol.dual_value) and sol.dual_value.item() == 0.0
    assert torch.isfinite(new).all() and (new >= 0).all()
    torch.testing.assert_close(new.sum(1), torch.ones(4, dtype=F64), rtol=0, atol=1e-12)


# ----------------------------------------------------------------------------------------------
# 2. generic [B, K] instances


def make_generic(B, K, kind, seed, regime="moderate"):
    rng = np.random.default_rng(seed)
    if kind == "hinge":  # candidate 0: stay (advantage 0, cost 0); candidate 1: the sampled action
        assert K == 2
        adv = np.stack([np.zeros(B), rng.normal(size=B)], 1)
        c1 = rng.exponential(size=B)
        c1[rng.random(B) < 0.05] = 0.0
        cost = np.stack([np.zeros(B), c1], 1)
    elif kind == "ties":
        adv = rng.integers(-3, 4, size=(B, K)).astype(np.float64)
        cost = rng.integers(0, 4, size=(B, K)).astype(np.float64)
        cost[np.arange(B), rng.integers(0, K, B)] = 0.0
    else:
        adv = rng.normal(size=(B, K))
        cost = rng.uniform(0.0, 3.0, size=(B, K))
        cost[np.arange(B), rng.integers(0, K, B)] = 0.0
    w = rng.uniform(size=B)
    w[rng.random(B) < 0.2] = 0.0
    if w.sum() == 0:
        w[0] = 1.0
    w /= w.sum()
    c_low0 = np_low0_cost(adv, cost, w)
    if regime == "huge" or c_low0 == 0:
        eps = 1e6
    elif regime == "tiny":
        eps = 1e-6
    elif regime == "loose":  # the constraint barely binds: lam* among the smallest breakpoints
        eps = 0.9997 * c_low0
    elif regime == "tight":  # lam* among the largest breakpoints, but not the largest
        eps = 3e-4 * c_low0
    else:
        eps = float(rng.uniform(0.05, 0.95)) * c_low0
    return adv, cost, w, eps


def check_generic(adv, cost, w, eps, dtype, *, use_lp):
    t_adv, t_cost, t_w = (torch.tensor(x, dtype=dtype) for x in (adv, cost, w))
    # the reference sees exactly the numbers the solver sees
    adv, cost, w = (x.double().numpy() for x in (t_adv, t_cost, t_w))
    eps = float(torch.tensor(eps, dtype=dtype))
    sol = solve_dual(t_adv, t_cost, t_w, eps)
    B, K = adv.shape
    rel = 1e-9 if dtype == F64 else 1e-5
    scale = float((w * np.abs(adv).max(1)).sum()) + 1e-300

    lam, dv = float(sol.multiplier), float(sol.dual_value)
    assert sol.dual_value.dtype == dtype and sol.multiplier.dtype == dtype
    assert math.isfinite(lam) and math.isfinite(dv) and lam >= 0
    ref = np_min_dual(adv, cost, w, eps)
    assert abs(dv - ref) <= rel * max(abs(ref), scale), (dv, ref)
    assert abs(float(np_dual(lam, adv, cost, w, eps)[0]) - ref) <= rel * max(abs(ref), scale)
    if use_lp:
        lp = lp_optimum(adv, cost, w, eps)
        assert abs(dv - lp) <= max(rel, 1e-8) * max(abs(lp), scale), (dv, lp)

    # lam* = 0 exactly iff the closest maximisers at 0 fit
    c_low0 = np_low0_cost(adv, cost, w)
    if c_low0 <= eps * (1 - 1e-6):
        assert lam == 0.0
    elif c_low0 > eps * (1 + 1e-6):
        assert lam > 0.0

    # indices: maximisers of A - lam* c, low no costlier than high, fields consistent
    low, high = sol.low_index.numpy(), sol.high_index.numpy()
    assert low.shape == high.shape == (B,)
    assert low.min() >= 0 and high.max() < K
    reg = adv - lam * cost
    best = reg.max(1)
    row_tol = rel * (np.abs(adv).max(1) + lam * cost.max(1)) + 1e-300
    live = w > 0
    rows = np.arange(B)
    assert np.all((best - reg[rows, low] <= row_tol)[live])
    assert np.all((best - reg[rows, high] <= row_tol)[live])
    assert np.all((cost[rows, low] <= cost[rows, high])[live])
    assert float(sol.low_cost) == pytest.approx(float((w * cost[rows, low]).sum()), rel=rel, abs=1e-300)
    assert float(sol.high_cost) == pytest.approx(float((w * cost[rows, high]).sum()), rel=rel, abs=1e-300)
    t = float(sol.split)
    assert 0.0 <= t <= 1.0
    if lam > 0:
        assert float(sol.low_cost) <= eps * (1 + rel) <= float(sol.high_cost) * (1 + 2 * rel)
    if dtype == F64:
        # low is the cheapest maximiser, high the costliest (T_low / T_high of eq. 5)
        is_max = reg >= (best - row_tol)[:, None]
        np.testing.assert_array_equal(cost[rows, low][live], np.where(is_max, cost, np.inf).min(1)[live])
        np.testing.assert_array_equal(cost[rows, high][live], np.where(is_max, cost, -np.inf).max(1)[live])

    # the mass-split plan: rows on the simplex, objective = dual value, transport within epsilon
    plan = transport_plan(sol, K).double().numpy()
    assert plan.shape == (B, K) and plan.min() >= 0
    np.testing.assert_allclose(plan.sum(1), 1.0, rtol=0, atol=10 * rel)
    objective = float((w[:, None] * plan * adv).sum())
    transport = float((w[:, None] * plan * cost).sum())
    assert abs(objective - ref) <= rel * max(abs(ref), scale), (objective, ref)
    assert transport <= eps * (1 + rel) + rel * float(sol.high_cost) * 1e-3
    assert float(sol.transport) <= eps * (1 + rel)
    if lam > 0:
        assert transport == pytest.approx(eps, rel=100 * rel)
    return sol


GENERIC_CASES = [
    # (B, K, kind, regime, seeds)
    (1, 1, "generic", "huge", 3),
    (9, 1, "generic", "huge", 2),
    (1, 2, "hinge", "moderate", 6),
    (1, 2, "generic", "moderate", 6),
    (3, 2, "hinge", "moderate", 6),
    (50, 2, "hinge", "moderate", 4),
    (50, 2, "hinge", "tiny", 2),
    (50, 2, "hinge", "huge", 2),
    (1, 5, "generic", "moderate", 6),
    (40, 3, "generic", "moderate", 4),
    (40, 3, "generic", "tiny", 2),
    (200, 5, "generic", "moderate", 3),
    (200, 5, "ties", "moderate", 4),
    (200, 5, "ties", "huge", 2),
    (2000, 3, "generic", "moderate", 1),
    (2000, 4, "ties", "moderate", 1),
]


@pytest.mark.parametrize("dtype", [F64, F32], ids=["f64", "f32"])
@pytest.mark.parametrize("B,K,kind,regime,n_seeds", GENERIC_CASES,
                         ids=[f"B{c[0]}-K{c[1]}-{c[2]}-{c[3]}" for c in GENERIC_CASES])
def test_generic_against_breakpoints_and_lp(B, K, kind, regime, n_seeds, dtype):
    if dtype == F32 and regime == "tiny":
        pytest.skip("epsilon 1e-6 is below float32 resolution of the costs")
    for seed in range(n_seeds):
        adv, cost, w, eps = make_generic(B, K, kind, 100 * B + 10 * K + seed, regime)
        check_generic(adv, cost, w, eps, dtype, use_lp=B <= 2000)


LARGE_CASES = [(2, "hinge", "moderate"), (4, "generic", "moderate"), (3, "ties", "moderate"),
               (2, "hinge", "tiny"), (4, "generic", "tiny"), (3, "ties", "tiny"),
               (2, "hinge", "loose"), (4, "generic", "loose"), (3, "ties", "loose"),
               (2, "hinge", "tight"), (4, "generic", "tight"), (3, "ties", "tight")]


@pytest.mark.parametrize("dtype", [F64, F32], ids=["f64", "f32"])
@pytest.mark.parametrize("K,kind,regime", LARGE_CASES, ids=["-".join(map(str, c)) for c in LARGE_CASES])
def test_generic_large_batch(K, kind, regime, dtype):
    """B = 10^4: several thousand breakpoints, so the linear-time selection does the work.

    'tiny' puts lam* among the largest breakpoints, 'loose' among the smallest: both ends of the
    selection's bracketing.
    """
    if dtype == F32 and regime == "tiny":
        pytest.skip("epsilon 1e-6 is below float32 resolution of the costs")
    B = 10_000
    adv, cost, w, eps = make_generic(B, K, kind, 7 + K, regime)
    assert np_breakpoints(adv, cost).size > 4096 or kind == "ties"
    check_generic(adv, cost, w, eps, dtype, use_lp=False)


def _selection_instance(order, dtype):
    """Hinge with unit costs: sample b has breakpoint v_b = advantage_b and weight 1/B.

    The extreme breakpoints sit at positions 1..8 of the batch, where a strided sample of the
    breakpoints never looks; lam* is then the k-th smallest or largest breakpoint, in closed form.
    """
    B = 10_000
    rng = np.random.default_rng(42)
    if order == "duplicates":
        v = rng.choice([1.0, 2.0, 3.0], p=[0.1, 0.8, 0.1], size=B)  # > 4096 copies of 2
    else:
        v = rng.permutation(B).astype(np.float64) + 1.0
        ext = np.concatenate([np.arange(1, 5), np.arange(B - 3, B + 1)]).astype(np.float64)
        rest = v[~np.isin(v, ext)]
        v = np.concatenate([rest[:1], ext, rest[1:]])
    adv = np.stack([np.zeros(B), v], 1)
    cost = np.stack([np.zeros(B), np.ones(B)], 1)
    w = np.full(B, 1.0 / B)
    return tuple(torch.tensor(x, dtype=dtype) for x in (adv, cost, w)), v


@pytest.mark.parametrize("dtype", [F64, F32], ids=["f64", "f32"])
@pytest.mark.parametrize("order,eps_units", [("extremes", 2.5), ("extremes", 10_000 - 2.5),
                                             ("extremes", 5_000.5), ("duplicates", 2.5),
                                             ("duplicates", 5_000.5), ("duplicates", 9_000.5)])
def test_weighted_selection_closed_form(order, eps_units, dtype):
    (adv, cost, w), v = _selection_instance(order, dtype)
    B = v.size
    eps = eps_units / B  # c_low0 = 1: every sample moves at lam = 0
    # lam* = smallest v with #(v_b <= v) / B >= 1 - eps
    vs = np.sort(v)
    expected = vs[int(math.ceil(B - eps_units)) - 1]
    sol = solve_dual(adv, cost, w, eps)
    assert float(sol.multiplier) == expected
    g = expected * eps + np.maximum(v - expected, 0.0).sum() / B
    assert float(sol.dual_value) == pytest.approx(g, rel=1e-12 if dtype == F64 else 1e-5)
    assert float(sol.transport) == pytest.approx(eps, rel=1e-9 if dtype == F64 else 1e-4)


def test_generic_large_batch_against_lp():
    adv, cost, w, eps = make_generic(10_000, 2, "hinge", 99, "moderate")
    sol = solve_dual(*(torch.tensor(x) for x in (adv, cost, w)), eps)
    lp = lp_optimum(adv, cost, w, eps)
    assert float(sol.dual_value) == pytest.approx(lp, rel=1e-8)


def test_float32_agrees_with_float64():
    adv, cost, w, eps = make_generic(500, 4, "generic", 5, "moderate")
    s64 = solve_dual(*(torch.tensor(x, dtype=F64) for x in (adv, cost, w)), eps)
    s32 = solve_dual(*(torch.tensor(x, dtype=F32) for x in (adv, cost, w)), eps)
    assert float(s32.dual_value) == pytest.approx(float(s64.dual_value), rel=1e-5)
    assert float(s32.multiplier) == pytest.approx(float(s64.multiplier), rel=1e-4)


def test_mixed_dtypes_promote():
    adv, cost, w, eps = make_generic(30, 3, "generic", 6, "moderate")
    sol = solve_dual(torch.tensor(adv, dtype=F32), torch.tensor(cost, dtype=F64), torch.tensor(w, dtype=F32),
                     eps)
    assert sol.dual_value.dtype == F64 and sol.multiplier.dtype == F64


def test_permutation_and_duplication_invariance():
    adv, cost, w, eps = make_generic(60, 4, "generic", 8, "moderate")
    t = [torch.tensor(x) for x in (adv, cost, w)]
    base = solve_dual(*t, eps)
    perm = torch.randperm(60, generator=torch.Generator().manual_seed(0))
    permuted = solve_dual(t[0][perm], t[1][perm], t[2][perm], eps)
    assert float(permuted.multiplier) == float(base.multiplier)
    assert float(permuted.dual_value) == pytest.approx(float(base.dual_value), rel=1e-12)
    torch.testing.assert_close(permuted.low_index, base.low_index[perm])
    # splitting every sample into two halves changes nothing
    dup = solve_dual(torch.cat([t[0], t[0]]), torch.cat([t[1], t[1]]), torch.cat([t[2], t[2]]) / 2, eps)
    assert float(dup.multiplier) == float(base.multiplier)
    assert float(dup.dual_value) == pytest.approx(float(base.dual_value), rel=1e-12)


def test_hinge_by_hand():
    # docstring example: only the better sample moves, half of it
    adv = torch.tensor([[0.0, 1.0], [0.0, 2.0]])
    cost = torch.tensor([[0.0, 1.0], [0.0, 1.0]])
    sol = solve_dual(adv, cost, torch.tensor([0.5, 0.5]), 0.25)
    assert sol.multiplier.item() == 2.0
    assert sol.split.item() == pytest.approx(0.5)
    assert sol.transport.item() == pytest.approx(0.25)
    assert sol.dual_value.item() == pytest.approx(0.5)
    torch.testing.assert_close(sol.low_index, torch.tensor([0, 0]))
    torch.testing.assert_close(sol.high_index, torch.tensor([0, 1]))
    plan = transport_plan(sol, 2)
    torch.testing.assert_close(plan, torch.tensor([[1.0, 0.0], [0.5, 0.5]]))
    # WPO rule: whole mass to the lower index of (low, high)
    torch.testing.assert_close(transport_plan(sol, 2, split=False), torch.tensor([[1.0, 0.0], [1.0, 0.0]]))


def test_k1_single_candidate():
    adv = torch.tensor([[3.0], [-1.0]], dtype=F64)
    w = torch.tensor([0.25, 0.75], dtype=F64)
    sol = solve_dual(adv, torch.zeros(2, 1, dtype=F64), w, 0.1)
    assert sol.multiplier.item() == 0.0
    assert sol.dual_value.item() == pytest.approx(0.0)
    torch.testing.assert_close(transport_plan(sol, 1), torch.ones(2, 1, dtype=F64))
    # positive cost that fits: lam* = 0
    sol = solve_dual(adv, torch.ones(2, 1, dtype=F64), w, 1.5)
    assert sol.multiplier.item() == 0.0 and sol.dual_value.item() == pytest.approx(0.0)
    # positive cost that does not fit: infeasible
    with pytest.raises(ValueError, match="infeasible|epsilon"):
        solve_dual(adv, torch.ones(2, 1, dtype=F64), w, 0.5)


def test_dual_objective_matches_numpy():
    adv, cost, w, eps = make_generic(20, 4, "generic", 9, "moderate")
    t = [torch.tensor(x) for x in (adv, cost, w)]
    lams = np.array([0.0, 0.1, 0.7, 3.0, 11.0])
    for lam in lams:
        assert float(dual_objective(float(lam), *t, eps)) == pytest.approx(
            float(np_dual(lam, adv, cost, w, eps)[0]), rel=1e-13)
    vec = dual_objective(torch.tensor(lams), *t, eps)
    np.testing.assert_allclose(vec.numpy(), np_dual(lams, adv, cost, w, eps), rtol=1e-13)
    sol = solve_dual(*t, eps)
    assert float(dual_objective(sol.multiplier, *t, eps)) == pytest.approx(float(sol.dual_value), rel=1e-12)


def test_solution_fields_and_properties():
    adv, cost, w, eps = make_generic(25, 3, "generic", 10, "moderate")
    sol = solve_dual(*(torch.tensor(x) for x in (adv, cost, w)), torch.tensor(eps, dtype=F64))
    for f in ("multiplier", "dual_value", "low_cost", "high_cost", "split", "epsilon"):
        assert getattr(sol, f).shape == ()
    assert sol.low_index.dtype == torch.long and sol.high_index.dtype == torch.long
    assert float(sol.epsilon) == eps
    assert bool(sol.active) == (float(sol.multiplier) > 0)
    assert float(sol.transport) == pytest.approx(
        float(sol.split) * float(sol.low_cost) + (1 - float(sol.split)) * float(sol.high_cost))


@pytest.mark.parametrize("adv,cost,w,eps", [
    ([[0.0, 1.0], [0.0, 2.0]], [[0.0, 1.0], [0.0, 1.0]], [0.5, 0.5], 1.0),
    ([[0.0, 1.0, 2.0]], [[0.0, 0.5, 1.0]], [1.0], 1.0),
    ([[2.0, 1.0, 0.0], [0.0, 0.0, 3.0]], [[0.0, 0.5, 1.0], [0.25, 0.0, 2.0]], [0.5, 0.25], 0.5),
], ids=["hinge", "k3", "k3_two_rows"])
def test_lambda_zero_exactly_at_the_boundary(adv, cost, w, eps):
    """epsilon == sum_b w_b c[b, closest maximiser at 0] exactly: the constraint does not bind."""
    adv, cost, w = (torch.tensor(x, dtype=F64) for x in (adv, cost, w))
    assert np_low0_cost(adv.numpy(), cost.numpy(), w.numpy()) == eps  # exact in binary
    sol = solve_dual(adv, cost, w, eps)
    assert sol.multiplier.item() == 0.0
    assert sol.transport.item() == eps
    assert sol.dual_value.item() == float((w * adv.amax(1)).sum())
    # one ulp less: the constraint binds
    below = float(np.nextafter(eps, 0.0))
    sol = solve_dual(adv, cost, w, below)
    assert sol.multiplier.item() > 0.0
    assert sol.transport.item() <= below


def test_tabular_lambda_zero_exactly_at_the_boundary():
    policy = torch.tensor([[0.5, 0.5]], dtype=F64)
    adv = torch.tensor([[1.0, 0.0]], dtype=F64)
    new, sol = tabular_ot_update(policy, adv, torch.ones(1, dtype=F64), DiscreteMetricCost().matrix(2), 0.5)
    assert sol.multiplier.item() == 0.0
    assert torch.equal(new, torch.tensor([[1.0, 0.0]], dtype=F64))


def test_tiny_and_huge_epsilon_hinge_closed_form():
    # one sample, hinge: the mass that may move is eps / c
    adv = torch.tensor([[0.0, 2.0]], dtype=F64)
    cost = torch.tensor([[0.0, 4.0]], dtype=F64)
    w = torch.ones(1, dtype=F64)
    sol = solve_dual(adv, cost, w, 1e-6)
    assert sol.multiplier.item() == 0.5
    assert sol.split.item() == pytest.approx(1 - 1e-6 / 4, rel=1e-15)
    assert sol.dual_value.item() == pytest.approx(0.5e-6, rel=1e-12)
    sol = solve_dual(adv, cost, w, 1e6)
    assert sol.multiplier.item() == 0.0 and sol.dual_value.item() == 2.0
    assert sol.low_index.item() == 1 and sol.split.item() == 1.0


# ----------------------------------------------------------------------------------------------
# 3. splitting keeps the trust region; the WPO rule leaves it


def test_wpo_rule_overshoots_while_split_stays_inside():
    # One state, two actions, pi = [0.5, 0.5], discrete metric, advantage favouring action 0.
    # At lam* = 1 the mass on action 1 has two maximisers: stay (closest, index 1) and move to
    # action 0 (farthest, index 0). WPO sends all of it to index 0: transport 0.5 > eps = 0.1.
    policy = torch.tensor([[0.5, 0.5]], dtype=F64)
    adv = torch.tensor([[1.0, 0.0]], dtype=F64)
    rho = torch.ones(1, dtype=F64)
    cost = DiscreteMetricCost().matrix(2)
    eps = 0.1
    new_split, sol = tabular_ot_update(policy, adv, rho, cost, eps, split=True)
    new_wpo, sol_wpo = tabular_ot_update(policy, adv, rho, cost, eps, split=False)
    assert sol.multiplier.item() == 1.0
    torch.testing.assert_close(new_split, torch.tensor([[0.6, 0.4]], dtype=F64), rtol=0, atol=1e-15)
    torch.testing.assert_close(new_wpo, torch.tensor([[1.0, 0.0]], dtype=F64))

    c = cost.numpy()
    audit_split = ot_audit(policy.numpy(), new_split.numpy(), rho.numpy(), c)
    audit_wpo = ot_audit(policy.numpy(), new_wpo.numpy(), rho.numpy(), c)
    assert audit_split <= eps * (1 + 1e-9)
    assert audit_split == pytest.approx(eps)
    assert audit_wpo > eps
    assert audit_wpo == pytest.approx(0.5)
    # ... and its surrogate beats the LP optimum, which is only possible outside the region
    lp = lp_optimum(np.array([[1.0, 0.0], [1.0, 0.0]]), c, np.array([0.5, 0.5]), eps)
    assert float((new_wpo.numpy() * adv.numpy()).sum()) > lp + 1e-3
    assert float((new_split.numpy() * adv.numpy()).sum()) == pytest.approx(lp, rel=1e-12)


def test_wpo_rule_overshoots_three_actions():
    policy = torch.tensor([[0.2, 0.3, 0.5]], dtype=F64)
    adv = torch.tensor([[2.0, 0.0, 1.0]], dtype=F64)
    rho = torch.ones(1, dtype=F64)
    cost = IndexDistanceCost(p=1).matrix(3)
    eps = 0.1  # lam* = 2; the mass on action 1 may stay or jump to action 0 (cost 1)
    new_split, _ = tabular_ot_update(policy, adv, rho, cost, eps, split=True)
    new_wpo, _ = tabular_ot_update(policy, adv, rho, cost, eps, split=False)
    c = cost.numpy()
    assert ot_audit(policy.numpy(), new_split.numpy(), rho.numpy(), c) <= eps * (1 + 1e-9)
    assert ot_audit(policy.numpy(), new_wpo.numpy(), rho.numpy(), c) == pytest.approx(0.3)  # 3 eps
    np.testing.assert_allclose(new_wpo.sum(1).numpy(), 1.0, atol=1e-12)


# ----------------------------------------------------------------------------------------------
# 4. bad input: ValueError naming the argument, never NaN


def _valid(B=3, K=2):
    adv = torch.tensor([[0.0, 1.0], [0.0, -1.0], [0.0, 2.0]], dtype=F64)[:B, :K]
    cost = torch.tensor([[0.0, 1.0], [0.0, 1.0], [0.0, 2.0]], dtype=F64)[:B, :K]
    w = torch.full((B,), 1.0 / B, dtype=F64)
    return adv, cost, w


def _with(t, idx, value):
    t = t.clone()
    t[idx] = value
    return t


BAD_DUAL = {
    "adv_nan": (lambda a, c, w: (_with(a, (0, 1), float("nan")), c, w, 0.1), "advantage"),
    "adv_inf": (lambda a, c, w: (_with(a, (1, 0), float("inf")), c, w, 0.1), "advantage"),
    "adv_neginf": (lambda a, c, w: (_with(a, (1, 0), -float("inf")), c, w, 0.1), "advantage"),
    "cost_nan": (lambda a, c, w: (a, _with(c, (0, 1), float("nan")), w, 0.1), "cost"),
    "cost_inf": (lambda a, c, w: (a, _with(c, (0, 1), float("inf")), w, 0.1), "cost"),
    "cost_negative": (lambda a, c, w: (a, _with(c, (2, 1), -0.5), w, 0.1), "cost"),
    "weight_negative": (lambda a, c, w: (a, c, _with(w, 1, -0.1), 0.1), "weight"),
    "weight_nan": (lambda a, c, w: (a, c, _with(w, 1, float("nan")), 0.1), "weight"),
    "weight_inf": (lambda a, c, w: (a, c, _with(w, 1, float("inf")), 0.1), "weight"),
    "eps_zero": (lambda a, c, w: (a, c, w, 0.0), "epsilon"),
    "eps_negative": (lambda a, c, w: (a, c, w, -0.1), "epsilon"),
    "eps_nan": (lambda a, c, w: (a, c, w, float("nan")), "epsilon"),
    "eps_inf": (lambda a, c, w: (a, c, w, float("inf")), "epsilon"),
    "eps_tensor_zero": (lambda a, c, w: (a, c, w, torch.tensor(0.0)), "epsilon"),
    "eps_tensor_nan": (lambda a, c, w: (a, c, w, torch.tensor(float("nan"))), "epsilon"),
    "eps_vector": (lambda a, c, w: (a, c, w, torch.tensor([0.1, 0.2])), "epsilon"),
    "eps_string": (lambda a, c, w: (a, c, w, "0.1"), "epsilon"),
    "cost_shape": (lambda a, c, w: (a, c[:, :1], w, 0.1), "cost"),
    "cost_transposed": (lambda a, c, w: (a, c.T, w, 0.1), "cost"),
    "weight_shape": (lambda a, c, w: (a, c, w[:2], 0.1), "weight"),
    "weight_2d": (lambda a, c, w: (a, c, w[:, None], 0.1), "weight"),
    "adv_1d": (lambda a, c, w: (a[:, 0], c[:, 0], w, 0.1), "advantage"),
    "empty_batch": (lambda a, c, w: (a[:0], c[:0], w[:0], 0.1), "advantage"),
    "no_candidates": (lambda a, c, w: (a[:, :0], c[:, :0], w, 0.1), "advantage"),
    "adv_integer": (lambda a, c, w: (a.long(), c, w, 0.1), "advantage"),
    "adv_not_tensor": (lambda a, c, w: (a.tolist(), c, w, 0.1), "advantage"),
}


@pytest.mark.parametrize("case", list(BAD_DUAL))
def test_solve_dual_rejects_bad_input(case):
    make, name = BAD_DUAL[case]
    args = make(*_valid())
    with pytest.raises(ValueError, match=name) as info:
        solve_dual(*args)
    assert "infeasible" not in str(info.value)


def test_infeasible_instance_raises():
    # no zero-cost candidate and a tiny epsilon: G is unbounded below
    adv = torch.tensor([[0.0, 1.0], [2.0, 0.5]], dtype=F64)
    cost = torch.tensor([[0.5, 1.0], [0.3, 0.2]], dtype=F64)
    w = torch.tensor([0.5, 0.5], dtype=F64)
    with pytest.raises(ValueError, match="infeasible|epsilon"):
        solve_dual(adv, cost, w, 1e-6)
    with pytest.raises(ValueError, match="infeasible|epsilon"):
        solve_dual(adv.float(), cost.float(), w.float(), 1e-6)
    # the same instance with a radius that fits the cheapest candidates is fine
    sol = solve_dual(adv, cost, w, 0.5 * 0.5 + 0.5 * 0.2 + 1e-9)
    assert torch.isfinite(sol.multiplier) and torch.isfinite(sol.dual_value)


@pytest.mark.parametrize("dtype", [F64, F32], ids=["f64", "f32"])
def test_all_zero_weights_no_nan(dtype):
    adv, cost, _ = _valid()
    adv, cost = adv.to(dtype), cost.to(dtype)
    sol = solve_dual(adv, cost, torch.zeros(3, dtype=dtype), 1e-3)
    assert sol.multiplier.item() == 0.0
    for f in ("multiplier", "dual_value", "low_cost", "high_cost", "split"):
        assert torch.isfinite(getattr(sol, f)), f
    assert torch.isfinite(sol.transport)
    assert torch.isfinite(transport_plan(sol, 2)).all()


def test_all_equal_advantages_no_nan():
    adv = torch.zeros(4, 3, dtype=F64)
    cost = torch.tensor([[0.0, 1.0, 2.0]] * 4, dtype=F64)
    sol = solve_dual(adv, cost, torch.full((4,), 0.25, dtype=F64), 1e-3)
    assert sol.multiplier.item() == 0.0 and sol.dual_value.item() == 0.0
    assert torch.equal(sol.low_index, torch.zeros(4, dtype=torch.long))
    assert torch.equal(sol.high_index, torch.full((4,), 2, dtype=torch.long))
    assert sol.transport.item() == 0.0


def test_epsilon_just_below_cost_without_breakpoints():
    """epsilon within the solver's 1e-12 slack of an infeasible single candidate.

    Must either raise ValueError (infeasible) or return a finite solution; it must not crash with an
    IndexError from selecting in an empty list of breakpoints.
    """
    for adv, cost in (([[0.0]], [[1.0]]), ([[1.0, 0.0]], [[1.0, 2.0]])):
        args = (torch.tensor(adv, dtype=F64), torch.tensor(cost, dtype=F64), torch.ones(1, dtype=F64))
        try:
            sol = solve_dual(*args, 1 - 1e-13)
        except ValueError:
            continue
        assert torch.isfinite(sol.multiplier) and torch.isfinite(sol.dual_value)


def test_float32_feasible_instance_with_tiny_epsilon_is_not_infeasible():
    """Every sample has a zero-cost candidate, so the problem is feasible for any epsilon > 0.

    Here the envelope walks 100 -> 3.3 -> 0; in float32 the drop 100 - 3.3 rounds, the float64 sum
    of the rounded drops falls short of c_low0 - epsilon and the solver reports 'infeasible'.
    """
    adv = torch.tensor([[2.0, 1.0, 0.0]])
    cost = torch.tensor([[100.0, 3.3, 0.0]])
    sol = solve_dual(adv, cost, torch.ones(1), 1e-6)
    assert torch.isfinite(sol.multiplier) and torch.isfinite(sol.dual_value)
    ref = np_min_dual(adv.double().numpy(), cost.double().numpy(), np.ones(1), float(torch.tensor(1e-6)))
    assert float(sol.dual_value) == pytest.approx(ref, rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("scale", [1e-170, 1.0, 1e150])
def test_hinge_scale_invariance(scale):
    """Scaling advantages, costs and epsilon by s keeps lam* and scales G(lam*) by s."""
    adv = torch.tensor([[0.0, 1.0], [0.0, 2.0]], dtype=F64)
    cost = torch.tensor([[0.0, 1.0], [0.0, 1.0]], dtype=F64)
    w = torch.tensor([0.5, 0.5], dtype=F64)
    sol = solve_dual(adv * scale, cost * scale, w, 0.25 * scale)
    assert sol.multiplier.item() == pytest.approx(2.0, rel=1e-12)
    assert sol.dual_value.item() == pytest.approx(0.5 * scale, rel=1e-12)


def test_huge_finite_advantages_never_nan():
    """Finite but huge advantages whose differences overflow: a ValueError is fine, NaN is not."""
    for adv, cost in (([[-1e308, 1e308]], [[0.0, 1.0]]),
                      ([[-1e308, 1e308, 0.0]], [[0.0, 1.0, 2.0]])):
        try:
            sol = solve_dual(torch.tensor(adv, dtype=F64), torch.tensor(cost, dtype=F64),
                             torch.ones(1, dtype=F64), 0.5)
        except ValueError:
            continue
        for f in ("multiplier", "dual_value", "split", "low_cost", "high_cost"):
            assert not torch.isnan(getattr(sol, f)), f


def _tab_valid():
    policy = torch.tensor([[0.5, 0.5], [1.0, 0.0]], dtype=F64)
    adv = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=F64)
    rho = torch.tensor([0.5, 0.5], dtype=F64)
    cost = DiscreteMetricCost().matrix(2)
    return policy, adv, rho, cost


BAD_TAB = {
    "cost_diagonal": (lambda p, a, r, c: (p, a, r, c + torch.eye(2, dtype=F64)), "cost.*diagonal"),
    "cost_negative": (lambda p, a, r, c: (p, a, r, -c), "cost"),
    "cost_nan": (lambda p, a, r, c: (p, a, r, _with(c, (0, 1), float("nan"))), "cost"),
    "cost_shape": (lambda p, a, r, c: (p, a, r, DiscreteMetricCost().matrix(3)), "cost"),
    "policy_not_simplex": (lambda p, a, r, c: (p * 0.9, a, r, c), "policy"),
    "policy_negative": (lambda p, a, r, c: (torch.tensor([[1.5, -0.5], [1.0, 0.0]], dtype=F64), a, r, c),
                        "policy"),
    "policy_nan": (lambda p, a, r, c: (_with(p, (0, 0), float("nan")), a, r, c), "policy"),
    "policy_1d": (lambda p, a, r, c: (p[0], a, r, c), "policy"),
    "policy_empty": (lambda p, a, r, c: (p[:0], a[:0], r[:0], c), "policy"),
    "advantage_shape": (lambda p, a, r, c: (p, a[:1], r, c), "advantage"),
    "advantage_nan": (lambda p, a, r, c: (p, _with(a, (1, 1), float("nan")), r, c), "advantage"),
    "state_weight_shape": (lambda p, a, r, c: (p, a, r[:1], c), "state_weight"),
    "state_weight_negative": (lambda p, a, r, c: (p, a, _with(r, 0, -1.0), c), "state_weight"),
    "state_weight_inf": (lambda p, a, r, c: (p, a, _with(r, 0, float("inf")), c), "state_weight"),
}


@pytest.mark.parametrize("case", list(BAD_TAB))
def test_tabular_rejects_bad_input(case):
    make, name = BAD_TAB[case]
    with pytest.raises(ValueError, match=name) as info:
        tabular_ot_update(*make(*_tab_valid()), 0.1)
    assert "infeasible" not in str(info.value)


@pytest.mark.parametrize("eps", [0.0, -1.0, float("nan"), float("inf")])
def test_tabular_rejects_bad_epsilon(eps):
    with pytest.raises(ValueError, match="epsilon"):
        tabular_ot_update(*_tab_valid(), eps)


# ----------------------------------------------------------------------------------------------
# 5. K = 2: the chunked fast path against the general envelope walk


def _with_dominated(adv, cost):
    """The same problem plus a third candidate that is never a maximiser for lam >= 0 (lower advantage and
    higher cost than both): solve_dual takes the general walk on it, whose breakpoints and drops are those
    of the two-candidate problem bit for bit, so it must give the same lam*, indices and sums."""
    far = 10.0 * (1.0 + float(adv.abs().max()) + float(cost.max()))
    return (torch.cat([adv, adv.amin(1, keepdim=True) - far], 1),
            torch.cat([cost, cost.amax(1, keepdim=True) + far], 1))


def make_two(B, seed, dtype, *, regime="moderate", stay=0.3, swap=False, ties=0.0, zero_dc=0.05, zero_w=0.2):
    """Two candidates per sample: normal advantages, exponential costs (c0 != 0 in general); a share ``stay``
    of the rows has the zero "stay" candidate in column 0, ``zero_dc`` equal costs (no breakpoint), ``ties``
    equal advantages (da = 0) and ``zero_w`` zero weight; ``swap`` exchanges the columns."""
    rng = np.random.default_rng(seed)
    adv, cost = rng.normal(size=(B, 2)), rng.exponential(size=(B, 2))
    rows = rng.random(B) < stay
    adv[rows, 0], cost[rows, 0] = 0.0, 0.0
    rows = rng.random(B) < zero_dc
    cost[rows, 1] = cost[rows, 0]
    rows = rng.random(B) < ties
    adv[rows, 1] = adv[rows, 0]
    w = rng.uniform(size=B)
    w[rng.random(B) < zero_w] = 0.0
    w[0] = max(w[0], 0.5)
    w /= w.sum()
    if swap:
        adv, cost = adv[:, ::-1].copy(), cost[:, ::-1].copy()
    t_adv, t_cost, t_w = (torch.tensor(x, dtype=dtype) for x in (adv, cost, w))
    a, c, w = (x.double().numpy() for x in (t_adv, t_cost, t_w))
    c_min, c_low0 = float((w * c.min(1)).sum()), np_low0_cost(a, c, w)
    share = {"moderate": float(rng.uniform(0.05, 0.95)), "tight": 3e-4, "loose": 0.9997, "inactive": 1.5}[regime]
    eps = max(c_min + share * (c_low0 - c_min), c_min * (1 + 1e-6) + 1e-9)
    return t_adv, t_cost, t_w, eps


def assert_same_solution(sol, ref, adv, cost, w):
    """``sol`` (K = 2) and ``ref`` (the general walk) agree: lam* and the indices exactly, the sums to rounding."""
    dtype = adv.dtype
    assert sol.num_candidates == 2 and sol.low_index.dtype == sol.high_index.dtype == torch.long
    for f in ("multiplier", "dual_value", "low_cost", "high_cost", "split"):
        assert getattr(sol, f).dtype == dtype, f
    assert float(sol.multiplier) == float(ref.multiplier)
    assert torch.equal(sol.low_index, ref.low_index)
    assert torch.equal(sol.high_index, ref.high_index)
    rel = 1e-12 if dtype == F64 else 1e-6
    a, c, w = (x.double().numpy() for x in (adv, cost, w))
    scale = float((w * (np.abs(a).sum(1) + float(ref.multiplier) * c.sum(1))).sum()) + 1e-300
    assert abs(float(sol.dual_value) - float(ref.dual_value)) <= rel * scale
    for f in ("low_cost", "high_cost"):
        assert float(getattr(sol, f)) == pytest.approx(float(getattr(ref, f)), rel=rel, abs=1e-300), f
    # t* = (c_high - eps) / (c_high - c_low) cancels in the general path's float64 sums of B terms (the fast path
    # sums c_high - c_low from the ties at lam* alone); in float32 both sum the same float32 products.
    assert abs(float(sol.split) - float(ref.split)) <= (1e-8 if dtype == F64 else 1e-6)


TWO_CASES = [
    # (B, regime, variant): B below and above one chunk (65536 rows) and the size that samples rows first
    (1, "moderate", "plain"), (7, "moderate", "plain"), (7, "inactive", "plain"), (500, "moderate", "swap"),
    (500, "tight", "plain"), (500, "loose", "stay"), (5000, "moderate", "plain"), (5000, "inactive", "swap"),
    (70_000, "moderate", "plain"), (70_000, "tight", "swap"), (70_000, "loose", "plain"),
    (70_000, "inactive", "plain"), (200_000, "moderate", "stay"), (200_000, "moderate", "zero_dc"),
]


@pytest.mark.parametrize("dtype", [F64, F32], ids=["f64", "f32"])
@pytest.mark.parametrize("B,regime,variant", TWO_CASES, ids=["-".join(map(str, c)) for c in TWO_CASES])
def test_two_candidates_fast_path_matches_general_walk(B, regime, variant, dtype):
    from torchrl_ot.functional import dual

    opts = {"plain": {}, "swap": {"swap": True}, "stay": {"stay": 1.0}, "zero_dc": {"zero_dc": 0.3}}[variant]
    adv, cost, w, eps = make_two(B, 1000 + B, dtype, regime=regime, **opts)
    fast = dual._solve_two(adv, cost, w, eps)
    assert fast is not None  # no ties, nothing extreme: the fast path must decide
    sol = solve_dual(adv, cost, w, eps)
    ref = solve_dual(*_with_dominated(adv, cost), w, eps)
    assert_same_solution(sol, ref, adv, cost, w)
    assert float(fast.multiplier) == float(sol.multiplier) and torch.equal(fast.low_index, sol.low_index)
    if B >= 500:  # (a handful of samples may have no breakpoint at all)
        assert (float(sol.multiplier) > 0) == (regime != "inactive")


@pytest.mark.parametrize("dtype", [F64, F32], ids=["f64", "f32"])
@pytest.mark.parametrize("B", [50, 70_000])
def test_two_candidates_ties_defer_to_the_general_walk(B, dtype):
    """da = 0 (equal advantages): low0 is the cheaper candidate, which the fast path leaves to the general walk."""
    from torchrl_ot.functional import dual

    adv, cost, w, eps = make_two(B, 7 + B, dtype, ties=0.1)
    assert dual._solve_two(adv, cost, w, eps) is None
    assert_same_solution(solve_dual(adv, cost, w, eps), solve_dual(*_with_dominated(adv, cost), w, eps), adv, cost, w)


@pytest.mark.parametrize("miss", ["below", "above", "none", "point"])
@pytest.mark.parametrize("regime", ["moderate", "inactive"])
def test_two_candidates_bracket_miss_recovers(monkeypatch, miss, regime):
    """A sampled bracket that misses lam* costs a second pass over the rows, never exactness."""
    from torchrl_ot.functional import dual

    adv, cost, w, eps = make_two(100_000, 5, F64, regime=regime)
    ref = solve_dual(*_with_dominated(adv, cost), w, eps)
    lam = float(ref.multiplier) or 1.0
    wrong = {"below": (0.0, lam / 2), "above": (2 * lam, np.inf), "none": None, "point": (lam, lam)}[miss]
    monkeypatch.setattr(dual, "_row_bracket", lambda *args: wrong)
    assert dual._solve_two(adv, cost, w, eps) is not None
    assert_same_solution(solve_dual(adv, cost, w, eps), ref, adv, cost, w)


@pytest.mark.parametrize("case", ["adv_nan", "adv_inf", "cost_negative", "cost_nan", "weight_negative", "weight_inf",
                                  "infeasible", "eps_and_cost"])
def test_two_candidates_large_batch_errors_as_before(case):
    adv, cost, w, eps = make_two(100_000, 3, F64)
    where = 54_321
    if case == "adv_nan":
        adv[where, 1], name = float("nan"), "advantage"
    elif case == "adv_inf":
        adv[where, 0], name = float("inf"), "advantage"
    elif case == "cost_negative":
        cost[where, 1], name = -1e-3, "cost"
    elif case == "cost_nan":
        cost[where, 0], name = float("nan"), "cost"
    elif case == "weight_negative":
        w[where], name = -1e-9, "weight"
    elif case == "weight_inf":
        w[where], name = float("inf"), "weight"
    elif case == "infeasible":
        cost, eps, name = cost + 1.0, 0.5, "infeasible"
    else:  # both bad: the values are refused first, as always
        cost[where, 1], eps, name = -1.0, -0.1, "cost"
    with pytest.raises(ValueError, match=name):
        solve_dual(adv, cost, w, eps)


def test_two_candidates_near_overflow_defers():
    """Magnitudes where a sum could overflow are left to the general walk (which refuses or solves them)."""
    from torchrl_ot.functional import dual

    adv, cost, w, eps = make_two(1000, 11, F64)
    big = 1e305
    assert dual._solve_two(adv * big, cost * big, w, eps * big) is None
    assert dual._solve_two(adv * 1e-3, cost, w, eps) is not None


# ----------------------------------------------------------------------------------------------
# 6. CUDA


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [F64, F32], ids=["f64", "f32"])
@pytest.mark.parametrize("B,K,kind", [(50, 2, "hinge"), (300, 5, "generic"), (10_000, 4, "generic"),
                                      (10_000, 3, "ties")])
def test_cuda_matches_cpu(B, K, kind, dtype):
    adv, cost, w, eps = make_generic(B, K, kind, 31 + B + K, "moderate")
    cpu = [torch.tensor(x, dtype=dtype) for x in (adv, cost, w)]
    gpu = [x.cuda() for x in cpu]
    s_cpu = solve_dual(*cpu, eps)
    s_gpu = solve_dual(*gpu, eps)
    assert s_gpu.multiplier.device.type == "cuda" and s_gpu.low_index.device.type == "cuda"
    rel = 1e-9 if dtype == F64 else 1e-5
    assert float(s_gpu.multiplier) == pytest.approx(float(s_cpu.multiplier), rel=rel)
    assert float(s_gpu.dual_value) == pytest.approx(float(s_cpu.dual_value), rel=rel)
    assert float(s_gpu.transport) == pytest.approx(float(s_cpu.transport), rel=rel, abs=rel * eps)
    ref = np_min_dual(cpu[0].double().numpy(), cpu[1].double().numpy(), cpu[2].double().numpy(),
                      float(torch.tensor(eps, dtype=dtype)))
    assert float(s_gpu.dual_value) == pytest.approx(ref, rel=rel)
    plan = transport_plan(s_gpu, K)
    assert plan.device.type == "cuda"
    g = dual_objective(s_gpu.multiplier, *gpu, eps)
    assert float(g) == pytest.approx(float(s_gpu.dual_value), rel=rel)
    # tabular update on the GPU
    rng = np.random.default_rng(0)
    pol = torch.tensor(rng.dirichlet(np.ones(4), size=5), dtype=F64)
    tadv = torch.tensor(rng.normal(size=(5, 4)), dtype=F64)
    rho = torch.full((5,), 0.2, dtype=F64)
    cmat = IndexDistanceCost(p=1).matrix(4)
    new_cpu, _ = tabular_ot_update(pol, tadv, rho, cmat, 0.1)
    new_gpu, _ = tabular_ot_update(pol.cuda(), tadv.cuda(), rho.cuda(), cmat.cuda(), 0.1)
    torch.testing.assert_close(new_gpu.cpu(), new_cpu, rtol=0, atol=1e-12)
