"""Tabular OT-TRPO (or WPO) on any gymnasium env with Discrete observations and actions.

One exact trust-region update per collected batch (Algorithm 1 with the direct parametrisation,
Corollary 3), every update audited by an exact OT solver. Reads top to bottom:

    python recipes/tabular.py                                  # CliffWalking-v1, OT-TRPO
    python recipes/tabular.py env.name=Taxi-v4 total_frames=200000 algo=wpo seed=3

Writes into the run directory (``runs/tabular/<env>/<algo>/seed<seed>``): the TorchRL logger's
scalars (CSV by default), ``summary.json``, ``curve.png`` and ``policy.pt``. Where the env has a transition
table (the toy-text envs, NChain), ``summary.json`` also holds the final policy's expected return computed
exactly (``final_return_exact``) and the optimum (``optimal_return``), both under the episode limit.
"""

from __future__ import annotations

import json
import math
import statistics
import time
from pathlib import Path

import gymnasium as gym
import hydra
import matplotlib
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torchrl.collectors import Collector
from torchrl.record.loggers import get_logger
from tqdm import tqdm

from torchrl_ot.functional import tabular_ot_update
from torchrl_ot.tabular import (
    TabularCritic,
    TabularPolicy,
    audit_transport,
    env_sizes,
    episode_limit,
    evaluate,
    exact_return,
    make_actor,
    make_env,
    visitation_weights,
)
from torchrl_ot.training import check_run_dir, check_tabular_config, truncate_csv_logs

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

VIOLATION_RTOL = 1e-6


