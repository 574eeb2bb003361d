"""Tabular pieces: NChain dynamics, the critic, visitation weights, the OT audit."""

import gymnasium as gym
import numpy as np
import pytest
import torch
from tensordict import TensorDict

from torchrl_ot.costs import DiscreteMetricCost, IndexDistanceCost
from torchrl_ot.envs import NCHAIN_ID, NChainEnv
from torchrl_ot.tabular import TabularCritic, audit_transport, exact_return, make_env, visitation_weights


def test_nchain_dynamics_without_slip():
    env = NChainEnv(slip=0.0)
    env.reset(seed=0)
    rewards = [env.step(0)[1] for _ in range(6)]
    assert rewards == [0.0, 0.0, 0.0, 0.0, 10.0, 10.0] and env.state == 4
    _, r, terminated, truncated, _ = env.step(1)
    assert (r, env.state, terminated, truncated) == (2.0, 0, False, False)


def test_nchain_slip_rate_and_registration():
    env = gym.make(NCHAIN_ID)
    assert env.spec.max_episode_steps == 1000
    env.reset(seed=123)
    # From state 0, "back" keeps the agent at 0 unless it slips forward to state 1.
    slips = 0
    for _ in range(4000):
        obs, *_ = env.step(1)
        slips += obs == 1
        env.unwrapped.state = 0
    assert abs(slips / 4000 - 0.2) < 0.03


def test_nchain_transition_table_matches_step():
    env = NChainEnv()
    for s in range(5):
        for a in (0, 1):
            outcomes = env.P[s][a]
            assert sum(p for p, *_ in outcomes) == pytest.approx(1.0)
            env.state = s
            env.slip = 0.0
            s2, r, *_ = env.step(a)
            env.slip = 0.2
            assert (outcomes[0][1], outcomes[0][2]) == (s2, r)


def test_nchain_refuses_bad_action():
    env = NChainEnv()
    env.reset(seed=0)
    with pytest.raises(ValueError, match="action"):
        env.step(2)


def _chain_batch():
    """Two envs, 3 steps each, on a 3-state deterministic chain with one-hot encodings."""
    eye = torch.eye(3, dtype=torch.long)
    s = torch.tensor([[0, 1, 2], [0, 0, 1]])
    a = torch.tensor([[1, 1, 1], [0, 1, 1]])
    s2 = torch.tensor([[1, 2, 2], [0, 1, 2]])
    r = torch.tensor([[0.0, 0.0, 1.0], [0.0, 0.0, 0.0]])
    term = torch.tensor([[False, False, True], [False, False, True]])
    return TensorDict({
        "observation": eye[s], "action": torch.eye(2, dtype=torch.long)[a],
        "step_count": torch.tensor([[0, 1, 2], [0, 1, 2]])[..., None],
        "next": {"observation": eye[s2], "reward": r[..., None], "terminated": term[..., None],
                 "done": term[..., None]},
    }, batch_size=[2, 3])


def test_td_critic_reaches_the_policy_evaluation_fixed_point():
    batch = _chain_batch()
    policy = torch.tensor([[0.5, 0.5], [0.0, 1.0], [0.0, 1.0]], dtype=torch.float64)
    critic = TabularCritic(3, 2, gamma=0.5, estimator="td", sweeps=100)
    q = critic.update(batch, policy)
    # (2,1) -> terminal, r=1. (1,1) seen twice: -> 2 (r=0) and -> terminal (r=0).
    # (0,1) seen twice, -> 1 both times. (0,0) -> 0. V(s) follows the policy's rows.
    q21 = 1.0
    q11 = (0.5 * q21 + 0.0) / 2
    q01 = 0.5 * q11
    # (0,0) loops to state 0: q00 = 0.5 * (0.5 q00 + 0.5 q01)  ->  q00 = q01 / 3
    expected = torch.tensor([[q01 / 3, q01], [0.0, q11], [0.0, q21]], dtype=torch.float64)
    torch.testing.assert_close(q, expected)
    adv = critic.advantage(policy)
    torch.testing.assert_close((policy * adv).sum(-1), torch.zeros(3, dtype=torch.float64))


def test_mc_critic_returns():
    batch = _chain_batch()
    policy = torch.full((3, 2), 0.5, dtype=torch.float64)
    critic = TabularCritic(3, 2, gamma=0.5, estimator="mc")
    q = critic.update(batch, policy)
    # env 0: returns 0.25, 0.5, 1 at (0,1), (1,1), (2,1); env 1: 0, 0, 0 at (0,0), (0,1), (1,1).
    torch.testing.assert_close(q[0, 1], torch.tensor(0.125, dtype=torch.float64))
    torch.testing.assert_close(q[1, 1], torch.tensor(0.25, dtype=torch.float64))
    torch.testing.assert_close(q[2, 1], torch.tensor(1.0, dtype=torch.float64))
    assert q[2, 0] == 0  # never seen: keeps its initial value


