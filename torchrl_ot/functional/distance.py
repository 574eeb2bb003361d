"""The constraint of Problem (P) for a fitted network: the OT discrepancy (eq. 1) between pi_old and pi_theta,
exact for categorical policies and an upper bound for (squashed) diagonal Gaussians."""

from __future__ import annotations

import torch
from torch import Tensor

from torchrl_ot.validation import check_broadcast, check_finite, check_same_device, check_tensor

__all__ = ["categorical_transport", "gaussian_transport_bound"]



def _is_uniform_metric(cost: Tensor) -> bool:
    off = cost[~torch.eye(cost.shape[0], dtype=torch.bool, device=cost.device)]
    return off.numel() == 0 or bool((off == off[0]).all())


def categorical_transport(old: Tensor, new: Tensor, cost: Tensor) -> Tensor:
    """Exact OT discrepancy ``C(old(.|s), new(.|s))`` (eq. 1) per state between two categorical policies.

    Args:
        old, new: ``[B, A]`` probabilities (rows on the simplex). cost: ``[A, A]`` cost matrix, zero diagonal.

    Returns ``[B]``. Closed forms where they exist: a cost that charges every move the same ``c`` (the
    0/1 metric: ``c`` times the total variation ``0.5 sum |old - new|``), ``c |i - j|`` on ordered
    actions (the gap between the two CDFs) and two actions (the surplus of one action moves to the
    other). Any other matrix is solved state by state by POT's exact network simplex (``ot.emd2``).
    Exact either way: this is what checks that a fitted network stayed inside the trust region, so it
    is never estimated.

    >>> import torch
    >>> old = torch.tensor([[0.5, 0.5, 0.0]], dtype=torch.float64)
    >>> new = torch.tensor([[0.2, 0.5, 0.3]], dtype=torch.float64)
    >>> categorical_transport(old, new, torch.ones(3, 3, dtype=torch.float64) - torch.eye(3, dtype=torch.float64))
    tensor([0.3000], dtype=torch.float64)
    >>> categorical_transport(old, new, torch.tensor([[0.0, 1.0, 2.0], [1.0, 0.0, 1.0], [2.0, 1.0, 0.0]],
    ...                                              dtype=torch.float64))   # 0.3 moves two steps
    tensor([0.6000], dtype=torch.float64)
    """
    for name, x in (("old", old), ("new", new)):
        check_tensor(name, x)
        if not x.is_floating_point() or x.dim() != 2:
            raise ValueError(f"{name} must be a floating [B, A] tensor of probabilities")
        check_finite(x, name, nonneg=True)
    if new.shape != old.shape:
        raise ValueError(f"new must have old's shape {tuple(old.shape)}, got {tuple(new.shape)}")
    check_same_device(old=old, new=new)
    A = old.shape[1]
    if not isinstance(cost, Tensor) or cost.shape != (A, A):
        raise ValueError(f"cost must be a [{A}, {A}] tensor, got {getattr(cost, 'shape', type(cost).__name__)}")
    check_finite(cost, "cost", nonneg=True)
    if bool((cost.diagonal() != 0).any()):
        raise ValueError("cost must have a zero diagonal (c(a, a) = 0, Assumption 2)")
    for name, x in (("old", old), ("new", new)):
        # OT between rows of unequal mass is undefined: the closed forms would return a number and the
        # exact solver would renormalise silently. The tolerance is loose: it catches logits or
        # unnormalised counts, not the rounding of a softmax.
        tol = max(1e-3, A * torch.finfo(x.dtype).eps)
        if bool(((x.sum(-1, dtype=torch.float64) - 1).abs() > tol).any()):
            raise ValueError(f"{name} rows must lie on the simplex (each row sums to 1)")
    cost = cost.to(dtype=torch.promote_types(old.dtype, new.dtype), device=old.device)
    check_finite(cost, f"cost in {cost.dtype}", nonneg=True)
    if _is_uniform_metric(cost):
        move = cost[0, 1] if A > 1 else cost.new_zeros(())
        return move * 0.5 * (old - new).abs().sum(-1)
    line = (torch.arange(A, device=cost.device)[:, None] - torch.arange(A, device=cost.device)[None, :]).abs()
    if A > 1 and torch.equal(cost, cost[0, 1] * line.to(cost.dtype)):
        # |i - j| on ordered actions (IndexDistanceCost(p=1)): W1 on a line, the gap between the CDFs.
        return cost[0, 1] * (old.cumsum(-1) - new.cumsum(-1))[:, :-1].abs().sum(-1)
    if A == 2:
        surplus = old[:, 0] - new[:, 0]  # > 0: action 0's surplus moves to action 1
        return torch.where(surplus > 0, surplus * cost[0, 1], -surplus * cost[1, 0])
    import numpy as np
    import ot

    p, q = old.detach().double().cpu().numpy(), new.detach().double().cpu().numpy()
    c = np.ascontiguousarray(cost.detach().double().cpu().numpy())
    # emd2 wants equal masses to rounding: renormalise each row.
    out = [float(ot.emd2(a / a.sum(), b / b.sum(), c)) if not np.array_equal(a, b) else 0.0
           for a, b in zip(p, q, strict=True)]
    return torch.tensor(out, dtype=old.dtype, device=old.device)


