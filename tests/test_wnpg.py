"""WNPGLoss: the kernel estimator of the Wasserstein natural gradient (KWNG) against direct computations.

- ``kwng_direction`` (Woodbury through a ``b x b`` system) against a direct ``P x P`` solve of
  ``(damping diag(D)^-1 + T^T K^+ T) x = g``, K of full and of deficient rank;
- the Gaussian kernel's derivatives against autograd; ``K`` and ``T`` against autograd on a hand-written embedding;
- the loss's natural gradient on a tiny fixed actor-critic against the direct solve built from autograd pieces;
- the safeguards (fallback, unit-norm rescale), the damping schedules, the step, contracts and the recipe's config.

Tiny ``Linear`` networks on fixed states, float64 where numbers are compared.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from tensordict import TensorDict
from tensordict.nn import TensorDictModule
from torch import nn
from torch.distributions import Normal
from torchrl.modules import NormalParamExtractor, ProbabilisticActor, ValueOperator

import torchrl_ot.wnpg as wnpg_module
from torchrl_ot import WassersteinNaturalGradient, WNPGLoss
from torchrl_ot.training import check_config
from torchrl_ot.wnpg import gaussian_kernel_derivatives, kwng_direction

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "recipes" / "conf" / "train"
F64 = torch.float64
OBS = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [-1.0, 0.5], [0.3, -0.7], [0.2, 0.9]], dtype=F64)


def _direct(g, K, T, damping, diag_scaling=True):
    """The natural gradient by its definition: a P x P solve with K's pseudo-inverse."""
    Kp = torch.linalg.pinv(K, hermitian=True)
    if diag_scaling:
        D = 1.0 / (torch.einsum("kj,kl,lj->j", T, Kp, T).sqrt() + 1e-8)
    else:
        D = torch.ones_like(g)
    A = damping * torch.diag(1.0 / D) + T.T @ Kp @ T
    return torch.linalg.solve(A, g)


@pytest.mark.parametrize("diag_scaling", [True, False])
@pytest.mark.parametrize("rank", [3, 2])
@pytest.mark.parametrize("damping", [1e-5, 0.3])
def test_kwng_direction_equals_the_direct_solve(diag_scaling, rank, damping):
    gen = torch.Generator().manual_seed(rank)
    A = torch.randn(3, rank, generator=gen, dtype=F64)
    K = A @ A.T  # rank 2: one zero eigen-direction, which the pseudo-inverse drops
    T, g = torch.randn(3, 8, generator=gen, dtype=F64), torch.randn(8, generator=gen, dtype=F64)
    got = kwng_direction(g, K, T, damping, diag_scaling=diag_scaling)
    want = _direct(g, K, T, damping, diag_scaling)
    torch.testing.assert_close(got, want, rtol=1e-7, atol=1e-9)
    assert float(g @ got) > 0  # a positive definite preconditioner: a descent direction


def test_gaussian_kernel_derivatives_against_autograd():
    gen = torch.Generator().manual_seed(0)
    basis, points = torch.randn(3, 4, generator=gen, dtype=F64), torch.randn(5, 4, generator=gen, dtype=F64)
    coords, s = torch.tensor([2, 0, 3]), 0.7
    dkdx, dkdxdy = gaussian_kernel_derivatives(basis, points, coords, s)
    for k in range(3):
        for n in range(5):
            x, y = basis[k].clone().requires_grad_(True), points[n].clone().requires_grad_(True)
            kern = torch.exp(-((x - y) ** 2).sum() / (2 * s))
            (dx,) = torch.autograd.grad(kern, x, create_graph=True)
            torch.testing.assert_close(dkdx[k, n], dx[coords[k]].detach(), rtol=1e-12, atol=1e-14)
            (dxdy,) = torch.autograd.grad(dx[coords[k]], y)
            torch.testing.assert_close(dkdxdy[k, n], dxdy, rtol=1e-12, atol=1e-14)


