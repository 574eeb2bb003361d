"""OT-TRPO against TRPO on MuJoCo at equal frames, from two ``benchmarks/compare.py`` folders.

Reads each folder's ``runs.csv`` (OT-TRPO's and TRPO's, run on the same seeds with 10 evaluation episodes) and
OT-TRPO's ``summary.json`` files, and prints, for each env, the mean +/- standard error over seeds of the
deterministic evaluation at 300k, 500k and 1M frames (each seed's first evaluation at or after the budget, as
``benchmarks/baselines.py``), the ratio of the means, whether OT-TRPO's mean is at least TRPO's (and at least 327
on Swimmer at 500k: stable-baselines3's zoo PPO on these machines), and the trust region used per update
(``mean_realised_transport_over_epsilon``: its mean over runs and its lowest run; the largest
``max_realised_transport_over_epsilon``). Writes ``vs_trpo.md`` and ``<env>-vs-trpo.png`` (mean +/- standard
error against frames, both algorithms) into ``--out``. Not a test: it asserts nothing.

    .venv/bin/python benchmarks/compare.py --out benchmarks/results/ot_trpo_mujoco --algos ot_trpo \\
        --envs Swimmer-v5 Hopper-v5 HalfCheetah-v5 --seeds 5 --first-seed 10 --jobs 2
    .venv/bin/python benchmarks/ot_vs_trpo.py      # the defaults: that folder against benchmarks/results/baselines
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from baselines import at_budget, curves  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ENVS = ("Swimmer-v5", "Hopper-v5", "HalfCheetah-v5")
BUDGETS = (300_000, 500_000, 1_000_000)
SWIMMER_ANCHOR = (500_000, 327.0)  # stable-baselines3 zoo PPO on these machines (../shared/design/anchors.md)


def mean_se(values: list[float]) -> tuple[float, float]:
    if not values:
        return math.nan, math.nan
    se = statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else math.nan
    return statistics.fmean(values), se


def cell(values: list[float]) -> str:
    m, se = mean_se(values)
    return "-" if not values else f"{m:,.0f} +/- {se:,.0f} ({len(values)})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ot", type=Path, default=ROOT / "benchmarks" / "results" / "ot_trpo_mujoco",
                        help="compare.py folder with the ot_trpo runs")
    parser.add_argument("--trpo", type=Path, default=ROOT / "benchmarks" / "results" / "baselines",
                        help="compare.py folder with the trpo runs")
    parser.add_argument("--out", type=Path, default=None, help="where vs_trpo.md and the plots go (default: --ot)")
    args = parser.parse_args()
    out = args.out or args.ot
    ot, trpo = curves(args.ot / "runs.csv"), curves(args.trpo / "runs.csv")
    lines = ["| env | frames | OT-TRPO | TRPO | ratio | OT-TRPO >= TRPO |", "|---|---|---|---|---|---|"]
    usage = ["| env | runs | realised / epsilon: mean over runs (lowest run) | largest single update |",
             "|---|---|---|---|"]
    for env in ENVS:
        a, b = ot.get((env, "ot_trpo"), {}), trpo.get((env, "trpo"), {})
        for budget in BUDGETS:
            va, vb = at_budget(a, budget), at_budget(b, budget)
            ma, mb = mean_se(va)[0], mean_se(vb)[0]
            ratio = ma / mb if va and vb and mb > 0 else math.nan
            met = "-" if not (va and vb) else ("yes" if ma >= mb else "no")
            if env.startswith("Swimmer") and budget == SWIMMER_ANCHOR[0] and va:
                met += f"; >= {SWIMMER_ANCHOR[1]:.0f}: {'yes' if ma >= SWIMMER_ANCHOR[1] else 'no'}"
            lines.append(f"| {env} | {budget:,} | {cell(va)} | {cell(vb)} | {ratio:.2f} | {met} |")
        summaries = [json.loads(p.read_text()) for p in sorted((args.ot / env / "ot_trpo").glob("seed*/summary.json"))]
        if summaries:
            means = [s["mean_realised_transport_over_epsilon"] for s in summaries]
            usage.append(f"| {env} | {len(summaries)} | {statistics.fmean(means):.3f} ({min(means):.3f}) | "
                         f"{max(s['max_realised_transport_over_epsilon'] for s in summaries):.4f} |")
        fig, ax = plt.subplots(figsize=(6, 3.6))
        for label, seed_curves in (("ot_trpo", a), ("trpo", b)):
            if not seed_curves:
                continue
            steps = sorted({f for c in seed_curves.values() for f, _ in c})
            by_step = [[dict(c)[f] for c in seed_curves.values() if f in dict(c)] for f in steps]
            m = [statistics.fmean(v) for v in by_step]
            se = [statistics.stdev(v) / math.sqrt(len(v)) if len(v) > 1 else 0.0 for v in by_step]
            ax.plot(steps, m, label=f"{label} ({len(seed_curves)} seeds)")
            ax.fill_between(steps, [x - e for x, e in zip(m, se, strict=True)],
                            [x + e for x, e in zip(m, se, strict=True)], alpha=0.2)
        ax.set(xlabel="frames", ylabel="evaluation return", title=f"{env}: mean +/- s.e. over seeds")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / f"{env}-vs-trpo.png", dpi=100)
        plt.close(fig)
    table = ("Cells: mean +/- standard error of the deterministic evaluation (10 episodes) over seeds (count); "
             f"OT-TRPO from `{args.ot.relative_to(ROOT) if args.ot.is_relative_to(ROOT) else args.ot}`, TRPO from "
             f"`{args.trpo.relative_to(ROOT) if args.trpo.is_relative_to(ROOT) else args.trpo}`.\n\n"
             + "\n".join(lines) + "\n\nTrust region used per update (OT-TRPO):\n\n" + "\n".join(usage) + "\n")
    (out / "vs_trpo.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
