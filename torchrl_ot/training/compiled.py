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
from tensordict import TensorDict, TensorDictBase
from tensordict.utils import NestedKey
from torchrl.objectives import LossModule

from torchrl_ot.training.algorithms import Minibatches

#: The output an OT loss adds under compilation: whether its losses, lam* and the advantages were finite.
FINITE_KEY = "ot_finite"

#: The algorithms whose loss may be compiled (BGPG's and WNPG's steps run their dual ascent and natural-gradient
#: solve inside the loss, with in-place state updates between steps that a compiled graph would replay wrongly).
COMPILABLE_ALGOS = ("ot_trpo", "wpo", "ppo", "a2c", "trpo")


class CompiledLoss:
    """``loss_module``'s forward compiled by ``torch.compile`` (inductor, static shapes), called on a minibatch
    (a TensorDict) or on a :class:`~torchrl_ot.training.Minibatches` (its next minibatch, drawn as
    :meth:`Minibatches.sample` draws it, gathered inside the compiled graph).

    The graph takes plain tensors (the entries' leaves and the minibatch's indices) and rebuilds the
    TensorDict inside: its guards are a few tensor checks, where a TensorDict argument costs a walk of its
    keys and a TensorDict output its reconstruction on every call; the gather, the loss and (through
    AOTAutograd) their backward become one set of generated kernels. Outputs: the loss's own keys.

    The losses' value checks are moved out of the graph: a step whose outputs hold a NaN or an inf (or whose
    OT loss reports non-finite inputs) is run again eagerly, which raises the loss's own error naming the
    entry; if the eager step is finite after all, a ``FloatingPointError`` says so.

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
    >>> from torchrl_ot.training import Minibatches
    >>> out = step(Minibatches(data, 8))  # the next 8 frames of a permutation, gathered in the graph
    >>> out["loss_objective"].shape
    torch.Size([])
    """

    def __init__(self, loss_module: LossModule, *,
                 reduce: Callable[[TensorDictBase], dict[str, torch.Tensor]] | None = None) -> None:
        if not isinstance(loss_module, LossModule):
            raise TypeError(f"loss_module must be a torchrl LossModule, got {type(loss_module).__name__}")
        if reduce is not None and not callable(reduce):
            raise TypeError(f"reduce must be None or a callable of the loss's output, got {type(reduce).__name__}")
        self.loss_module, self.reduce = loss_module, reduce
        self._graph = torch.compile(self._forward, dynamic=False)
        self._source: TensorDictBase | None = None  # the Minibatches data whose leaves are cached
        self._keys: tuple[NestedKey, ...] = ()
        self._leaves: tuple[torch.Tensor, ...] = ()

    def _forward(self, keys: tuple[NestedKey, ...], index: torch.Tensor | None,
                 *leaves: torch.Tensor) -> dict[str, torch.Tensor]:
        size = leaves[0].shape[0] if index is None else index.shape[0]
        td = TensorDict({}, batch_size=[size])
        for key, leaf in zip(keys, leaves, strict=True):
            td.set(key, leaf if index is None else leaf[index])
        out = self.loss_module(td)
        outputs = dict(out.items())
        # The finiteness of every loss term, folded with the OT loss's own flag, in the graph: one flag to read.
        losses = [v.detach().reshape(-1) for k, v in outputs.items() if k.startswith("loss_")]
        finite = torch.isfinite(torch.cat(losses)).all() if losses else torch.ones((), dtype=torch.bool)
        if FINITE_KEY in outputs:
            finite = finite & outputs[FINITE_KEY]
        outputs[FINITE_KEY] = finite
        if self.reduce is not None:
            outputs.update(self.reduce(out))
        return outputs

    def outputs(self, data: TensorDictBase | Minibatches) -> dict[str, torch.Tensor]:
        """:meth:`__call__`'s outputs as a plain dict (what a training loop reads without building a
        TensorDict), with ``reduce``'s entries when given."""
        if isinstance(data, Minibatches):
            if self._source is not data.data:  # a new batch, or its advantages recomputed (refresh)
                self._source = data.data
                self._keys = tuple(data.data.keys(include_nested=True, leaves_only=True))
                self._leaves = tuple(data.data.get(key) for key in self._keys)
            index = data.next_index()  # drawn on the CPU (TorchRL's sampler's draws), used where the batch lives
            outputs = self._graph(self._keys, index.to(self._leaves[0].device), *self._leaves)
            minibatch = lambda: data.data[index]  # noqa: E731 (the eager rerun's input, built only then)
        else:
            keys = tuple(data.keys(include_nested=True, leaves_only=True))
            outputs = self._graph(keys, None, *(data.get(key) for key in keys))
            minibatch = lambda: data  # noqa: E731
        if not bool(outputs.pop(FINITE_KEY)):
            self.loss_module(minibatch())  # eager: the loss's checks raise naming the entry
            raise FloatingPointError(f"the compiled {type(self.loss_module).__name__} step gave a non-finite output "
                                     "where the eager one did not: run with compile=false")
        return outputs

    def __call__(self, data: TensorDictBase | Minibatches) -> TensorDictBase:
        return TensorDict(self.outputs(data), batch_size=[])


def compiled_loss(loss_module: LossModule) -> CompiledLoss:
    """``loss_module``'s forward under ``torch.compile``: :class:`CompiledLoss` (see there)."""
    return CompiledLoss(loss_module)