def test_matrices_against_autograd_on_a_hand_written_embedding():
    gen = torch.Generator().manual_seed(1)
    W = torch.randn(3, 2, generator=gen, dtype=F64).requires_grad_(True)
    c = torch.randn(3, generator=gen, dtype=F64).requires_grad_(True)
    z = torch.randn(6, 2, generator=gen, dtype=F64)
    basis_index, coords = torch.tensor([4, 1]), torch.tensor([2, 0])

    def embedding(W, c):  # h_n = tanh(W z_n) + c, [6, 3]
        return torch.tanh(z @ W.T) + c

    natural = WassersteinNaturalGradient(num_basis=2)
    K, T, s = natural.matrices(embedding(W, c), [W, c], basis_index=basis_index, coords=coords)
    h = embedding(W, c).detach()
    zb = h[basis_index]
    assert float(s) == pytest.approx(float(((zb[:, None] - h[None]) ** 2).sum(-1).mean()), rel=1e-12)

    def dk(x, y, j):  # d k(x, y) / d x_j, differentiable in y (and so in theta through y)
        xx = x.clone().requires_grad_(True)
        kern = torch.exp(-((xx - y) ** 2).sum() / (2 * s))
        return torch.autograd.grad(kern, xx, create_graph=True)[0][j]

    # K[k, k'] = 1/L sum_n sum_r d2k(z_k, h_n)/dx_jk dy_r * d2k(z_k', h_n)/dx_jk' dy_r
    L = h.shape[0]
    grads = torch.zeros(2, L, 3, dtype=F64)
    for k in range(2):
        for n in range(L):
            y = h[n].clone().requires_grad_(True)
            grads[k, n] = torch.autograd.grad(dk(zb[k], y, coords[k]), y)[0]
    torch.testing.assert_close(K, torch.einsum("knr,mnr->km", grads, grads) / L, rtol=1e-12, atol=1e-14)

    # T[k] = d/dtheta 1/L sum_n dk(z_k, h_n(theta))/dx_jk, the basis points held fixed
    def aux(W, c):
        hh = embedding(W, c)
        return torch.stack([sum(dk(zb[k], hh[n], coords[k]) for n in range(L)) / L for k in range(2)])

    jac = torch.autograd.functional.jacobian(aux, (W.detach(), c.detach()))
    want = torch.cat([jac[0].reshape(2, -1), jac[1].reshape(2, -1)], 1)
    torch.testing.assert_close(T, want, rtol=1e-10, atol=1e-12)


def _loss(**kwargs) -> WNPGLoss:
    torch.manual_seed(0)
    net = TensorDictModule(nn.Sequential(nn.Linear(2, 4).double(), NormalParamExtractor()), ["observation"],
                           ["loc", "scale"])
    actor = ProbabilisticActor(net, in_keys=["loc", "scale"], distribution_class=Normal)
    critic = ValueOperator(nn.Linear(2, 1).double(), in_keys=["observation"])
    kwargs = {"action_dim": 2, "num_action_samples": 3, "num_features": 4, "feature_bandwidth": 0.7,
              "num_basis": 3, "damping": 0.1, "functional": False, "generator": torch.Generator().manual_seed(1),
              **kwargs}
    return WNPGLoss(actor, critic, **kwargs)


def _data() -> TensorDict:
    g = torch.Generator().manual_seed(0)
    n = OBS.shape[0]
    return TensorDict({"observation": OBS, "action": torch.randn(n, 2, generator=g, dtype=F64),
                       "action_log_prob": torch.randn(n, generator=g, dtype=F64) - 2,
                       "advantage": torch.randn(n, 1, generator=g, dtype=F64),
                       "value_target": torch.randn(n, 1, generator=g, dtype=F64),
                       "old_action_samples": torch.randn(n, 3, 2, generator=g, dtype=F64)}, batch_size=[n])


