"""The minibatch step's forward: the scalar a training loop minimises on the next minibatch, and its
diagnostics as one vector.

A 64x64 MLP's minibatch step on a CPU takes about a millisecond, so the loop's own Python counts: summing
the ``loss_*`` terms, checking the sum, and adding up half a dozen diagnostics key by key cost about a
dozen small tensor operations per step. :class:`MinibatchStep` does that work once, inside the compiled
graph when the loss is compiled: the loop reads one scalar to minimise and one stacked vector to
accumulate (one addition per step). The maths is the loop's own: the same objective, the same
diagnostics, added in the same order.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from tensordict import TensorDictBase
from torchrl.objectives import LossModule

from torchrl_ot.training.algorithms import Minibatches
from torchrl_ot.training.compiled import CompiledLoss

__all__ = ["MinibatchStep"]

_OBJECTIVE, _MEANS = "step_objective", "step_means"  # reduce's entries in the compiled outputs


class MinibatchStep:
    """``objective(loss_module(minibatch))`` on the next minibatch of a :class:`Minibatches`, and the output's
    ``means`` entries (those the loss gives, in ``means``' order: :attr:`keys`) stacked into one vector.

    Args:
        loss_module: the loss (a TorchRL ``LossModule``).
        objective: what the step minimises, from the loss's output (an algorithm's ``minibatch_loss``); a pure
            function of the output when ``compile`` (it runs inside the graph).
        means: the output's scalar entries a loop averages over an update (absent ones are skipped).
        compile: run the loss, the objective and the stacking under ``torch.compile``
            (:class:`~torchrl_ot.training.CompiledLoss`: the same maths to rounding, its own finiteness checks).

    A non-finite objective raises ``FloatingPointError`` (eager: before any gradient is taken; compiled: the
    eager rerun names the entry), so no NaN reaches the parameters.

    >>> import torch
    >>> from torch import nn
    >>> from tensordict import TensorDict
    >>> from tensordict.nn import TensorDictModule
    >>> from torchrl.modules import NormalParamExtractor, ProbabilisticActor, TanhNormal, ValueOperator
    >>> from torchrl_ot import EuclideanCost, OTTrustRegionLoss
    >>> from torchrl_ot.training import Minibatches
    >>> _ = torch.manual_seed(0)
    >>> net = TensorDictModule(nn.Sequential(nn.Linear(3, 2), NormalParamExtractor()), ["observation"],
    ...                        ["loc", "scale"])
    >>> actor = ProbabilisticActor(net, in_keys=["loc", "scale"], distribution_class=TanhNormal)
    >>> loss = OTTrustRegionLoss(actor, ValueOperator(nn.Linear(3, 1), in_keys=["observation"]),
    ...                          cost=EuclideanCost(), epsilon=0.01)
    >>> data = TensorDict({"observation": torch.randn(16, 3), "action": torch.rand(16, 1) * 1.8 - 0.9,
    ...                    "advantage": torch.randn(16, 1), "value_target": torch.randn(16, 1)}, [16])
    >>> _ = loss.solve_multiplier(data)
    >>> total = lambda out: out["loss_objective"] + out["loss_critic"]
    >>> step = MinibatchStep(loss, objective=total, means=("loss_critic", "clip_fraction", "ot_active_fraction"))
    >>> value, means = step(Minibatches(data, 8))
    >>> step.keys, means.shape  # PPO's clip_fraction is not an OT loss output
    (('loss_critic', 'ot_active_fraction'), torch.Size([2]))
    """

    def __init__(self, loss_module: LossModule, *, objective: Callable[[TensorDictBase], torch.Tensor],
                 means: Sequence[str], compile: bool = False) -> None:
        if not isinstance(loss_module, LossModule):
            raise TypeError(f"loss_module must be a torchrl LossModule, got {type(loss_module).__name__}")
        if not callable(objective):
            raise TypeError(f"objective must be a callable of the loss's output, got {type(objective).__name__}")
        if isinstance(means, str) or not all(isinstance(k, str) for k in means):
            raise TypeError(f"means must be a sequence of output keys (str), got {means!r}")
        self.loss_module, self.objective, self.means = loss_module, objective, tuple(means)
        self.keys: tuple[str, ...] | None = None  # the means the loss gives, known after the first step
        self._compiled = CompiledLoss(loss_module, reduce=self._reduce) if compile else None

    def _stack(self, out: TensorDictBase) -> torch.Tensor:
        present = [k for k in self.means if k in out.keys()]
        values = [out.get(k).detach().reshape(()) for k in present]
        return torch.stack(values) if values else torch.zeros(0)

    def _reduce(self, out: TensorDictBase) -> dict[str, torch.Tensor]:  # inside the compiled graph
        return {_OBJECTIVE: self.objective(out), _MEANS: self._stack(out)}

    def __call__(self, minibatches: Minibatches) -> tuple[torch.Tensor, torch.Tensor]:
        """(the objective to minimise, the stacked :attr:`keys` entries) on ``minibatches``' next minibatch."""
        if self._compiled is not None:
            outputs = self._compiled.outputs(minibatches)
            if self.keys is None:
                self.keys = tuple(k for k in self.means if k in outputs)
            return outputs[_OBJECTIVE], outputs[_MEANS]
        out = self.loss_module(minibatches.sample())
        value = self.objective(out)
        if not torch.isfinite(value):
            raise FloatingPointError(f"non-finite minibatch loss {value.item()} from {type(self.loss_module).__name__}")
        if self.keys is None:
            self.keys = tuple(k for k in self.means if k in out.keys())
        return value, self._stack(out)
