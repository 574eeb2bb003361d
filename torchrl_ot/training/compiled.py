"""The minibatch step's loss under ``torch.compile`` (the recipe's ``compile=true``).

On a CPU a minibatch step of the recipe's small MLPs is almost all per-op dispatch: module calls,
TensorDict lookups, distribution objects, about 70 small kernels forward and as many backward. Inductor
fuses the loss's forward and (through AOTAutograd) its backward into a few generated C++ kernels, the
same maths in another order of float operations: the numbers agree to rounding, not bit for bit
(``tests/test_compiled.py``). Compiling costs 10-30 s once per process (less with inductor's cache
warm), which a run of a few hundred thousand frames repays; see ``docs/results.md`` section 5.

Only the loss's forward is compiled: the optimiser step, the gradient clipping and the algorithms'
hooks (lambda*, the projection, TRPO's natural step) stay eager. In the compiled graph the losses'
value checks are skipped (a device sync would cut it in two, see
:func:`torchrl_ot.validation.raise_first_failed`); :func:`compiled_loss` checks the outputs instead and
reruns a step whose outputs are not finite eagerly, where the checks raise naming the entry, so no NaN
reaches the parameters either way.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from tensordict import TensorDictBase
from torchrl.objectives import LossModule

#: The output an OT loss adds under compilation: whether its losses, lam* and the advantages were finite.
FINITE_KEY = "ot_finite"

#: The algorithms whose loss may be compiled (BGPG's and WNPG's steps run their dual ascent and natural-gradient
#: solve inside the loss, with in-place state updates between steps that a compiled graph would replay wrongly).
COMPILABLE_ALGOS = ("ot_trpo", "wpo", "ppo", "a2c", "trpo")


def compiled_loss(loss_module: LossModule) -> Callable[[TensorDictBase], TensorDictBase]:
    """``loss_module``'s forward compiled by ``torch.compile`` (inductor, static shapes), with its value checks
    moved out of the graph: a step whose outputs hold a NaN or an inf (or whose OT loss reports non-finite
    inputs) is run again eagerly, which raises the loss's own error naming the entry; if the eager step is
    finite after all, a ``FloatingPointError`` says so. The returned outputs are the loss's own keys.

    >>> import torch
    >>> from torch import nn
    >>> from tensordict import TensorDict
    >>> from tensordict.nn import TensorDictModule
    >>> from torchrl.modules import NormalParamExtractor, ProbabilisticActor, TanhNormal, ValueOperator
    >>> from torchrl_ot import EuclideanCost, OTTrustRegionLoss
    >>> _ = torch.manual_seed(0)
    >>> net = TensorDictModule(nn.Sequential(nn.Linear(3, 2), NormalParamExtractor()), ["observation"],
    ...                        ["loc", "scale"])
    >>> actor = ProbabilisticActor(net, in_keys=["loc", "scale"], distribution_class=TanhNormal)
    >>> loss = OTTrustRegionLoss(actor, ValueOperator(nn.Linear(3, 1), in_keys=["observation"]),
    ...                          cost=EuclideanCost(), epsilon=0.01)
    >>> data = TensorDict({"observation": torch.randn(16, 3), "action": torch.rand(16, 1) * 1.8 - 0.9,
    ...                    "advantage": torch.randn(16, 1), "value_target": torch.randn(16, 1)}, [16])
    >>> _ = loss.solve_multiplier(data)
    >>> step = compiled_loss(loss)
    >>> fast, eager = step(data), loss(data)
    >>> all(torch.allclose(fast[k], eager[k], atol=1e-6) for k in ("loss_objective", "loss_critic"))
    True
    >>> data["advantage"][0] = float("nan")  # the compiled graph skips the checks: the eager rerun names it
    >>> step(data)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: ...advantage...
    """
    if not isinstance(loss_module, LossModule):
        raise TypeError(f"loss_module must be a torchrl LossModule, got {type(loss_module).__name__}")
    compiled = torch.compile(loss_module, dynamic=False)

    def step(tensordict: TensorDictBase) -> TensorDictBase:
        out = compiled(tensordict)
        finite = out.get(FINITE_KEY, None)
        if finite is not None:
            out = out.exclude(FINITE_KEY)
        losses = [v.detach().reshape(-1) for k, v in out.items() if k.startswith("loss_")]
        ok = bool(torch.isfinite(torch.cat(losses)).all()) if losses else True
        if not (ok and (finite is None or bool(finite))):
            loss_module(tensordict)  # eager: the loss's checks raise naming the entry
            raise FloatingPointError(f"the compiled {type(loss_module).__name__} step gave a non-finite output "
                                     "where the eager one did not: run with compile=false")
        return out

    return step
