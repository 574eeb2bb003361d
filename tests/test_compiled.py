"""``compile=true``: the minibatch step's loss under torch.compile equals the eager loss to rounding (outputs and
gradients, on the recipe's own networks and a collected batch), and a non-finite step is still refused by name.

Each case compiles once (inductor, about 10-20 s on one core)."""

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from torchrl.collectors import Collector
from torchrl.data.tensor_specs import Categorical as CategoricalSpec

from torchrl_ot.training import (
    Minibatches,
    compiled_loss,
    make_algorithm,
    make_env,
    make_networks,
    minibatches,
    new_obs_stats,
    resolve_policy,
)

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["frames_per_batch=256", "num_envs=4", "num_minibatches=4", "seed=5"]


def _built(overrides: list[str]):
    """The recipe's algorithm on its networks, and one minibatch of a collected batch after ``before_epochs``."""
    with initialize_config_dir(config_dir=str(ROOT / "recipes" / "conf" / "train"), version_base=None):
        cfg = compose("config", overrides=[*SMALL, *overrides])
    torch.manual_seed(cfg.seed)
    probe = make_env(cfg.env.name, cfg.seed, None, cfg, num_envs=1)
    discrete = isinstance(probe.action_spec_unbatched, CategoricalSpec)
    policy = resolve_policy(cfg, discrete)
    actor, critic, head = make_networks(probe, cfg, policy)
    obs_dim = probe.observation_spec["observation"].shape[-1]
    probe.close()
    algorithm = make_algorithm(cfg, policy, discrete, actor, critic, head)
    env = make_env(cfg.env.name, cfg.seed, new_obs_stats(obs_dim), cfg, num_envs=cfg.num_envs)
    collector = Collector(env, actor, frames_per_batch=cfg.frames_per_batch, total_frames=cfg.frames_per_batch,
                          auto_register_policy_transforms=False)
    batch = next(iter(collector))
    collector.shutdown()
    with torch.no_grad():
        algorithm.loss_module.value_estimator(batch)
    algorithm.before_epochs(batch, {"frames": batch.numel()})  # lambda* solved, as in the recipe
    return algorithm, minibatches(batch, cfg.frames_per_batch // cfg.num_minibatches).sample()


def _outputs_and_grads(step, algorithm, td):
    params = list(algorithm.loss_module.parameters())
    for p in params:
        p.grad = None
    out = step(td)
    algorithm.minibatch_loss(out).backward()
    return out, [p.grad.clone() for p in params if p.grad is not None]


@pytest.mark.parametrize(("overrides", "bad_key", "bad_value"), [
    (["env=CartPole-v1", "algo=ot_trpo"], "observation", float("nan")),  # categorical, the advantage head
    (["env=Pendulum-v1", "algo=ot_trpo"], "advantage", float("-inf")),  # Gaussian with the mirror (its default)
])
def test_compiled_loss_equals_eager_and_refuses_nonfinite_by_name(overrides, bad_key, bad_value):
    algorithm, td = _built(overrides)
    loss = algorithm.loss_module
    eager_out, eager_grads = _outputs_and_grads(loss, algorithm, td)
    step = compiled_loss(loss)
    fast_out, fast_grads = _outputs_and_grads(step, algorithm, td)
    assert set(fast_out.keys()) == set(eager_out.keys())  # the compiled graph's finiteness flag is not passed on
    for key in eager_out.keys():
        torch.testing.assert_close(fast_out[key], eager_out[key], rtol=1e-5, atol=1e-6)
    assert len(fast_grads) == len(eager_grads) > 0
    assert any(bool(g.abs().sum() > 0) for g in eager_grads)
    for fast, eager in zip(fast_grads, eager_grads, strict=True):
        torch.testing.assert_close(fast, eager, rtol=1e-4, atol=1e-6)
    # Called on the minibatches themselves (the recipe's way), the graph gathers the same frames that sample()
    # gives, from the same permutation draws.
    torch.manual_seed(1)
    eager_rb, fast_rb = Minibatches(td, 8), Minibatches(td, 8)
    for _ in range(3):  # three minibatches of 8 from one permutation of the 64 frames
        torch.manual_seed(2)
        eager_mb = eager_rb.sample()
        torch.manual_seed(2)
        fast_mb = step(fast_rb)
        eager_mb_out = loss(eager_mb)
        for key in eager_mb_out.keys():
            torch.testing.assert_close(fast_mb[key], eager_mb_out[key], rtol=1e-5, atol=1e-6)
    # A -inf advantage gives a finite hinge (clamped to 0); a NaN observation a NaN loss: either way the step is
    # rerun eagerly and refused naming the entry, before any gradient exists; through the minibatches too.
    bad = td.clone()
    bad[bad_key][:] = bad_value
    with pytest.raises(ValueError, match=bad_key):
        step(bad)
    with pytest.raises(ValueError, match=bad_key):
        step(Minibatches(bad, 8))


def test_compiled_loss_refuses_a_non_loss():
    with pytest.raises(TypeError, match="loss_module must be a torchrl LossModule"):
        compiled_loss(torch.nn.Linear(2, 2))


def test_recipe_with_compile_matches_eager_run_to_rounding(tmp_path):
    # TorchRL's ClipPPOLoss this time, through the recipe as a user runs it; the same seed without compile.
    import json
    import subprocess
    import sys

    tiny = ["env=Pendulum-v1", "algo=ppo", "total_frames=512", *SMALL, "num_epochs=2", "eval_every=512",
            "eval_episodes=2", "progress=false"]
    runs = {}
    for flag in ("false", "true"):
        proc = subprocess.run([sys.executable, str(ROOT / "recipes" / "train.py"), *tiny, f"compile={flag}",
                               f"hydra.run.dir={tmp_path / flag}"], capture_output=True, text=True, cwd=ROOT,
                              timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs[flag] = torch.load(tmp_path / flag / "checkpoint.pt", weights_only=False)
    eager, fast = runs["false"], runs["true"]
    assert len(fast["updates"]) == len(eager["updates"]) == 2
    for a, b in zip(eager["updates"], fast["updates"], strict=True):
        for key in ("loss_objective", "loss_critic", "grad_norm", "kl_approx"):
            assert b[key] == pytest.approx(a[key], rel=1e-3, abs=1e-6), key
    for a, b in zip(eager["history"], fast["history"], strict=True):
        assert b["return"] == pytest.approx(a["return"], rel=1e-3)
    assert json.loads((tmp_path / "true" / "summary.json").read_text())["frames"] == 512


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_recipe_with_compile_runs_on_cuda(tmp_path):
    # The same path on a GPU: the compiled loss on device=cuda, the same per-update losses as the eager run there.
    import subprocess
    import sys

    tiny = ["env=CartPole-v1", "algo=ot_trpo", "total_frames=512", *SMALL, "num_epochs=2", "eval_every=512",
            "eval_episodes=2", "progress=false", "device=cuda"]
    runs = {}
    for flag in ("false", "true"):
        proc = subprocess.run([sys.executable, str(ROOT / "recipes" / "train.py"), *tiny, f"compile={flag}",
                               f"hydra.run.dir={tmp_path / flag}"], capture_output=True, text=True, cwd=ROOT,
                              timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs[flag] = torch.load(tmp_path / flag / "checkpoint.pt", weights_only=False, map_location="cpu")
    for a, b in zip(runs["false"]["updates"], runs["true"]["updates"], strict=True):
        for key in ("loss_objective", "loss_critic", "grad_norm"):
            assert b[key] == pytest.approx(a[key], rel=1e-3, abs=1e-6), key
