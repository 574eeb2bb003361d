"""The exact one-dimensional dual of the OT trust-region problem and the optimal plan it defines.

Every setting of the paper is flattened into *samples* ``b`` (mass ``weight[b]``) and
*candidates* ``k`` (``advantage[b, k]``, ``cost[b, k]``); see ``docs/equations.md``. The dual
(paper eq. 12; discrete-D in Corollary 3) is

    G(lam) = lam * epsilon + sum_b weight_b * max_k (advantage_bk - lam * cost_bk),   lam >= 0.

G is convex and piecewise linear. :func:`solve_dual` computes its minimiser *exactly*: it walks
each sample's upper envelope (at most K - 1 breakpoints, vectorised over samples), then finds
lam* as the weighted quantile of the breakpoints at which the right derivative
``epsilon - sum_b w_b c[b, low_b(lam)]`` turns non-negative, by a linear-time weighted selection.
No tolerance, no iterations to convergence: lam* is one of the breakpoints (or 0). For K = 2 on the
CPU (the hinge of Section 5) a chunked path finds the same lam* and indices with a single pass over the
inputs, deferring to the general one wherever it could not decide as it does (:func:`_solve_two`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
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
    advantage, cost, weight = _dual_tensors(advantage, cost, weight, detach=detach)
    return advantage, cost, weight, _check_dual_values(advantage, cost, weight, epsilon)


def _dual_tensors(advantage: Tensor, cost: Tensor, weight: Tensor, *, detach: bool = True):
    """Type, shape and device checks; the three in their promoted dtype. No pass over the values."""
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
    check_same_device(advantage=advantage, cost=cost, weight=weight)
    return tuple((x.detach() if detach else x).to(dtype) for x in (advantage, cost, weight))


def _check_dual_values(advantage: Tensor, cost: Tensor, weight: Tensor, epsilon: float | Tensor) -> Tensor:
    """Refuse NaN, inf, a negative cost or weight, then a bad epsilon (in this order); epsilon as a tensor."""
    check_finite(advantage, "advantage")
    check_finite(cost, "cost", nonneg=True)
    check_finite(weight, "weight", nonneg=True)
    return check_epsilon(epsilon, advantage.dtype, advantage.device)


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


# --------------------------------------------------------------------------------------------
# two candidates on the CPU: a chunked exact path
#
# For K = 2 the envelope walk is one closed-form step per sample (_envelope_two), and what the
# general path costs is data movement: gathers, `where` and boolean indexing on random masks, lists
# of breakpoints -- tens of passes over [B]. This path reads the inputs once, in chunks of rows with
# preallocated buffers (so that intermediates stay in cache), on numpy views of the tensors (numpy's
# comparisons and `flatnonzero` are several times faster than torch's CPU kernels). That one pass checks
# the values, computes the breakpoints and drop weights, and splits them at a bracket of lam* estimated
# from a sample of rows: it sums the drops above the bracket, gathers the few breakpoints inside it, and
# writes T_low and T_high for every sample outside it (moved below it, not above). A few rounds on the
# gathered breakpoints find lam*; then only the samples in the bracket get their indices, and G(lam*)
# follows from sums (no second pass).
#
# It is exact as the general path is, not merely close to it: breakpoints and drop weights come from
# the same IEEE operations, so lam* is the same number and so are the indices. Only its sums run in
# another order. Where a comparison that decides the result (feasibility, lam* = 0, which breakpoint
# is lam*) lies within a band of 1e-12 of the sums' scale -- where two summation orders might
# disagree -- or the input is unusual (NaN or inf, a tie at lam = 0, a breakpoint that underflows to
# 0, magnitudes near overflow, lam* outside the normal range), it returns None, and the general path
# decides or raises exactly as before.

_CHUNK = 1 << 16  # rows per chunk: a float64 intermediate of a chunk is 512 KiB
_SAMPLE = 4096  # breakpoints sampled to bracket lam* in a round of the selection
_ROWS = 8192  # rows sampled to bracket lam* before pass 1, in blocks of _BLOCK consecutive rows
_BLOCK = 16
_Z_ROWS = 4.0  # standard errors each side of that bracket: a miss costs one more pass, not exactness
_BAND = 1e-12  # relative width of the band in which this path's sums decide nothing (see above)
_Z = 5.0  # standard errors of a sampled quantile on each side of its bracket


def _solve_two(advantage: Tensor, cost: Tensor, weight: Tensor, epsilon: float | Tensor) -> DualSolution | None:
    """:func:`solve_dual` for K = 2 on the CPU, or None where the general path must decide (see above).

    Sample b's two lines cross at ``r_b = da_b / dc_b > 0`` (``da = a1 - a0``, ``dc = c1 - c0``) iff the
    better line at lam = 0 is the costlier one; there its cost falls by ``|dc_b|`` and its advantage by
    ``|da_b|``. By eq. 12, ``G'(lam+) = eps - c_low(lam)`` with ``c_low(lam) = c_min + S_gt(lam)``, where
    ``S_gt(lam) = sum_{r_b > lam} w_b |dc_b|`` are the drops still ahead; lam* is the smallest breakpoint
    at which they fit the budget ``eps - c_min``: the weighted quantile the general path selects, read
    from the top. Then ``G(lam*) = lam* (eps - c_low) + sum_b w_b a[b, T_low(b)]``.
    """
    dt = advantage.dtype
    if advantage.device.type != "cpu" or dt not in (torch.float32, torch.float64):
        return None
    try:
        eps = check_epsilon(epsilon, dt, advantage.device)
    except ValueError:  # the general path refuses it, after the inputs' values, as always
        return None
    try:
        arrays = [x.numpy() for x in (advantage, cost, weight)]
    except (RuntimeError, TypeError):  # no plain CPU memory behind it (a fake or functional tensor, say)
        return None
    with np.errstate(all="ignore"):  # x / 0 and 0 / 0 are expected below (and handled)
        return _solve_two_np(*arrays, eps)


def _solve_two_np(A: np.ndarray, C: np.ndarray, W: np.ndarray, eps_t: Tensor) -> DualSolution | None:
    B, dt, eps = A.shape[0], A.dtype, float(eps_t)
    n, tiny, big = min(B, _CHUNK), float(np.finfo(dt).tiny), float(np.finfo(dt).max) / 4
    # The breakpoints pass 1 gathers, [lo, hi] (None: none). A small batch gathers them all; a large one
    # only those in a bracket of lam* from a sample of rows. Should lam* lie outside, pass 1 runs again
    # with the side that holds it: rarely, as the bracket is _Z_ROWS standard errors wide.
    bracket = _row_bracket(A, C, W, eps) if B > 8 * _ROWS else (0.0, np.inf)
    for _ in range(3):
        p = _pass_one(A, C, W, bracket, n)
        # While scale * (1 + lam*) < big, no difference, product or sum overflows, here or in the general path.
        if not (p.valid and p.scale < big):  # NaN, inf or a negative cost or weight (the general path raises),
            return None  # a tie at lam = 0, a breakpoint that underflows to 0, or magnitudes near overflow
        c_low0 = p.c_min + p.s_cross + p.correction
        band = _BAND * (c_low0 + eps)
        if not p.c_min < eps - band:  # infeasible (the general path raises) or too close to call
            return None
        if c_low0 <= eps - band:  # the greedy update fits: lam* = 0, T_low = T_high = low0
            if bracket is not None and bracket[0] > 0:  # pass 1 moved the samples below lo: undo
                bracket = None
                continue
            return _two_solution(0.0, p.a_low0, c_low0, c_low0, 1.0, p.low, p.low, eps_t)
        if not c_low0 >= eps + band:
            return None
        budget = eps - p.c_min - p.correction  # S_gt(lam*) <= budget: sum_{r_b <= lam*} drops >= c_low0 - eps
        if bracket is None:
            bracket = (0.0, np.inf)
            continue
        lo, hi = bracket
        r_in, drop_in, gain_in, low0_in, rows_in = p.inside
        values, weights = _keep(r_in, drop_in)
        w_in = float(weights.sum(dtype=np.float64))
        if p.w_above > budget:  # lam* > hi
            bracket = (hi, np.inf)
            continue
        if lo > 0 and p.w_above + w_in <= budget:  # lam* < lo
            bracket = (0.0, lo)
            continue
        picked = _tail_select(values, weights, w_in, budget, band, n, above=p.w_above)
        if picked is None:
            return None
        lam, s_gt, s_ge = picked
        if not (tiny <= lam and p.scale * (1 + lam) < big):  # lam* underflows or overflows: the general path
            return None
        # T_low and T_high of the samples in the bracket (pass 1 set the others): a crossing sample leaves low0
        # at its breakpoint, T_low where r_b <= lam*, T_high where r_b < lam* (_piece_at, eq. 5).
        moved = r_in <= lam  # every r_in > 0
        low, high = p.low, p.low.copy()
        low[rows_in] = low0_in ^ moved
        high[rows_in] = low0_in ^ (r_in < lam)
        if A.dtype == np.float64:
            c_low, c_high = p.c_min + s_gt, p.c_min + s_ge  # to 4 ulp per term
            # t* = (c_high - eps) / (c_high - c_low), eq. 6, with c_high - c_low summed from the ties at lam* alone.
            split = min(max((s_ge - budget) / (s_ge - s_gt), 0.0), 1.0)
        else:  # float32 drops round far beyond that: sum the general path's products, as it does
            c_low, c_high = _weighted_cost(C, W, low, n), _weighted_cost(C, W, high, n)
            split = min(max((c_high - eps) / (c_high - c_low), 0.0), 1.0) if c_high > c_low else 1.0
        # G(lam*) = lam* eps + sum_b w_b (a[b, T_low] - lam* c[b, T_low]) (eq. 12); a moved sample's advantage
        # falls by |da_b|.
        dual = lam * (eps - c_low) + (p.a_low0 - p.lost_below - float(np.dot(gain_in, moved)))
        return _two_solution(lam, dual, c_low, c_high, split, low, high, eps_t)
    return None


class _PassOne(NamedTuple):
    valid: bool  # finite values, costs and weights >= 0, every r_b > 0 or < 0 (no tie, no underflow)
    scale: float  # 3 B max(w, 1) max(|a|, c), a bound on every sum of weighted advantages or costs
    c_min: float  # sum_b w_b min_k c_bk
    s_cross: float  # all drops: sum_{r_b > 0} w_b |dc_b|
    correction: float  # c_low0 - c_min - s_cross beyond float64 rounding (float32 only)
    a_low0: float  # sum_b w_b a[b, low0]
    w_above: float  # the drops above the bracket
    lost_below: float  # sum_{0 < r_b < lo} w_b |da_b|: what the samples below the bracket lose in advantage
    inside: tuple[np.ndarray, ...]  # r_b, drop, w_b |da_b|, low0 and b of the crossing samples in the bracket
    low: np.ndarray  # T_low (as bool) but in the bracket; T_high differs from it only at lam*, in the bracket


def _pass_one(A: np.ndarray, C: np.ndarray, W: np.ndarray, bracket: tuple[float, float] | None,
              n: int) -> _PassOne:
    """The one pass over the inputs: their values' checks, the breakpoints (split at ``bracket``), the sums,
    and T_low outside the bracket.

    Its cost is the number of numpy calls per chunk, so related rows share buffers: ``[da; dc]`` becomes
    ``[w |da|; w |dc|]`` in two calls, and one matrix-vector product sums both below the bracket.
    """
    B, dt = A.shape[0], A.dtype
    wide = dt == np.float64
    lo, hi = bracket if bracket is not None else (0.0, np.inf)
    low = np.empty(B, bool)
    pair, masks_f = np.empty((2, n)), np.empty((2, n))  # [da; dc] then [w |da|; w |dc|]; masks as numbers
    masks, r, t = np.empty((2, n), bool), np.empty(n, dt), np.empty(n, dt)
    low0, cross, in_bracket = np.empty(n, bool), np.empty(n, bool), np.empty(n, bool)
    narrow = None if wide else np.empty((2, n), dt)  # float32: da and dc in float32, as _envelope_two forms them
    views = [torch.from_numpy(x) for x in (A, C, W)]  # for aminmax: one pass for both, where numpy needs two
    extremes, inside = [], []
    below_sums = np.zeros(2)  # [w |da|; w |dc|] summed below the bracket
    c_min = correction = a_low0 = w_above = 0.0
    signed = 0  # breakpoints r_b > 0 or < 0: the others are 0 or NaN (ties, underflows)
    for s in range(0, B, n):
        e = min(s + n, B)
        a, c, w = A[s:e], C[s:e], W[s:e]
        pair_, masks_, masks_f_ = pair[:, :e - s], masks[:, :e - s], masks_f[:, :e - s]
        r_, t_, low0_, cross_, in_ = r[:e - s], t[:e - s], low0[:e - s], cross[:e - s], in_bracket[:e - s]
        extremes.append(torch.stack([v for x in views for v in torch.aminmax(x[s:e])]))
        diff = pair_ if wide else narrow[:, :e - s]
        np.subtract(a[:, 1], a[:, 0], out=diff[0])
        np.subtract(c[:, 1], c[:, 0], out=diff[1])
        np.greater(diff[0], 0, out=low0_)  # low0 but for ties da = 0, which r = 0 defers
        # IEEE division gives r the XOR of the operands' signs even on under- or overflow, so r > 0 is
        # _envelope_two's (da > 0 & dc > 0) | (da < 0 & dc < 0) -- but for r = 0 (a tie, or an underflow)
        # and r = NaN (0 / 0), deferred. (r = +-inf where dc = 0: no crossing, and no drop.)
        np.divide(diff[0], diff[1], out=r_)
        np.greater(r_, 0, out=cross_)
        signed += np.count_nonzero(cross_) + np.count_nonzero(np.less(r_, 0, out=in_))
        if wide:
            np.abs(pair_, out=pair_)
            np.multiply(pair_, w, out=pair_)  # [w |da|; w |dc|]: the drop is _envelope_two's, bit for bit
            d_ = pair_[1]
        else:
            d_ = np.multiply(np.abs(diff[1], out=diff[1]), w, out=diff[1])  # the drop, in float32
            np.multiply(np.abs(np.subtract(a[:, 1], a[:, 0], out=pair_[0], dtype=np.float64), out=pair_[0]), w,
                        out=pair_[0])
            np.copyto(pair_[1], d_)
        # Crossing samples below the bracket have moved at lam*, those above it have not, those in it are
        # gathered. Without a bracket (lam* = 0 expected) "below" takes them all, for S_cross alone.
        below_, above_ = masks_
        if bracket is None:
            np.copyto(below_, cross_)
            above_.fill(False)
        else:
            np.less(r_, lo, out=below_)
            np.greater(r_, hi, out=above_)
            np.logical_or(below_, above_, out=in_)
            np.logical_and(cross_, np.logical_not(in_, out=in_), out=in_)
            idx = np.flatnonzero(in_)
            inside.append((r_[idx], d_[idx], pair_[0, idx], low0_[idx], idx + s))
            below_ &= cross_
        np.copyto(masks_f_, masks_)
        below_sums += pair_ @ masks_f_[0]  # a matrix-vector product: OpenBLAS is slow at (2, n) @ (n, 2)
        w_above += float(np.dot(pair_[1], masks_f_[1]))
        if bracket is not None and lo > 0:
            np.logical_xor(below_, low0_, out=low[s:e])
        else:
            low[s:e] = low0_
        np.maximum(a[:, 0], a[:, 1], out=t_)  # a[b, low0]
        if wide:
            a_low0 += float(np.dot(w, t_))
            if c[:, 0].max() > 0 and c[:, 1].max() > 0:  # else min_k c_bk = 0 throughout (a stay candidate)
                c_min += float(np.dot(w, np.minimum(c[:, 0], c[:, 1], out=t_)))
        else:  # sums of float32 products in float64, as the general path forms them
            a_low0 += float(np.dot(t_.astype(np.float64), w))
            p_min = (w * np.minimum(c[:, 0], c[:, 1])).astype(np.float64)
            c_min += float(p_min.sum())
            # c[b, low0] is the dearer cost on crossing rows; its product differs from w_b min_k c_bk + drop_b by
            # float32 rounding, far beyond the band: add the difference. (In float64: 4 ulp of a term, far inside.)
            extra = (w * np.maximum(c[:, 0], c[:, 1])).astype(np.float64) - p_min - d_
            correction += float(np.dot(extra, cross_))
    extremes = torch.stack(extremes)  # aminmax, amin and amax propagate NaN
    (a_lo, c_lo, w_lo), (a_hi, c_hi, w_hi) = extremes[:, 0::2].amin(0).tolist(), extremes[:, 1::2].amax(0).tolist()
    valid = bool(np.isfinite([a_lo, a_hi, c_hi, w_hi]).all() and c_lo >= 0 and w_lo >= 0 and signed == B)
    scale = 3.0 * B * max(w_hi, 1.0) * max(-a_lo, a_hi, c_hi) if valid else np.inf
    inside = tuple(np.concatenate(x) for x in zip(*inside, strict=True)) if inside else ()
    lost_below, below = below_sums.tolist()
    s_cross = below + w_above + (float(inside[1].sum(dtype=np.float64)) if inside else 0.0)
    lost_below = lost_below if bracket is not None else 0.0
    return _PassOne(valid, scale, c_min, s_cross, correction, a_low0, w_above, lost_below, inside, low)


def _weighted_cost(C: np.ndarray, W: np.ndarray, index: np.ndarray, n: int) -> float:
    """``sum_b w_b c[b, index_b]``: products in the inputs' dtype, the sum in float64, as the general path."""
    total = 0.0
    for s in range(0, C.shape[0], n):
        picked = np.where(index[s:s + n], C[s:s + n, 1], C[s:s + n, 0])
        total += float((W[s:s + n] * picked).astype(np.float64).sum())
    return total


