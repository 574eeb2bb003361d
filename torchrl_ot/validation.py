"""Input checks shared by every public entry point: one place for what a refusal says.

A refusal is a ``ValueError`` that names the argument and what is allowed. Checks that need a device sync
(``bool(tensor)``) belong once per batch, never once per minibatch step.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence

import torch
from tensordict.utils import NestedKey, unravel_key
from torch import Tensor

__all__ = ["Radius", "check_bool", "check_broadcast", "check_choice", "check_draw_shape", "check_entries_present",
           "check_epsilon", "check_finite", "check_finite_entries", "check_floating_dtype", "check_nested_key",
           "check_per_sample", "check_positive_int", "check_real", "check_same_device", "check_shape", "check_tensor",
           "draw_shape", "entry_name", "finite_checks", "get_entry", "is_real", "raise_first_failed",
           "simplex_checks"]


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

    Under ``torch.compile`` (the recipe's ``compile=true``) nothing is evaluated: the sync would cut the graph
    in two. The caller checks the compiled step's outputs instead and reruns a non-finite one eagerly, where
    these checks raise by name (:func:`torchrl_ot.training.compiled_loss`).
    """
    if not checks or torch.compiler.is_compiling():
        return
    flags = [flag if flag.dim() == 0 else flag.reshape(()) for flag, _ in checks]
    if len(flags) == 1:
        flags = [bool(flags[0])]
    elif any(flag.device != flags[0].device for flag in flags):  # a TensorDict without a device may mix them
        flags = [bool(flag) for flag in flags]
    elif bool(torch.stack(flags).all()):  # the one sync; which check failed is read only on failure
        return
    for ok, (_, message) in zip(flags, checks, strict=True):
        if not ok:
            raise ValueError(message())


def finite_checks(x: Tensor, name: str, *, nonneg: bool = False) -> list[tuple[Tensor, Callable[[], str]]]:
    """The checks of :func:`check_finite` as ``(flag, message)`` pairs for :func:`raise_first_failed`, so that
    several tensors are checked with one device sync; type and dtype are refused at once (no sync needed)."""
    check_tensor(name, x)
    if x.dtype == torch.bool or x.is_complex():
        raise ValueError(f"{name} must hold real numbers, got {x.dtype}")
    if x.numel() == 0:
        return []
    lo, hi = torch.aminmax(x)
    # aminmax propagates NaN, so one pass covers NaN, inf and the sign.
    checks = [(torch.isfinite(lo) & torch.isfinite(hi), lambda: f"{name} must be finite; it contains NaN or inf")]
    if nonneg:
        checks.append((lo >= 0, lambda: f"{name} must be non-negative; its smallest entry is {lo.item():.6g}"))
    return checks


def check_finite(x: Tensor, name: str, *, nonneg: bool = False) -> None:
    """Refuse NaN or inf in ``x`` (and, with ``nonneg``, a negative entry), naming ``name``."""
    raise_first_failed(finite_checks(x, name, nonneg=nonneg))


