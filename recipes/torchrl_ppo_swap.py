"""TorchRL's PPO MuJoCo loop (sota-implementations/ppo/ppo_mujoco.py, 0.14.1) with OTTrustRegionLoss swapped in for
ClipPPOLoss (docs/torchrl_swap.md). Its structure is kept: a GAE module of its own recomputed every epoch, a replay
buffer of minibatches, one update function summing loss_critic, loss_objective and loss_entropy, the learning rate
annealed. The two lines marked SWAP are all that changed.

    python recipes/torchrl_ppo_swap.py [total_frames] [env]     # Pendulum-v1, 100k frames by default
"""
import sys

import torch
from tensordict.nn import AddStateIndependentNormalScale, TensorDictModule
from torch import nn
from torchrl.collectors import Collector
from torchrl.data import LazyTensorStorage, SamplerWithoutReplacement, TensorDictReplayBuffer
from torchrl.envs import Compose, DoubleToFloat, GymEnv, RewardSum, TransformedEnv
from torchrl.modules import MLP, ProbabilisticActor, TanhNormal, ValueOperator
from torchrl.objectives import group_optimizers
from torchrl.objectives.value.advantages import GAE

from torchrl_ot import EuclideanCost, OTTrustRegionLoss

total_frames = int(sys.argv[1]) if len(sys.argv) > 1 else 100_000
env_name = sys.argv[2] if len(sys.argv) > 2 else "Pendulum-v1"
frames_per_batch, mini_batch_size, ppo_epochs, lr = 2048, 64, 10, 3e-4
torch.manual_seed(0)
env = TransformedEnv(GymEnv(env_name), Compose(DoubleToFloat(), RewardSum()))
env.set_seed(0)
obs, act = env.observation_spec["observation"].shape[-1], env.action_spec.shape[-1]
policy_net = nn.Sequential(MLP(in_features=obs, out_features=act, num_cells=[64, 64], activation_class=nn.Tanh),
                           AddStateIndependentNormalScale(act, scale_lb=1e-4))
actor = ProbabilisticActor(TensorDictModule(policy_net, ["observation"], ["loc", "scale"]), in_keys=["loc", "scale"],
                           spec=env.action_spec, distribution_class=TanhNormal, return_log_prob=True,
                           distribution_kwargs={"low": env.action_spec.space.low, "high": env.action_spec.space.high})
critic = ValueOperator(MLP(in_features=obs, out_features=1, num_cells=[64, 64], activation_class=nn.Tanh),
                       in_keys=["observation"])
collector = Collector(env, actor, frames_per_batch=frames_per_batch, total_frames=total_frames)
data_buffer = TensorDictReplayBuffer(storage=LazyTensorStorage(frames_per_batch), sampler=SamplerWithoutReplacement(),
                                     batch_size=mini_batch_size)

adv_module = GAE(gamma=0.9 if env_name == "Pendulum-v1" else 0.99, lmbda=0.95, value_network=critic,
                 average_gae=False)
# SWAP: was ClipPPOLoss(actor_network=actor, critic_network=critic, clip_epsilon=0.2, loss_critic_type="l2",
#       entropy_coeff=0.0, critic_coeff=0.25, normalize_advantage=True)
loss_module = OTTrustRegionLoss(actor_network=actor, critic_network=critic, cost=EuclideanCost(), epsilon=0.3,
                                loss_critic_type="l2", entropy_coeff=0.0, critic_coeff=0.25, normalize_advantage=True)
adv_module.register_forward_hook(loss_module.solve_hook)  # SWAP: lambda* solved whenever the GAE module runs

actor_optim = torch.optim.Adam(actor.parameters(), lr=lr, eps=1e-5)
critic_optim = torch.optim.Adam(critic.parameters(), lr=lr, eps=1e-5)
optim = group_optimizers(actor_optim, critic_optim)
total_network_updates = (total_frames // frames_per_batch) * ppo_epochs * (frames_per_batch // mini_batch_size)


def update(batch, num_network_updates):
    optim.zero_grad(set_to_none=True)
    alpha = max(0.0, 1 - num_network_updates / total_network_updates)
    for group in optim.param_groups:
        group["lr"] = lr * alpha
    loss = loss_module(batch)
    total_loss = loss["loss_critic"] + loss["loss_objective"] + loss["loss_entropy"]
    total_loss.backward()
    optim.step()
    return loss.detach(), num_network_updates + 1


num_network_updates = 0
for i, data in enumerate(collector):
    for _ in range(ppo_epochs):
        with torch.no_grad():
            data = adv_module(data)  # GAE, then (the hook) lambda* on the standardised advantages
        data_buffer.extend(data.reshape(-1))
        for batch in data_buffer:
            loss, num_network_updates = update(batch, num_network_updates)
    done = data["next", "done"]
    ret = data["next", "episode_reward"][done].mean().item() if done.any() else float("nan")
    print(f"batch {i}: return {ret:8.1f}  lambda* {data['ot_multiplier'].mean().item():.3f}  "
          f"transport {data['ot_transport'].mean().item():.3f}")