def _two_solution(lam: float, dual: float, c_low: float, c_high: float, split: float, low: np.ndarray,
                  high: np.ndarray, eps: Tensor) -> DualSolution:
    dt = eps.dtype
    out = {name: torch.tensor(value, dtype=torch.float64).to(dt) for name, value in
           (("dual_value", dual), ("low_cost", c_low), ("high_cost", c_high), ("split", split))}
    return DualSolution(multiplier=torch.tensor(lam, dtype=dt), low_index=torch.from_numpy(low.astype(np.int64)),
                        high_index=torch.from_numpy(high.astype(np.int64)), epsilon=eps, num_candidates=2, **out)


def _row_bracket(A: np.ndarray, C: np.ndarray, W: np.ndarray, eps: float) -> tuple[float, float] | None:
    """A bracket of lam* for pass 1 to gather, from a sample of rows; None where lam* = 0 is likely.

    lam* is where the drops above it, ``S_gt``, meet the budget ``eps - c_min``: both are estimated from
    the sample (blocks of consecutive rows at random offsets: cheap to read, and a block spans any short
    period of the rows), and the bracket takes :data:`_Z_ROWS` standard errors of each on either side.
    """
    B, blocks = A.shape[0], _ROWS // _BLOCK
    starts = np.random.default_rng(0).integers(0, B - _BLOCK + 1, blocks)  # fixed: the same work for the same input
    idx = (starts[:, None] + np.arange(_BLOCK)).ravel()
    a, c, w = A[idx], C[idx], W[idx]
    dc = c[:, 1] - c[:, 0]
    r = (a[:, 1] - a[:, 0]) / dc
    crossing = r > 0
    drop = (np.abs(dc[crossing]) * w[crossing]).astype(np.float64)
    cheapest = (w * np.minimum(c[:, 0], c[:, 1])).astype(np.float64)
    n = idx.size
    budget = eps / B - cheapest.mean()  # per row, as every sum here
    budget_err = _Z_ROWS * cheapest.std() / n ** 0.5
    if drop.size == 0:  # no crossing in the sample: few anywhere, gather them all (if lam* > 0 at all)
        return None if budget > budget_err else (0.0, np.inf)
    order = np.argsort(r[crossing])
    values, drop = r[crossing][order], drop[order]
    tail = np.append(np.cumsum(drop[::-1])[::-1][1:], 0.0) / n  # S_gt(values[j]) per row
    tail_sq = np.append(np.cumsum((drop * drop)[::-1])[::-1][1:], 0.0) / n
    tail_err = _Z_ROWS * np.sqrt(np.maximum(tail_sq - tail * tail, 0.0) / n) + drop.max(initial=0.0) / n
    if tail[0] + drop[0] / n + tail_err[0] < budget - budget_err:  # all drops fit: lam* = 0
        return None
    surely_above = np.flatnonzero(tail - tail_err > budget + budget_err)  # S_gt(v) > budget: v < lam*
    surely_fits = np.flatnonzero(tail + tail_err < budget - budget_err)  # S_gt(v) <= budget: v >= lam*
    lo = float(values[surely_above[-1]]) if surely_above.size else 0.0
    hi = float(values[surely_fits[0]]) if surely_fits.size else np.inf
    return lo, hi


