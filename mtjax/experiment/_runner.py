"""Running experiments: one configuration (`run`) or one model under several methods (`compare`)."""

from __future__ import annotations

import dataclasses
import inspect
import json
import os
import re
import warnings
import time
from typing import Any, Optional, Sequence

import numpy as np
import optax

from mtjax import metrics as metrics_lib
from mtjax import training
from mtjax.experiment import _config
from mtjax.experiment import _registry as reg

SPLIT = (0.7, 0.15, 0.15)  # train / validation / test of a dataset that comes as one piece
VALID_FRACTION = 0.1  # of the training file, when a loader gives train and test only
SPLIT_SEED = 1234  # splits are fixed (independent of the run seed), so every run sees the same data


@dataclasses.dataclass
class RunResult:
  config: dict
  seed: int
  method: str
  test: dict  # per-task metrics on the test split
  valid: Optional[dict]
  ms_per_step: float
  history: list
  out_dir: Optional[str]
  partition: Optional[dict] = None  # shared / task-specific layers and parameter counts (see partition())


def load_data(cfg: _config.ExperimentConfig):
  """``(train, valid, test)`` for the config's dataset: a fixed, seeded split (independent of the run seed).

  * A loader that gives train, validation and test: used as given.
  * Train and test (the official split of a public dataset): test is kept whole, and validation
    is ``VALID_FRACTION`` of the training file, drawn stratified (below).
  * One piece (synthetic data): ``SPLIT`` = 70 / 15 / 15 %, stratified.

  Stratified: every split gets the same share (up to rounding) of each joint pattern of the binary
  tasks' labels (:meth:`mtjax.data.MultiTaskDataset.split`), never "first half / second half" of
  a file. An empty split is a :class:`ConfigError`; a binary task without a positive or without
  a negative in a split gets a warning (its AUC there is undefined).
  """
  kwargs = {k: v for k, v in cfg.data.items() if k != "name"}
  out = reg.DATASETS[cfg.data["name"]](**kwargs)
  if isinstance(out, dict):  # file loaders return named splits
    train, valid, test = out.get("train"), out.get("validation", out.get("valid")), out.get("test")
    if train is None or test is None:
      raise _config.ConfigError(f"data {cfg.data['name']!r} gave splits {sorted(out)}; need train and test")
    out = (train, valid, test) if valid is not None else (train, test)
  if isinstance(out, tuple) and len(out) == 3:
    splits = out
  elif isinstance(out, tuple) and len(out) == 2:
    train, test = out
    train, valid = train.split((1 - VALID_FRACTION, VALID_FRACTION), seed=SPLIT_SEED, stratify=True)
    splits = (train, valid, test)
  else:
    splits = out.split(SPLIT, seed=SPLIT_SEED, stratify=True)
  check_splits(cfg.data["name"], splits)
  return splits


def check_splits(name: str, splits) -> None:
  """Empty splits -> ConfigError; a binary task with one class only in a split -> a warning."""
  for label, ds in zip(("train", "validation", "test"), splits):
    if len(ds) == 0:
      raise _config.ConfigError(f"data {name!r}: the {label} split is empty; give the dataset more samples")
    for t, (task, kind) in enumerate(zip(ds.task_names, ds.task_types)):
      if kind != "binary":
        continue
      y = ds.labels[t] if ds.masks is None else ds.labels[t][ds.masks[t]]
      pos = int(np.sum(y > 0.5))
      if pos == 0 or pos == len(y):
        warnings.warn(f"mtjax: data {name!r}: task {task!r} has {'no positive' if pos == 0 else 'no negative'} "
                      f"label among the {len(y)} labelled samples of the {label} split; its AUC there is "
                      "undefined (reported as n/a and left out of the averages).", stacklevel=3)


def build_model(cfg: _config.ExperimentConfig, train):
  kwargs = {k: v for k, v in cfg.model.items() if k != "name"}
  kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()}
  cls = reg.model_class(cfg.model["name"])
  fields = {f.name for f in dataclasses.fields(cls)}
  if "num_tasks" in fields:
    kwargs["num_tasks"] = train.num_tasks
  if "features" in fields and train.spec is not None:
    kwargs["features"] = train.spec
  try:
    return cls(**kwargs)
  except TypeError as e:
    raise _config.ConfigError(f"model {cfg.model['name']!r}: {e}") from None


