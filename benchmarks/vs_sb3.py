"""Wall-clock throughput of stable-baselines3's PPO, the recipe's PPO and the recipe's OT-TRPO at identical settings.

The settings are the recipe's own (``recipes/conf/train/config.yaml``, ``algo/ppo.yaml``, ``env/<env>.yaml``,
``estimator/gae.yaml``), read once per env and passed explicitly to both sides, so that a change of a
config default moves both together: ``num_envs`` synchronous env copies (SB3: ``DummyVecEnv``),
``frames_per_batch`` frames per batch (SB3: ``n_steps = frames_per_batch / num_envs``),
``num_epochs`` x ``num_minibatches`` minibatches, separate tanh MLPs with orthogonal initialisation for
actor and critic, running observation normalisation clipped to +-10 (SB3: ``VecNormalize``), the env's lr
(linearly annealed per update when the recipe anneals), gamma, GAE lambda, PPO clip, max_grad_norm, entropy
and value coefficients, Adam's eps (and fused kernel), one torch thread, cpu; SB3 with no callback and
``verbose=0``, the recipe with one-episode evaluations only at the start and the end (outside its train time).

Runs go one at a time, each pinned to ``--core`` (``sched_setaffinity``, as ``taskset -c``), the order
rotating across reps (ABC, BCA, CAB, ...) so that no algorithm always runs first or last. The recipe's
figure is its ``summary.json``'s ``train_time_s`` / ``frames_per_s`` (collection + updates, evaluations
excluded); SB3's is ``frames`` over the time of ``model.learn(total_timesteps=frames)`` alone (import and
construction excluded). Ratios: of the medians over reps, and the median of each rep's ratio (its runs
are adjacent in time: that cancels the machine's drift between reps). A second table splits the time
into collection and the update's phases (``update_time_breakdown_s``; SB3: ``train()`` and the rest).

Not identical, and not settable: on continuous actions the recipe's policy is a TanhNormal with a
state-independent scale, SB3's a Normal with a state-independent log std whose actions are clipped to the
bounds; the recipe's normalisation is VecNormV2's maths (decay 0.99999, std clamped at eps), SB3's an exact
running mean (variance + eps**2 under the root); gymnasium's and SB3's vector envs reset finished
episodes differently; the same seed gives different initial weights and episodes. SB3's GAE falls in
its collection time, the recipe's in its update ("advantage").

    .venv/bin/pip install -e ".[bench]"                                       # stable-baselines3
    .venv/bin/python benchmarks/vs_sb3.py                                     # CartPole-v1, HalfCheetah-v5
    .venv/bin/python benchmarks/vs_sb3.py --envs CartPole-v1 --frames 40960 --reps 5 --core 0
    .venv/bin/python benchmarks/vs_sb3.py --out benchmarks/results/vs_sb3     # keeps runs.csv and table.md
    .venv/bin/python benchmarks/vs_sb3.py --compile --frames 204800           # + compile=true (5 runs per rep)
    .venv/bin/python benchmarks/vs_sb3.py --algos sb3_ppo ppo_compiled ot_trpo_compiled   # only these runs
    .venv/bin/python benchmarks/vs_sb3.py --compile --warmup    # a one-batch compiled run first (fills the cache)

Not a test: it asserts nothing (tests/test_vs_sb3.py runs a smoke version).
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

# Only the standard library at module level: the SB3 worker imports this file too, and its process
# should hold SB3 and torch alone (no torchrl, no hydra), as a user's SB3 script would.
ROOT = Path(__file__).resolve().parents[1]
ALGOS = ("sb3_ppo", "ppo", "ot_trpo")  # "ppo", "ot_trpo": recipes/train.py algo=
COMPILED = ("ppo_compiled", "ot_trpo_compiled")  # --compile: the same with compile=true
LABELS = {"sb3_ppo": "SB3 PPO", "ppo": "recipe PPO", "ot_trpo": "recipe OT-TRPO",
          "ppo_compiled": "recipe PPO compiled", "ot_trpo_compiled": "recipe OT-TRPO compiled"}
RATIOS = (("ppo", "sb3_ppo"), ("ot_trpo", "sb3_ppo"), ("ot_trpo", "ppo"))
COMPILED_RATIOS = (("ppo_compiled", "sb3_ppo"), ("ot_trpo_compiled", "sb3_ppo"), ("ot_trpo_compiled", "ppo_compiled"),
                   ("ppo_compiled", "ppo"))
PHASES = ("advantage", "solve", "epochs", "project")  # the recipe's update_time_breakdown_s (checked in main)
FIELDS = ["algo", "env", "rep", "position", "frames", "seconds", "frames_per_s", "collection_s", "update_s",
          *(f"{phase}_s" for phase in PHASES)]
INSTALL_HINT = 'stable-baselines3 is not installed: pip install -e ".[bench]" (from the repository root)'


def recipe_settings(env: str) -> dict[str, Any]:
    """The settings both sides get, from the recipe's composed config for ``env=<env> algo=ppo``."""
    from compare import CONFIGURED  # benchmarks/ is this script's own directory: on sys.path
    from hydra import compose, initialize_config_dir  # here: hydra stays out of the SB3 worker

    with initialize_config_dir(config_dir=str(ROOT / "recipes" / "conf" / "train"), version_base=None):
        cfg = compose("config", overrides=[f"env={env}" if env in CONFIGURED else f"env.name={env}", "algo=ppo"])
    # SB3's value loss is the squared error and its advantages come from GAE: refuse a config it cannot match.
    if cfg.algo.loss_critic_type != "l2" or cfg.estimator.value_type != "GAE":
        raise SystemExit(f"SB3 has only an l2 value loss and GAE; the recipe's config has loss_critic_type="
                         f"{cfg.algo.loss_critic_type}, estimator={cfg.estimator.value_type}")
    return {"num_envs": cfg.num_envs, "frames_per_batch": cfg.frames_per_batch, "num_epochs": cfg.num_epochs,
            "num_minibatches": cfg.num_minibatches, "num_cells": list(cfg.num_cells), "num_threads": cfg.num_threads,
            "lr": cfg.lr, "anneal_lr": bool(cfg.anneal_lr), "adam_eps": cfg.adam_eps,
            "adam_fused": bool(cfg.adam_fused),
            "max_grad_norm": cfg.max_grad_norm, "gamma": cfg.env.gamma, "gae_lambda": cfg.estimator.lmbda,
            "clip_epsilon": cfg.algo.clip_epsilon, "normalize_advantage": bool(cfg.algo.normalize_advantage),
            "entropy_coeff": cfg.algo.entropy_coeff, "critic_coeff": cfg.algo.critic_coeff,
            "init_scale": cfg.algo.init_scale, "obs_clip": cfg.obs_norm.clip, "obs_eps": cfg.obs_norm.eps}


