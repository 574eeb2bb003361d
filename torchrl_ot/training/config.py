"""The training recipe's config checks (``recipes/conf/train``) and the process-wide settings of a run, both
before anything is built."""

from __future__ import annotations

import importlib.util
import random
import sys

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from torchrl_ot.training.algorithms import algorithm_class
from torchrl_ot.training.env import check_env_name
from torchrl_ot.training.optim import OPTIMIZERS

POSITIVE_INTS = ("total_frames", "frames_per_batch", "num_envs", "num_epochs", "num_minibatches", "eval_every",
                 "eval_episodes", "checkpoint_every", "num_collectors", "num_threads")

#: ``reward_scaling.mode``: what the running std of the returns divides (``rewards``: SB3's; ``value_targets``:
#: Tianshou's).
REWARD_SCALING_MODES = ("rewards", "value_targets")

#: The algorithms whose epochs may recompute the advantages (``recompute_advantage``).
RECOMPUTE_ALGOS = ("ppo", "a2c")


def epochs_and_minibatches(cfg: DictConfig) -> tuple[int, int]:
    """``(num_epochs, num_minibatches)`` per batch: the run's, unless the algo config fixes them
    (A2C is one gradient step on the whole batch: 1 and 1)."""
    return cfg.algo.get("num_epochs") or cfg.num_epochs, cfg.algo.get("num_minibatches") or cfg.num_minibatches


def check_config(cfg: DictConfig) -> None:
    """Refuse a bad config with a ``ValueError`` naming the key: the algorithm's own keys, the counts,
    the batch's divisibility into minibatches and env copies, and the env's name."""
    algorithm_class(cfg.algo.name).check_config(cfg)
    for key in POSITIVE_INTS:
        if not (isinstance(cfg[key], int) and cfg[key] >= 1):
            raise ValueError(f"{key} must be a positive integer, got {cfg[key]!r}")
    _, num_minibatches = epochs_and_minibatches(cfg)
    if cfg.frames_per_batch % num_minibatches or cfg.frames_per_batch % (cfg.num_envs * cfg.num_collectors):
        raise ValueError(f"frames_per_batch={cfg.frames_per_batch} must be divisible by num_minibatches="
                         f"{num_minibatches} and by num_envs x num_collectors={cfg.num_envs * cfg.num_collectors}")
    choices = {"optimizer": OPTIMIZERS, "action_bound": ("tanh", "clip"),
               "reward_scaling.mode": REWARD_SCALING_MODES}
    for key, allowed in choices.items():
        if OmegaConf.select(cfg, key) not in allowed:
            raise ValueError(f"{key} must be one of {allowed}, got {OmegaConf.select(cfg, key)!r}")
    anneal = cfg.get("lr_anneal_frames")
    if anneal is not None and (isinstance(anneal, bool) or not isinstance(anneal, int) or anneal < 1):
        raise ValueError(f"lr_anneal_frames must be null or a positive integer, got {anneal!r}")
    recompute = cfg.get("recompute_advantage", False)
    if not isinstance(recompute, bool):
        raise ValueError(f"recompute_advantage must be true or false, got {recompute!r}")
    if recompute and cfg.algo.name not in RECOMPUTE_ALGOS:
        raise ValueError(f"recompute_advantage=true applies to algo in {RECOMPUTE_ALGOS} (their minibatch steps read "
                         f"the advantages), not to algo={cfg.algo.name!r}: its step before the epochs uses the "
                         "batch's advantages as computed once")
    check_env_name(cfg.env.name)


def prepare_process(cfg: DictConfig) -> None:
    """Set what a run sets for its whole process: torch's intra-op threads, the seeds of torch, numpy and python,
    and, when pandas is not installed, record it as missing in ``sys.modules``.

    The last is for speed only: tensordict asks ``importlib.util.find_spec("pandas")`` for every tensor a module
    writes (``TensorDict.from_any``), a search of every ``sys.path`` entry each time when pandas is absent, several
    times per minibatch step and per env step. With the entry set to None the same question is answered from
    ``sys.modules`` at once, with the same answer: ``find_spec`` returns None and ``import pandas`` fails, as they
    did before. Nothing changes where pandas is installed.
    """
    torch.set_num_threads(cfg.num_threads)
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    random.seed(cfg.seed)
    record_missing_pandas()


def record_missing_pandas() -> None:
    """If pandas is not installed, say so in ``sys.modules`` (see :func:`prepare_process`)."""
    if "pandas" not in sys.modules and importlib.util.find_spec("pandas") is None:
        sys.modules["pandas"] = None
