"""``GaussianOTLoss``: OT-TRPO for a (squashed) Gaussian policy through the hinge on its deterministic action."""

from __future__ import annotations

import torch
from tensordict import TensorDict, TensorDictBase
from torch import Tensor

from torchrl_ot._actor_critic import log_prob_per_sample
from torchrl_ot.costs import EuclideanCost
from torchrl_ot.functional import DualSolution, gaussian_transport_bound
from torchrl_ot.loss.base import OTTrustRegionLoss
from torchrl_ot.validation import (
    check_bool,
    check_entries_present,
    check_real,
    check_shape,
    entry_name,
    get_entry,
)

__all__ = ["GaussianOTLoss", "GaussianTransportMixin"]


def _deterministic(dist) -> Tensor:
    """The deterministic action m(s) of a distribution (TanhNormal: tanh of the loc; Normal: its mean)."""
    sample = getattr(dist, "deterministic_sample", None)
    return dist.mean if sample is None else sample


def _mirror(dist, mean: Tensor, action: Tensor) -> Tensor:
    """``2 m - a``, the mirror image of the action through the deterministic action, clamped to the
    distribution's action box [low, high] when it has one (TanhNormal)."""
    image = 2 * mean - action
    low, high = getattr(dist, "low", None), getattr(dist, "high", None)
    if low is not None and high is not None:
        image = torch.maximum(torch.minimum(image, high), low)
    return image


def _gaussian_params(dist) -> tuple[Tensor, Tensor]:
    """(loc, scale) of the Gaussian under a Normal, Independent(Normal) or TanhNormal distribution."""
    base = dist
    for attr in ("root_dist", "base_dist"):
        while hasattr(base, attr) and not isinstance(base, torch.distributions.Normal):
            base = getattr(base, attr)
    if not isinstance(base, torch.distributions.Normal):
        raise ValueError(f"realised_transport needs a categorical or a (Tanh)Normal policy, got {type(dist).__name__}")
    return base.loc, base.scale


def _lipschitz(dist) -> Tensor:
    """Per-coordinate Lipschitz constant of the map from the Gaussian to the action: (high - low) / 2 for
    TorchRL's TanhNormal (tanh, then affine onto [low, high]), 1 for a plain Normal."""
    low, high = getattr(dist, "low", None), getattr(dist, "high", None)
    if isinstance(dist, torch.distributions.TransformedDistribution) and low is not None and high is not None:
        return ((high - low) / 2).to(dist.loc.dtype)
    return torch.ones(())


class GaussianTransportMixin:
    """What a Gaussian policy moved at a state: the synchronous-coupling upper bound
    (:func:`~torchrl_ot.functional.gaussian_transport_bound`), so a value <= epsilon proves the update inside."""

    def _transport(self, old, new) -> Tensor:
        (loc0, scale0), (loc1, scale1) = (_gaussian_params(d) for d in (old, new))
        return gaussian_transport_bound(loc0.double(), scale0.double(), loc1.double(), scale1.double(),
                                        self.cost, _lipschitz(new).double())

    def _smooth_transport(self, old, new) -> Tensor:
        # The bound's own formula for the squared Euclidean cost, sum_i L_i^2 (dloc_i^2 + dscale_i^2), written
        # without the |dloc| of its equal-scale branch: autograd's second derivative of |x|^2 at 0 is 0, not 2.
        if not (isinstance(self.cost, EuclideanCost) and self.cost.p == 2.0):
            return super()._smooth_transport(old, new)
        (loc0, scale0), (loc1, scale1) = (_gaussian_params(d) for d in (old, new))
        lip = _lipschitz(new).to(loc1.dtype)
        return (lip.pow(2) * ((loc1 - loc0.detach()).pow(2) + (scale1 - scale0.detach()).pow(2))).double().sum(-1)