def describe(s: dict[str, Any]) -> str:
    """The settings in one line, with SB3's names where they differ."""
    cells = "x".join(map(str, s["num_cells"]))
    return (f"{s['num_envs']} envs, {s['frames_per_batch']} frames per batch (SB3 n_steps="
            f"{s['frames_per_batch'] // s['num_envs']}), {s['num_epochs']} epochs x {s['num_minibatches']} "
            f"minibatches of {s['frames_per_batch'] // s['num_minibatches']}, {cells} tanh MLPs (actor, critic "
            f"separate), obs normalisation clip {s['obs_clip']}, lr {s['lr']}"
            f"{' annealed linearly' if s['anneal_lr'] else ''}, gamma {s['gamma']}, GAE lambda {s['gae_lambda']}, "
            f"clip {s['clip_epsilon']}, max_grad_norm {s['max_grad_norm']}, entropy coef {s['entropy_coeff']}, "
            f"vf coef {s['critic_coeff']}, Adam eps {s['adam_eps']}{' fused' if s['adam_fused'] else ''}, "
            f"initial std {s['init_scale']}, {s['num_threads']} torch thread(s), cpu")


def recipe_overrides(s: dict[str, Any], algo: str) -> list[str]:
    """Hydra overrides fixing every shared setting (and, for PPO, its clip and advantage normalisation);
    ``algo`` is a recipe algo, or one of COMPILED (the same algo with ``compile=true``)."""
    compiled = algo in COMPILED
    algo = algo.removesuffix("_compiled")
    over = [f"num_envs={s['num_envs']}", f"frames_per_batch={s['frames_per_batch']}",
            f"num_epochs={s['num_epochs']}", f"num_minibatches={s['num_minibatches']}",
            f"num_cells=[{','.join(map(str, s['num_cells']))}]", f"num_threads={s['num_threads']}",
            "num_collectors=1", f"lr={s['lr']!r}", f"anneal_lr={str(s['anneal_lr']).lower()}",
            f"adam_eps={s['adam_eps']!r}", f"adam_fused={str(s['adam_fused']).lower()}",
            f"max_grad_norm={s['max_grad_norm']!r}", f"env.gamma={s['gamma']!r}", "estimator=gae",
            f"estimator.lmbda={s['gae_lambda']!r}", "obs_norm.enabled=true", f"obs_norm.clip={s['obs_clip']!r}",
            f"obs_norm.eps={s['obs_eps']!r}", f"algo.entropy_coeff={s['entropy_coeff']!r}",
            f"algo.critic_coeff={s['critic_coeff']!r}", "algo.loss_critic_type=l2",
            f"algo.init_scale={s['init_scale']!r}"]
    if algo == "ppo":  # OT-TRPO has no clip; its normalize_advantage is per batch, before lambda*: its own
        over += [f"algo.clip_epsilon={s['clip_epsilon']!r}",
                 f"algo.normalize_advantage={str(s['normalize_advantage']).lower()}"]
    return [*over, "compile=true"] if compiled else over