@hydra.main(config_path="conf/tabular", config_name="config", version_base=None)
def main(cfg: DictConfig) -> dict:
    check_tabular_config(cfg)  # before building anything
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    if check_run_dir(run_dir, resume=False, overwrite=cfg.overwrite) and cfg.logger.backend == "csv":
        truncate_csv_logs(run_dir / "logs", -1)  # overwrite=true: TorchRL's CSV logger would append to the old rows
    torch.manual_seed(cfg.seed)
    start = time.perf_counter()

    # --- environment, policy table, critic, cost --------------------------------------------
    env_kwargs = OmegaConf.to_container(cfg.env.kwargs)  # checked against the env's constructor in make_env
    env = make_env(cfg.env.name, num_envs=cfg.env.num_envs, max_episode_steps=cfg.env.max_episode_steps,
                   seed=cfg.seed, env_kwargs=env_kwargs)
    n_states, n_actions = env_sizes(env)
    policy = TabularPolicy(n_states, n_actions)
    actor = make_actor(policy, env)
    cost = instantiate(cfg.cost).matrix(n_actions)
    critic = TabularCritic(n_states, n_actions, gamma=cfg.gamma, estimator=cfg.estimator.name,
                           sweeps=cfg.estimator.sweeps, bonus=cfg.estimator.get("bonus", 0.0))
    logger = get_logger(cfg.logger.backend, logger_name=str(run_dir), experiment_name="logs",
                        **({"project": cfg.logger.project} if cfg.logger.backend == "wandb" else {}))
    collector = Collector(env, actor, frames_per_batch=cfg.frames_per_batch, total_frames=cfg.total_frames)
    eval_env = make_env(cfg.env.name, num_envs=cfg.eval.episodes, max_episode_steps=cfg.env.max_episode_steps,
                        seed=cfg.seed + 10_000, env_kwargs=env_kwargs)
    horizon = episode_limit(cfg.env.name, cfg.env.max_episode_steps)
    curve: list[tuple[int, float]] = []

    def log_eval(frames_now: int) -> None:
        # Re-seeded every time, so evaluations differ only through the policy; the torch RNG is forked so
        # that evaluating (every eval.every frames, or never) leaves training unchanged.
        eval_env.set_seed(cfg.seed + 10_000)
        with torch.random.fork_rng():
            value = evaluate(eval_env, actor, max_steps=horizon, deterministic=cfg.eval.deterministic).mean().item()
        curve.append((frames_now, value))
        logger.log_scalar("eval_return", value, step=frames_now)

    # --- training: one exact OT update per batch --------------------------------------------
    history: list[dict] = []
    frames = 0
    if cfg.eval.every:
        log_eval(0)  # the uniform initial policy: the curve's first point
    pbar = tqdm(total=cfg.total_frames, disable=not cfg.progress, desc=f"{cfg.algo.name} {cfg.env.name}")
    for it, batch in enumerate(collector):
        frames += batch.numel()
        finished = batch["next", "done"].squeeze(-1)
        episode_return = batch["next", "episode_reward"].squeeze(-1)[finished].double()

        if cfg.estimator.get("bonus_anneal", False):
            # Explore early, exploit late: the bonus falls linearly to 0 at the last update (as the network
            # recipe's learning rate), so the final policy is greedy in the estimates rather than in the bonus.
            critic.bonus = cfg.estimator.bonus * max(0.0, 1.0 - frames / cfg.total_frames)
        critic.update(batch, policy.probs)
        advantage = critic.advantage(policy.probs)
        if cfg.state_weight == "discounted":
            rho = visitation_weights(batch, n_states, cfg.gamma)
        else:
            rho = visitation_weights(batch, n_states, 1.0)
        new_probs, sol = tabular_ot_update(policy.probs, advantage, rho, cost, cfg.epsilon,
                                           split=cfg.algo.split)
        audited = audit_transport(policy.probs, new_probs, rho, cost)
        policy.probs.copy_(new_probs)

        row = {
            "iteration": it,
            "frames": frames,
            "train_return": episode_return.mean().item() if episode_return.numel() else float("nan"),
            "episodes": int(finished.sum()),
            "multiplier": sol.multiplier.item(),
            "split": sol.split.item(),
            "dual_transport": sol.transport.item() if cfg.algo.split else float("nan"),
            "audited_transport": audited,
            "epsilon": float(cfg.epsilon),
            "bonus": critic.bonus,
            "violation": float(audited > cfg.epsilon * (1 + VIOLATION_RTOL)),
        }
        history.append(row)
        for key, value in row.items():
            if key != "frames" and not (isinstance(value, float) and math.isnan(value)):
                logger.log_scalar(key, value, step=frames)
        # The last batch's evaluation is the final one below.
        if cfg.eval.every and frames < cfg.total_frames and \
                frames // cfg.eval.every > (frames - batch.numel()) // cfg.eval.every:
            log_eval(frames)
        pbar.update(batch.numel())
        pbar.set_postfix(ret=f"{row['train_return']:.1f}", lam=f"{row['multiplier']:.3g}",
                         tv=f"{audited:.3g}")
    pbar.close()
    collector.shutdown()
    train_time = time.perf_counter() - start

    # --- final evaluation ------------------------------------------------------------------
    eval_env.set_seed(cfg.seed + 10_000)
    greedy = evaluate(eval_env, actor, max_steps=horizon, deterministic=True)
    sampled = evaluate(eval_env, actor, max_steps=horizon, deterministic=False)
    final = greedy if cfg.eval.deterministic else sampled
    curve.append((frames, final.mean().item()))  # the curve ends on the final evaluation
    logger.log_scalar("eval_return", curve[-1][1], step=frames)
    torch.save({"probs": policy.probs, "q": critic.q, "config": OmegaConf.to_container(cfg)},
               run_dir / "policy.pt")

    # Where the env has a transition table, the final policy's expected return exactly, and the optimum.
    exact = {}
    if hasattr(gym.make(cfg.env.name, **env_kwargs).unwrapped, "P"):
        acted = (torch.nn.functional.one_hot(policy.probs.argmax(-1), n_actions).double()
                 if cfg.eval.deterministic else policy.probs)
        exact = {"final_return_exact": exact_return(cfg.env.name, env_kwargs, acted, horizon=horizon),
                 "optimal_return": exact_return(cfg.env.name, env_kwargs, horizon=horizon)}
    violations = [r["violation"] for r in history]
    finished_returns = [r["train_return"] for r in history if not math.isnan(r["train_return"])]
    summary = {
        "env": cfg.env.name,
        "algo": cfg.algo.name,
        "seed": cfg.seed,
        "epsilon": float(cfg.epsilon),
        "cost": cfg.cost._target_.rsplit(".", 1)[-1],
        "estimator": cfg.estimator.name,
        "final_return": final.mean().item(),
        "final_return_std": final.std().item(),
        "final_return_greedy": greedy.mean().item(),
        "final_return_sampled": sampled.mean().item(),
        "eval_episodes": int(final.numel()),
        **exact,
        "violation_rate": sum(violations) / max(len(violations), 1),
        # Learning speed: the mean return of training episodes over the whole run.
        "mean_train_return": statistics.fmean(finished_returns) if finished_returns else float("nan"),
        "max_audited_transport": max((r["audited_transport"] for r in history), default=0.0),
        "updates": len(history),
        "frames": frames,
        "wall_time_s": time.perf_counter() - start,
        "train_time_s": train_time,
        "frames_per_s": frames / train_time,
    }
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))

    # --- learning curve and trust-region audit ---------------------------------------------
    fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(10, 3.6))
    x = [r["frames"] for r in history]
    ax0.plot(x, [r["train_return"] for r in history], label="training episodes")
    ax0.plot(*zip(*curve, strict=True), marker="o", ms=3, label=f"evaluation ({cfg.eval.episodes} episodes)")
    ax0.set(xlabel="frames", ylabel="return", title=f"{cfg.algo.name} on {cfg.env.name}")
    ax0.legend()
    ax1.plot(x, [r["audited_transport"] for r in history], label="audited transport (exact OT)")
    ax1.axhline(cfg.epsilon, color="r", ls="--", lw=1, label="epsilon")
    ax1.set(xlabel="frames", ylabel="sum_s rho(s) C(pi, pi_new)", title="trust region")
    ax1.legend()
    fig.tight_layout()
    fig.savefig(run_dir / "curve.png", dpi=100)
    plt.close(fig)

    print(json.dumps(summary, indent=2))
    print(f"run directory: {run_dir}  (summary.json, curve.png, logs/)")
    return summary


if __name__ == "__main__":
    main()
