"""The deep OT-TRPO losses (TorchRL ``LossModule`` s): one class per policy setting of Section 5 over a shared base.

``OTTrustRegionLoss(..., policy=...)`` builds the setting's class; a new setting subclasses
:class:`OTTrustRegionLoss` with ``policy=`` and implements its three hooks (see :mod:`torchrl_ot.loss.base`).
"""

from torchrl_ot.loss.base import OTTrustRegionLoss
from torchrl_ot.loss.categorical import CategoricalOTLoss
from torchrl_ot.loss.gaussian import GaussianOTLoss
from torchrl_ot.loss.sampled import SampledOTLoss

__all__ = ["CategoricalOTLoss", "GaussianOTLoss", "OTTrustRegionLoss", "SampledOTLoss"]
