"""The training recipe's config checks (``recipes/conf/train``) and the process-wide settings of a run, both
before anything is built."""

from __future__ import annotations

import importlib.util
import math
import random
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from torchrl_ot.training.algorithms import algorithm_class
from torchrl_ot.training.collection import check_collector_config
from torchrl_ot.training.compiled import COMPILABLE_ALGOS
from torchrl_ot.training.env import check_env_name
from torchrl_ot.training.optim import GRAD_CLIPS, OPTIMIZERS

POSITIVE_INTS = ("total_frames", "frames_per_batch", "num_envs", "num_epochs", "num_minibatches", "eval_every",
                 "eval_episodes", "checkpoint_every", "num_collectors", "num_threads")
#: Finite numbers > 0 (a negative clip norm would flip the gradients' sign without an error from torch).
POSITIVE_FLOATS = ("lr", "adam_eps", "max_grad_norm")

#: ``reward_scaling.mode``: what the running std of the returns divides (``rewards``: SB3's; ``value_targets``:
#: Tianshou's).
REWARD_SCALING_MODES = ("rewards", "value_targets")

#: The algorithms whose epochs may recompute the advantages (``recompute_advantage``).
RECOMPUTE_ALGOS = ("ppo", "a2c")

#: ``logger.backend``: what :func:`torchrl.record.loggers.get_logger` builds.
LOGGER_BACKENDS = ("csv", "tensorboard", "wandb")

#: ``state_weight`` of the tabular recipe: the weights rho of its update (discounted visits, or plain counts).
STATE_WEIGHTS = ("discounted", "uniform")

#: What a finished or checkpointed run leaves in its directory: a new run there must not overwrite it silently.
RUN_FILES = ("summary.json", "checkpoint.pt", "policy.pt")


def epochs_and_minibatches(cfg: DictConfig) -> tuple[int, int]:
    """``(num_epochs, num_minibatches)`` per batch: the run's, unless the algo config fixes them
    (A2C is one gradient step on the whole batch: 1 and 1)."""
    return cfg.algo.get("num_epochs") or cfg.num_epochs, cfg.algo.get("num_minibatches") or cfg.num_minibatches


def check_config(cfg: DictConfig) -> None:
    """Refuse a bad config with a ``ValueError`` naming the key: the algorithm's own keys, the counts,
    the batch's divisibility into minibatches and env copies, and the env's name."""
    algorithm_class(cfg.algo.name).check_config(cfg)
    check_positive_ints(cfg, POSITIVE_INTS)
    check_positive_floats(cfg, POSITIVE_FLOATS)
    gamma = cfg.env.gamma
    if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not 0 < gamma <= 1:
        raise ValueError(f"env.gamma must be a number in (0, 1], got {gamma!r}")
    check_choice(cfg, "logger.backend", LOGGER_BACKENDS)
    for key in ("resume", "overwrite"):
        if not isinstance(cfg.get(key, False), bool):
            raise ValueError(f"{key} must be true or false, got {cfg.get(key)!r}")
    _, num_minibatches = epochs_and_minibatches(cfg)
    if cfg.frames_per_batch % num_minibatches or cfg.frames_per_batch % (cfg.num_envs * cfg.num_collectors):
        raise ValueError(f"frames_per_batch={cfg.frames_per_batch} must be divisible by num_minibatches="
                         f"{num_minibatches} and by num_envs x num_collectors={cfg.num_envs * cfg.num_collectors}")
    choices = {"optimizer": OPTIMIZERS, "action_bound": ("tanh", "clip"),
               "reward_scaling.mode": REWARD_SCALING_MODES, "grad_clip": GRAD_CLIPS}
    for key, allowed in choices.items():
        check_choice(cfg, key, allowed)
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
    compile_ = cfg.get("compile", False)
    if not isinstance(compile_, bool):
        raise ValueError(f"compile must be true or false, got {compile_!r}")
    if compile_ and cfg.algo.name not in COMPILABLE_ALGOS:
        raise ValueError(f"compile=true applies to algo in {COMPILABLE_ALGOS}, not to algo={cfg.algo.name!r}: its "
                         "step updates the loss's own state between minibatches (use compile=false)")
    check_collector_config(cfg)
    check_device(cfg.get("device", "cpu"))
    check_env_name(cfg.env.name)


