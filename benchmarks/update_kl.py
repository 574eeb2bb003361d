"""How far each OT-TRPO update moves the policy in TRPO's units: KL(pi_old || pi_new) per update.

TRPO bounds the mean KL divergence between the pre-tanh Gaussians before and after an update (0.01 in
``recipes/conf/train/algo/trpo.yaml``); OT-TRPO bounds a transport cost instead. This script runs
``recipes/train.py`` unchanged except that, after each update of an ``ot_trpo`` run, it computes at the batch's
states the same KL TRPO bounds (the Normals before tanh, summed over action dimensions, averaged over states) and
the squared shift of their means, and appends ``frames,kl,squared_loc_shift,realised_transport_over_epsilon`` to
``--csv``. Compare with a TRPO run's own ``logs/scalars/kl.csv``.

    .venv/bin/python benchmarks/update_kl.py --csv runs/kl_hopper.csv env=Hopper-v5 algo=ot_trpo seed=7 \\
        algo.squared_hinge=true stop_after_frames=40960 eval_every=1000000 eval_episodes=1 \\
        hydra.run.dir=runs/kl_hopper overwrite=true

Gaussian policies only (the actor must write ``loc`` and ``scale``). Not a test: it asserts nothing.
"""

from __future__ import annotations

import argparse
import runpy
import sys
from pathlib import Path

import torch
from tensordict import TensorDict
from torch.distributions import Normal, kl_divergence

from torchrl_ot.training import algorithms

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "train.py"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--csv", type=Path, required=True, help="file the per-update rows are appended to")
    args, overrides = parser.parse_known_args()
    args.csv.parent.mkdir(parents=True, exist_ok=True)
    before, after = algorithms.OTTrustRegion.before_epochs, algorithms.OTTrustRegion.after_epochs
    old: dict[str, torch.Tensor] = {}

    def before_epochs(self, batch, row):
        before(self, batch, row)
        flat = batch.reshape(-1)
        for key in ("observation", "loc", "scale"):
            if key not in flat.keys():
                raise ValueError(f"update_kl.py needs a Gaussian policy: the batch has no {key!r} entry")
            old[key] = flat[key].clone()

    def after_epochs(self, batch, row):
        after(self, batch, row)
        params = self.loss_module.actor_network.module[0]  # the actor's loc/scale module
        with torch.no_grad():
            new = params(TensorDict({"observation": old["observation"]}, [old["observation"].shape[0]]))
            kl = kl_divergence(Normal(old["loc"], old["scale"]), Normal(new["loc"], new["scale"])).sum(-1).mean()
            shift = (new["loc"] - old["loc"]).pow(2).sum(-1).mean()
        with args.csv.open("a") as f:
            f.write(f"{row['frames']},{kl.item()},{shift.item()},{row.get('realised_transport_over_epsilon')}\n")

    algorithms.OTTrustRegion.before_epochs = before_epochs
    algorithms.OTTrustRegion.after_epochs = after_epochs
    sys.argv = [str(RECIPE), *overrides]
    runpy.run_path(str(RECIPE), run_name="__main__")


if __name__ == "__main__":
    main()
