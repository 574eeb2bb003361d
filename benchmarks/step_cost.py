"""Cost of one minibatch step, OT-TRPO against TorchRL's ClipPPOLoss, in one process.

``throughput.py`` times whole runs of the recipe, where collection's cost depends on how fast each
algorithm learns (episode ends mean resets) and the machine's speed drifts between runs. This
script isolates the part the loss decides: both algorithms' networks, loss and optimiser are built
by the recipe's own ``make_networks`` / ``make_loss`` from its configs, each collects one batch with
its own actor (then advantages, and lambda* for OT-TRPO, as in the recipe), and then they take turns,
one epoch (``num_minibatches`` steps) each, ABBA order, for ``--reps`` rounds. A step is timed in
the recipe's parts: replay-buffer sample, loss forward, backward, gradient clipping, Adam (with the
recipe's bookkeeping of the outputs). Neighbouring epochs see the same machine, so the median of
the paired per-epoch ratios is robust to drift.

    .venv/bin/python benchmarks/step_cost.py                         # CartPole-v1, 200 rounds
    .venv/bin/python benchmarks/step_cost.py env=Pendulum-v1 --reps 100

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

import torch
from compare import positive_int  # benchmarks/ is this script's own directory: on sys.path
from hydra import compose, initialize_config_dir
from torch import nn
from torchrl.collectors import Collector
from torchrl.data import ReplayBuffer, TensorStorage
from torchrl.data.replay_buffers.samplers import SamplerWithoutReplacement
from torchrl.data.tensor_specs import Categorical as CategoricalSpec
from torchrl.data.tensor_specs import OneHot as OneHotSpec

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "recipes"))
import train  # noqa: E402  (the recipe's builders: the very networks, loss and optimiser it trains)

PARTS = ("sample", "forward", "backward", "clip", "adam")


def build(algo: str, overrides: list[str]):
    """The recipe's loss and optimiser for ``algo``, and a replay buffer over one collected batch."""
    with initialize_config_dir(config_dir=str(ROOT / "recipes" / "conf" / "train"), version_base=None):
        cfg = compose("config", overrides=[f"algo={algo}", *overrides])
    torch.manual_seed(cfg.seed)
    probe = train.make_env(cfg.env.name, cfg.seed, None, cfg, num_envs=1)
    discrete = isinstance(probe.action_spec_unbatched, (CategoricalSpec, OneHotSpec))
    policy = train.resolve_policy(cfg, discrete)
    actor, critic, head = train.make_networks(probe, cfg, policy)
    obs_dim = probe.observation_spec["observation"].shape[-1]
    probe.close()
    loss, _ = train.make_loss(cfg, policy, discrete, actor, critic, head)
    optim = torch.optim.Adam(loss.parameters(), lr=cfg.lr, eps=cfg.adam_eps, fused=cfg.adam_fused)
    env = train.make_env(cfg.env.name, cfg.seed, train.new_obs_stats(obs_dim), cfg, num_envs=cfg.num_envs)
    collector = Collector(env, actor, frames_per_batch=cfg.frames_per_batch, total_frames=cfg.frames_per_batch,
                          auto_register_policy_transforms=False)
    batch = next(iter(collector))
    collector.shutdown()
    with torch.no_grad():
        loss.value_estimator(batch)
    if algo == "ot_trpo":  # as the recipe: batch-level normalisation, then lambda* once
        if cfg.algo.normalize_advantage:
            adv = batch["advantage"]
            batch["advantage"] = (adv - adv.mean()) / adv.std().clamp_min(1e-8)
        loss.solve_multiplier(batch)
    rb = ReplayBuffer(storage=TensorStorage(batch.reshape(-1).exclude(*train.UNUSED_AFTER_ADVANTAGES)),
                      sampler=SamplerWithoutReplacement(), batch_size=cfg.frames_per_batch // cfg.num_minibatches)
    return loss, optim, rb, cfg


def epoch(loss, optim, rb, steps: int, max_grad_norm: float, acc: dict[str, float]) -> float:
    """``steps`` minibatch steps as the recipe takes them; adds each part's seconds to ``acc``."""
    clock = time.perf_counter
    sums: dict[str, torch.Tensor] = {}
    begin = clock()
    for _ in range(steps):
        t0 = clock()
        td = rb.sample()
        t1 = clock()
        out = loss(td)
        total = sum(v for k, v in out.items() if k.startswith("loss_"))
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
    algos = ("ot_trpo", "ppo")
    built = {algo: build(algo, args.overrides) for algo in algos}
    acc = {algo: dict.fromkeys(PARTS, 0.0) for algo in algos}
    times: dict[str, list[float]] = {algo: [] for algo in algos}
    for rep in range(-5, args.reps):  # five warm-up rounds, not recorded
        for algo in (algos if rep % 2 == 0 else algos[::-1]):
            loss, optim, rb, cfg = built[algo]
            sink = acc[algo] if rep >= 0 else dict.fromkeys(PARTS, 0.0)
            seconds = epoch(loss, optim, rb, cfg.num_minibatches, cfg.max_grad_norm, sink)
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
