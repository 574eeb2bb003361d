"""The collector of a training run: TorchRL's own, in this process, in local worker processes, or on Ray
actors (``collector.backend=ray``: :class:`torchrl.collectors.distributed.RayCollector`, built through
``Collector(backend="ray")``), and the running statistics that Ray's workers keep apart.

The statistics problem. The observation normalisation and the reward scaling live in the env (transforms
updating ``obs_stats`` / ``return_stats`` in place). In worker processes of this machine (``num_collectors >
1``) every worker updates the very same shared-memory tensors. Ray actors get a pickled *copy* of the env
constructor instead, so each worker's statistics would drift apart and the learner (which evaluates and
checkpoints with its own copy) would never see them. :class:`RayStatistics` closes that gap: between two
batches (the synchronous RayCollector asks every worker for its next batch only on the next iteration, so
they are idle then) it reads each worker's statistics, merges them into the learner's and writes the result
back to every worker. The merge of the return statistics (Chan et al.'s moments) is exact: it equals one
update over all the workers' returns. The observation statistics are exponential moving averages; their
merge adds up the workers' moves, which is to first order what the shared tensors of local processes get.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from omegaconf import DictConfig
from tensordict import TensorDict, TensorDictBase
from tensordict.nn import TensorDictModuleBase
from torchrl.collectors import Collector
from torchrl.envs import EnvBase
from torchrl.modules import ProbabilisticActor

from torchrl_ot.training.collection_policy import CollectionPolicy
from torchrl_ot.training.obs_norm import RunningObsNorm
from torchrl_ot.training.reward_scaling import ReturnScaling

__all__ = ["COLLECTOR_BACKENDS", "RayStatistics", "check_collector_config", "make_collector", "merge_ema_stats",
           "merge_moment_stats", "ray_available"]

#: ``collector.backend``. local: this process (``num_collectors=1``) or that many worker processes of this
#: machine; ray: ``num_collectors`` Ray actors on the cluster of ``collector.ray.address``.
COLLECTOR_BACKENDS = ("local", "ray")


def ray_available() -> bool:
    """Whether Ray is installed (the ``ray`` extra: ``pip install 'torchrl-ot[ray]'``)."""
    try:
        import ray  # noqa: F401
    except ImportError:
        return False
    return True


def check_collector_config(cfg: DictConfig) -> None:
    """Refuse an unknown ``collector.backend``, a Ray backend without Ray, or a bad Ray option."""
    collector = cfg.get("collector") or {}
    backend = collector.get("backend", "local")
    if backend not in COLLECTOR_BACKENDS:
        raise ValueError(f"collector.backend must be one of {COLLECTOR_BACKENDS}, got {backend!r}")
    if backend != "ray":
        return
    num_cpus = collector.get("ray", {}).get("num_cpus", 1)
    if isinstance(num_cpus, bool) or not isinstance(num_cpus, (int, float)) or not num_cpus > 0:
        raise ValueError(f"collector.ray.num_cpus (CPUs reserved per collection worker) must be a positive number, "
                         f"got {num_cpus!r}")
    address = collector.get("ray", {}).get("address")
    if address is not None and not isinstance(address, str):
        raise ValueError(f"collector.ray.address must be null (a local Ray, or $RAY_ADDRESS) or a string such as "
                         f"'auto' or 'host:6379', got {address!r}")
    if not ray_available():
        raise ValueError("collector.backend=ray needs Ray, which is not installed: pip install 'torchrl-ot[ray]' "
                         "(or collector.backend=local)")


def make_collector(env_fns: Sequence[Callable[..., EnvBase]], actor: TensorDictModuleBase, cfg: DictConfig, *,
                   frames_per_batch: int, total_frames: int, device: torch.device | None = None,
                   env_kwargs: Mapping[str, Any] | None = None) -> Collector:
    """TorchRL's collector over ``env_fns`` (one per collector: ``cfg.num_collectors`` of them) with ``actor``.

    ``collector.backend=local``: one env in this process, or ``num_collectors`` synchronous worker processes
    (the statistics in shared memory, updated by all of them). ``ray``: ``num_collectors`` synchronous Ray actors,
    each reserving ``collector.ray.num_cpus`` CPUs and no GPU, on the cluster at ``collector.ray.address`` (null:
    the one in ``$RAY_ADDRESS``, else a Ray started on this machine). Its batches are
    ``[num_collectors, num_envs, T]``; pair it with :class:`RayStatistics`. ``device`` (the learner's, when not
    the CPU): the policy runs there, the envs on the CPU, the batch is stored there. ``env_kwargs``: keyword
    arguments every ``env_fn`` is called with, the running statistics (``obs_stats``, ``return_stats``) the envs
    update in place (put them in shared memory for worker processes: ``share_memory_()``). Local worker processes
    get them as the collector's ``create_env_kwargs``, which reach the workers by reference: an ``EnvCreator`` (or
    the collector's cloudpickle of the function) would hand each worker a copy whose updates the learner never
    sees, and its probe env would step the learner's statistics with random actions. In this process
    (``num_collectors=1``, local) the actor samples through :class:`~torchrl_ot.training.CollectionPolicy` (the
    same draws) and the batches carry no ``("collector", "traj_ids")``.
    """
    backend = (cfg.get("collector") or {}).get("backend", "local")
    env_kwargs = dict(env_kwargs or {})
    local_workers = backend != "ray" and cfg.num_collectors > 1
    if not local_workers:  # one process or Ray's actors (which hold copies; RayStatistics merges them)
        env_fns = [functools.partial(fn, **env_kwargs) for fn in env_fns]
    devices = {} if device is None or device.type == "cpu" else {
        "policy_device": device, "env_device": torch.device("cpu"), "storing_device": device}
    common = {"frames_per_batch": frames_per_batch, "total_frames": total_frames, **devices}
    if backend == "ray":
        ray_cfg = cfg.collector.get("ray", {})
        address = ray_cfg.get("address") or os.environ.get("RAY_ADDRESS")
        init = {"address": address} if address else {"include_dashboard": False, "log_to_driver": False}
        remote = {"num_cpus": ray_cfg.get("num_cpus", 1), "num_gpus": 0}
        return Collector(list(env_fns), actor, backend="ray", sync=True,
                         backend_options={"ray_init_config": init, "remote_configs": remote}, **common)
    if local_workers:
        return Collector(list(env_fns), actor, num_collectors=cfg.num_collectors, sync=True,
                         create_env_kwargs=[env_kwargs] * len(env_fns), auto_register_policy_transforms=False,
                         **common)
    # In this process the collector runs the actor's sampling step without its TensorDict plumbing (the same
    # draws: CollectionPolicy) and keeps no trajectory ids, which nothing here reads (GAE reads the done flags).
    policy = CollectionPolicy(actor) if isinstance(actor, ProbabilisticActor) and len(actor.module) == 2 else actor
    return Collector(env_fns[0], policy, auto_register_policy_transforms=False, track_traj_ids=False, **common)


def merge_ema_stats(base: TensorDictBase, workers: Sequence[TensorDictBase]) -> TensorDict:
    """The observation statistics (:class:`RunningObsNorm`'s ``loc``, ``var``, ``count``) after every worker
    moved its copy of ``base``: ``base`` plus the sum of the workers' moves. With one worker that is its
    statistics exactly; with several, to first order in ``1 - decay`` what one shared copy updated by all
    of them gets.

    >>> base = TensorDict({"loc": torch.zeros(1), "count": torch.tensor(0)}, [])
    >>> moved = [TensorDict({"loc": torch.ones(1), "count": torch.tensor(4)}, []),
    ...          TensorDict({"loc": 2 * torch.ones(1), "count": torch.tensor(4)}, [])]
    >>> out = merge_ema_stats(base, moved)
    >>> out["loc"], out["count"]
    (tensor([3.]), tensor(8))
    """
    merged = base.clone()
    for worker in workers:
        merged.apply_(lambda total, new, old: total + (new - old), worker, base)
    return merged


def merge_moment_stats(base: TensorDictBase, workers: Sequence[TensorDictBase]) -> TensorDict:
    """The return statistics (``mean``, ``var``, ``count``: :func:`~torchrl_ot.training.new_return_stats`) after
    every worker folded its own returns into its copy of ``base``: exactly one update of ``base`` with all of
    the workers' returns (Chan et al.'s formula is a sum of counts, first and second moments, which the
    workers' deltas recover).

    >>> from torchrl_ot.training.reward_scaling import new_return_stats, update_running_moments
    >>> a, b, joint = new_return_stats(), new_return_stats(), new_return_stats()
    >>> update_running_moments(a, torch.tensor([1.0, 2.0], dtype=torch.float64))
    >>> update_running_moments(b, torch.tensor([5.0], dtype=torch.float64))
    >>> update_running_moments(joint, torch.tensor([1.0, 2.0, 5.0], dtype=torch.float64))
    >>> out = merge_moment_stats(new_return_stats(), [a, b])
    >>> torch.allclose(out["mean"], joint["mean"]) and torch.allclose(out["var"], joint["var"])
    True
    """
    def sums(stats: TensorDictBase) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        count = stats["count"]
        return count, stats["mean"] * count, (stats["var"] + stats["mean"].pow(2)) * count

    count, first, second = sums(base)
    c0, f0, s0 = count, first, second
    for worker in workers:
        c, f, s = sums(worker)
        count, first, second = count + (c - c0), first + (f - f0), second + (s - s0)
    mean = first / count
    return TensorDict({"mean": mean, "var": (second / count - mean.pow(2)).clamp_min(0.0), "count": count}, [])


class RayStatistics:
    """Keeps the learner's ``obs_stats`` / ``return_stats`` and the Ray workers' copies one and the same: call
    :meth:`sync` after each batch arrives (module docstring). ``probe`` is an env built as the workers' are
    (the positions of the two transforms in its ``Compose`` are where the workers' are).
    """

    def __init__(self, collector: Collector, probe: EnvBase, *, obs_stats: TensorDict | None,
                 return_stats: TensorDict | None) -> None:
        self.collector = collector
        self.entries: list[tuple[str, TensorDict, Callable]] = []
        for index, transform in enumerate(probe.transform):
            if isinstance(transform, RunningObsNorm) and obs_stats is not None:
                self.entries.append((f"env.transform[{index}]", obs_stats, merge_ema_stats))
            elif isinstance(transform, ReturnScaling) and return_stats is not None:
                self.entries.append((f"env.transform[{index}]", return_stats, merge_moment_stats))

    def sync(self) -> None:
        """Merge every worker's statistics into the learner's (in place) and hand the result back to them."""
        for path, stats, merge in self.entries:
            workers = self.collector.map_fn(f"{path}.stats_snapshot")
            stats.update_(merge(stats, workers))
            self.collector.map_fn(f"{path}.load_stats_", [(stats.clone(),)] * len(workers))
