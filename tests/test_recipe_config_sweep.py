"""Both recipes refuse bad configurations with a clear error before any work, and never overwrite a saved run.

The config cases compose the recipe's config with Hydra's compose API and run what the recipe runs on it before
building anything (its config check, then the env), checking that the message names the key; one case per recipe,
and the run-directory cases, run the recipe as a user does (a subprocess with Hydra overrides, tiny budgets) and
check the exit status, the message and that nothing was written. The input classes and their outcomes:

=====================================================  =================================================  ========
input                                                  ``recipes/train.py``                               tabular
=====================================================  =================================================  ========
``total_frames`` 0 or negative, ``num_envs=0``,        ValueError naming the key                          same
``eval_episodes=0`` (tabular: ``env.num_envs``,
``eval.episodes``)
``gamma`` outside (0, 1] (tabular: [0, 1)), or a bool  ValueError naming ``env.gamma``                    same
a batch that does not divide into minibatches / copies ValueError naming both counts                      same
an unknown logger backend, state weight, estimator     ValueError naming the key; an unknown config       same
                                                       group option: Hydra's error listing the options
Tuple, Dict or MultiDiscrete spaces; Box for tabular   ValueError naming ``env.name`` and the space       same
an ``env.kwargs`` key the env's constructor does not   ValueError naming ``env.kwargs.<key>`` and the     same
take, or a value it refuses                            accepted keys (or the constructor's error)
a run directory that cannot be created                 Hydra's error naming the path, nothing written     same
a truncated ``checkpoint.pt`` with ``resume=true``     ValueError naming the file, left untouched         (none)
a second run into a used directory                     ValueError: ``resume=true`` or ``overwrite=true``  same
=====================================================  =================================================  ========
"""

import json
import subprocess
import sys
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.errors import HydraException
from omegaconf import OmegaConf

from torchrl_ot import tabular
from torchrl_ot.training import check_config, check_run_dir, check_tabular_config, make_env

ROOT = Path(__file__).resolve().parents[1]
TRAIN, TABULAR = ROOT / "recipes" / "train.py", ROOT / "recipes" / "tabular.py"
TINY_TRAIN = ["total_frames=512", "frames_per_batch=256", "num_envs=4", "num_epochs=1", "num_minibatches=4",
              "eval_every=512", "eval_episodes=2", "checkpoint_every=256", "env=Pendulum-v1"]
TINY_TABULAR = ["total_frames=1024", "frames_per_batch=512", "env.num_envs=4", "eval.every=0", "eval.episodes=4"]


def _run(recipe: Path, *overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(recipe), "progress=false", *overrides], capture_output=True,
                          text=True, cwd=ROOT, timeout=300)


def _refused_in_process(recipe: Path, overrides: list[str], *names: str) -> None:
    """What the recipe does with its config before building anything (Hydra's composition, the recipe's config
    check, then its env), in this process: it must raise, naming every one of ``names``."""
    conf_dir = ROOT / "recipes" / "conf" / ("train" if recipe == TRAIN else "tabular")
    with pytest.raises((ValueError, HydraException)) as err:
        with initialize_config_dir(config_dir=str(conf_dir), version_base=None):
            cfg = compose(config_name="config", overrides=overrides)
        if recipe == TRAIN:
            check_config(cfg)
            make_env(cfg.env.name, cfg.seed, None, cfg, num_envs=1)
        else:
            check_tabular_config(cfg)
            tabular.make_env(cfg.env.name, num_envs=1, env_kwargs=OmegaConf.to_container(cfg.env.kwargs))
    for name in names:
        assert name in str(err.value), str(err.value)


def _refused(recipe: Path, run_dir: Path, overrides: list[str], *names: str) -> str:
    proc = _run(recipe, *overrides, f"hydra.run.dir={run_dir}")
    assert proc.returncode != 0, proc.stdout[-2000:]
    for name in names:
        assert name in proc.stderr, proc.stderr[-3000:]
    assert not (run_dir / "summary.json").exists() and not (run_dir / "checkpoint.pt").exists()
    return proc.stderr