def _quantile_bracket(values: np.ndarray, weights: np.ndarray, frac: float,
                      frac_err: float = 0.0) -> tuple[float, float]:
    """``(lo, hi)`` around the ``frac`` weighted quantile of the breakpoints (values > 0) of a random sample,
    wide enough that a miss takes :data:`_Z` standard errors of the sampled quantile (and of ``frac``, given
    as ``frac_err``); ``lo = 0`` and ``hi = inf`` for no bound."""
    keep = (weights > 0) & (values > 0)
    values, weights = values[keep], weights[keep].astype(np.float64)
    if values.size == 0:
        return 0.0, np.inf
    n_eff = float(weights.sum() ** 2 / np.dot(weights, weights))  # the weights' spread widens the error
    order = np.argsort(values)
    values, csum = values[order], np.cumsum(weights[order])
    frac = min(max(frac, 0.0), 1.0)
    margin = _Z * (((frac * (1 - frac) + 1 / n_eff) / n_eff) ** 0.5 + frac_err) + 1 / n_eff
    at = lambda q: float(values[min(int(np.searchsorted(csum, csum[-1] * q)), values.size - 1)])  # noqa: E731
    return (0.0 if frac - margin <= 0 else at(frac - margin)), (np.inf if frac + margin >= 1 else at(frac + margin))


