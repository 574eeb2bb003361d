"""``RunningObsNorm``: TorchRL's ``VecNormV2`` maths for one observation entry, on plain tensors."""

from __future__ import annotations

import math

from tensordict import TensorDict, TensorDictBase
from tensordict.utils import NestedKey
from torch import Tensor
from torchrl.envs import Transform

__all__ = ["RunningObsNorm", "running_normalise"]


def running_normalise(obs: Tensor, loc: Tensor, var: Tensor, count: Tensor, *, decay: float, eps: float,
                      update: bool = True, batch_dims: int | None = None) -> Tensor:
    """:class:`RunningObsNorm`'s arithmetic on tensors: with ``update``, first fold the batch into the running
    moments ``loc`` / ``var`` and ``count`` (in place), then return ``obs`` normalised. The leading ``batch_dims``
    dimensions of ``obs`` (default: all but the last) are the batch, averaged into one update of weight ``1 -
    decay**n`` for ``n`` samples (``n / count`` when ``decay == 1``).

    >>> import torch
    >>> loc, var, count = torch.zeros(2), torch.zeros(2), torch.zeros((), dtype=torch.int64)
    >>> running_normalise(torch.tensor([[1.0, 2.0], [3.0, 2.0]]), loc, var, count, decay=0.99, eps=1e-2).round(
    ...     decimals=4)
    tensor([[-0.4508,  0.0000],
            [ 0.4508,  0.0000]])
    """
    if update:
        dims = tuple(range(obs.ndim - 1 if batch_dims is None else batch_dims))
        n = obs.shape[:len(dims)].numel()
        count += n
        second, first = obs.pow(2).mean(dim=dims), obs.mean(dim=dims)
        weight = 1 - decay**n if decay != 1.0 else n / count
        loc.lerp_(end=first, weight=weight)
        var.lerp_(end=second, weight=weight)
    correction = (1 - (count * math.log(decay)).exp()).to(obs.dtype) if decay < 1.0 else 1
    centred = var - loc.pow(2)
    mean, centred = loc / correction, centred / correction
    return (obs - mean) / centred.sqrt().clamp_min(eps)


class RunningObsNorm(Transform):
    """Running observation normalisation: what ``VecNormV2(in_keys=[key], decay=decay, eps=eps,
    shared_data=stats, reduce_batch_dims=True)`` computes, bit for bit, on the one tensor it normalises.

    ``VecNormV2`` keeps its statistics as TensorDicts and runs every step's arithmetic as TensorDict
    operations (about a dozen per env step, each with its own dispatch): a third of a small env's collection
    time. This transform holds the same statistics (``stats``: ``loc``, ``var`` and ``count`` under ``key``, the
    layout :func:`~torchrl_ot.training.new_obs_stats` makes; updated in place, so a checkpoint or another env
    sharing them sees every update) and applies the same operations to the tensors themselves.

    At each step (and at each reset, as ``VecNormV2`` does), unless ``frozen``: with ``n`` the number of env
    copies in the batch, ``count += n``, ``loc`` and ``var`` (the running first and second moments) move towards
    the batch's means with weight ``1 - decay**n``. Then the observation becomes ``(x - loc / b) / max(sqrt((var
    - loc**2) / b), eps)`` with the bias correction ``b = 1 - decay**count``. That divisor is VecNormV2's: the
    bias-corrected variance would be ``var / b - (loc / b)**2``; the two agree once ``b`` is near 1 (after about
    ``1 / (1 - decay)`` samples), and before that observations come out smaller than unit scale (below: 0.45).

    >>> import torch
    >>> from tensordict import TensorDict
    >>> stats = TensorDict({"loc": {"observation": torch.zeros(2)}, "var": {"observation": torch.zeros(2)},
    ...                     "count": {"observation": torch.zeros((), dtype=torch.int64)}}, batch_size=[])
    >>> norm = RunningObsNorm(stats, decay=0.99, eps=1e-2)
    >>> out = norm._step(None, TensorDict({"observation": torch.tensor([[1.0, 2.0], [3.0, 2.0]])}, [2]))
    >>> out["observation"].round(decimals=4), int(stats["count", "observation"])
    (tensor([[-0.4508,  0.0000],
            [ 0.4508,  0.0000]]), 2)
    """

    def __init__(self, stats: TensorDict, *, decay: float, eps: float, key: NestedKey = "observation",
                 frozen: bool = False) -> None:
        if not 0 < decay <= 1:
            raise ValueError(f"decay must lie in (0, 1], got {decay!r}")
        if not eps > 0:
            raise ValueError(f"eps must be positive, got {eps!r}")
        entry = (lambda name: (name, *key)) if isinstance(key, tuple) else (lambda name: (name, key))
        missing = [name for name in ("loc", "var", "count") if stats.get(entry(name), None) is None]
        if missing:
            raise ValueError(f"stats must hold loc, var and count under {key!r} (new_obs_stats' layout); "
                             f"missing {missing}")
        super().__init__(in_keys=[key], out_keys=[key])
        self.key, self.decay, self.eps, self.frozen = key, float(decay), float(eps), frozen
        self.stats = stats
        self.loc, self.var, self.count = (stats[entry(name)] for name in ("loc", "var", "count"))

    def stats_snapshot(self) -> TensorDict:
        """A copy of the statistics (what a Ray worker hands the learner: ``training.collection``)."""
        return self.stats.clone()

    def load_stats_(self, stats: TensorDictBase) -> None:
        """Overwrite the statistics in place with ``stats`` (same layout)."""
        self.stats.update_(stats)

    def freeze(self) -> RunningObsNorm:
        """Normalise without updating the statistics (evaluation)."""
        self.frozen = True
        return self

    def _normalise(self, td: TensorDictBase) -> TensorDictBase:
        obs = td.get(self.key, None)
        if obs is None:  # e.g. a reset that returns no observation for this key
            return td
        # The copies of a batched env are averaged into one update (VecNormV2's reduce_batch_dims): the batch
        # dims are the TensorDict's.
        td.set(self.key, running_normalise(obs, self.loc, self.var, self.count, decay=self.decay, eps=self.eps,
                                           update=not self.frozen, batch_dims=td.ndim))
        return td

    def _step(self, tensordict: TensorDictBase, next_tensordict: TensorDictBase) -> TensorDictBase:
        return self._normalise(next_tensordict)

    def _reset(self, tensordict: TensorDictBase, tensordict_reset: TensorDictBase) -> TensorDictBase:
        return self._normalise(tensordict_reset)

    def _call(self, next_tensordict: TensorDictBase) -> TensorDictBase:
        return self._normalise(next_tensordict)

    def forward(self, tensordict: TensorDictBase) -> TensorDictBase:
        return self._normalise(tensordict)

    def extra_repr(self) -> str:
        return f"key={self.key!r}, decay={self.decay}, eps={self.eps}, frozen={self.frozen}"
