"""Smoke version of benchmarks/compare.py: a discrete, a continuous and a tabular environment, one seed,
a tiny budget, every algorithm."""

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from compare import runs_on, verdict  # noqa: E402
from throughput import schedule  # noqa: E402

TINY = ["--frames", "512", "--eval-episodes", "2", "frames_per_batch=256", "num_envs=4", "num_epochs=1",
        "num_minibatches=2", "eval_every=256", "checkpoint_every=512",
        "tabular.frames_per_batch=256", "tabular.env.num_envs=4", "tabular.eval.every=256"]


def test_compare_writes_csv_plots_and_table(tmp_path):
    cmd = [sys.executable, str(ROOT / "benchmarks" / "compare.py"), "--envs", "CartPole-v1", "Pendulum-v1",
           "CliffWalking-v1", "--seeds", "1", "--jobs", "2", "--out", str(tmp_path), *TINY]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = list(csv.DictReader(open(tmp_path / "runs.csv")))
    assert set(rows[0]) == {"algo", "env", "seed", "frames", "eval_return", "wall_time_s"}
    runs = {(r["env"], r["algo"]) for r in rows}
    # wpo (no splitting) is the discrete-action baseline only.
    every = ("ot_trpo", "ppo", "a2c", "trpo", "wpo")
    assert runs == {(e, a) for e in ("CartPole-v1", "CliffWalking-v1") for a in every} | {
        ("Pendulum-v1", a) for a in every[:-1]}
    assert {int(r["frames"]) for r in rows} == {0, 256, 512}  # evaluation at the start, every 256, at the end
    # On the tabular env OT-TRPO and WPO are the tabular recipe (the paper's method there), the rest networks.
    for algo, recipe_key in (("ot_trpo", "violation_rate"), ("wpo", "violation_rate"), ("ppo", "policy")):
        summary = json.loads((tmp_path / "CliffWalking-v1" / algo / "seed0" / "summary.json").read_text())
        assert recipe_key in summary and summary["frames"] == 512 and summary["eval_episodes"] == 2
    for env in ("CartPole-v1", "Pendulum-v1", "CliffWalking-v1"):
        assert (tmp_path / f"{env}.png").stat().st_size > 0
    table = (tmp_path / "table.md").read_text()
    assert all(f"| {env} | 512 |" in table for env in ("CartPole-v1", "Pendulum-v1", "CliffWalking-v1"))
    assert table.count("n/a") == 1  # wpo on Pendulum
    assert "| target |" in table and table.count("met") >= 3  # one verdict per env
    assert table in proc.stdout
    # --report-only launches nothing and tabulates what finished: the same rows; with a seed missing, says so

    shutil.rmtree(tmp_path / "Pendulum-v1" / "ppo")
    again = subprocess.run([*cmd, "--report-only"], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    rows_again = (tmp_path / "table.md").read_text().splitlines()[2:]
    assert rows_again[:3] == table.splitlines()[2:5]  # header row, rule, CartPole
    assert rows_again[4] == table.splitlines()[6]  # CliffWalking
    assert rows_again[3].endswith("| open: ppo 0/1 seeds |")  # no verdict against a missing baseline
    assert "| Pendulum-v1 | 512 |" in rows_again[3] and rows_again[3].count("n/a") == 2  # ppo gone, no wpo
    assert not (tmp_path / "Pendulum-v1" / "ppo").exists()


@pytest.mark.parametrize("flag", ["--frames", "--eval-episodes", "--seeds", "--jobs"])
def test_compare_refuses_a_non_positive_count(tmp_path, flag):
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "compare.py"), flag, "0", "--out", str(tmp_path)],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode != 0 and flag in proc.stderr and "positive integer" in proc.stderr
    assert not (tmp_path / "runs.csv").exists()


@pytest.mark.parametrize("flag", ["--frames", "--reps"])
def test_throughput_refuses_a_non_positive_count(flag):
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "throughput.py"), flag, "0"],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode != 0 and flag in proc.stderr and "positive integer" in proc.stderr


