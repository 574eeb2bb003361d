"""OT-TRPO against PPO, A2C, TRPO and WPO in one harness: algorithms x environments x seeds.

Every network run is ``recipes/train.py`` with the same collector, networks, optimiser, batch size,
frame budget and evaluation; only ``algo=`` differs (their configs: ``recipes/conf/train/algo/``).
On tabular environments (Discrete observations and actions: Taxi, CliffWalking, NChain, FrozenLake)
``ot_trpo`` and ``wpo`` are the paper's tabular method (footnote 3: the direct parametrisation in
discrete environments), i.e. ``recipes/tabular.py`` with the same frame budget, seed and evaluation,
while PPO, A2C and TRPO are networks seeing one-hot states. ``ot_trpo_net`` / ``wpo_net`` (opt-in)
run the network OT-TRPO / WPO of ``recipes/train.py`` on those environments too. ``wpo`` runs only
where actions are discrete; ``bgpg`` and ``wnpg`` (opt-in: the paper's Wasserstein baselines) only where they are
continuous.

Runs go ``--jobs`` at a time into ``--out/<env>/<algo>/seed<k>``; a finished run (``summary.json``)
is reused and an interrupted network run resumes from its checkpoint, so a killed benchmark
continues where it stopped when the same command is run again. Every run's budget is its train env
config's ``total_frames`` (``--frames`` overrides it for all), evaluated every ``eval_every`` frames
over ``--eval-episodes`` episodes (10, as the paper's Figure 1) with the deterministic policy.
Trailing Hydra overrides go to ``recipes/train.py``; prefixed ``tabular.`` they go to
``recipes/tabular.py`` instead (``tabular.frames_per_batch=256``).

Outputs in ``--out``: ``runs.csv`` (tidy: algo, env, seed, frames, eval_return, wall_time_s; one
row per evaluation), ``<env>.png`` (mean +/- std over seeds against frames, as the paper's Figure
1) and ``table.md`` (final return mean +/- std, frames per second), also printed.

    .venv/bin/python benchmarks/compare.py --envs Pendulum-v1 --algos ot_trpo ppo --seeds 3 --jobs 2
    .venv/bin/python benchmarks/compare.py --ten-seeds                  # every env and algorithm, 10 seeds
    .venv/bin/python benchmarks/compare.py --envs CartPole-v1 Taxi-v4 --frames 20480 --report-only

Not a test: it asserts nothing (tests/test_compare.py runs a smoke version).
"""

from __future__ import annotations

import argparse
import csv
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

import gymnasium as gym
import matplotlib
from omegaconf import DictConfig, OmegaConf

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import torchrl_ot  # noqa: E402,F401  (registers NChain-v0)

ALGOS = ["ot_trpo", "ppo", "a2c", "trpo", "wpo"]
NETWORK_ON_TABULAR = ["ot_trpo_net", "wpo_net"]  # opt-in: recipes/train.py's OT-TRPO / WPO on tabular envs
WASSERSTEIN = ["bgpg", "wnpg"]  # opt-in: the paper's Wasserstein baselines, continuous actions only
ENVS = ["Taxi-v4", "CliffWalking-v1", "NChain-v0", "FrozenLake-v1", "CartPole-v1", "Acrobot-v1", "Pendulum-v1",
        "Swimmer-v5", "Hopper-v5", "HalfCheetah-v5"]
# Envs with their own config (recipes/conf/train/env/); the others run with the default env group and env.name=.
ENV_CONF = ROOT / "recipes" / "conf" / "train" / "env"
CONFIGURED = {p.stem for p in ENV_CONF.glob("*.yaml")}


@functools.cache
def spaces(env: str) -> tuple[bool, bool]:
    """(discrete actions, tabular: Discrete observations and actions)."""
    e = gym.make(env)
    try:
        discrete = isinstance(e.action_space, gym.spaces.Discrete)
        return discrete, discrete and isinstance(e.observation_space, gym.spaces.Discrete)
    finally:
        e.close()


def runs_on(env: str, algo: str) -> bool:
    discrete, tabular = spaces(env)
    if algo in NETWORK_ON_TABULAR:
        return tabular
    if algo in WASSERSTEIN:
        return not discrete
    return discrete or algo != "wpo"


def budget(env: str) -> DictConfig:
    """The env's train config (total_frames, eval_every), or the default env group's for unconfigured ids."""
    return OmegaConf.load(ENV_CONF / f"{env if env in CONFIGURED else 'CartPole-v1'}.yaml")


