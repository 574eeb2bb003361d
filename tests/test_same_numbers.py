"""The refactoring contract: a short run of every loss setting gives the numbers recorded before the loss
was split into one class per policy setting (tests/data/loss_numbers.json, written by the single-class
``OTTrustRegionLoss`` of commit 73940bd with ``python tests/test_same_numbers.py --record``).

Each run: tiny fixed networks and a fixed batch, ``solve_multiplier``, six Adam steps on minibatches,
``project_into_trust_region``. Recorded: lam*, t*, the exact transport, every loss and diagnostic of every
step, what the projection kept and the final parameters. Any change to the maths moves these by far more
than the tolerance, which only absorbs float32 kernels differing between CPUs.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from tensordict import TensorDict
from tensordict.nn import TensorDictModule
from torch import nn
from torchrl.modules import NormalParamExtractor, ProbabilisticActor, TanhNormal, ValueOperator

from torchrl_ot import DiscreteMetricCost, EuclideanCost, OTTrustRegionLoss

DATA = Path(__file__).parent / "data" / "loss_numbers.json"
OBS, N_ACT, BATCH = 3, 3, 32
SETTINGS = {
    "gaussian": {"policy": "gaussian"},
    "gaussian_mirror_entropy": {"policy": "gaussian", "mirror": True, "entropy_coeff": 0.01},
    "gaussian_not_functional": {"policy": "gaussian", "functional": False},
    "categorical": {"policy": "categorical", "entropy_coeff": 0.01},
    "categorical_head_in_critic": {"policy": "categorical", "head_in_critic": True},
    "categorical_wpo": {"policy": "categorical", "split": False},
    "sampled": {"policy": "sampled", "num_candidates": 4},
    "sampled_l1_sum": {"policy": "sampled", "loss_critic_type": "l1", "reduction": "sum"},
}


class _ObsAction(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(OBS + 1, 1)

    def forward(self, observation, action):
        return self.linear(torch.cat([observation, action], -1))


class _ValueAndHead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.value, self.head = nn.Linear(OBS, 1), nn.Linear(OBS, N_ACT)

    def forward(self, observation):
        return self.value(observation), self.head(observation)


def _build(policy: str, head_in_critic: bool = False, **kwargs) -> OTTrustRegionLoss:
    torch.manual_seed(0)
    critic = ValueOperator(nn.Linear(OBS, 1), in_keys=["observation"])
    head = None
    if policy == "categorical":
        net = TensorDictModule(nn.Linear(OBS, N_ACT), ["observation"], ["logits"])
        actor = ProbabilisticActor(net, in_keys=["logits"], distribution_class=torch.distributions.Categorical,
                                   return_log_prob=True)
        cost = DiscreteMetricCost()
        if head_in_critic:
            critic = ValueOperator(_ValueAndHead(), in_keys=["observation"],
                                   out_keys=["state_value", "action_advantage"])
        else:
            head = TensorDictModule(nn.Linear(OBS, N_ACT), ["observation"], ["action_advantage"])
    else:
        net = TensorDictModule(nn.Sequential(nn.Linear(OBS, 2), NormalParamExtractor()), ["observation"],
                               ["loc", "scale"])
        actor = ProbabilisticActor(net, in_keys=["loc", "scale"], distribution_class=TanhNormal,
                                   distribution_kwargs={"low": -2.0, "high": 2.0}, return_log_prob=True)
        cost = EuclideanCost()
        if policy == "sampled":
            head = TensorDictModule(_ObsAction(), ["observation", "action"], ["action_advantage"])
    # The numbers were recorded on the raw advantages (normalisation in solve_multiplier came later, off here).
    return OTTrustRegionLoss(actor, critic, cost=cost, epsilon=0.05, policy=policy, advantage_network=head,
                             normalize_advantage=False, **kwargs)


def _batch(policy: str) -> TensorDict:
    g = torch.Generator().manual_seed(1)
    action = (torch.randint(0, N_ACT, (BATCH,), generator=g) if policy == "categorical"
              else 1.8 * torch.rand(BATCH, 1, generator=g) - 0.9)
    return TensorDict({"observation": torch.randn(BATCH, OBS, generator=g), "action": action,
                       "advantage": torch.randn(BATCH, 1, generator=g),
                       "value_target": torch.randn(BATCH, 1, generator=g)}, batch_size=[BATCH])


def _numbers(name: str) -> dict[str, list[float]]:
    options = dict(SETTINGS[name])
    loss = _build(**options)
    data = _batch(options["policy"])
    torch.manual_seed(2)  # the sampled setting draws its candidates in solve_multiplier
    sol = loss.solve_multiplier(data)
    out: dict[str, list[float]] = {"solution": [float(sol.multiplier), float(sol.split), float(sol.transport)]}
    theta_old = loss.actor_parameters()
    optim = torch.optim.Adam(loss.parameters(), lr=0.05)
    for step in range(6):
        index = torch.arange(step % 2, BATCH, 2)
        losses = loss(data[index])
        for key in sorted(losses.keys()):
            out.setdefault(key, []).append(float(losses[key].detach().sum()))
        optim.zero_grad()
        sum(v.sum() for k, v in losses.items() if k.startswith("loss_")).backward()
        optim.step()
    out["realised_before_projection"] = [float(loss.realised_transport(data))]
    proj = loss.project_into_trust_region(data, theta_old)
    out["projection"] = [float(proj["realised_transport"]), float(proj["step_fraction"]), float(proj["backtracks"])]
    params = torch.cat([p.detach().reshape(-1) for p in loss.parameters()])
    out["parameters"] = params.tolist()
    return out


@pytest.mark.parametrize("name", sorted(SETTINGS))
def test_a_short_run_gives_the_numbers_recorded_before_the_split(name):
    recorded = json.loads(DATA.read_text())[name]
    got = _numbers(name)
    assert sorted(got) == sorted(recorded)
    for key, values in recorded.items():
        torch.testing.assert_close(torch.tensor(got[key], dtype=torch.float64),
                                   torch.tensor(values, dtype=torch.float64), rtol=1e-4, atol=1e-6,
                                   msg=lambda m, key=key: f"{name}, {key}: {m}")


if __name__ == "__main__" and "--record" in sys.argv:
    DATA.parent.mkdir(exist_ok=True)
    DATA.write_text(json.dumps({name: _numbers(name) for name in sorted(SETTINGS)}, indent=1) + "\n")
    print(f"wrote {DATA}")
