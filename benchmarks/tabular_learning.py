"""Multi-seed learning benchmark of the tabular recipe: OT-TRPO against WPO at equal frames.

Runs ``recipes/tabular.py`` for every (setting, algorithm, seed) in subprocesses, ``--jobs`` at a time, reads
each run's ``summary.json`` and prints (and writes) a markdown table: final return mean +/- std over seeds
(greedy policy, 100 evaluation episodes per seed); the final policy's expected return computed exactly from the
env's transition table, as a fraction of the optimum (``tabular_optimum.py``: value iteration), mean and lowest
over seeds; the sampled-policy return, the trust-region violation rate, frames and throughput. A setting is an
env id with ``env.kwargs`` (``FrozenLake-v1:map_name=8x8``, values as Hydra reads them); ``--toy-text`` runs
every setting of ``tabular_optimum.SETTINGS`` (each toy-text env at its default and one other setting, and
NChain).

    .venv/bin/python benchmarks/tabular_learning.py                 # 5 seeds, the four envs
    .venv/bin/python benchmarks/tabular_learning.py --seeds 2 --envs CliffWalking-v1 FrozenLake-v1:map_name=8x8
    .venv/bin/python benchmarks/tabular_learning.py --toy-text --first-seed 10 --out benchmarks/results/tabular_toy_text

Runs go to ``--out/<folder>/<algo>/seed<k>`` (folders such as ``FrozenLake-v1_map_name-8x8``); a finished run
(``summary.json``) is reused, so a killed benchmark continues where it stopped. Not a test: it asserts nothing;
the table goes into docs/results.md by hand, with the command.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from compare import positive_int  # noqa: E402
from tabular_optimum import SETTINGS, fraction, optimal_return  # noqa: E402

# Frame budgets per environment; one budget for every algorithm on that environment.
BUDGETS = {
    "CliffWalking-v1": 100_000,
    "NChain-v0": 100_000,
    "Taxi-v4": 200_000,
    "FrozenLake-v1": 100_000,
}
# Budgets of the other settings (tabular_optimum.SETTINGS), by setting; at most the 1M frames asked of them.
SETTING_BUDGETS = {
    "CliffWalking-v1:is_slippery=true": 300_000,
    "FrozenLake-v1:is_slippery=false": 100_000,
    "FrozenLake-v1:map_name=8x8": 1_000_000,
    "Taxi-v4:is_rainy=true": 500_000,
    "NChain-v0:n=10": 300_000,
}
# The toy-text table (--toy-text) gives FrozenLake 4x4 300k frames: at 100k one seed in five ends at 0.81 of the
# optimum (benchmarks/results/tabular_toy_text/NOTES.md), and the toy-text settings are allowed 1M.
TOY_TEXT_BUDGETS = {"FrozenLake-v1": 300_000}
# What "solved" means on each environment (the targets the table checks).
TARGETS = {"CliffWalking-v1": -13.0, "NChain-v0": 3500.0, "Taxi-v4": 7.5}


def parse_setting(setting: str) -> tuple[str, dict[str, Any]]:
    """``"FrozenLake-v1:map_name=8x8,is_slippery=false"`` -> ``("FrozenLake-v1", {"map_name": "8x8", ...})``,
    values parsed as Hydra parses overrides (``false`` a bool, ``10`` an int)."""
    env, _, rest = setting.partition(":")
    kwargs: dict[str, Any] = {}
    for item in filter(None, rest.split(",")):
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"setting {setting!r}: expected env:key=value[,key=value], got {item!r}")
        kwargs[key] = yaml.safe_load(value)
    return env, kwargs


def _literal(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def setting_name(env: str, kwargs: dict[str, Any]) -> str:
    """The inverse of :func:`parse_setting`."""
    items = ",".join(f"{k}={_literal(v)}" for k, v in kwargs.items())
    return f"{env}:{items}" if items else env


def setting_folder(setting: str) -> str:
    """The run folder of a setting: ``FrozenLake-v1_map_name-8x8`` (no ``:``, ``=`` or ``,`` in paths)."""
    env, kwargs = parse_setting(setting)
    return env + "".join(f"_{k}-{_literal(v)}" for k, v in kwargs.items())


def _budget(run_dir: Path) -> int | None:
    """The ``total_frames`` a run was started with (its Hydra config), so that a changed budget reruns it."""
    config = run_dir / ".hydra" / "config.yaml"
    return yaml.safe_load(config.read_text()).get("total_frames") if config.exists() else None


def run_one(setting: str, algo: str, seed: int, frames: int, out: Path, extra: list[str]) -> dict:
    env, kwargs = parse_setting(setting)
    run_dir = out / setting_folder(setting) / algo / f"seed{seed}"
    summary = run_dir / "summary.json"
    if summary.exists() and _budget(run_dir) == frames:  # finished earlier: a killed benchmark resumes
        return {**json.loads(summary.read_text()), "setting": setting}
    cmd = [sys.executable, str(ROOT / "recipes" / "tabular.py"), f"env.name={env}", f"algo={algo}",
           f"seed={seed}", f"total_frames={frames}", "progress=false", f"hydra.run.dir={run_dir}",
           "overwrite=true",  # a run without its summary was killed: start it over
           *(f"+env.kwargs.{k}={_literal(v)}" for k, v in kwargs.items()), *extra]
    env_vars = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env_vars, cwd=ROOT)
    if proc.returncode != 0:
        raise RuntimeError(f"run failed: {' '.join(cmd)}\n{proc.stderr[-3000:]}")
    return {**json.loads(summary.read_text()), "setting": setting}


def fmt(values: list[float], digits: int = 2) -> str:
    mean = statistics.fmean(values)
    std = statistics.pstdev(values) if len(values) > 1 else 0.0
    return f"{mean:.{digits}f} +/- {std:.{digits}f}"


@functools.cache
def optimum(setting: str) -> float | None:
    env, kwargs = parse_setting(setting)
    try:
        return optimal_return(env, kwargs)
    except ValueError:  # no transition table
        return None


def table(results: list[dict], settings: list[str], algos: list[str]) -> str:
    lines = [
        "| env (frames) | algo | final return (greedy) | exact return / optimum, mean (lowest) | sampled policy | "
        "seeds at target | mean training return | violation rate | frames/s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for setting in settings:
        for algo in algos:
            rows = [r for r in results if r["setting"] == setting and r["algo"] == algo]
            if not rows:
                continue
            final = [r["final_return"] for r in rows]
            target = TARGETS.get(setting)
            hit = f"{sum(f >= target - 1e-9 for f in final)}/{len(final)} (>= {target:g})" if target else "-"
            speed = [r["mean_train_return"] for r in rows if "mean_train_return" in r]
            curve = fmt(speed) if len(speed) == len(rows) else "n/a"
            best = optimum(setting)
            # The final policy's return computed exactly from the transition table (summary.json's
            # final_return_exact), not the 100 evaluation episodes' mean, whose noise can exceed the optimum.
            exact = [r.get("final_return_exact") for r in rows]
            lines.append(
                f"| {setting} ({rows[0]['frames']:,}) | {algo} | {fmt(final)} | "
                f"{fraction(exact, best) if None not in exact else 'n/a'} of "
                f"{'n/a' if best is None else f'{best:.3f}'} | "
                f"{fmt([r['final_return_sampled'] for r in rows])} | {hit} | {curve} | "
                f"{statistics.fmean(r['violation_rate'] for r in rows):.0%} | "
                f"{statistics.fmean(r['frames_per_s'] for r in rows):,.0f} |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--envs", nargs="+", default=list(BUDGETS), help="settings: env[:key=value,...]")
    parser.add_argument("--toy-text", action="store_true", help="every setting of tabular_optimum.SETTINGS")
    parser.add_argument("--algos", nargs="+", default=["ot_trpo", "wpo"])
    parser.add_argument("--seeds", type=positive_int, default=5)
    parser.add_argument("--first-seed", type=int, default=0)
    parser.add_argument("--jobs", type=positive_int, default=2)
    parser.add_argument("--frames", type=positive_int, default=None, help="override every budget")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "bench" / "tabular")
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides for every run")
    args = parser.parse_args()

    settings = [setting_name(env, kw) for env, kw in SETTINGS] if args.toy_text else args.envs
    try:
        settings = [setting_name(*parse_setting(s)) for s in settings]
    except ValueError as err:
        parser.error(str(err))
    budgets = {**BUDGETS, **SETTING_BUDGETS, **(TOY_TEXT_BUDGETS if args.toy_text else {})}
    unknown = [s for s in settings if s not in budgets and args.frames is None]
    if unknown:
        parser.error(f"no default budget for {unknown}: pass --frames")
    seeds = range(args.first_seed, args.first_seed + args.seeds)
    jobs = [(setting, algo, seed, args.frames or budgets[setting])
            for setting in settings for algo in args.algos for seed in seeds]
    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        futures = [pool.submit(run_one, *job, args.out, args.overrides) for job in jobs]
        results = []
        for (setting, algo, seed, _), fut in zip(jobs, futures, strict=True):
            res = fut.result()
            results.append(res)
            print(f"{setting:16s} {algo:8s} seed {seed}: final {res['final_return']:9.2f}  "
                  f"violations {res['violation_rate']:.0%}  {res['wall_time_s']:.0f}s", flush=True)
    md = table(results, settings, args.algos)
    header = (f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
              f"seeds {seeds[0]}..{seeds[-1]}; {args.jobs} runs at a time; "
              f"{sum(r['wall_time_s'] for r in results):.0f}s of runs in all "
              f"({time.perf_counter() - start:.0f}s in this call; finished runs are read back).")
    print()
    print(header)
    print(md)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "table.md").write_text(header + "\n\n" + md + "\n")
    (args.out / "results.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
