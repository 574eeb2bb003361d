"""Collection alone: the recipe's collector over ``env_engine=fused`` against ``env_engine=torchrl``, side by side.

Both collect with the recipe's own pieces (``make_env``, ``make_networks``, ``make_collector``: TorchRL's
``Collector`` in this process, the untrained actor sampling, the running observation normalisation on), the
env's ``num_envs`` copies and 2,048-frame batches; only ``env_engine`` differs. The fused engine is
:class:`torchrl_ot.training.FusedVecEnv`; the other is ``TransformedEnv(GymWrapper(vec), Compose(...))`` of
TorchRL's transforms. Runs alternate in ABBA order (fused, torchrl, torchrl, fused, ...), the whole process
pinned to ``--core``; each times ``--batches`` batches after one untimed batch. Printed: microseconds per
vector step (all copies stepped once) for each run, the medians and their ratio, and whether the two engines
gave the same batches (they must: ``tests/test_vec_env.py``).

    .venv/bin/python benchmarks/env_engine.py                               # CartPole-v1 and HalfCheetah-v5
    .venv/bin/python benchmarks/env_engine.py --envs Hopper-v5 --batches 5 --reps 6 --core 1

Not a test: it asserts nothing.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

from compare import positive_int  # benchmarks/ is this script's own directory: on sys.path

ROOT = Path(__file__).resolve().parents[1]
ENGINES = ("fused", "torchrl")
FRAMES_PER_BATCH = 2048


def collect(env_name: str, engine: str, batches: int, seed: int = 0) -> tuple[float, object]:
    """(microseconds per vector step over ``batches`` timed batches, the last batch) for one engine."""
    import torch
    from hydra import compose, initialize_config_dir

    from torchrl_ot.training import make_collector, make_env, make_networks, new_obs_stats, resolve_policy

    with initialize_config_dir(config_dir=str(ROOT / "recipes" / "conf" / "train"), version_base=None):
        cfg = compose("config", overrides=[f"env={env_name}", "algo=ppo", "obs_norm.enabled=true",
                                           f"env_engine={engine}"])
    torch.manual_seed(seed)
    probe = make_env(cfg.env.name, seed, None, cfg, num_envs=1)
    discrete = probe.action_spec_unbatched.dtype == torch.int64
    actor = make_networks(probe, cfg, resolve_policy(cfg, discrete))[0]
    stats = new_obs_stats(probe.observation_spec["observation"].shape[-1])
    probe.close()
    collector = make_collector([lambda: make_env(cfg.env.name, seed, stats, cfg, num_envs=cfg.num_envs)], actor, cfg,
                               frames_per_batch=FRAMES_PER_BATCH, total_frames=FRAMES_PER_BATCH * (batches + 1))
    batches_iter = iter(collector)
    next(batches_iter)  # untimed: the first batch builds the collector's buffers
    start = time.perf_counter()
    for batch in batches_iter:
        last = batch
    seconds = time.perf_counter() - start
    collector.shutdown()
    return 1e6 * seconds / (batches * FRAMES_PER_BATCH // cfg.num_envs), last


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--envs", nargs="+", default=["CartPole-v1", "HalfCheetah-v5"])
    parser.add_argument("--batches", type=positive_int, default=12, help="timed batches of 2,048 frames per run")
    parser.add_argument("--reps", type=positive_int, default=4, help="runs per engine (ABBA order)")
    parser.add_argument("--core", type=int, default=0, help="the core this process is pinned to")
    args = parser.parse_args()
    os.sched_setaffinity(0, {args.core})
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(1)
    print(f"Command: `.venv/bin/python benchmarks/env_engine.py {' '.join(sys.argv[1:])}`; one process pinned to "
          f"core {args.core}; {platform.processor() or platform.machine()}, {os.cpu_count()} cores; {args.batches} "
          f"timed batches of {FRAMES_PER_BATCH} frames per run, {args.reps} runs per engine in ABBA order.\n")
    print("| env | fused us/step (runs) | torchrl us/step (runs) | fused / torchrl time | same batch |")
    print("|---|---|---|---|---|")
    for env_name in args.envs:
        times: dict[str, list[float]] = {engine: [] for engine in ENGINES}
        last: dict[str, object] = {}
        for rep in range(args.reps):
            for engine in (ENGINES if rep % 2 == 0 else ENGINES[::-1]):
                micros, last[engine] = collect(env_name, engine, args.batches)
                times[engine].append(micros)
        same = bool((last["fused"] == last["torchrl"]).all())
        med = {engine: statistics.median(values) for engine, values in times.items()}
        runs = {engine: ", ".join(f"{v:,.0f}" for v in values) for engine, values in times.items()}
        print(f"| {env_name} | {med['fused']:,.0f} ({runs['fused']}) | {med['torchrl']:,.0f} ({runs['torchrl']}) | "
              f"{med['fused'] / med['torchrl']:.2f} | {'yes' if same else 'NO'} |", flush=True)


if __name__ == "__main__":
    main()
