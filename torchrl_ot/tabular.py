"""Tabular OT-TRPO in TorchRL (Section 5, step 5.1: direct parametrisation, Corollary 3).

The pieces a tabular recipe needs, for any gymnasium environment with ``Discrete`` observations
and actions:

* :func:`make_env`: a batch of synchronous gymnasium copies as one TorchRL env, with a step
  counter (for discounted visitation) and episode returns.
* :class:`TabularPolicy` / :func:`make_actor`: the direct parametrisation, a table of
  probabilities behind a TorchRL ``ProbabilisticActor``.
* :class:`TabularCritic`: advantages ``A(s, a) = Q(s, a) - sum_a pi(a|s) Q(s, a)`` by Monte-Carlo
  returns or by batch TD(0) (Algorithm 1, step 3, method 1).
* :func:`visitation_weights`: discounted state-visitation frequencies ``rho_pi`` (step 3).
* :func:`audit_transport`: the trust-region audit ``sum_s rho(s) C(pi(.|s), pi_new(.|s))`` computed
  by an exact OT solver (POT's network simplex), independent of the dual.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import gymnasium as gym
import numpy as np
import ot
import torch
from tensordict import TensorDictBase
from tensordict.nn import TensorDictModule
from torch import Tensor, nn
from torchrl.envs import Compose, EnvBase, GymWrapper, RewardSum, StepCounter, TransformedEnv
from torchrl.envs.utils import ExplorationType, set_exploration_type
from torchrl.modules import OneHotCategorical, ProbabilisticActor

from torchrl_ot.envs import check_env_kwargs  # importing torchrl_ot.envs also registers NChain-v0
from torchrl_ot.validation import (
    check_bool,
    check_choice,
    check_entries_present,
    check_per_sample,
    check_positive_int,
    check_real,
    check_same_device,
    check_shape,
    check_tensor,
    entry_name,
    finite_checks,
    raise_first_failed,
    simplex_checks,
)

__all__ = [
    "episode_limit",
    "make_env",
    "TabularPolicy",
    "make_actor",
    "state_index",
    "TabularCritic",
    "visitation_weights",
    "audit_transport",
    "evaluate",
    "exact_return",
]

DEFAULT_EPISODE_LIMIT = 500


def episode_limit(env_id: str, max_episode_steps: int | None = None) -> int:
    """The time limit :func:`make_env` applies: the given one, else the registry's, else 500.

    Environments registered without a limit (CliffWalking) get one so that a poor policy cannot
    stall collection or evaluation.
    """
    if max_episode_steps is not None:
        check_positive_int("max_episode_steps", max_episode_steps)
    try:
        spec = gym.spec(env_id)
    except gym.error.Error as err:
        raise ValueError(f"env.name={env_id!r} is not a registered gymnasium id: {err}") from None
    return int(max_episode_steps or spec.max_episode_steps or DEFAULT_EPISODE_LIMIT)


def make_vec_env(env_id: str, env_kwargs: dict[str, Any], *, num_envs: int, wrappers: list | None = None,
                 max_episode_steps: int | None = None) -> gym.vector.VectorEnv:
    """``gymnasium.make_vec`` without autoreset (TorchRL resets finished copies itself; gymnasium's autoreset would
    hide final states), ``env_kwargs`` (checked by :func:`~torchrl_ot.envs.check_env_kwargs`) passed to every copy.
    A constructor refusing a value of ``env_kwargs`` raises a ``ValueError`` naming ``env.kwargs``."""
    check_positive_int("num_envs", num_envs)
    try:
        return gym.make_vec(env_id, num_envs=num_envs, vectorization_mode="sync", wrappers=wrappers,
                            max_episode_steps=max_episode_steps,
                            vector_kwargs={"autoreset_mode": gym.vector.AutoresetMode.DISABLED}, **env_kwargs)
    except (TypeError, ValueError, KeyError, AssertionError) as err:
        if not env_kwargs:
            raise
        raise ValueError(f"env.kwargs={env_kwargs}: gymnasium.make({env_id!r}, ...) refused them: "
                         f"{type(err).__name__}: {err}") from err


def make_env(env_id: str, *, num_envs: int = 16, max_episode_steps: int | None = None,
             seed: int | None = None, env_kwargs: Mapping[str, Any] | None = None) -> EnvBase:
    """``num_envs`` synchronous copies of a discrete gymnasium env as one TorchRL env ``[num_envs]``,
    each capped at :func:`episode_limit` steps; ``env_kwargs`` go to ``gymnasium.make`` (a map, slipperiness)."""
    check_positive_int("num_envs", num_envs)
    if seed is not None:
        check_positive_int("seed", seed, minimum=0)
    limit = episode_limit(env_id, max_episode_steps)
    vec = make_vec_env(env_id, check_env_kwargs(env_id, env_kwargs), num_envs=num_envs, max_episode_steps=limit)
    if not isinstance(vec.single_observation_space, gym.spaces.Discrete) or not isinstance(
        vec.single_action_space, gym.spaces.Discrete
    ):
        raise ValueError(
            f"env.name={env_id!r} must have Discrete observations and actions for the tabular recipe, "
            f"got {vec.single_observation_space} and {vec.single_action_space}"
        )
    env = TransformedEnv(GymWrapper(vec), Compose(StepCounter(), RewardSum()))
    if seed is not None:
        env.set_seed(seed)
    return env


def env_sizes(env: EnvBase) -> tuple[int, int]:
    """(number of states, number of actions) of a tabular env made by :func:`make_env`."""
    return env.observation_spec["observation"].shape[-1], env.action_spec.shape[-1]


def state_index(observation: Tensor) -> Tensor:
    """State indices from one-hot observations (TorchRL's encoding of ``Discrete``)."""
    check_tensor("observation", observation)
    if observation.dim() == 0 or observation.shape[-1] == 0:
        raise ValueError(f"observation must be one-hot [..., num_states], got shape {tuple(observation.shape)}")
    return observation.argmax(-1)


def _check_one_hot(name: str, x: Tensor, size: int, what: str) -> None:
    # argmax of an index [..., 1] (not one-hot) or of a one-hot row of another size is a valid index of the table:
    # a silently wrong state or action.
    check_tensor(name, x)
    if x.dim() == 0 or x.shape[-1] != size:
        raise ValueError(f"{name} must be one-hot [..., {size}] ({what}), got shape {tuple(x.shape)}")


def _check_table(name: str, x: Tensor, shape: tuple[int, ...]) -> None:
    check_tensor(name, x, floating=True)
    check_shape(name, x, shape, what=str(list(shape)))


class TabularPolicy(nn.Module):
    """Direct parametrisation: ``pi(a|s) = probs[s, a]``, initialised uniform.

    >>> import torch
    >>> policy = TabularPolicy(3, 2)
    >>> policy(torch.tensor([[0, 1, 0]]))
    tensor([[0.5000, 0.5000]], dtype=torch.float64)
    """

    def __init__(self, num_states: int, num_actions: int) -> None:
        super().__init__()
        check_positive_int("num_states", num_states)
        check_positive_int("num_actions", num_actions)
        self.register_buffer("probs", torch.full((num_states, num_actions), 1.0 / num_actions,
                                                 dtype=torch.float64))

    def forward(self, observation: Tensor) -> Tensor:
        _check_one_hot("observation", observation, self.probs.shape[0], "one entry per state")
        return self.probs[state_index(observation)]


def make_actor(policy: TabularPolicy, env: EnvBase) -> ProbabilisticActor:
    """Wrap a :class:`TabularPolicy` as a TorchRL actor sampling one-hot actions."""
    if not isinstance(policy, TabularPolicy):
        raise ValueError(f"policy must be a TabularPolicy, got {type(policy).__name__}")
    if tuple(policy.probs.shape) != env_sizes(env):
        raise ValueError(f"policy has a table of {tuple(policy.probs.shape)} (states, actions); the env has "
                         f"{env_sizes(env)}")
    module = TensorDictModule(policy, in_keys=["observation"], out_keys=["probs"])
    return ProbabilisticActor(module, in_keys=["probs"], distribution_class=OneHotCategorical,
                              spec=env.action_spec)


_TRANSITION_KEYS = ("observation", "action", ("next", "reward"), ("next", "observation"), ("next", "terminated"))


def _check_batch(batch: TensorDictBase, num_states: int, num_actions: int, owner: str, keys=_TRANSITION_KEYS) -> None:
    """Refuse, by key, a collected batch that the tables would misread (no device sync)."""
    check_entries_present(batch, keys, owner)
    if batch.batch_size.numel() == 0:
        raise ValueError(f"{owner} got an empty batch")
    for key in keys:
        x = batch.get(key)
        name = entry_name(key, owner)
        if key in ("observation", ("next", "observation")):
            _check_one_hot(name, x, num_states, "one entry per state")
        elif key == "action":
            _check_one_hot(name, x, num_actions, "one entry per action, as make_actor's actor writes it")
        else:  # reward, terminated, done, step_count: one per step
            check_tensor(name, x)
            check_per_sample(name, x, batch.batch_size)


def _transitions(batch: TensorDictBase):
    """Flatten a collected batch into (s, a, r, s', terminated) tensors."""
    s = state_index(batch["observation"]).reshape(-1)
    a = batch["action"].argmax(-1).reshape(-1)
    r = batch["next", "reward"].reshape(-1).double()
    s2 = state_index(batch["next", "observation"]).reshape(-1)
    term = batch["next", "terminated"].reshape(-1)
    return s, a, r, s2, term


class TabularCritic:
    """Action values of the current policy, and from them advantages for every (s, a).

    Args:
        num_states, num_actions: table sizes.
        gamma: discount factor.
        estimator: ``"td"``: batch TD(0) with expected-SARSA targets over every transition seen
            so far, iterated ``sweeps`` times (it converges to the certainty-equivalence estimate;
            expected-SARSA targets make old transitions valid for the new policy). ``"mc"``:
            Monte-Carlo returns of the current batch (on-policy), bootstrapped with the current
            table where a trajectory is cut by the time limit or the batch end.
        sweeps: TD sweeps per update.
        bonus: ``c`` of the count-based exploration bonus that :meth:`advantage` adds to ``Q`` (0: none,
            the paper's advantages): UCB1's ``c sigma(s, a) sqrt(2 ln(1 + N(s)) / (n(s, a) + 1))``, with
            ``n(s, a)`` the transitions seen from ``(s, a)``, ``N(s)`` from ``s``, and ``sigma(s, a)^2`` the
            mean square residual of the pair's one-step targets ``r + gamma (1 - terminated) V(s')`` at the
            current table, shrunk by one pseudo-sample toward its state's (at least the whole table's): in the
            units of the returns, so ``c`` needs no per-env scale. A pair never tried, in a state where some
            action was, is first lifted to that state's best tried ``Q`` (optimistic initialisation), so that
            it is tried. ``"td"`` only (it reads the stored counts).

    Pairs never seen keep their initial value 0. Without a bonus, the exact update makes the policy
    deterministic wherever an advantage gap exceeds lambda*, so an action whose few samples
    underestimated it is never tried again; the bonus (an upper-confidence term, as MBIE-EB's) keeps
    such actions in play until their counts settle them.

    >>> critic = TabularCritic(2, 2, gamma=0.9, bonus=1.0)
    >>> critic.exploration_bonus  # nothing seen yet: no spread of targets, no bonus
    tensor([[0., 0.],
            [0., 0.]], dtype=torch.float64)
    """

    def __init__(self, num_states: int, num_actions: int, *, gamma: float, estimator: str = "td",
                 sweeps: int = 200, bonus: float = 0.0) -> None:
        check_positive_int("num_states", num_states)
        check_positive_int("num_actions", num_actions)
        check_choice("estimator", estimator, ("td", "mc"))
        check_real("gamma", gamma, low=0.0, high=1.0, high_open=True)
        check_positive_int("sweeps", sweeps)
        check_real("bonus", bonus, low=0.0)
        if bonus > 0 and estimator != "td":
            raise ValueError(f"bonus={bonus} needs estimator='td' (it counts every transition seen); "
                             f"estimator={estimator!r} takes bonus=0")
        self.S, self.A, self.gamma, self.estimator, self.sweeps = num_states, num_actions, gamma, estimator, sweeps
        self.bonus = float(bonus)
        self.q = torch.zeros(num_states, num_actions, dtype=torch.float64)
        self.exploration_bonus = torch.zeros(num_states, num_actions, dtype=torch.float64)
        # Sufficient statistics of the transitions seen: unique (s, a, s', terminated) with counts.
        self._keys = torch.zeros(0, dtype=torch.long)
        self._count = torch.zeros(0, dtype=torch.float64)
        self._reward = torch.zeros(0, dtype=torch.float64)
        self._reward_sq = torch.zeros(0, dtype=torch.float64)

    def _check_policy(self, policy: Tensor) -> None:
        _check_table("policy", policy, (self.S, self.A))
        check_same_device(policy=policy, **{"the critic's table": self.q})

    def advantage(self, policy: Tensor) -> Tensor:
        """``A(s, a) = Q(s, a) - V(s)`` with ``V(s) = sum_a pi(a|s) Q(s, a)`` (Algorithm 1, step 3), ``Q`` plus
        :attr:`exploration_bonus` when ``bonus > 0``."""
        self._check_policy(policy)
        q = self.q + self.exploration_bonus if self.bonus else self.q
        return q - (policy * q).sum(-1, keepdim=True)

    def update(self, batch: TensorDictBase, policy: Tensor) -> Tensor:
        """Re-estimate Q for ``policy`` from a collected batch ``[num_envs, T]``; returns Q.

        Refused: a missing entry, observations or actions that are not one-hot over the table's states or actions,
        per-step entries (reward, terminated, done) not one per step, a batch that is not ``[num_envs, T]`` for
        ``"mc"``, a policy that is not a ``[S, A]`` floating table of probabilities, a NaN or inf reward.
        """
        owner = type(self).__name__
        self._check_policy(policy)
        keys = _TRANSITION_KEYS + ((("next", "done"),) if self.estimator == "mc" else ())
        _check_batch(batch, self.S, self.A, owner, keys)
        if self.estimator == "mc" and batch.batch_dims != 2:
            raise ValueError(f"the 'mc' estimator of {owner} needs a batch [num_envs, T] (its returns run along T), "
                             f"got batch_size {list(batch.batch_size)}")
        reward = batch.get(("next", "reward"))
        checks = simplex_checks(policy, "policy")
        if reward.is_floating_point():
            checks += finite_checks(reward, entry_name(("next", "reward"), owner))
        # Once per batch, before the tables change: one device sync.
        raise_first_failed(checks)
        if self.estimator == "td":
            self._absorb(*_transitions(batch))
            self._evaluate(policy)
        else:
            self._monte_carlo(batch, policy)
        return self.q

    def _absorb(self, s: Tensor, a: Tensor, r: Tensor, s2: Tensor, term: Tensor) -> None:
        key = ((s * self.A + a) * self.S + s2) * 2 + term.long()
        keys = torch.cat([self._keys, key])
        counts = torch.cat([self._count, torch.ones_like(r)])
        rewards = torch.cat([self._reward, r])
        squares = torch.cat([self._reward_sq, r * r])
        self._keys, inverse = torch.unique(keys, return_inverse=True)
        self._count = torch.zeros(len(self._keys), dtype=torch.float64).index_add_(0, inverse, counts)
        self._reward = torch.zeros(len(self._keys), dtype=torch.float64).index_add_(0, inverse, rewards)
        self._reward_sq = torch.zeros(len(self._keys), dtype=torch.float64).index_add_(0, inverse, squares)

    def _evaluate(self, policy: Tensor) -> None:
        term = (self._keys % 2).double()
        s2 = (self._keys // 2) % self.S
        sa = self._keys // (2 * self.S)
        n_sa = torch.zeros(self.S * self.A, dtype=torch.float64).index_add_(0, sa, self._count)
        seen = n_sa > 0
        q = self.q.reshape(-1).clone()
        continuing = self.gamma * self._count * (1 - term)
        for _ in range(self.sweeps):
            v = (policy * q.view(self.S, self.A)).sum(-1)
            total = torch.zeros_like(q).index_add_(0, sa, self._reward + continuing * v[s2])
            q = torch.where(seen, total / n_sa.clamp_min(1), q)
        self.q = q.view(self.S, self.A)
        if self.bonus:
            # Per key, the squared residuals of its samples r_i + g - q sum to
            # sum r_i^2 - n rbar^2 + n (rbar + g - q)^2.
            v = (policy * self.q).sum(-1)
            mean_r = self._reward / self._count
            gap = mean_r + self.gamma * (1 - term) * v[s2] - q[sa]
            squares = (self._reward_sq - self._count * mean_r ** 2).clamp_min(0) + self._count * gap ** 2
            pair_sq = torch.zeros_like(n_sa).index_add_(0, sa, squares).view(self.S, self.A)
            n_s = n_sa.view(self.S, self.A).sum(-1, keepdim=True)
            # Each pair's own spread, shrunk by one pseudo-sample toward its state's (all its actions' samples;
            # at least the whole table's): one sample has no spread, and the table's mean is dominated by the
            # many low-variance states, far below that of a state next to a hole.
            prior = torch.maximum(pair_sq.sum(-1, keepdim=True) / n_s.clamp_min(1), squares.sum() / self._count.sum())
            spread = (pair_sq + prior) / n_sa.view(self.S, self.A).add(1)
            # UCB1's sqrt(2 ln N(s) / n(s, a)): an action that its first samples underestimated keeps being
            # retried, ever more rarely, instead of being dropped for good once its count passes a constant.
            n_pair = (n_sa + 1).view(self.S, self.A)
            bonus = self.bonus * (spread * 2 * torch.log1p(n_s) / n_pair).sqrt()
            # A pair never tried keeps Q = 0, which can sit far below its state's tried actions (FrozenLake's
            # values near the goal): lift it to the best tried one, so that its larger bonus makes it the
            # state's best action until it has been tried once.
            tried = seen.view(self.S, self.A)
            best_tried = torch.where(tried, self.q, -torch.inf).amax(-1, keepdim=True)
            lift = torch.where(~tried & tried.any(-1, keepdim=True), (best_tried - self.q).clamp_min(0), 0.0)
            self.exploration_bonus = bonus + lift

    def _monte_carlo(self, batch: TensorDictBase, policy: Tensor) -> None:
        reward = batch["next", "reward"].squeeze(-1).double()
        term = batch["next", "terminated"].squeeze(-1)
        done = batch["next", "done"].squeeze(-1)
        v = (policy * self.q).sum(-1)
        # Bootstrap where a trajectory is cut without terminating: time limit, or batch end.
        bootstrap = v[state_index(batch["next", "observation"])] * (~term).double()
        ret = torch.zeros_like(reward)
        running = bootstrap[:, -1]
        for t in range(reward.shape[1] - 1, -1, -1):
            running = torch.where(done[:, t], bootstrap[:, t], running)
            running = reward[:, t] + self.gamma * running * torch.where(term[:, t], 0.0, 1.0)
            ret[:, t] = running
        s = state_index(batch["observation"]).reshape(-1)
        a = batch["action"].argmax(-1).reshape(-1)
        sa = s * self.A + a
        n = torch.zeros(self.S * self.A, dtype=torch.float64).index_add_(0, sa, torch.ones_like(ret.reshape(-1)))
        total = torch.zeros_like(n).index_add_(0, sa, ret.reshape(-1))
        q = self.q.reshape(-1)
        self.q = torch.where(n > 0, total / n.clamp_min(1), q).view(self.S, self.A)

    def state_dict(self) -> dict:
        return {"q": self.q, "keys": self._keys, "count": self._count, "reward": self._reward,
                "reward_sq": self._reward_sq, "exploration_bonus": self.exploration_bonus}


def visitation_weights(batch: TensorDictBase, num_states: int, gamma: float) -> Tensor:
    """Discounted state-visitation frequencies from a batch: ``rho(s) ∝ sum_t gamma^t 1[s_t = s]``.

    ``t`` is the step within the episode (TorchRL's ``step_count``); the result sums to 1.
    """
    check_positive_int("num_states", num_states)
    check_real("gamma", gamma, low=0.0, high=1.0)
    _check_batch(batch, num_states, 1, "visitation_weights", ("observation", "step_count"))
    s = state_index(batch["observation"]).reshape(-1)
    t = batch["step_count"].reshape(-1).double()
    w = torch.zeros(num_states, dtype=torch.float64).index_add_(0, s, gamma ** t)
    return w / w.sum()


def audit_transport(policy: Tensor, new_policy: Tensor, state_weight: Tensor, cost: Tensor) -> float:
    """``sum_s rho(s) C(pi(.|s), pi_new(.|s))`` with C the exact OT discrepancy (eq. 1).

    Each state's OT problem is solved by POT's exact network simplex (``ot.emd2``), so the audit
    shares no code with the dual solver it checks. Refused: tables that are not floating ``[S, A]`` probabilities,
    ``[S]`` finite non-negative weights and an ``[A, A]`` finite non-negative cost.
    """
    for name, x in (("policy", policy), ("new_policy", new_policy), ("state_weight", state_weight), ("cost", cost)):
        check_tensor(name, x, floating=True)
    if policy.dim() != 2:
        raise ValueError(f"policy must have shape [S, A], got {tuple(policy.shape)}")
    S, A = policy.shape
    _check_table("new_policy", new_policy, (S, A))
    _check_table("state_weight", state_weight, (S,))
    _check_table("cost", cost, (A, A))
    check_same_device(policy=policy, new_policy=new_policy, state_weight=state_weight, cost=cost)
    raise_first_failed(simplex_checks(policy, "policy") + simplex_checks(new_policy, "new_policy")
                       + finite_checks(state_weight, "state_weight", nonneg=True)
                       + finite_checks(cost, "cost", nonneg=True))
    # numpy reads host memory only.
    p, q = policy.detach().cpu().double().numpy(), new_policy.detach().cpu().double().numpy()
    w = state_weight.detach().cpu().double().numpy()
    c = np.ascontiguousarray(cost.detach().cpu().double().numpy())
    total = 0.0
    for s in np.flatnonzero((w > 0) & np.any(p != q, axis=1)):
        # emd2 wants equal masses to rounding; renormalise each row.
        a, b = p[s] / p[s].sum(), q[s] / q[s].sum()
        total += w[s] * float(ot.emd2(a, b, c))
    return total


@torch.no_grad()
def evaluate(env: EnvBase, actor: ProbabilisticActor, *, max_steps: int,
             deterministic: bool = True) -> Tensor:
    """Return of the first episode of each of ``env``'s copies (``[num_envs]``).

    ``deterministic=True`` acts with the policy's mode (greedy action), as TorchRL's
    ``ExplorationType.DETERMINISTIC`` does; ``False`` samples actions.
    """
    check_positive_int("max_steps", max_steps)
    check_bool("deterministic", deterministic)
    mode = ExplorationType.DETERMINISTIC if deterministic else ExplorationType.RANDOM
    with set_exploration_type(mode):
        rollout = env.rollout(max_steps, actor, break_when_any_done=False)
    reward = rollout["next", "reward"].squeeze(-1).double()
    done = rollout["next", "done"].squeeze(-1)
    # Count rewards up to and including each copy's first done.
    before_first = (done.long().cumsum(-1) - done.long()) == 0
    return (reward * before_first).sum(-1)


def exact_return(env_id: str, env_kwargs: Mapping[str, Any] | None = None, policy: Tensor | None = None, *,
                 horizon: int | None = None) -> float:
    """The expected undiscounted return from the env's initial states within ``horizon`` steps (default: the
    time limit of :func:`make_env`), computed exactly by backward induction on the env's transition table
    ``P[s][a] = [(prob, next_state, reward, terminated), ...]`` (gymnasium's toy-text format; NChain's too):
    of ``policy`` (an ``[S, A]`` table, followed at every step), or without one the optimum over all policies
    (value iteration: ``V_h(s) = max_a sum p (r + (1 - terminated) V_{h-1}(s'))``). The initial states are the
    env's ``initial_state_distrib``, else state 0. An env without ``P`` is refused (``ValueError``).

    >>> exact_return("FrozenLake-v1", {"is_slippery": False})  # six steps to the goal, reward 1
    1.0
    >>> exact_return("FrozenLake-v1", {"is_slippery": False}, torch.full((16, 4), 0.25)) < 0.05  # a random walk
    True
    """
    env = gym.make(env_id, **check_env_kwargs(env_id, env_kwargs)).unwrapped
    table = getattr(env, "P", None)
    if table is None:
        raise ValueError(f"env.name={env_id!r} has no transition table P: its exact return is not computable here")
    n_states, n_actions = env.observation_space.n, env.action_space.n
    if policy is not None:
        _check_table("policy", policy, (n_states, n_actions))
        raise_first_failed(simplex_checks(policy, "policy"))
        pi = policy.detach().cpu().double().numpy()
    horizon = episode_limit(env_id) if horizon is None else horizon
    check_positive_int("horizon", horizon)
    # One row per transition: (state, action, prob, next_state, reward, continues).
    rows = np.array([(s, a, p, s2, r, 0.0 if term else 1.0)
                     for s in range(n_states) for a in range(n_actions) for p, s2, r, term in table[s][a]])
    s_idx, a_idx = rows[:, 0].astype(int), rows[:, 1].astype(int)
    prob, nxt, reward, cont = rows[:, 2], rows[:, 3].astype(int), rows[:, 4], rows[:, 5]
    value = np.zeros(n_states)
    for _ in range(horizon):
        q = np.zeros((n_states, n_actions))
        np.add.at(q, (s_idx, a_idx), prob * (reward + cont * value[nxt]))
        value = q.max(1) if policy is None else (pi * q).sum(1)
    start = getattr(env, "initial_state_distrib", None)
    if start is None:
        start = np.eye(n_states)[0]
    return float(np.asarray(start, dtype=float) @ value)