@pytest.mark.parametrize(("overrides", "names"), [
    (["total_frames=0"], ["ValueError", "total_frames must be a positive integer"]),
    (["total_frames=-2048"], ["total_frames must be a positive integer"]),
    (["num_envs=0"], ["num_envs must be a positive integer"]),
    (["eval_episodes=0"], ["eval_episodes must be a positive integer"]),
    (["env.gamma=0"], ["env.gamma must be a number in (0, 1]"]),
    (["env.gamma=1.5"], ["env.gamma must be a number in (0, 1]"]),
    (["env.gamma=true"], ["env.gamma must be a number in (0, 1]"]),
    (["frames_per_batch=1000"], ["frames_per_batch=1000 must be divisible by num_minibatches"]),
    (["logger.backend=foo"], ["logger.backend must be one of"]),
    (["logger=foo"], ["Could not find 'logger/foo'", "csv", "tensorboard"]),
    (["estimator=foo"], ["Could not find 'estimator/foo'", "gae", "td_lambda"]),
    (["resume=maybe"], ["resume must be true or false"]),
    (["compile=yes"], ["compile must be true or false", "'yes'"]),
    (["compile=true", "env=Pendulum-v1", "algo=bgpg"], ["compile=true applies to algo in", "algo='bgpg'"]),
    (["env.name=Blackjack-v1"], ["env.name='Blackjack-v1'", "flat Box observation space", "Tuple"]),
    (["+env.kwargs.sutton=true"], ["env.kwargs.sutton: CartPole-v1 takes no such argument", "sutton_barto_reward"]),
])
def test_train_recipe_refuses_bad_config(overrides, names):
    _refused_in_process(TRAIN, ["env=CartPole-v1", *overrides], *[n for n in names if n != "ValueError"])


@pytest.mark.parametrize(("overrides", "names"), [
    (["total_frames=0"], ["total_frames must be a positive integer"]),
    (["env.num_envs=0"], ["env.num_envs must be a positive integer"]),
    (["eval.episodes=0"], ["eval.episodes must be a positive integer"]),
    (["gamma=1.0"], ["gamma must be a number in [0, 1)"]),
    (["gamma=-0.1"], ["gamma must be a number in [0, 1)"]),
    (["frames_per_batch=1000", "env.num_envs=16"], ["frames_per_batch=1000 must be divisible by env.num_envs=16"]),
    (["epsilon=0"], ["epsilon must be a positive finite number"]),
    (["env.max_episode_steps=0"], ["env.max_episode_steps must be null or a positive integer"]),
    (["state_weight=foo"], ["state_weight must be one of", "discounted", "uniform"]),
    (["logger.backend=foo"], ["logger.backend must be one of"]),
    (["estimator=foo"], ["Could not find 'estimator/foo'", "td", "mc"]),
    (["estimator.bonus=-1"], ["estimator.bonus must be a finite number >= 0"]),
    (["estimator.bonus=true"], ["estimator.bonus must be a finite number >= 0"]),
    (["estimator=mc", "estimator.bonus=1.0"], ["estimator.bonus=1.0 needs estimator=td"]),
    (["estimator.bonus_anneal=maybe"], ["estimator.bonus_anneal must be true or false"]),
    (["env.name=CartPole-v1"], ["env.name='CartPole-v1' must have Discrete observations and actions"]),
    (["env.name=Blackjack-v1"], ["env.name='Blackjack-v1' must have Discrete observations and actions"]),
    (["+env.kwargs.slippery=true"], ["env.kwargs.slippery: CliffWalking-v1 takes no such argument", "is_slippery"]),
    (["env.name=FrozenLake-v1", "+env.kwargs.map_name=9x9"], ["env.kwargs={'map_name': '9x9'}", "KeyError"]),
])
def test_tabular_recipe_refuses_bad_config(overrides, names):
    _refused_in_process(TABULAR, overrides, *names)


@pytest.mark.parametrize(("recipe", "overrides", "names"), [
    (TRAIN, ["env=CartPole-v1", "total_frames=0"], ["ValueError", "total_frames must be a positive integer"]),
    (TRAIN, ["env=CartPole-v1", "+env.kwargs.sutton=true"], ["env.kwargs.sutton: CartPole-v1 takes no such"]),
    (TABULAR, ["estimator.bonus=-1"], ["ValueError", "estimator.bonus must be a finite number >= 0"]),
    (TABULAR, ["estimator=foo"], ["Could not find 'estimator/foo'", "td", "mc"]),
])
def test_recipes_refuse_bad_config_as_a_user_runs_them(tmp_path, recipe, overrides, names):
    _refused(recipe, tmp_path / "run", overrides, *names)


