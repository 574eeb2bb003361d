"""Cost of one minibatch step, OT-TRPO against TorchRL's ClipPPOLoss, in one process.

``throughput.py`` times whole runs of the recipe, where collection's cost depends on how fast each
algorithm learns (episode ends mean resets) and the machine's speed drifts between runs. This
script isolates the part the loss decides: both algorithms' networks, loss and optimiser are built
by the recipe's own builders (``torchrl_ot.training``) from its configs, each collects one batch
with its own actor (then advantages and the algorithm's ``before_epochs``, lambda* for OT-TRPO, as
in the recipe), and then they take turns, one epoch (``num_minibatches`` steps) each, ABBA order,
for ``--reps`` rounds. A step is timed in the recipe's parts: replay-buffer sample, loss forward,
backward, gradient clipping, Adam (with the recipe's bookkeeping of the outputs). Neighbouring
epochs see the same machine, so the median of the paired per-epoch ratios is robust to drift.

    .venv/bin/python benchmarks/step_cost.py                         # CartPole-v1, 200 rounds
    .venv/bin/python benchmarks/step_cost.py env=Pendulum-v1 --reps 100

Not a test: it asserts nothing.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from pathlib import Path

import torch
from compare import positive_int  # benchmarks/ is this script's own directory: on sys.path
from hydra import compose, initialize_config_dir
from torch import nn
from torchrl.collectors import Collector
from torchrl.data.tensor_specs import Categorical as CategoricalSpec
from torchrl.data.tensor_specs import OneHot as OneHotSpec

from torchrl_ot.training import (
    make_algorithm,
    make_env,
    make_networks,
    minibatches,
    new_obs_stats,
    record_missing_pandas,
    resolve_policy,
)

ROOT = Path(__file__).resolve().parents[1]
PARTS = ("sample", "forward", "backward", "clip", "adam")


def build(algo: str, overrides: list[str]):
    """The recipe's algorithm and optimiser for ``algo``, and its minibatches of one collected batch."""
    with initialize_config_dir(config_dir=str(ROOT / "recipes" / "conf" / "train"), version_base=None):
        cfg = compose("config", overrides=[f"algo={algo}", *overrides])
    torch.manual_seed(cfg.seed)
    probe = make_env(cfg.env.name, cfg.seed, None, cfg, num_envs=1)
    discrete = isinstance(probe.action_spec_unbatched, (CategoricalSpec, OneHotSpec))
    policy = resolve_policy(cfg, discrete)
    actor, critic, head = make_networks(probe, cfg, policy)
    obs_dim = probe.observation_spec["observation"].shape[-1]
    probe.close()
    algorithm = make_algorithm(cfg, policy, discrete, actor, critic, head)
    optim = torch.optim.Adam(algorithm.loss_module.parameters(), lr=cfg.lr, eps=cfg.adam_eps, fused=cfg.adam_fused)
    env = make_env(cfg.env.name, cfg.seed, new_obs_stats(obs_dim), cfg, num_envs=cfg.num_envs)
    collector = Collector(env, actor, frames_per_batch=cfg.frames_per_batch, total_frames=cfg.frames_per_batch,
                          auto_register_policy_transforms=False)
    batch = next(iter(collector))
    collector.shutdown()
    with torch.no_grad():
        algorithm.loss_module.value_estimator(batch)
    algorithm.before_epochs(batch, {"frames": batch.numel()})  # as the recipe: OT-TRPO's lambda* once
    return algorithm, optim, minibatches(batch, cfg.frames_per_batch // cfg.num_minibatches), cfg


def epoch(algorithm, optim, rb, steps: int, max_grad_norm: float, acc: dict[str, float]) -> float:
    """``steps`` minibatch steps as the recipe takes them; adds each part's seconds to ``acc``."""
    loss = algorithm.loss_module
    clock = time.perf_counter
    sums: dict[str, torch.Tensor] = {}
    begin = clock()
    for _ in range(steps):
        t0 = clock()
        td = rb.sample()
        t1 = clock()
        out = loss(td)
        total = algorithm.minibatch_loss(out)
        if not torch.isfinite(total):
            raise FloatingPointError("non-finite loss")
        t2 = clock()
        optim.zero_grad()
        total.backward()
        t3 = clock()
        nn.utils.clip_grad_norm_(loss.parameters(), max_grad_norm)
        t4 = clock()
        optim.step()
        for k, v in out.items():
            sums[k] = sums.get(k, 0.0) + v.detach()
        t5 = clock()
        for part, seconds in zip(PARTS, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4), strict=True):
            acc[part] += seconds
    return clock() - begin


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=positive_int, default=200, help="rounds of one epoch per algorithm")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for both algorithms (default env=CartPole-v1)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    record_missing_pandas()  # as the recipe does
    algos = ("ot_trpo", "ppo")
    built = {algo: build(algo, args.overrides) for algo in algos}
    acc = {algo: dict.fromkeys(PARTS, 0.0) for algo in algos}
    times: dict[str, list[float]] = {algo: [] for algo in algos}
    for rep in range(-5, args.reps):  # five warm-up rounds, not recorded
        for algo in (algos if rep % 2 == 0 else algos[::-1]):
            algorithm, optim, rb, cfg = built[algo]
            sink = acc[algo] if rep >= 0 else dict.fromkeys(PARTS, 0.0)
            seconds = epoch(algorithm, optim, rb, cfg.num_minibatches, cfg.max_grad_norm, sink)
            if rep >= 0:
                times[algo].append(seconds)
    cfg = built["ppo"][3]
    steps = args.reps * cfg.num_minibatches
    paired = [p / o for o, p in zip(times["ot_trpo"], times["ppo"], strict=True)]
    print(f"{cfg.env.name}: minibatch {cfg.frames_per_batch // cfg.num_minibatches} of a {cfg.frames_per_batch}-frame "
          f"batch, {args.reps} epochs of {cfg.num_minibatches} steps per algorithm, alternating; "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, one torch thread")
    print("\n| part | OT-TRPO (us/step) | PPO (ClipPPOLoss) (us/step) | difference |\n|---|---|---|---|")
    for part in PARTS:
        ot, ppo = (1e6 * acc[a][part] / steps for a in algos)
        print(f"| {part} | {ot:.0f} | {ppo:.0f} | {ot - ppo:+.0f} |")
    ot, ppo = (1e6 * sum(times[a]) / steps for a in algos)
    print(f"| whole step | {ot:.0f} | {ppo:.0f} | {ot - ppo:+.0f} |")
    print(f"\nOT-TRPO's speed relative to PPO (PPO's time / OT-TRPO's): median of paired epochs "
          f"{statistics.median(paired):.3f}, ratio of the sums {sum(times['ppo']) / sum(times['ot_trpo']):.3f}")


if __name__ == "__main__":
    main()