def command(env: str, algo: str, seed: int, run_dir: Path, args: argparse.Namespace) -> list[str]:
    conf = budget(env)
    # Hydra keeps the last of repeated overrides: the user's come after these.
    common = [f"seed={seed}", "progress=false", f"hydra.run.dir={run_dir}",
              f"total_frames={args.frames or conf.total_frames}"]
    train_over = [o for o in args.overrides if not o.startswith("tabular.")]
    tab_over = [o.removeprefix("tabular.") for o in args.overrides if o.startswith("tabular.")]
    if algo in ("ot_trpo", "wpo") and spaces(env)[1]:
        # A tabular run has no checkpoint: one without its summary (killed) starts over.
        return [sys.executable, str(ROOT / "recipes" / "tabular.py"), f"env.name={env}", f"algo={algo}", *common,
                f"eval.episodes={args.eval_episodes}", f"eval.every={conf.eval_every}", "overwrite=true", *tab_over]
    env_arg = f"env={env}" if env in CONFIGURED else f"env.name={env}"
    cmd = [sys.executable, str(ROOT / "recipes" / "train.py"), env_arg, f"algo={algo.removesuffix('_net')}",
           *common, f"eval_episodes={args.eval_episodes}", *train_over]
    if (run_dir / "checkpoint.pt").exists():
        cmd.append("resume=true")
    elif run_dir.exists():  # killed before its first checkpoint: nothing to resume, start over
        cmd.append("overwrite=true")
    return cmd


def run_one(env: str, algo: str, seed: int, args: argparse.Namespace) -> Path:
    run_dir = args.out / env / algo / f"seed{seed}"
    if (run_dir / "summary.json").exists():
        return run_dir
    cmd = command(env, algo, seed, run_dir, args)
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT,
                          env=dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1"))
    if proc.returncode != 0:
        raise RuntimeError(f"run failed: {' '.join(cmd)}\n{proc.stderr[-3000:]}")
    return run_dir


def read_run(run_dir: Path) -> tuple[dict, list[tuple[int, float]]]:
    summary = json.loads((run_dir / "summary.json").read_text())
    curve = [(int(float(step)), float(value)) for step, value in
             csv.reader(open(run_dir / "logs" / "scalars" / "eval_return.csv"))]
    return summary, curve


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.pstdev(values) if len(values) > 1 else 0.0)


