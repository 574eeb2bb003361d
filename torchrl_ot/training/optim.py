"""The optimiser of a training run and its learning-rate schedule."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from omegaconf import DictConfig

OPTIMIZERS = ("adam", "rmsprop")

#: ``grad_clip``: one norm over every parameter (SB3's, TorchRL's PPO scripts'), or one per network (the actor's,
#: and the rest: critic and advantage head), so that a critic whose loss spikes does not shrink the actor's step.
GRAD_CLIPS = ("global", "per_network")


def make_optimizer(params: Sequence[torch.nn.Parameter], cfg: DictConfig) -> torch.optim.Optimizer:
    """``cfg.optimizer`` over ``params`` at ``cfg.lr`` with eps ``cfg.adam_eps``: Adam (fused with
    ``cfg.adam_fused``), or RMSprop with alpha 0.99 (A2C's, as stable-baselines3 and Tianshou build it).

    >>> from omegaconf import OmegaConf
    >>> cfg = OmegaConf.create({"optimizer": "rmsprop", "lr": 7e-4, "adam_eps": 1e-5, "adam_fused": False})
    >>> type(make_optimizer([torch.nn.Parameter(torch.zeros(2))], cfg)).__name__
    'RMSprop'
    """
    name = cfg.get("optimizer", "adam")
    if name == "adam":
        # fused: one kernel over all parameter tensors, instead of a per-tensor Python loop on every minibatch step
        return torch.optim.Adam(params, lr=cfg.lr, eps=cfg.adam_eps, fused=cfg.adam_fused)
    if name == "rmsprop":
        return torch.optim.RMSprop(params, lr=cfg.lr, alpha=0.99, eps=cfg.adam_eps)
    raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {name!r}")


def clip_gradients(groups: Sequence[Sequence[torch.nn.Parameter]], max_norm: float) -> torch.Tensor:
    """Clip each group's gradients to the norm ``max_norm`` (one group: the global clip), in place, and return
    the norm of all of them before clipping (what ``clip_grad_norm_`` returns for one group).

    >>> a, b = torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))
    >>> a.grad, b.grad = torch.tensor([3.0]), torch.tensor([40.0])
    >>> round(float(clip_gradients([[a], [b]], 1.0)), 4), round(float(a.grad), 4), round(float(b.grad), 4)
    (40.1123, 1.0, 1.0)
    """
    norms = [_clip_group(group, max_norm) for group in groups]
    return norms[0] if len(norms) == 1 else torch.linalg.vector_norm(torch.stack(norms))


@torch.no_grad()
def _clip_group(group: Sequence[torch.nn.Parameter], max_norm: float) -> torch.Tensor:
    """``clip_grad_norm_(group, max_norm)``'s arithmetic, op for op (the same numbers), without its per-call
    grouping of the tensors by device and dtype, Python work repeated on every minibatch step."""
    grads = [p.grad for p in group if p.grad is not None]
    if not grads or len({(g.device, g.dtype) for g in grads}) > 1 or grads[0].device.type not in ("cpu", "cuda"):
        return torch.nn.utils.clip_grad_norm_(group, max_norm)
    total = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads, 2.0)), 2.0)
    torch._foreach_mul_(grads, torch.clamp(max_norm / (total + 1e-6), max=1.0))
    return total


def scheduled_lr(cfg: DictConfig, updates_done: int, total_batches: int) -> float:
    """The learning rate of the next update: ``cfg.lr``, decayed linearly to 0 at ``cfg.lr_anneal_frames``
    (null: at the end of the run, ``total_batches`` updates) when ``cfg.anneal_lr``, and 0 after it.

    >>> from omegaconf import OmegaConf
    >>> cfg = OmegaConf.create({"lr": 1.0, "anneal_lr": True, "lr_anneal_frames": 300, "frames_per_batch": 100})
    >>> [scheduled_lr(cfg, u, total_batches=2) for u in range(4)]
    [1.0, 0.6666666666666667, 0.33333333333333337, 0.0]
    """
    if not cfg.anneal_lr:
        return cfg.lr
    horizon = cfg.get("lr_anneal_frames")
    fraction = updates_done / total_batches if horizon is None else updates_done * cfg.frames_per_batch / horizon
    return cfg.lr * max(1 - fraction, 0.0)
