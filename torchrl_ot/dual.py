"""``DualSolver``: the exact dual (eq. 12 / discrete-D) as a TensorDict module."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from tensordict import TensorDictBase
from tensordict.nn import TensorDictModuleBase
from tensordict.utils import NestedKey

from torchrl_ot.functional import DualSolution, solve_dual
from torchrl_ot.keys import SolutionKeys, write_solution
from torchrl_ot.validation import (
    Radius,
    check_nested_key,
    check_same_device,
    check_shape,
    entry_name,
    finite_checks,
    get_entry,
    get_sample_weight,
    raise_first_failed,
)

__all__ = ["DualSolver", "KeyedModule"]


class KeyedModule(TensorDictModuleBase):
    """TensorDict module whose keys live in an ``_AcceptedKeys`` dataclass, as in TorchRL losses.

    Subclasses define ``_AcceptedKeys`` and the ``_in_fields`` / ``_out_fields`` naming which of
    its fields are read and written; :meth:`set_keys` renames them.
    """

    _AcceptedKeys: type
    _in_fields: tuple[str, ...] = ()
    _out_fields: tuple[str, ...] = ()
    epsilon = Radius()  # the trust-region radius, checked on every assignment

    def __init__(self) -> None:
        super().__init__()
        self.tensor_keys = self._AcceptedKeys()
        self._sync_keys()

    def _sync_keys(self) -> None:
        self.in_keys = [getattr(self.tensor_keys, f) for f in self._in_fields]
        self.out_keys = [getattr(self.tensor_keys, f) for f in self._out_fields]

    def set_keys(self, **kwargs: NestedKey) -> KeyedModule:
        """Rename keys, e.g. ``solver.set_keys(advantage="adv")``.

        Refused: an unknown name, a value that is no TensorDict key, and two names on one key (an output would
        overwrite an input, or one entry would be read as two different inputs).
        """
        valid = {f.name for f in dataclasses.fields(self._AcceptedKeys)}
        for name in kwargs:
            if name not in valid:
                raise ValueError(f"{name!r} is not a key of {type(self).__name__}; valid keys: {sorted(valid)}")
        kwargs = {name: check_nested_key(name, key) for name, key in kwargs.items()}
        keys = dataclasses.replace(self.tensor_keys, **kwargs)
        owners: dict = {}
        for field in dataclasses.fields(keys):
            key = check_nested_key(field.name, getattr(keys, field.name))
            if key in owners:
                raise ValueError(f"{owners[key]} and {field.name} of {type(self).__name__} must be different keys, "
                                 f"both are {key!r}")
            owners[key] = field.name
        self.tensor_keys = keys
        self._sync_keys()
        return self


class DualSolver(KeyedModule):
    """Solve the OT trust-region dual exactly for the samples in a TensorDict.

    Reads ``advantage`` ``[*B, K]``, ``cost`` ``[*B, K]`` and optionally ``weight`` ``[*B]``
    (uniform ``1 / numel(B)`` if absent: the paper weights every visited state equally), ``B`` the
    TensorDict's batch size, and writes lam* (``ot_multiplier``), G(lam*) (``ot_dual_value``), t*
    (``ot_split``), the expected transport of the update (``ot_transport``), both expanded over the
    batch, and the per-sample closest / farthest maximisers (``ot_low_index``, ``ot_high_index``). The
    batch may have any number of dimensions; they are flattened into one set of samples. Inputs of
    other shapes, dtypes or values are refused (:meth:`solve`).

    Args:
        epsilon: trust-region radius (> 0).

    >>> import torch
    >>> from tensordict import TensorDict
    >>> td = TensorDict({"ot_advantage": torch.tensor([[0.0, 1.0], [0.0, 2.0]]),
    ...                  "ot_cost": torch.tensor([[0.0, 1.0], [0.0, 1.0]])}, batch_size=[2])
    >>> out = DualSolver(epsilon=0.25)(td)
    >>> out["ot_multiplier"], out["ot_high_index"]
    (tensor([2., 2.]), tensor([0, 1]))
    """

    @dataclass
    class _AcceptedKeys(SolutionKeys):
        """Configurable keys (change with :meth:`set_keys`).

        Attributes:
            advantage: input ``[*B, K]`` candidate advantages. Defaults to ``"ot_advantage"``.
            cost: input ``[*B, K]`` transport costs. Defaults to ``"ot_cost"``.
            weight: optional input ``[*B]`` sample masses. Defaults to ``"ot_weight"``.
            multiplier, dual_value, split, transport (:class:`~torchrl_ot.keys.SolutionKeys`), low_index,
            high_index: outputs.
        """

        advantage: NestedKey = "ot_advantage"
        cost: NestedKey = "ot_cost"
        weight: NestedKey = "ot_weight"
        low_index: NestedKey = "ot_low_index"
        high_index: NestedKey = "ot_high_index"

    _in_fields = ("advantage", "cost")
    _out_fields = ("multiplier", "dual_value", "split", "transport", "low_index", "high_index")

    def __init__(self, *, epsilon: float) -> None:
        super().__init__()
        self.epsilon = epsilon

    def solve(self, td: TensorDictBase) -> DualSolution:
        """Solve without writing anything: the :class:`DualSolution` for ``td``'s samples.

        Refused, naming the entry: a missing ``advantage`` or ``cost``; an ``advantage`` not shaped
        ``[*batch_size, K]`` (e.g. ``[*batch_size]``, which would be read as one sample with many candidates), a
        ``cost`` of another shape, a ``weight`` not shaped ``[*batch_size]``; non-floating dtypes, entries on
        several devices, an empty batch; NaN or inf anywhere, a negative cost or weight.
        """
        adv, cost, weight = self._inputs(td)
        k = adv.shape[-1]
        adv, cost = adv.reshape(-1, k), cost.reshape(-1, k)
        if weight is None:
            weight = torch.full(adv.shape[:1], 1.0 / adv.shape[0], dtype=adv.dtype, device=adv.device)
        else:
            weight = weight.reshape(-1)
        return solve_dual(adv, cost, weight, self.epsilon)

    def _inputs(self, td: TensorDictBase):
        keys, owner = self.tensor_keys, type(self).__name__
        adv = get_entry(td, keys.advantage, owner, floating=True)
        cost = get_entry(td, keys.cost, owner, floating=True)
        batch = tuple(td.batch_size)
        dims = ", ".join([*map(str, batch), "K"])
        check_shape(entry_name(keys.advantage, owner), adv, (*batch, None), what=f"[*batch_size, K] = [{dims}]")
        if adv.shape[-1] == 0:
            raise ValueError(f"{entry_name(keys.advantage, owner)} has no candidates: K must be at least 1")
        if td.batch_size.numel() == 0:
            raise ValueError(f"{owner} got an empty batch (batch_size {batch})")
        check_shape(entry_name(keys.cost, owner), cost, tuple(adv.shape),
                    what=f"{list(adv.shape)}, that of {keys.advantage!r}")
        tensors = {repr(keys.advantage): adv, repr(keys.cost): cost}
        checks = finite_checks(adv, entry_name(keys.advantage, owner))
        checks += finite_checks(cost, entry_name(keys.cost, owner), nonneg=True)
        weight = get_sample_weight(td, keys.weight, owner, batch, tensors, checks)
        check_same_device(**tensors)
        # Once per batch, like the solve itself (which syncs anyway): one sync for every value check.
        raise_first_failed(checks)
        return adv, cost, weight

    def forward(self, td: TensorDictBase) -> TensorDictBase:
        solution = self.solve(td)
        batch = td.batch_size
        write_solution(td, self.tensor_keys, solution, batch)
        td.set(self.tensor_keys.low_index, solution.low_index.reshape(batch))
        td.set(self.tensor_keys.high_index, solution.high_index.reshape(batch))
        return td
