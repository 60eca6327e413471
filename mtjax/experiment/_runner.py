"""Running experiments: one configuration (`run`) or one model under several methods (`compare`)."""

from __future__ import annotations

import dataclasses
import inspect
import json
import os
import re
import warnings
from typing import Any, Mapping, Optional, Sequence

import numpy as np
import optax

from mtjax import metrics as metrics_lib
from mtjax import training
from mtjax.experiment import _config
from mtjax.experiment import _registry as reg
from mtjax.experiment._grid import markdown_table

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
  evals: list = dataclasses.field(default_factory=list)  # validation metrics [{"step", "eval"}], every eval_every + end


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
  return load_splits(cfg.data)


def load_splits(data_table: Mapping[str, Any]):
  """:func:`load_data` of a ``[data]`` table alone (``{'name': ..., **arguments}``)."""
  name = data_table["name"]
  kwargs = {k: v for k, v in data_table.items() if k != "name"}
  out = reg.DATASETS[name](**kwargs)
  if isinstance(out, dict):  # file loaders return named splits
    train, valid, test = out.get("train"), out.get("validation", out.get("valid")), out.get("test")
    if train is None or test is None:
      raise _config.ConfigError(f"data {name!r} gave splits {sorted(out)}; need train and test")
    out = (train, valid, test) if valid is not None else (train, test)
  if isinstance(out, tuple) and len(out) == 3:
    splits = out
  elif isinstance(out, tuple) and len(out) == 2:
    train, test = out
    train, valid = train.split((1 - VALID_FRACTION, VALID_FRACTION), seed=SPLIT_SEED, stratify=True)
    splits = (train, valid, test)
  else:
    splits = out.split(SPLIT, seed=SPLIT_SEED, stratify=True)
  check_splits(name, splits)
  return splits


def convert_data(data_table: Mapping[str, Any], out: str, *, overwrite: bool = False) -> str:
  """Converts a ``[data]`` table's dataset once into a store folder (``mtjax convert``); returns its path.

  AliExpress files are converted chunk by chunk (:func:`mtjax.data.aliexpress_to_store`: bounded
  memory, the runner draws the validation part from the training split when it opens the store, as
  it does in memory); every other dataset is loaded as the runner would load it and its
  train / validation / test splits written (:func:`mtjax.data.write_store`). Training from
  ``[data] name = "store", path = out`` then sees the same splits as training from the table itself.
  """
  from mtjax import data as data_lib  # pylint: disable=import-outside-toplevel

  name = data_table.get("name")
  if name not in reg.DATASETS:
    raise _config.ConfigError(f"data: unknown dataset {name!r}; known: {', '.join(reg.DATASETS)}")
  kwargs = {k: v for k, v in data_table.items() if k != "name"}
  _config.check_kwargs("data", reg.DATASETS[name], kwargs, reserved=reg.DATA_RESERVED)
  if name == "store":
    raise _config.ConfigError("data: the [data] table already names a store; nothing to convert")
  if name == "aliexpress":
    return data_lib.aliexpress_to_store(out=out, overwrite=overwrite, **kwargs)
  train, valid, test = load_splits(data_table)
  return data_lib.write_store({"train": train, "validation": valid, "test": test}, out, overwrite=overwrite)


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
        warnings.warn(
          f"mtjax: data {name!r}: task {task!r} has {'no positive' if pos == 0 else 'no negative'} "
          f"label among the {len(y)} labelled samples of the {label} split; its AUC there is "
          "undefined (reported as n/a and left out of the averages).",
          stacklevel=3,
        )


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