def test_step_cost_times_both_losses_part_by_part():
    # The in-process benchmark builds both losses with the recipe's own builders and times every part.
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "step_cost.py"), "--reps", "1",
                           "frames_per_batch=256", "num_envs=4", "num_minibatches=2"],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {line.split("|")[1].strip(): line for line in proc.stdout.splitlines() if line.startswith("| ")}
    assert {"sample", "forward", "backward", "clip", "adam", "whole step"} <= set(rows)
    assert "median of paired epochs" in proc.stdout and "1 epochs of 2 steps" in proc.stdout


def test_throughput_schedule_balances_cores_and_launch_orders():
    # An algorithm tied to one core (as when the core followed the launch position, which alternates
    # with the order) would carry that core's own speed into the ratio.
    seen = []
    for rep in range(4):
        order, cores = schedule(rep)
        assert sorted(order) == ["ot_trpo", "ppo"] and sorted(cores.values()) == [0, 1]
        seen.append((order, cores["ot_trpo"]))
    assert len(set(seen)) == 4  # every (launch order, OT-TRPO's core) once in any four reps
    assert [order[0] for order, _ in seen] == ["ot_trpo", "ppo", "ot_trpo", "ppo"]  # ABBA


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="needs Linux CPU affinity")
def test_throughput_concurrent_refuses_a_single_core():
    # Pinned to one core, the process cannot run a pair on two: refused before any run starts.
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "throughput.py"), "--concurrent"],
                          capture_output=True, text=True, cwd=ROOT, timeout=120,
                          preexec_fn=lambda: os.sched_setaffinity(0, {min(os.sched_getaffinity(0))}))
    assert proc.returncode != 0 and "--concurrent needs 2 usable cores" in proc.stderr


@pytest.mark.parametrize(("env", "finals", "expected"), [
    ("CartPole-v1", {"ot_trpo": [500, 500], "ppo": [500, 500], "a2c": [100, 120]}, "met"),  # a tie counts
    ("CartPole-v1", {"ot_trpo": [400, 500], "ppo": [450, 450]}, "not met: std above ppo"),
    ("Hopper-v5", {"ot_trpo": [400, 420], "ppo": [900, 1100], "trpo": [950, 960]}, "not met: mean below ppo"),
    ("Hopper-v5", {"ot_trpo": [400, 420], "trpo": [950, 950]}, "not met: mean below trpo, std above trpo"),
    ("Swimmer-v5", {"ot_trpo": [140, 140], "ppo": [100, 100]}, "not met: below 1.5x ppo"),
    ("Swimmer-v5", {"ot_trpo": [160, 160], "ppo": [100, 100]}, "met"),
    ("Pendulum-v1", {"ppo": [-200.0]}, "n/a"),
    # The network OT-TRPO on a tabular env is OT-TRPO, not a baseline to beat.
    ("Taxi-v4", {"ot_trpo": [7.9, 7.9], "ot_trpo_net": [8.5, 8.5], "ppo": [7.0, 7.0]}, "met"),
])
def test_verdict_states_the_papers_target(env, finals, expected):
    assert verdict(env, finals) == expected


def test_verdict_of_an_incomplete_row_is_open_with_the_counts():
    # A baseline's single run has no spread: "std above ppo" would be a verdict on one seed.
    finals = {"ot_trpo": [270.0, 275.0, 272.0], "ppo": [130.0], "a2c": [], "trpo": [50.0, 60.0, 70.0]}
    assert verdict("Swimmer-v5", finals, seeds=3) == "open: ppo 1/3, a2c 0/3 seeds"
    assert verdict("Swimmer-v5", {a: v for a, v in finals.items() if len(v) == 3}, seeds=3) == "met"


def test_wasserstein_baselines_run_only_on_continuous_actions():
    assert runs_on("Pendulum-v1", "bgpg") and runs_on("Hopper-v5", "wnpg")
    assert not runs_on("CartPole-v1", "bgpg") and not runs_on("Taxi-v4", "wnpg")
    assert runs_on("CartPole-v1", "ppo") and not runs_on("Pendulum-v1", "wpo")  # unchanged
