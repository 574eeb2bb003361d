"""Smoke version of benchmarks/vs_sb3.py: CartPole-v1, one batch per run, one rep (skipped without
stable-baselines3, which is the optional ``bench`` extra)."""

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from vs_sb3 import ALGOS, FIELDS, rotation  # noqa: E402


def test_rotation_puts_each_algorithm_in_each_position_once_per_cycle():
    orders = [rotation(rep) for rep in range(len(ALGOS))]
    assert all(sorted(order) == sorted(ALGOS) for order in orders)
    for position in range(len(ALGOS)):
        assert sorted(order[position] for order in orders) == sorted(ALGOS)


def test_vs_sb3_writes_csv_and_table(tmp_path):
    pytest.importorskip("stable_baselines3")
    core = min(os.sched_getaffinity(0))  # the default core 1 may not exist on a one-core runner
    cmd = [sys.executable, str(ROOT / "benchmarks" / "vs_sb3.py"), "--envs", "CartPole-v1", "--frames", "2048",
           "--reps", "1", "--core", str(core), "--out", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = list(csv.DictReader(open(tmp_path / "runs.csv")))
    assert list(rows[0]) == FIELDS
    assert sorted(r["algo"] for r in rows) == sorted(ALGOS)
    assert [r["algo"] for r in sorted(rows, key=lambda r: int(r["position"]))] == list(rotation(0))
    for r in rows:
        assert r["env"] == "CartPole-v1" and int(r["frames"]) == 2048 and float(r["frames_per_s"]) > 0
        assert float(r["collection_s"]) > 0 and float(r["update_s"]) > 0
        # The recipe's runs carry its update phases; SB3's update is not split.
        assert (r["epochs_s"] == "") == (r["algo"] == "sb3_ppo")
    table = (tmp_path / "table.md").read_text()
    assert "stable-baselines3" in table and "8 envs, 2048 frames per batch (SB3 n_steps=256)" in table
    assert "| CartPole-v1 |" in table and table.count("| CartPole-v1 |") == 1 + len(ALGOS)  # speeds + split
    assert "recipe OT-TRPO / SB3 PPO" in table
    assert table.split("\n\n", 1)[1] in proc.stdout  # the tables as printed
