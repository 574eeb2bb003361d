"""Deep OT-TRPO (or a baseline: PPO, A2C, TRPO, WPO) on any gymnasium env with flat Box or Discrete
observations (the latter seen one-hot), from the builders of :mod:`torchrl_ot.training`.

Per collected batch: advantages (GAE by default), the algorithm's step before the epochs (OT-TRPO:
the exact lambda* of the dual, eq. 12, solved ONCE; TRPO: its natural-gradient actor step),
``num_epochs`` x ``num_minibatches`` Adam steps, and its step after them (OT-TRPO: the projection
into the trust region). Everything else (collector, batch, networks, optimiser) is the same for
every ``algo``; the lines where they differ are marked ``# ALGO LOGIC``
(``torchrl_ot/training/algorithms.py``).

    python recipes/train.py                                     # CartPole-v1, OT-TRPO
    python recipes/train.py env=Pendulum-v1 algo=ppo seed=3
    python recipes/train.py env.name=MountainCar-v0 total_frames=300000 algo.epsilon=0.05
    python recipes/train.py env=Pendulum-v1 resume=true          # continue a killed run

Writes into the run directory (``runs/train/<env>/<algo>/seed<seed>``): the TorchRL logger's
scalars (CSV by default, ``logs/scalars/*.csv``), ``checkpoint.pt`` every ``checkpoint_every``
frames, ``summary.json`` and ``curve.png`` (deterministic evaluation return against frames).

Exact resume. The run is cut into *segments* at the checkpoint boundaries (multiples of
``checkpoint_every`` frames). Every segment builds a FRESH env and collector, seeded with
``seed + frames_done``, and ends with the checkpoint: networks, optimiser, observation statistics,
frames, evaluation history, per-update diagnostics and the RNG states of torch, numpy and python.
A resumed run restores all of that and enters the next segment exactly as the uninterrupted run
does; nothing carries over in an env or a collector, whose state could not be saved. So on CPU
with ``num_collectors=1`` a killed run resumed with ``resume=true`` ends with the same numbers, bit
for bit (tests/test_recipe_train.py). The price: an episode in flight at a boundary is cut (GAE
bootstraps it). With ``num_collectors > 1`` the workers update the shared statistics in a racy
order: a faithful continuation, not a bit-identical one.
"""

from __future__ import annotations

import functools
import json
import math
import statistics
import sys
import time
import warnings
from pathlib import Path

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from tensordict import TensorDictBase
from torchrl.data.tensor_specs import Categorical as CategoricalSpec
from torchrl.data.tensor_specs import OneHot as OneHotSpec
from tqdm import tqdm

from torchrl_ot.tabular import episode_limit
from torchrl_ot.training import (
    MinibatchStep,
    RayStatistics,
    ValueTargetScaling,
    check_config,
    check_device,
    check_run_dir,
    clip_gradients,
    epochs_and_minibatches,
    evaluate,
    load_checkpoint,
    make_algorithm,
    make_collector,
    make_env,
    make_logger,
    make_networks,
    make_optimizer,
    make_summary,
    minibatches,
    new_obs_stats,
    new_return_stats,
    plot_curve,
    prepare_process,
    resolve_policy,
    rng_state,
    save_checkpoint,
    scheduled_lr,
    set_rng_state,
    truncate_csv_logs,
)

# The minibatch step's outputs averaged over an update into its record (the others are per-batch constants).
STEP_MEANS = ("loss_objective", "loss_critic", "loss_entropy", "ot_active_fraction", "clip_fraction", "kl_approx",
              "entropy")


