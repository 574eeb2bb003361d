"""No silent wrong result from the transport costs and the pure-tensor core (issue 21).

Part (a): one test per failure found in the sweep, each failing on the code before the fix.
Part (b): a property-based sweep (hypothesis, bounded and derandomised) over the costs and
``solve_dual`` / ``dual_objective`` / ``transport_plan``: random shapes, dtypes, magnitudes from 1e-30 to
1e30, NaN/inf placement and degenerate problems. On every input the result is either a ``ValueError``
(allowed only where the input is invalid or the problem does not fit the dtype) or a finite value that
agrees with an independent reference: numpy in float64 for the costs, and for the dual the minimum of
G over 0 and every breakpoint (G is convex and piecewise linear) plus, for small well-scaled problems,
``scipy.optimize.linprog`` on the primal, as in ``tests/test_functional.py``.
Part (c): every property can fail: a realistic bug seeded with ``monkeypatch`` into the code under test, and
the property, run with its own settings and examples (only the shrinking left out), fails on it.

The properties run in CI (``.ci/run`` runs every test). "cases" is the property's ``max_examples``, the number
of valid examples per run (``--hypothesis-show-statistics`` counts them; draws that overrun hypothesis's buffer
come on top). Derandomised: every run draws the same cases. dtypes: float16, bfloat16, float32 and float64 in
every property (for the losses, the advantage's). ``*``: in ``tests/test_module_validation.py``.

====================  =====  ============================================  =============================================
test_sweep_...        cases  input classes generated                       outcome required
====================  =====  ============================================  =============================================
continuous_costs      150    EuclideanCost(p in .3, .5, 1, 1.5, 2, 3) and  NaN/inf in a: ValueError "a must be finite"
                             L1Cost; d = 1..4; a with 0-2 leading dims of  (in b, inf once cast: "b must be finite");
                             1..3, b the same, 1s (broadcast) or one more  finite inputs: ValueError "overflows" only
                             dim; values 1e-30..1e30 (float16: half        where |a - b| or the cost reach max/16 of the
                             within its range), normal, integer ties, all  dtype, else the broadcast shape in the dtype,
                             equal or all 0; 1 in 10: one entry of a NaN,  finite, >= 0, within 8 (d + 2) eps max(p, 1)
                             +-inf or -1; 1 in 5: b = a (distance 0, the   of numpy in float64; backward never NaN, 0
                             kink)                                         where a == b

discrete_costs        150    DiscreteMetricCost, IndexDistanceCost(p in    negative, fractional or (MatrixCost) >= N
                             .5, 1, 2), MatrixCost (random, zero           indices: ValueError naming a ("a must hold
                             diagonal), CallableCost(discrete=True); N =   integer", "a holds action indices outside");
                             1..5 actions (N = 1 degenerate); index        else equal (rtol 1e-6) to numpy's |i - j|^p
                             shapes () to 2 dims of 1..4; i in -1..N, j    or matrix entry; matrix(N) finite
                             in 0..N-1; integer or floating indices, 1 in
                             10 fractional (+0.5)

callable_cost_        150    B, d = 1..4; the callable returns [B]         all but the right one: ValueError; [B]: equal
output_shape                 (right), [B, d] (forgot the sum), a scalar,   to d
                             [2, B], an int tensor or None: the 96
                             combinations, all run (hypothesis then
                             stops)

solve_dual            400    B in 1, 2, 3, 5 (B = 1 twice as often); K =   NaN/inf, negative cost or weight, epsilon not
                             1..4 (K = 1 degenerate); advantage, cost and  representable: ValueError starting with the
                             weight drawn as for the costs (1e-30..1e30,   first bad argument (advantage, cost, weight,
                             ties, all equal, all 0; 1 in 10 one NaN,      epsilon); "infeasible" only if sum_b w_b
                             +-inf or -1 entry); a zero-cost candidate at  min_k c_bk > epsilon; "overflows" only at
                             the worst action, at random or none           max/64 of the dtype, "underflows" only for a
                             (infeasible); weights raw, normalised, all 0  lam* below its smallest normal number; else
                             or the first 0; in half the cases advantages  every field finite, 0-dim, in the dtype, lam*
                             rescaled to the costs' scale; epsilon 1e-6    >= 0, 0 <= t* <= 1, G(lam*) and G at the
                             .. 1.5 times the greedy step's transport      returned lam* within 64 eps (of the problem's
                             (binding, barely not) in 2 of 3 cases, else   scale) of numpy's minimum over 0 and every
                             1e-30..1e30                                   breakpoint, small well-scaled float64
                                                                           problems within 1e-7 of scipy's linprog;
                                                                           transport_plan [B, K], rows summing to 1; K
                                                                           -+ 1 candidates: ValueError "num_candidates"

dual_objective        150    the problems of test_sweep_solve_dual, and    an invalid problem: ValueError naming its
                             lam: any float (NaN, +-inf, subnormal,        first bad argument; then a bool, NaN, inf,
                             negative), 0, -0.0, 0.5, 1, True,             negative or overflowing lam (in the dtype):
                             1e-21..1e21                                   ValueError "lam"; "overflows" only at max/64
                                                                           of the dtype; else finite, numpy's G(lam)
                                                                           within 64 eps

solver_modules *      100    DualSolver, MassSplittingTarget (metric or    the first bad entry: ValueError "'<key>'
                             index cost, split or WPO); batch_size 1-2     (input of <module>) must"; DualSolver: the
                             dims of 1..3 (B = 1 included); K, A = 1..4;   very numbers (or refusal) of solve_dual on
                             values 1e-6..1e6 (float16: inf at the top),   the flattened batch; MassSplittingTarget:
                             1 in 5 ties and zeros; weight absent          "underflows" only for a lam* (in float64)
                             (uniform) or given (1 in 5 with a 0); probs   below the dtype's smallest normal number,
                             softmax, one-hot or uniform; 1 in 6 costs     else rows on the simplex, expected advantage
                             without a zero-cost candidate; 1 in 3: one    not below pi_old's, exact OT
                             entry NaN, +-inf or -1                        (categorical_transport) <= written
                                                                           ot_transport <= epsilon (split)

losses *              100    OTTrustRegionLoss gaussian (mirror or not),   ValueError starting with the spoiled key
                             categorical (split or WPO), sampled;          (-inf logits, a masked action, are valid);
                             batch_size 1-2 dims of 1..3; advantage        else finite losses and diagnostics, finite
                             dtype, scale 1e-3..1e3; pi_old's              gradients from backward, ot_transport <=
                             loc/scale/logits stored; spoiled as the       epsilon (split)
                             batch arrives, before solve_multiplier or
                             after it; 2 in 3: one NaN or +-inf in
                             advantage, observation, value_target,
                             action, loc/scale/logits (before the solve)
                             or ot_multiplier (after)
====================  =====  ============================================  =============================================

The seeded bugs, each caught by the property's assertion named:

* continuous costs: no value check at all (a NaN action gives a NaN cost: "finite"); the inputs' check dropped
  (a NaN in a refused as an overflow of finite inputs: "a must be finite"); the Euclidean cost through plain
  autograd (NaN gradient at a == b);
* discrete costs: the index range check dropped (index -1 reads the matrix's last column: "invalid, no error");
* callable cost output: the shape check dropped ([B, d] accepted);
* solve_dual: lam* 1% too large (G at the returned lam* above the minimum);
* dual_objective: the lam * epsilon term left out (off numpy's G);
* solver modules: DualSolver ignoring ``ot_weight`` (not solve_dual's numbers; a NaN weight accepted);
* losses: the check of pi_old's stored parameters dropped (a NaN ``logits`` refused under the name 'probs').
"""