def partition(cfg: _config.ExperimentConfig, model):
  """The ``shared=`` mask of a run: ``method.shared`` (default ``"model"``: the partition the model
  declares, see :func:`mtjax.models.partition`; ``"all"``: every parameter shared; or a table
  ``{include = [...], exclude = [...]}`` of parameter-path patterns)."""
  from mtjax._src import partition as partition_lib

  try:
    return partition_lib.resolve(cfg.method.get("shared", "model"), model)
  except ValueError as e:
    raise _config.ConfigError(f"method.{str(e).removeprefix('mtjax: ')}") from None


def needs_meta_loss(cfg: _config.ExperimentConfig) -> bool:
  """Whether the config's method takes a meta loss on a validation batch (``mtjax.auto_lambda``)."""
  return "meta_loss_fn" in inspect.signature(reg.METHODS[cfg.method["name"]]).parameters


def build_tx(cfg: _config.ExperimentConfig, *, num_tasks: int, seed: int, steps_per_epoch: int, shared=None,
             meta_loss_fn=None):
  """The optax chain ``method -> optimizer`` of a config; ``shared`` is the mask from :func:`partition`.

  A method with a meta loss (``mtjax.auto_lambda``) gets ``meta_loss_fn`` (:func:`run` passes the
  model's validation losses, ``mtjax.training.validation_loss_fn``) and, unless the config sets it,
  ``virtual_lr`` = the optimizer's learning rate."""
  name = cfg.method["name"]
  factory = reg.METHODS[name]
  kwargs = {k: v for k, v in cfg.method.items()
            if k not in ("name", "shared") and k not in _config.AMORTIZE_KEYS}
  params = inspect.signature(factory).parameters
  if "meta_loss_fn" in params:
    if meta_loss_fn is None:
      raise _config.ConfigError(f"method {name!r} needs the model's loss on a validation batch: "
                                "build_tx(..., meta_loss_fn=mtjax.training.validation_loss_fn(model, ...))")
    kwargs["meta_loss_fn"] = meta_loss_fn
    if "virtual_lr" in params and "virtual_lr" not in kwargs:
      kwargs["virtual_lr"] = float(cfg.optimizer.get("learning_rate", 1e-3))
  if "shared" in params and shared is not None:
    kwargs["shared"] = shared
  if "num_tasks" in params:
    kwargs["num_tasks"] = num_tasks
  if "key" in params and "key" not in kwargs:
    kwargs["key"] = seed
  if "steps_per_epoch" in params and "steps_per_epoch" not in kwargs:
    kwargs["steps_per_epoch"] = steps_per_epoch
  if name == "pareto_ltr" and "lower_bounds" not in kwargs:
    kwargs["lower_bounds"] = [0.5 / num_tasks] * num_tasks  # each task keeps half its uniform share
  try:
    method = factory(**kwargs)
    if amortized_every(cfg) > 1 or cfg.method.get("ema") is not None:
      from mtjax.transforms import amortized
      method = amortized(method, every=amortized_every(cfg), ema=cfg.method.get("ema"))
  except (TypeError, ValueError) as e:
    raise _config.ConfigError(f"method {name!r}: {e}") from None
  opt_kwargs = {k: v for k, v in cfg.optimizer.items() if k != "name"}
  opt_kwargs.setdefault("learning_rate", 1e-3)
  return optax.chain(method, reg.OPTIMIZERS[cfg.optimizer["name"]](**opt_kwargs))


def amortized_every(cfg: _config.ExperimentConfig) -> int:
  """``method.every`` (1 when the method is not amortized)."""
  return int(cfg.method.get("every", 1))


def model_loss(cfg: _config.ExperimentConfig):
  """``(task_losses, multi_task_loss)`` for the model: funnel models train on their entire-space loss."""
  from mtjax import losses

  special = getattr(losses, f"{cfg.model['name']}_loss", None)
  if special is not None and cfg.model["name"] in ("esmm", "esm2", "aitm"):
    return None, special
  return None, None


def track_similarity(cfg: _config.ExperimentConfig) -> bool:
  """Whether a run logs task-gradient similarity: off when it would cost the rows that amortized
  weights (``method.every > 1``) or the subset strategy exist to avoid."""
  return cfg.train.track_similarity and amortized_every(cfg) == 1 and cfg.train.strategy != "subset"


