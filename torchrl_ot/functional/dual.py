"""The exact one-dimensional dual of the OT trust-region problem and the optimal plan it defines.

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

from torchrl_ot.validation import (
    check_bool,
    check_epsilon,
    check_finite,
    check_positive_int,
    check_same_device,
    check_tensor,
    is_real,
)

__all__ = ["DualSolution", "dual_objective", "solve_dual", "transport_plan"]


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
        num_candidates: K, the number of candidates of the problem (None for a solution built by hand);
            :func:`transport_plan` checks its ``num_candidates`` against it.
    """

    multiplier: Tensor
    dual_value: Tensor
    low_index: Tensor
    high_index: Tensor
    low_cost: Tensor
    high_cost: Tensor
    split: Tensor
    epsilon: Tensor
    num_candidates: int | None = None

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


def _check_dual_inputs(advantage: Tensor, cost: Tensor, weight: Tensor, epsilon: float | Tensor, *,
                       detach: bool = True):
    for name, x in (("advantage", advantage), ("cost", cost), ("weight", weight)):
        check_tensor(name, x, floating=True)
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
    device = check_same_device(advantage=advantage, cost=cost, weight=weight)
    advantage, cost, weight = ((x.detach() if detach else x).to(dtype) for x in (advantage, cost, weight))
    check_finite(advantage, "advantage")
    check_finite(cost, "cost", nonneg=True)
    check_finite(weight, "weight", nonneg=True)
    return advantage, cost, weight, check_epsilon(epsilon, dtype, device)


# --------------------------------------------------------------------------------------------
# the exact dual