from __future__ import annotations

import dataclasses
import math
import re

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from scipy.optimize import linprog

import torchrl_ot.costs
from torchrl_ot.costs import (
    CallableCost,
    DiscreteMetricCost,
    EuclideanCost,
    IndexDistanceCost,
    L1Cost,
    MatrixCost,
    TransportCost,
)
from torchrl_ot.functional import (
    categorical_transport,
    dual_objective,
    gaussian_transport_bound,
    solve_dual,
    tabular_ot_update,
    tabular_problem,
    transport_plan,
)

F16, BF16, F32, F64 = torch.float16, torch.bfloat16, torch.float32, torch.float64
DTYPES = (F16, BF16, F32, F64)
SWEEP = settings(max_examples=150, deadline=None, derandomize=True,
                 suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
DUAL_SWEEP = settings(SWEEP, max_examples=400)


def _hinge():
    adv = torch.tensor([[0.0, 1.0], [0.0, 2.0]])
    cost = torch.tensor([[0.0, 1.0], [0.0, 1.0]])
    return adv, cost, torch.tensor([0.5, 0.5])


# ----------------------------------------------------------------------------------------------
# (a) the failures of the sweep, one test each


@pytest.mark.parametrize("p", [0.25, 0.5, 1.0, 1.5, 3.0])
def test_euclidean_gradient_at_zero_distance_is_the_zero_subgradient(p):
    """Autograd through sqrt at 0 gave inf * 0 = NaN for every p != 2."""
    a = torch.tensor([[1.0, 2.0], [0.5, -1.0]], dtype=F64, requires_grad=True)
    b = torch.tensor([[1.0, 2.0], [0.0, 0.0]], dtype=F64)   # row 0: a == b
    EuclideanCost(p=p)(a, b).sum().backward()
    assert torch.isfinite(a.grad).all()
    assert torch.equal(a.grad[0], torch.zeros(2, dtype=F64))
    # away from 0 the gradient is p ||x||^(p-2) x
    x = a.detach()[1] - b[1]
    torch.testing.assert_close(a.grad[1], p * x.norm() ** (p - 2) * x)
    # L1: the subgradient 0 at a kink
    a = torch.tensor([1.0, 2.0], requires_grad=True)
    L1Cost()(a, a.detach()).backward()
    assert torch.equal(a.grad, torch.zeros(2))


@pytest.mark.parametrize("dtype,p,dist", [(F32, 0.1, 1e-22), (F64, 0.05, 1e-160)])
def test_euclidean_gradient_never_nan_at_tiny_distances(dtype, p, dist):
    """Between 0 and the dtype's resolution autograd's chain overflows: inf, then inf * 0 = NaN."""
    a = torch.tensor([dist, 0.0], dtype=dtype, requires_grad=True)
    EuclideanCost(p=p)(a, torch.zeros(2, dtype=dtype)).backward()
    assert torch.isfinite(a.grad).all() and a.grad[0] > 0 and a.grad[1] == 0


def test_bool_is_not_a_number():
    with pytest.raises(ValueError, match="p must be"):
        EuclideanCost(p=True)
    with pytest.raises(ValueError, match="p must be"):
        IndexDistanceCost(p=True)
    with pytest.raises(ValueError, match="num_actions"):
        MatrixCost(torch.zeros(1, 1)).matrix(True)
    with pytest.raises(ValueError, match="num_actions"):
        DiscreteMetricCost().matrix(True)
    with pytest.raises(ValueError, match="matrix must hold real costs"):
        MatrixCost(torch.tensor([[False, True], [True, False]]))
    m = MatrixCost(torch.tensor([[0.0, 1.0], [1.0, 0.0]]))
    with pytest.raises(ValueError, match="a must hold action indices"):   # was a raw IndexError
        m(torch.tensor([True]), torch.tensor([False]))
    with pytest.raises(ValueError, match="action indices"):
        DiscreteMetricCost()(torch.tensor([True]), torch.tensor([False]))
    adv, cost, w = _hinge()
    with pytest.raises(ValueError, match="epsilon"):
        solve_dual(adv, cost, w, torch.tensor(True))
    with pytest.raises(ValueError, match="lam"):
        dual_objective(True, adv, cost, w, 0.25)
    with pytest.raises(ValueError, match="num_candidates"):
        transport_plan(solve_dual(adv[:, :1], cost[:, :1], w, 0.25), True)
    with pytest.raises(ValueError, match="discrete"):
        CallableCost(lambda a, b: (a - b).abs().double(), discrete=1)


def test_callable_cost_output_is_checked():
    with pytest.raises(ValueError, match="shape"):
        CallableCost(lambda a, b: torch.zeros(7))(torch.zeros(3, 2), torch.ones(3, 2))
    with pytest.raises(ValueError, match="shape"):   # forgot the sum over the action dimension
        CallableCost(lambda a, b: (a - b).abs())(torch.zeros(3, 2), torch.ones(3, 2))
    with pytest.raises(ValueError, match="shape"):
        CallableCost(lambda i, j: (i - j).abs().double().sum(), discrete=True)(torch.tensor([0, 1]),
                                                                               torch.tensor([1, 1]))
    with pytest.raises(ValueError, match="floating"):
        CallableCost(lambda a, b: (a - b).abs().sum(-1).long(), check_diagonal=False)(torch.zeros(2, 1),
                                                                                       torch.ones(2, 1))
    with pytest.raises(ValueError, match="fn\\(a, a\\)"):   # a diagonal that is no tensor was skipped
        CallableCost(lambda a, b: (a - b).abs().sum(-1) if a is not b else 0.0)(torch.zeros(2, 1),
                                                                                torch.ones(2, 1))
    with pytest.raises(ValueError, match="a must be finite"):
        CallableCost(lambda a, b: torch.nan_to_num(a - b).abs().sum(-1))(torch.full((2, 1), math.nan),
                                                                         torch.ones(2, 1))
    # a discrete matrix goes through the same checks
    with pytest.raises(ValueError, match="shape"):
        CallableCost(lambda i, j: (i - j).abs().double().sum(), discrete=True).matrix(3)


def test_cost_shape_device_and_type_mismatches_are_value_errors():
    with pytest.raises(ValueError, match=r"a \(3, 2\) and b \(4, 3\)"):
        EuclideanCost()(torch.zeros(3, 2), torch.zeros(4, 3))
    with pytest.raises(ValueError, match=r"a \(3,\) and b \(4,\)"):
        L1Cost()(torch.zeros(3, 2), torch.zeros(4, 2))
    with pytest.raises(ValueError, match="broadcast"):
        DiscreteMetricCost()(torch.zeros(3, dtype=torch.long), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="meta device"):
        EuclideanCost()(torch.zeros(3, 2, device="meta"), torch.zeros(3, 2, device="meta"))
    with pytest.raises(ValueError, match="meta device"):
        EuclideanCost()(torch.zeros(3, 2), torch.zeros(3, 2, device="meta"))
    with pytest.raises(ValueError, match="meta device"):
        MatrixCost(torch.zeros(2, 2, device="meta"))
    with pytest.raises(ValueError, match="a must be a torch.Tensor"):
        EuclideanCost()([1.0], [0.0])
    with pytest.raises(ValueError, match="floating"):
        EuclideanCost()(torch.tensor([3]), torch.tensor([0]))
    with pytest.raises(ValueError, match="dtype"):
        DiscreteMetricCost().matrix(3, dtype="float64")
    with pytest.raises(ValueError, match="non-negative action indices"):
        IndexDistanceCost()(torch.tensor([-1]), torch.tensor([0]))
    with pytest.raises(ValueError, match="integer"):   # inf.long() is garbage
        DiscreteMetricCost()(torch.tensor([math.inf]), torch.tensor([0]))
    # a finite float64 matrix that overflows the dtype asked for
    with pytest.raises(ValueError, match="finite"):
        MatrixCost(torch.tensor([[0.0, 1e300], [1.0, 0.0]], dtype=F64)).matrix(2, dtype=F32)


def test_solve_dual_float32_overflow_is_refused():
    adv = torch.tensor([[0.0, 1e10]] * 3)
    cost = torch.tensor([[0.0, 1e10]] * 3)
    w = torch.full((3,), 1e30)
    for eps in (1e30, 1.0):
        with pytest.raises(ValueError, match="overflows torch.float32"):
            solve_dual(adv, cost, w, eps)
    # the same problem with normalised weights is fine
    sol = solve_dual(adv, cost, torch.full((3,), 1 / 3), 1e9)
    assert sol.multiplier.item() == 1.0 and torch.isfinite(sol.split)


def test_solve_dual_overflowing_crossing_is_not_dropped():
    """K = 3, float32: one sample's only cheaper line crosses at 6e38 / 2, whose numerator overflows.

    The envelope stopped that sample, so its drop was missing and lam* clipped to the other sample's
    breakpoint 1: a finite solution whose low transport (1.0) broke the trust region (0.6).
    """
    adv = torch.tensor([[3e38, -3e38, -1.0], [0.0, 1.0, -10.0]])
    cost = torch.tensor([[2.0, 0.0, 3.0], [0.0, 1.0, 5.0]])
    with pytest.raises(ValueError, match="overflows"):
        solve_dual(adv, cost, torch.tensor([0.5, 0.5]), 0.6)


@pytest.mark.parametrize("dtype", [F32, BF16])
def test_solve_dual_underflowing_multiplier_is_refused(dtype):
    """Found by the sweep run with random seeds: lam* = 1e-30 / 5e22 = 2e-53 > 0 is 0 in float32 / bfloat16.

    The greedy step moves 5e22 * 7.5e8 > epsilon, so lam* > 0; lam* = 0 came back instead, with the split and
    indices of lam* > 0: a solution with no trust region (``active`` False) and G(0) far above G(lam*). A lam*
    in the subnormal range (here 1.2e-41) kept a few bits: G(lam*) off by 2e-5, relative, in float32.
    """
    adv = torch.tensor([[1.7e-31, 1.2e-30]], dtype=dtype)
    cost = torch.tensor([[0.0, 5e22]], dtype=dtype)
    with pytest.raises(ValueError, match="lam\\* underflows"):
        solve_dual(adv, cost, torch.tensor([7.5e8], dtype=dtype), 3.7e21)
    sol = solve_dual(adv.double(), cost.double(), torch.tensor([7.5e8], dtype=F64), 3.7e21)
    assert 0 < sol.multiplier.item() < 1e-50
    with pytest.raises(ValueError, match="lam\\* underflows"):   # subnormal
        solve_dual(torch.tensor([[3.5e-12, 8.2e-12, 3.3e-12]], dtype=dtype),
                   torch.tensor([[7.9e28, 4.1e29, 0.0]], dtype=dtype), torch.ones(1, dtype=dtype), 4.0e29)


@pytest.mark.parametrize("n", [3, 1, 0, -1, 1.5, "2"])
def test_transport_plan_num_candidates_must_be_k(n):
    adv, cost, w = _hinge()
    sol = solve_dual(adv, cost, w, 0.25)
    with pytest.raises(ValueError, match="num_candidates"):
        transport_plan(sol, n)
    assert transport_plan(sol, 2).shape == (2, 2)
    with pytest.raises(ValueError, match="split"):
        transport_plan(sol, 2, split="yes")


@pytest.mark.parametrize("lam", [math.nan, -1.0, math.inf, torch.tensor([0.5, math.nan]), torch.tensor([-0.1]),
                                 "0.5", 1e5])
def test_dual_objective_refuses_a_bad_multiplier(lam):
    adv, cost, w = _hinge()
    if isinstance(lam, float) and lam == 1e5:   # finite, but inf once cast to the float16 of the computation
        adv, cost, w = adv.half(), cost.half(), w.half()
    with pytest.raises(ValueError, match="lam"):
        dual_objective(lam, adv, cost, w, 0.25)


def test_dual_objective_checks_its_inputs():
    adv, cost, w = _hinge()
    with pytest.raises(ValueError, match="epsilon"):
        dual_objective(0.5, adv, cost, w, -1.0)
    with pytest.raises(ValueError, match="weight"):
        dual_objective(0.5, adv, cost, w[:1], 0.25)   # broadcast silently before
    with pytest.raises(ValueError, match="advantage"):
        dual_objective(0.5, adv.clone().fill_(math.nan), cost, w, 0.25)
    with pytest.raises(ValueError, match="overflows"):   # each term is finite, their sum is not
        dual_objective(0.0, torch.tensor([[0.0, 3e38], [0.0, 3e38]]), cost, torch.ones(2), 0.25)
    # gradients still flow through it
    lam = torch.tensor(0.5, requires_grad=True)
    dual_objective(lam, adv, cost, w, 0.25).backward()
    assert lam.grad.item() == pytest.approx(0.25 - 1.0)


def test_epsilon_not_representable_in_the_dtype():
    adv, cost, w = (x.half() for x in _hinge())
    with pytest.raises(ValueError, match="not representable"):
        solve_dual(adv, cost, w, 1e-9)   # 0 in float16
    with pytest.raises(ValueError, match="not representable"):
        solve_dual(adv, cost, w, 1e6)    # inf in float16


def test_tabular_problem_checks_its_inputs():
    pi = torch.full((2, 2), 0.5)
    adv = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    cost = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    with pytest.raises(ValueError, match="state_weight"):   # a [1] weight broadcast silently
        tabular_problem(pi, adv, torch.ones(1), cost)
    with pytest.raises(ValueError, match="cost"):           # so did a [1, 1] cost
        tabular_problem(pi, adv, torch.ones(2), torch.zeros(1, 1))
    with pytest.raises(ValueError, match="split"):
        tabular_ot_update(pi, adv, torch.ones(2), cost, 0.1, split="no")


def test_categorical_transport_needs_distributions():
    cost = 1.0 - torch.eye(3, dtype=F64)
    old = torch.tensor([[0.5, 0.5, 0.0]], dtype=F64)
    with pytest.raises(ValueError, match="simplex"):   # logits, not probabilities
        categorical_transport(old, torch.tensor([[2.0, 1.0, 0.5]], dtype=F64), cost)
    with pytest.raises(ValueError, match="simplex"):   # zero mass: NaN from the exact solver before
        categorical_transport(torch.zeros(1, 3, dtype=F64), old, torch.rand(3, 3, dtype=F64).fill_diagonal_(0))


def test_gaussian_bound_lipschitz_is_checked():
    loc0, loc1, s = torch.zeros(1, 2), torch.tensor([[0.3, -0.4]]), torch.ones(1, 2)
    with pytest.raises(ValueError, match="lipschitz"):
        gaussian_transport_bound(loc0, s, loc1, s, EuclideanCost(), lipschitz=True)
    with pytest.raises(ValueError, match="lipschitz"):   # a raw RuntimeError before
        gaussian_transport_bound(loc0, s, loc1, s, EuclideanCost(), lipschitz=torch.ones(5))
    with pytest.raises(ValueError, match="overflows"):
        gaussian_transport_bound(loc0.half(), s.half(), loc1.half() * 1e3, 2 * s.half(), EuclideanCost())


# ----------------------------------------------------------------------------------------------
# (b) the property-based sweep: helpers


def _eps_of(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps


def _max_of(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).max


@st.composite
def _values(draw, shape, dtype, *, nonneg=False, specials=True):
    """A float64 array of ``shape`` at a random magnitude 1e-30..1e30, with ties and maybe NaN/inf."""
    n = int(np.prod(shape)) if shape else 1
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    exp = draw(st.integers(-30, 30))
    if dtype == F16 and draw(st.booleans()):
        exp = exp // 8   # keep half of the float16 cases inside its range
    kind = draw(st.sampled_from(["normal", "normal", "normal", "ties", "equal", "zero"]))
    if kind == "ties":
        x = rng.integers(-3, 4, size=n).astype(np.float64)
    elif kind == "equal":
        x = np.full(n, float(rng.normal()))
    elif kind == "zero":
        x = np.zeros(n)
    else:
        x = rng.normal(size=n)
    x = x * 10.0**exp
    if nonneg:
        x = np.abs(x)
    if specials and draw(st.integers(0, 9)) == 0:
        x[draw(st.integers(0, n - 1))] = draw(st.sampled_from([math.nan, math.inf, -math.inf, -1.0]))
    return x.reshape(shape)


def _as(x: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    return torch.tensor(x, dtype=F64).to(dtype)


# ----------------------------------------------------------------------------------------------
# (b1) the continuous costs


@st.composite
def _continuous_case(draw):
    dtype = draw(st.sampled_from(DTYPES))
    d = draw(st.integers(1, 4))
    lead_a = draw(st.lists(st.integers(1, 3), max_size=2))
    # b's leading shape: a's, or a broadcast partner of it (1s), or one more dimension
    lead_b = [draw(st.sampled_from([n, 1])) for n in lead_a]
    if draw(st.booleans()):
        lead_b = [draw(st.integers(1, 3))] + lead_b
    a = draw(_values(tuple(lead_a) + (d,), dtype))
    b = draw(_values(tuple(lead_b) + (d,), dtype, specials=False))
    if draw(st.integers(0, 4)) == 0:   # some pairs with a == b (the kink)
        b = np.broadcast_to(a, np.broadcast_shapes(a.shape, b.shape)).copy()
    cost = draw(st.sampled_from(["euclid", "l1"]))
    p = draw(st.sampled_from([0.3, 0.5, 1.0, 1.5, 2.0, 3.0]))
    return dtype, a, b, cost, p


@SWEEP
@given(_continuous_case())
def test_sweep_continuous_costs(case):
    dtype, a_np, b_np, kind, p = case
    cost = EuclideanCost(p=p) if kind == "euclid" else L1Cost()
    a = _as(a_np, dtype).requires_grad_()
    b = _as(b_np, dtype)
    a64, b64 = a.detach().double().numpy(), b.double().numpy()   # what the cost sees
    with np.errstate(all="ignore"):
        diff = a64 - b64
        if kind == "euclid":
            sq = (diff**2).sum(-1)
            ref = sq if p == 2.0 else np.sqrt(sq) ** p
            inner = np.maximum(np.abs(diff).max(initial=0), sq.max(initial=0))
        else:
            ref = np.abs(diff).sum(-1)
            inner = np.abs(diff).max(initial=0)
    try:
        out = cost(a, b)
    except ValueError as err:
        msg = str(err)
        if not np.isfinite(a64).all():   # a is checked first
            assert msg.startswith("a must be finite"), msg
        elif not np.isfinite(b64).all():   # finite as drawn, inf in float16
            assert msg.startswith("b must be finite"), msg
        else:
            assert "overflows" in msg, msg
            assert max(inner, np.max(ref, initial=0)) >= _max_of(dtype) / 16, (msg, a64, b64)
        return
    assert out.dtype == dtype and out.shape == ref.shape
    got = out.detach().double().numpy()
    assert np.isfinite(got).all() and (got >= 0).all()
    d = a64.shape[-1]
    rel = 8 * (d + 2) * _eps_of(dtype) * max(p, 1.0)
    # below the dtype's smallest normal the squares lose their relative precision (or underflow to 0)
    tiny = torch.finfo(dtype).tiny
    abs_tol = (8 * d * tiny) ** (p / 2) if kind == "euclid" else 8 * d * tiny
    # and a result below them rounds to a few of the smallest subnormals, or to 0 (p = 3 cubes a tiny norm)
    abs_tol += 4 * tiny * _eps_of(dtype)
    np.testing.assert_array_less(np.abs(got - ref), rel * ref + abs_tol + 1e-300)
    out.sum().backward()
    assert not torch.isnan(a.grad).any(), (a64, b64, a.grad)
    same = (diff == 0).all(-1)
    if same.any() and kind == "euclid" and a64.shape == same.shape + (d,):
        # the zero subgradient wherever a == b (a is not broadcast, so its gradient is per pair)
        assert (a.grad.double().numpy()[same] == 0).all()


# ----------------------------------------------------------------------------------------------
# (b2) the discrete costs


@st.composite
def _discrete_case(draw):
    n = draw(st.integers(1, 5))
    shape = tuple(draw(st.lists(st.integers(1, 4), min_size=0, max_size=2)))
    size = int(np.prod(shape)) if shape else 1
    i = np.array(draw(st.lists(st.integers(-1, n), min_size=size, max_size=size))).reshape(shape)
    j = np.array(draw(st.lists(st.integers(0, n - 1), min_size=size, max_size=size))).reshape(shape)
    as_float = draw(st.sampled_from([None, F16, BF16, F32, F64]))
    frac = draw(st.integers(0, 9)) == 0
    kind = draw(st.sampled_from(["metric", "index", "matrix", "callable"]))
    p = draw(st.sampled_from([0.5, 1.0, 2.0]))
    return n, i, j, as_float, frac, kind, p


@SWEEP
@given(_discrete_case())
def test_sweep_discrete_costs(case):
    n, i_np, j_np, as_float, frac, kind, p = case
    rng = np.random.default_rng(n)
    m_np = rng.uniform(0, 3, size=(n, n))
    np.fill_diagonal(m_np, 0)
    cost = {"metric": DiscreteMetricCost(), "index": IndexDistanceCost(p=p),
            "matrix": MatrixCost(torch.tensor(m_np)),
            "callable": CallableCost(lambda x, y: (x - y).abs().double() ** p, discrete=True)}[kind]
    ref_m = {"metric": 1.0 - np.eye(n), "matrix": m_np}.get(kind)
    i = torch.tensor(i_np, dtype=torch.long)
    j = torch.tensor(j_np, dtype=torch.long)
    if as_float is not None:
        i = i.to(as_float) + (0.5 if frac else 0.0)
    invalid = frac and as_float is not None or (i_np < 0).any() or (kind == "matrix" and (i_np >= n).any())
    try:
        out = cost(i, j)
    except ValueError as err:
        assert invalid, str(err)
        assert re.match(r"a (must hold integer|holds action indices outside)", str(err)), str(err)   # i is a
        return
    assert not invalid
    if ref_m is None:
        ref = np.abs(i_np - j_np).astype(np.float64) ** p
    else:
        ref = np.where(i_np < n, ref_m[np.minimum(i_np, n - 1), j_np], 1.0)   # metric: i = n is just "other"
    np.testing.assert_allclose(out.double().numpy(), ref, rtol=1e-6)
    assert torch.isfinite(cost.matrix(n)).all()


_CALLABLE_ARGS = (st.integers(1, 4), st.integers(1, 4), st.sampled_from(["right", "dim", "scalar", "extra", "int",
                                                                         "none"]))


@SWEEP
@given(*_CALLABLE_ARGS)
def test_sweep_callable_cost_output_shape(B, d, kind):
    outs = {"right": lambda x: x.sum(-1), "dim": lambda x: x, "scalar": lambda x: x.sum(),
            "extra": lambda x: x.sum(-1)[None].expand(2, -1), "int": lambda x: x.sum(-1).long(),
            "none": lambda x: None}
    cost = CallableCost(lambda a, b: outs[kind]((a - b).abs()))
    a, b = torch.zeros(B, d), torch.ones(B, d)
    try:
        out = cost(a, b)
    except ValueError as err:
        assert kind != "right", str(err)
        return
    assert kind == "right"
    assert out.shape == (B,) and torch.equal(out, torch.full((B,), float(d)))


# ----------------------------------------------------------------------------------------------
# (b3) the dual: solve_dual, dual_objective, transport_plan


def _np_dual(lams, adv, cost, w, eps):
    lams = np.atleast_1d(np.asarray(lams, dtype=np.float64))
    with np.errstate(all="ignore"):
        inner = (adv[None] - lams[:, None, None] * cost[None]).max(-1)
        return lams * eps + inner @ w


def _np_min_dual(adv, cost, w, eps):
    """(lam*, G(lam*)) by brute force over 0 and every breakpoint (exact for a bounded G)."""
    K = adv.shape[1]
    bps = [np.zeros(1)]
    with np.errstate(all="ignore"):
        for j in range(K):
            for k in range(j + 1, K):
                dc, da = cost[:, j] - cost[:, k], adv[:, j] - adv[:, k]
                lam = da[dc != 0] / dc[dc != 0]
                bps.append(lam[np.isfinite(lam) & (lam > 0)])
    bps = np.unique(np.concatenate(bps))
    g = _np_dual(bps, adv, cost, w, eps)
    best = int(np.argmin(g))
    return float(bps[best]), float(g[best])


def _lp_optimum(adv, cost, w, eps):
    """Optimum of discrete-P with scipy's HiGHS (the primal: an independent solver)."""
    B, K = adv.shape
    res = linprog(-(w[:, None] * adv).ravel(), A_ub=(w[:, None] * cost).ravel()[None], b_ub=[eps],
                  A_eq=sp.kron(sp.eye(B, format="csr"), np.ones((1, K)), format="csr"), b_eq=np.ones(B),
                  bounds=(0, None), method="highs",
                  options={"primal_feasibility_tolerance": 1e-10, "dual_feasibility_tolerance": 1e-10})
    assert res.status == 0, res.message
    return -float(res.fun)


@st.composite
def _dual_case(draw):
    dtype = draw(st.sampled_from(DTYPES))
    B = draw(st.sampled_from([1, 1, 2, 3, 5]))
    K = draw(st.sampled_from([1, 2, 2, 3, 3, 4]))
    adv = draw(_values((B, K), dtype))
    cost = draw(_values((B, K), dtype, nonneg=True))
    zero = draw(st.sampled_from(["worst", "worst", "random", "none"]))
    # mostly feasible: a zero-cost candidate (the sample's own action), often the worst one (so moving pays)
    if zero == "worst":
        cost[np.arange(B), np.nan_to_num(adv, nan=0.0).argmin(1)] = 0.0
    elif zero == "random":
        cost[np.arange(B), draw(st.lists(st.integers(0, K - 1), min_size=B, max_size=B))] = 0.0
    w = draw(_values((B,), dtype, nonneg=True))
    w_kind = draw(st.sampled_from(["raw", "normalised", "zero", "one_zero"]))
    with np.errstate(all="ignore"):
        if w_kind == "normalised" and np.isfinite(w).all() and w.sum() > 0:
            w = w / w.sum()
        elif w_kind == "zero":
            w = np.zeros(B)
        elif w_kind == "one_zero":
            w[0] = 0.0
    if draw(st.booleans()):
        # one scale for advantages and costs (the breakpoints then stay moderate)
        scale = float(np.nanmax(np.abs(np.where(np.isfinite(cost), cost, np.nan)), initial=0.0)) or 1.0
        scale_a = float(np.nanmax(np.abs(np.where(np.isfinite(adv), adv, np.nan)), initial=0.0)) or 1.0
        adv = adv / scale_a * scale
    with np.errstate(all="ignore"):
        top = adv.max(1, keepdims=True)
        c_low0 = float((w * np.where(adv == top, cost, np.inf).min(1)).sum())
    if draw(st.sampled_from([True, True, False])) and math.isfinite(c_low0) and c_low0 > 0:
        # relative to the greedy step's transport: the constraint binds (or barely does not)
        eps = c_low0 * draw(st.sampled_from([1e-6, 0.01, 0.3, 0.9, 0.999, 1.0, 1.5]))
    else:
        eps = 10.0 ** draw(st.integers(-30, 30)) * draw(st.sampled_from([1.0, 0.37, 2.5]))
        if dtype == F16 and draw(st.booleans()):
            eps = 10.0 ** draw(st.integers(-4, 4)) * 0.37
    return dtype, adv, cost, w, eps


def _first_bad(adv, cost, w, eps) -> str:
    """The argument a refusal of the dual's inputs must name: the first invalid one in the order checked."""
    for name, x, nonneg in (("advantage", adv, False), ("cost", cost, True), ("weight", w, True)):
        if not np.isfinite(x).all() or (nonneg and (x < 0).any()):
            return name
    return "" if 0 < eps < math.inf else "epsilon"


def _dual_tolerance(dtype, adv, cost, w, eps, lam):
    """How far G(lam) may be off in ``dtype``: rounding of each sample's term at lam."""
    with np.errstate(all="ignore"):
        scale = float((w * np.abs(adv).max(1)).sum() + lam * (eps + (w * cost.max(1)).sum()))
    tiny = torch.finfo(dtype).tiny
    return 64 * _eps_of(dtype) * scale + 64 * tiny * (1 + lam) * max(float(w.sum()), 1.0)


def _extreme(dtype, adv, cost, w, eps, lam_ref, g_ref) -> bool:
    """Whether the problem reaches the dtype's range (where refusing it as an overflow is right)."""
    top = _max_of(dtype) / 64
    with np.errstate(all="ignore"):
        span = float(adv.max() - adv.min())
        wc = float((w[:, None] * cost).max() * len(w))
        wa = float((w[:, None] * np.abs(adv)).max() * len(w))
        return max(span, wc, wa, lam_ref, abs(g_ref), lam_ref * eps) >= top or not math.isfinite(g_ref)


@DUAL_SWEEP
@given(_dual_case())
def test_sweep_solve_dual(case):
    dtype, adv_np, cost_np, w_np, eps = case
    adv, cost, w = _as(adv_np, dtype), _as(cost_np, dtype), _as(w_np, dtype)
    a64, c64, w64 = (x.double().numpy() for x in (adv, cost, w))   # exactly what the solver sees
    eps_dt = float(torch.tensor(eps, dtype=F64).to(dtype))
    finite = all(np.isfinite(x).all() for x in (a64, c64, w64)) and (c64 >= 0).all() and (w64 >= 0).all()
    representable = 0 < eps_dt < math.inf
    with np.errstate(all="ignore"):
        c_min = float((w64 * c64.min(1)).sum())
    # the solver's products w_b c_b round in the dtype: below its normal range, to its smallest subnormal
    sub = len(w64) * torch.finfo(dtype).tiny * _eps_of(dtype)
    try:
        sol = solve_dual(adv, cost, w, eps)
    except ValueError as err:
        msg = str(err)
        if not finite or not representable:
            assert msg.startswith(_first_bad(a64, c64, w64, eps_dt)), msg
            return
        if "infeasible" in msg:
            assert c_min > eps_dt * (1 - 8 * _eps_of(dtype)) - sub, (msg, c_min, eps_dt)
            return
        feasible = c_min <= eps_dt
        lam_ref, g_ref = _np_min_dual(a64, c64, w64, eps_dt) if feasible else (math.inf, -math.inf)
        if "underflows" in msg:   # lam* > 0 below the dtype's normal range (to its rounding)
            assert 0 < lam_ref < torch.finfo(dtype).tiny * (1 + 16 * _eps_of(dtype)), (msg, lam_ref)
            return
        assert "overflows" in msg, msg
        assert _extreme(dtype, a64, c64, w64, eps_dt, lam_ref, g_ref), (msg, a64, c64, w64, eps_dt, lam_ref)
        return
    assert finite and representable
    assert c_min <= eps_dt * (1 + 8 * _eps_of(dtype)) + sub + 1e-300, (c_min, eps_dt)
    B, K = a64.shape
    fields = ("multiplier", "dual_value", "low_cost", "high_cost", "split")
    for f in fields:
        v = getattr(sol, f)
        assert v.dtype == dtype and v.shape == () and torch.isfinite(v), (f, v)
    lam = float(sol.multiplier)
    assert lam >= 0 and 0 <= float(sol.split) <= 1
    lam_ref, g_ref = _np_min_dual(a64, c64, w64, eps_dt)
    tol = _dual_tolerance(dtype, a64, c64, w64, eps_dt, max(lam, lam_ref))
    assert abs(float(sol.dual_value) - g_ref) <= tol, (float(sol.dual_value), g_ref, tol)
    assert abs(float(_np_dual(lam, a64, c64, w64, eps_dt)[0]) - g_ref) <= tol
    if dtype == F64 and B * K <= 12 and max(np.abs(a64).max(), c64.max(), w64.max(), eps_dt) < 1e3 \
            and min(eps_dt, float(w64.sum())) > 1e-3:
        lp = _lp_optimum(a64, c64, w64, eps_dt)
        assert abs(float(sol.dual_value) - lp) <= 1e-7 * max(1.0, abs(lp)), (float(sol.dual_value), lp)
    low, high = sol.low_index, sol.high_index
    assert low.shape == high.shape == (B,) and int(low.min()) >= 0 and int(high.max()) < K
    plan = transport_plan(sol, K)
    assert plan.shape == (B, K) and torch.isfinite(plan).all() and (plan >= 0).all()
    np.testing.assert_allclose(plan.double().sum(1).numpy(), 1.0, atol=4 * _eps_of(dtype))
    for n in (K - 1, K + 1):
        with pytest.raises(ValueError, match="num_candidates"):
            transport_plan(sol, n)


_DUAL_OBJECTIVE_ARGS = (_dual_case(), st.one_of(st.floats(allow_nan=True, allow_infinity=True),
                                                st.sampled_from([0.0, 1.0, 0.5, True, -0.0]),
                                                st.integers(-3, 3).map(lambda e: 10.0**(7 * e))))


@SWEEP
@given(*_DUAL_OBJECTIVE_ARGS)
def test_sweep_dual_objective(case, lam):
    dtype, adv_np, cost_np, w_np, eps = case
    adv, cost, w = _as(adv_np, dtype), _as(cost_np, dtype), _as(w_np, dtype)
    a64, c64, w64 = (x.double().numpy() for x in (adv, cost, w))
    eps_dt = float(torch.tensor(eps, dtype=F64).to(dtype))
    lam_dt = float(torch.tensor(float(lam), dtype=F64).to(dtype)) if not isinstance(lam, bool) else math.nan
    valid = (all(np.isfinite(x).all() for x in (a64, c64, w64)) and (c64 >= 0).all() and (w64 >= 0).all()
             and 0 < eps_dt < math.inf and not isinstance(lam, bool) and math.isfinite(lam_dt) and lam_dt >= 0)
    with np.errstate(all="ignore"):
        ref = float(_np_dual(lam_dt, a64, c64, w64, eps_dt)[0]) if valid else math.nan
    try:
        out = dual_objective(lam, adv, cost, w, eps)
    except ValueError as err:
        if not valid:   # lam is checked after the problem
            assert str(err).startswith(_first_bad(a64, c64, w64, eps_dt) or "lam"), str(err)
        else:
            assert "overflows" in str(err)
            with np.errstate(all="ignore"):
                big = max(float(np.abs(a64).max()), lam_dt * float(c64.max()), abs(ref),
                          float((w64[:, None] * (np.abs(a64) + lam_dt * c64)).max()) * len(w64))
            assert big >= _max_of(dtype) / 64 or not math.isfinite(ref), (str(err), ref)
        return
    assert valid, (lam, a64, c64, w64, eps_dt)
    assert out.shape == () and torch.isfinite(out)
    tol = _dual_tolerance(dtype, a64, c64, w64, eps_dt, lam_dt)
    assert abs(float(out) - ref) <= tol, (float(out), ref, tol)


# ----------------------------------------------------------------------------------------------
# (c) every property can fail: one realistic bug seeded into the code under test, caught by the property with
# its own settings (same budget, same derandomised examples) and only the shrinking left out, which would spend
# seconds minimising a counterexample nobody reads


def assert_property_catches(prop, budget, *strategies):
    """Run the property ``prop`` (hypothesis-decorated) as CI does, without shrinking, and require a failure."""
    rerun = settings(budget, phases=[Phase.generate], report_multiple_bugs=False)(
        given(*strategies)(prop.hypothesis.inner_test))
    with pytest.raises(AssertionError):
        rerun()


def test_seeded_bug_continuous_cost_without_its_finiteness_checks(monkeypatch):
    # No value check at all: a NaN action comes out as a NaN cost.
    monkeypatch.setattr(torchrl_ot.costs, "raise_first_failed", lambda checks: None)
    assert_property_catches(test_sweep_continuous_costs, SWEEP, _continuous_case())


def test_seeded_bug_continuous_cost_blames_its_output_for_a_nan_input(monkeypatch):
    # The inputs unchecked, the output still checked: a NaN in a is refused as an overflow of finite inputs.
    real = TransportCost._input_checks
    monkeypatch.setattr(TransportCost, "_input_checks",
                        lambda self, a, b: real(self, a, b) if self.discrete else [])
    assert_property_catches(test_sweep_continuous_costs, SWEEP, _continuous_case())


def test_seeded_bug_euclidean_gradient_through_plain_autograd(monkeypatch):
    # The first failure the sweep found: sqrt's infinite derivative at a == b gives inf * 0 = NaN.
    monkeypatch.setattr(torchrl_ot.costs._PowerNorm, "apply", staticmethod(lambda x, p: x.pow(2).sum(-1).sqrt() ** p))
    assert_property_catches(test_sweep_continuous_costs, SWEEP, _continuous_case())


def test_seeded_bug_discrete_cost_without_its_index_range_check(monkeypatch):
    # Index -1 then reads the matrix's last column (Python indexing), |-1 - j| for IndexDistanceCost.
    real = TransportCost._input_checks
    monkeypatch.setattr(TransportCost, "_input_checks", lambda self, a, b: [
        check for check in real(self, a, b) if "outside the allowed range" not in check[1]()])
    assert_property_catches(test_sweep_discrete_costs, SWEEP, _discrete_case())


def test_seeded_bug_callable_cost_without_its_shape_check(monkeypatch):
    # A callable that forgot .sum(-1) gives [B, d] costs, which then broadcast downstream.
    real = TransportCost._check_output
    monkeypatch.setattr(TransportCost, "_check_output", lambda self, out, shape, device: real(
        self, out, out.shape if isinstance(out, torch.Tensor) else shape, device))
    assert_property_catches(test_sweep_callable_cost_output_shape, SWEEP, *_CALLABLE_ARGS)


def test_seeded_bug_solve_dual_multiplier_one_percent_off(monkeypatch):
    real = solve_dual

    def off(*args):
        sol = real(*args)
        return dataclasses.replace(sol, multiplier=sol.multiplier * 1.01)

    # The property's module looks solve_dual up in its own globals.
    monkeypatch.setitem(test_sweep_solve_dual.hypothesis.inner_test.__globals__, "solve_dual", off)
    assert_property_catches(test_sweep_solve_dual, DUAL_SWEEP, _dual_case())


def test_seeded_bug_dual_objective_without_the_epsilon_term(monkeypatch):
    real = dual_objective

    def no_eps(lam, adv, cost, w, eps):
        out = real(lam, adv, cost, w, eps)   # its input checks stay: only the value is wrong
        return out - torch.tensor(float(lam) * float(eps), dtype=F64).to(out.dtype)

    monkeypatch.setitem(test_sweep_dual_objective.hypothesis.inner_test.__globals__, "dual_objective", no_eps)
    assert_property_catches(test_sweep_dual_objective, SWEEP, *_DUAL_OBJECTIVE_ARGS)