def run(cfg: _config.ExperimentConfig, *, seed: Optional[int] = None, out_dir: Optional[str] = None,
        progress: bool = True, data=None, plots: bool = True, from_step: Optional[int] = None) -> RunResult:
  """Trains one configuration and evaluates it on the test split; writes results to ``out_dir``."""
  seed = cfg.train.seed if seed is None else seed
  train, valid, test = data if data is not None else load_data(cfg)
  if cfg.train.batch_size > len(train):
    raise _config.ConfigError(f"train.batch_size {cfg.train.batch_size} is larger than the training split "
                              f"({len(train)} samples)")
  model = build_model(cfg, train)
  shared = partition(cfg, model)
  parts = _config.micro_batches(cfg)  # MoDo / SDMGrad: independent micro-batches per step
  task_losses, multi = model_loss(cfg)
  meta = None
  if needs_meta_loss(cfg):  # Auto-Lambda: the model's losses on a second, reshuffled pass over the training set
    from mtjax.training._train import default_task_losses  # pylint: disable=import-outside-toplevel
    specs = task_losses if task_losses is not None or multi is not None else default_task_losses(train.task_types)
    meta = training.validation_loss_fn(model, specs, multi_task_loss=multi, masked=train.masks is not None)
  # strategy "rep": the marked representation is the split (trunk below, heads above), so the method gets no mask
  tx = build_tx(cfg, num_tasks=train.num_tasks, seed=seed, steps_per_epoch=max(1, len(train) // cfg.train.batch_size),
                shared=None if cfg.train.strategy == "rep" else shared, meta_loss_fn=meta)
  writers = []
  if cfg.train.tensorboard:
    if out_dir:
      writers.append(training.TensorBoardWriter(os.path.join(out_dir, "tensorboard")))
    else:
      warnings.warn("mtjax: train.tensorboard = true writes into the run's output folder, and this run has none "
                    "(out_dir=None): no TensorBoard event files are written.", stacklevel=2)
  res = training.fit(model, tx, train, steps=cfg.train.steps, batch_size=cfg.train.batch_size, seed=seed,
                     strategy=cfg.train.strategy, task_losses=task_losses, multi_task_loss=multi, eval_ds=valid,
                     eval_every=cfg.train.eval_every, eval_batch_size=cfg.train.eval_batch_size,
                     log_every=cfg.train.log_every, out_dir=out_dir, checkpoint_every=cfg.train.checkpoint_every,
                     progress=progress, track_similarity=track_similarity(cfg), config=cfg.to_dict(),
                     desc=f"{cfg.method['name']} s{seed}", sparse=cfg.train.sparse,
                     chunk_size=cfg.train.chunk_size or None, rep_gram=cfg.train.rep_gram, from_step=from_step,
                     shared=shared, similarity_granularity=cfg.train.similarity,
                     keep_checkpoints=cfg.train.keep_checkpoints, validation_ds=train if meta is not None else None,
                     micro_batches=parts, writers=writers)
  test_metrics = training.evaluate(model, res.state, test, batch_size=cfg.train.eval_batch_size)
  history = res.history
  if out_dir:  # after a resume the log file holds the whole run, the in-memory history only its end
    with open(os.path.join(out_dir, "log.jsonl")) as f:
      history = [r for r in map(json.loads, f) if "losses" in r]
  from mtjax._src import partition as partition_lib
  split = partition_lib.describe(shared, res.state.params)
  result = RunResult(config=cfg.to_dict(), seed=seed, method=cfg.method["name"], test=test_metrics,
                     valid=res.final_eval, ms_per_step=res.ms_per_step, history=history, out_dir=out_dir,
                     partition=split)
  if out_dir:
    with open(os.path.join(out_dir, "results.json"), "w") as f:
      json.dump({"config": result.config, "seed": seed, "test": test_metrics, "valid": res.final_eval,
                 "ms_per_step": res.ms_per_step, "partition": split}, f, indent=1, default=float)
    if plots:
      plot_learning_curves({cfg.method["name"]: [result]}, train.task_names, os.path.join(out_dir, "learning_curves.png"))
      if any("cosine" in r for r in history):
        plot_similarity(history, train.task_names, os.path.join(out_dir, "similarity.png"))
  return result


def _primary(task_type: str) -> tuple[str, bool]:
  """The table metric of a task and whether lower is better."""
  return ("auc", False) if task_type == "binary" else ("mse", True)


def compare(cfg: _config.ExperimentConfig, methods: Sequence[dict], *, seeds: Sequence[int],
            out_dir: Optional[str] = None, progress: bool = True, baseline: str = "linear", echo=print) -> dict:
  """Trains ``cfg``'s model with every method (and seed) on the same data; returns and prints a table.

  The table has, per method: the test metric of every task (AUC for binary tasks, MSE for
  regression; mean over seeds, with the std when there are several), the macro average, Delta_m%
  against ``baseline`` (linear scalarization by default) and the median ms/step.
  """
  data = load_data(cfg)
  train = data[0]
  names = list(train.task_names)
  prim = [_primary(t) for t in train.task_types]
  results: dict[str, list[RunResult]] = {}
  for m in methods:
    label = m.get("label", m["name"])
    mcfg = cfg.replace(method={k: v for k, v in m.items() if k != "label"}, name=f"{cfg.name}-{label}")
    for s in seeds:
      sub = os.path.join(out_dir, label, f"seed_{s}") if out_dir else None
      res = run(mcfg, seed=s, out_dir=sub, progress=progress, data=data, plots=False)
      results.setdefault(label, []).append(res)
      scores = ", ".join(f"{n} {p[0]} {res.test[n][p[0]]:.4f}" for n, p in zip(names, prim))
      echo(f"  {label:<12s} seed {s}: {scores}; {res.ms_per_step:.2f} ms/step")
  table = summarize(results, names, prim, baseline=baseline)
  split = next(iter(results.values()))[0].partition
  text = format_table(table, names, prim, seeds=len(seeds), baseline=baseline) + "\n\n" + partition_note(split)
  echo(text)
  if out_dir:
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "table.md"), "w") as f:
      f.write(text + "\n")
    with open(os.path.join(out_dir, "results.json"), "w") as f:
      json.dump({"config": cfg.to_dict(), "methods": list(methods), "seeds": list(seeds), "table": table,
                 "partition": split}, f, indent=1, default=float)
    plot_learning_curves(results, names, os.path.join(out_dir, "learning_curves.png"))
  return {"table": table, "results": results, "text": text}