def _tail_select(values: np.ndarray, weights: np.ndarray, total: float, budget: float, band: float,
                 chunk: int, *, above: float = 0.0) -> tuple[float, float, float] | None:
    """Smallest breakpoint ``v`` of positive weight with ``S_gt(v) = above + sum(weights[values > v]) <=
    budget``, as ``(v, S_gt(v), S_ge(v))``; None where ``S_gt(v)`` or ``S_ge(v)`` lies within ``band`` of
    ``budget``.

    Breakpoints are the values > 0, ``total`` their weight and ``above <= budget`` the weight of breakpoints
    above all of them. As :func:`_weighted_select`, but from the top, so that what lies above a pivot is summed,
    never a difference of sums: each round brackets the answer between two values read off a random
    sample, sums the weight above the bracket and keeps what lies inside; a miss keeps the side that
    holds the answer. The last few thousand are sorted.
    """
    rng = np.random.default_rng(1)
    buffers = _split_buffers(min(chunk, values.size))
    while values.size > _SMALL:
        size = values.size
        idx = rng.integers(0, size, _SAMPLE)
        lo, hi = _quantile_bracket(values[idx], weights[idx], 1.0 - (budget - above) / total)
        w_above, parts_v, parts_w = 0.0, [], []
        for s in range(0, size, chunk):
            v, w = values[s:s + chunk], weights[s:s + chunk]
            part, idx = _split_chunk(v, w, lo, hi, buffers)
            w_above += part
            parts_v.append(v[idx])
            parts_w.append(w[idx])
        in_v, in_w = _keep(np.concatenate(parts_v), np.concatenate(parts_w))
        w_in = float(in_w.sum(dtype=np.float64))
        if above + w_above > budget:  # the answer lies above the bracket
            values, weights = _keep(values, weights, values > hi)
            total = w_above
        elif above + w_above + w_in <= budget and lo > 0:  # below it, if anything lies there
            below_v, below_w = _keep(values, weights, values < lo)
            if below_v.size:
                values, weights, above = below_v, below_w, above + w_above + w_in
                total = float(below_w.sum(dtype=np.float64))
            else:
                values, weights, above, total = in_v, in_w, above + w_above, w_in
        else:
            values, weights, above, total = in_v, in_w, above + w_above, w_in
        if values.size == size:  # all equal to a pivot: no progress possible, finish by sorting
            break
    values, weights = _keep(values, weights)
    if values.size == 0:
        return None
    order = np.argsort(values, kind="stable")
    sorted_v, sorted_w = values[order], weights[order].astype(np.float64)
    at_or_above = np.cumsum(sorted_w[::-1])[::-1]  # sum_{i >= j}
    strictly_above = np.append(at_or_above[1:], 0.0)  # sum_{i > j}
    j = int(np.count_nonzero(above + strictly_above > budget))  # S_gt is non-increasing: the first j that fits
    if j == sorted_v.size:  # nothing fits: the invariant lost to rounding; the general path decides
        return None
    v = sorted_v[j]
    first, last = int(np.searchsorted(sorted_v, v, "left")), int(np.searchsorted(sorted_v, v, "right")) - 1
    s_gt, s_ge = above + float(strictly_above[last]), above + float(at_or_above[first])
    if budget - s_gt < band or s_ge - budget < band:  # (this also refuses S_ge(v) <= budget, were it to happen)
        return None
    return float(v), s_gt, s_ge


