"""Benchmark the exact dual solver against a generic bounded scalar minimiser.

``torchrl_ot.functional.solve_dual`` minimises the convex piecewise-linear dual

    G(lam) = lam * eps + sum_b w_b * max_k (A_bk - lam * c_bk),   lam >= 0,

exactly. This script compares it, on random float64 instances, with
``scipy.optimize.minimize_scalar(G, bounds=(0, lam_max), method="bounded")`` (xatol 1e-10), where
G is evaluated with numpy on the same data in its fastest form (for K = 2 the hinge on contiguous columns,
``np.maximum(a - lam * c, 0)``; a row max over [B, K] otherwise) and ``lam_max`` is the largest breakpoint of
G (a provable upper bound on lam*, computed outside the timing). One numpy evaluation of that G ("one pass")
is timed for reference; both objective values are then compared on the general form.

Instances: candidate 0 is the "stay" candidate (cost 0, advantage 0), so the problem is always
feasible; the other advantages are standard normal, the other costs uniform in [0, 1) (or, with
``--cost sqdist``, squared distances between random action vectors); weights are positive and sum
to 1; epsilon is ``--eps-frac`` (default 0.3) of the transport at lam = 0, so the trust region is
active (lam* > 0, printed).

Run from the repository root:

    .venv/bin/python benchmarks/dual_solver.py            # full grid, a few minutes
    .venv/bin/python benchmarks/dual_solver.py --quick    # skip B = 1e6 for K > 2

Target: exact (G_ours <= G_scipy up to rounding) and >= 5x faster than scipy (on the hinge form) at B = 1e6, K = 2.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from scipy.optimize import minimize_scalar

from torchrl_ot.functional import solve_dual

TARGET_B, TARGET_K, TARGET_SPEEDUP = 1_000_000, 2, 5.0
# G_ours - G_scipy above this (relative to max(1, |G|)) counts as "ours is worse": not exact.
EXACT_RTOL = 1e-12


@dataclass(frozen=True)
class Instance:
    advantage: np.ndarray  # [B, K]
    cost: np.ndarray  # [B, K]
    weight: np.ndarray  # [B]
    epsilon: float
    lam_max: float  # an upper bound on lam*: the largest breakpoint of G


@dataclass(frozen=True)
class Row:
    B: int
    K: int
    lam_ours: float
    lam_scipy: float
    lam_max: float
    t_ours: float  # seconds
    t_scipy: float  # seconds
    t_pass: float  # seconds
    nfev: int
    g_ours: float
    g_scipy: float

    @property
    def diff(self) -> float:
        return self.g_ours - self.g_scipy

    @property
    def rel(self) -> float:
        return abs(self.diff) / max(abs(self.g_scipy), 1e-300)

    @property
    def exact(self) -> bool:
        return self.diff <= EXACT_RTOL * max(1.0, abs(self.g_scipy))

    @property
    def speedup(self) -> float:
        return self.t_scipy / self.t_ours


def make_instance(B: int, K: int, seed: int, cost_kind: str, eps_frac: float, dim: int) -> Instance:
    """A random feasible float64 instance whose trust-region constraint is active."""
    rng = np.random.default_rng([seed, B, K])
    advantage = rng.standard_normal((B, K))
    advantage[:, 0] = 0.0
    if cost_kind == "uniform":
        cost = rng.random((B, K))
    else:  # squared distance from the sample's action to random candidate actions
        action = rng.standard_normal((B, dim))
        cost = np.zeros((B, K))
        for j in range(dim):
            cost += (rng.standard_normal((B, K)) - action[:, j : j + 1]) ** 2
        cost /= dim
    cost[:, 0] = 0.0
    weight = rng.uniform(0.1, 1.0, size=B)
    weight /= weight.sum()

    # Transport at lam = 0: every sample moves to its best candidate (continuous data: no ties).
    best = advantage.argmax(axis=1)
    transport0 = float(weight @ np.take_along_axis(cost, best[:, None], axis=1)[:, 0])
    epsilon = eps_frac * transport0

    # For lam >= A_bk / c_bk every positive-cost line lies below the stay line (value 0), so
    # beyond the largest such ratio G'(lam) = eps > 0: lam* <= lam_max.
    positive = cost > 0
    ratio = np.divide(advantage, cost, out=np.zeros_like(advantage), where=positive)
    lam_max = max(float(ratio.max()), 0.0)
    return Instance(advantage, cost, weight, epsilon, lam_max)


def numpy_dual(inst: Instance) -> Callable[[float], float]:
    """G(lam) in numpy, with a preallocated [B, K] buffer (no allocation per call but the row max)."""
    A, C, w, eps = inst.advantage, inst.cost, inst.weight, inst.epsilon
    buf = np.empty_like(A)

    def G(lam: float) -> float:
        np.multiply(C, -lam, out=buf)
        np.add(buf, A, out=buf)
        return float(lam * eps + w @ buf.max(axis=1))

    return G


def fastest_numpy_dual(inst: Instance) -> Callable[[float], float]:
    """G(lam) in its fastest numpy form for the instance: for K = 2 with candidate 0 the zero "stay", the hinge
    ``lam * eps + w . max(a_1 - lam c_1, 0)`` on contiguous columns (a row max over two entries is several times
    slower); for K > 2 :func:`numpy_dual`. Copies and buffers are made here, outside any timing."""
    if inst.advantage.shape[1] != 2 or inst.advantage[:, 0].any() or inst.cost[:, 0].any():
        return numpy_dual(inst)
    a1, c1 = np.ascontiguousarray(inst.advantage[:, 1]), np.ascontiguousarray(inst.cost[:, 1])
    w, eps = inst.weight, inst.epsilon
    buf = np.empty_like(a1)

    def G(lam: float) -> float:
        np.multiply(c1, -lam, out=buf)
        np.add(buf, a1, out=buf)
        np.maximum(buf, 0.0, out=buf)
        return float(lam * eps + w @ buf)

    return G


def median_time(fn: Callable[[], object], repeats: int) -> tuple[float, object]:
    """Median wall time of ``repeats`` calls (after the caller's warm-up) and the last result."""
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def bench(B: int, K: int, args: argparse.Namespace) -> Row:
    inst = make_instance(B, K, args.seed, args.cost, args.eps_frac, args.dim)
    A = torch.from_numpy(inst.advantage)
    C = torch.from_numpy(inst.cost)
    w = torch.from_numpy(inst.weight)

    solve_dual(A, C, w, inst.epsilon)  # warm-up
    t_ours, sol = median_time(lambda: solve_dual(A, C, w, inst.epsilon), args.repeats)
    lam_ours = float(sol.multiplier)

    G = numpy_dual(inst)
    fast = fastest_numpy_dual(inst)  # what scipy minimises: its best chance
    fast(lam_ours)  # warm-up
    t_pass, _ = median_time(lambda: fast(lam_ours), args.repeats)

    def run_scipy():
        return minimize_scalar(fast, bounds=(0.0, inst.lam_max), method="bounded", options={"xatol": 1e-10})

    scipy_repeats = args.repeats if B <= args.scipy_repeat_below else args.scipy_repeats
    t_scipy, res = median_time(run_scipy, scipy_repeats)

    # Both objective values from the same numpy G, so summation order does not bias the comparison.
    return Row(
        B=B, K=K, lam_ours=lam_ours, lam_scipy=float(res.x), lam_max=inst.lam_max,
        t_ours=t_ours, t_scipy=t_scipy, t_pass=t_pass, nfev=int(res.nfev),
        g_ours=G(lam_ours), g_scipy=G(float(res.x)),
    )


HEADER = (
    f"{'B':>9} {'K':>3} {'lam* (ours)':>13} {'lam_max':>10} {'t_ours ms':>10} {'t_scipy ms':>11} "
    f"{'speedup':>8} {'nfev':>5} {'t_pass ms':>10} {'G_ours-G_scipy':>15} {'|dG|/|G|':>9}"
)


def format_row(r: Row) -> str:
    return (
        f"{r.B:>9d} {r.K:>3d} {r.lam_ours:>13.6g} {r.lam_max:>10.3g} {1e3 * r.t_ours:>10.2f} "
        f"{1e3 * r.t_scipy:>11.1f} {r.speedup:>7.1f}x {r.nfev:>5d} {1e3 * r.t_pass:>10.2f} "
        f"{r.diff:>15.3e} {r.rel:>9.1e}"
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[1_000, 100_000, 1_000_000], help="batch sizes B")
    p.add_argument("--candidates", type=int, nargs="+", default=[2, 6, 18], help="candidate counts K")
    p.add_argument("--quick", action="store_true", help="skip B = 1e6 for K > 2 (scipy is slow there)")
    p.add_argument("--repeats", type=int, default=7, help="timed repeats (median) after one warm-up")
    p.add_argument("--scipy-repeats", type=int, default=1,
                   help="scipy repeats for B above --scipy-repeat-below (default 1)")
    p.add_argument("--scipy-repeat-below", type=int, default=100_000,
                   help="B up to which scipy is timed --repeats times")
    p.add_argument("--cost", choices=["uniform", "sqdist"], default="uniform",
                   help="non-stay costs: uniform in [0, 1) or squared distances of random actions")
    p.add_argument("--dim", type=int, default=4, help="action dimension for --cost sqdist")
    p.add_argument("--eps-frac", type=float, default=0.3, help="epsilon as a fraction of transport at lam=0")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.repeats < 1 or args.scipy_repeats < 1:
        p.error("--repeats and --scipy-repeats must be >= 1")
    if not 0 < args.eps_frac < 1:
        p.error("--eps-frac must lie in (0, 1) for the constraint to be active")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    # torch's intra-op thread count is left at the machine's default.
    print(
        f"torch {torch.__version__} ({torch.get_num_threads()} threads), numpy {np.__version__}, "
        f"float64, cost={args.cost}, eps = {args.eps_frac} x transport(lam=0), repeats={args.repeats}, "
        f"seed={args.seed}"
    )
    print(HEADER)
    rows: list[Row] = []
    t_start = time.perf_counter()
    for K in args.candidates:
        for B in args.sizes:
            if args.quick and B >= 1_000_000 and K > 2:
                print(f"{B:>9d} {K:>3d}  skipped (--quick)")
                continue
            row = bench(B, K, args)
            rows.append(row)
            print(format_row(row), flush=True)
    print(f"total wall time {time.perf_counter() - t_start:.1f} s")

    inactive = [r for r in rows if not r.lam_ours > 0]
    if inactive:
        print(f"WARNING: constraint inactive (lam* = 0) for {[(r.B, r.K) for r in inactive]}")
    worse = [r for r in rows if not r.exact]
    print(
        "exactness: G_ours <= G_scipy (to rounding) in all rows"
        if not worse
        else f"exactness FAILED for {[(r.B, r.K) for r in worse]}"
    )
    target = [r for r in rows if r.B == TARGET_B and r.K == TARGET_K]
    if not target:
        print(f"target (exact and >= {TARGET_SPEEDUP:g}x faster than scipy at B=1e6, K=2): not measured")
    else:
        r = target[0]
        met = r.exact and r.speedup >= TARGET_SPEEDUP
        print(
            f"target (exact and >= {TARGET_SPEEDUP:g}x faster than scipy at B=1e6, K=2): "
            f"{'MET' if met else 'NOT MET'} (speedup {r.speedup:.1f}x, G_ours - G_scipy = {r.diff:.3e})"
        )


if __name__ == "__main__":
    main()
