"""The ``ot_*`` entries that the OT modules and losses write: their one definition.

Every OT module (:class:`~torchrl_ot.DualSolver`, :class:`~torchrl_ot.MassSplittingTarget`, the losses) keeps its
keys in an ``_AcceptedKeys`` dataclass, as TorchRL's losses do; those that describe the dual's solution derive
from the dataclasses here, so one renaming convention and one spelling hold everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tensordict import TensorDictBase
from tensordict.utils import NestedKey

from torchrl_ot.functional import DualSolution

__all__ = ["OTKeys", "SolutionKeys", "write_solution"]


@dataclass
class OTKeys:
    """What every OT update writes per sample (expanded over the batch).

    Attributes:
        multiplier: lam*, the minimiser of the dual (eq. 12). Defaults to ``"ot_multiplier"``.
        split: t*, the share of mass sent to the closest maximiser (eq. 6, 10). Defaults to ``"ot_split"``.
        transport: the expected transport of the update (epsilon when lam* > 0). Defaults to ``"ot_transport"``.
    """

    multiplier: NestedKey = "ot_multiplier"
    split: NestedKey = "ot_split"
    transport: NestedKey = "ot_transport"


@dataclass
class SolutionKeys(OTKeys):
    """:class:`OTKeys` and the dual's optimal value G(lam*) (``"ot_dual_value"``), as the solver modules write."""

    dual_value: NestedKey = "ot_dual_value"


def write_solution(td: TensorDictBase, keys: OTKeys, solution: DualSolution, batch_shape: torch.Size, *,
                   transport: torch.Tensor | None = None, dtype: torch.dtype | None = None) -> None:
    """Write ``solution``'s scalars into ``td`` under ``keys``, expanded over ``batch_shape`` as real storage (not
    stride-0 views, so that samplers and in-place transforms see plain data). ``transport`` overrides the
    mass-split transport (the WPO rule moves something else); ``dtype`` casts (default: the solution's)."""
    fields = {"multiplier": solution.multiplier, "split": solution.split,
              "transport": solution.transport if transport is None else transport}
    if isinstance(keys, SolutionKeys):
        fields["dual_value"] = solution.dual_value
    for field, value in fields.items():
        td.set(getattr(keys, field), value.to(dtype or value.dtype).expand(batch_shape).clone())