def build_tx(
  cfg: _config.ExperimentConfig, *, num_tasks: int, seed: int, steps_per_epoch: int, shared=None, meta_loss_fn=None
):
  """The optax chain ``method -> optimizer`` of a config; ``shared`` is the mask from :func:`partition`.

  A method with a meta loss (``mtjax.auto_lambda``) gets ``meta_loss_fn`` (:func:`run` passes the
  model's validation losses, ``mtjax.training.validation_loss_fn``) and, unless the config sets it,
  ``virtual_lr`` = the optimizer's learning rate."""
  name = cfg.method["name"]
  factory = reg.METHODS[name]
  kwargs = {k: v for k, v in cfg.method.items() if k not in ("name", "shared") and k not in _config.AMORTIZE_KEYS}
  params = inspect.signature(factory).parameters
  if "meta_loss_fn" in params:
    if meta_loss_fn is None:
      raise _config.ConfigError(
        f"method {name!r} needs the model's loss on a validation batch: "
        "build_tx(..., meta_loss_fn=mtjax.training.validation_loss_fn(model, ...))"
      )
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


# The funnel models whose losses and metrics cover every impression (the entire space).
ENTIRE_SPACE_MODELS = ("esmm", "escm2", "esm2", "aitm")


def model_loss(cfg: _config.ExperimentConfig):
  """``(task_losses, multi_task_loss)`` for the model: funnel models train on their entire-space loss."""
  from mtjax import losses

  if cfg.model["name"] == "escm2":  # ESMM's model with its counterfactual loss, set in [model]
    return None, reg.models.get("escm2", **{k: v for k, v in cfg.model.items() if k != "name"}).loss()
  special = getattr(losses, f"{cfg.model['name']}_loss", None)
  if special is not None and cfg.model["name"] in ENTIRE_SPACE_MODELS:
    return None, special
  return None, None


def entire_space(ds):
  """``ds`` with every task's mask set to the first task's (the impressions), for the entire-space funnel
  models: they train and are scored on every impression (ESMM's pCTCVR against click & conversion),
  while a funnel data set's mask of a later task marks its post-click sample space (the clicks).
  Without masks, ``ds`` itself."""
  if ds.masks is None:
    return ds
  masks = np.broadcast_to(np.asarray(ds.masks[0], bool)[None], np.shape(ds.masks)).copy()
  return dataclasses.replace(ds, masks=masks)


def track_similarity(cfg: _config.ExperimentConfig) -> bool:
  """Whether a run logs task-gradient similarity: off when it would cost the rows that amortized
  weights (``method.every > 1``) or the subset strategy exist to avoid."""
  return cfg.train.track_similarity and amortized_every(cfg) == 1 and cfg.train.strategy != "subset"