def check_device(device: object) -> torch.device:
    """``device`` as a ``torch.device``: ``cpu``, or ``cuda`` / ``cuda:N`` where torch sees that GPU; anything
    else raises a ``ValueError`` naming the option.

    >>> check_device("cpu")
    device(type='cpu')
    >>> check_device("tpu")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: device must be 'cpu', 'cuda' or 'cuda:N', got 'tpu'
    """
    try:
        parsed = torch.device(device) if isinstance(device, str) else None
    except RuntimeError:
        parsed = None
    if parsed is None or parsed.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu', 'cuda' or 'cuda:N', got {device!r}")
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device={device!r} asked, but torch sees no CUDA device on this machine "
                             f"(torch {torch.__version__}, torch.cuda.is_available() is False): use device=cpu")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise ValueError(f"device={device!r}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                             f"indices 0-{torch.cuda.device_count() - 1}")
    return parsed


def check_tabular_config(cfg: DictConfig) -> None:
    """The tabular recipe's (``recipes/conf/tabular``) counts, radius, discount, state weights, logger and
    evaluation schedule, refused with a ``ValueError`` naming the key; then the env's name."""
    check_positive_ints(cfg, ("total_frames", "frames_per_batch", "env.num_envs", "eval.episodes"))
    if cfg.frames_per_batch % cfg.env.num_envs:
        raise ValueError(f"frames_per_batch={cfg.frames_per_batch} must be divisible by env.num_envs="
                         f"{cfg.env.num_envs} (each copy collects the same number of steps)")
    eps = cfg.epsilon
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not (eps > 0 and math.isfinite(eps)):
        raise ValueError(f"epsilon must be a positive finite number, got {eps!r}")
    gamma = cfg.gamma
    if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not 0 <= gamma < 1:
        raise ValueError(f"gamma must be a number in [0, 1) (the tabular critic solves the discounted values), "
                         f"got {gamma!r}")
    every = cfg.eval.every
    if isinstance(every, bool) or not (isinstance(every, int) and every >= 0):
        raise ValueError(f"eval.every must be an integer >= 0 (0: final evaluation only), got {every!r}")
    limit = cfg.env.max_episode_steps
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"env.max_episode_steps must be null or a positive integer, got {limit!r}")
    check_choice(cfg, "state_weight", STATE_WEIGHTS)
    bonus = cfg.estimator.get("bonus", 0.0)
    if isinstance(bonus, bool) or not isinstance(bonus, (int, float)) or not (bonus >= 0 and math.isfinite(bonus)):
        raise ValueError(f"estimator.bonus must be a finite number >= 0 (0: no exploration bonus), got {bonus!r}")
    if not isinstance(cfg.estimator.get("bonus_anneal", False), bool):
        raise ValueError(f"estimator.bonus_anneal must be true or false, got {cfg.estimator.get('bonus_anneal')!r}")
    if bonus > 0 and cfg.estimator.name != "td":
        raise ValueError(f"estimator.bonus={bonus} needs estimator=td (its stored counts); with "
                         f"estimator={cfg.estimator.name} pass estimator.bonus=0")
    check_choice(cfg, "logger.backend", LOGGER_BACKENDS)
    if not isinstance(cfg.get("overwrite", False), bool):
        raise ValueError(f"overwrite must be true or false, got {cfg.get('overwrite')!r}")
    check_env_name(cfg.env.name)


def check_positive_ints(cfg: DictConfig, keys: Sequence[str]) -> None:
    """Refuse any of ``keys`` (dotted) that is not an integer >= 1 (a bool is not one)."""
    for key in keys:
        value = OmegaConf.select(cfg, key)
        if isinstance(value, bool) or not (isinstance(value, int) and value >= 1):
            raise ValueError(f"{key} must be a positive integer, got {value!r}")


def check_positive_floats(cfg: DictConfig, keys: Sequence[str]) -> None:
    """Refuse any of ``keys`` (dotted) that is not a finite number > 0 (a bool is not one)."""
    for key in keys:
        value = OmegaConf.select(cfg, key)
        if isinstance(value, bool) or not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
            raise ValueError(f"{key} must be a finite number > 0, got {value!r}")


def check_choice(cfg: DictConfig, key: str, allowed: Sequence[str]) -> None:
    """Refuse ``key`` (dotted) unless its value is one of ``allowed``."""
    if OmegaConf.select(cfg, key) not in allowed:
        raise ValueError(f"{key} must be one of {tuple(allowed)}, got {OmegaConf.select(cfg, key)!r}")


def check_run_dir(run_dir: Path, *, resume: bool, overwrite: bool) -> bool:
    """Refuse to start a new run over an earlier one: ``run_dir`` holding a finished or checkpointed run
    (:data:`RUN_FILES`) or its curves (``logs/scalars/*.csv`` with rows) raises a ``ValueError``, unless
    ``resume`` (continue it, where the recipe can) or ``overwrite`` (discard it) is set. Returns whether an
    earlier run is there.

    >>> import tempfile
    >>> with tempfile.TemporaryDirectory() as d:
    ...     (Path(d) / "summary.json").write_text("{}")
    ...     check_run_dir(Path(d), resume=False, overwrite=False)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: hydra.run.dir=... already holds a run (summary.json); pass resume=true to continue it, ...
    """
    found = [name for name in RUN_FILES if (run_dir / name).exists()]
    scalars = run_dir / "logs" / "scalars"
    if scalars.is_dir() and any(f.stat().st_size for f in scalars.glob("*.csv")):
        found.append("logs/scalars/*.csv")
    if found and not (resume or overwrite):
        raise ValueError(f"hydra.run.dir={str(run_dir)!r} already holds a run ({', '.join(found)}); pass "
                         "resume=true to continue it, overwrite=true to discard it and start over, or choose "
                         "another hydra.run.dir")
    return bool(found)


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
