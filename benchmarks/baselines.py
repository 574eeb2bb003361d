"""PPO, TRPO and A2C of our harness next to their published MuJoCo figures (Tianshou, rl-baselines3-zoo).

Runs ``recipes/train.py`` for each algorithm x env x seed through ``benchmarks/compare.py`` (each with its
published settings, ``recipes/conf/train/tuned/``), into ``--out/<env>/<algo>/seed<k>``: finished runs are
reused and killed ones resume, so the same command continues a stopped benchmark. Then, for each
(env, algo), the mean over seeds of the deterministic evaluation at 300k, 500k and 1M frames (the
first evaluation at or after the budget: 301,056 frames for 2,048-frame batches) next to:

- the published figures (``benchmarks/data/published_mujoco.csv``, with their sources: Tianshou's
  10-seed mean at its last evaluation <= the budget, the zoo's single seed);
- ``--before``: the same statistic from an earlier ``runs.csv`` (by default the MuJoCo comparison's).

The ratio column is ours over Tianshou's (the zoo's on Swimmer, gamma 0.9999). Writes ``table.md``
and ``runs.csv`` in ``--out``; prints the table. Not a test: it asserts nothing.

    .venv/bin/python benchmarks/baselines.py --jobs 2                  # seeds 10-14, 1M frames
    .venv/bin/python benchmarks/baselines.py --report-only             # tabulate the finished runs
"""

from __future__ import annotations

import argparse
import csv
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PUBLISHED = ROOT / "benchmarks" / "data" / "published_mujoco.csv"
RUNS = {"Hopper-v5": ["ppo", "trpo", "a2c"], "HalfCheetah-v5": ["ppo", "trpo", "a2c"], "Swimmer-v5": ["trpo", "ppo"]}
BUDGETS = (300_000, 500_000, 1_000_000)
TARGET = 0.9  # of the reference figure


def curves(runs_csv: Path) -> dict[tuple[str, str], dict[int, list[tuple[int, float]]]]:
    """(env, algo) -> seed -> [(frames, eval_return)] from a compare.py ``runs.csv``."""
    out: dict = {}
    if runs_csv.exists():
        for row in csv.DictReader(open(runs_csv)):
            out.setdefault((row["env"], row["algo"]), {}).setdefault(int(row["seed"]), []).append(
                (int(row["frames"]), float(row["eval_return"])))
    return out


def at_budget(seed_curves: dict[int, list[tuple[int, float]]], budget: int) -> list[float]:
    """Each seed's first evaluation at or after ``budget`` frames (seeds that have not reached it left out)."""
    values = []
    for curve in seed_curves.values():
        after = [ret for frames, ret in sorted(curve) if frames >= budget]
        if after:
            values.append(after[0])
    return values


def published() -> dict[tuple[str, str, str], dict[int, float]]:
    """(source, env, algo) -> budget -> return."""
    out: dict = {}
    for row in csv.DictReader(open(PUBLISHED)):
        out.setdefault((row["source"], row["env"], row["algo"]), {})[int(row["budget"])] = float(row["return"])
    return out


def fmt(values: list[float], seeds: int | None = None) -> str:
    if not values:
        return "-"
    text = f"{statistics.fmean(values):,.0f}"
    return text + (f" [{len(values)}]" if seeds is not None and len(values) < seeds else "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "baselines")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--first-seed", type=int, default=10, help="seeds K..K+N-1 (default 10: never tuned on)")
    parser.add_argument("--jobs", type=int, default=max(1, os.cpu_count() or 1))
    parser.add_argument("--envs", nargs="+", default=list(RUNS), choices=list(RUNS))
    parser.add_argument("--before", type=Path, default=ROOT / "benchmarks" / "results" / "mujoco" / "runs.csv")
    parser.add_argument("--report-only", action="store_true", help="launch nothing: tabulate the finished runs")
    args = parser.parse_args()

    compare = [sys.executable, str(ROOT / "benchmarks" / "compare.py"), "--out", str(args.out), "--seeds",
               str(args.seeds), "--first-seed", str(args.first_seed), "--jobs", str(args.jobs)]
    groups: dict[tuple[str, ...], list[str]] = {}
    for env in args.envs:
        groups.setdefault(tuple(RUNS[env]), []).append(env)
    for algos, envs in groups.items():  # compare.py tabulates what it ran: one call per set of algorithms
        subprocess.run([*compare, "--algos", *algos, "--envs", *envs, "--report-only"] if args.report_only
                       else [*compare, "--algos", *algos, "--envs", *envs], check=True, cwd=ROOT,
                       stdout=subprocess.DEVNULL)
    # compare.py rewrites runs.csv per call: gather every finished run's curve here instead.
    ours: dict = {}
    for env in args.envs:
        for algo in RUNS[env]:
            for seed in range(args.first_seed, args.first_seed + args.seeds):
                log = args.out / env / algo / f"seed{seed}" / "logs" / "scalars" / "eval_return.csv"
                if (log.parent.parent.parent / "summary.json").exists():
                    curve = [(int(float(f)), float(r)) for f, r in csv.reader(open(log))]
                    ours.setdefault((env, algo), {})[seed] = curve
    with open(args.out / "runs.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["algo", "env", "seed", "frames", "eval_return"])
        for (env, algo), by_seed in sorted(ours.items()):
            for seed, curve in sorted(by_seed.items()):
                writer.writerows([algo, env, seed, frames, ret] for frames, ret in curve)
    before, refs = curves(args.before), published()

    lines = ["| env | algo | ours: 300k / 500k / 1M | before | Tianshou | rl-baselines3-zoo | ours / reference "
             f"(target >= {TARGET}) |", "|---|---|---|---|---|---|---|"]
    for env in args.envs:
        short = env.split("-")[0]
        for algo in RUNS[env]:
            mine = [at_budget(ours.get((env, algo), {}), b) for b in BUDGETS]
            old = [at_budget(before.get((env, algo), {}), b) for b in BUDGETS]
            ts, zoo = refs.get(("tianshou", short, algo), {}), refs.get(("zoo", short, algo), {})
            ref = ts or zoo  # the target's reference: Tianshou where it has the env, else the zoo (Swimmer)
            ratios = [f"{statistics.fmean(m) / ref[b]:.2f}" if m and b in ref else "-"
                      for m, b in zip(mine, BUDGETS, strict=True)]
            lines.append(f"| {short} | {algo.upper()} | " + " / ".join(fmt(m, args.seeds) for m in mine)
                         + " | " + " / ".join(fmt(o) for o in old)
                         + " | " + " / ".join(f"{ts[b]:,.0f}" if b in ts else "-" for b in BUDGETS)
                         + " | " + " / ".join(f"{zoo[b]:,.0f}" if b in zoo else "-" for b in BUDGETS)
                         + " | " + " / ".join(ratios) + " |")
    seeds = f"{args.first_seed}-{args.first_seed + args.seeds - 1}"
    before_name = args.before.relative_to(ROOT) if args.before.is_relative_to(ROOT) else args.before
    header = (f"Command: `.venv/bin/python benchmarks/baselines.py {' '.join(sys.argv[1:])}`; seeds {seeds}; "
              f"{platform.machine()}, {os.cpu_count()} cores. Mean over seeds of the deterministic evaluation "
              f"(10 episodes) at the first evaluation at or after 300k / 500k / 1M frames ([n]: seeds that got "
              f"there). Before: the same from `{before_name}`. "
              f"References: `benchmarks/data/published_mujoco.csv` (Tianshou: 10 seeds, v3 envs; the zoo: 1 seed).")
    table = header + "\n\n" + "\n".join(lines) + "\n"
    (args.out / "table.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