def run_recipe(env: str, algo: str, frames: int, seed: int, s: dict[str, Any], core: int) -> dict[str, float]:
    """One pinned recipes/train.py run (throughput.py's launcher: no evaluation to speak of, no checkpoint
    within the budget, a throwaway run directory); its summary's training time and phases."""
    from throughput import finish, start

    with tempfile.TemporaryDirectory() as tmp:
        proc = start(env, algo.removesuffix("_compiled"), frames, seed, recipe_overrides(s, algo), tmp, core)
        finish(proc, tmp)  # raises on failure
        summary = json.loads((Path(tmp) / "summary.json").read_text())
    phases = summary["update_time_breakdown_s"]
    update = sum(phases.values())
    return {"frames": summary["frames"], "seconds": summary["train_time_s"], "frames_per_s": summary["frames_per_s"],
            "collection_s": summary["train_time_s"] - update, "update_s": update,
            **{f"{phase}_s": phases[phase] for phase in PHASES}}


def run_sb3(env: str, frames: int, seed: int, s: dict[str, Any], core: int) -> dict[str, float]:
    """One pinned SB3 run in its own process (this script's ``--worker sb3``)."""
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "result.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "sb3", "--envs", env, "--frames", str(frames),
               "--seed", str(seed), "--settings", json.dumps(s), "--result", str(result)]
        # The same environment and pinning as throughput.start gives the recipe's runs.
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT,
                              env=dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1"),
                              preexec_fn=lambda: os.sched_setaffinity(0, {core}))
        if proc.returncode != 0:
            raise RuntimeError(f"SB3 run failed: {' '.join(cmd)}\n{proc.stderr[-3000:]}")
        return json.loads(result.read_text())


def sb3_worker(env: str, frames: int, seed: int, s: dict[str, Any], result: Path) -> None:
    """Build SB3's PPO at the settings ``s`` and time ``model.learn`` alone; write frames, seconds, phases."""
    if importlib.util.find_spec("stable_baselines3") is None:
        sys.exit(INSTALL_HINT)
    import torch

    torch.set_num_threads(s["num_threads"])  # as the recipe's num_threads
    from stable_baselines3 import PPO
    from stable_baselines3.common.env_util import make_vec_env
    from stable_baselines3.common.vec_env import DummyVecEnv, VecNormalize

    vec = make_vec_env(env, n_envs=s["num_envs"], seed=seed, vec_env_cls=DummyVecEnv)
    # VecNormV2 clamps the std at eps, VecNormalize adds its epsilon to the variance: eps**2 is the nearest.
    vec = VecNormalize(vec, norm_obs=True, norm_reward=False, clip_obs=s["obs_clip"], gamma=s["gamma"],
                       epsilon=s["obs_eps"] ** 2)
    # The recipe's k-th update (from 0) runs at lr * (1 - k / K); SB3 evaluates its schedule after the
    # batch is collected, at progress 1 - (k + 1) / K: one batch's share added back gives the same lr.
    lr, share = s["lr"], s["frames_per_batch"] / frames
    schedule = (lambda progress: lr * min(1.0, progress + share)) if s["anneal_lr"] else lr
    model = PPO("MlpPolicy", vec, learning_rate=schedule, n_steps=s["frames_per_batch"] // s["num_envs"],
                batch_size=s["frames_per_batch"] // s["num_minibatches"], n_epochs=s["num_epochs"],
                gamma=s["gamma"], gae_lambda=s["gae_lambda"], clip_range=s["clip_epsilon"], clip_range_vf=None,
                normalize_advantage=s["normalize_advantage"], ent_coef=s["entropy_coeff"], vf_coef=s["critic_coeff"],
                max_grad_norm=s["max_grad_norm"], use_sde=False, target_kl=None,
                policy_kwargs={"net_arch": {"pi": s["num_cells"], "vf": s["num_cells"]},
                               "activation_fn": torch.nn.Tanh, "ortho_init": True,
                               "log_std_init": math.log(s["init_scale"]), "optimizer_class": torch.optim.Adam,
                               "optimizer_kwargs": {"eps": s["adam_eps"], "fused": s["adam_fused"]}},
                verbose=0, seed=seed, device="cpu")
    # train() is SB3's update (the epochs); the rest of learn() is collection, its GAE included.
    update, train = 0.0, model.train

    def timed_train() -> None:
        nonlocal update
        t0 = time.perf_counter()
        train()
        update += time.perf_counter() - t0

    model.train = timed_train
    t0 = time.perf_counter()
    model.learn(total_timesteps=frames)
    seconds = time.perf_counter() - t0
    result.write_text(json.dumps({"frames": model.num_timesteps, "seconds": seconds,
                                  "frames_per_s": model.num_timesteps / seconds,
                                  "collection_s": seconds - update, "update_s": update}))


