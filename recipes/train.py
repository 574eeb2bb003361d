"""Deep OT-TRPO (or a baseline: PPO, A2C, TRPO, WPO) on any gymnasium env with flat Box or Discrete
observations (the latter seen one-hot).

OT-TRPO is :class:`torchrl_ot.OTTrustRegionLoss` (Algorithm 1, Section 5): per collected batch, GAE
advantages, the exact lambda* of the dual (eq. 12) solved ONCE, then ``num_epochs`` x
``num_minibatches`` Adam steps on that fixed lambda*. ``algo=ppo`` swaps in TorchRL's ``ClipPPOLoss``,
``algo=a2c`` its ``A2CLoss`` (one step per batch), ``algo=trpo`` :class:`torchrl_ot.TRPOLoss` (one
natural-gradient actor step per batch, the critic on the minibatches) and ``algo=wpo`` the OT loss
without mass splitting (discrete actions), with everything else identical (collector, batch,
networks, optimiser). Reads top to bottom:

    python recipes/train.py                                     # CartPole-v1, OT-TRPO
    python recipes/train.py env=Pendulum-v1 algo=ppo seed=3
    python recipes/train.py env.name=MountainCar-v0 total_frames=300000 algo.epsilon=0.05
    python recipes/train.py env=Pendulum-v1 resume=true          # continue a killed run

Writes into the run directory (``runs/train/<env>/<algo>/seed<seed>``): the TorchRL logger's
scalars (CSV by default, ``logs/scalars/*.csv``), ``checkpoint.pt`` every ``checkpoint_every``
frames, ``summary.json`` and ``curve.png`` (deterministic evaluation return against frames).

Exact resume. The run is cut into *segments* at the checkpoint boundaries (multiples of
``checkpoint_every`` frames). Every segment builds a FRESH env and collector, seeded with
``seed + frames_done``; after its last update (and evaluation, if due) the collector is shut down
and the checkpoint written: actor, critic, advantage head, optimiser, observation-normalisation
statistics, frames, evaluation history, per-update diagnostics and the RNG states of torch, numpy
and python. A resumed run restores all of that and enters the next segment exactly as the
uninterrupted run does, through the same code with the same state; nothing carries over in an env
or a collector, whose internal state could not be saved. So on CPU with ``num_collectors=1`` a run
killed after a checkpoint and resumed with ``resume=true`` ends with the same final_return, frames
and evaluation history, bit for bit, as the uninterrupted run (tests/test_recipe_train.py). The
price: an episode in flight at a boundary is cut (GAE bootstraps it, as at any batch end), once per
``checkpoint_every`` frames. With ``num_collectors > 1`` the workers share the normalisation
statistics in shared memory and update them in a racy order: a resumed run is a faithful
continuation, not a bit-identical one.
"""

from __future__ import annotations

import difflib
import functools
import json
import math
import os
import random
import statistics
import sys
import time
import warnings
from pathlib import Path

import gymnasium as gym
import hydra
import matplotlib
import numpy as np
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from tensordict import TensorDict
from tensordict.nn import AddStateIndependentNormalScale, TensorDictModule
from torch import nn
from torchrl.collectors import Collector
from torchrl.data import ReplayBuffer, TensorStorage
from torchrl.data.replay_buffers.samplers import SamplerWithoutReplacement
from torchrl.data.tensor_specs import Categorical as CategoricalSpec
from torchrl.data.tensor_specs import OneHot as OneHotSpec
from torchrl.envs import (
    ClipTransform,
    Compose,
    DoubleToFloat,
    EnvCreator,
    ExplorationType,
    GymWrapper,
    RewardSum,
    StepCounter,
    TransformedEnv,
    VecNormV2,
    set_exploration_type,
)
from torchrl.modules import MLP, ProbabilisticActor, TanhNormal, ValueOperator
from torchrl.objectives import A2CLoss, ClipPPOLoss
from torchrl.objectives.utils import ValueEstimators
from torchrl.record.loggers import get_logger
from tqdm import tqdm

import torchrl_ot  # noqa: F401  (registers NChain-v0)
from torchrl_ot.costs import DiscreteMetricCost, EuclideanCost
from torchrl_ot.envs import OneHotObservation
from torchrl_ot.loss import OTTrustRegionLoss
from torchrl_ot.tabular import episode_limit
from torchrl_ot.trpo import TRPOLoss

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