class GaussianOTLoss(GaussianTransportMixin, OTTrustRegionLoss, policy="gaussian",
                     options={"mirror": False, "learn_scale": False, "scale_clip": 0.2, "squared_hinge": False}):
    """OT-TRPO for a Gaussian or TanhNormal policy: Section 5, step 4 case 2 and step 5 case 3 (its Gaussian
    special case), with GAE advantages and a continuous ``cost``.

    Per sample two candidates: the taken action ``a_b`` (advantage ``A_b``, cost ``c(m_old(s_b), a_b)``) and the
    behaviour's deterministic action ``m_old(s_b)`` (advantage 0, cost 0): a hinge dual. The loss is
    ``-(1/B) sum_b max(A_b - lam* c(m_theta(s_b), a_b), 0)`` with ``m_theta`` the current policy's deterministic
    action. When lam* = 0 (the trust region does not bind) this has no gradient: choose ``epsilon`` below the
    mean transport to positive-advantage actions. ``ot_active_fraction`` is the share of samples with
    ``A_b - lam* c(m_theta, a_b) > 0``, the ones with a gradient.

    Args:
        mirror: (not in the paper) adds a third candidate, the mirror image ``2 m_old(s_b) - a_b`` (clamped to the
            action box) with the first-order advantage ``-A_b`` (for A locally linear in the action around the
            mean), so that negative-advantage samples push the mean away as positive ones pull it; the loss
            becomes ``max(A_b - lam* c(m_theta, a_b), 0, -A_b - lam* c(m_theta, 2 m_old - a_b))``.
        learn_scale: (not in the paper, whose std is fixed) the Gaussian's std is trained too, by the clipped
            importance-sampled surrogate of the spread alone: ``+ min(r_b A_b, clip(r_b, 1 -+ scale_clip) A_b)``
            per sample, ``r_b = N(a_b; loc_old(s_b), scale_theta(s_b)) / pi_old(a_b|s_b)`` (the behaviour's mean,
            the current std: the spread's own ratio, so the hinge keeps the mean). Its transport is counted:
            for the squared Euclidean cost (the only one allowed with it) the realised transport per state is
            ``sum_i L_i^2 (dloc_i^2 + dscale_i^2)``, the diagonal Gaussians' W2^2 pushed through the tanh
            (:func:`~torchrl_ot.functional.gaussian_transport_bound`), so the projection keeps the pair inside.
        scale_clip: the spread's ratio clip (PPO's ``clip_epsilon``), in (0, 1); used with ``learn_scale``.
        squared_hinge: (not in the paper) the hinge squared, ``max(A_b - lam* c(m_theta, a_b), 0)**2`` (with the
            mirror, the larger candidate's): each state's maximiser is the same candidate, so the exact update
            is unchanged, but the fitted network weighs each sample's pull towards its candidate by its margin
            (the gradient is ``2 (A_b - lam* c) lam* grad c``), as the policy gradient weighs by ``A_b``, where the
            plain hinge pulls every active sample with the same ``lam*``.
        The other arguments are :class:`~torchrl_ot.OTTrustRegionLoss`'s.
    """

    def __init__(self, actor_network, critic_network, *, cost, epsilon: float, mirror: bool = False,
                 learn_scale: bool = False, scale_clip: float = 0.2, squared_hinge: bool = False, **kwargs) -> None:
        check_bool("mirror", mirror)
        check_bool("squared_hinge", squared_hinge)
        check_bool("learn_scale", learn_scale)
        check_real("scale_clip", scale_clip, low=0, low_open=True, high=1, high_open=True)
        if learn_scale and not (isinstance(cost, EuclideanCost) and cost.p == 2.0):
            raise ValueError("learn_scale=True needs cost=EuclideanCost(p=2) (squared Euclidean): only for it is the "
                             f"transport of a change of std closed-form (W2^2); got {cost!r}")
        if kwargs.get("advantage_network") is not None:
            raise ValueError("policy='gaussian' takes no advantage_network (its candidates' advantages are the "
                             "batch's own: A_b and 0)")
        super().__init__(actor_network, critic_network, cost=cost, epsilon=epsilon, **kwargs)
        self.mirror, self.learn_scale, self.scale_clip = mirror, learn_scale, float(scale_clip)
        self.squared_hinge = squared_hinge
        if learn_scale and len(self._dist_keys) != 2:
            raise ValueError(f"learn_scale=True needs an actor whose distribution takes (loc, scale), got "
                             f"{self._dist_keys}")

    def _needed_keys(self) -> list:
        return [self.tensor_keys.candidates] if self.mirror else []

    def _candidates(self, flat: TensorDictBase, old, adv: Tensor) -> tuple[DualSolution, dict, None]:
        # Candidates [a_b, m_old(s_b)]: advantages [A_b, 0], costs [c(m_old, a_b), 0].
        action, written = self._continuous_action(flat, old), {}
        zero = torch.zeros_like(adv)
        mean = _deterministic(old)
        cand_adv = torch.stack([adv, zero], -1)
        cost = torch.stack([self.cost(mean, action).double(), zero], -1)
        if self.mirror:  # a third: the mirror image of a_b through m_old, advantage -A_b
            image = _mirror(old, mean, action)
            cand_adv = torch.cat([cand_adv, -adv[:, None]], -1)
            cost = torch.cat([cost, self.cost(mean, image).double()[:, None]], -1)
            written[self.tensor_keys.candidates] = image
        return self._solve_candidates(cand_adv, cost), written, None

    def _objective(self, flat: TensorDictBase, dist, lam: Tensor, adv: Tensor, critic_out) -> tuple:
        # The hinge of step 5 case 3: max(A_b - lam* c(m_theta(s_b), a_b), 0).
        mean = _deterministic(dist)
        action = self._continuous_action(flat, dist)
        term = adv - lam * self.cost(mean, action)
        if self.mirror:  # ... and the mirrored candidate: max(., -A_b - lam* c(m_theta, image_b))
            key, owner = self.tensor_keys.candidates, type(self).__name__
            image = get_entry(flat, key, owner, floating=True)
            if image.shape != action.shape:
                check_shape(entry_name(key, owner), image, tuple(action.shape),
                            what=f"{list(action.shape)}, that of the actions (one mirror image per action)")
            term = torch.maximum(term, -adv - lam * self.cost(mean, image))
        objective = term.clamp_min(0)
        if self.squared_hinge:  # the same maximiser per state; each sample's pull weighed by its margin
            objective = objective.pow(2)
        if self.learn_scale:
            objective = objective + self._spread_surrogate(flat, dist, adv)
        return objective, term > 0, None

    def _spread_surrogate(self, flat: TensorDictBase, dist, adv: Tensor) -> Tensor:
        """PPO's clipped surrogate ``[n]`` with the ratio of the std alone (the behaviour's loc, the current scale)."""
        loc_key, scale_key = self._dist_keys
        owner = type(self).__name__
        check_entries_present(flat, self._dist_keys, owner, " for learn_scale (pi_old's parameters, recorded by "
                                                            "solve_multiplier)")
        old_loc = get_entry(flat, loc_key, owner, floating=True).detach()
        _, scale = _gaussian_params(dist)
        # The spread's ratio pairs each stored loc with the current scale: any other shape would pair them wrongly.
        if old_loc.shape != scale.shape:
            check_shape(entry_name(loc_key, owner), old_loc, tuple(scale.shape),
                        what=f"{list(scale.shape)}, the current policy's scale")
        spread = self.actor_network.build_dist_from_params(
            TensorDict({loc_key: old_loc, scale_key: scale.reshape(old_loc.shape)}, batch_size=flat.batch_size))
        n = flat.numel()
        old = self.actor_network.build_dist_from_params(flat.select(*self._dist_keys).detach())
        self._check_log_prob(flat, owner)
        ratio = torch.exp(log_prob_per_sample(spread, flat.get(self.tensor_keys.action), n)
                          - self._old_log_prob(flat, old))
        adv = adv.to(ratio.dtype)
        return torch.minimum(ratio * adv, ratio.clamp(1 - self.scale_clip, 1 + self.scale_clip) * adv)