@hydra.main(config_path="conf/train", config_name="config", version_base=None)
def main(cfg: DictConfig) -> dict:
    check_config(cfg)  # before building anything
    num_epochs, num_minibatches = epochs_and_minibatches(cfg)
    fpb, mb_size = cfg.frames_per_batch, cfg.frames_per_batch // num_minibatches
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    ckpt_path = run_dir / "checkpoint.pt"
    # An earlier run there is continued (resume=true and its checkpoint), discarded (overwrite=true) or refused.
    check_run_dir(run_dir, resume=cfg.resume and ckpt_path.exists(), overwrite=cfg.overwrite)
    prepare_process(cfg)  # threads, seeds
    device = check_device(cfg.device)  # the learner's: networks, loss, batches (the envs stay on the CPU)
    on_ray = cfg.collector.backend == "ray"
    distributed = on_ray or cfg.num_collectors > 1  # the workers hold copies of the policy: send them its weights
    start = time.perf_counter()

    # --- networks, the algorithm (its loss and its steps around the epochs), optimiser ----------
    probe = make_env(cfg.env.name, cfg.seed, None, cfg, num_envs=1)
    discrete = isinstance(probe.action_spec_unbatched, (CategoricalSpec, OneHotSpec))
    if cfg.env.get("discrete") is not None and bool(cfg.env.discrete) != discrete:
        warnings.warn(f"env.discrete={cfg.env.discrete} (env group), but {cfg.env.name} has "
                      f"{'discrete' if discrete else 'continuous'} actions: using the env's action space", stacklevel=1)
    obs_dim = probe.observation_spec["observation"].shape[-1]
    horizon = episode_limit(cfg.env.name)
    policy = resolve_policy(cfg, discrete)
    actor, critic, head = make_networks(probe, cfg, policy)
    probe.close()
    algorithm = make_algorithm(cfg, policy, discrete, actor, critic, head)  # ALGO LOGIC
    loss_module = algorithm.loss_module.to(device)  # the actor, critic and head are its submodules
    params = list(loss_module.parameters())  # once: a module walk per step costs more than the clipping
    actor_ids = {id(p) for p in actor.parameters()}
    clip_groups = [params] if cfg.grad_clip == "global" else [  # grad_clip=per_network: actor, the rest
        [p for p in params if id(p) in actor_ids], [p for p in params if id(p) not in actor_ids]]
    if not all(clip_groups):  # the functional losses hold copies of the networks' parameters
        raise ValueError("grad_clip=per_network needs the actor's own parameters in the loss (loss_functional=false)")
    # The minibatch step's objective and diagnostics; compiled (compile=true), the next minibatch is drawn,
    # the loss summed and the diagnostics stacked inside its graph.
    step = MinibatchStep(loss_module, objective=algorithm.minibatch_loss, means=STEP_MEANS, compile=cfg.compile)
    optim = make_optimizer(params, cfg)
    obs_stats = new_obs_stats(obs_dim) if cfg.obs_norm.enabled else None
    return_stats = new_return_stats() if cfg.reward_scaling.enabled else None
    # reward_scaling.mode: the env scales the rewards (SB3), or the value estimator the critic's targets (Tianshou).
    scaled_rewards = return_stats if cfg.reward_scaling.mode == "rewards" else None
    value_scaling = None
    if return_stats is not None and cfg.reward_scaling.mode == "value_targets":
        return_stats = return_stats.to(device)  # the learner's alone (no env reads it)
        value_scaling = ValueTargetScaling(return_stats, eps=cfg.reward_scaling.eps)
        value_scaling.attach(loss_module.value_estimator)

    def estimate_advantages(batch: TensorDictBase) -> None:
        with torch.no_grad():
            if value_scaling is None:
                loss_module.value_estimator(batch)
            else:
                value_scaling.estimate(loss_module.value_estimator, batch)
    for stats in (obs_stats, return_stats):
        if stats is not None and cfg.num_collectors > 1 and not on_ray:
            stats.share_memory_()  # the worker processes update these very tensors

    # --- resume -----------------------------------------------------------------------------------
    frames, train_time, wall_before, history, updates = 0, 0.0, 0.0, [], []
    if cfg.resume and ckpt_path.exists():
        ckpt = load_checkpoint(ckpt_path, cfg)
        actor.load_state_dict(ckpt["actor"])
        critic.load_state_dict(ckpt["critic"])
        if head is not None:
            head.load_state_dict(ckpt["advantage"])
        optim.load_state_dict(ckpt["optimizer"])
        algorithm.load_state_dict(ckpt.get("algorithm") or {})  # WNPG's adaptive damping; {} for most
        if obs_stats is not None:
            obs_stats.update_(ckpt["obs_stats"])
        if return_stats is not None:
            return_stats.update_(ckpt["return_stats"])
        frames, train_time, history, updates = ckpt["frames"], ckpt["train_time"], ckpt["history"], ckpt["updates"]
        wall_before = ckpt["wall_time_s"]  # wall time of the killed run up to its checkpoint
        set_rng_state(ckpt["rng"])
        if cfg.logger.backend == "csv":
            truncate_csv_logs(run_dir / "logs", frames)
        print(f"resumed from {ckpt_path} at {frames} frames")
    elif cfg.resume:
        print(f"resume=true but no checkpoint at {ckpt_path}: starting from scratch")
    if frames == 0 and cfg.logger.backend == "csv":
        # overwrite=true in a used run directory: TorchRL's CSV logger appends, so the earlier run's rows
        # would otherwise precede this run's in every curve.
        truncate_csv_logs(run_dir / "logs", -1)
    logger = make_logger(cfg, run_dir)

    def log_and_record_eval(frames_now: int) -> None:
        returns = evaluate(actor, cfg, obs_stats, horizon, device=device)
        history.append({"frames": frames_now, "return": statistics.fmean(returns),
                        "return_std": statistics.pstdev(returns), "returns": returns})
        logger.log_scalar("eval_return", history[-1]["return"], step=frames_now)

    if not history:
        log_and_record_eval(0)  # the untrained policy: the curve's first point

    # --- training: segments between checkpoints, each with a fresh env + collector ------------
    total_batches = math.ceil(cfg.total_frames / fpb)
    total_frames = total_batches * fpb
    pbar = tqdm(total=total_frames, initial=frames, disable=not cfg.progress, desc=f"{cfg.algo.name} {cfg.env.name}")
    while frames < total_frames:
        seg_start = time.perf_counter()
        seg_end = min(total_frames, (frames // cfg.checkpoint_every + 1) * cfg.checkpoint_every)
        seg_batches = math.ceil((seg_end - frames) / fpb)
        segment_seed = cfg.seed + frames  # deterministic in (seed, frames done): see the module docstring
        env_fns = [functools.partial(make_env, cfg.env.name, segment_seed + 1000 * i, cfg=cfg, num_envs=cfg.num_envs)
                   for i in range(cfg.num_collectors)]
        collector = make_collector(env_fns, actor, cfg, frames_per_batch=fpb, total_frames=seg_batches * fpb,
                                   device=device, env_kwargs={"obs_stats": obs_stats, "return_stats": scaled_rewards})
        if on_ray:  # Ray's workers keep copies of the statistics: merged into ours after every batch
            probe = make_env(cfg.env.name, segment_seed, None if obs_stats is None else obs_stats.clone(), cfg,
                             num_envs=1, return_stats=None if scaled_rewards is None else scaled_rewards.clone())
            stats_sync = RayStatistics(collector, probe, obs_stats=obs_stats, return_stats=scaled_rewards)
            probe.close()
        eval_time = 0.0
        for batch in collector:
            if on_ray:
                batch = batch.flatten(0, 1)  # [workers, num_envs, T] -> [workers x num_envs, T]
                stats_sync.sync()
            update_start = time.perf_counter()  # the update's own time, apart from collection (throughput)
            frames += batch.numel()
            done = batch["next", "done"].squeeze(-1)
            episode_returns = batch["next", "episode_reward"].squeeze(-1)[done]
            if cfg.anneal_lr:
                for group in optim.param_groups:
                    group["lr"] = scheduled_lr(cfg, len(updates), total_batches)

            estimate_advantages(batch)  # once per batch (CleanRL style; see recompute_advantage), every algo
            phase_start = {"advantage": update_start, "solve": time.perf_counter()}
            row = {"frames": frames, "train_return": episode_returns.mean().item() if done.any() else float("nan"),
                   "episodes": int(done.sum())}
            algorithm.before_epochs(batch, row)  # ALGO LOGIC: OT's lambda*, TRPO's actor step

            phase_start["epochs"] = time.perf_counter()
            rb = minibatches(batch, mb_size)
            means_sum, grad_norm_sum = 0.0, 0.0  # the step's diagnostics, one vector (step.keys) and the norm
            for epoch in range(num_epochs):
                if epoch and cfg.recompute_advantage:  # with the critic trained so far (TorchRL's ppo_mujoco.py)
                    estimate_advantages(batch)
                    rb.refresh(batch)
                for _ in range(num_minibatches):
                    # ALGO LOGIC in algorithm.minibatch_loss: TRPO trains only the critic here. Non-finite: raises.
                    loss, means = step(rb)
                    optim.zero_grad()
                    loss.backward()
                    grad_norm_sum = grad_norm_sum + clip_gradients(clip_groups, cfg.max_grad_norm)
                    optim.step()
                    means_sum = means_sum + means
            n_steps = num_epochs * num_minibatches
            row.update({k: float(v) / n_steps for k, v in zip(step.keys, means_sum.tolist(), strict=True)})
            row["grad_norm"] = float(grad_norm_sum) / n_steps
            row["lr"] = optim.param_groups[0]["lr"]
            phase_start["project"] = time.perf_counter()
            algorithm.after_epochs(batch, row)  # ALGO LOGIC: OT's projection into the radius, the std schedule
            row["update_time_s"] = time.perf_counter() - update_start
            # Where the update's time goes (throughput.py's breakdown): GAE; before_epochs; the minibatch
            # epochs; after_epochs and the bookkeeping.
            ends = [*list(phase_start.values())[1:], update_start + row["update_time_s"]]
            row.update({f"time_{phase}_s": end - begin
                        for (phase, begin), end in zip(phase_start.items(), ends, strict=True)})
            updates.append(row)
            if distributed:
                collector.update_policy_weights_()
            for key, value in row.items():
                if key != "frames" and not math.isnan(value):
                    logger.log_scalar(key, value, step=frames)

            if frames // cfg.eval_every > (frames - batch.numel()) // cfg.eval_every or frames >= total_frames:
                t0 = time.perf_counter()
                log_and_record_eval(frames)
                eval_time += time.perf_counter() - t0
            pbar.update(batch.numel())
            pbar.set_postfix(ret=f"{row['train_return']:.1f}", eval=f"{history[-1]['return']:.1f}",
                             **algorithm.progress(row))
        collector.shutdown()
        train_time += time.perf_counter() - seg_start - eval_time

        save_checkpoint(ckpt_path, {
            "actor": actor.state_dict(), "critic": critic.state_dict(),
            "advantage": None if head is None else head.state_dict(), "optimizer": optim.state_dict(),
            "algorithm": algorithm.state_dict(), "obs_stats": None if obs_stats is None else obs_stats.clone(),
            "return_stats": None if return_stats is None else return_stats.clone(), "frames": frames,
            "next_segment_seed": cfg.seed + frames, "train_time": train_time,
            "wall_time_s": wall_before + time.perf_counter() - start, "history": history,
            "updates": updates, "rng": rng_state(), "config": OmegaConf.to_container(cfg, resolve=True)})
        if cfg.stop_after_frames is not None and frames >= cfg.stop_after_frames and frames < total_frames:
            pbar.close()
            print(f"stop_after_frames={cfg.stop_after_frames}: stopping after the checkpoint at {frames} frames, "
                  f"as if killed; continue with resume=true")
            sys.exit(0)
    pbar.close()

    # --- summary and learning curve ----------------------------------------------------------
    summary = make_summary(cfg, algorithm, history, updates, frames=frames, train_time_s=train_time,
                           wall_time_s=wall_before + time.perf_counter() - start)
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    plot_curve(history, run_dir / "curve.png", title=f"{cfg.algo.name} on {cfg.env.name} (seed {cfg.seed})",
               label=f"deterministic policy ({cfg.eval_episodes} episodes)")
    print(json.dumps(summary, indent=2))
    print(f"run directory: {run_dir}  (summary.json, curve.png, checkpoint.pt, logs/)")
    return summary


if __name__ == "__main__":
    main()