def gaussian_transport_bound(old_loc: Tensor, old_scale: Tensor, new_loc: Tensor, new_scale: Tensor, cost,
                             lipschitz: float | Tensor = 1.0) -> Tensor:
    """An upper bound on ``C(pi_old(.|s), pi_theta(.|s))`` (eq. 1) per state for diagonal Gaussians pushed
    through a map that is ``lipschitz``-Lipschitz in each coordinate (1 for none; ``(high - low) / 2`` for
    TorchRL's ``TanhNormal``).

    The synchronous coupling (both actions from the same noise ``z``) moves coordinate i by at most
    ``L_i |dloc_i + dscale_i z_i|``. With equal scales that is at most ``L |dloc|`` surely, so the bound is
    ``cost(0, L |dloc|)`` for any cost that grows with each coordinate's distance (:class:`EuclideanCost`,
    :class:`L1Cost`). With different scales the expectation is closed-form only for the squared Euclidean
    cost: ``sum_i L_i^2 (dloc_i^2 + dscale_i^2)`` (the Gaussians' exact W2^2 when ``L = 1``). Returns ``[B]``.

    >>> import torch
    >>> from torchrl_ot.costs import EuclideanCost
    >>> loc0, loc1, s = torch.zeros(1, 2), torch.tensor([[0.3, -0.4]]), torch.ones(1, 2)
    >>> gaussian_transport_bound(loc0, s, loc1, s, EuclideanCost())
    tensor([0.2500])
    >>> gaussian_transport_bound(loc0, s, loc1, s, EuclideanCost(p=1), lipschitz=2.0)   # actions in [-2, 2]
    tensor([1.])
    """
    from torchrl_ot.costs import EuclideanCost, L1Cost

    if not isinstance(cost, (EuclideanCost, L1Cost)):
        raise ValueError(f"cost must be an EuclideanCost or L1Cost (a cost that grows with each coordinate's "
                         f"distance), got {type(cost).__name__}")
    args = {"old_loc": old_loc, "old_scale": old_scale, "new_loc": new_loc, "new_scale": new_scale}
    for name, x in args.items():
        if not isinstance(x, Tensor) or not x.is_floating_point() or x.dim() == 0:
            raise ValueError(f"{name} must be a floating [..., d] tensor")
        check_finite(x, name, nonneg=name.endswith("scale"))
    try:
        shape = torch.broadcast_shapes(*(x.shape for x in args.values()))
    except RuntimeError as err:
        raise ValueError("old_loc, old_scale, new_loc and new_scale must broadcast to one [..., d] shape, got "
                         + ", ".join(str(tuple(x.shape)) for x in args.values())) from err
    check_same_device(**args)
    if isinstance(lipschitz, Tensor):
        check_tensor("lipschitz", lipschitz)
        if lipschitz.dtype == torch.bool or lipschitz.is_complex():
            raise ValueError(f"lipschitz must be a finite number >= 0 or a tensor of them, got {lipschitz.dtype}")
        if check_broadcast(**{"the actions": shape, "lipschitz": lipschitz.shape}) != shape:
            raise ValueError(f"lipschitz of shape {tuple(lipschitz.shape)} must broadcast to the actions' shape "
                             f"{tuple(shape)} without enlarging it")
    elif isinstance(lipschitz, bool) or not isinstance(lipschitz, (int, float)):
        raise ValueError(f"lipschitz must be a finite number >= 0 or a tensor of them, got {lipschitz!r}")
    lip = torch.as_tensor(lipschitz, dtype=new_loc.dtype, device=new_loc.device)
    check_finite(lip, "lipschitz", nonneg=True)
    dloc = (lip * (new_loc - old_loc)).expand(shape)
    dscale = (lip * (new_scale - old_scale)).expand(shape)
    if bool((dscale == 0).all()):
        return cost(torch.zeros_like(dloc), dloc.abs())
    if isinstance(cost, EuclideanCost) and cost.p == 2.0:
        out = (dloc.pow(2) + dscale.pow(2)).sum(-1)
        check_finite(out, f"the transport bound (it overflows {out.dtype} for finite inputs)")
        return out
    raise ValueError("old and new scales differ: the bound is closed-form only for the squared Euclidean cost "
                     f"(EuclideanCost(p=2)), got {cost!r}")