def simplex_checks(x: Tensor, name: str) -> list[tuple[Tensor, Callable[[], str]]]:
    """``(flag, message)`` pairs refusing rows of ``x`` (probabilities over the last dimension) that are not
    finite, non-negative and summing to 1, for :func:`raise_first_failed`."""
    check_tensor(name, x, floating=True)
    checks = finite_checks(x, name, nonneg=True)
    if x.numel():
        # Rows of float16 / bfloat16 probabilities sum to 1 only to their resolution.
        tol = max(1e-5, x.shape[-1] * torch.finfo(x.dtype).eps)
        worst = (x.sum(-1, dtype=torch.float64) - 1).abs().max()
        checks.append((worst <= tol, lambda: f"{name} must hold probabilities whose rows sum to 1; a row is off by "
                                             f"{worst.item():.3g}"))
    return checks


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
    it would otherwise flow silently into lam* or the gradients. One device sync for all the entries."""
    checks = []
    for key in dict.fromkeys(keys):
        value = td.get(key, None)
        if isinstance(value, Tensor) and value.is_floating_point():
            checks.append((torch.isfinite(value).all(),
                           lambda key=key: f"{key!r} reaching {owner} contains NaN or inf; refusing a NaN update"))
    raise_first_failed(checks)


# ------------------------------------------------------------------------------------------------
# TensorDict entries: what a module's forward reads, refused by key (no device sync)


def check_nested_key(name: str, key) -> NestedKey:
    """Refuse anything but a TensorDict key (a non-empty string, or a non-empty tuple of them, nested or not);
    returns it unravelled (``("a",)`` is ``"a"``), so that two spellings of one key compare equal."""
    def ok(k) -> bool:
        if isinstance(k, str):
            return bool(k)
        return isinstance(k, tuple) and bool(k) and all(ok(part) for part in k)

    if not ok(key):
        raise ValueError(f"{name} must be a TensorDict key (a non-empty str or a tuple of them), got {key!r}")
    return unravel_key(key)


def entry_name(key: NestedKey, owner: str) -> str:
    """How a refusal names an input entry: the key and the module reading it."""
    return f"{key!r} (input of {owner})"


def check_entries_present(td, keys: Iterable[NestedKey], owner: str, why: str = "") -> dict:
    """Refuse a ``td`` lacking any of ``keys``, naming every missing key and the module: a raw ``KeyError`` (or a
    ``None`` read further down) names neither. Returns ``{key: entry}`` (each read once)."""
    found = {key: td.get(key, None) for key in keys}
    missing = [key for key, value in found.items() if value is None]
    if missing:
        have = sorted(map(repr, td.keys(True, True))) if hasattr(td, "keys") else []
        raise ValueError(f"{owner} needs the entr{'y' if len(missing) == 1 else 'ies'} "
                         f"{', '.join(map(repr, missing))} in its input{why}; missing (the input has "
                         f"{', '.join(have[:20]) + (', ...' if len(have) > 20 else '') or 'no entries'})")
    return found


def get_sample_weight(td, key: NestedKey, owner: str, batch: tuple[int, ...], tensors: dict, checks: list):
    """The optional per-sample weight ``td[key]`` (None if absent): floating, ``[*batch_size]``; it is added to
    ``tensors`` (for :func:`check_same_device`) and its finite, non-negative checks to ``checks`` (for
    :func:`raise_first_failed`)."""
    if td.get(key, None) is None:
        return None
    weight = get_entry(td, key, owner, floating=True)
    check_shape(entry_name(key, owner), weight, batch, what=f"[*batch_size] = {list(batch)}")
    tensors[repr(key)] = weight
    checks += finite_checks(weight, entry_name(key, owner), nonneg=True)
    return weight


def get_entry(td, key: NestedKey, owner: str, *, floating: bool = False) -> Tensor:
    """``td[key]``, refused by :func:`check_entries_present` when missing and by :func:`check_tensor` when not a
    tensor (with ``floating``: not of a floating dtype), naming the key and ``owner``."""
    value = check_entries_present(td, [key], owner)[key]
    check_tensor(entry_name(key, owner), value, floating=floating)
    return value


def check_shape(name: str, x: Tensor, *allowed: Sequence[int | None], what: str) -> None:
    """Refuse ``x`` unless its shape is one of ``allowed`` (``None``: any size there); ``what`` says the allowed
    shapes in the docstrings' notation, e.g. ``"[*batch_size, K] = [4, K]"``.

    >>> check_shape("x", torch.zeros(4), (4, None), what="[*batch_size, K] = [4, K]")
    Traceback (most recent call last):
    ...
    ValueError: x must have shape [*batch_size, K] = [4, K], got (4,)
    """
    shape = tuple(x.shape)
    for pattern in allowed:
        if len(pattern) == len(shape) and all(p is None or p == n for p, n in zip(pattern, shape, strict=True)):
            return
    raise ValueError(f"{name} must have shape {what}, got {shape}")


def draw_shape(dist) -> torch.Size:
    """The shape of one draw of ``dist``, read off without drawing (a draw would consume the RNG)."""
    from torchrl.modules import MaskedOneHotCategorical, OneHotCategorical  # torchrl only where a policy is

    shape = dist.batch_shape + dist.event_shape
    if isinstance(dist, (OneHotCategorical, MaskedOneHotCategorical)):
        # TorchRL's one-hot categoricals subclass Categorical: they draw [..., A] rows but report no event shape.
        shape = dist.logits.shape
    return shape


def check_draw_shape(name: str, x: Tensor, dist, what: str = "a draw of the policy") -> None:
    """Refuse an action ``x`` that is not shaped like a draw of ``dist`` (an index of a categorical may carry a
    trailing 1): ``log_prob`` and the costs would broadcast it against the batch without an error."""
    expected = tuple(draw_shape(dist))
    allowed = [expected]
    if isinstance(dist, torch.distributions.Categorical) and len(expected) == len(dist.batch_shape):
        allowed.append((*expected, 1))  # log_prob_per_sample squeezes it
    if tuple(x.shape) not in allowed:  # the message only on failure: this runs every minibatch step
        check_shape(name, x, *allowed, what=f"{' or '.join(str(list(a)) for a in allowed)} ({what})")


def check_per_sample(name: str, x: Tensor, batch: Sequence[int]) -> None:
    """Refuse ``x`` unless it holds one value per sample of a batch of shape ``batch``: ``[*batch]`` or
    ``[*batch, 1]`` (any trailing 1s), as TorchRL writes advantages and log-probabilities."""
    batch = tuple(batch)
    if tuple(x.shape[:len(batch)]) != batch or x.numel() != math.prod(batch):
        raise ValueError(f"{name} must hold one value per sample, shape {list(batch)} or {[*batch, 1]}, "
                         f"got {tuple(x.shape)}")


class Radius:
    """A trust-region radius attribute, checked on EVERY assignment (``module.epsilon = 0`` is refused as
    ``Module(epsilon=0)`` is). Stored as a float."""

    def __set_name__(self, owner, name: str) -> None:
        self._slot = f"_{name}_value"

    def __get__(self, obj, objtype=None):
        return self if obj is None else obj.__dict__[self._slot]

    def __set__(self, obj, value) -> None:
        obj.__dict__[self._slot] = float(check_epsilon(value))