def test_loss_natural_gradient_equals_the_direct_solve_of_its_linear_system():
    loss = _loss()
    torch.manual_seed(3)
    out = loss(_data())
    # the embedding: the M reparameterised draws of the penalty, flattened, and V(s)
    emb = out["embedding"]
    assert emb.shape == (6, 3 * 2 + 1)
    value = loss.critic_network(_data().select("observation"))["state_value"]
    torch.testing.assert_close(emb[:, -1:], value)
    basis_index, coords = torch.tensor([5, 0, 2]), torch.tensor([6, 1, 3])  # coordinate 6: V(s)
    nat, info = loss.natural_gradient(out, lr=1e-3, basis_index=basis_index, coords=coords)
    params = loss.trainable_parameters()
    assert len(params) == 4  # actor weight, bias; critic weight, bias: the code preconditions both (quirk Q4)
    total = out["loss_objective"] + out["loss_wasserstein"] + out["loss_critic"]
    g = torch.cat([x.reshape(-1) for x in torch.autograd.grad(total, params, retain_graph=True)])
    K, T, _ = WassersteinNaturalGradient(num_basis=3).matrices(emb, params, basis_index=basis_index, coords=coords)
    direct = _direct(g, K, T, 0.1)
    assert info["natural_fallback"] == 0.0
    if info["natural_rescaled"]:  # longer than 0.5: divided by its norm, as the code
        direct = direct / direct.norm()
    torch.testing.assert_close(nat, direct, rtol=1e-7, atol=1e-9)
    assert info["natural_cosine"] == pytest.approx(float(g @ nat / (g.norm() * nat.norm())), rel=1e-9)


def test_natural_gradient_loss_has_the_natural_gradient_and_the_step_takes_it():
    loss = _loss(natural_clip=None)
    torch.manual_seed(4)
    out = loss(_data())
    torch.manual_seed(5)
    nat, _ = loss.natural_gradient(out, lr=0.1)
    fresh = _loss(natural_clip=None)
    torch.manual_seed(4)
    out = fresh(_data())
    torch.manual_seed(5)
    scalar, _ = fresh.natural_gradient_loss(out, lr=0.1)
    total = sum(v for k, v in out.items() if k.startswith("loss_"))
    assert float(scalar) == pytest.approx(float(total), rel=1e-12)
    params = fresh.trainable_parameters()
    grad = torch.cat([x.reshape(-1) for x in torch.autograd.grad(scalar, params)])
    torch.testing.assert_close(grad, nat, rtol=1e-12, atol=1e-14)
    # natural_step with plain SGD moves the parameters by -lr * nat_g
    step = _loss(natural_clip=None)
    before = torch.cat([p.detach().reshape(-1) for p in step.trainable_parameters()])
    torch.manual_seed(4)
    td = _data()
    optim = torch.optim.SGD(step.trainable_parameters(), lr=0.1)
    # natural_step draws the same as forward + natural_gradient above only if the seeds line up: reseed inside
    original = step.natural.matrices

    def reseeded(*args, **kwargs):
        torch.manual_seed(5)
        return original(*args, **kwargs)

    step.natural.matrices = reseeded
    step.natural_step(td, optim)
    after = torch.cat([p.detach().reshape(-1) for p in step.trainable_parameters()])
    torch.testing.assert_close(after, before - 0.1 * nat, rtol=1e-10, atol=1e-12)


def test_safeguards_fallback_and_unit_norm(monkeypatch):
    loss = _loss(natural_clip=0.5)
    torch.manual_seed(6)
    out = loss(_data())
    monkeypatch.setattr(wnpg_module, "kwng_direction", lambda g, *a, **k: -g)  # an ascent direction: refused
    direction, info = loss.natural_gradient(out, lr=1e-3)
    total = sum(v for k, v in out.items() if k.startswith("loss_"))
    g = torch.cat([x.reshape(-1) for x in torch.autograd.grad(total, loss.trainable_parameters(),
                                                              retain_graph=True)])
    assert info["natural_fallback"] == 1.0
    want = g / g.norm() if float(g.norm()) > 0.5 else g
    torch.testing.assert_close(direction, want)
    monkeypatch.setattr(wnpg_module, "kwng_direction", lambda g, *a, **k: 10 * g)
    direction, info = loss.natural_gradient(out, lr=1e-3)
    assert info["natural_rescaled"] == 1.0 and float(direction.norm()) == pytest.approx(1.0, rel=1e-9)


@pytest.mark.parametrize(("schedule", "ratio", "expected"), [
    ("levenberg_marquardt", 0.1, 1.0 / 0.85),  # the step did worse than predicted: more damping
    ("decrease_only", 0.1, 1.0),  # the WNPG TF code: never more
    ("levenberg_marquardt", 0.9, 0.85), ("decrease_only", 0.9, 0.85),  # better than predicted: less
    ("fixed", 0.9, 1.0), ("levenberg_marquardt", 0.5, 1.0)])
