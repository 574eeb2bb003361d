"""The best return a tabular env allows, by value iteration on its transition table, and each run's final
return as a fraction of it.

The evaluation of ``recipes/tabular.py`` (and of ``benchmarks/compare.py`` on tabular envs) is the mean
undiscounted episode return from the env's initial states under its time limit (:func:`episode_limit`). The
largest value any policy can reach there is the finite-horizon optimum: backward induction over the limit ``H``
on the env's ``P[s][a] = [(prob, next_state, reward, terminated), ...]`` (gymnasium's toy-text format; NChain's
too), ``V_0 = 0``, ``V_h(s) = max_a sum p (r + (1 - terminated) V_{h-1}(s'))``, averaged over the initial-state
distribution (``initial_state_distrib``; state 0 where an env has none). A stationary policy may fall short of
it; nothing exceeds it.

    .venv/bin/python benchmarks/tabular_optimum.py                        # the optima of the toy-text settings
    .venv/bin/python benchmarks/tabular_optimum.py --runs runs/bench/classic   # and each run's fraction of it

``--runs`` walks ``<dir>/<env>/<algo>/seed<k>/summary.json`` (compare.py's and tabular_learning.py's layout) and
reads each run's env and ``env.kwargs`` from its ``.hydra/config.yaml``. Not a test: it asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

import gymnasium as gym
from omegaconf import OmegaConf

import torchrl_ot  # noqa: F401  (registers NChain-v0)
from torchrl_ot.tabular import episode_limit, exact_return

#: Toy-text settings whose optimum is printed by default: each env at its default and one other setting.
SETTINGS: tuple[tuple[str, dict[str, Any]], ...] = (
    ("CliffWalking-v1", {}), ("CliffWalking-v1", {"is_slippery": True}),
    ("FrozenLake-v1", {}), ("FrozenLake-v1", {"is_slippery": False}),
    ("FrozenLake-v1", {"map_name": "8x8"}), ("Taxi-v4", {}), ("Taxi-v4", {"is_rainy": True}),
    ("NChain-v0", {}), ("NChain-v0", {"n": 10}),
)


def optimal_return(env_id: str, env_kwargs: dict[str, Any] | None = None, horizon: int | None = None) -> float:
    """The finite-horizon optimum of the mean undiscounted return from the initial states (module docstring;
    :func:`torchrl_ot.tabular.exact_return` without a policy).

    >>> optimal_return("FrozenLake-v1", {"is_slippery": False})  # six steps to the goal, reward 1
    1.0
    >>> optimal_return("CliffWalking-v1")  # 13 steps along the cliff, -1 each
    -13.0
    """
    return exact_return(env_id, env_kwargs, horizon=horizon)


def fraction(finals: list[float], best: float | None) -> str:
    """Mean (lowest) final return as a fraction of the optimum ``best``; for a negative optimum, optimum / return
    (1 at the optimum, smaller below it).

    >>> fraction([-13.0, -15.0], -13.0)
    '0.929 (0.867)'
    """
    if best is None:
        return "n/a"
    mean, low = statistics.fmean(finals), min(finals)
    if best > 0:
        return f"{mean / best:.3f} ({low / best:.3f})"
    if best < 0 and mean < 0 and low < 0:
        return f"{best / mean:.3f} ({best / low:.3f})"
    return "n/a"


def run_fractions(root: Path) -> list[str]:
    """Table rows: per (env, kwargs, algo), the runs' mean and lowest final return as fractions of the optimum."""
    groups: dict[tuple[str, str, str], list[float]] = {}
    for summary_path in sorted(root.glob("*/*/seed*/summary.json")):
        run = summary_path.parent
        cfg = OmegaConf.load(run / ".hydra" / "config.yaml")
        kwargs = OmegaConf.to_container(cfg.env.get("kwargs") or OmegaConf.create({}))
        if not hasattr(gym.make(cfg.env.name, **kwargs).unwrapped, "P"):  # not tabular: no optimum here
            continue
        final = json.loads(summary_path.read_text())["final_return"]
        groups.setdefault((cfg.env.name, json.dumps(kwargs, sort_keys=True), run.parent.name), []).append(final)
    lines = ["| env | env.kwargs | algo | seeds | final return, mean (lowest) | optimum | fraction, mean (lowest) |",
             "|---|---|---|---|---|---|---|"]
    for (env, kwargs, algo), finals in sorted(groups.items()):
        best = optimal_return(env, json.loads(kwargs))
        mean, low = statistics.fmean(finals), min(finals)
        lines.append(f"| {env} | {kwargs} | {algo} | {len(finals)} | {mean:.3f} ({low:.3f}) | {best:.3f} | "
                     f"{fraction(finals, best)} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=Path, default=None, help="a folder of runs (<env>/<algo>/seed<k>)")
    args = parser.parse_args()
    lines = ["| env | env.kwargs | time limit | optimum |", "|---|---|---|---|"]
    for env, kwargs in SETTINGS:
        lines.append(f"| {env} | {json.dumps(kwargs)} | {episode_limit(env)} | {optimal_return(env, kwargs):.4f} |")
    print("\n".join(lines))
    if args.runs is not None:
        print("\nFor negative optima the fraction is optimum / return (1 at the optimum, smaller below it).\n")
        print("\n".join(run_fractions(args.runs)))


if __name__ == "__main__":
    main()
