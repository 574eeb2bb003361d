"""Transport costs c(a, a') on the action space (paper, Section 3, eq. 1 and Assumption 2).

Every cost is an ``nn.Module`` whose ``forward(a, b)`` broadcasts like any elementwise torch op:

* **continuous costs** (:class:`EuclideanCost`, :class:`L1Cost`, :class:`CallableCost`) read the
  last dimension of ``a`` and ``b`` as the action vector, so ``a`` of shape ``[B, d]`` and ``b``
  of shape ``[B, K, d]`` need ``a.unsqueeze(-2)``; :meth:`TransportCost.to_candidates` does that.
* **discrete costs** (:class:`DiscreteMetricCost`, :class:`IndexDistanceCost`,
  :class:`MatrixCost`) take integer action indices with no event dimension; they also give the
  full ``[N, N]`` matrix through :meth:`TransportCost.matrix`, which the tabular update uses.

Assumption 2 of the paper asks for ``c >= 0`` and ``c(a, a) = 0``: every cost checks its output
(non-negative and finite) and user-given costs are checked for a zero diagonal. A violation is a
:class:`ValueError` naming what is wrong, never a silent NaN.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

__all__ = [
    "TransportCost",
    "EuclideanCost",
    "L1Cost",
    "DiscreteMetricCost",
    "IndexDistanceCost",
    "MatrixCost",
    "CallableCost",
    "check_cost_values",
]


def check_cost_values(cost: Tensor, name: str = "cost") -> Tensor:
    """Raise ``ValueError`` unless ``cost`` is a non-empty floating tensor of finite values >= 0."""
    if not isinstance(cost, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(cost).__name__}")
    if not cost.is_floating_point():
        raise ValueError(f"{name} must have a floating dtype, got {cost.dtype}")
    if cost.numel() == 0:
        return cost
    lo, hi = torch.aminmax(cost)
    # aminmax propagates NaN, so one pass checks NaN, inf and sign together.
    if not bool(torch.isfinite(lo)) or not bool(torch.isfinite(hi)):
        raise ValueError(f"{name} must be finite; it contains NaN or inf")
    if bool(lo < 0):
        raise ValueError(f"{name} must be non-negative; its smallest entry is {lo.item():.6g}")
    return cost


class TransportCost(nn.Module):
    """Base class: a transport cost ``c(a, a')`` evaluated elementwise with broadcasting.

    Subclasses implement :meth:`_cost`; :meth:`forward` validates the result.
    ``discrete`` tells whether actions are integer indices (no event dimension).
    """

    discrete: bool = False

    def _cost(self, a: Tensor, b: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        return check_cost_values(self._cost(a, b), name=f"{type(self).__name__} output")

    def to_candidates(self, action: Tensor, candidates: Tensor) -> Tensor:
        """Cost from each action to each of its candidates: ``[*B, (d)]`` x ``[*B, K, (d)]`` -> ``[*B, K]``."""
        if self.discrete:
            if candidates.dim() != action.dim() + 1:
                raise ValueError(
                    f"candidates must have one more dimension than action (the K candidates), "
                    f"got action {tuple(action.shape)} and candidates {tuple(candidates.shape)}"
                )
            return self(action.unsqueeze(-1), candidates)
        if candidates.dim() != action.dim() + 1 or candidates.shape[-1] != action.shape[-1]:
            raise ValueError(
                f"candidates must be [*B, K, d] for action [*B, d], "
                f"got action {tuple(action.shape)} and candidates {tuple(candidates.shape)}"
            )
        return self(action.unsqueeze(-2), candidates)

    def matrix(self, num_actions: int, dtype: torch.dtype = torch.float64) -> Tensor:
        """The ``[N, N]`` cost matrix between action indices ``0..N-1`` (discrete costs only)."""
        if not self.discrete:
            raise ValueError(
                f"{type(self).__name__} is a continuous cost; matrix() needs a discrete cost "
                "(DiscreteMetricCost, IndexDistanceCost, MatrixCost)"
            )
        if not isinstance(num_actions, int) or num_actions < 1:
            raise ValueError(f"num_actions must be a positive int, got {num_actions!r}")
        idx = torch.arange(num_actions)
        return check_cost_values(self._matrix(idx, dtype), name=f"{type(self).__name__} matrix")

    def _matrix(self, idx: Tensor, dtype: torch.dtype) -> Tensor:
        return self._cost(idx[:, None], idx[None, :]).to(dtype)


def _positive_power(p: float, name: str = "p") -> float:
    p = float(p)
    if not (p > 0 and p < float("inf")):
        raise ValueError(f"{name} must be a positive finite number, got {p!r}")
    return p


class EuclideanCost(TransportCost):
    """``c(a, a') = ||a - a'||_2^p``; ``p=2`` (the default) is the squared Euclidean cost.

    >>> import torch
    >>> EuclideanCost()(torch.tensor([0.0, 0.0]), torch.tensor([3.0, 4.0]))
    tensor(25.)
    >>> EuclideanCost(p=1)(torch.tensor([0.0, 0.0]), torch.tensor([3.0, 4.0]))
    tensor(5.)
    """

    def __init__(self, *, p: float = 2.0) -> None:
        super().__init__()
        self.p = _positive_power(p)

    def _cost(self, a: Tensor, b: Tensor) -> Tensor:
        sq = (a - b).pow(2).sum(-1)
        # For p = 2 skip the sqrt: exact and differentiable at a = a'.
        return sq if self.p == 2.0 else sq.sqrt().pow(self.p)

    def extra_repr(self) -> str:
        return f"p={self.p}"


class L1Cost(TransportCost):
    """``c(a, a') = ||a - a'||_1``.

    >>> import torch
    >>> L1Cost()(torch.tensor([0.0, 0.0]), torch.tensor([3.0, -4.0]))
    tensor(7.)
    """

    def _cost(self, a: Tensor, b: Tensor) -> Tensor:
        return (a - b).abs().sum(-1)


def _as_index(x: Tensor, name: str) -> Tensor:
    if x.is_floating_point():
        if not bool(torch.all(x == x.round())):
            raise ValueError(f"{name} must hold integer action indices, got non-integer values")
        x = x.long()
    return x


class DiscreteMetricCost(TransportCost):
    """The 0/1 metric ``c(i, j) = 1[i != j]`` on action indices (OT discrepancy = total variation).

    >>> import torch
    >>> DiscreteMetricCost().matrix(3)
    tensor([[0., 1., 1.],
            [1., 0., 1.],
            [1., 1., 0.]], dtype=torch.float64)
    """

    discrete = True

    def _cost(self, a: Tensor, b: Tensor) -> Tensor:
        return (_as_index(a, "a") != _as_index(b, "b")).to(torch.get_default_dtype())


class IndexDistanceCost(TransportCost):
    """``c(i, j) = |i - j|^p`` for ordered discrete actions.

    >>> import torch
    >>> IndexDistanceCost(p=2).matrix(3)
    tensor([[0., 1., 4.],
            [1., 0., 1.],
            [4., 1., 0.]], dtype=torch.float64)
    """

    discrete = True

    def __init__(self, *, p: float = 1.0) -> None:
        super().__init__()
        self.p = _positive_power(p)

    def _cost(self, a: Tensor, b: Tensor) -> Tensor:
        d = (_as_index(a, "a") - _as_index(b, "b")).abs().to(torch.get_default_dtype())
        return d.pow(self.p)

    def _matrix(self, idx: Tensor, dtype: torch.dtype) -> Tensor:
        # Power in the requested dtype: computing in float32 first would round sqrt(2) or 4999^2.
        return (idx[:, None] - idx[None, :]).abs().to(dtype).pow(self.p)

    def extra_repr(self) -> str:
        return f"p={self.p}"


class MatrixCost(TransportCost):
    """A user-given ``[N, N]`` cost matrix ``c(i, j) = matrix[i, j]`` on action indices.

    The matrix must be square, finite, non-negative, with a zero diagonal.

    >>> import torch
    >>> cost = MatrixCost(torch.tensor([[0.0, 2.0], [1.0, 0.0]]))
    >>> cost(torch.tensor([0, 1]), torch.tensor([1, 0]))
    tensor([2., 1.])
    """

    discrete = True

    def __init__(self, matrix: Tensor) -> None:
        super().__init__()
        matrix = torch.as_tensor(matrix)
        if not matrix.is_floating_point():
            matrix = matrix.to(torch.get_default_dtype())
        if matrix.dim() != 2 or matrix.shape[0] != matrix.shape[1] or matrix.shape[0] == 0:
            raise ValueError(f"matrix must be a non-empty square [N, N] tensor, got shape {tuple(matrix.shape)}")
        check_cost_values(matrix, name="matrix")
        if bool(torch.any(matrix.diagonal() != 0)):
            raise ValueError("matrix must have a zero diagonal (c(a, a) = 0, Assumption 2)")
        self.register_buffer("cost_matrix", matrix)

    def _cost(self, a: Tensor, b: Tensor) -> Tensor:
        a, b = _as_index(a, "a"), _as_index(b, "b")
        n = self.cost_matrix.shape[0]
        for name, x in (("a", a), ("b", b)):
            if x.numel() and (bool(x.min() < 0) or bool(x.max() >= n)):
                raise ValueError(f"{name} holds action indices outside [0, {n - 1}]")
        return self.cost_matrix[a, b]

    def matrix(self, num_actions: int, dtype: torch.dtype = torch.float64) -> Tensor:
        n = self.cost_matrix.shape[0]
        if num_actions != n:
            raise ValueError(f"num_actions must equal the matrix size {n}, got {num_actions}")
        return self.cost_matrix.to(dtype)


class CallableCost(TransportCost):
    """Wrap a user callable ``fn(a, b) -> Tensor`` as a checked transport cost.

    ``discrete`` says whether ``fn`` takes action indices (no event dimension).
    With ``check_diagonal=True`` each call also evaluates ``fn(a, a)`` and refuses a non-zero
    result, so a cost that breaks ``c(a, a) = 0`` is caught on first use.

    >>> import torch
    >>> cost = CallableCost(lambda a, b: (a - b).abs().sum(-1) ** 3)
    >>> cost(torch.tensor([0.0]), torch.tensor([2.0]))
    tensor(8.)
    """

    def __init__(self, fn: Callable[[Tensor, Tensor], Tensor], *, discrete: bool = False,
                 check_diagonal: bool = True) -> None:
        super().__init__()
        if not callable(fn):
            raise ValueError(f"fn must be callable, got {type(fn).__name__}")
        self.fn = fn
        self.discrete = discrete
        self.check_diagonal = check_diagonal

    def _cost(self, a: Tensor, b: Tensor) -> Tensor:
        out = self.fn(a, b)
        if not isinstance(out, Tensor):
            raise ValueError(f"the cost callable must return a Tensor, got {type(out).__name__}")
        if self.check_diagonal:
            diag = self.fn(a, a)
            if isinstance(diag, Tensor) and diag.numel() and bool(torch.any(diag != 0)):
                raise ValueError("the cost callable must satisfy c(a, a) = 0 (Assumption 2)")
        return out