def run(
  cfg: _config.ExperimentConfig,
  *,
  seed: Optional[int] = None,
  out_dir: Optional[str] = None,
  progress: bool = True,
  data=None,
  plots: bool = True,
  from_step: Optional[int] = None,
  mesh=None,
) -> RunResult:
  """Trains one configuration and evaluates it on the test split; writes results to ``out_dir``.

  ``mesh``: data-parallel training over its devices (see :func:`mtjax.training.fit`). In a
  multi-host run (``jax.distributed``, e.g. ``mtjax run CONFIG --distributed``) the default is a
  mesh over every process's devices (``jax.devices()``, axis ``"data"``; ``train.batch_size`` must
  be a multiple of their number); every process trains and evaluates, process 0 writes the files
  and the others return the same result from memory.
  """
  import jax  # pylint: disable=import-outside-toplevel

  multihost = jax.process_count() > 1
  primary = jax.process_index() == 0
  if multihost and mesh is None:
    mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
  seed = cfg.train.seed if seed is None else seed
  train, valid, test = data if data is not None else load_data(cfg)
  if cfg.model["name"] in ENTIRE_SPACE_MODELS:  # their losses and metrics cover every impression
    train, valid, test = (entire_space(d) for d in (train, valid, test))
  if cfg.train.batch_size > len(train):
    raise _config.ConfigError(
      f"train.batch_size {cfg.train.batch_size} is larger than the training split ({len(train)} samples)"
    )
  model = build_model(cfg, train)
  shared = partition(cfg, model)
  parts = _config.micro_batches(cfg)  # MoDo / SDMGrad: independent micro-batches per step
  task_losses, multi = model_loss(cfg)
  meta = None
  if needs_meta_loss(cfg):  # Auto-Lambda: the model's losses on a second, reshuffled pass over the training set
    from mtjax.training._train import default_task_losses  # pylint: disable=import-outside-toplevel

    specs = task_losses if task_losses is not None or multi is not None else default_task_losses(train.task_types)
    meta = training.validation_loss_fn(
      model, specs, multi_task_loss=multi, masked=train.masks is not None, precision=cfg.train.precision
    )
  # strategy "rep": the marked representation is the split (trunk below, heads above), so the method gets no mask
  tx = build_tx(
    cfg,
    num_tasks=train.num_tasks,
    seed=seed,
    steps_per_epoch=max(1, len(train) // cfg.train.batch_size),
    shared=None if cfg.train.strategy == "rep" else shared,
    meta_loss_fn=meta,
  )
  writers = []
  if cfg.train.tensorboard and primary:
    if out_dir:
      writers.append(training.TensorBoardWriter(os.path.join(out_dir, "tensorboard")))
    else:
      warnings.warn(
        "mtjax: train.tensorboard = true writes into the run's output folder, and this run has none "
        "(out_dir=None): no TensorBoard event files are written.",
        stacklevel=2,
      )
  res = training.fit(
    model,
    tx,
    train,
    steps=cfg.train.steps,
    batch_size=cfg.train.batch_size,
    seed=seed,
    strategy=cfg.train.strategy,
    task_losses=task_losses,
    multi_task_loss=multi,
    eval_ds=valid,
    eval_every=cfg.train.eval_every,
    eval_batch_size=cfg.train.eval_batch_size,
    log_every=cfg.train.log_every,
    out_dir=out_dir,
    checkpoint_every=cfg.train.checkpoint_every,
    progress=progress,
    track_similarity=track_similarity(cfg),
    config=cfg.to_dict(),
    desc=f"{cfg.method['name']} s{seed}",
    sparse=cfg.train.sparse,
    chunk_size=cfg.train.chunk_size or None,
    rep_gram=cfg.train.rep_gram,
    from_step=from_step,
    shared=shared,
    similarity_granularity=cfg.train.similarity,
    keep_checkpoints=cfg.train.keep_checkpoints,
    validation_ds=train if meta is not None else None,
    micro_batches=parts,
    writers=writers,
    precision=cfg.train.precision,
    mesh=mesh,
  )
  test_metrics = training.evaluate(
    model, res.state, test, batch_size=cfg.train.eval_batch_size, precision=cfg.train.precision
  )
  history = res.history
  evals = [{"step": int(s), "eval": ev} for s, ev in res.evals]
  if out_dir and primary:  # after a resume the log file holds the whole run, the in-memory history only its end
    with open(os.path.join(out_dir, "log.jsonl")) as f:
      records = list(map(json.loads, f))
    history = [r for r in records if "losses" in r]
    evals = [r for r in records if "eval" in r]
  from mtjax._src import partition as partition_lib

  split = partition_lib.describe(shared, res.state.params)
  result = RunResult(
    config=cfg.to_dict(),
    seed=seed,
    method=cfg.method["name"],
    test=test_metrics,
    valid=res.final_eval,
    ms_per_step=res.ms_per_step,
    history=history,
    out_dir=out_dir,
    partition=split,
    evals=evals,
  )
  if out_dir and primary:
    with open(os.path.join(out_dir, "results.json"), "w") as f:
      json.dump(
        {
          "config": result.config,
          "seed": seed,
          "test": test_metrics,
          "valid": res.final_eval,
          "ms_per_step": res.ms_per_step,
          "partition": split,
          "precision": training.Precision.from_name(cfg.train.precision).name,
        },
        f,
        indent=1,
        default=float,
      )
    if plots:
      plot_learning_curves(
        {cfg.method["name"]: [result]}, train.task_names, os.path.join(out_dir, "learning_curves.png")
      )
      if any("cosine" in r for r in history):
        plot_similarity(history, train.task_names, os.path.join(out_dir, "similarity.png"))
  return result


def _primary(task_type: str) -> tuple[str, bool]:
  """The table metric of a task and whether lower is better."""
  return ("auc", False) if task_type == "binary" else ("mse", True)


def compare(
  cfg: _config.ExperimentConfig,
  methods: Sequence[dict],
  *,
  seeds: Sequence[int],
  out_dir: Optional[str] = None,
  progress: bool = True,
  baseline: str = "linear",
  echo=print,
) -> dict:
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
  echo("")  # a blank line before the table: a markdown block of its own
  echo(text)
  if out_dir:
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "table.md"), "w") as f:
      f.write(text + "\n")
    with open(os.path.join(out_dir, "results.json"), "w") as f:
      json.dump(
        {"config": cfg.to_dict(), "methods": list(methods), "seeds": list(seeds), "table": table, "partition": split},
        f,
        indent=1,
        default=float,
      )
    plot_learning_curves(results, names, os.path.join(out_dir, "learning_curves.png"))
  return {"table": table, "results": results, "text": text, "task_names": names, "primary": prim}