def test_critic_refuses_bad_arguments():
    with pytest.raises(ValueError, match="estimator"):
        TabularCritic(2, 2, gamma=0.9, estimator="qlearning")
    with pytest.raises(ValueError, match="gamma"):
        TabularCritic(2, 2, gamma=1.0)
    for bad in (-0.5, float("inf"), float("nan"), True):
        with pytest.raises(ValueError, match="bonus must be a finite number"):
            TabularCritic(2, 2, gamma=0.9, bonus=bad)
    with pytest.raises(ValueError, match="bonus=1.0 needs estimator='td'"):
        TabularCritic(2, 2, gamma=0.9, estimator="mc", bonus=1.0)


def test_exploration_bonus_equals_its_hand_computation():
    """c sqrt(sigma(s, a)^2 2 ln(1 + N(s)) / (n(s, a) + 1)), sigma(s, a)^2 = (sum of the pair's squared one-step
    residuals + its state's mean square, at least the table's) / (n(s, a) + 1); untried pairs lifted to their
    state's best tried Q."""
    batch = _chain_batch()
    # A reward that differs between the two samples of one (s, a, s') key: its spread counts in sigma.
    batch["next", "reward"][1, 1] = 0.5  # env 1's (0, 1) -> 1 pays 0.5, env 0's pays 0
    policy = torch.tensor([[0.5, 0.5], [0.0, 1.0], [0.0, 1.0]], dtype=torch.float64)
    plain = TabularCritic(3, 2, gamma=0.5, sweeps=400)
    critic = TabularCritic(3, 2, gamma=0.5, sweeps=400, bonus=2.0)
    q = critic.update(batch, policy)
    torch.testing.assert_close(q, plain.update(batch, policy))  # the bonus leaves Q itself alone
    v = (policy * q).sum(-1)
    gamma = 0.5
    # Every sample (s, a, r, s', terminated) of the batch, by hand.
    samples = [(0, 1, 0.0, 1, False), (1, 1, 0.0, 2, False), (2, 1, 1.0, 2, True),
               (0, 0, 0.0, 0, False), (0, 1, 0.5, 1, False), (1, 1, 0.0, 2, True)]
    sq = torch.zeros(3, 2, dtype=torch.float64)
    for s, a, r, s2, t in samples:
        sq[s, a] += (r + gamma * (0.0 if t else 1.0) * v[s2].item() - q[s, a].item()) ** 2
    pooled = sq.sum() / len(samples)
    assert sq[0, 1] > 0.01 and sq[1, 1] > 0.01  # two different targets each: the spreads are not zero
    counts = torch.tensor([[1, 2], [0, 2], [0, 1]], dtype=torch.float64)
    visits = counts.sum(-1, keepdim=True)
    prior = torch.maximum(sq.sum(-1, keepdim=True) / visits.clamp_min(1), pooled)  # the state's, at least the table's
    assert prior[1, 0] > pooled and prior[2, 0] == pooled  # both branches taken
    spread = (sq + prior) / (counts + 1)
    expected = 2.0 * (spread * 2 * torch.log(1 + visits) / (counts + 1)).sqrt()
    # Never-tried pairs are first lifted to their state's best tried Q: (1, 0) to Q(1, 1), (2, 0) to Q(2, 1).
    expected[1, 0] += q[1, 1] - q[1, 0]
    expected[2, 0] += q[2, 1] - q[2, 0]
    assert q[1, 1] > q[1, 0] and q[2, 1] > q[2, 0]  # the lift is not zero: the check has power
    torch.testing.assert_close(critic.exploration_bonus, expected)
    qb = q + expected
    torch.testing.assert_close(critic.advantage(policy), qb - (policy * qb).sum(-1, keepdim=True))
    torch.testing.assert_close(plain.advantage(policy), q - (policy * q).sum(-1, keepdim=True))
    # Never-tried actions become their state's best: state 1's action 0, for any c > 0.
    adv, plain_adv = critic.advantage(policy), plain.advantage(policy)
    assert adv[1, 0] > adv[1, 1] and plain_adv[1, 0] < plain_adv[1, 1]