def verdict(env: str, finals: dict[str, list[float]], seeds: int | None = None) -> str:
    """The paper's target on one env, as the table states it: OT-TRPO's mean final return at least the best
    baseline's, with a standard deviation no larger than that baseline's (and >= 1.5x PPO on Swimmer).
    With ``seeds``, a row where some algorithm has fewer finished runs is "open", naming the counts: a
    comparison with a baseline's single run (no spread) or none would read as a verdict it is not."""
    if not finals.get("ot_trpo"):
        return "n/a"
    missing = [f"{algo} {len(v)}/{seeds}" for algo, v in finals.items() if seeds is not None and len(v) < seeds]
    if missing:
        return "open: " + ", ".join(missing) + " seeds"
    base = {a: mean_std(v) for a, v in finals.items() if a not in ("ot_trpo", "ot_trpo_net") and v}
    if not base:
        return "n/a"
    m, s = mean_std(finals["ot_trpo"])
    best = max(base, key=lambda a: base[a][0])
    bm, bs = base[best]
    tol = 1e-9 * max(1.0, abs(bm))  # equal returns (e.g. 500 +/- 0 on CartPole) tie, not miss
    misses = []
    if m < bm - tol:
        misses.append(f"mean below {best}")
    if s > bs + tol:
        misses.append(f"std above {best}")
    if env.startswith("Swimmer") and "ppo" in base and m < 1.5 * base["ppo"][0]:
        misses.append("below 1.5x ppo")
    return "met" if not misses else "not met: " + ", ".join(misses)


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--envs", nargs="+", default=ENVS)
    parser.add_argument("--algos", nargs="+", default=ALGOS, choices=ALGOS + NETWORK_ON_TABULAR + WASSERSTEIN)
    parser.add_argument("--seeds", type=positive_int, default=5, help="N seeds from --first-seed (default 5)")
    parser.add_argument("--first-seed", type=int, default=0, help="the first seed (default 0): seeds K..K+N-1")
    parser.add_argument("--ten-seeds", action="store_true", help="10 seeds, as the paper's Figure 1")
    parser.add_argument("--jobs", type=positive_int, default=max(1, (os.cpu_count() or 1)), help="runs side by side")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "compare")
    parser.add_argument("--frames", type=positive_int, default=None,
                        help="budget for every run (default: the env config's)")
    parser.add_argument("--eval-episodes", type=positive_int, default=10, help="episodes per evaluation (default 10)")
    parser.add_argument("--report-only", action="store_true",
                        help="launch nothing: tabulate and plot the finished runs (cells say how many seeds)")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for every run (e.g. total_frames=50000)")
    args = parser.parse_args()
    seeds = range(args.first_seed, args.first_seed + (10 if args.ten_seeds else args.seeds))
    jobs = [(env, algo, seed) for env in args.envs for algo in args.algos for seed in seeds
            if runs_on(env, algo)]
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    if args.report_only:
        jobs = [j for j in jobs if (args.out / j[0] / j[1] / f"seed{j[2]}" / "summary.json").exists()]
        dirs = [args.out / env / algo / f"seed{seed}" for env, algo, seed in jobs]
    else:
        with ThreadPoolExecutor(args.jobs) as pool:
            dirs = list(pool.map(lambda job: run_one(*job, args), jobs))

    rows, results = [], {}
    for (env, algo, seed), run_dir in zip(jobs, dirs, strict=True):
        summary, curve = read_run(run_dir)
        results.setdefault((env, algo), []).append((summary, curve))
        rows += [{"algo": algo, "env": env, "seed": seed, "frames": frames, "eval_return": ret,
                  "wall_time_s": summary["wall_time_s"]} for frames, ret in curve]
    with open(args.out / "runs.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["algo", "env", "seed", "frames", "eval_return", "wall_time_s"])
        writer.writeheader()
        writer.writerows(rows)

    lines = ["| env | frames | " + " | ".join(args.algos) + " | target |", "|---|---|" + "---|" * (len(args.algos) + 1)]
    for env in args.envs:
        fig, ax = plt.subplots(figsize=(6, 3.6))
        cells, frames = [], None
        finals = {algo: [s["final_return"] for s, _ in results.get((env, algo), [])]
                  for algo in args.algos if runs_on(env, algo)}
        best = max((mean_std(v)[0] for v in finals.values() if v), default=None)
        for algo in args.algos:
            runs = results.get((env, algo))
            if not runs:
                cells.append("n/a")
                continue
            frames = runs[0][0]["frames"]
            m, s = mean_std(finals[algo])
            fps = statistics.fmean(r["frames_per_s"] for r, _ in runs)
            cell = f"{m:.2f} +/- {s:.2f} ({fps:,.0f}/s)" + (f" [{len(runs)} seeds]" if len(runs) < len(seeds) else "")
            cells.append(f"**{cell}**" if m == best else cell)
            steps = sorted({f for _, c in runs for f, _ in c})
            curves = [dict(c) for _, c in runs]
            ys = [[c[f] for c in curves if f in c] for f in steps]
            mean = [statistics.fmean(y) for y in ys]
            std = [statistics.pstdev(y) if len(y) > 1 else 0.0 for y in ys]
            ax.plot(steps, mean, label=algo)
            ax.fill_between(steps, [a - b for a, b in zip(mean, std, strict=True)],
                            [a + b for a, b in zip(mean, std, strict=True)], alpha=0.2)
        ax.set(xlabel="frames", ylabel="evaluation return", title=f"{env} ({len(seeds)} seeds, mean +/- std)")
        ax.legend()
        fig.tight_layout()
        fig.savefig(args.out / f"{env}.png", dpi=100)
        plt.close(fig)
        frames_cell = "-" if frames is None else f"{frames:,}"
        lines.append(f"| {env} | {frames_cell} | " + " | ".join(cells) + f" | {verdict(env, finals, len(seeds))} |")
    header = (f"Command: `{' '.join(['.venv/bin/python benchmarks/compare.py', *sys.argv[1:]])}`; seeds "
              f"{seeds[0]}-{seeds[-1]}; final deterministic policy; {platform.machine()}, {os.cpu_count()} cores; "
              f"{time.perf_counter() - start:.0f} s. Cells: final return mean +/- std over seeds (frames/s); "
              f"bold: the best mean. Target: OT-TRPO's mean at least the best baseline's, its std no larger "
              f"(on Swimmer also >= 1.5x PPO).")
    table = header + "\n\n" + "\n".join(lines) + "\n"
    (args.out / "table.md").write_text(table)
    print(table)
    print(f"CSV: {args.out / 'runs.csv'}; plots: {args.out}/<env>.png")


if __name__ == "__main__":
    main()