def _split_buffers(size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return np.empty(size, bool), np.empty(size, bool), np.empty(size)


def _split_chunk(v: np.ndarray, w: np.ndarray, lo: float, hi: float,
                 buffers: tuple[np.ndarray, np.ndarray, np.ndarray]) -> tuple[float, np.ndarray]:
    """``sum(w[v > hi])`` and the positions of ``v`` in ``[lo, hi]``, for ``0 <= lo <= hi`` (buffers of at least
    ``v``'s size). The sum is a dot with the mask, and only the few values inside are found: a `where` or
    boolean indexing of every chunk is slow on random masks."""
    mask, inside, maskf = (b[:v.size] for b in buffers)
    np.greater_equal(v, lo, out=inside)
    w_above = 0.0
    if hi < np.inf:
        np.greater(v, hi, out=mask)
        np.copyto(maskf, mask)
        w_above = float(np.dot(maskf, w))
        inside &= np.logical_not(mask, out=mask)
    return w_above, np.flatnonzero(inside)


def _keep(values: np.ndarray, weights: np.ndarray, mask: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``values`` and ``weights`` where ``mask`` holds, the value is a breakpoint (> 0) and its weight positive."""
    keep = (weights > 0) & (values > 0)
    if mask is not None:
        keep &= mask
    return values[keep], weights[keep]


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
    advantage, cost, weight = _dual_tensors(advantage, cost, weight)
    if advantage.shape[1] == 2:  # checks the values itself, in its first pass over them
        fast = _solve_two(advantage, cost, weight, epsilon)
        if fast is not None:
            return fast
    eps = _check_dual_values(advantage, cost, weight, epsilon)
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