def test_visitation_weights_are_discounted_by_step():
    rho = visitation_weights(_chain_batch(), 3, gamma=0.5)
    raw = torch.tensor([1 + 1 + 0.5, 0.5 + 0.25, 0.25], dtype=torch.float64)
    torch.testing.assert_close(rho, raw / raw.sum())


def test_audit_equals_total_variation_for_the_01_cost():
    g = torch.Generator().manual_seed(0)
    p = torch.softmax(torch.randn(6, 4, generator=g, dtype=torch.float64), -1)
    q = torch.softmax(torch.randn(6, 4, generator=g, dtype=torch.float64), -1)
    rho = torch.rand(6, generator=g, dtype=torch.float64)
    tv = 0.5 * (p - q).abs().sum(-1)
    got = audit_transport(p, q, rho, DiscreteMetricCost().matrix(4))
    assert got == pytest.approx(float((rho * tv).sum()), rel=1e-12)


def test_audit_equals_cdf_distance_for_the_index_cost():
    # On a line with c = |i - j| the OT cost is the L1 distance between the CDFs.
    p = torch.tensor([[0.7, 0.1, 0.2, 0.0]], dtype=torch.float64)
    q = torch.tensor([[0.0, 0.2, 0.3, 0.5]], dtype=torch.float64)
    expected = float((p.cumsum(-1) - q.cumsum(-1)).abs().sum())
    got = audit_transport(p, q, torch.ones(1, dtype=torch.float64), IndexDistanceCost(p=1).matrix(4))
    assert got == pytest.approx(expected, rel=1e-12)


def test_make_env_refuses_continuous_and_unknown_ids():
    with pytest.raises(ValueError, match="Discrete"):
        make_env("Pendulum-v1", num_envs=1)
    with pytest.raises(ValueError, match="env.name"):
        make_env("NoSuchEnv-v9", num_envs=1)


def test_make_env_batches_copies_with_step_counter():
    env = make_env(NCHAIN_ID, num_envs=3, seed=0)
    td = env.rollout(5)
    assert td.batch_size == (3, 5)
    assert np.array_equal(td["step_count"][0, :, 0].numpy(), np.arange(5))


def _down_right_path() -> torch.Tensor:
    """FrozenLake 4x4: down, down, right, down, right, right from the start to the goal (right at 8, 13, 14)."""
    policy = torch.zeros(16, 4, dtype=torch.float64)
    policy[:, 1] = 1.0
    policy[[8, 13, 14], 1], policy[[8, 13, 14], 2] = 0.0, 1.0
    return policy


def test_exact_return_of_a_policy_matches_simulated_episodes():
    """Backward induction on P against 3,000 episodes of gymnasium itself (slippery FrozenLake, a fixed policy)."""
    rng = np.random.default_rng(0)
    careful = torch.eye(4, dtype=torch.float64)[[0, 3, 3, 3, 0, 0, 0, 0, 3, 1, 0, 0, 0, 2, 1, 0]]  # the slippery map's
    probs = 0.7 * careful + 0.3 * torch.tensor(rng.dirichlet(np.ones(4), size=16))
    exact = exact_return("FrozenLake-v1", {}, probs, horizon=40)
    env = gym.make("FrozenLake-v1", max_episode_steps=40)
    total = 0.0
    for episode in range(3000):
        s, _ = env.reset(seed=episode)
        done = False
        while not done:
            s, r, term, trunc, _ = env.step(int(rng.choice(4, p=probs[s].numpy())))
            total += r
            done = term or trunc
    simulated = total / 3000
    assert 0.1 < exact < 0.9  # neither trivial nor certain: the check has power
    assert abs(simulated - exact) < 4 * (exact * (1 - exact) / 3000) ** 0.5


def test_exact_return_optimum_bounds_every_policy_and_refuses_bad_input():
    best = exact_return("FrozenLake-v1", {"is_slippery": False})
    path = _down_right_path()
    assert exact_return("FrozenLake-v1", {"is_slippery": False}, path) == best == 1.0
    assert exact_return("FrozenLake-v1", {"is_slippery": False}, path, horizon=5) == 0.0  # six steps needed
    assert exact_return("FrozenLake-v1", {}, path) < exact_return("FrozenLake-v1", {})  # slippery: not optimal
    with pytest.raises(ValueError, match="no transition table"):
        exact_return("CartPole-v1")
    with pytest.raises(ValueError, match="policy"):
        exact_return("FrozenLake-v1", {}, torch.full((16, 3), 1 / 3, dtype=torch.float64))
    with pytest.raises(ValueError, match="horizon"):
        exact_return("FrozenLake-v1", {}, horizon=0)
