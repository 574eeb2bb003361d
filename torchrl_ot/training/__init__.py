"""The building blocks of the deep training recipe (``recipes/train.py``), importable on their own.

Not imported by ``torchrl_ot`` itself (it brings Hydra's config types, gymnasium's vector envs and
matplotlib); import it explicitly::

    from torchrl_ot.training import make_algorithm, make_env, make_networks, resolve_policy

- ``env``: gymnasium vector envs as TorchRL envs, the observation statistics, the deterministic
  evaluation;
- ``networks``: tanh MLPs, the actor, the critic and the advantage head, the policy setting;
- ``algorithms``: one :class:`Algorithm` per ``algo``, its loss and what it does before and after
  the minibatch epochs (:func:`make_algorithm`);
- ``obs_norm``: the running observation normalisation (VecNormV2's maths on plain tensors);
- ``vec_env``: the training env with the normalisation, clip, episode return and step count in its own step
  (``env_engine=fused``, the default; the same values as TorchRL's transforms);
- ``reward_scaling``: rewards scaled by the discounted return's running std (SB3's VecNormalize), or the
  critic's targets by the lambda-returns' (Tianshou's rew_norm);
- ``collection``: the collector (this process, local workers or Ray actors) and the Ray workers' statistics;
- ``collection_policy``: the actor's sampling step without its TensorDict plumbing, for the collector;
- ``optim``: the optimiser (Adam or RMSprop) and the learning-rate schedule;
- ``compiled``: the minibatch step's loss under ``torch.compile`` (``compile=true``);
- ``config``: the config checks and the process-wide settings of a run;
- ``checkpoint``: RNG states, atomic checkpoints, CSV logs cut back on resume;
- ``summary``: the logger, ``summary.json`` and ``curve.png``.

Every builder takes the recipe's Hydra config (``recipes/conf/train``) as ``cfg``.
"""

from torchrl_ot.training.algorithms import (
    A2C,
    ALGORITHMS,
    PPO,
    TRPO,
    UNUSED_AFTER_ADVANTAGES,
    Algorithm,
    Minibatches,
    OTTrustRegion,
    algorithm_class,
    make_algorithm,
    make_loss,
    minibatches,
    normalize_advantage,
)
from torchrl_ot.training.checkpoint import (
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
    truncate_csv_logs,
)
from torchrl_ot.training.collection import (
    COLLECTOR_BACKENDS,
    RayStatistics,
    check_collector_config,
    make_collector,
    merge_ema_stats,
    merge_moment_stats,
    ray_available,
)
from torchrl_ot.training.collection_policy import CollectionPolicy
from torchrl_ot.training.compiled import COMPILABLE_ALGOS, CompiledLoss, compiled_loss
from torchrl_ot.training.config import (
    check_config,
    check_device,
    check_run_dir,
    check_tabular_config,
    epochs_and_minibatches,
    prepare_process,
    record_missing_pandas,
)
from torchrl_ot.training.env import (
    ENV_ENGINES,
    EVAL_SEED_OFFSET,
    check_env_name,
    evaluate,
    make_env,
    new_obs_stats,
    resolve_env_engine,
)
from torchrl_ot.training.networks import ObsActionMLP, ValueAndAdvantage, make_networks, mlp, resolve_policy
from torchrl_ot.training.obs_norm import RunningObsNorm, running_normalise
from torchrl_ot.training.optim import GRAD_CLIPS, OPTIMIZERS, clip_gradients, make_optimizer, scheduled_lr
from torchrl_ot.training.reward_scaling import (
    ReturnScaling,
    ValueTargetScaling,
    new_return_stats,
    update_running_moments,
)
from torchrl_ot.training.step import MinibatchStep
from torchrl_ot.training.summary import PHASES, make_logger, make_summary, plot_curve
from torchrl_ot.training.vec_env import FusedVecEnv

__all__ = [
    "A2C",
    "ALGORITHMS",
    "COMPILABLE_ALGOS",
    "CompiledLoss",
    "compiled_loss",
    "MinibatchStep",
    "COLLECTOR_BACKENDS",
    "RayStatistics",
    "check_collector_config",
    "check_device",
    "make_collector",
    "CollectionPolicy",
    "merge_ema_stats",
    "merge_moment_stats",
    "ray_available",
    "ENV_ENGINES",
    "EVAL_SEED_OFFSET",
    "FusedVecEnv",
    "PHASES",
    "GRAD_CLIPS",
    "OPTIMIZERS",
    "PPO",
    "ReturnScaling",
    "ValueTargetScaling",
    "RunningObsNorm",
    "TRPO",
    "UNUSED_AFTER_ADVANTAGES",
    "Algorithm",
    "Minibatches",
    "OTTrustRegion",
    "ObsActionMLP",
    "ValueAndAdvantage",
    "algorithm_class",
    "check_config",
    "check_run_dir",
    "check_tabular_config",
    "check_env_name",
    "epochs_and_minibatches",
    "evaluate",
    "load_checkpoint",
    "make_algorithm",
    "make_env",
    "make_logger",
    "make_loss",
    "make_networks",
    "clip_gradients",
    "make_optimizer",
    "make_summary",
    "minibatches",
    "mlp",
    "new_obs_stats",
    "new_return_stats",
    "normalize_advantage",
    "plot_curve",
    "prepare_process",
    "record_missing_pandas",
    "resolve_env_engine",
    "resolve_policy",
    "running_normalise",
    "rng_state",
    "save_checkpoint",
    "scheduled_lr",
    "set_rng_state",
    "truncate_csv_logs",
    "update_running_moments",
]
