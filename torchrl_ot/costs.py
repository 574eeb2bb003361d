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

from torchrl_ot.validation import (
    check_bool,
    check_broadcast,
    check_floating_dtype,
    check_positive_int,
    check_real,
    check_same_device,
    check_tensor,
    raise_first_failed,
)

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

# Floating action indices are converted with .long(): beyond 2**62 that conversion is undefined.
_INDEX_LIMIT = 2.0**62


def check_cost_values(cost: Tensor, name: str = "cost") -> Tensor:
    """Raise ``ValueError`` unless ``cost`` is a floating tensor of finite values >= 0 (an empty one passes).

    >>> check_cost_values(torch.tensor([0.0, 2.0]))
    tensor([0., 2.])
    >>> check_cost_values(torch.tensor([1.0, -1.0]), name="my cost")
    Traceback (most recent call last):
    ...
    ValueError: my cost must be non-negative; its smallest entry is -1
    """
    check_tensor(name, cost)
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


def _all(x: Tensor) -> Tensor:
    return x.all() if x.numel() else torch.ones((), dtype=torch.bool, device=x.device)


class TransportCost(nn.Module):
    """Base class: a transport cost ``c(a, a')`` evaluated elementwise with broadcasting.

    Subclasses implement :meth:`_cost`; :meth:`forward` validates the inputs (tensors on one device
    that broadcast; floating actions with a common last dimension ``d`` for a continuous cost,
    non-negative integer indices for a discrete one) and the result (shape, floating, finite, >= 0),
    with one device sync per call.
    ``discrete`` tells whether actions are integer indices (no event dimension).
    """

    discrete: bool = False
    # An exclusive upper bound on the action indices of a discrete cost (None: unbounded).
    _num_indices: int | None = None

    def _cost(self, a: Tensor, b: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        shape = self._check_inputs(a, b)
        checks = self._input_checks(a, b)
        if self.discrete:
            # Indices must be valid before anything indexes with them: a sync of its own.
            raise_first_failed(checks)
            checks = []
        out = self._cost(a, b)
        self._check_output(out, shape, a.device)
        # Continuous inputs are checked together with the output: one device sync per call.
        raise_first_failed(checks + self._value_checks(out, a, b))
        return out

    # -- the checks: type, dtype, device and shape need no sync; the value checks are gathered into one

    def _check_inputs(self, a: Tensor, b: Tensor) -> torch.Size:
        """The shape the output must have; refuses what no cost can evaluate (no device sync)."""
        name = type(self).__name__
        for arg, x in (("a", a), ("b", b)):
            check_tensor(arg, x)
            if x.dtype == torch.bool or x.is_complex():
                # True - False is no distance, and a bool mask used as an index selects, it does not index.
                raise ValueError(f"{arg} must hold {'action indices' if self.discrete else 'real actions'} "
                                 f"for {name}, got a {x.dtype} tensor")
            if not self.discrete and not x.is_floating_point():
                raise ValueError(f"{arg} must have a floating dtype for the continuous cost {name}, got {x.dtype} "
                                 "(integer action indices need a discrete cost)")
        check_same_device(a=a, b=b)
        if self.discrete:
            return check_broadcast(f" for {name}", a=a.shape, b=b.shape)
        if a.dim() == 0 or b.dim() == 0 or a.shape[-1] != b.shape[-1]:
            raise ValueError(f"a and b must be [..., d] actions with the same last dimension d for {name}, got "
                             f"a {tuple(a.shape)} and b {tuple(b.shape)}")
        return check_broadcast(f" for {name} (all but the last dimension d)", a=a.shape[:-1], b=b.shape[:-1])

    def _check_output(self, out, shape: torch.Size, device: torch.device) -> None:
        name = f"{type(self).__name__} output"
        check_tensor(name, out)
        if not out.is_floating_point():
            raise ValueError(f"{name} must have a floating dtype, got {out.dtype}")
        if out.shape != shape:
            raise ValueError(f"{name} must have the broadcast shape of the inputs {tuple(shape)}, "
                             f"got {tuple(out.shape)}")
        if out.device != device:
            raise ValueError(f"{name} must be on the inputs' device {device}, got {out.device}")

    def _input_checks(self, a: Tensor, b: Tensor) -> list:
        checks = []
        for arg, x in (("a", a), ("b", b)):
            if not self.discrete:
                checks.append((_all(torch.isfinite(x)),
                               lambda arg=arg: f"{arg} must be finite; it contains NaN or inf"))
                continue
            if x.is_floating_point():
                ok = torch.isfinite(x) & (x.abs() < _INDEX_LIMIT)
                checks.append((_all(ok & (x == x.round())),
                               lambda arg=arg: f"{arg} must hold integer action indices, got non-integer values"))
            n = self._num_indices
            ok = (x >= 0) if n is None else (x >= 0) & (x < n)
            what = "non-negative action indices" if n is None else f"action indices in [0, {n - 1}]"
            checks.append((_all(ok), lambda arg=arg, what=what: f"{arg} holds action indices outside the allowed "
                                                                 f"range: {arg} must hold {what}"))
        return checks

    def _value_checks(self, out: Tensor, a: Tensor, b: Tensor) -> list:
        name = f"{type(self).__name__} output"

        def overflow() -> str:
            return (f"{name} must be finite; it contains NaN or inf for finite inputs a and b "
                    f"(the cost overflows {out.dtype}: rescale the actions or use a wider dtype)")

        def negative() -> str:
            return f"{name} must be non-negative; its smallest entry is {out.min().item():.6g}"

        return [(_all(torch.isfinite(out)), overflow), (_all(out >= 0), negative)]

    def to_candidates(self, action: Tensor, candidates: Tensor) -> Tensor:
        """Cost from each action to each of its candidates: ``[*B, (d)]`` x ``[*B, K, (d)]`` -> ``[*B, K]``."""
        check_tensor("action", action)
        check_tensor("candidates", candidates)
        if self.discrete:
            if candidates.dim() != action.dim() + 1:
                raise ValueError(
                    f"candidates must have one more dimension than action (the K candidates), "
                    f"got action {tuple(action.shape)} and candidates {tuple(candidates.shape)}"
                )
            return self(action.unsqueeze(-1), candidates)
        if action.dim() == 0 or candidates.dim() != action.dim() + 1 or candidates.shape[-1] != action.shape[-1]:
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
        check_positive_int("num_actions", num_actions)
        check_floating_dtype("dtype", dtype)
        idx = torch.arange(num_actions)
        out = self._matrix(idx, dtype)
        if out.shape != (num_actions, num_actions):
            raise ValueError(f"{type(self).__name__} matrix must have shape [{num_actions}, {num_actions}], "
                             f"got {tuple(out.shape)}")
        # Checked after the cast: a finite float64 cost may overflow a narrower dtype.
        return check_cost_values(out, name=f"{type(self).__name__} matrix in {dtype}")

    def _matrix(self, idx: Tensor, dtype: torch.dtype) -> Tensor:
        return self(idx[:, None], idx[None, :]).to(dtype)


def _positive_power(p: float, name: str = "p") -> float:
    # check_real refuses a bool (True is not the power 1), a string and a tensor.
    check_real(name, p, low=0, low_open=True)
    return float(p)


class _PowerNorm(torch.autograd.Function):
    """``||x||_2^p`` over the last dimension, with a backward that is never NaN on finite input.

    Autograd through ``sq.sqrt().pow(p)`` gives ``inf * 0 = NaN`` at ``x = 0`` (sqrt's derivative is
    infinite there) and can overflow in between for tiny ``||x||`` and small ``p``. The forward is
    that same expression (same bits); the backward is autograd's own formula wherever that is finite,
    the subgradient 0 at ``x = 0``, and elsewhere the true gradient ``p ||x||^(p-1) x / ||x||``
    computed direction first, saturated at the dtype's largest value when it is not representable.
    """

    @staticmethod
    def forward(ctx, x: Tensor, p: float) -> Tensor:
        norm = x.pow(2).sum(-1).sqrt()
        ctx.save_for_backward(x, norm)
        ctx.p = p
        return norm.pow(p)

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, norm = ctx.saved_tensors
        p = ctx.p
        big = torch.finfo(norm.dtype).max
        pos = norm > 0
        safe = torch.where(pos, norm, torch.ones_like(norm))
        # Autograd's chain for sq.sqrt().pow(p), in its order, so valid inputs keep their gradient bits.
        g_norm = grad * (p * safe.pow(p - 1))
        plain = (g_norm / (2 * safe))[..., None] * (2 * x)
        scale = (grad * (p * safe.pow(p - 1)).clamp(max=big)).clamp(-big, big)
        robust = scale[..., None] * (x / safe[..., None])
        out = torch.where(torch.isfinite(plain), plain, robust)
        return torch.where(pos[..., None], out, torch.zeros_like(out)), None


class EuclideanCost(TransportCost):
    """``c(a, a') = ||a - a'||_2^p``; ``p=2`` (the default) is the squared Euclidean cost.

    Any ``p > 0``. For ``p != 2`` the gradient at ``a = a'`` is the subgradient 0 (``p <= 1`` has a
    kink there, and sqrt's derivative is infinite there for every p), never NaN.

    >>> import torch
    >>> EuclideanCost()(torch.tensor([0.0, 0.0]), torch.tensor([3.0, 4.0]))
    tensor(25.)
    >>> EuclideanCost(p=1)(torch.tensor([0.0, 0.0]), torch.tensor([3.0, 4.0]))
    tensor(5.)
    >>> a = torch.tensor([1.0, 2.0], requires_grad=True)
    >>> EuclideanCost(p=1)(a, a.detach()).backward()
    >>> a.grad
    tensor([0., 0.])
    """

    def __init__(self, *, p: float = 2.0) -> None:
        super().__init__()
        self.p = _positive_power(p)

    def _cost(self, a: Tensor, b: Tensor) -> Tensor:
        diff = a - b
        # For p = 2 skip the sqrt: exact and differentiable at a = a'.
        return diff.pow(2).sum(-1) if self.p == 2.0 else _PowerNorm.apply(diff, self.p)

    def extra_repr(self) -> str:
        return f"p={self.p}"


class L1Cost(TransportCost):
    """``c(a, a') = ||a - a'||_1``; the gradient at ``a_i = a'_i`` is the subgradient 0 (``sign(0) = 0``).

    >>> import torch
    >>> L1Cost()(torch.tensor([0.0, 0.0]), torch.tensor([3.0, -4.0]))
    tensor(7.)
    """

    def _cost(self, a: Tensor, b: Tensor) -> Tensor:
        return (a - b).abs().sum(-1)


def _as_index(x: Tensor) -> Tensor:
    # forward has checked that floating indices are integer-valued, finite and in range.
    return x.long() if x.is_floating_point() else x


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
        return (_as_index(a) != _as_index(b)).to(torch.get_default_dtype())


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
        d = (_as_index(a) - _as_index(b)).abs().to(torch.get_default_dtype())
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
        if not isinstance(matrix, Tensor):
            try:
                matrix = torch.as_tensor(matrix)
            except (TypeError, ValueError, RuntimeError) as err:
                raise ValueError(f"matrix must be a square [N, N] tensor of costs, "
                                 f"got {type(matrix).__name__}") from err
        check_tensor("matrix", matrix)
        if matrix.dtype == torch.bool or matrix.is_complex():
            # A bool matrix would be read as 0/1 costs and a complex one would lose its imaginary part.
            raise ValueError(f"matrix must hold real costs, got a {matrix.dtype} tensor")
        if not matrix.is_floating_point():
            matrix = matrix.to(torch.get_default_dtype())
        if matrix.dim() != 2 or matrix.shape[0] != matrix.shape[1] or matrix.shape[0] == 0:
            raise ValueError(f"matrix must be a non-empty square [N, N] tensor, got shape {tuple(matrix.shape)}")
        check_cost_values(matrix, name="matrix")
        if bool(torch.any(matrix.diagonal() != 0)):
            raise ValueError("matrix must have a zero diagonal (c(a, a) = 0, Assumption 2)")
        self.register_buffer("cost_matrix", matrix)
        self._num_indices = matrix.shape[0]

    def _check_inputs(self, a: Tensor, b: Tensor) -> torch.Size:
        shape = super()._check_inputs(a, b)
        if a.device != self.cost_matrix.device:
            raise ValueError(f"a and b must be on the cost matrix's device {self.cost_matrix.device}, got {a.device}")
        return shape

    def _cost(self, a: Tensor, b: Tensor) -> Tensor:
        # forward has checked the indices against [0, N - 1] (one sync with the other checks).
        return self.cost_matrix[_as_index(a), _as_index(b)]

    def matrix(self, num_actions: int, dtype: torch.dtype = torch.float64) -> Tensor:
        check_positive_int("num_actions", num_actions)
        check_floating_dtype("dtype", dtype)
        n = self.cost_matrix.shape[0]
        if num_actions != n:
            raise ValueError(f"num_actions must equal the matrix size {n}, got {num_actions}")
        return check_cost_values(self.cost_matrix.to(dtype), name=f"matrix in {dtype}")


class CallableCost(TransportCost):
    """Wrap a user callable ``fn(a, b) -> Tensor`` as a checked transport cost.

    ``discrete`` says whether ``fn`` takes action indices (no event dimension).
    With ``check_diagonal=True`` each call also evaluates ``fn(a, a)`` and refuses a non-zero
    result, so a cost that breaks ``c(a, a) = 0`` is caught on first use. The result must have the
    broadcast shape of the inputs (without the last dimension ``d`` for a continuous cost), a
    floating dtype, the inputs' device, and finite values >= 0 (the inputs are checked finite).

    >>> import torch
    >>> cost = CallableCost(lambda a, b: (a - b).abs().sum(-1) ** 3)
    >>> cost(torch.tensor([0.0]), torch.tensor([2.0]))
    tensor(8.)
    >>> CallableCost(lambda a, b: (a - b).abs())(torch.zeros(3, 2), torch.ones(3, 2))   # forgot .sum(-1)
    Traceback (most recent call last):
    ...
    ValueError: CallableCost output must have the broadcast shape of the inputs (3,), got (3, 2)
    """

    def __init__(self, fn: Callable[[Tensor, Tensor], Tensor], *, discrete: bool = False,
                 check_diagonal: bool = True) -> None:
        super().__init__()
        if not callable(fn):
            raise ValueError(f"fn must be callable, got {type(fn).__name__}")
        check_bool("discrete", discrete)
        check_bool("check_diagonal", check_diagonal)
        self.fn = fn
        self.discrete = discrete
        self.check_diagonal = check_diagonal

    def _cost(self, a: Tensor, b: Tensor) -> Tensor:
        out = self.fn(a, b)
        if not isinstance(out, Tensor):
            raise ValueError(f"the cost callable must return a Tensor, got {type(out).__name__}")
        return out

    def _value_checks(self, out: Tensor, a: Tensor, b: Tensor) -> list:
        checks = super()._value_checks(out, a, b)
        if self.check_diagonal:
            diag = self.fn(a, a)
            if not isinstance(diag, Tensor):
                raise ValueError(f"the cost callable must return a Tensor, got {type(diag).__name__} for fn(a, a)")
            checks.append((_all(diag == 0), lambda: "the cost callable must satisfy c(a, a) = 0 (Assumption 2)"))
        return checks