def partition_note(split: Optional[dict]) -> str:
  """One line saying which parameters the methods compared tasks on."""
  if not split:
    return ""
  total = split["shared_params"] + split["task_specific_params"]
  if not split["task_specific_layers"]:
    return f"Task gradients compared on all {total:,} parameters (no task-specific parameters)."
  groups = sorted({re.sub(r"\d+", "*", name) for name in split["task_specific_layers"]})
  return (f"Task gradients compared on the {split['shared_params']:,} shared of {total:,} parameters; "
          f"task-specific: {', '.join(groups)}.")


def macro_metric(prim) -> str:
  """The metric the macro column averages: the primary metric of most tasks (AUC on a tie).

  Tasks with another metric (e.g. the MSE of a regression task next to binary tasks) are left out
  of the macro average -- averaging an AUC with an MSE means nothing; Delta_m% covers every task.
  """
  kinds = [p[0] for p in prim]
  return max(sorted(set(kinds)), key=lambda k: (kinds.count(k), k == "auc"))


def summarize(results: dict, names: Sequence[str], prim, *, baseline: str) -> dict:
  """Per method: mean/std over seeds of each task's metric, macro average and Delta_m%.

  An undefined metric (NaN: the AUC of a task without positives in the test split) is left out:
  the mean is over the seeds where it is defined, and the macro average and Delta_m% are over the
  tasks defined for both the method and the baseline (listed in ``delta_m_tasks``).
  """
  table = {}
  macro = macro_metric(prim)
  in_macro = np.array([p[0] == macro for p in prim])
  for label, runs in results.items():
    per_task = np.array([[r.test[n][p[0]] for n, p in zip(names, prim)] for r in runs], np.float64)  # [S, T]
    with warnings.catch_warnings():
      warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns: NaN, said in the table as n/a
      mean, std = np.nanmean(per_task, 0), np.nanstd(per_task, 0)
      macro_value = float(np.nanmean(mean[in_macro])) if np.any(np.isfinite(mean[in_macro])) else float("nan")
    table[label] = {"mean": mean.tolist(), "std": std.tolist(), "macro": macro_value, "macro_metric": macro,
                    "ms_per_step": float(np.median([r.ms_per_step for r in runs])), "per_seed": per_task.tolist()}
  base_label = baseline if baseline in table else next(iter(table))
  base = np.asarray(table[base_label]["mean"])
  lower = np.array([p[1] for p in prim])
  for label, row in table.items():
    mean = np.asarray(row["mean"])
    ok = np.isfinite(mean) & np.isfinite(base) & (base != 0)
    row["delta_m_tasks"] = [n for n, k in zip(names, ok) if k]
    row["delta_m"] = (float(metrics_lib.delta_m(mean[ok], base[ok], lower_is_better=lower[ok])) if ok.any()
                      else float("nan"))
  table["_baseline"] = base_label
  return table


