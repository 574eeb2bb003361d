"""Tests of the transport costs: values on hand examples, broadcasting, matrices, checks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from torchrl_ot import CallableCost, DiscreteMetricCost, EuclideanCost, IndexDistanceCost, L1Cost, MatrixCost
from torchrl_ot.costs import TransportCost, check_cost_values

F64 = torch.float64


# ----------------------------------------------------------------------------------------------
# values on hand examples


def test_euclidean_values():
    a, b = torch.tensor([0.0, 0.0], dtype=F64), torch.tensor([3.0, 4.0], dtype=F64)
    assert EuclideanCost()(a, b).item() == 25.0
    assert EuclideanCost(p=2)(a, b).item() == 25.0
    assert EuclideanCost(p=1)(a, b).item() == 5.0
    assert EuclideanCost(p=3)(a, b).item() == pytest.approx(125.0, rel=1e-14)
    assert EuclideanCost(p=0.5)(a, b).item() == pytest.approx(5**0.5, rel=1e-14)
    # 1-D actions and dtype preserved
    out = EuclideanCost()(torch.tensor([1.5], dtype=F64), torch.tensor([-0.5], dtype=F64))
    assert out.dtype == F64 and out.item() == 4.0
    assert EuclideanCost()(torch.tensor([1.0, 2.0]), torch.tensor([1.0, 2.0])).dtype == torch.float32


def test_l1_values():
    assert L1Cost()(torch.tensor([0.0, 0.0]), torch.tensor([3.0, -4.0])).item() == 7.0
    assert L1Cost()(torch.tensor([1.0, -2.0, 0.5]), torch.tensor([0.0, 0.0, 0.0])).item() == 3.5


def test_discrete_metric_values():
    c = DiscreteMetricCost()
    out = c(torch.tensor([0, 1, 2, 2]), torch.tensor([0, 2, 2, 0]))
    torch.testing.assert_close(out, torch.tensor([0.0, 1.0, 0.0, 1.0]))
    torch.testing.assert_close(c.matrix(3), 1.0 - torch.eye(3, dtype=F64))
    assert c.matrix(3).dtype == F64
    assert c.matrix(1).tolist() == [[0.0]]
    # integer-valued floats are accepted as indices, non-integers are not
    assert c(torch.tensor([1.0]), torch.tensor([1.0])).item() == 0.0
    with pytest.raises(ValueError, match="integer"):
        c(torch.tensor([0.5]), torch.tensor([1]))


def test_index_distance_values():
    torch.testing.assert_close(
        IndexDistanceCost().matrix(4),
        torch.tensor([[0, 1, 2, 3], [1, 0, 1, 2], [2, 1, 0, 1], [3, 2, 1, 0]], dtype=F64))
    torch.testing.assert_close(
        IndexDistanceCost(p=2).matrix(3),
        torch.tensor([[0, 1, 4], [1, 0, 1], [4, 1, 0]], dtype=F64))
    out = IndexDistanceCost(p=2)(torch.tensor([0, 5]), torch.tensor([3, 1]))
    torch.testing.assert_close(out, torch.tensor([9.0, 16.0]))


def test_index_distance_matrix_is_exact_in_float64():
    """matrix(N, float64) must hold |i - j|^p to float64 precision.

    The values are computed in the default dtype (float32) and only then cast, so p = 0.5 gives
    sqrt(2) with a 1.7e-8 relative error, and p = 2 with N = 5000 gives 4999^2 = 24990001 as
    24990000.
    """
    n = 6
    idx = np.arange(n)
    for p in (0.5, 1.5, 3.0):
        exact = np.abs(idx[:, None] - idx[None, :]).astype(np.float64) ** p
        np.testing.assert_allclose(IndexDistanceCost(p=p).matrix(n).numpy(), exact, rtol=1e-14, atol=0)
    assert IndexDistanceCost(p=2).matrix(5000)[0, 4999].item() == 4999.0**2


def test_matrix_cost_values():
    m = torch.tensor([[0.0, 2.0, 5.0], [1.0, 0.0, 0.5], [3.0, 4.0, 0.0]], dtype=F64)
    c = MatrixCost(m)
    torch.testing.assert_close(c(torch.tensor([0, 1, 2]), torch.tensor([1, 0, 1])),
                               torch.tensor([2.0, 1.0, 4.0], dtype=F64))
    torch.testing.assert_close(c.matrix(3), m)
    assert c.matrix(3, dtype=torch.float32).dtype == torch.float32
    with pytest.raises(ValueError, match="num_actions"):
        c.matrix(4)
    with pytest.raises(ValueError, match="outside"):
        c(torch.tensor([3]), torch.tensor([0]))
    with pytest.raises(ValueError, match="outside"):
        c(torch.tensor([0]), torch.tensor([-1]))
    # integer matrices are accepted (converted to floating point); zero off-diagonal is fine
    ci = MatrixCost(torch.tensor([[0, 0], [1, 0]]))
    assert ci.matrix(2).tolist() == [[0.0, 0.0], [1.0, 0.0]]


def test_callable_cost_values():
    cube = CallableCost(lambda a, b: (a - b).abs().sum(-1) ** 3)
    assert cube(torch.tensor([0.0]), torch.tensor([2.0])).item() == 8.0
    assert not cube.discrete
    disc = CallableCost(lambda i, j: (i - j).abs().to(F64) * 2, discrete=True)
    assert disc.discrete
    torch.testing.assert_close(disc.matrix(3), 2.0 * IndexDistanceCost().matrix(3))


def test_callable_cost_does_not_change_the_class_flag():
    CallableCost(lambda i, j: (i - j).abs().float(), discrete=True)
    assert CallableCost.discrete is False and TransportCost.discrete is False
    assert CallableCost(lambda a, b: (a - b).abs().sum(-1)).discrete is False


# ----------------------------------------------------------------------------------------------
# c(a, a) = 0 and non-negativity on random inputs

CONTINUOUS = [EuclideanCost(), EuclideanCost(p=1), EuclideanCost(p=3), L1Cost(),
              CallableCost(lambda a, b: ((a - b) ** 2).sum(-1).sqrt())]
CONT_IDS = ["euclid2", "euclid1", "euclid3", "l1", "callable"]


@pytest.mark.parametrize("cost", CONTINUOUS, ids=CONT_IDS)
def test_continuous_zero_diagonal_and_nonnegative(cost):
    g = torch.Generator().manual_seed(0)
    a = torch.randn(16, 3, generator=g, dtype=F64)
    b = torch.randn(16, 3, generator=g, dtype=F64)
    assert torch.equal(cost(a, a), torch.zeros(16, dtype=F64))
    out = cost(a, b)
    assert out.shape == (16,) and (out > 0).all()
    # symmetric
    torch.testing.assert_close(out, cost(b, a))


@pytest.mark.parametrize("cost", [DiscreteMetricCost(), IndexDistanceCost(), IndexDistanceCost(p=2),
                                  MatrixCost(torch.tensor([[0.0, 1.0, 2.0], [3.0, 0.0, 1.0],
                                                           [0.5, 0.25, 0.0]]))],
                         ids=["metric", "index1", "index2", "matrix"])
def test_discrete_zero_diagonal_and_nonnegative(cost):
    m = cost.matrix(3)
    assert m.shape == (3, 3) and m.dtype == F64
    assert torch.equal(m.diagonal(), torch.zeros(3, dtype=F64))
    assert (m >= 0).all()
    idx = torch.arange(3)
    assert torch.equal(cost(idx, idx), torch.zeros(3, dtype=cost(idx, idx).dtype))
    # the matrix is the cost evaluated on every pair
    for i in range(3):
        for j in range(3):
            assert cost(torch.tensor(i), torch.tensor(j)).item() == pytest.approx(m[i, j].item(), rel=1e-6)


# ----------------------------------------------------------------------------------------------
# broadcasting and to_candidates


@pytest.mark.parametrize("cost", CONTINUOUS, ids=CONT_IDS)
def test_to_candidates_continuous(cost):
    g = torch.Generator().manual_seed(1)
    B, K, d = 5, 4, 2
    action = torch.randn(B, d, generator=g, dtype=F64)
    cands = torch.randn(B, K, d, generator=g, dtype=F64)
    out = cost.to_candidates(action, cands)
    assert out.shape == (B, K)
    for b in range(B):
        for k in range(K):
            assert out[b, k].item() == pytest.approx(cost(action[b], cands[b, k]).item(), rel=1e-12)
    # extra leading batch dimensions
    out2 = cost.to_candidates(action.expand(3, B, d), cands.expand(3, B, K, d))
    assert out2.shape == (3, B, K)
    torch.testing.assert_close(out2[1], out)
    # a candidate equal to the action costs 0
    cands[:, 2] = action
    assert torch.equal(cost.to_candidates(action, cands)[:, 2], torch.zeros(B, dtype=F64))


def test_broadcasting_like_elementwise_ops():
    g = torch.Generator().manual_seed(2)
    a = torch.randn(4, 1, 3, generator=g, dtype=F64)
    b = torch.randn(1, 6, 3, generator=g, dtype=F64)
    out = EuclideanCost()(a, b)
    assert out.shape == (4, 6)
    expected = ((a.numpy() - b.numpy()) ** 2).sum(-1)
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-14)
    np.testing.assert_allclose(L1Cost()(a, b).numpy(), np.abs(a.numpy() - b.numpy()).sum(-1), rtol=1e-14)
    # the pairwise matrix of an embedding
    emb = torch.randn(5, 2, generator=g, dtype=F64)
    m = EuclideanCost(p=1)(emb[:, None], emb[None])
    np.testing.assert_allclose(
        m.numpy(), np.linalg.norm(emb.numpy()[:, None] - emb.numpy()[None], axis=-1), rtol=1e-12, atol=0)


@pytest.mark.parametrize("cost", [DiscreteMetricCost(), IndexDistanceCost(p=2),
                                  MatrixCost(IndexDistanceCost(p=2).matrix(5))],
                         ids=["metric", "index2", "matrix"])
def test_to_candidates_discrete(cost):
    action = torch.tensor([0, 3, 4])
    cands = torch.tensor([[0, 1, 4], [3, 3, 0], [2, 4, 1]])
    out = cost.to_candidates(action, cands)
    assert out.shape == (3, 3)
    m = cost.matrix(5)
    expected = m[action[:, None], cands]
    np.testing.assert_allclose(out.double().numpy(), expected.numpy())


def test_to_candidates_shape_errors():
    with pytest.raises(ValueError, match="candidates"):
        EuclideanCost().to_candidates(torch.zeros(3, 2), torch.zeros(3, 2))
    with pytest.raises(ValueError, match="candidates"):
        EuclideanCost().to_candidates(torch.zeros(3, 2), torch.zeros(3, 4, 5))
    with pytest.raises(ValueError, match="candidates"):
        DiscreteMetricCost().to_candidates(torch.zeros(3, dtype=torch.long), torch.zeros(3, dtype=torch.long))


def test_p2_euclidean_gradient_finite_at_zero_distance():
    a = torch.tensor([[0.3, -1.0]], dtype=F64, requires_grad=True)
    EuclideanCost()(a, a.detach()).sum().backward()
    assert torch.isfinite(a.grad).all() and torch.equal(a.grad, torch.zeros_like(a))


# ----------------------------------------------------------------------------------------------
# bad input


@pytest.mark.parametrize("p", [0, -1, 0.0, float("inf"), float("nan")])
def test_bad_power(p):
    with pytest.raises(ValueError, match="p must be"):
        EuclideanCost(p=p)
    with pytest.raises(ValueError, match="p must be"):
        IndexDistanceCost(p=p)


@pytest.mark.parametrize("matrix,msg", [
    (torch.tensor([[1.0, 1.0], [1.0, 0.0]]), "diagonal"),
    (torch.tensor([[0.0, -1.0], [1.0, 0.0]]), "non-negative"),
    (torch.tensor([[0.0, 1.0, 2.0], [1.0, 0.0, 1.0]]), "square"),
    (torch.zeros(3), "square"),
    (torch.zeros(0, 0), "square"),
    (torch.tensor([[0.0, float("nan")], [1.0, 0.0]]), "finite"),
    (torch.tensor([[0.0, float("inf")], [1.0, 0.0]]), "finite"),
], ids=["diagonal", "negative", "non_square", "1d", "empty", "nan", "inf"])
def test_matrix_cost_rejects(matrix, msg):
    with pytest.raises(ValueError, match="matrix") as info:
        MatrixCost(matrix)
    assert msg in str(info.value)


def test_callable_cost_rejects_nonzero_diagonal_on_call():
    bad = CallableCost(lambda a, b: (a - b).abs().sum(-1) + 1.0)  # construction is lazy
    with pytest.raises(ValueError, match="c\\(a, a\\) = 0"):
        bad(torch.zeros(2, 1), torch.ones(2, 1))
    with pytest.raises(ValueError, match="c\\(a, a\\) = 0"):
        bad.to_candidates(torch.zeros(2, 1), torch.ones(2, 3, 1))
    # with the check switched off, the value passes through
    lax = CallableCost(lambda a, b: (a - b).abs().sum(-1) + 1.0, check_diagonal=False)
    assert lax(torch.zeros(1), torch.zeros(1)).item() == 1.0


@pytest.mark.parametrize("fn,match", [
    (lambda a, b: (a - b).sum(-1), "non-negative"),
    (lambda a, b: (a - b).sum(-1) * float("nan"), "finite"),
    (lambda a, b: (a - b).abs().sum(-1) * float("inf"), "finite"),
    (lambda a, b: 3.0, "Tensor"),
], ids=["negative", "nan", "inf", "not_tensor"])
def test_callable_cost_rejects_bad_output(fn, match):
    c = CallableCost(fn, check_diagonal=False)
    with pytest.raises(ValueError, match=match):
        c(torch.zeros(2, 1), torch.ones(2, 1))


def test_callable_cost_rejects_non_callable():
    with pytest.raises(ValueError, match="fn"):
        CallableCost(3.0)


def test_matrix_requires_discrete_cost_and_positive_size():
    with pytest.raises(ValueError, match="continuous"):
        EuclideanCost().matrix(3)
    with pytest.raises(ValueError, match="continuous"):
        L1Cost().matrix(3)
    for n in (0, -1, 2.0):
        with pytest.raises(ValueError, match="num_actions"):
            DiscreteMetricCost().matrix(n)


def test_check_cost_values():
    assert check_cost_values(torch.zeros(0)).numel() == 0
    x = torch.tensor([0.0, 1.0])
    assert check_cost_values(x) is x
    with pytest.raises(ValueError, match="my cost"):
        check_cost_values(torch.tensor([1.0, -1.0]), name="my cost")
    with pytest.raises(ValueError, match="floating"):
        check_cost_values(torch.tensor([1, 2]))