def partition_note(split: Optional[dict]) -> str:
  """One line saying which parameters the methods compared tasks on."""
  if not split:
    return ""
  total = split["shared_params"] + split["task_specific_params"]
  if not split["task_specific_layers"]:
    return f"Task gradients compared on all {total:,} parameters (no task-specific parameters)."
  groups = sorted({re.sub(r"\d+", "*", name) for name in split["task_specific_layers"]})
  return (
    f"Task gradients compared on the {split['shared_params']:,} shared of {total:,} parameters; "
    f"task-specific: {', '.join(groups)}."
  )


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
    table[label] = {
      "mean": mean.tolist(),
      "std": std.tolist(),
      "macro": macro_value,
      "macro_metric": macro,
      "ms_per_step": float(np.median([r.ms_per_step for r in runs])),
      "per_seed": per_task.tolist(),
    }
  base_label = baseline if baseline in table else next(iter(table))
  base = np.asarray(table[base_label]["mean"])
  lower = np.array([p[1] for p in prim])
  for row in table.values():
    mean = np.asarray(row["mean"])
    ok = np.isfinite(mean) & np.isfinite(base) & (base != 0)
    row["delta_m_tasks"] = [n for n, k in zip(names, ok) if k]
    row["delta_m"] = (
      float(metrics_lib.delta_m(mean[ok], base[ok], lower_is_better=lower[ok])) if ok.any() else float("nan")
    )
  table["_baseline"] = base_label
  return table


def format_table(table: dict, names, prim, *, seeds: int, baseline: str) -> str:
  metric_names = [f"{n} {p[0].upper()}" for n, p in zip(names, prim)]
  header = (
    ["method"] + metric_names + [f"macro {macro_metric(prim).upper()}", f"Δm% vs {table['_baseline']}", "ms/step"]
  )
  rows = []
  for label, row in table.items():
    if label.startswith("_"):
      continue
    cells = [label]
    for mu, sd in zip(row["mean"], row["std"]):
      cells.append("n/a" if not np.isfinite(mu) else f"{mu:.4f}" + (f" ± {sd:.4f}" if seeds > 1 else ""))
    cells += [
      "n/a" if not np.isfinite(row["macro"]) else f"{row['macro']:.4f}",
      "n/a" if not np.isfinite(row["delta_m"]) else f"{row['delta_m']:+.2f}",
      f"{row['ms_per_step']:.2f}",
    ]
    rows.append(cells)
  lines = [markdown_table(header, rows)]
  if any("n/a" in r for r in rows):
    lines += [
      "",
      "n/a: undefined (e.g. an AUC without both classes in the test split in every seed); left out of "
      "the macro average and Δm%.",
    ]
  return "\n".join(lines)