def test_env_kwargs_reach_gymnasium_make(tmp_path):
    # Sutton and Barto's CartPole reward: 0 per step, -1 at the fall; an 8x8 FrozenLake has 64 states.
    proc = _run(TRAIN, *TINY_TRAIN, "env=CartPole-v1", "+env.kwargs.sutton_barto_reward=true",
                f"hydra.run.dir={tmp_path / 'cartpole'}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((tmp_path / "cartpole" / "summary.json").read_text())["final_return"] <= 0
    proc = _run(TABULAR, *TINY_TABULAR, "env.name=FrozenLake-v1", "+env.kwargs.map_name=8x8",
                "+env.kwargs.is_slippery=false", f"hydra.run.dir={tmp_path / 'lake'}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    saved = torch.load(tmp_path / "lake" / "policy.pt", weights_only=False)
    assert saved["probs"].shape == (64, 4)
    assert saved["config"]["env"]["kwargs"] == {"map_name": "8x8", "is_slippery": False}


class _SpacesEnv(gym.Env):
    """A one-step env with the given spaces (registered below), for the spaces no gymnasium env here has."""

    def __init__(self, observation_space, action_space):
        self.observation_space, self.action_space = observation_space, action_space

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        return self.observation_space.sample(), {}

    def step(self, action):
        return self.observation_space.sample(), 0.0, True, False, {}


@pytest.mark.parametrize(("obs", "act", "match"), [
    (gym.spaces.Dict({"x": gym.spaces.Box(-1, 1, (2,))}), gym.spaces.Discrete(2), "flat Box observation space"),
    (gym.spaces.Box(-1, 1, (2, 3)), gym.spaces.Discrete(2), "flat Box observation space"),
    (gym.spaces.Box(-1, 1, (2,)), gym.spaces.MultiDiscrete([2, 3]), "Discrete actions or a bounded flat Box"),
    (gym.spaces.Box(-1, 1, (2,)), gym.spaces.Box(-np.inf, np.inf, (1,)), "Discrete actions or a bounded flat Box"),
])
def test_train_envs_refuse_spaces_they_cannot_handle(obs, act, match):
    name = f"SweepSpaces-{type(obs).__name__}-{type(act).__name__}-{len(gym.registry)}-v0"
    gym.register(name, entry_point=lambda **_: _SpacesEnv(obs, act))
    try:
        cfg = OmegaConf.create({"obs_norm": {"decay": 0.99, "eps": 1e-2, "clip": 10.0},
                                "env": {"gamma": 0.99, "kwargs": {}}})
        with pytest.raises(ValueError, match=match) as err:
            make_env(name, 0, None, cfg, num_envs=1)
        assert f"env.name={name!r}" in str(err.value)
    finally:
        del gym.registry[name]


@pytest.mark.parametrize("recipe", [TRAIN, TABULAR])
def test_run_directory_that_cannot_be_created_is_refused(tmp_path, recipe):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    tiny = TINY_TRAIN if recipe == TRAIN else TINY_TABULAR
    stderr = _refused(recipe, blocker / "run", tiny, str(blocker / "run"))
    assert "Not a directory" in stderr
    assert blocker.read_text() == "not a directory"


def test_truncated_checkpoint_is_refused_and_left_untouched(tmp_path):
    assert _run(TRAIN, *TINY_TRAIN, "stop_after_frames=256", f"hydra.run.dir={tmp_path}").returncode == 0
    ckpt = tmp_path / "checkpoint.pt"
    ckpt.write_bytes(ckpt.read_bytes()[:200])  # a kill mid-copy, a full disk
    before = ckpt.read_bytes()
    proc = _run(TRAIN, *TINY_TRAIN, "resume=true", f"hydra.run.dir={tmp_path}")
    assert proc.returncode != 0
    assert "ValueError" in proc.stderr and str(ckpt) in proc.stderr and "cannot be read as a checkpoint" in proc.stderr
    assert ckpt.read_bytes() == before and not (tmp_path / "summary.json").exists()


@pytest.mark.parametrize("recipe", [TRAIN, TABULAR])
def test_second_run_into_a_used_directory_is_refused_unless_overwrite(tmp_path, recipe):
    tiny = TINY_TRAIN if recipe == TRAIN else TINY_TABULAR
    assert _run(recipe, *tiny, f"hydra.run.dir={tmp_path}").returncode == 0
    summary = (tmp_path / "summary.json").read_bytes()
    curves = {p.name: p.read_bytes() for p in (tmp_path / "logs" / "scalars").glob("*.csv")}
    proc = _run(recipe, *tiny, "seed=5", f"hydra.run.dir={tmp_path}")
    assert proc.returncode != 0
    assert "already holds a run" in proc.stderr and "overwrite=true" in proc.stderr
    assert (tmp_path / "summary.json").read_bytes() == summary  # nothing saved was touched
    assert {p.name: p.read_bytes() for p in (tmp_path / "logs" / "scalars").glob("*.csv")} == curves
    proc = _run(recipe, *tiny, "seed=5", "overwrite=true", f"hydra.run.dir={tmp_path}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((tmp_path / "summary.json").read_text())["seed"] == 5


def test_check_run_dir_sees_curves_and_run_files(tmp_path):
    assert check_run_dir(tmp_path, resume=False, overwrite=False) is False  # Hydra's own .hydra/ is no run
    (tmp_path / "logs" / "scalars").mkdir(parents=True)
    (tmp_path / "logs" / "scalars" / "eval_return.csv").write_text("")
    assert check_run_dir(tmp_path, resume=False, overwrite=False) is False  # empty curves: nothing saved
    (tmp_path / "logs" / "scalars" / "eval_return.csv").write_text("0,1.0\n")
    with pytest.raises(ValueError, match="logs/scalars"):
        check_run_dir(tmp_path, resume=False, overwrite=False)
    assert check_run_dir(tmp_path, resume=True, overwrite=False) is True
    assert check_run_dir(tmp_path, resume=False, overwrite=True) is True
