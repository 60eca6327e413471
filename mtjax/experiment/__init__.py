"""Experiments: validated configs, single runs, method comparisons and model x method x seed grids (`mtjax`)."""

from mtjax.experiment._config import ConfigError
from mtjax.experiment._config import ExperimentConfig
from mtjax.experiment._config import TrainConfig
from mtjax.experiment._config import from_dict
from mtjax.experiment._config import load
from mtjax.experiment._config import parse_method

DEFAULT_COMPARE = {
  "name": "default",
  "data": {"name": "conflicting", "num_samples": 20000, "seed": 0, "task_types": ["binary", "binary", "regression"]},
  "model": {"name": "mmoe", "num_experts": 4, "expert": [64, 32], "tower": [16, 1]},
  "method": {"name": "linear"},
  "optimizer": {"name": "adam", "learning_rate": 0.003},
  "train": {"steps": 600, "batch_size": 256, "log_every": 10, "eval_every": 50},  # validation curves
  "seeds": [0, 1],
}
"""The embedded default of ``mtjax compare``: a small MMoE on 3 synthetic partly conflicting tasks,
two click-like binary tasks and a watch-time-like regression task on a 10x scale
(:func:`mtjax.data.conflicting_tasks`): with plain summed losses the regression task dominates
the shared parameters, which gradient methods trade off differently."""

DEFAULT_METHODS = ("linear", "pcgrad", "gradvac", "mgda", "pareto_ltr", "gradnorm", "dwa", "uncertainty")


def __getattr__(name):  # the runner imports jax-heavy modules: load on first use
  if name in ("run", "compare", "load_data", "build_model", "build_tx", "RunResult"):
    from mtjax.experiment import _runner

    return getattr(_runner, name)
  if name in (
    "compare_grid",
    "GridResult",
    "PairedStats",
    "MethodStats",
    "paired_stats",
    "difference_stats",
    "grid_statistics",
    "delta_m_per_seed",
    "sign_flip_p",
    "markdown_table",
  ):
    from mtjax.experiment import _grid

    return getattr(_grid, name)
  raise AttributeError(name)


__all__ = (
  "ConfigError",
  "DEFAULT_COMPARE",
  "DEFAULT_METHODS",
  "ExperimentConfig",
  "TrainConfig",
  "from_dict",
  "load",
  "parse_method",
)
