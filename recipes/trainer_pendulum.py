"""OT-TRPO through TorchRL's Trainer (torchrl_ot.trainers.OTTRPOTrainer) on Pendulum-v1, with TorchRL's CSV logger and
the trainer's own checkpoint (docs/torchrl_swap.md).

    python recipes/trainer_pendulum.py [total_frames] [run_dir]   # 100k frames into runs/trainer_pendulum by default

TorchRL's Trainer saves run_dir/trainer.pt after every batch (the networks, the optimiser, the collector, the hooks'
state); trainer.load_from_file(run_dir / "trainer.pt") restores them into a trainer built the same way.
"""
import sys
import warnings
from pathlib import Path

import torch
from tensordict.nn import AddStateIndependentNormalScale, TensorDictModule
from torch import nn
from torchrl.collectors import Collector
from torchrl.data import LazyTensorStorage, ReplayBuffer, SamplerWithoutReplacement
from torchrl.envs import Compose, DoubleToFloat, GymEnv, RewardSum, TransformedEnv
from torchrl.modules import MLP, ProbabilisticActor, TanhNormal, ValueOperator
from torchrl.record.loggers.csv import CSVLogger

from torchrl_ot import EuclideanCost, OTTrustRegionLoss
from torchrl_ot.trainers import OTTRPOTrainer

total_frames = int(sys.argv[1]) if len(sys.argv) > 1 else 100_000
run_dir = Path(sys.argv[2] if len(sys.argv) > 2 else "runs/trainer_pendulum")
run_dir.mkdir(parents=True, exist_ok=True)
torch.manual_seed(0)
env = TransformedEnv(GymEnv("Pendulum-v1"), Compose(DoubleToFloat(), RewardSum()))
env.set_seed(0)
obs, act = env.observation_spec["observation"].shape[-1], env.action_spec.shape[-1]
policy_net = nn.Sequential(MLP(in_features=obs, out_features=act, num_cells=[64, 64], activation_class=nn.Tanh),
                           AddStateIndependentNormalScale(act, scale_lb=1e-4))
actor = ProbabilisticActor(TensorDictModule(policy_net, ["observation"], ["loc", "scale"]), in_keys=["loc", "scale"],
                           spec=env.action_spec, distribution_class=TanhNormal, return_log_prob=True,
                           distribution_kwargs={"low": env.action_spec.space.low, "high": env.action_spec.space.high})
critic = ValueOperator(MLP(in_features=obs, out_features=1, num_cells=[64, 64], activation_class=nn.Tanh),
                       in_keys=["observation"])
loss = OTTrustRegionLoss(actor_network=actor, critic_network=critic, cost=EuclideanCost(), epsilon=0.3,
                         critic_coeff=0.5)

with warnings.catch_warnings():
    warnings.simplefilter("ignore", UserWarning)  # TorchRL marks its on-policy trainers experimental
    trainer = OTTRPOTrainer(
        collector=Collector(env, actor, frames_per_batch=2048, total_frames=total_frames),
        total_frames=total_frames, frame_skip=1, optim_steps_per_batch=None,  # every minibatch of the buffer, per epoch
        loss_module=loss, optimizer=torch.optim.Adam(loss.parameters(), lr=1e-3),
        replay_buffer=ReplayBuffer(storage=LazyTensorStorage(2048), sampler=SamplerWithoutReplacement(), batch_size=64),
        num_epochs=10, gamma=0.9, lmbda=0.95, clip_norm=0.5,
        logger=CSVLogger("ot_trpo", log_dir=str(run_dir)), log_interval=1,  # log every batch
        save_trainer_file=run_dir / "trainer.pt", save_trainer_interval=1, progress_bar=False)  # after every batch
trainer.train()
returns = [float(r) for r in trainer._log_dict["r_training"]]  # mean reward per step of each batch, as TorchRL logs it
print(f"frames {trainer.collected_frames}, lambda* solved {trainer.solve_hook.calls} times, reward per step "
      f"{returns[0]:.2f} (first batch) -> {returns[-1]:.2f} (last); logs and trainer.pt in {run_dir}")
