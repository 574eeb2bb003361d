"""OT-TRPO assembled from torchrl_ot + TorchRL components in one short script (docs/assemble.md).

    python recipes/minimal.py [total_frames]        # Pendulum-v1, 100k frames by default
"""
import sys

import torch
from tensordict.nn import AddStateIndependentNormalScale, TensorDictModule
from torch import nn
from torchrl.collectors import Collector
from torchrl.data import LazyTensorStorage, ReplayBuffer, SamplerWithoutReplacement
from torchrl.envs import Compose, DoubleToFloat, GymEnv, RewardSum, TransformedEnv
from torchrl.modules import MLP, ProbabilisticActor, TanhNormal, ValueOperator

from torchrl_ot import EuclideanCost, OTTrustRegionLoss

total_frames = int(sys.argv[1]) if len(sys.argv) > 1 else 100_000
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

# The trust region: squared Euclidean transport of the actions, radius 0.3 (swap the cost here).
loss = OTTrustRegionLoss(actor, critic, cost=EuclideanCost(p=2), epsilon=0.3, critic_coeff=0.5)
loss.make_value_estimator(gamma=0.9, lmbda=0.95)  # GAE; or make_value_estimator(ValueEstimators.TDLambda, ...)
optim = torch.optim.Adam(loss.parameters(), lr=1e-3)
collector = Collector(env, actor, frames_per_batch=2048, total_frames=total_frames)
buffer = ReplayBuffer(storage=LazyTensorStorage(2048), sampler=SamplerWithoutReplacement(), batch_size=64)

for i, batch in enumerate(collector):
    with torch.no_grad():
        loss.value_estimator(batch)  # GAE, standardised over the batch, then lambda* (eq. 12) solved exactly, once
    buffer.extend(batch.reshape(-1))
    for _ in range(10 * 32):                             # 10 epochs of 32 minibatches on the fixed lambda*
        out = loss(buffer.sample())
        optim.zero_grad()
        (out["loss_objective"] + out["loss_critic"]).backward()
        nn.utils.clip_grad_norm_(loss.parameters(), 0.5)
        optim.step()
    done = batch["next", "done"]
    ret = batch["next", "episode_reward"][done].mean().item() if done.any() else float("nan")
    lam, transport = batch["ot_multiplier"].mean().item(), batch["ot_transport"].mean().item()
    print(f"batch {i}: return {ret:8.1f}  lambda* {lam:.3f}  transport {transport:.3f}")
