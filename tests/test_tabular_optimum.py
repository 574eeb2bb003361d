"""``benchmarks/tabular_optimum.py``: the finite-horizon optimum against values known by hand."""

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from tabular_optimum import optimal_return, run_fractions  # noqa: E402


@pytest.mark.parametrize(("env", "kwargs", "horizon", "expected"), [
    ("CliffWalking-v1", {}, None, -13.0),  # 13 steps round the cliff
    ("CliffWalking-v1", {}, 12, -12.0),  # too short to arrive: the best is 12 steps of -1 without the cliff
    ("FrozenLake-v1", {"is_slippery": False}, None, 1.0),
    ("FrozenLake-v1", {"is_slippery": False}, 6, 1.0),  # the shortest path is 6 steps ...
    ("FrozenLake-v1", {"is_slippery": False}, 5, 0.0),  # ... so 5 cannot reach the goal
    ("NChain-v0", {"slip": 0.0}, 1000, 996 * 10.0),  # 4 steps forward, then 10 per step at the end
    ("NChain-v0", {"slip": 0.0}, 5, 10.0),  # 5 steps: forward to the end, one large reward; back 5x gives 10 too
    ("NChain-v0", {"slip": 0.0, "small": 3.0}, 5, 15.0),  # ... unless back pays more
])
def test_optimum_matches_hand_values(env, kwargs, horizon, expected):
    assert optimal_return(env, kwargs, horizon) == pytest.approx(expected)


def test_slippery_optimum_lies_between_zero_and_the_deterministic_one():
    slippery = optimal_return("FrozenLake-v1")
    assert 0.7 < slippery < 0.8  # 0.74 at the registry's 100 steps, a known figure for the 4x4 map
    assert optimal_return("FrozenLake-v1", {}, 200) >= slippery  # more time never hurts


def test_run_fractions_reads_runs_and_their_env_kwargs(tmp_path):
    for seed, final in ((0, 0.5), (1, 1.0)):
        run = tmp_path / "FrozenLake-v1" / "ot_trpo" / f"seed{seed}"
        (run / ".hydra").mkdir(parents=True)
        (run / ".hydra" / "config.yaml").write_text("env:\n  name: FrozenLake-v1\n  kwargs:\n    is_slippery: false\n")
        (run / "summary.json").write_text(json.dumps({"final_return": final}))
    rows = run_fractions(tmp_path)
    assert len(rows) == 3
    assert rows[2] == ('| FrozenLake-v1 | {"is_slippery": false} | ot_trpo | 2 | 0.750 (0.500) | 1.000 | '
                       '0.750 (0.500) |')
