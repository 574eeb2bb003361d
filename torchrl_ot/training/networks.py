"""The networks of a training run: tanh MLPs with orthogonal initialisation, the actor, the critic
V(s) and OT-TRPO's advantage head, and which policy an algorithm trains."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from omegaconf import DictConfig
from tensordict.nn import AddStateIndependentNormalScale, TensorDictModule
from torch import nn
from torchrl.data.tensor_specs import Categorical as CategoricalSpec
from torchrl.data.tensor_specs import OneHot as OneHotSpec
from torchrl.envs import EnvBase, ExplorationType
from torchrl.modules import MLP, IndependentNormal, ProbabilisticActor, TanhNormal, ValueOperator


def mlp(in_features: int, out_features: int, cells: Sequence[int], gain: float) -> MLP:
    """Tanh MLP with orthogonal initialisation (as TorchRL's PPO example); ``gain`` scales the last layer.

    >>> mlp(4, 2, [8], 0.01)(torch.zeros(3, 4)).shape
    torch.Size([3, 2])
    """
    net = MLP(in_features=in_features, out_features=out_features, num_cells=list(cells),
              activation_class=nn.Tanh)
    linears = [m for m in net.modules() if isinstance(m, nn.Linear)]
    for layer in linears:
        nn.init.orthogonal_(layer.weight, math.sqrt(2))
        nn.init.zeros_(layer.bias)
    nn.init.orthogonal_(linears[-1].weight, gain)
    return net


class ObsActionMLP(nn.Module):
    """A(s, a) for ``policy=sampled``: an MLP on the concatenated observation and action."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, observation: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([observation, action], -1))


class ValueAndAdvantage(nn.Module):
    """The critic V(s) and the categorical head A(s, .) as ONE batched MLP: two tanh MLPs, no shared layers.

    Layer i of both networks is a single ``baddbmm`` on their weights stacked ``[2, in, out]``: half
    the kernels, and half the parameter tensors for gradient clipping and Adam, of two separate MLPs
    (on a CPU, small MLPs cost per kernel, not per flop). The value's last layer is padded with zero
    columns to the head's width; nothing reads those outputs, so their gradients are zero, Adam leaves
    them at zero and the function is exactly the two MLPs'. Built from the two ``MLP`` s (same depth and
    hidden sizes), whose initial weights it takes. No trunk is shared by V and A: the value regression,
    whose targets can be far larger than the advantages, would then dominate the head's.

    >>> value, advantage = ValueAndAdvantage(mlp(4, 1, [8], 1.0), mlp(4, 3, [8], 1.0))(torch.zeros(5, 4))
    >>> value.shape, advantage.shape
    (torch.Size([5, 1]), torch.Size([5, 3]))
    """

    def __init__(self, value: nn.Module, advantage: nn.Module) -> None:
        super().__init__()
        layers = [[m for m in net.modules() if isinstance(m, nn.Linear)] for net in (value, advantage)]
        shapes = [[(lin.in_features, lin.out_features) for lin in net] for net in layers]
        if len(shapes[0]) != len(shapes[1]) or shapes[0][:-1] != shapes[1][:-1] or shapes[0][-1][0] != shapes[1][-1][0]:
            raise ValueError(f"value and advantage MLPs need the same input and hidden sizes, got {shapes}")
        activations = {type(m) for net in (value, advantage) for m in net.modules()
                       if not isinstance(m, (nn.Linear, nn.Sequential))}
        if activations != {nn.Tanh}:  # forward applies tanh between the batched layers
            raise ValueError(f"value and advantage MLPs must use Tanh activations only, got {activations}")
        self.out_features = (shapes[0][-1][1], shapes[1][-1][1])
        self.weights, self.biases = nn.ParameterList(), nn.ParameterList()
        for pair in zip(*layers, strict=True):
            width = max(lin.out_features for lin in pair)
            weight = torch.zeros(2, pair[0].in_features, width)
            bias = torch.zeros(2, 1, width)
            for i, lin in enumerate(pair):
                weight[i, :, :lin.out_features] = lin.weight.detach().T
                bias[i, 0, :lin.out_features] = lin.bias.detach()
            self.weights.append(nn.Parameter(weight))
            self.biases.append(nn.Parameter(bias))

    def forward(self, observation: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        batch = observation.shape[:-1]
        h = observation.reshape(1, -1, observation.shape[-1]).expand(2, -1, -1)
        for i, (weight, bias) in enumerate(zip(self.weights, self.biases, strict=True)):
            h = torch.baddbmm(bias, h, weight)
            if i < len(self.weights) - 1:
                h = torch.tanh(h)
        n_value, n_adv = self.out_features
        return h[0, :, :n_value].reshape(*batch, n_value), h[1, :, :n_adv].reshape(*batch, n_adv)


def make_networks(env: EnvBase, cfg: DictConfig,
                  policy: str) -> tuple[ProbabilisticActor, ValueOperator, TensorDictModule | None]:
    """Actor (tanh-Gaussian or categorical), critic V(s) and, for OT-TRPO's categorical/sampled
    policies, the advantage head (``A(s, .)`` per action, or ``A(s, a)``). With ``algo.advantage_head=in_critic``
    the categorical head is computed by the critic module (which writes both) and the returned head is None.

    ``policy`` is :func:`resolve_policy`'s; ``cfg`` gives ``num_cells``, ``algo.init_scale`` (the
    Gaussian's initial std), ``action_bound`` (``tanh``: a TanhNormal onto the action box; ``clip``: a
    Gaussian whose draws the env clips) and ``algo.advantage_head``. Built in a fixed order (actor, value, head),
    so a seed gives the same initial weights whatever the head's layout.
    """
    obs_dim = env.observation_spec["observation"].shape[-1]
    action_spec = env.full_action_spec_unbatched
    space = env.action_spec_unbatched
    if isinstance(space, (CategoricalSpec, OneHotSpec)):
        n_actions = space.space.n
        logits = TensorDictModule(mlp(obs_dim, n_actions, cfg.num_cells, 0.01), ["observation"], ["logits"])
        actor = ProbabilisticActor(logits, in_keys=["logits"], spec=action_spec,
                                   distribution_class=torch.distributions.Categorical, return_log_prob=True,
                                   default_interaction_type=ExplorationType.RANDOM)
        act_dim = None
    else:
        act_dim = space.shape[-1]
        loc = nn.Sequential(mlp(obs_dim, act_dim, cfg.num_cells, 0.01),
                            AddStateIndependentNormalScale(act_dim, scale_lb=1e-4,
                                                           init_value=math.log(cfg.algo.init_scale)))
        if cfg.get("action_bound", "tanh") == "tanh":  # squashed into the box
            dist_class, dist_kwargs = TanhNormal, {"low": space.space.low, "high": space.space.high, "tanh_loc": False}
        else:  # "clip": a Gaussian on R^d, its draws clipped into the box by the env (make_env)
            dist_class, dist_kwargs = IndependentNormal, {}
        actor = ProbabilisticActor(TensorDictModule(loc, ["observation"], ["loc", "scale"]), in_keys=["loc", "scale"],
                                   spec=action_spec, distribution_class=dist_class, distribution_kwargs=dist_kwargs,
                                   return_log_prob=True, default_interaction_type=ExplorationType.RANDOM)
    value = mlp(obs_dim, 1, cfg.num_cells, 1.0)
    critic = ValueOperator(value, in_keys=["observation"])
    head = None
    if policy == "categorical":
        advantage = mlp(obs_dim, n_actions, cfg.num_cells, 1.0)  # built after `value` either way: same init
        if cfg.algo.get("advantage_head") == "in_critic":
            critic = ValueOperator(ValueAndAdvantage(value, advantage), in_keys=["observation"],
                                   out_keys=["state_value", "action_advantage"])
        else:
            head = TensorDictModule(advantage, ["observation"], ["action_advantage"])
    elif policy == "sampled":
        head = TensorDictModule(ObsActionMLP(mlp(obs_dim + act_dim, 1, cfg.num_cells, 1.0)),
                                ["observation", "action"], ["action_advantage"])
    return actor, critic, head


def resolve_policy(cfg: DictConfig, discrete: bool) -> str:
    """The policy setting for ``cfg.algo``: OT-TRPO's ``algo.policy`` (auto: categorical for discrete
    actions, gaussian otherwise); for the baselines their name (the actor as make_networks builds it).

    >>> from omegaconf import OmegaConf
    >>> resolve_policy(OmegaConf.create({"algo": {"name": "ot_trpo", "policy": "auto"}}), discrete=True)
    'categorical'
    """
    algo = cfg.algo.name
    if algo == "wpo" and not discrete:
        raise ValueError(f"algo=wpo is the discrete-action baseline; {cfg.env.name} has continuous actions")
    if algo not in ("ot_trpo", "wpo"):
        return algo
    return cfg.algo.policy if cfg.algo.policy != "auto" else ("categorical" if discrete else "gaussian")
