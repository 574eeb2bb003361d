"""Pure-tensor core of OT-TRPO: the exact one-dimensional dual and the mass-splitting update.

Every setting of the paper is flattened into *samples* ``b`` (mass ``weight[b]``) and
*candidates* ``k`` (``advantage[b, k]``, ``cost[b, k]``); see ``docs/equations.md``. The dual
(paper eq. 12; discrete-D in Corollary 3) is

    G(lam) = lam * epsilon + sum_b weight_b * max_k (advantage_bk - lam * cost_bk),   lam >= 0.

G is convex and piecewise linear. :func:`solve_dual` computes its minimiser *exactly*: it walks
each sample's upper envelope (at most K - 1 breakpoints, vectorised over samples), then finds
lam* as the weighted quantile of the breakpoints at which the right derivative
``epsilon - sum_b w_b c[b, low_b(lam)]`` turns non-negative, by a linear-time weighted selection.
No tolerance, no iterations to convergence: lam* is one of the breakpoints (or 0).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

__all__ = [
    "DualSolution",
    "solve_dual",
    "dual_objective",
    "transport_plan",
    "tabular_problem",
    "tabular_ot_update",
    "categorical_transport",
    "gaussian_transport_bound",
]


@dataclass(frozen=True)
class DualSolution:
    """The exact solution of the dual (eq. 12 / discrete-D) and the optimal update it defines.

    Attributes:
        multiplier: lam*, the minimiser of G (0-dim). Exactly 0 when the trust region is inactive.
        dual_value: G(lam*) (0-dim), equal to the optimal surrogate (strong duality, Theorem 1).
        low_index: ``[B]`` the closest maximiser of ``advantage - lam* cost`` per sample (T_low, eq. 5).
        high_index: ``[B]`` the farthest maximiser per sample (T_high, eq. 5).
        low_cost: ``sum_b w_b cost[b, low_b]`` (0-dim), the transport if all mass goes to T_low.
        high_cost: ``sum_b w_b cost[b, high_b]`` (0-dim).
        split: t*, the share of each sample's mass sent to its closest maximiser (eq. 6, 10).
        epsilon: the trust-region radius the solution was computed for (0-dim).
    """

    multiplier: Tensor
    dual_value: Tensor
    low_index: Tensor
    high_index: Tensor
    low_cost: Tensor
    high_cost: Tensor
    split: Tensor
    epsilon: Tensor

    @property
    def transport(self) -> Tensor:
        """Expected transport of the mass-split update: ``t* c_low + (1 - t*) c_high`` (eq. 6)."""
        return self.split * self.low_cost + (1 - self.split) * self.high_cost

    @property
    def active(self) -> Tensor:
        """Whether the trust-region constraint binds (lam* > 0)."""
        return self.multiplier > 0


# --------------------------------------------------------------------------------------------
# input checks


def _check_finite(x: Tensor, name: str, *, nonneg: bool = False) -> None:
    lo, hi = torch.aminmax(x)
    # aminmax propagates NaN, so one pass covers NaN, inf and the sign.
    if not bool(torch.isfinite(lo) & torch.isfinite(hi)):
        raise ValueError(f"{name} must be finite; it contains NaN or inf")
    if nonneg and bool(lo < 0):
        raise ValueError(f"{name} must be non-negative; its smallest entry is {lo.item():.6g}")


def _check_epsilon(epsilon: float | Tensor, dtype: torch.dtype, device: torch.device) -> Tensor:
    if isinstance(epsilon, Tensor):
        if epsilon.numel() != 1:
            raise ValueError(f"epsilon must be a float or a 0-dim tensor, got shape {tuple(epsilon.shape)}")
        eps = epsilon.detach().reshape(()).to(dtype=dtype, device=device)
    elif isinstance(epsilon, (int, float)) and not isinstance(epsilon, bool):
        eps = torch.tensor(float(epsilon), dtype=dtype, device=device)
    else:
        raise ValueError(f"epsilon must be a positive float or 0-dim tensor, got {type(epsilon).__name__}")
    if not bool(torch.isfinite(eps)) or not bool(eps > 0):
        raise ValueError(f"epsilon must be positive and finite, got {eps.item()!r}")
    return eps


def _check_dual_inputs(advantage: Tensor, cost: Tensor, weight: Tensor, epsilon: float | Tensor):
    for name, x in (("advantage", advantage), ("cost", cost), ("weight", weight)):
        if not isinstance(x, Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise ValueError(f"{name} must have a floating dtype, got {x.dtype}")
    if advantage.dim() != 2:
        raise ValueError(f"advantage must have shape [B, K], got {tuple(advantage.shape)}")
    if cost.shape != advantage.shape:
        raise ValueError(
            f"cost must have the shape of advantage {tuple(advantage.shape)}, got {tuple(cost.shape)}"
        )
    if weight.shape != advantage.shape[:1]:
        raise ValueError(f"weight must have shape [B] = [{advantage.shape[0]}], got {tuple(weight.shape)}")
    if advantage.shape[0] == 0:
        raise ValueError("advantage is an empty batch: B must be at least 1")
    if advantage.shape[1] == 0:
        raise ValueError("advantage has no candidates: K must be at least 1")
    dtype = torch.promote_types(torch.promote_types(advantage.dtype, cost.dtype), weight.dtype)
    device = advantage.device
    if cost.device != device or weight.device != device:
        raise ValueError(
            f"advantage, cost and weight must share a device, got {device}, {cost.device}, {weight.device}"
        )
    advantage, cost, weight = (x.detach().to(dtype) for x in (advantage, cost, weight))
    _check_finite(advantage, "advantage")
    _check_finite(cost, "cost", nonneg=True)
    _check_finite(weight, "weight", nonneg=True)
    return advantage, cost, weight, _check_epsilon(epsilon, dtype, device)


# --------------------------------------------------------------------------------------------
# the exact dual


def _pick(x: Tensor, index: Tensor) -> Tensor:
    """``x[b, index[b]]`` for every row b (gather is several times faster than fancy indexing)."""
    return x.gather(-1, index.unsqueeze(-1)).squeeze(-1)


def _envelope(advantage: Tensor, cost: Tensor) -> tuple[Tensor, list[_Step]]:
    """Walk every sample's upper envelope of the lines ``advantage_k - lam * cost_k`` from lam = 0.

    Returns ``(low0, steps)``: ``low0`` is the maximiser at lam = 0 with ties broken towards the
    cheapest, and each step ``(rows, lam, drop, nxt)`` says that sample ``rows[i]`` (all samples
    when ``rows`` is None) switches to candidate ``nxt[i]`` at ``lam[i]`` (``inf``: never) and its
    cost falls by ``drop[i]``. Along a sample's steps ``lam`` is non-decreasing. At most K - 1
    steps, each vectorised over the samples still moving; K = 2 has a closed form.
    """
    B, K = advantage.shape
    if K == 2:
        return _envelope_two(advantage, cost)
    inf = torch.tensor(float("inf"), dtype=advantage.dtype, device=advantage.device)
    top = advantage.amax(-1, keepdim=True)
    low0 = torch.where(advantage == top, cost, inf).argmin(-1)
    rows = None
    a_cur, c_cur = top.squeeze(-1), _pick(cost, low0)
    lam = torch.zeros(B, dtype=advantage.dtype, device=advantage.device)
    steps: list[_Step] = []
    for _ in range(K - 1):
        gap = c_cur[:, None] - cost
        cheaper = gap > 0
        # A cheaper line overtakes the current one at lam = (a_cur - a_k) / (c_cur - c_k).
        cross = torch.where(cheaper, (a_cur[:, None] - advantage) / torch.where(cheaper, gap, 1), inf)
        nxt_lam = cross.amin(-1)
        moved = torch.isfinite(nxt_lam)
        n_moved = int(moved.sum())
        if n_moved == 0:
            break
        if n_moved < moved.numel():  # samples whose envelope is complete drop out
            idx = moved.nonzero().squeeze(-1)
            rows = idx if rows is None else rows[idx]
            advantage, cost, cross = advantage[idx], cost[idx], cross[idx]
            nxt_lam, c_cur, lam = nxt_lam[idx], c_cur[idx], lam[idx]
        nxt = torch.where(cross == nxt_lam[:, None], cost, inf).argmin(-1)
        # Rounding may put a crossing a hair before the previous one; the envelope is monotone.
        lam = torch.maximum(nxt_lam, lam)
        c_new = _pick(cost, nxt)
        steps.append(_Step(rows, lam, c_cur - c_new, nxt))
        a_cur, c_cur = _pick(advantage, nxt), c_new
    return low0, steps


def _envelope_two(advantage: Tensor, cost: Tensor) -> tuple[Tensor, list[_Step]]:
    """Closed form of :func:`_envelope` for two candidates (the hinge of Section 5, case 2)."""
    a0, a1 = advantage.unbind(-1)
    c0, c1 = cost.unbind(-1)
    da, dc = a1 - a0, c1 - c0
    low0 = ((da > 0) | ((da == 0) & (dc < 0))).long()
    # The better line is the costlier one: the other overtakes it at lam = da / dc. Signs, not the
    # product da * dc, decide it: the product under- or overflows for extreme magnitudes.
    crosses = ((da > 0) & (dc > 0)) | ((da < 0) & (dc < 0))
    lam = torch.where(crosses, da / torch.where(crosses, dc, 1), float("inf"))
    drop = torch.where(crosses, dc.abs(), 0)
    return low0, [_Step(None, lam, drop, 1 - low0)]


class _Step(NamedTuple):
    rows: Tensor | None
    lam: Tensor
    drop: Tensor
    nxt: Tensor


def _piece_at(low0: Tensor, steps: list[_Step], lam: Tensor, *, right: bool) -> Tensor:
    """Each sample's maximiser just right (``right=True``: T_low) or just left of ``lam`` (T_high)."""
    out = low0
    for step in steps:
        passed = step.lam <= lam if right else step.lam < lam
        if step.rows is None:
            out = torch.where(passed, step.nxt, out)
        else:
            out = out.clone() if out is low0 else out
            out[step.rows] = torch.where(passed, step.nxt, out[step.rows])
    return out


