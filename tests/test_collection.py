"""The run's collector: the statistics merge of Ray's workers (exact for the return moments, first order for
the observation averages), Ray collection end to end with 2 local workers, the ``collector`` and ``device``
options refused when bad, and the CUDA path where a GPU is present."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from tensordict import TensorDict

from torchrl_ot.training import (
    RunningObsNorm,
    check_collector_config,
    check_device,
    merge_ema_stats,
    merge_moment_stats,
    new_obs_stats,
    new_return_stats,
    update_running_moments,
)
from torchrl_ot.training import collection as collection_module

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "train.py"
TINY = ["env=Pendulum-v1", "total_frames=1024", "frames_per_batch=512", "num_envs=4", "num_epochs=2",
        "num_minibatches=4", "eval_every=1024", "eval_episodes=2", "checkpoint_every=1024", "progress=false"]


def _f64(*values):
    return torch.tensor(values, dtype=torch.float64)


def test_return_moments_merge_equals_one_update_over_all_workers():
    base = new_return_stats()
    update_running_moments(base, _f64(0.5, -1.0, 2.0))  # the learner's statistics so far
    chunks = [_f64(1.0, 2.0, 3.0), _f64(10.0), _f64(-4.0, 0.0)]
    workers = []
    for chunk in chunks:
        copy = base.clone()
        update_running_moments(copy, chunk)
        workers.append(copy)
    joint = base.clone()
    update_running_moments(joint, torch.cat(chunks))
    merged = merge_moment_stats(base, workers)
    for key in ("mean", "var", "count"):
        torch.testing.assert_close(merged[key], joint[key], rtol=1e-12, atol=1e-12)
    # a merge that ignored all but the last worker would be far off
    assert abs(float(workers[-1]["mean"] - joint["mean"])) > 0.5


def _normalise(stats, obs, decay):
    RunningObsNorm(stats, decay=decay, eps=1e-2)._step(None, TensorDict({"observation": obs}, [obs.shape[0]]))


def test_obs_average_merge_is_exact_for_one_worker_and_first_order_for_two():
    decay = 0.9999
    base = new_obs_stats(2)
    _normalise(base, torch.tensor([[1.0, -1.0], [3.0, 0.0]]), decay)
    first, second = torch.tensor([[2.0, 1.0], [4.0, 1.0]]), torch.tensor([[-2.0, 5.0], [0.0, 3.0]])
    a, b, shared = base.clone(), base.clone(), base.clone()
    _normalise(a, first, decay)
    _normalise(b, second, decay)
    _normalise(shared, first, decay)  # what one copy shared by both workers gets
    _normalise(shared, second, decay)
    one = merge_ema_stats(base, [a])
    for key in ("loc", "var", "count"):
        torch.testing.assert_close(one[key, "observation"], a[key, "observation"], rtol=1e-6, atol=1e-7)
    two = merge_ema_stats(base, [a, b])
    assert int(two["count", "observation"]) == int(shared["count", "observation"]) == 6
    for key in ("loc", "var"):
        moved = (shared[key, "observation"] - base[key, "observation"]).abs().max()
        err = (two[key, "observation"] - shared[key, "observation"]).abs().max()
        assert err < 1e-3 * moved  # second order in 1 - decay
    # the merge keeps both workers' moves: dropping one is off by about that move
    assert (a["loc", "observation"] - shared["loc", "observation"]).abs().max() > 0.1 * moved


def test_transforms_hand_out_and_take_back_their_statistics():
    stats = new_obs_stats(2)
    norm = RunningObsNorm(stats, decay=0.99, eps=1e-2)
    _normalise(stats, torch.ones(3, 2), 0.99)
    snapshot = norm.stats_snapshot()
    snapshot["loc", "observation"] += 1.0  # a copy: the transform's statistics do not move
    assert not torch.equal(snapshot["loc", "observation"], norm.loc)
    norm.load_stats_(snapshot)
    assert torch.equal(norm.loc, snapshot["loc", "observation"])
    assert torch.equal(stats["loc", "observation"], snapshot["loc", "observation"])  # in place, shared


def _cfg(**collector):
    return OmegaConf.create({"collector": {"backend": "local", "ray": {"address": None, "num_cpus": 1},
                                           **collector}})


def test_collector_options_refused_with_the_option_named(monkeypatch):
    with pytest.raises(ValueError, match=r"collector.backend must be one of \('local', 'ray'\), got 'mpi'"):
        check_collector_config(_cfg(backend="mpi"))
    with pytest.raises(ValueError, match="collector.ray.num_cpus"):
        check_collector_config(_cfg(backend="ray", ray={"address": None, "num_cpus": 0}))
    with pytest.raises(ValueError, match="collector.ray.address"):
        check_collector_config(_cfg(backend="ray", ray={"address": 6379, "num_cpus": 1}))
    monkeypatch.setattr(collection_module, "ray_available", lambda: False)
    with pytest.raises(ValueError, match=r"collector.backend=ray needs Ray.*torchrl-ot\[ray\]"):
        check_collector_config(_cfg(backend="ray"))
    check_collector_config(_cfg())  # the default passes


def test_device_option_refused_with_the_option_named():
    assert check_device("cpu") == torch.device("cpu")
    for bad in ("tpu", "gpu", 3, "cuda:x"):
        with pytest.raises(ValueError, match="device must be 'cpu', 'cuda' or 'cuda:N'"):
            check_device(bad)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match=r"device='cuda' asked, but torch sees no CUDA device.*device=cpu"):
            check_device("cuda")
    else:
        with pytest.raises(ValueError, match="CUDA device"):
            check_device(f"cuda:{torch.cuda.device_count()}")


def test_recipe_refuses_unknown_backend_and_missing_cuda(tmp_path):
    proc = subprocess.run([sys.executable, str(RECIPE), *TINY, "collector.backend=mpi", f"hydra.run.dir={tmp_path}"],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode != 0 and "collector.backend must be one of" in proc.stderr
    if not torch.cuda.is_available():
        proc = subprocess.run([sys.executable, str(RECIPE), *TINY, "device=cuda", f"hydra.run.dir={tmp_path}"],
                              capture_output=True, text=True, cwd=ROOT, timeout=300)
        assert proc.returncode != 0 and "device='cuda' asked" in proc.stderr


def _ckpt(run_dir):
    return torch.load(run_dir / "checkpoint.pt", weights_only=False)


def test_recipe_collects_on_a_local_ray_of_two_workers(tmp_path):
    pytest.importorskip("ray")  # the `ray` extra (.ci/setup installs it)
    proc = subprocess.run([sys.executable, str(RECIPE), *TINY, "collector.backend=ray", "num_collectors=2",
                           "reward_scaling.enabled=true", f"hydra.run.dir={tmp_path}"],
                          capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["frames"] == 1024 and summary["updates"] == 2
    assert summary["max_realised_transport_over_epsilon"] <= 1.0 + 1e-6
    ckpt = _ckpt(tmp_path)
    # Every reward of both workers reached the learner's return statistics (count starts at 1e-4): 1,024 exactly.
    assert float(ckpt["return_stats"]["count"]) == pytest.approx(1024 + 1e-4, abs=1e-9)
    # and every observation (steps and resets) its observation statistics
    assert int(ckpt["obs_stats"]["count", "observation"]) >= 1024


def test_local_worker_processes_update_the_learners_statistics(tmp_path):
    # The statistics reach the workers by reference (make_collector's env_kwargs): a copy per worker (what an
    # EnvCreator hands them) would leave the learner's return count at its initial 1e-4.
    proc = subprocess.run([sys.executable, str(RECIPE), *TINY, "num_collectors=2", "reward_scaling.enabled=true",
                           f"hydra.run.dir={tmp_path}"], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpt = _ckpt(tmp_path)
    # Both workers update the same tensors without a lock, so an update can be lost to a race (measured: 1,000 of
    # 1,024 rewards counted); most of both workers' 1,024 steps must arrive, and no more than they made (Pendulum
    # never ends an episode within 1,024 frames: the steps and one reset of each worker's 4 copies).
    assert 0.9 * 1024 <= float(ckpt["return_stats"]["count"]) <= 1024 + 1e-4
    assert 0.9 * 1024 <= int(ckpt["obs_stats"]["count", "observation"]) <= 1024 + 2 * 4


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_recipe_trains_on_cuda(tmp_path):
    proc = subprocess.run([sys.executable, str(RECIPE), *TINY, "device=cuda", f"hydra.run.dir={tmp_path}"],
                          capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["frames"] == 1024 and summary["max_realised_transport_over_epsilon"] <= 1.0 + 1e-6
    assert all(t.is_cuda for t in _ckpt(tmp_path)["actor"].values())
