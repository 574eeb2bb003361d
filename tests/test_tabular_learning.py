"""``benchmarks/tabular_learning.py``: settings (env id + ``env.kwargs``) reach the recipe and the table."""

import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from tabular_learning import parse_setting, setting_folder, setting_name  # noqa: E402
from tabular_optimum import SETTINGS  # noqa: E402


@pytest.mark.parametrize(("env", "kwargs"), SETTINGS)
def test_setting_names_round_trip(env, kwargs):
    name = setting_name(env, kwargs)
    assert parse_setting(name) == (env, kwargs)
    assert not set(":=,") & set(setting_folder(name))


def test_parse_setting_reads_hydra_literals_and_refuses_a_bare_key():
    assert parse_setting("FrozenLake-v1:map_name=8x8,is_slippery=false") == (
        "FrozenLake-v1", {"map_name": "8x8", "is_slippery": False})
    assert parse_setting("NChain-v0:n=10") == ("NChain-v0", {"n": 10})
    with pytest.raises(ValueError, match="expected env:key=value"):
        parse_setting("FrozenLake-v1:map_name")


def test_a_setting_runs_with_its_kwargs_and_its_fraction_of_the_optimum(tmp_path):
    cmd = [sys.executable, str(ROOT / "benchmarks" / "tabular_learning.py"), "--envs",
           "FrozenLake-v1:is_slippery=false", "--algos", "ot_trpo", "--seeds", "1", "--first-seed", "3",
           "--frames", "1024", "--jobs", "1", "--out", str(tmp_path),
           "frames_per_batch=512", "env.num_envs=4", "eval.every=0", "eval.episodes=4"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    run = tmp_path / "FrozenLake-v1_is_slippery-false" / "ot_trpo" / "seed3"
    cfg = OmegaConf.load(run / ".hydra" / "config.yaml")
    assert cfg.seed == 3 and cfg.env.kwargs.is_slippery is False
    row = next(line for line in proc.stdout.splitlines() if line.startswith("| FrozenLake-v1:is_slippery=false"))
    assert "of 1.000" in row  # the non-slippery map's optimum (reached in 6 steps)
    assert "seeds 3..3" in proc.stdout
    assert "(1,024)" in row
    # A second call reads the finished run back, unless its budget changed: then the run is redone.
    again = subprocess.run([*cmd[:cmd.index("--frames") + 1], "2048", *cmd[cmd.index("--frames") + 2:]],
                           capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    assert OmegaConf.load(run / ".hydra" / "config.yaml").total_frames == 2048
    assert "| FrozenLake-v1:is_slippery=false (2,048)" in again.stdout