def plot_similarity(history: Sequence[dict], names: Sequence[str], path: Optional[str]):
  """Task-gradient cosines over training (shared parameters): one curve per task pair and, when
  the log has per-layer cosines (``[train] similarity = "layer"``), the mean pairwise cosine per layer.
  Returns the figure when ``path`` is None (else saves and closes it)."""
  from mtjax._src import plotting

  plt = plotting.pyplot()
  recs = [r for r in history if "cosine" in r]
  steps = [r["step"] for r in recs]
  cos = np.asarray([r["cosine"] for r in recs])  # [S, T, T]
  layered = [r for r in recs if "cosine_layers" in r]
  nlayers = len(layered[0]["layers"]) if layered else 0
  fig, axes = plt.subplots(
    1,
    2 if layered else 1,
    figsize=(11.5 if layered else 5.2, max(3.4, 0.22 * nlayers + 1.4)),
    squeeze=False,
    gridspec_kw={"width_ratios": [1, 1.25]} if layered else None,
  )
  ax = axes[0, 0]
  t = cos.shape[-1]
  window = max(1, round(len(steps) / 12))  # moving average over ~8 % of training
  pairs = [(i, j) for i in range(t) for j in range(i + 1, t)]
  colours = plotting.task_colors(len(pairs))
  for (i, j), c in zip(pairs, colours):
    ax.plot(steps, cos[:, i, j], color=c, lw=0.6, alpha=0.35)
    ax.plot(steps, plotting.smooth(cos[:, i, j], window), color=c, lw=1.6, label=f"{names[i]} / {names[j]}")
  ax.axhline(0.0, color="gray", lw=0.8, ls="--")
  ax.set(xlabel="step", ylabel="cosine")
  ax.grid(alpha=0.25)
  ax.set_title("task-gradient cosine per task pair\n(shared parameters; thin: raw, thick: moving average)", fontsize=9)
  ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(0.0, -0.22), ncol=min(3, len(pairs)), frameon=False)
  if layered:  # one row per shared layer: a heat map reads where 10+ overlapping curves would not
    iu = np.triu_indices(t, k=1)
    per_layer = np.asarray([np.asarray(r["cosine_layers"])[:, iu[0], iu[1]].mean(-1) for r in layered])  # [S, K]
    per_layer = plotting.smooth(per_layer.T, window)  # [K, S]
    layer_names = [plotting.short_label(n, 30) for n in layered[0]["layers"]]
    lsteps = [r["step"] for r in layered]
    lim = max(0.05, float(np.nanmax(np.abs(per_layer))))
    ax = axes[0, 1]
    im = ax.imshow(
      per_layer,
      aspect="auto",
      cmap="RdBu_r",
      vmin=-lim,
      vmax=lim,
      interpolation="nearest",
      extent=(lsteps[0], lsteps[-1], len(layer_names) - 0.5, -0.5),
    )
    ax.set_yticks(range(len(layer_names)), layer_names, fontsize=max(5.5, 8 - 0.15 * len(layer_names)))
    ax.set_xlabel("step")
    ax.set_title("mean pairwise cosine per shared layer (moving average)", fontsize=9)
    cb = fig.colorbar(im, ax=ax, fraction=0.05, pad=0.02)
    cb.set_label(f"cosine (colour range ±{lim:.2f})", fontsize=8)
    cb.ax.tick_params(labelsize=7)
  fig.tight_layout()
  if path is None:
    return fig
  fig.savefig(path, dpi=130, bbox_inches="tight")
  plt.close(fig)
  return None


def _eval_metric(ev: dict, name: str) -> tuple[str, float]:
  """The validation metric of a task in an evaluation record: AUC (binary) or MSE (regression)."""
  m = ev.get(name, {})
  key = "auc" if "auc" in m else ("mse" if "mse" in m else next(iter(m), ""))
  return key, float(m.get(key, float("nan")))