def _pick(x: Tensor, index: Tensor) -> Tensor:
    """``x[b, index[b]]`` for every row b (gather, not fancy indexing: one kernel, no index tensors)."""
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
        # A cheaper line always crosses at a finite lam; an infinite crossing is an overflow of the dtype
        # (a difference of advantages, or a quotient by a tiny cost gap). Such a sample still moves, at
        # lam = inf: stopping it would drop its later breakpoints and make lam* silently too small.
        moved = cheaper.any(-1)
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
    # Finite inputs whose differences, quotients or weighted sums overflow the dtype: refuse, never NaN or inf.
    return ValueError(
        f"advantage, cost and weight are finite but the dual overflows {dtype}; rescale advantage, cost "
        "and weight (e.g. normalise the advantage, weights summing to 1) so that differences between "
        "candidates and weighted costs stay representable, or pass float64 inputs"
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
    if not bool(torch.isfinite(c_low0)):
        # weight * cost overflowed: with excess = inf the selection would clip to the last breakpoint.
        raise _overflow_error(advantage.dtype)
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
        if not bool(lam >= torch.finfo(lam.dtype).tiny):
            # excess > 0 (the greedy step leaves the radius) means lam* > 0. Below the dtype's normal range a
            # crossing underflowed: to 0, which lifts the trust region without a word, or to a subnormal with a few
            # bits left, which puts G(lam*) off by more than the dtype's resolution.
            raise ValueError(
                f"advantage, cost and weight are finite but lam* underflows {advantage.dtype} (it is below "
                f"{torch.finfo(lam.dtype).tiny:.3g}, the smallest normal number: advantage differences tiny "
                "against cost differences); rescale advantage or cost, or pass float64 inputs"
            )
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
    dt = advantage.dtype
    fields = {"multiplier": lam, "dual_value": dual_value.to(dt), "low_cost": c_low.to(dt),
              "high_cost": c_high.to(dt), "split": split.to(dt)}
    # Every field in the result's dtype, after the cast: a float64 sum may not fit a float32 field.
    if not bool(torch.isfinite(torch.stack([f.to(acc) for f in fields.values()])).all()):
        raise _overflow_error(dt)
    return DualSolution(low_index=low, high_index=high, epsilon=eps, num_candidates=advantage.shape[1], **fields)


def dual_objective(lam: float | Tensor, advantage: Tensor, cost: Tensor, weight: Tensor,
                   epsilon: float | Tensor) -> Tensor:
    """Evaluate ``G(lam)`` (eq. 12) directly: the reference the exact solver is checked against.

    ``lam`` is a number >= 0 or a tensor of them (any shape; the result has its shape), computed in the
    promoted dtype of ``advantage``, ``cost`` and ``weight``. The inputs are checked as by
    :func:`solve_dual` (gradients flow through them); a result that overflows the dtype is refused.

    >>> import torch
    >>> adv, cost = torch.tensor([[0.0, 1.0]]), torch.tensor([[0.0, 1.0]])
    >>> dual_objective(0.5, adv, cost, torch.ones(1), 0.25)   # 0.5 * 0.25 + max(0, 1 - 0.5)
    tensor(0.6250)
    >>> dual_objective(float("nan"), adv, cost, torch.ones(1), 0.25)
    Traceback (most recent call last):
    ...
    ValueError: lam must be a finite number >= 0 or a tensor of them, got nan
    """
    advantage, cost, weight, eps = _check_dual_inputs(advantage, cost, weight, epsilon, detach=False)
    lam = _check_lam(lam, advantage.dtype, advantage.device)
    inner = (advantage - lam[..., None, None] * cost).amax(-1)
    out = lam * eps + (weight * inner).sum(-1)
    if not bool(torch.isfinite(out).all()):
        raise _overflow_error(advantage.dtype)
    return out


def _check_lam(lam, dtype: torch.dtype, device: torch.device) -> Tensor:
    """``lam`` as a tensor of ``dtype`` on ``device``; refuses a bool, NaN, inf or a negative multiplier."""
    what = "lam must be a finite number >= 0 or a tensor of them"
    if isinstance(lam, Tensor):
        check_tensor("lam", lam)
        if lam.dtype == torch.bool or lam.is_complex():
            raise ValueError(f"{what}, got a {lam.dtype} tensor")
        out = lam.to(dtype=dtype, device=device)
    elif isinstance(lam, (int, float)) and not isinstance(lam, bool):
        out = torch.tensor(float(lam), dtype=dtype, device=device)
    else:
        raise ValueError(f"{what}, got {type(lam).__name__}")
    if out.numel():
        lo, hi = torch.aminmax(out.detach())
        if not bool(torch.isfinite(lo) & torch.isfinite(hi)):
            # NaN, inf, or a finite lam that overflows the dtype of the computation.
            got = lam if not isinstance(lam, Tensor) else "a tensor with NaN or inf"
            raise ValueError(f"{what}, got {got}" + (f" (in {dtype})" if is_real(lam) else ""))
        if bool(lo < 0):
            raise ValueError(f"{what}, got {lam if not isinstance(lam, Tensor) else lo.item()}")
    return out


def transport_plan(solution: DualSolution, num_candidates: int, *, split: bool = True) -> Tensor:
    """Per-sample transport plan ``[B, K]`` of the optimal update (eq. 10).

    Row b puts ``t*`` on ``low_index[b]`` and ``1 - t*`` on ``high_index[b]``. With
    ``split=False`` (the WPO rule) the whole mass goes to one maximiser: of the closest and the
    farthest, the one with the lower candidate index, as a plain ``argmax`` would pick.
    ``num_candidates`` must be the problem's K (a plan over more or fewer candidates is not the plan).

    >>> import torch
    >>> sol = solve_dual(torch.tensor([[0.0, 1.0]]), torch.tensor([[0.0, 1.0]]), torch.ones(1), 0.5)
    >>> transport_plan(sol, 2)
    tensor([[0.5000, 0.5000]])
    >>> transport_plan(sol, 3)
    Traceback (most recent call last):
    ...
    ValueError: num_candidates must be the problem's number of candidates K = 2, got 3
    """
    if not isinstance(solution, DualSolution):
        raise ValueError(f"solution must be a DualSolution (from solve_dual), got {type(solution).__name__}")
    check_positive_int("num_candidates", num_candidates)
    check_bool("split", split)
    low, high = solution.low_index, solution.high_index
    if solution.num_candidates is not None:
        if num_candidates != solution.num_candidates:
            raise ValueError(f"num_candidates must be the problem's number of candidates "
                             f"K = {solution.num_candidates}, got {num_candidates}")
    elif low.numel() and bool(torch.maximum(low, high).max() >= num_candidates):
        # A solution built by hand carries no K: at least its indices must be candidates.
        raise ValueError(f"num_candidates = {num_candidates} is too small for the solution's candidate "
                         f"indices (largest {int(torch.maximum(low, high).max())})")
    dtype = solution.split.dtype
    plan = torch.zeros(low.shape[0], num_candidates, dtype=dtype, device=low.device)
    if split:
        t = solution.split
        plan.scatter_add_(-1, low[:, None], t.expand(low.shape[0], 1).clone())
        plan.scatter_add_(-1, high[:, None], (1 - t).expand(low.shape[0], 1).clone())
    else:
        plan.scatter_(-1, torch.minimum(low, high)[:, None], 1.0)
    return plan
