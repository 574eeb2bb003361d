"""torchrl-ot: Optimal Transport Trust Region Policy Optimization (OT-TRPO) for TorchRL."""