def plot_learning_curves(
  results: dict, names: Sequence[str], path: Optional[str] = None, *, ncols: int = 4, colors: Optional[dict] = None
):
  """Per task: the training loss (top row, moving average) and the validation metric (AUC for
  binary tasks, MSE for regression; bottom row) over steps, one colour per method, the mean over
  seeds as a line and the min--max over seeds as a band; one legend outside the panels.

  ``results`` is ``{label: [RunResult, ...]}`` (what :func:`compare` returns). Validation points
  are the evaluations of ``train.eval_every`` and the end of training. Returns the figure when
  ``path`` is None (else saves and closes it).
  """
  from mtjax._src import plotting

  plt = plotting.pyplot()
  t = len(names)
  cols = max(1, min(t, ncols))
  blocks = int(np.ceil(t / cols))
  fig, axes = plt.subplots(2 * blocks, cols, figsize=(3.6 * cols, 2.7 * 2 * blocks), squeeze=False)
  loss_ax = [axes[2 * (k // cols), k % cols] for k in range(t)]
  val_ax = [axes[2 * (k // cols) + 1, k % cols] for k in range(t)]
  for k in range(t, blocks * cols):
    axes[2 * (k // cols), k % cols].set_visible(False)
    axes[2 * (k // cols) + 1, k % cols].set_visible(False)
  colors = colors or plotting.method_colors(list(results))
  styles = plotting.method_styles(list(results))
  alpha = plotting.band_alpha(len(results))
  seeds = max((len(runs) for runs in results.values()), default=1)
  val_keys: dict = {}
  end_only = False
  for label, runs in results.items():
    c = colors[label]
    hist = [r.history for r in runs if r.history]
    if hist:
      n = min(len(h) for h in hist)
      steps = np.asarray([rec["step"] for rec in hist[0][:n]])
      losses = np.asarray([[rec["losses"] for rec in h[:n]] for h in hist], np.float64)  # [S, n, T]
      window = max(1, round(n / 15))
      for k in range(t):
        plotting.band(
          loss_ax[k],
          steps,
          plotting.smooth(losses[:, :, k], window),
          color=c,
          label=label,
          ls=styles[label],
          alpha=alpha,
        )
    evals = [getattr(r, "evals", None) or [] for r in runs]
    evals = [e for e in evals if e]
    if evals:
      m = min(len(e) for e in evals)
      esteps = np.asarray([rec["step"] for rec in evals[0][:m]])
      end_only = end_only or m == 1
      for k, name in enumerate(names):
        vals = []
        for e in evals:
          row = [_eval_metric(rec["eval"], name) for rec in e[:m]]
          val_keys.setdefault(name, row[0][0])
          vals.append([v for _, v in row])
        plotting.band(
          val_ax[k], esteps, vals, color=c, label=label, marker="o" if m <= 12 else None, ls=styles[label], alpha=alpha
        )
  for k, name in enumerate(names):
    ax = loss_ax[k]
    ax.set_title(name, fontsize=10)
    ax.set_ylabel("training loss")
    ax.set_xlabel("step")
    lines = ax.get_lines()
    if lines:  # the first steps' loss can be 10x the rest: scale the axis to the curves after the first 5 %
      ys = np.concatenate([ln.get_ydata()[len(ln.get_ydata()) // 20 :] for ln in lines])
      ys = ys[np.isfinite(ys)]
      if ys.size:
        lo, hi = float(ys.min()), float(ys.max())
        pad = 0.08 * (hi - lo or abs(hi) or 1.0)
        ax.set_ylim(lo - pad, hi + pad)
    ax = val_ax[k]
    key = val_keys.get(name)
    if key:
      better = "higher" if key == "auc" else "lower"
      ax.set_ylabel(f"validation {key.upper()} ({better} is better)", fontsize=8.5)
    else:
      ax.text(
        0.5,
        0.5,
        "no validation metrics recorded",
        ha="center",
        va="center",
        transform=ax.transAxes,
        fontsize=8,
        color="gray",
      )
      ax.set_ylabel("validation")
    ax.set_xlabel("step")
  for ax in loss_ax + val_ax:
    ax.grid(alpha=0.25)
    ax.tick_params(labelsize=8)
  note = "validation: evaluated only at the end (set train.eval_every for curves)" if end_only else ""
  title = "training loss (moving average) and validation metric per task"
  title += f"; line: mean, band: min–max over {seeds} seeds" if seeds > 1 else ""
  fig.suptitle(title + ("\n" + note if note else ""), fontsize=10)
  fig.tight_layout()
  plotting.legend_outside(fig, loss_ax, title="method")
  if path is None:
    return fig
  fig.savefig(path, dpi=130, bbox_inches="tight")
  plt.close(fig)
  return None
