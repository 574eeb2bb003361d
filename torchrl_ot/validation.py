"""Input checks shared by every public entry point: one place for what a refusal says.

A refusal is a ``ValueError`` that names the argument and what is allowed. Checks that need a device sync
(``bool(tensor)``) belong once per batch, never once per minibatch step.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence

import torch
from tensordict.utils import NestedKey
from torch import Tensor

__all__ = ["Radius", "check_bool", "check_broadcast", "check_choice", "check_epsilon", "check_finite",
           "check_finite_entries", "check_floating_dtype", "check_positive_int", "check_real", "check_same_device",
           "check_tensor", "is_real", "raise_first_failed"]


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


def check_tensor(name: str, x, *, floating: bool = False) -> None:
    """Refuse anything but a torch.Tensor with values (not on the meta device); with ``floating``, a floating dtype.

    >>> check_tensor("x", torch.zeros(2, device="meta"))
    Traceback (most recent call last):
    ...
    ValueError: x is on the meta device (shape (2,)): it holds no values to compute with or check
    """
    if not isinstance(x, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.is_meta:
        # A meta tensor has a shape but no values: every value check would fail with a raw RuntimeError.
        raise ValueError(f"{name} is on the meta device (shape {tuple(x.shape)}): it holds no values to compute "
                         "with or check")
    if floating and not x.is_floating_point():
        raise ValueError(f"{name} must have a floating dtype (float16, bfloat16, float32 or float64), got {x.dtype}")


def check_floating_dtype(name: str, dtype) -> None:
    """Refuse anything but a floating ``torch.dtype`` (a string such as ``"float64"`` is not one)."""
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"{name} must be a floating torch.dtype (e.g. torch.float64), got {dtype!r}")


def check_same_device(**tensors: Tensor) -> torch.device:
    """The one device of ``tensors``; refuses a mix, naming each argument and its device.

    >>> check_same_device(a=torch.zeros(1), b=torch.zeros(1))
    device(type='cpu')
    """
    devices = {name: x.device for name, x in tensors.items()}
    first = next(iter(devices.values()))
    if any(d != first for d in devices.values()):
        names = " and ".join(devices)
        raise ValueError(f"{names} must be on one device, got "
                         + ", ".join(f"{n} on {d}" for n, d in devices.items()))
    return first


def check_broadcast(what: str = "", **shapes: Sequence[int]) -> torch.Size:
    """The broadcast of ``shapes``; refuses shapes that do not broadcast, naming each argument and its shape.

    >>> check_broadcast(a=(3, 1), b=(4,))
    torch.Size([3, 4])
    >>> check_broadcast(a=(3, 2), b=(4, 3))
    Traceback (most recent call last):
    ...
    ValueError: a and b must broadcast, got a (3, 2) and b (4, 3)
    """
    try:
        return torch.broadcast_shapes(*(tuple(s) for s in shapes.values()))
    except RuntimeError as err:
        got = " and ".join(f"{n} {tuple(s)}" for n, s in shapes.items())
        raise ValueError(f"{' and '.join(shapes)} must broadcast{what}, got {got}") from err


def raise_first_failed(checks: Sequence[tuple[Tensor, Callable[[], str]]]) -> None:
    """Evaluate every 0-dim bool tensor of ``checks`` with ONE device sync; raise the message of the first False.

    The messages are callables so that a value in a message (a smallest entry) is read only on failure.
    """
    if not checks:
        return
    flags = torch.stack([flag.reshape(()) for flag, _ in checks]).tolist()
    for ok, (_, message) in zip(flags, checks, strict=True):
        if not ok:
            raise ValueError(message())


def check_finite(x: Tensor, name: str, *, nonneg: bool = False) -> None:
    """Refuse NaN or inf in ``x`` (and, with ``nonneg``, a negative entry), naming ``name``."""
    check_tensor(name, x)
    if x.dtype == torch.bool or x.is_complex():
        raise ValueError(f"{name} must hold real numbers, got {x.dtype}")
    if x.numel() == 0:
        return
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
        check_tensor("epsilon", epsilon)
        if epsilon.numel() != 1:
            raise ValueError(f"epsilon must be a float or a 0-dim tensor, got shape {tuple(epsilon.shape)}")
        if epsilon.dtype == torch.bool or epsilon.is_complex():
            # True would be read as 1.0: a bool is not a radius.
            raise ValueError(f"epsilon must be a positive real number, got a {epsilon.dtype} tensor")
        given = epsilon.detach().reshape(())
        eps = given.to(dtype=dtype, device=device)
    elif isinstance(epsilon, (int, float)) and not isinstance(epsilon, bool):
        given = float(epsilon)
        eps = torch.tensor(given, dtype=dtype, device=device)
    else:
        raise ValueError(f"epsilon must be a positive float or 0-dim tensor, got {type(epsilon).__name__}")
    if not bool(torch.isfinite(eps)) or not bool(eps > 0):
        given = float(given)
        if math.isfinite(given) and given > 0:
            # Positive and finite as given, but it rounds to 0 or inf in the dtype of the computation.
            raise ValueError(f"epsilon = {given!r} is not representable as a positive finite {dtype} "
                             f"(it becomes {eps.item()!r}); rescale the problem or use a wider dtype")
        raise ValueError(f"epsilon must be positive and finite, got {given!r}")
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
