"""torchrl-ot: Optimal Transport Trust Region Policy Optimization (OT-TRPO) for TorchRL."""

from torchrl_ot import envs  # noqa: F401  (registers NChain-v0 with gymnasium)
from torchrl_ot.bgpg import BGPGLoss, EntropicWassersteinDual
from torchrl_ot.costs import (
    CallableCost,
    DiscreteMetricCost,
    EuclideanCost,
    IndexDistanceCost,
    L1Cost,
    MatrixCost,
    TransportCost,
)
from torchrl_ot.dual import DualSolver
from torchrl_ot.functional import DualSolution, solve_dual, tabular_ot_update, transport_plan
from torchrl_ot.loss import CategoricalOTLoss, GaussianOTLoss, OTTrustRegionLoss, SampledOTLoss
from torchrl_ot.targets import MassSplittingTarget
from torchrl_ot.trpo import TRPOLoss
from torchrl_ot.wnpg import WassersteinNaturalGradient, WNPGLoss

__all__ = [
    "BGPGLoss",
    "CallableCost",
    "CategoricalOTLoss",
    "DiscreteMetricCost",
    "DualSolution",
    "DualSolver",
    "EntropicWassersteinDual",
    "EuclideanCost",
    "GaussianOTLoss",
    "IndexDistanceCost",
    "L1Cost",
    "MassSplittingTarget",
    "MatrixCost",
    "OTTrustRegionLoss",
    "SampledOTLoss",
    "TRPOLoss",
    "TransportCost",
    "WNPGLoss",
    "WassersteinNaturalGradient",
    "solve_dual",
    "tabular_ot_update",
    "transport_plan",
]
__version__ = "0.1.0"
