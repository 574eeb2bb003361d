"""What makes a training run resumable exactly: the RNG states, atomic checkpoints, and CSV logs cut
back to the checkpoint."""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf


def rng_state() -> dict[str, Any]:
    """The states of torch's, numpy's and python's global RNGs (restore with :func:`set_rng_state`)."""
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` returned.

    >>> state = rng_state()
    >>> draw = torch.rand(2)
    >>> set_rng_state(state)
    >>> torch.equal(draw, torch.rand(2))
    True
    """
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Write atomically (temporary file, then rename): a kill mid-write leaves the previous checkpoint."""
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: Path, cfg: DictConfig) -> dict[str, Any]:
    """The checkpoint at ``path``, refusing (``ValueError``) a file that cannot be read as one (truncated, corrupt)
    and one of another env, algorithm or ``frames_per_batch`` than ``cfg``'s (its ``"config"`` entry is the run's
    resolved config)."""
    try:
        ckpt = torch.load(path, weights_only=False)  # our own file: numpy and python RNG states, the history
        saved = ckpt["config"]
    except Exception as err:  # truncated, corrupt or not ours: say so, and leave the file as it is
        raise ValueError(f"resume=true: {path} cannot be read as a checkpoint of this recipe ({type(err).__name__}: "
                         f"{str(err)[:200]}); it is left untouched. Pass overwrite=true instead of resume=true to "
                         "discard it and start over, or choose another hydra.run.dir") from err
    if (saved["env"]["name"], saved["algo"]["name"], saved["frames_per_batch"]) != (
            cfg.env.name, cfg.algo.name, cfg.frames_per_batch):
        raise ValueError(f"{path} is a {saved['env']['name']}/{saved['algo']['name']} run with "
                         f"frames_per_batch={saved['frames_per_batch']}; refusing to resume it as "
                         f"{cfg.env.name}/{cfg.algo.name} with frames_per_batch={cfg.frames_per_batch}")
    kwargs = OmegaConf.to_container(cfg.env.kwargs) if "kwargs" in cfg.env else {}
    if saved["env"].get("kwargs", {}) != kwargs:
        raise ValueError(f"{path} is a run with env.kwargs={saved['env'].get('kwargs', {})}; refusing to resume it "
                         f"with env.kwargs={kwargs}")
    return ckpt


def truncate_csv_logs(log_dir: Path, frames: int) -> None:
    """Drop CSV rows logged after ``frames``: on resume the killed run's lost tail, so that each step
    appears once; with ``frames=-1`` every row (a fresh run in a used directory)."""
    for csv_file in (log_dir / "scalars").glob("*.csv") if (log_dir / "scalars").is_dir() else []:
        rows = [r for r in csv_file.read_text().splitlines() if r and float(r.split(",")[0]) <= frames]
        csv_file.write_text("".join(r + "\n" for r in rows))