def test_damping_schedules(schedule, ratio, expected):
    nat = WassersteinNaturalGradient(damping=1.0, damping_schedule=schedule)
    lr, dot = 0.1, 2.0
    loss = 10.0
    for step in range(5):  # adapted every 5th step, from the largest reduction ratio since the last
        nat.dot_prod = dot
        if step:
            loss -= ratio * lr * dot / 2  # red = 2 (old - new) / (lr <g, nat_g>) = ratio
        nat.adapt_damping(loss, lr)
        nat.old_loss = loss
        if step < 4:
            assert nat.damping == 1.0
    assert nat.damping == pytest.approx(expected, rel=1e-12)
    if schedule != "fixed":
        assert nat.reduction_factor == 0.0  # the max restarts after each adaptation
    restored = WassersteinNaturalGradient()
    restored.load_state_dict(nat.state_dict())
    assert restored.state_dict() == nat.state_dict()


@pytest.mark.parametrize(("kwargs", "match"), [({"num_basis": 0}, "num_basis"), ({"kernel": "laplace"}, "kernel"),
                                               ({"damping": 0.0}, "damping"),
                                               ({"damping_schedule": "sometimes"}, "damping_schedule"),
                                               ({"natural_clip": -1.0}, "clip_norm"),
                                               ({"log_bandwidth": math.inf}, "log_bandwidth"),
                                               ({"num_features": 0}, "num_features")])
def test_loss_refuses_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        _loss(**kwargs)


def test_nan_gradient_refused():
    loss = _loss()
    out = loss(_data())
    out["loss_critic"] = out["loss_critic"] * math.nan
    with pytest.raises(ValueError, match="NaN"):
        loss.natural_gradient(out, lr=1e-3)


def _cfg(*overrides: str):
    with initialize_config_dir(config_dir=str(CONF), version_base=None):
        return compose("config", overrides=["env=Pendulum-v1", "algo=wnpg", *overrides])


def test_config_defaults_are_the_codes():
    cfg = _cfg()
    check_config(cfg)
    algo = cfg.algo
    assert (algo.num_basis, algo.damping, algo.damping_schedule, algo.natural_clip, algo.log_bandwidth,
            algo.diag_scaling, algo.penalty_coeff, algo.dual_steps) == (5, 1e-5, "decrease_only", 0.5, 0.0, True,
                                                                        0.1, 25)


@pytest.mark.parametrize(("override", "match"), [("algo.kernel=laplace", "algo.kernel"),
                                                 ("algo.num_basis=0", "algo.num_basis"),
                                                 ("algo.num_basis=1000", r"algo.num_basis=1000.*\[1, "),
                                                 ("algo.damping=0", "algo.damping"),
                                                 ("algo.damping_schedule=often", "algo.damping_schedule"),
                                                 ("algo.natural_clip=-1", "algo.natural_clip"),
                                                 ("+algo.basis=3", "unknown algo option")])
def test_config_refuses_bad_input_naming_the_key(override, match):
    with pytest.raises(ValueError, match=match):
        check_config(_cfg(override))


def test_recipe_runs_wnpg_on_pendulum(tmp_path):
    cmd = [sys.executable, str(ROOT / "recipes" / "train.py"), "progress=false", "env=Pendulum-v1", "algo=wnpg",
           "total_frames=512", "frames_per_batch=256", "num_envs=4", "num_epochs=1", "num_minibatches=2",
           "eval_every=512", "eval_episodes=1", "checkpoint_every=512", "algo.dual_steps=3",
           f"hydra.run.dir={tmp_path}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["algo"] == "wnpg" and summary["frames"] == 512 and math.isfinite(summary["final_return"])
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    assert len(ckpt["updates"]) == 2
    assert all(0 <= u["natural_fallback"] <= 1 and u["damping"] > 0 for u in ckpt["updates"])
    assert ckpt["algorithm"]["natural"]["counter"] == 4  # 2 batches x 2 minibatch steps, checkpointed