def rotation(rep: int, algos: tuple[str, ...] = ALGOS) -> tuple[str, ...]:
    """Rep ``rep``'s order: ``algos`` rotated by ``rep`` (ABC, BCA, CAB, ...): each algorithm takes each
    position once in any ``len(algos)`` reps, so none always runs first, on a cold cache, or last, after the
    others' drift.

    >>> [''.join(a[0] for a in rotation(r)) for r in range(4)]
    ['spo', 'pos', 'osp', 'spo']
    """
    k = rep % len(algos)
    return algos[k:] + algos[:k]


def ratio_cells(fps: dict[str, list[float]], ratios: tuple[tuple[str, str], ...] = RATIOS) -> list[str]:
    """Per ``ratios`` pair: the ratio of the medians and the median of the per-rep ratios."""
    cells = []
    for a, b in ratios:
        of_medians = statistics.median(fps[a]) / statistics.median(fps[b])
        paired = statistics.median(x / y for x, y in zip(fps[a], fps[b], strict=True))
        cells.append(f"{of_medians:.2f} / {paired:.2f}")
    return cells


def tables(rows: list[dict[str, Any]], envs: list[str], algos: tuple[str, ...] = ALGOS,
           ratios: tuple[tuple[str, str], ...] = RATIOS) -> list[str]:
    """The two markdown tables: frames/s and ratios; the time split into collection and the update's phases."""
    def median(env: str, algo: str, key: str) -> float:
        return statistics.median(r[key] for r in rows if r["env"] == env and r["algo"] == algo)

    speed = ["| env | " + " | ".join(f"{LABELS[a]} frames/s" for a in algos) + " | "
             + " | ".join(f"{LABELS[a]} / {LABELS[b]}" for a, b in ratios) + " |",
             "|---|" + "---|" * (len(algos) + len(ratios))]
    split = ["| env | run | train s | collection s | update s | "
             + " | ".join(f"{phase} s" for phase in PHASES) + " |", "|---|---|" + "---|" * (3 + len(PHASES))]
    for env in envs:
        fps = {a: [r["frames_per_s"] for r in rows if r["env"] == env and r["algo"] == a] for a in algos}
        speed.append(f"| {env} | " + " | ".join(
            f"{statistics.median(v):.0f} ({', '.join(f'{x:.0f}' for x in v)})" for v in fps.values())
            + " | " + " | ".join(ratio_cells(fps, ratios)) + " |")
        for algo in algos:
            train = median(env, algo, "seconds")
            shares = [f"{median(env, algo, key):.2f} ({100 * median(env, algo, key) / train:.0f}%)"
                      for key in ("collection_s", "update_s")]
            phases = (["-"] * len(PHASES) if algo == "sb3_ppo"  # SB3's update is not split
                      else [f"{median(env, algo, f'{p}_s'):.2f}" for p in PHASES])
            split.append(f"| {env} | {LABELS[algo]} | {train:.2f} | " + " | ".join(shares + phases) + " |")
    return [*speed, "", "Seconds per run, medians over reps (share of the train time). SB3: update = train() "
            "(its epochs), collection = the rest of learn(), its GAE included. Recipe: advantage = GAE, solve = "
            "lambda* (OT-TRPO), epochs = the minibatch steps, project = the projection and bookkeeping; "
            "collection = the rest of the train time (collector, logging).", "", *split]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--envs", nargs="+", default=["CartPole-v1", "HalfCheetah-v5"])
    parser.add_argument("--frames", type=int, default=40960,
                        help="frames per run (rounded up to whole batches; default 40960)")
    parser.add_argument("--reps", type=int, default=3, help="runs per (env, algorithm); default 3")
    parser.add_argument("--core", type=int, default=1, help="the core every run is pinned to (default 1)")
    parser.add_argument("--out", type=Path, default=None, help="write runs.csv and table.md here")
    parser.add_argument("--compile", action="store_true",
                        help="also the recipe's PPO and OT-TRPO with compile=true (its compiling time counted)")
    parser.add_argument("--algos", nargs="+", choices=ALGOS + COMPILED, default=None,
                        help="only these runs (default: all of them; the ratios between the ones kept)")
    parser.add_argument("--warmup", action="store_true",
                        help="first one untimed one-batch run of each compiled algorithm per env: it fills inductor's "
                             "on-disk cache, which a fresh checkout lacks (every timed run still compiles, warm)")
    parser.add_argument("--worker", choices=["sb3"], help=argparse.SUPPRESS)  # one SB3 run (run_sb3)
    parser.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--settings", type=json.loads, help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        sb3_worker(args.envs[0], args.frames, args.seed, args.settings, args.result)
        return
    if importlib.util.find_spec("stable_baselines3") is None:
        sys.exit(INSTALL_HINT)
    if args.frames < 1 or args.reps < 1:
        parser.error(f"--frames and --reps must be positive, got {args.frames} and {args.reps}")
    if not hasattr(os, "sched_setaffinity") or args.core not in os.sched_getaffinity(0):
        parser.error(f"--core {args.core}: not a core this process may use "
                     f"({sorted(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else 'not Linux'})")
    sys.path.insert(0, str(ROOT))  # torchrl_ot from this checkout, as the recipe's runs import it
    from torchrl_ot.training.summary import PHASES as RECIPE_PHASES

    if tuple(RECIPE_PHASES) != PHASES:
        raise SystemExit(f"the recipe's update phases are {RECIPE_PHASES}, this script knows {PHASES}")
    import stable_baselines3

    algos = ALGOS + COMPILED if args.compile or (args.algos and set(args.algos) & set(COMPILED)) else ALGOS
    ratios = RATIOS + COMPILED_RATIOS if algos != ALGOS else RATIOS
    if args.algos:  # in the usual order, and the ratios between them
        algos = tuple(a for a in algos if a in args.algos)
        ratios = tuple((a, b) for a, b in ratios if a in algos and b in algos)
    settings = {env: recipe_settings(env) for env in args.envs}
    # Both sides run whole batches: the recipe rounds its budget up to one, SB3's learn() loop too.
    frames = {env: math.ceil(args.frames / s["frames_per_batch"]) * s["frames_per_batch"]
              for env, s in settings.items()}
    head = [f"Command: `{' '.join(['.venv/bin/python benchmarks/vs_sb3.py', *sys.argv[1:]])}`; stable-baselines3 "
            f"{stable_baselines3.__version__}; {args.reps} reps, one run at a time on core {args.core}, order "
            f"rotating (ABC, BCA, CAB, ...); {platform.processor() or platform.machine()}, {os.cpu_count()} cores."]
    head += [f"{env}: {frames[env]} frames per run; {describe(s)}." for env, s in settings.items()]
    print("\n".join(head) + "\n", flush=True)

    rows = []
    for env in args.envs:
        if args.warmup:  # discarded: only the on-disk compile cache carries over into the timed runs
            for algo in (a for a in algos if a in COMPILED):
                run_recipe(env, algo, settings[env]["frames_per_batch"], 0, settings[env], args.core)
                print(f"{env}: warm-up run of {LABELS[algo]} done (not timed)", flush=True)
        for rep in range(args.reps):
            for position, algo in enumerate(rotation(rep, algos)):
                if algo == "sb3_ppo":
                    result = run_sb3(env, frames[env], rep, settings[env], args.core)
                else:
                    result = run_recipe(env, algo, frames[env], rep, settings[env], args.core)
                rows.append({"algo": algo, "env": env, "rep": rep, "position": position, **result})
                print(f"{env} rep {rep} position {position}: {LABELS[algo]}: {result['frames_per_s']:.0f} frames/s "
                      f"({result['frames']} frames in {result['seconds']:.2f} s)", flush=True)
    body = "\n".join(["Frames/s: median over reps (each run). Ratios: of the medians / median of the per-rep "
                      "ratios.", "", *tables(rows, args.envs, algos, ratios)]) + "\n"
    print("\n" + body)  # the settings are at the top already
    table = "\n".join(head) + "\n\n" + body
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        with open(args.out / "runs.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=FIELDS, restval="")
            writer.writeheader()
            writer.writerows(rows)
        (args.out / "table.md").write_text(table)
        print(f"CSV: {args.out / 'runs.csv'}; table: {args.out / 'table.md'}")


if __name__ == "__main__":
    main()