_SMALL = 4096


def _weighted_select(values: Tensor, weights: Tensor, need: Tensor) -> Tensor:
    """Smallest ``v`` in ``values`` with ``sum(weights[values <= v]) >= need``.

    Expected linear time: each round brackets the answer between two pivots read off a strided
    sample and keeps only the values between them, so the set shrinks geometrically; the last
    few thousand are sorted. Sums run in float64 whatever the input dtype.
    """
    weights = weights.to(torch.float64)
    need = need.to(torch.float64)
    while values.numel() > _SMALL:
        n = values.numel()
        stride = max(n // 1024, 1)
        sample_v, order = values[::stride].sort()
        sample_w = weights[::stride][order].cumsum(0)
        frac = float(need / weights.sum())
        # Bracket the target quantile of the sample with a margin of ~4 standard errors.
        margin = 4.0 / sample_v.numel() ** 0.5 + 1.0 / sample_v.numel()
        total_s = sample_w[-1]
        lo_i = int(torch.searchsorted(sample_w, total_s * max(frac - margin, 0.0)))
        hi_i = int(torch.searchsorted(sample_w, total_s * min(frac + margin, 1.0)))
        lo = sample_v[min(lo_i, sample_v.numel() - 1)]
        hi = sample_v[min(hi_i, sample_v.numel() - 1)]
        below_lo = values < lo
        w_lo = weights[below_lo].sum()
        if w_lo >= need:
            keep = below_lo
        else:
            upto_hi = values <= hi
            w_hi = weights[upto_hi].sum()
            if w_hi >= need:
                keep, need = upto_hi & ~below_lo, need - w_lo
            else:
                keep, need = ~upto_hi, need - w_hi
        if int(keep.sum()) == n:  # all equal to a pivot: no progress possible, finish by sorting
            break
        values, weights = values[keep], weights[keep]
    sorted_v, order = values.sort()
    csum = weights[order].cumsum(0)
    pos = int(torch.searchsorted(csum, need))
    return sorted_v[min(pos, sorted_v.numel() - 1)]


def _overflow_error(dtype: torch.dtype) -> ValueError:
    # Finite inputs whose differences overflow the dtype (|A| near its max): refuse, never NaN.
    return ValueError(
        f"advantage and cost are finite but the dual overflows {dtype}; rescale advantage "
        "(e.g. normalise it) so that differences between candidates stay representable"
    )


def solve_dual(advantage: Tensor, cost: Tensor, weight: Tensor, epsilon: float | Tensor) -> DualSolution:
    """Solve the OT trust-region dual (eq. 12 / discrete-D) exactly.

    Args:
        advantage: ``[B, K]`` advantage of moving sample b's mass to candidate k.
        cost: ``[B, K]`` transport cost ``c(a_b, a'_k) >= 0``.
        weight: ``[B]`` mass of sample b, ``rho(s_b) pi(a_b | s_b) >= 0``.
        epsilon: trust-region radius, a positive float or 0-dim tensor.

    Returns:
        A :class:`DualSolution`. Floating dtype is the promotion of the inputs; reductions run in
        float64. Raises ``ValueError`` on NaN/inf, negative cost or weight, shape mismatch, empty
        batch, ``epsilon <= 0``, or an infeasible problem (even the cheapest candidates cost more
        than epsilon).

    >>> import torch
    >>> adv = torch.tensor([[0.0, 1.0], [0.0, 2.0]])   # candidate 0: stay (cost 0), 1: move (cost 1)
    >>> cost = torch.tensor([[0.0, 1.0], [0.0, 1.0]])
    >>> sol = solve_dual(adv, cost, torch.tensor([0.5, 0.5]), 0.25)
    >>> sol.multiplier, sol.split, sol.transport   # only the better sample moves, half of it
    (tensor(2.), tensor(0.5000), tensor(0.2500))
    >>> sol.dual_value   # = 0.5 * 0.5 * 2, the best surrogate gain within the trust region
    tensor(0.5000)
    """
    advantage, cost, weight, eps = _check_dual_inputs(advantage, cost, weight, epsilon)
    acc = torch.float64
    low0, steps = _envelope(advantage, cost)
    c_low0 = (weight * _pick(cost, low0)).sum(dtype=acc)
    excess = c_low0 - eps.to(acc)

    # Feasibility from the data itself (not from summed cost drops, which round): G is unbounded
    # below when even the cheapest candidates cost more than epsilon.
    c_min = (weight * cost.amin(-1)).sum(dtype=acc)
    if bool(c_min > eps.to(acc)):
        raise ValueError(
            f"infeasible trust region: the cheapest candidates of the samples cost {c_min.item():.6g} "
            f"> epsilon = {eps.item():.6g}; include a zero-cost candidate (the sample's own action) "
            "or raise epsilon"
        )
    if bool(excess <= 0):
        lam = torch.zeros((), dtype=advantage.dtype, device=advantage.device)
        low = low0
        top = _pick(advantage, low0)
        # Maximisers at lam = 0 all have the top advantage; the farthest is the costliest of them.
        high = torch.where(advantage == top[:, None], cost, -1).argmax(-1)
    else:
        lams, wdrops = [], []
        for step in steps:
            w = weight if step.rows is None else weight[step.rows]
            wdrop = w * step.drop
            useful = wdrop > 0  # drop > 0 only where the step exists (finite lam)
            lams.append(step.lam[useful])
            wdrops.append(wdrop[useful])
        lams = torch.cat(lams) if lams else advantage.new_empty(0)
        wdrops = torch.cat(wdrops) if wdrops else advantage.new_empty(0)
        if lams.numel() == 0:  # feasible, yet no crossing survived: it overflowed to inf
            raise _overflow_error(advantage.dtype)
        lam = _weighted_select(lams, wdrops, excess).to(advantage.dtype)
        low = _piece_at(low0, steps, lam, right=True)
        high = _piece_at(low0, steps, lam, right=False)

    cost_low = _pick(cost, low)
    c_low = (weight * cost_low).sum(dtype=acc)
    c_high = c_low if high is low else (weight * _pick(cost, high)).sum(dtype=acc)
    regularised = _pick(advantage, low).to(acc) - lam.to(acc) * cost_low.to(acc)
    dual_value = lam.to(acc) * eps.to(acc) + (weight.to(acc) * regularised).sum()
    if bool(lam > 0) and bool(c_high > c_low):
        split = ((c_high - eps.to(acc)) / (c_high - c_low)).clamp(0.0, 1.0)
    else:
        # lam* = 0: every maximiser is equally good, so move to the closest (least transport).
        split = torch.ones((), dtype=acc, device=advantage.device)
    if not bool(torch.isfinite(lam) & torch.isfinite(dual_value)):
        raise _overflow_error(advantage.dtype)
    dt = advantage.dtype
    return DualSolution(
        multiplier=lam,
        dual_value=dual_value.to(dt),
        low_index=low,
        high_index=high,
        low_cost=c_low.to(dt),
        high_cost=c_high.to(dt),
        split=split.to(dt),
        epsilon=eps,
    )


def dual_objective(lam: float | Tensor, advantage: Tensor, cost: Tensor, weight: Tensor,
                   epsilon: float | Tensor) -> Tensor:
    """Evaluate ``G(lam)`` (eq. 12) directly: the reference the exact solver is checked against."""
    lam = torch.as_tensor(lam, dtype=advantage.dtype, device=advantage.device)
    inner = (advantage - lam[..., None, None] * cost).amax(-1)
    return lam * torch.as_tensor(epsilon, dtype=advantage.dtype) + (weight * inner).sum(-1)


def transport_plan(solution: DualSolution, num_candidates: int, *, split: bool = True) -> Tensor:
    """Per-sample transport plan ``[B, K]`` of the optimal update (eq. 10).

    Row b puts ``t*`` on ``low_index[b]`` and ``1 - t*`` on ``high_index[b]``. With
    ``split=False`` (the WPO rule) the whole mass goes to one maximiser: of the closest and the
    farthest, the one with the lower candidate index, as a plain ``argmax`` would pick.
    """
    low, high = solution.low_index, solution.high_index
    dtype = solution.split.dtype
    plan = torch.zeros(low.shape[0], num_candidates, dtype=dtype, device=low.device)
    if split:
        t = solution.split
        plan.scatter_add_(-1, low[:, None], t.expand(low.shape[0], 1).clone())
        plan.scatter_add_(-1, high[:, None], (1 - t).expand(low.shape[0], 1).clone())
    else:
        plan.scatter_(-1, torch.minimum(low, high)[:, None], 1.0)
    return plan


def tabular_problem(policy: Tensor, advantage: Tensor, state_weight: Tensor, cost: Tensor):
    """Flatten the direct-parametrisation problem (Corollary 3) into ``[S*A, A]`` samples.

    Sample (i, j) carries mass ``rho_i pi_ij``; candidate k has advantage ``A(s_i, a_k)`` and
    cost ``c(a_j, a_k)``. Returns ``(advantage, cost, weight)`` for :func:`solve_dual`.
    """
    S, A = policy.shape
    adv = advantage[:, None, :].expand(S, A, A).reshape(S * A, A)
    c = cost[None].expand(S, A, A).reshape(S * A, A)
    w = (state_weight[:, None] * policy).reshape(S * A)
    return adv, c, w


def _check_tabular(policy: Tensor, advantage: Tensor, state_weight: Tensor, cost: Tensor) -> None:
    for name, x in (("policy", policy), ("advantage", advantage), ("state_weight", state_weight),
                    ("cost", cost)):
        if not isinstance(x, Tensor) or not x.is_floating_point():
            raise ValueError(f"{name} must be a floating torch.Tensor")
    if policy.dim() != 2 or policy.shape[0] == 0 or policy.shape[1] == 0:
        raise ValueError(f"policy must have shape [S, A] with S, A >= 1, got {tuple(policy.shape)}")
    S, A = policy.shape
    if advantage.shape != policy.shape:
        raise ValueError(f"advantage must have the policy's shape [{S}, {A}], got {tuple(advantage.shape)}")
    if state_weight.shape != (S,):
        raise ValueError(f"state_weight must have shape [{S}], got {tuple(state_weight.shape)}")
    if cost.shape != (A, A):
        raise ValueError(f"cost must have shape [{A}, {A}], got {tuple(cost.shape)}")
    _check_finite(policy, "policy", nonneg=True)
    row = policy.sum(-1)
    if bool(((row - 1).abs() > 1e-5).any()):
        raise ValueError("policy rows must lie on the simplex (each row sums to 1)")
    _check_finite(advantage, "advantage")
    _check_finite(state_weight, "state_weight", nonneg=True)
    _check_finite(cost, "cost", nonneg=True)
    if bool((cost.diagonal() != 0).any()):
        raise ValueError("cost must have a zero diagonal (c(a, a) = 0, Assumption 2)")


def tabular_ot_update(policy: Tensor, advantage: Tensor, state_weight: Tensor, cost: Tensor,
                      epsilon: float | Tensor, split: bool = True) -> tuple[Tensor, DualSolution]:
    """One exact OT-TRPO step for a tabular policy (Corollary 3, eq. 9-10).

    Args:
        policy: ``[S, A]`` current policy, rows on the simplex.
        advantage: ``[S, A]`` advantage estimates ``A(s, a)``.
        state_weight: ``[S]`` state weights ``rho(s) >= 0`` (e.g. discounted visitation).
        cost: ``[A, A]`` transport-cost matrix with a zero diagonal.
        epsilon: trust-region radius.
        split: ``True`` for the optimal mass-splitting update; ``False`` for the WPO rule.

    Returns:
        ``(new_policy, solution)``. States with ``rho(s) = 0`` enter neither the surrogate nor the
        constraint, so any update there is optimal; they get the same lam*-regularised transport
        maps as every other state (the limit of the problem as their weight goes to 0), which
        keeps unvisited states improving with the rest instead of freezing them.

    >>> import torch
    >>> pi = torch.full((1, 2), 0.5, dtype=torch.float64)
    >>> adv = torch.tensor([[-1.0, 1.0]], dtype=torch.float64)
    >>> cost = torch.tensor([[0.0, 1.0], [1.0, 0.0]], dtype=torch.float64)
    >>> new, sol = tabular_ot_update(pi, adv, torch.ones(1, dtype=torch.float64), cost, 0.2)
    >>> new   # 0.2 of mass moves from action 0 to action 1
    tensor([[0.3000, 0.7000]], dtype=torch.float64)
    """
    _check_tabular(policy, advantage, state_weight, cost)
    S, A = policy.shape
    adv, c, w = tabular_problem(policy, advantage, state_weight, cost)
    solution = solve_dual(adv, c, w, epsilon)
    plan = transport_plan(solution, A, split=split).to(policy.dtype)
    new_policy = (policy.reshape(S * A, 1) * plan).reshape(S, A, A).sum(1)
    return new_policy, solution


# -------------------------------------------------------------------------------------------------
# The constraint of Problem (P) for a fitted network: the OT discrepancy (eq. 1) between pi_old and pi_theta


def _is_uniform_metric(cost: Tensor) -> bool:
    off = cost[~torch.eye(cost.shape[0], dtype=torch.bool, device=cost.device)]
    return off.numel() == 0 or bool((off == off[0]).all())


def categorical_transport(old: Tensor, new: Tensor, cost: Tensor) -> Tensor:
    """Exact OT discrepancy ``C(old(.|s), new(.|s))`` (eq. 1) per state between two categorical policies.

    Args:
        old, new: ``[B, A]`` probabilities (rows on the simplex). cost: ``[A, A]`` cost matrix, zero diagonal.

    Returns ``[B]``. Closed forms where they exist: a cost that charges every move the same ``c`` (the
    0/1 metric: ``c`` times the total variation ``0.5 sum |old - new|``), ``c |i - j|`` on ordered
    actions (the gap between the two CDFs) and two actions (the surplus of one action moves to the
    other). Any other matrix is solved state by state by POT's exact network simplex (``ot.emd2``).
    Exact either way: this is what checks that a fitted network stayed inside the trust region, so it
    is never estimated.

    >>> import torch
    >>> old = torch.tensor([[0.5, 0.5, 0.0]], dtype=torch.float64)
    >>> new = torch.tensor([[0.2, 0.5, 0.3]], dtype=torch.float64)
    >>> categorical_transport(old, new, torch.ones(3, 3, dtype=torch.float64) - torch.eye(3, dtype=torch.float64))
    tensor([0.3000], dtype=torch.float64)
    >>> categorical_transport(old, new, torch.tensor([[0.0, 1.0, 2.0], [1.0, 0.0, 1.0], [2.0, 1.0, 0.0]],
    ...                                              dtype=torch.float64))   # 0.3 moves two steps
    tensor([0.6000], dtype=torch.float64)
    """
    for name, x in (("old", old), ("new", new)):
        if not isinstance(x, Tensor) or not x.is_floating_point() or x.dim() != 2:
            raise ValueError(f"{name} must be a floating [B, A] tensor of probabilities")
        _check_finite(x, name, nonneg=True)
    if new.shape != old.shape:
        raise ValueError(f"new must have old's shape {tuple(old.shape)}, got {tuple(new.shape)}")
    A = old.shape[1]
    if not isinstance(cost, Tensor) or cost.shape != (A, A):
        raise ValueError(f"cost must be a [{A}, {A}] tensor, got {getattr(cost, 'shape', type(cost).__name__)}")
    _check_finite(cost, "cost", nonneg=True)
    if bool((cost.diagonal() != 0).any()):
        raise ValueError("cost must have a zero diagonal (c(a, a) = 0, Assumption 2)")
    cost = cost.to(old.dtype)
    if _is_uniform_metric(cost):
        move = cost[0, 1] if A > 1 else cost.new_zeros(())
        return move * 0.5 * (old - new).abs().sum(-1)
    line = (torch.arange(A, device=cost.device)[:, None] - torch.arange(A, device=cost.device)[None, :]).abs()
    if A > 1 and torch.equal(cost, cost[0, 1] * line.to(cost.dtype)):
        # |i - j| on ordered actions (IndexDistanceCost(p=1)): W1 on a line, the gap between the CDFs.
        return cost[0, 1] * (old.cumsum(-1) - new.cumsum(-1))[:, :-1].abs().sum(-1)
    if A == 2:
        surplus = old[:, 0] - new[:, 0]  # > 0: action 0's surplus moves to action 1
        return torch.where(surplus > 0, surplus * cost[0, 1], -surplus * cost[1, 0])
    import numpy as np
    import ot

    p, q = old.detach().double().cpu().numpy(), new.detach().double().cpu().numpy()
    c = np.ascontiguousarray(cost.detach().double().cpu().numpy())
    # emd2 wants equal masses to rounding: renormalise each row.
    out = [float(ot.emd2(a / a.sum(), b / b.sum(), c)) if not np.array_equal(a, b) else 0.0
           for a, b in zip(p, q, strict=True)]
    return torch.tensor(out, dtype=old.dtype, device=old.device)


def gaussian_transport_bound(old_loc: Tensor, old_scale: Tensor, new_loc: Tensor, new_scale: Tensor, cost,
                             lipschitz: float | Tensor = 1.0) -> Tensor:
    """An upper bound on ``C(pi_old(.|s), pi_theta(.|s))`` (eq. 1) per state for diagonal Gaussians pushed
    through a map that is ``lipschitz``-Lipschitz in each coordinate (1 for none; ``(high - low) / 2`` for
    TorchRL's ``TanhNormal``).

    The synchronous coupling (both actions from the same noise ``z``) moves coordinate i by at most
    ``L_i |dloc_i + dscale_i z_i|``. With equal scales that is at most ``L |dloc|`` surely, so the bound is
    ``cost(0, L |dloc|)`` for any cost that grows with each coordinate's distance (:class:`EuclideanCost`,
    :class:`L1Cost`). With different scales the expectation is closed-form only for the squared Euclidean
    cost: ``sum_i L_i^2 (dloc_i^2 + dscale_i^2)`` (the Gaussians' exact W2^2 when ``L = 1``). Returns ``[B]``.

    >>> import torch
    >>> from torchrl_ot.costs import EuclideanCost
    >>> loc0, loc1, s = torch.zeros(1, 2), torch.tensor([[0.3, -0.4]]), torch.ones(1, 2)
    >>> gaussian_transport_bound(loc0, s, loc1, s, EuclideanCost())
    tensor([0.2500])
    >>> gaussian_transport_bound(loc0, s, loc1, s, EuclideanCost(p=1), lipschitz=2.0)   # actions in [-2, 2]
    tensor([1.])
    """
    from torchrl_ot.costs import EuclideanCost, L1Cost

    if not isinstance(cost, (EuclideanCost, L1Cost)):
        raise ValueError(f"cost must be an EuclideanCost or L1Cost (a cost that grows with each coordinate's "
                         f"distance), got {type(cost).__name__}")
    args = {"old_loc": old_loc, "old_scale": old_scale, "new_loc": new_loc, "new_scale": new_scale}
    for name, x in args.items():
        if not isinstance(x, Tensor) or not x.is_floating_point() or x.dim() == 0:
            raise ValueError(f"{name} must be a floating [..., d] tensor")
        _check_finite(x, name, nonneg=name.endswith("scale"))
    try:
        shape = torch.broadcast_shapes(*(x.shape for x in args.values()))
    except RuntimeError as err:
        raise ValueError("old_loc, old_scale, new_loc and new_scale must broadcast to one [..., d] shape, got "
                         + ", ".join(str(tuple(x.shape)) for x in args.values())) from err
    lip = torch.as_tensor(lipschitz, dtype=new_loc.dtype, device=new_loc.device)
    _check_finite(lip, "lipschitz", nonneg=True)
    dloc = (lip * (new_loc - old_loc)).expand(shape)
    dscale = (lip * (new_scale - old_scale)).expand(shape)
    if bool((dscale == 0).all()):
        return cost(torch.zeros_like(dloc), dloc.abs())
    if isinstance(cost, EuclideanCost) and cost.p == 2.0:
        return (dloc.pow(2) + dscale.pow(2)).sum(-1)
    raise ValueError("old and new scales differ: the bound is closed-form only for the squared Euclidean cost "
                     f"(EuclideanCost(p=2)), got {cost!r}")
