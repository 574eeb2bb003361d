"""The tabular recipe end to end, as a user runs it (a subprocess with Hydra overrides)."""

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from torchrl_ot.tabular import exact_return

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "tabular.py"


def _run(*overrides, cwd=ROOT):
    return subprocess.run([sys.executable, str(RECIPE), "progress=false", *overrides],
                          capture_output=True, text=True, cwd=cwd, timeout=300)


@pytest.mark.parametrize("algo", ["ot_trpo", "wpo"])
def test_recipe_runs_and_writes_summary_plot_and_logs(tmp_path, algo):
    proc = _run("env.name=CliffWalking-v1", f"algo={algo}", "total_frames=4096", "frames_per_batch=1024",
                "env.num_envs=8", "eval.episodes=5", "seed=1", f"hydra.run.dir={tmp_path}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    for key in ("final_return", "violation_rate", "frames", "wall_time_s", "frames_per_s"):
        assert key in summary
    assert summary["frames"] == 4096 and summary["updates"] == 4 and summary["eval_episodes"] == 5
    if algo == "ot_trpo":
        assert summary["violation_rate"] == 0.0
        assert summary["max_audited_transport"] <= summary["epsilon"] * (1 + 1e-6)
    assert (tmp_path / "curve.png").stat().st_size > 0
    rows = list(csv.reader(open(tmp_path / "logs" / "scalars" / "audited_transport.csv")))
    assert len(rows) == 4
    # The exploration bonus (estimator.bonus 1.0) falls linearly to 0 at the last update (estimator.bonus_anneal).
    bonus = [float(v) for _, v in csv.reader(open(tmp_path / "logs" / "scalars" / "bonus.csv"))]
    assert bonus == pytest.approx([0.75, 0.5, 0.25, 0.0])
    # CliffWalking has a transition table: the greedy policy's exact return and the optimum (13 steps of -1).
    assert summary["optimal_return"] == pytest.approx(-13.0)
    probs = torch.load(tmp_path / "policy.pt", weights_only=False)["probs"]
    greedy = torch.nn.functional.one_hot(probs.argmax(-1), probs.shape[1]).double()
    assert summary["final_return_exact"] == pytest.approx(exact_return("CliffWalking-v1", {}, greedy))
    assert summary["final_return_exact"] <= summary["optimal_return"]


def test_recipe_refuses_unknown_algo_listing_options(tmp_path):
    proc = _run("algo=ot_trpoo", f"hydra.run.dir={tmp_path}")
    assert proc.returncode != 0
    assert "ot_trpo" in proc.stderr and "wpo" in proc.stderr


def test_recipe_refuses_bad_epsilon(tmp_path):
    proc = _run("epsilon=0", "total_frames=1024", f"hydra.run.dir={tmp_path}")
    assert proc.returncode != 0 and "epsilon" in proc.stderr


@pytest.mark.parametrize("every", ["-5", "true", "2.5"])
def test_recipe_refuses_bad_eval_every(tmp_path, every):
    proc = _run(f"eval.every={every}", "total_frames=1024", f"hydra.run.dir={tmp_path}")
    assert proc.returncode != 0 and "eval.every" in proc.stderr


def test_periodic_evaluation_is_logged_and_leaves_training_unchanged(tmp_path):
    common = ["env.name=FrozenLake-v1", "total_frames=3072", "frames_per_batch=1024", "env.num_envs=8",
              "eval.episodes=4", "seed=2"]
    assert _run(*common, "eval.every=2048", f"hydra.run.dir={tmp_path / 'a'}").returncode == 0
    assert _run(*common, "eval.every=0", f"hydra.run.dir={tmp_path / 'b'}").returncode == 0
    a, b = (json.loads((tmp_path / d / "summary.json").read_text()) for d in "ab")
    for key in ("final_return_greedy", "final_return_sampled", "mean_train_return", "max_audited_transport"):
        assert a[key] == b[key], key
    curve = list(csv.reader(open(tmp_path / "a" / "logs" / "scalars" / "eval_return.csv")))
    assert [int(float(step)) for step, _ in curve] == [0, 2048, 3072]  # start, every 2048 frames, end
    assert float(curve[-1][1]) == a["final_return"]
    only_final = list(csv.reader(open(tmp_path / "b" / "logs" / "scalars" / "eval_return.csv")))
    assert [int(float(step)) for step, _ in only_final] == [3072]