EVAL_SEED_OFFSET = 10_000
PHASES = ("advantage", "solve", "epochs", "project")  # an update's parts, timed (summary: update_time_breakdown_s)
# Batch entries that no loss reads once the advantages are computed (left out of the minibatches).
UNUSED_AFTER_ADVANTAGES = ("next", "collector", "done", "terminated", "truncated", "episode_reward", "step_count")
# VecNormV2 calls batched envs "experimental"; with reduce_batch_dims=True it averages over the copies.
warnings.filterwarnings("ignore", message="Support of VecNormV2 for containers")


# ----------------------------------------------------------------------------------------------
# environment


def check_env_name(name: str) -> None:
    """Refuse an unknown gymnasium id up front, suggesting close matches."""
    if name not in gym.registry:
        close = difflib.get_close_matches(name, list(gym.registry), n=5, cutoff=0.6)
        hint = f"; did you mean one of {close}?" if close else ""
        raise ValueError(f"unknown gymnasium environment env.name={name!r}{hint} "
                         "(any id registered with gymnasium works, e.g. env.name=Acrobot-v1)")


def make_env(name: str, seed: int, obs_stats: TensorDict | None, cfg: DictConfig, *, num_envs: int,
             frozen: bool = False) -> TransformedEnv:
    """``num_envs`` synchronous gymnasium copies as one TorchRL env ``[num_envs]``, float32 observations,
    running normalisation, episode return/length; seeded (copy i gets ``seed + i``).

    ``obs_stats`` (loc/var/count) is the single store of the normalisation statistics: the VecNormV2
    transform updates it in place (``shared_data``), so the run loop checkpoints it and the next fresh
    env continues from it. ``frozen``: normalise without updating the statistics (evaluation).
    """
    def make_vec(tabular: bool) -> gym.vector.VectorEnv:
        return gym.make_vec(name, num_envs=num_envs, vectorization_mode="sync",
                            wrappers=[OneHotObservation] if tabular else None,
                            max_episode_steps=episode_limit(name) if tabular else None,
                            # TorchRL resets finished copies itself; gymnasium's autoreset would hide final states.
                            vector_kwargs={"autoreset_mode": gym.vector.AutoresetMode.DISABLED})

    try:
        vec = make_vec(tabular=False)
        if isinstance(vec.single_observation_space, gym.spaces.Discrete):
            # Tabular envs are seen as one-hot vectors (as the network baselines of the paper's discrete
            # experiments), with the tabular recipe's time limit (CliffWalking has none).
            vec.close()
            vec = make_vec(tabular=True)
    except (ModuleNotFoundError, gym.error.DependencyNotInstalled) as err:  # e.g. MuJoCo without imageio
        raise ModuleNotFoundError(f"environment {name!r} needs a missing package: {err}. "
                                  "MuJoCo envs need `pip install 'gymnasium[mujoco]'`.") from err
    obs_space, act_space = vec.single_observation_space, vec.single_action_space
    if not isinstance(obs_space, gym.spaces.Box) or len(obs_space.shape) != 1:
        raise ValueError(f"env.name={name!r}: this recipe needs a flat Box observation space, got {obs_space}")
    bounded_box = (isinstance(act_space, gym.spaces.Box) and len(act_space.shape) == 1
                   and np.isfinite(act_space.low).all() and np.isfinite(act_space.high).all())
    if not (isinstance(act_space, gym.spaces.Discrete) or bounded_box):  # TanhNormal needs finite bounds
        raise ValueError(f"env.name={name!r}: this recipe needs Discrete actions or a bounded flat Box, "
                         f"got {act_space}")
    base = GymWrapper(vec, categorical_action_encoding=True)
    transforms = []
    if base.observation_spec["observation"].dtype == torch.float64:
        transforms.append(DoubleToFloat(in_keys=["observation"]))
    if obs_stats is not None:
        norm = VecNormV2(in_keys=["observation"], decay=cfg.obs_norm.decay, eps=cfg.obs_norm.eps,
                         shared_data=obs_stats, reduce_batch_dims=True)
        transforms += [norm.freeze() if frozen else norm,
                       ClipTransform(in_keys=["observation"], low=-cfg.obs_norm.clip, high=cfg.obs_norm.clip)]
    transforms += [RewardSum(), StepCounter()]
    env = TransformedEnv(base, Compose(*transforms))
    env.set_seed(seed)
    return env


