"""Throughput of recipes/train.py: OT-TRPO against TorchRL's ClipPPOLoss, side by side.

Both runs use the same recipe, collector, batch size, epochs, minibatches, networks and optimiser;
only ``algo=`` differs. Runs alternate one at a time in ABBA order (ot_trpo, ppo, ppo, ot_trpo, ...)
so that both see the same machine state, or, with ``--concurrent``, each rep's pair runs at the same
time, each pinned to its own core (OT-TRPO on core 0 for two reps, then on core 1 for two: each algorithm meets
each core in each launch order equally often): on a machine whose speed drifts from minute to
minute that pairs them far more closely. The figure is the recipe's own ``frames_per_s``
(training time: collection + updates, evaluations excluded). Two ratios: of the medians, and the
median over reps of each rep's OT-TRPO / PPO pair (robust to the machine's drift between reps).
Each is given twice: for the training frames/s, and for the update alone (advantages, lambda*, the
epochs; the summary's ``update_frames_per_s``), since collection's cost per frame depends on how
often episodes end, i.e. on how fast each algorithm learns the env. A second table splits an
update's time into its phases (the summary's ``update_time_breakdown_s``), milliseconds per update.

    .venv/bin/python benchmarks/throughput.py                                # CartPole-v1 and Pendulum-v1
    .venv/bin/python benchmarks/throughput.py --envs Hopper-v5 --frames 40960 --reps 3
    .venv/bin/python benchmarks/throughput.py --envs CartPole-v1 --reps 10 --concurrent

Not a test: it asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from compare import positive_int  # benchmarks/ is this script's own directory: on sys.path

ROOT = Path(__file__).resolve().parents[1]


def start(env: str, algo: str, frames: int, seed: int, extra: list[str], tmp: str,
          core: int | None = None) -> subprocess.Popen:
    """Launch one run into ``tmp`` (pinned to ``core`` if given)."""
    cmd = [sys.executable, str(ROOT / "recipes" / "train.py"), f"env={env}", f"algo={algo}", f"seed={seed}",
           f"total_frames={frames}", f"eval_every={10 * frames}", f"checkpoint_every={10 * frames}",
           "eval_episodes=1", "progress=false", f"hydra.run.dir={tmp}", *extra]
    pin = None if core is None else (lambda: os.sched_setaffinity(0, {core}))
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                            env=dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1"), preexec_fn=pin)


def finish(proc: subprocess.Popen, tmp: str) -> tuple[float, float, dict[str, float], int]:
    """(training frames/s, update-only frames/s, milliseconds per update by phase, episodes ended) of a
    finished run."""
    _, stderr = proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"run failed: {' '.join(proc.args)}\n{stderr[-3000:]}")
    summary = json.loads((Path(tmp) / "summary.json").read_text())
    per_update = {phase: 1000 * seconds / summary["updates"]
                  for phase, seconds in summary["update_time_breakdown_s"].items()}
    return summary["frames_per_s"], summary["update_frames_per_s"], per_update, summary["train_episodes"]


def schedule(rep: int) -> tuple[tuple[str, str], dict[str, int]]:
    """Rep ``rep``'s launch order (ABBA: neither algorithm is always second, with warmer caches and drift)
    and, for ``--concurrent``, each algorithm's core. Over any four reps each algorithm runs on each core
    in each launch order once: pinning by launch position instead would tie an algorithm to one core."""
    order = ("ot_trpo", "ppo") if rep % 2 == 0 else ("ppo", "ot_trpo")
    ot_core = (rep // 2) % 2
    return order, {"ot_trpo": ot_core, "ppo": 1 - ot_core}


def run_pair(env: str, order: tuple[str, str], frames: int, seed: int, extra: list[str],
             concurrent: bool, cores: dict[str, int]) -> dict[str, tuple[float, float, dict[str, float], int]]:
    """One rep: the two algorithms one after the other in ``order``, or at the same time, each on its core."""
    out = {}
    with tempfile.TemporaryDirectory() as tmp_a, tempfile.TemporaryDirectory() as tmp_b:
        if concurrent:
            procs = [start(env, algo, frames, seed, extra, tmp, cores[algo])
                     for algo, tmp in zip(order, (tmp_a, tmp_b), strict=True)]
            for algo, proc, tmp in zip(order, procs, (tmp_a, tmp_b), strict=True):
                out[algo] = finish(proc, tmp)
        else:
            for algo, tmp in zip(order, (tmp_a, tmp_b), strict=True):
                out[algo] = finish(start(env, algo, frames, seed, extra, tmp), tmp)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--envs", nargs="+", default=["CartPole-v1", "Pendulum-v1"])
    parser.add_argument("--frames", type=positive_int, default=30720, help="frames per run")
    parser.add_argument("--reps", type=positive_int, default=3, help="runs per (env, algo)")
    parser.add_argument("--concurrent", action="store_true",
                        help="run each rep's two runs at the same time, pinned to cores 0 and 1 (swapped every "
                             "second rep), so that both see the same machine state; needs 2 cores")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides passed to every run")
    args = parser.parse_args()
    if args.concurrent and not (hasattr(os, "sched_setaffinity") and len(os.sched_getaffinity(0)) >= 2):
        parser.error("--concurrent needs 2 usable cores and os.sched_setaffinity (Linux)")

    header = ["| env | measure | OT-TRPO frames/s | PPO (ClipPPOLoss) frames/s | ratio of medians "
              "| median of paired ratios |", "|---|---|---|---|---|---|"]
    lines, breakdown = [], []
    for env in args.envs:
        fps: dict[str, list[tuple[float, float, dict[str, float], int]]] = {"ot_trpo": [], "ppo": []}
        for rep in range(args.reps):
            order, cores = schedule(rep)
            for algo, result in run_pair(env, order, args.frames, rep, args.overrides, args.concurrent,
                                         cores).items():
                fps[algo].append(result)
                print(f"{env} {algo} rep {rep}: {result[0]:.0f} frames/s (update only: {result[1]:.0f}), "
                      f"{result[3]} episodes ended", flush=True)
        for i, measure in enumerate(("training", "update only")):
            ot_runs, ppo_runs = ([r[i] for r in fps[a]] for a in ("ot_trpo", "ppo"))
            ot, ppo = statistics.median(ot_runs), statistics.median(ppo_runs)
            # Each rep's two runs are adjacent in time: their ratio cancels the machine's slow drift.
            paired = statistics.median(o / p for o, p in zip(ot_runs, ppo_runs, strict=True))
            lines.append(f"| {env} | {measure} | {ot:.0f} ({', '.join(f'{v:.0f}' for v in ot_runs)}) | "
                         f"{ppo:.0f} ({', '.join(f'{v:.0f}' for v in ppo_runs)}) | {ot / ppo:.2f} | {paired:.2f} |")
        # Where an update's time goes: the medians over reps of each phase, per update.
        for phase in fps["ppo"][0][2]:
            ot, ppo = (statistics.median(r[2][phase] for r in fps[a]) for a in ("ot_trpo", "ppo"))
            breakdown.append(f"| {env} | {phase} | {ot:.1f} | {ppo:.1f} | {ot - ppo:+.1f} |")
        # Collection's share: every episode end is a reset through the env's transforms.
        ot, ppo = (statistics.median(r[3] for r in fps[a]) for a in ("ot_trpo", "ppo"))
        breakdown.append(f"| {env} | episodes ended per run (collection: one reset each) | {ot:.0f} | {ppo:.0f} | "
                         f"{ot - ppo:+.0f} |")
    print()
    how = "each pair at the same time on two pinned cores" if args.concurrent else "one run at a time, ABBA order"
    print(f"{args.frames} frames per run, {args.reps} runs each ({how}), medians (all runs in brackets); "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, one torch thread")
    print("\n".join(header + lines))
    print("\nmilliseconds per update, medians over reps (advantage: GAE; solve: lambda*; epochs: the minibatch "
          "steps; project: the projection into the radius and the update's bookkeeping)")
    print("\n".join(["| env | phase | OT-TRPO | PPO | difference |", "|---|---|---|---|---|", *breakdown]))


if __name__ == "__main__":
    main()
