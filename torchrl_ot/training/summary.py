"""What a training run reports: its scalar logger, the summary dict (``summary.json``) and the
learning curve (``curve.png``).

A run keeps two lists: ``history``, one entry per evaluation (``frames``, ``return``, ``return_std``,
``returns``), and ``updates``, one row per update (``frames``, the diagnostics the losses and the
:class:`~torchrl_ot.training.Algorithm` hooks add, ``update_time_s`` and ``time_<phase>_s``).
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from omegaconf import DictConfig, OmegaConf
from torchrl.record.loggers import Logger, get_logger

from torchrl_ot.training.algorithms import Algorithm

PHASES = ("advantage", "solve", "epochs", "project")  # an update's parts, timed (summary: update_time_breakdown_s)


def make_logger(cfg: DictConfig, run_dir: Path) -> Logger:
    """TorchRL's logger ``cfg.logger.backend`` (csv: ``run_dir/logs/scalars/*.csv``)."""
    try:
        return get_logger(cfg.logger.backend, logger_name=str(run_dir), experiment_name="logs",
                          wandb_kwargs={"project": cfg.logger.project,
                                        "config": OmegaConf.to_container(cfg, resolve=True)})
    except ImportError as err:
        raise ImportError(f"logger={cfg.logger.backend} needs its package: {err}; "
                          f"pip install {cfg.logger.backend}, or use logger=csv") from err


def make_summary(cfg: DictConfig, algorithm: Algorithm, history: list[dict[str, Any]],
                 updates: list[dict[str, float]], *, frames: int, wall_time_s: float,
                 train_time_s: float) -> dict[str, Any]:
    """The run's summary: config, final/initial/best evaluation return, speeds, and the trust region's
    statistics over the updates (None for the algorithms without one)."""
    final = history[-1]
    ratios = [u["transport_over_epsilon"] for u in updates if "transport_over_epsilon" in u]
    realised = [u["realised_transport_over_epsilon"] for u in updates if "realised_transport_over_epsilon" in u]
    own = algorithm.summary()
    return {
        "env": cfg.env.name,
        "algo": cfg.algo.name,
        "policy": algorithm.policy,
        "cost": own["cost"],
        "cost_fn": own["cost_fn"],
        "estimator": cfg.estimator.name,
        "seed": cfg.seed,
        "epsilon": own["epsilon"],
        "final_return": final["return"],
        "final_return_std": final["return_std"],
        "initial_return": history[0]["return"],
        "best_return": max(h["return"] for h in history),
        "eval_episodes": cfg.eval_episodes,
        "frames": frames,
        "updates": len(updates),
        "wall_time_s": wall_time_s,  # summed over a killed run and its resumption
        "train_time_s": train_time_s,
        "frames_per_s": frames / train_time_s,
        # Advantages, lambda* and the epochs only: collection's cost depends on episode lengths (resets),
        # so it differs between algorithms that learn at different speeds on the same env.
        # (None when resumed from a checkpoint written before this was recorded.)
        "update_frames_per_s": (frames / sum(u["update_time_s"] for u in updates)
                                if all("update_time_s" in u for u in updates) else None),
        "update_time_breakdown_s": ({phase: sum(u[f"time_{phase}_s"] for u in updates) for phase in PHASES}
                                    if all("time_epochs_s" in u for u in updates) else None),
        # Episodes that ended in the training batches: each end costs a reset through the env's transforms,
        # so collection's frames/s falls with it (short episodes early in learning).
        "train_episodes": (sum(u["episodes"] for u in updates) if all("episodes" in u for u in updates) else None),
        "mean_transport_over_epsilon": statistics.fmean(ratios) if ratios else None,
        # The fitted network's own transport (Problem (P)'s constraint; exact for categorical policies, an
        # upper bound for Gaussian ones): the share of updates that provably stayed inside the radius.
        "mean_realised_transport_over_epsilon": statistics.fmean(realised) if realised else None,
        "max_realised_transport_over_epsilon": max(realised) if realised else None,
        "realised_within_epsilon_fraction": (statistics.fmean(r <= 1 + 1e-6 for r in realised)
                                             if realised else None),
        "mean_multiplier": statistics.fmean(u["multiplier"] for u in updates) if ratios else None,
        "resumed": bool(cfg.resume),
    }


def plot_curve(history: list[dict[str, Any]], path: Path, *, title: str, label: str) -> None:
    """The evaluation return (mean +- std over the episodes) against frames, as a PNG at ``path``."""
    # A bare Figure, not pyplot: no GUI backend, and nothing global changed for the caller.
    fig = Figure(figsize=(6, 3.6))
    ax = fig.subplots()
    x = [h["frames"] for h in history]
    y = np.array([h["return"] for h in history])
    s = np.array([h["return_std"] for h in history])
    ax.plot(x, y, marker="o", ms=3, label=label)
    ax.fill_between(x, y - s, y + s, alpha=0.2)
    ax.set(xlabel="frames", ylabel="return", title=title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