def new_obs_stats(obs_dim: int) -> TensorDict:
    """Zero statistics in VecNormV2's layout (it bias-corrects the running moments, so zeros are a clean start)."""
    zeros = torch.zeros(obs_dim)
    return TensorDict({"loc": {"observation": zeros.clone()}, "var": {"observation": zeros.clone()},
                       "count": {"observation": torch.zeros((), dtype=torch.int64)}}, batch_size=[])


# ----------------------------------------------------------------------------------------------
# networks


def mlp(in_features: int, out_features: int, cells, gain: float) -> MLP:
    """Tanh MLP with orthogonal initialisation (as TorchRL's PPO example); ``gain`` scales the last layer."""
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
    the kernels, and half the parameter tensors for gradient clipping and Adam, of two separate MLPs,
    and on a CPU a minibatch step costs about that (docs/results.md, throughput). The value's last
    layer is padded with zero columns to the head's width; nothing reads those outputs, so their
    gradients are zero, Adam leaves them at zero and the function is exactly the two MLPs'. Built
    from the two ``MLP`` s (same depth and hidden sizes), whose initial weights it takes. A trunk
    shared by V and A would be cheaper still, but the value regression, with returns in the hundreds
    on CliffWalking, then swamps the head's and OT-TRPO stops learning there.
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