def format_table(table: dict, names, prim, *, seeds: int, baseline: str) -> str:
  metric_names = [f"{n} {p[0].upper()}" for n, p in zip(names, prim)]
  header = ["method"] + metric_names + [f"macro {macro_metric(prim).upper()}", f"Δm% vs {table['_baseline']}",
                                        "ms/step"]
  rows = []
  for label, row in table.items():
    if label.startswith("_"):
      continue
    cells = [label]
    for mu, sd in zip(row["mean"], row["std"]):
      cells.append("n/a" if not np.isfinite(mu) else f"{mu:.4f}" + (f" ± {sd:.4f}" if seeds > 1 else ""))
    cells += ["n/a" if not np.isfinite(row["macro"]) else f"{row['macro']:.4f}",
              "n/a" if not np.isfinite(row["delta_m"]) else f"{row['delta_m']:+.2f}", f"{row['ms_per_step']:.2f}"]
    rows.append(cells)
  widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
  fmt = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"
  lines = [fmt(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [fmt(r) for r in rows]
  return "\n".join(lines)


def plot_similarity(history: Sequence[dict], names: Sequence[str], path: str) -> None:
  """Task-gradient cosines over training (shared parameters): one curve per task pair and, when
  the log has per-layer cosines (``[train] similarity = "layer"``), the mean pairwise cosine per layer."""
  import matplotlib.pyplot as plt

  recs = [r for r in history if "cosine" in r]
  steps = [r["step"] for r in recs]
  cos = np.asarray([r["cosine"] for r in recs])  # [S, T, T]
  layered = [r for r in recs if "cosine_layers" in r]
  fig, axes = plt.subplots(1, 2 if layered else 1, figsize=(11 if layered else 6, 3.6), squeeze=False)
  ax = axes[0, 0]
  t = cos.shape[-1]
  for i in range(t):
    for j in range(i + 1, t):
      ax.plot(steps, cos[:, i, j], label=f"{names[i]} / {names[j]}")
  ax.axhline(0.0, color="gray", lw=0.8, ls="--")
  ax.set(xlabel="step", ylabel="cosine", title="task-gradient cosine (shared parameters)")
  ax.legend(fontsize=7, loc="best")
  if layered:
    iu = np.triu_indices(t, k=1)
    per_layer = np.asarray([np.asarray(r["cosine_layers"])[:, iu[0], iu[1]].mean(-1) for r in layered])  # [S, K]
    ax = axes[0, 1]
    for k, name in enumerate(layered[0]["layers"]):
      ax.plot([r["step"] for r in layered], per_layer[:, k], label=name)
    ax.axhline(0.0, color="gray", lw=0.8, ls="--")
    ax.set(xlabel="step", ylabel="mean pairwise cosine", title="per shared layer")
    ax.legend(fontsize=6, loc="center left", bbox_to_anchor=(1.0, 0.5))
  fig.tight_layout()
  fig.savefig(path, dpi=110, bbox_inches="tight")
  plt.close(fig)


def plot_learning_curves(results: dict, names: Sequence[str], path: str) -> None:
  """Training loss per task (one panel per task), one curve per method (mean over seeds)."""
  import matplotlib.pyplot as plt  # no backend switch: headless runs get Agg, notebooks keep inline

  t = len(names)
  fig, axes = plt.subplots(1, t, figsize=(4 * t, 3.2), squeeze=False)
  for label, runs in results.items():
    hist = [r.history for r in runs if r.history]
    if not hist:
      continue
    n = min(len(h) for h in hist)
    steps = [rec["step"] for rec in hist[0][:n]]
    losses = np.mean([[rec["losses"] for rec in h[:n]] for h in hist], axis=0)  # [n, T]
    for k in range(t):
      y = losses[:, k]
      w = max(1, len(y) // 20)
      smooth = np.convolve(y, np.ones(w) / w, mode="valid")
      axes[0, k].plot(steps[w - 1:], smooth, label=label)
  for k, name in enumerate(names):
    axes[0, k].set_title(name)
    axes[0, k].set_xlabel("step")
    axes[0, k].set_ylabel("train loss")
  if axes[0, -1].get_legend_handles_labels()[0]:
    axes[0, -1].legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
