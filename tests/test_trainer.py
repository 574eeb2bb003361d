"""OTTRPOTrainer and its hooks in TorchRL's own Trainer loop: lambda* solved exactly once per collected batch, every
update projected into the radius before the collector gets the weights, TorchRL's logger and checkpoint."""

from __future__ import annotations

import csv
import warnings

import pytest
import torch
from tensordict.nn import AddStateIndependentNormalScale, TensorDictModule
from torch import nn
from torchrl.collectors import Collector
from torchrl.data import LazyTensorStorage, ReplayBuffer, SamplerWithoutReplacement
from torchrl.envs import Compose, DoubleToFloat, GymEnv, RewardSum, TransformedEnv
from torchrl.modules import MLP, ProbabilisticActor, TanhNormal, ValueOperator
from torchrl.record.loggers.csv import CSVLogger

from torchrl_ot import EuclideanCost, OTTrustRegionLoss
from torchrl_ot.trainers import OTTRPOTrainer, SolveMultiplierHook, TrustRegionProjectionHook

FRAMES, BATCHES = 256, 3


def _trainer(tmp_path, **kwargs):
    torch.manual_seed(0)
    env = TransformedEnv(GymEnv("Pendulum-v1"), Compose(DoubleToFloat(), RewardSum()))
    env.set_seed(0)
    net = nn.Sequential(MLP(in_features=3, out_features=1, num_cells=[16], activation_class=nn.Tanh),
                        AddStateIndependentNormalScale(1, scale_lb=1e-4))
    actor = ProbabilisticActor(TensorDictModule(net, ["observation"], ["loc", "scale"]), in_keys=["loc", "scale"],
                               spec=env.action_spec, distribution_class=TanhNormal, return_log_prob=True,
                               distribution_kwargs={"low": -2.0, "high": 2.0})
    critic = ValueOperator(MLP(in_features=3, out_features=1, num_cells=[16], activation_class=nn.Tanh),
                           in_keys=["observation"])
    loss = OTTrustRegionLoss(actor_network=actor, critic_network=critic, cost=EuclideanCost(), epsilon=0.3,
                             critic_coeff=0.5, entropy_coeff=None)
    collector = Collector(env, actor, frames_per_batch=FRAMES, total_frames=FRAMES * BATCHES)
    buffer = ReplayBuffer(storage=LazyTensorStorage(FRAMES), sampler=SamplerWithoutReplacement(), batch_size=64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # OnPolicyTrainer: "experimental/prototype feature"
        trainer = OTTRPOTrainer(collector=collector, total_frames=FRAMES * BATCHES, frame_skip=1,
                                optim_steps_per_batch=None, loss_module=loss,
                                optimizer=torch.optim.Adam(loss.parameters(), lr=3e-3), replay_buffer=buffer,
                                logger=CSVLogger("ot", log_dir=str(tmp_path)), log_interval=1, progress_bar=False,
                                save_trainer_file=tmp_path / "trainer.pt", save_trainer_interval=1, num_epochs=2,
                                gamma=0.9, **kwargs)
    return trainer, loss


def test_trainer_solves_once_per_batch_projects_logs_and_checkpoints(tmp_path, monkeypatch):
    trainer, loss = _trainer(tmp_path)
    solves, projections, weights_sent = [], [], []
    real_solve, real_project = loss.solve_multiplier, loss.project_into_trust_region
    monkeypatch.setattr(loss, "solve_multiplier", lambda td: solves.append(1) or real_solve(td))

    def project(batch, theta_old, **kw):
        out = real_project(batch, theta_old, **kw)
        projections.append((out["realised_transport"].item(), loss.actor_parameters()))
        return out

    monkeypatch.setattr(loss, "project_into_trust_region", project)
    real_update = trainer.collector.update_policy_weights_
    monkeypatch.setattr(trainer.collector, "update_policy_weights_",
                        lambda *a, **k: weights_sent.append(loss.actor_parameters()) or real_update(*a, **k))
    trainer.train()
    assert len(solves) == BATCHES and trainer.solve_hook.calls == BATCHES  # once per batch, not per epoch
    assert len(projections) == BATCHES
    assert all(moved <= loss.epsilon * (1 + 1e-9) for moved, _ in projections)
    # The collector got the projected actor: the projection ran before each weight update.
    assert weights_sent and all(any(torch.equal(w, p) for _, p in projections) for w in weights_sent)
    logged = {path.stem for path in tmp_path.rglob("*.csv")}
    assert {"ot_multiplier", "realised_transport_over_epsilon", "ot_transport_over_epsilon"} <= logged
    rows = list(csv.reader(open(next(tmp_path.rglob("ot_multiplier.csv")))))
    assert rows and all(float(r[1]) > 0 for r in rows)
    assert (tmp_path / "trainer.pt").exists()
    fresh, fresh_loss = _trainer(tmp_path / "again")
    fresh.load_from_file(tmp_path / "trainer.pt")
    assert fresh.solve_hook.calls == BATCHES
    assert torch.equal(fresh_loss.actor_parameters(), loss.actor_parameters())


def test_hooks_and_trainer_refuse_bad_input(tmp_path):
    with pytest.raises(ValueError, match="loss_module"):
        SolveMultiplierHook(nn.Linear(1, 1))
    trainer, loss = _trainer(tmp_path)
    with pytest.raises(ValueError, match="solve"):
        TrustRegionProjectionHook(object())
    with pytest.raises(ValueError, match="max_extension"):
        TrustRegionProjectionHook(trainer.solve_hook, max_extension=0.5)
    with pytest.raises(ValueError, match="add_gae"):
        _trainer(tmp_path / "x", add_gae=True)
    with pytest.raises(ValueError, match="enforce_radius"):
        _trainer(tmp_path / "y", enforce_radius="yes")