def make_networks(env: TransformedEnv, cfg: DictConfig, policy: str):
    """Actor (tanh-Gaussian or categorical), critic V(s) and, for OT-TRPO's categorical/sampled
    policies, the advantage head (``A(s, .)`` per action, or ``A(s, a)``). With ``algo.advantage_head=in_critic``
    the categorical head is computed by the critic module (which writes both) and the returned head is None."""
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
        actor = ProbabilisticActor(TensorDictModule(loc, ["observation"], ["loc", "scale"]), in_keys=["loc", "scale"],
                                   spec=action_spec, distribution_class=TanhNormal,
                                   distribution_kwargs={"low": space.space.low, "high": space.space.high,
                                                        "tanh_loc": False},
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
    actions, gaussian otherwise); for the baselines their name (the actor as make_networks builds it)."""
    algo = cfg.algo.name
    if algo == "wpo" and not discrete:
        raise ValueError(f"algo=wpo is the discrete-action baseline; {cfg.env.name} has continuous actions")
    if algo not in ("ot_trpo", "wpo"):
        return algo
    return cfg.algo.policy if cfg.algo.policy != "auto" else ("categorical" if discrete else "gaussian")


def make_loss(cfg: DictConfig, policy: str, discrete: bool, actor, critic, head):
    """The loss for ``cfg.algo.name`` (OTTrustRegionLoss for ot_trpo and wpo, TorchRL's ClipPPOLoss and
    A2CLoss, our TRPOLoss) with its value estimator; returns it and the transport cost (None for the
    baselines)."""
    algo = cfg.algo.name
    if algo in ("ot_trpo", "wpo"):
        if cfg.cost.get("_target_") is None:  # cost=auto
            cost = DiscreteMetricCost() if discrete else EuclideanCost(p=2)
        else:
            cost = instantiate(cfg.cost)
        loss_module = OTTrustRegionLoss(
            actor, critic, cost=cost, epsilon=cfg.algo.epsilon, policy=policy, advantage_network=head,
            num_candidates=cfg.algo.num_candidates, split=algo == "ot_trpo",
            mirror=cfg.algo.mirror,  # the loss refuses it for a non-Gaussian policy, naming both
            entropy_coeff=cfg.algo.entropy_coeff or None,
            critic_coeff=cfg.algo.critic_coeff, loss_critic_type=cfg.algo.loss_critic_type)
    elif algo == "ppo":
        cost = None
        loss_module = ClipPPOLoss(actor, critic, clip_epsilon=cfg.algo.clip_epsilon,
                                  entropy_bonus=bool(cfg.algo.entropy_coeff), entropy_coeff=cfg.algo.entropy_coeff,
                                  critic_coeff=cfg.algo.critic_coeff, loss_critic_type=cfg.algo.loss_critic_type,
                                  normalize_advantage=cfg.algo.normalize_advantage)
    elif algo == "a2c":
        cost = None
        loss_module = A2CLoss(actor, critic, entropy_bonus=bool(cfg.algo.entropy_coeff),
                              entropy_coeff=cfg.algo.entropy_coeff, critic_coeff=cfg.algo.critic_coeff,
                              loss_critic_type=cfg.algo.loss_critic_type)
    elif algo == "trpo":
        cost = None
        loss_module = TRPOLoss(actor, critic, max_kl=cfg.algo.max_kl, cg_iters=cfg.algo.cg_iters,
                               cg_damping=cfg.algo.cg_damping, backtrack_iters=cfg.algo.backtrack_iters,
                               backtrack_coeff=cfg.algo.backtrack_coeff, entropy_coeff=cfg.algo.entropy_coeff or None,
                               critic_coeff=cfg.algo.critic_coeff, loss_critic_type=cfg.algo.loss_critic_type)
    else:
        raise ValueError(f"unknown algo.name={algo!r}")
    estimator_kwargs = {"gamma": cfg.env.gamma}
    if cfg.estimator.lmbda is not None:
        estimator_kwargs["lmbda"] = cfg.estimator.lmbda
    loss_module.make_value_estimator(ValueEstimators[cfg.estimator.value_type], **estimator_kwargs)
    return loss_module, cost


# ----------------------------------------------------------------------------------------------
# evaluation and checkpoints


def evaluate(actor, cfg: DictConfig, obs_stats: TensorDict | None, horizon: int) -> list[float]:
    """First-episode returns of ``eval_episodes`` copies of the env run side by side with the
    deterministic policy, seeded ``seed + 10000`` every time (evaluations differ only through the
    policy), normalised with frozen statistics. The torch RNG is forked, so evaluating never changes
    what training does."""
    # Before any training step the statistics are empty (count 0): let the evaluation's own copy warm up.
    frozen = obs_stats is not None and bool(obs_stats["count", "observation"] > 0)
    env = make_env(cfg.env.name, cfg.seed + EVAL_SEED_OFFSET, None if obs_stats is None else obs_stats.clone(),
                   cfg, num_envs=cfg.eval_episodes, frozen=frozen)
    with torch.random.fork_rng(devices=[]), torch.no_grad(), set_exploration_type(ExplorationType.DETERMINISTIC):
        rollout = env.rollout(horizon, actor, break_when_any_done=False)  # finished copies are reset
    env.close()
    reward = rollout["next", "reward"].squeeze(-1).double()
    done = rollout["next", "done"].squeeze(-1).long()
    before_first = (done.cumsum(-1) - done) == 0  # rewards up to and including each copy's first done
    return (reward * before_first).sum(-1).tolist()


def rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


def save_checkpoint(path: Path, state: dict) -> None:
    """Write atomically (temporary file, then rename): a kill mid-write leaves the previous checkpoint."""
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def truncate_csv_logs(log_dir: Path, frames: int) -> None:
    """Drop CSV rows logged after ``frames``: on resume the killed run's lost tail, so that each step
    appears once; with ``frames=-1`` every row (a fresh run in a used directory)."""
    for csv_file in (log_dir / "scalars").glob("*.csv") if (log_dir / "scalars").is_dir() else []:
        rows = [r for r in csv_file.read_text().splitlines() if r and float(r.split(",")[0]) <= frames]
        csv_file.write_text("".join(r + "\n" for r in rows))


# ----------------------------------------------------------------------------------------------


@hydra.main(config_path="conf/train", config_name="config", version_base=None)
def main(cfg: DictConfig) -> dict:
    # --- validate the configuration before building anything ----------------------------------
    algo = cfg.algo.name
    # A2C is one gradient step on the whole batch: its algo config fixes num_epochs = num_minibatches = 1.
    num_epochs = cfg.algo.get("num_epochs") or cfg.num_epochs
    num_minibatches = cfg.algo.get("num_minibatches") or cfg.num_minibatches
    ot_family = algo in ("ot_trpo", "wpo")  # wpo: the same loss with the no-splitting rule
    if ot_family and not (cfg.algo.epsilon > 0 and math.isfinite(cfg.algo.epsilon)):
        raise ValueError(f"algo.epsilon must be positive and finite, got {cfg.algo.epsilon}")
    if ot_family and cfg.algo.advantage_head not in ("in_critic", "separate"):
        raise ValueError(f"algo.advantage_head must be 'in_critic' or 'separate', got {cfg.algo.advantage_head!r}")
    for key in ("total_frames", "frames_per_batch", "num_envs", "num_epochs", "num_minibatches", "eval_every",
                "eval_episodes", "checkpoint_every", "num_collectors", "num_threads"):
        if not (isinstance(cfg[key], int) and cfg[key] >= 1):
            raise ValueError(f"{key} must be a positive integer, got {cfg[key]!r}")
    if cfg.frames_per_batch % num_minibatches or cfg.frames_per_batch % (cfg.num_envs * cfg.num_collectors):
        raise ValueError(f"frames_per_batch={cfg.frames_per_batch} must be divisible by num_minibatches="
                         f"{num_minibatches} and by num_envs x num_collectors={cfg.num_envs * cfg.num_collectors}")
    check_env_name(cfg.env.name)
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    ckpt_path = run_dir / "checkpoint.pt"
    torch.set_num_threads(cfg.num_threads)
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    random.seed(cfg.seed)
    start = time.perf_counter()

    # --- env specs, policy type, networks, loss ------------------------------------------------
    probe = make_env(cfg.env.name, cfg.seed, None, cfg, num_envs=1)
    discrete = isinstance(probe.action_spec_unbatched, (CategoricalSpec, OneHotSpec))
    if cfg.env.get("discrete") is not None and bool(cfg.env.discrete) != discrete:
        warnings.warn(f"env.discrete={cfg.env.discrete} (env group), but {cfg.env.name} has "
                      f"{'discrete' if discrete else 'continuous'} actions: using the env's action space", stacklevel=1)
    obs_dim = probe.observation_spec["observation"].shape[-1]
    horizon = episode_limit(cfg.env.name)
    policy = resolve_policy(cfg, discrete)
    actor, critic, head = make_networks(probe, cfg, policy)
    probe.close()

    loss_module, cost = make_loss(cfg, policy, discrete, actor, critic, head)
    # fused: one kernel over all parameter tensors. The OT head's extra tensors otherwise cost a
    # per-tensor Python loop on every minibatch step (the profile in docs/results.md, throughput).
    optim = torch.optim.Adam(loss_module.parameters(), lr=cfg.lr, eps=cfg.adam_eps, fused=cfg.adam_fused)
    obs_stats = new_obs_stats(obs_dim) if cfg.obs_norm.enabled else None
    if obs_stats is not None and cfg.num_collectors > 1:
        obs_stats.share_memory_()  # the worker processes update these very tensors

    fpb, mb_size = cfg.frames_per_batch, cfg.frames_per_batch // num_minibatches
    # The paper's Gaussian case has a FIXED variance (step 4 case 2): the hinge objective trains only the
    # mean. algo.final_scale optionally anneals that fixed scale linearly in frames (set, never learned),
    # and epsilon with its square: the radius stays the same multiple of the noise's own transport.
    log_scale = None
    if policy == "gaussian" and cfg.algo.final_scale is not None:
        log_scale = next(p for n, p in actor.named_parameters() if n.endswith("state_independent_scale"))

    def scheduled_scale(frames_done: int) -> float:
        frac = min(frames_done / cfg.total_frames, 1.0)
        return cfg.algo.init_scale + frac * (cfg.algo.final_scale - cfg.algo.init_scale)

    # --- resume -----------------------------------------------------------------------------------
    frames, train_time, wall_before, history, updates = 0, 0.0, 0.0, [], []
    if cfg.resume and ckpt_path.exists():
        ckpt = torch.load(ckpt_path, weights_only=False)
        saved = ckpt["config"]
        if (saved["env"]["name"], saved["algo"]["name"], saved["frames_per_batch"]) != (cfg.env.name, algo, fpb):
            raise ValueError(f"{ckpt_path} is a {saved['env']['name']}/{saved['algo']['name']} run with "
                             f"frames_per_batch={saved['frames_per_batch']}; refusing to resume it as "
                             f"{cfg.env.name}/{algo} with frames_per_batch={fpb}")
        actor.load_state_dict(ckpt["actor"])
        critic.load_state_dict(ckpt["critic"])
        if head is not None:
            head.load_state_dict(ckpt["advantage"])
        optim.load_state_dict(ckpt["optimizer"])
        if obs_stats is not None:
            obs_stats.update_(ckpt["obs_stats"])
        frames, train_time, history, updates = ckpt["frames"], ckpt["train_time"], ckpt["history"], ckpt["updates"]
        wall_before = ckpt["wall_time_s"]  # wall time of the killed run up to its checkpoint
        set_rng_state(ckpt["rng"])
        if cfg.logger.backend == "csv":
            truncate_csv_logs(run_dir / "logs", frames)
        print(f"resumed from {ckpt_path} at {frames} frames")
    elif cfg.resume:
        print(f"resume=true but no checkpoint at {ckpt_path}: starting from scratch")
    if frames == 0 and cfg.logger.backend == "csv":
        # A fresh run in a used run directory: TorchRL's CSV logger appends, so an earlier run's rows
        # would otherwise precede this run's in every curve.
        truncate_csv_logs(run_dir / "logs", -1)

    try:
        logger = get_logger(cfg.logger.backend, logger_name=str(run_dir), experiment_name="logs",
                            wandb_kwargs={"project": cfg.logger.project,
                                          "config": OmegaConf.to_container(cfg, resolve=True)})
    except ImportError as err:
        raise ImportError(f"logger={cfg.logger.backend} needs its package: {err}; "
                          f"pip install {cfg.logger.backend}, or use logger=csv") from err

    def log_and_record_eval(frames_now: int) -> None:
        returns = evaluate(actor, cfg, obs_stats, horizon)
        history.append({"frames": frames_now, "return": statistics.fmean(returns),
                        "return_std": statistics.pstdev(returns), "returns": returns})
        logger.log_scalar("eval_return", history[-1]["return"], step=frames_now)

    if not history:
        log_and_record_eval(0)  # the untrained policy: the curve's first point

    # --- training: segments between checkpoints, each with a fresh env + collector ------------
    total_batches = math.ceil(cfg.total_frames / fpb)
    total_frames = total_batches * fpb
    total_steps = total_batches * num_epochs * num_minibatches
    pbar = tqdm(total=total_frames, initial=frames, disable=not cfg.progress, desc=f"{algo} {cfg.env.name}")
    while frames < total_frames:
        seg_start = time.perf_counter()
        seg_end = min(total_frames, (frames // cfg.checkpoint_every + 1) * cfg.checkpoint_every)
        seg_batches = math.ceil((seg_end - frames) / fpb)
        segment_seed = cfg.seed + frames  # deterministic in (seed, frames done): see the module docstring
        env_fns = [functools.partial(make_env, cfg.env.name, segment_seed + 1000 * i, obs_stats, cfg,
                                     num_envs=cfg.num_envs)
                   for i in range(cfg.num_collectors)]
        if cfg.num_collectors > 1:  # EnvCreator hands the workers the shared-memory statistics (state_dict)
            env_fns = [EnvCreator(fn) for fn in env_fns]
        collector = Collector(env_fns if cfg.num_collectors > 1 else env_fns[0], actor, frames_per_batch=fpb,
                              total_frames=seg_batches * fpb, auto_register_policy_transforms=False,
                              **({"num_collectors": cfg.num_collectors, "sync": True}
                                 if cfg.num_collectors > 1 else {}))
        eval_time = 0.0
        for batch in collector:
            update_start = time.perf_counter()  # the update's own time, apart from collection (throughput)
            frames += batch.numel()
            done = batch["next", "done"].squeeze(-1)
            episode_returns = batch["next", "episode_reward"].squeeze(-1)[done]
            if cfg.anneal_lr:
                for group in optim.param_groups:
                    group["lr"] = cfg.lr * (1 - len(updates) * num_epochs * num_minibatches / total_steps)

            # Advantages once per batch (CleanRL style, for both losses); OT-TRPO then solves lambda* once.
            with torch.no_grad():
                loss_module.value_estimator(batch)
            phase_start = {"advantage": update_start, "solve": time.perf_counter()}
            row = {"frames": frames, "train_return": episode_returns.mean().item() if done.any() else float("nan"),
                   "episodes": int(done.sum())}
            if algo in ("ot_trpo", "wpo", "trpo") and cfg.algo.normalize_advantage:  # batch-level, before the update
                adv = batch["advantage"]
                batch["advantage"] = (adv - adv.mean()) / adv.std().clamp_min(1e-8)
            if algo == "trpo":  # the actor's step: natural gradient + line search on the whole batch
                info = loss_module.actor_step(batch)
                row.update(kl=float(info["kl"]), step_accepted=float(info["step_accepted"]))
            if ot_family:
                if log_scale is not None:  # epsilon for the scale that collected this batch
                    behaviour_scale = log_scale.detach().exp().mean().item()
                    loss_module.epsilon = cfg.algo.epsilon * (behaviour_scale / cfg.algo.init_scale) ** 2
                    row["scale"] = behaviour_scale
                sol = loss_module.solve_multiplier(batch)
                # The update's own transport (WPO's no-split plan can exceed epsilon; OT-TRPO's cannot).
                row.update(multiplier=sol.multiplier.item(), epsilon=loss_module.epsilon,
                           transport_over_epsilon=batch["ot_transport"].double().mean().item() / loss_module.epsilon)
                if cfg.algo.enforce_radius:
                    theta_old = loss_module.actor_parameters()

            phase_start["epochs"] = time.perf_counter()
            # The minibatches: SamplerWithoutReplacement over the batch (each epoch one permutation of it).
            # With the advantages computed no loss reads the ("next", ...) step results, the done flags or the
            # env's and collector's bookkeeping: leaving them out spares every minibatch their indexing.
            rb = ReplayBuffer(storage=TensorStorage(batch.reshape(-1).exclude(*UNUSED_AFTER_ADVANTAGES)),
                              sampler=SamplerWithoutReplacement(), batch_size=mb_size)
            sums: dict[str, float] = {}
            for _ in range(num_epochs):
                for _ in range(num_minibatches):
                    out = loss_module(rb.sample())
                    # TRPO's actor moved in actor_step: its minibatches train the critic only.
                    loss = sum(v for k, v in out.items() if k.startswith("loss_") and not
                               (algo == "trpo" and k == "loss_objective"))
                    if not torch.isfinite(loss):
                        raise FloatingPointError(f"non-finite loss {loss.item()} at {frames} frames")
                    optim.zero_grad()
                    loss.backward()
                    grad_norm = nn.utils.clip_grad_norm_(loss_module.parameters(), cfg.max_grad_norm)
                    optim.step()
                    for k, v in out.items():
                        sums[k] = sums.get(k, 0.0) + v.detach()
                    sums["grad_norm"] = sums.get("grad_norm", 0.0) + grad_norm
            n_steps = num_epochs * num_minibatches
            row.update({k: float(v) / n_steps for k, v in sums.items() if k in
                        ("loss_objective", "loss_critic", "loss_entropy", "ot_active_fraction", "grad_norm",
                         "clip_fraction", "kl_approx", "entropy")})
            row["lr"] = optim.param_groups[0]["lr"]
            phase_start["project"] = time.perf_counter()
            if ot_family:  # what the fitted network moved (exact, or a bound), against the radius
                if cfg.algo.enforce_radius:  # backtrack the actor's step until it is inside (or undo it)
                    proj = loss_module.project_into_trust_region(batch, theta_old)
                    moved = proj["realised_transport"]
                    row["step_fraction"] = proj["step_fraction"].item()
                else:
                    moved = loss_module.realised_transport(batch)
                row["realised_transport_over_epsilon"] = moved.item() / loss_module.epsilon
            if log_scale is not None:  # the next batch is collected with the scheduled scale
                with torch.no_grad():
                    log_scale.fill_(math.log(scheduled_scale(frames)))
            row["update_time_s"] = time.perf_counter() - update_start
            # Where the update's time goes (throughput.py's breakdown): GAE; lambda* (OT) or the natural-gradient
            # step (TRPO); the minibatch epochs; the projection into the radius (OT) and the bookkeeping.
            ends = [*list(phase_start.values())[1:], update_start + row["update_time_s"]]
            row.update({f"time_{phase}_s": end - begin
                        for (phase, begin), end in zip(phase_start.items(), ends, strict=True)})
            updates.append(row)
            if cfg.num_collectors > 1:
                collector.update_policy_weights_()
            for key, value in row.items():
                if key != "frames" and not math.isnan(value):
                    logger.log_scalar(key, value, step=frames)

            if frames // cfg.eval_every > (frames - batch.numel()) // cfg.eval_every or frames >= total_frames:
                t0 = time.perf_counter()
                log_and_record_eval(frames)
                eval_time += time.perf_counter() - t0
            pbar.update(batch.numel())
            pbar.set_postfix(ret=f"{row['train_return']:.1f}", eval=f"{history[-1]['return']:.1f}",
                             **({"lam": f"{row['multiplier']:.3g}"} if ot_family else {}))
        collector.shutdown()
        train_time += time.perf_counter() - seg_start - eval_time

        save_checkpoint(ckpt_path, {
            "actor": actor.state_dict(), "critic": critic.state_dict(),
            "advantage": None if head is None else head.state_dict(), "optimizer": optim.state_dict(),
            "obs_stats": None if obs_stats is None else obs_stats.clone(), "frames": frames,
            "next_segment_seed": cfg.seed + frames, "train_time": train_time,
            "wall_time_s": wall_before + time.perf_counter() - start, "history": history,
            "updates": updates, "rng": rng_state(), "config": OmegaConf.to_container(cfg, resolve=True)})
        if cfg.stop_after_frames is not None and frames >= cfg.stop_after_frames and frames < total_frames:
            pbar.close()
            print(f"stop_after_frames={cfg.stop_after_frames}: stopping after the checkpoint at {frames} frames, "
                  f"as if killed; continue with resume=true")
            sys.exit(0)
    pbar.close()

    # --- summary and learning curve ----------------------------------------------------------
    final = history[-1]
    ratios = [u["transport_over_epsilon"] for u in updates if "transport_over_epsilon" in u]
    realised = [u["realised_transport_over_epsilon"] for u in updates if "realised_transport_over_epsilon" in u]
    summary = {
        "env": cfg.env.name,
        "algo": algo,
        "policy": policy,
        "cost": HydraConfig.get().runtime.choices.get("cost") if ot_family else None,
        "cost_fn": None if cost is None else repr(cost),
        "estimator": cfg.estimator.name,
        "seed": cfg.seed,
        "epsilon": float(cfg.algo.epsilon) if ot_family else None,
        "final_return": final["return"],
        "final_return_std": final["return_std"],
        "initial_return": history[0]["return"],
        "best_return": max(h["return"] for h in history),
        "eval_episodes": cfg.eval_episodes,
        "frames": frames,
        "updates": len(updates),
        "wall_time_s": wall_before + time.perf_counter() - start,  # summed over a killed run and its resumption
        "train_time_s": train_time,
        "frames_per_s": frames / train_time,
        # Advantages, lambda* and the epochs only: collection's cost depends on episode lengths (resets),
        # so it differs between algorithms that learn at different speeds on the same env.
        # (None when resumed from a checkpoint written before this was recorded.)
        "update_frames_per_s": (frames / sum(u["update_time_s"] for u in updates)
                                if all("update_time_s" in u for u in updates) else None),
        "update_time_breakdown_s": ({phase: sum(u[f"time_{phase}_s"] for u in updates) for phase in PHASES}
                                    if all("time_epochs_s" in u for u in updates) else None),
        # Episodes that ended in the training batches: each end costs a reset through the env's transforms,
        # so collection's frames/s falls with it (short episodes early in learning).
        "train_episodes": (sum(u["episodes"] for u in updates) if all("episodes" in u for u in updates) else None),
        "mean_transport_over_epsilon": statistics.fmean(ratios) if ratios else None,
        # The fitted network's own transport (Problem (P)'s constraint; exact for categorical policies, an
        # upper bound for Gaussian ones): the share of updates that provably stayed inside the radius.
        "mean_realised_transport_over_epsilon": statistics.fmean(realised) if realised else None,
        "max_realised_transport_over_epsilon": max(realised) if realised else None,
        "realised_within_epsilon_fraction": (statistics.fmean(r <= 1 + 1e-6 for r in realised)
                                             if realised else None),
        "mean_multiplier": statistics.fmean(u["multiplier"] for u in updates) if ratios else None,
        "resumed": bool(cfg.resume),
    }
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))

    fig, ax = plt.subplots(figsize=(6, 3.6))
    x = [h["frames"] for h in history]
    y = np.array([h["return"] for h in history])
    s = np.array([h["return_std"] for h in history])
    ax.plot(x, y, marker="o", ms=3, label=f"deterministic policy ({cfg.eval_episodes} episodes)")
    ax.fill_between(x, y - s, y + s, alpha=0.2)
    ax.set(xlabel="frames", ylabel="return", title=f"{algo} on {cfg.env.name} (seed {cfg.seed})")
    ax.legend()
    fig.tight_layout()
    fig.savefig(run_dir / "curve.png", dpi=100)
    plt.close(fig)

    print(json.dumps(summary, indent=2))
    print(f"run directory: {run_dir}  (summary.json, curve.png, checkpoint.pt, logs/)")
    return summary


if __name__ == "__main__":
    main()
