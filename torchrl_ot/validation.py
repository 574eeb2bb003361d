"""Input checks shared by every public entry point: one place for what a refusal says.

A refusal is a ``ValueError`` that names the argument and what is allowed. Checks that need a device sync
(``bool(tensor)``) belong once per batch, never once per minibatch step.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch
from tensordict.utils import NestedKey
from torch import Tensor

__all__ = ["Radius", "check_bool", "check_choice", "check_epsilon", "check_finite", "check_finite_entries",
           "check_positive_int", "check_real", "is_real"]


def is_real(value) -> bool:
    """A finite Python number that is not a bool (``True`` is an int to Python, not a number to a user)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_real(name: str, value, *, low: float | None = None, low_open: bool = False, high: float | None = None,
               high_open: bool = False, allow_none: bool = False) -> None:
    """Refuse anything but a finite number in ``[low, high]`` (ends open where asked), or None if allowed."""
    if value is None and allow_none:
        return
    ok = is_real(value)
    ok = ok and (low is None or (value > low if low_open else value >= low))
    ok = ok and (high is None or (value < high if high_open else value <= high))
    if not ok:
        bounds = [f"{'>' if low_open else '>='} {low}" if low is not None else None,
                  f"{'<' if high_open else '<='} {high}" if high is not None else None]
        what = " and ".join(b for b in bounds if b) or "finite"
        raise ValueError(f"{name} must be a finite number {what}{' or None' if allow_none else ''}, got {value!r}")


def check_positive_int(name: str, value, *, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


def check_bool(name: str, value) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r}")


def check_choice(name: str, value, choices: Sequence) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")


def check_finite(x: Tensor, name: str, *, nonneg: bool = False) -> None:
    """Refuse NaN or inf in ``x`` (and, with ``nonneg``, a negative entry), naming ``name``."""
    lo, hi = torch.aminmax(x)
    # aminmax propagates NaN, so one pass covers NaN, inf and the sign.
    if not bool(torch.isfinite(lo) & torch.isfinite(hi)):
        raise ValueError(f"{name} must be finite; it contains NaN or inf")
    if nonneg and bool(lo < 0):
        raise ValueError(f"{name} must be non-negative; its smallest entry is {lo.item():.6g}")


def check_epsilon(epsilon: float | Tensor, dtype: torch.dtype = torch.float64,
                  device: torch.device | str = "cpu") -> Tensor:
    """The trust-region radius as a 0-dim tensor of ``dtype``; refuses anything but a positive finite number."""
    if isinstance(epsilon, Tensor):
        if epsilon.numel() != 1:
            raise ValueError(f"epsilon must be a float or a 0-dim tensor, got shape {tuple(epsilon.shape)}")
        eps = epsilon.detach().reshape(()).to(dtype=dtype, device=device)
    elif isinstance(epsilon, (int, float)) and not isinstance(epsilon, bool):
        eps = torch.tensor(float(epsilon), dtype=dtype, device=device)
    else:
        raise ValueError(f"epsilon must be a positive float or 0-dim tensor, got {type(epsilon).__name__}")
    if not bool(torch.isfinite(eps)) or not bool(eps > 0):
        raise ValueError(f"epsilon must be positive and finite, got {eps.item()!r}")
    return eps


def check_finite_entries(td, keys: Iterable[NestedKey], owner: str) -> None:
    """Refuse a NaN or inf in any floating entry ``keys`` of ``td`` (a TensorDict or a dict), naming the entry:
    it would otherwise flow silently into lam* or the gradients."""
    for key in dict.fromkeys(keys):
        value = td.get(key, None)
        if isinstance(value, Tensor) and value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise ValueError(f"{key!r} reaching {owner} contains NaN or inf; refusing a NaN update")


class Radius:
    """A trust-region radius attribute, checked on EVERY assignment (``module.epsilon = 0`` is refused as
    ``Module(epsilon=0)`` is). Stored as a float."""

    def __set_name__(self, owner, name: str) -> None:
        self._slot = f"_{name}_value"

    def __get__(self, obj, objtype=None):
        return self if obj is None else obj.__dict__[self._slot]

    def __set__(self, obj, value) -> None:
        obj.__dict__[self._slot] = float(check_epsilon(value))
