"""Multi-seed learning benchmark of the tabular recipe: OT-TRPO against WPO at equal frames.

Runs ``recipes/tabular.py`` for every (environment, algorithm, seed) in subprocesses, ``--jobs``
at a time, reads each run's ``summary.json`` and prints (and writes) a markdown table:
final return mean +/- std over seeds (greedy policy, 100 evaluation episodes per seed), the
sampled-policy return, the trust-region violation rate, frames and throughput.

    .venv/bin/python benchmarks/tabular_learning.py                 # 5 seeds, all four envs
    .venv/bin/python benchmarks/tabular_learning.py --seeds 2 --envs CliffWalking-v1

Not a test: it asserts nothing; the table goes into docs/results.md by hand, with the command.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Frame budgets per environment; one budget for every algorithm on that environment.
BUDGETS = {
    "CliffWalking-v1": 100_000,
    "NChain-v0": 100_000,
    "Taxi-v4": 200_000,
    "FrozenLake-v1": 100_000,
}
# What "solved" means on each environment (the targets the table checks).
TARGETS = {"CliffWalking-v1": -13.0, "NChain-v0": 3500.0, "Taxi-v4": 7.5}


def run_one(env: str, algo: str, seed: int, frames: int, out: Path, extra: list[str]) -> dict:
    run_dir = out / env / algo / f"seed{seed}"
    summary = run_dir / "summary.json"
    if summary.exists():  # finished earlier: a killed benchmark resumes where it stopped
        return json.loads(summary.read_text())
    cmd = [sys.executable, str(ROOT / "recipes" / "tabular.py"), f"env.name={env}", f"algo={algo}",
           f"seed={seed}", f"total_frames={frames}", "progress=false", f"hydra.run.dir={run_dir}",
           "overwrite=true", *extra]  # a run without its summary was killed: start it over
    env_vars = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env_vars, cwd=ROOT)
    if proc.returncode != 0:
        raise RuntimeError(f"run failed: {' '.join(cmd)}\n{proc.stderr[-3000:]}")
    return json.loads(summary.read_text())


def fmt(values: list[float], digits: int = 2) -> str:
    mean = statistics.fmean(values)
    std = statistics.pstdev(values) if len(values) > 1 else 0.0
    return f"{mean:.{digits}f} +/- {std:.{digits}f}"


def table(results: list[dict], envs: list[str], algos: list[str]) -> str:
    lines = [
        "| env (frames) | algo | final return (greedy) | sampled policy | seeds at target | "
        "mean training return | violation rate | frames/s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for env in envs:
        for algo in algos:
            rows = [r for r in results if r["env"] == env and r["algo"] == algo]
            if not rows:
                continue
            final = [r["final_return"] for r in rows]
            target = TARGETS.get(env)
            hit = f"{sum(f >= target - 1e-9 for f in final)}/{len(final)} (>= {target:g})" if target else "-"
            speed = [r["mean_train_return"] for r in rows if "mean_train_return" in r]
            curve = fmt(speed) if len(speed) == len(rows) else "n/a"
            lines.append(
                f"| {env} ({rows[0]['frames']:,}) | {algo} | {fmt(final)} | "
                f"{fmt([r['final_return_sampled'] for r in rows])} | {hit} | {curve} | "
                f"{statistics.fmean(r['violation_rate'] for r in rows):.0%} | "
                f"{statistics.fmean(r['frames_per_s'] for r in rows):,.0f} |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--envs", nargs="+", default=list(BUDGETS))
    parser.add_argument("--algos", nargs="+", default=["ot_trpo", "wpo"])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--frames", type=int, default=None, help="override every budget")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "bench" / "tabular")
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides for every run")
    args = parser.parse_args()

    unknown = [e for e in args.envs if e not in BUDGETS and args.frames is None]
    if unknown:
        parser.error(f"no default budget for {unknown}: pass --frames")
    jobs = [(env, algo, seed, args.frames or BUDGETS[env])
            for env in args.envs for algo in args.algos for seed in range(args.seeds)]
    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        futures = [pool.submit(run_one, *job, args.out, args.overrides) for job in jobs]
        results = []
        for (env, algo, seed, _), fut in zip(jobs, futures, strict=True):
            res = fut.result()
            results.append(res)
            print(f"{env:16s} {algo:8s} seed {seed}: final {res['final_return']:9.2f}  "
                  f"violations {res['violation_rate']:.0%}  {res['wall_time_s']:.0f}s", flush=True)
    md = table(results, args.envs, args.algos)
    header = (f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
              f"seeds 0..{args.seeds - 1}; {args.jobs} runs at a time; "
              f"total {time.perf_counter() - start:.0f}s.")
    print()
    print(header)
    print(md)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "table.md").write_text(header + "\n\n" + md + "\n")
    (args.out / "results.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
