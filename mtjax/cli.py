"""The `mtjax` command: `mtjax run CONFIG`, `mtjax compare [CONFIG]`, `mtjax convert CONFIG OUT`, `mtjax list`."""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

USAGE = """examples:
  mtjax compare                                  # the embedded default: MMoE, 3 synthetic conflicting tasks, 8 methods
  mtjax compare --methods linear,pcgrad,mgda --seeds 0 1 2 --steps 1000
  mtjax compare my_experiment.toml --out runs/cmp
  mtjax compare --strategy rep --methods linear,pcgrad,mgda   # weights from representation gradients
  mtjax compare --methods pcgrad,mgda --every 16 --strategy subset  # amortized weights, one backward between
  mtjax compare --methods linear,modo,sdmgrad,sdmgrad:num_batches=1   # method options: name:key=value
  mtjax run my_experiment.toml --out runs/one    # one configuration, with checkpoints if train.checkpoint_every > 0
  mtjax run my_experiment.toml --out runs/one --from-step 2000   # go back to the checkpoint of step 2000
  mtjax run my_experiment.toml --out /shared/one --distributed   # multi-host: one per host (SLURM, TPU pod, env)
  mtjax run my_experiment.toml --out /shared/one --coordinator host0:1234 --num-processes 2 --process-id 0
  mtjax convert my_experiment.toml stores/aliexpress_nl   # its [data] once into an on-disk store
  mtjax list                                     # models, methods, datasets, optimizers
"""


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
    prog="mtjax",
    description="Gradient-level multi-task learning experiments in JAX.",
    epilog=USAGE,
    formatter_class=argparse.RawDescriptionHelpFormatter,
  )
  sub = p.add_subparsers(dest="command", required=True)
  r = sub.add_parser("run", help="train one configuration and write results + plots")
  r.add_argument("config", help="experiment TOML file")
  r.add_argument("--out", default=None, help="output folder (default: runs/<name>)")
  r.add_argument("--seed", type=int, default=None, help="override train.seed")
  r.add_argument("--steps", type=int, default=None, help="override train.steps")
  r.add_argument("--no-progress", action="store_true")
  r.add_argument("--fresh", action="store_true", help="ignore existing checkpoints in the output folder")
  r.add_argument(
    "--from-step",
    type=int,
    default=None,
    metavar="N",
    help="restart from the checkpoint of step N (e.g. before a divergence), deleting later checkpoints and log records",
  )
  d = r.add_argument_group(
    "multi-host training (jax.distributed; one process per host, the batch split over every host's devices)"
  )
  d.add_argument(
    "--distributed",
    action="store_true",
    help="start jax.distributed, detecting the cluster (SLURM, Open MPI, TPU pods, JAX_COORDINATOR_ADDRESS ...)",
  )
  d.add_argument("--coordinator", default=None, metavar="HOST:PORT", help="process 0's address (implies --distributed)")
  d.add_argument("--num-processes", type=int, default=None, metavar="N", help="number of processes")
  d.add_argument("--process-id", type=int, default=None, metavar="I", help="this process's index, 0 .. N-1")
  _speed_args(r)
  v = sub.add_parser(
    "convert",
    help="convert a config's [data] once into an on-disk store (train from it with bounded memory)",
    description="Converts the dataset of a config's [data] table into a store folder (memory-mapped columns); "
    "then train with [data] name = \"store\", path = OUT. AliExpress files are converted chunk by chunk.",
  )
  v.add_argument("config", help="TOML file with a [data] table (other tables are ignored)")
  v.add_argument("out", help="the store folder to write")
  v.add_argument("--overwrite", action="store_true", help="replace an existing store")
  c = sub.add_parser("compare", help="train one model with several methods and print a table")
  c.add_argument("config", nargs="?", default=None, help="experiment TOML file (default: the embedded default)")
  c.add_argument(
    "--methods",
    default=None,
    help="comma-separated methods, each name[:key=value...], e.g. "
    "linear,modo,sdmgrad:num_batches=1 (default: the eight methods of the embedded default)",
  )
  c.add_argument("--seeds", type=int, nargs="+", default=None, help="seeds (default: the config's)")
  c.add_argument("--steps", type=int, default=None, help="override train.steps")
  c.add_argument("--samples", type=int, default=None, help="override data.num_samples (synthetic data)")
  c.add_argument("--out", default=None, help="output folder (default: runs/compare-<name>)")
  c.add_argument("--no-progress", action="store_true")
  _speed_args(c)
  sub.add_parser("list", help="list models, methods, datasets and optimizers")
  return p


def _speed_args(p: argparse.ArgumentParser) -> None:
  p.add_argument(
    "--strategy", default=None, help="override train.strategy: auto, loop, map, vmap, rep, shared or subset"
  )
  p.add_argument("--chunk-size", type=int, default=None, help="override train.chunk_size (task rows at a time)")
  p.add_argument("--every", type=int, default=None, help="amortized weights: recompute every k steps (method.every)")
  p.add_argument("--ema", type=float, default=None, help="amortized weights: EMA factor (method.ema)")
  p.add_argument(
    "--precision",
    default=None,
    choices=("fp32", "bf16"),
    help="override train.precision: fp32, or bf16 (bfloat16 compute, float32 parameters)",
  )


def _method_override(method, args):
  method = dict(method) if isinstance(method, dict) else {"name": method}
  if getattr(args, "every", None) is not None:
    method["every"] = args.every
  if getattr(args, "ema", None) is not None:
    method["ema"] = args.ema
  return method


def _override(raw: dict, args) -> dict:
  raw = {k: (dict(v) if isinstance(v, dict) else v) for k, v in raw.items()}
  if getattr(args, "steps", None) is not None:
    raw.setdefault("train", {})["steps"] = args.steps
  if getattr(args, "seed", None) is not None:
    raw.setdefault("train", {})["seed"] = args.seed
  if getattr(args, "seeds", None):
    raw["seeds"] = list(args.seeds)
  if getattr(args, "samples", None) is not None:
    raw["data"]["num_samples"] = args.samples
  if getattr(args, "strategy", None) is not None:
    raw.setdefault("train", {})["strategy"] = args.strategy
  if getattr(args, "chunk_size", None) is not None:
    raw.setdefault("train", {})["chunk_size"] = args.chunk_size
  if getattr(args, "precision", None) is not None:
    raw.setdefault("train", {})["precision"] = args.precision
  if "method" in raw:
    raw["method"] = _method_override(raw["method"], args)
  return raw


def _load_raw(path):
  import tomllib

  from mtjax.experiment import ConfigError

  if not os.path.exists(path):
    raise ConfigError(f"config file {path!r} does not exist")
  try:
    with open(path, "rb") as f:
      raw = tomllib.load(f)
  except tomllib.TOMLDecodeError as e:
    raise ConfigError(f"{path}: not valid TOML: {e}") from None
  from mtjax.experiment import _config

  return _config.resolve_data_paths(raw, os.path.dirname(os.path.abspath(path)))  # relative to the TOML file


def _precision_line(cfg) -> str:
  """``"fp32"`` or ``"bf16 (float32 parameters, bfloat16 compute, float32 losses)"``."""
  from mtjax.training import _precision  # pylint: disable=import-outside-toplevel

  return _precision.describe(_precision.Precision.from_name(cfg.train.precision))


METRIC_ORDER = ("auc", "logloss", "mse")


def _metrics_table(test: dict) -> str:
  """A markdown table of per-task test metrics (header, separator and rows of equal width), then a
  note on its symbols: "—" where a metric does not apply to a task's type (AUC and logloss for
  binary tasks, MSE for regression), "n/a" where it is undefined (e.g. the AUC of a task without
  positives in the test split), and a "mean" row over the tasks that have each metric."""
  names = [k for k in test if k != "macro"]
  found = {k for n in names for k in test[n]}
  keys = [k for k in METRIC_ORDER if k in found] + sorted(found - set(METRIC_ORDER))
  cell = lambda v: "n/a" if not math.isfinite(v) else f"{v:.4f}"  # NaN: an undefined metric (one class only)
  header = ["task"] + [k.upper() if k in ("auc", "mse") else k for k in keys]
  rows = [[n] + [cell(float(test[n][k])) if k in test[n] else "—" for k in keys] for n in names]
  if len(names) > 1:
    means = []
    for k in keys:
      vals = [float(test[n][k]) for n in names if k in test[n] and math.isfinite(float(test[n][k]))]
      means.append(
        f"{sum(vals) / len(vals):.4f}" + (f" ({len(vals)} tasks)" if len(vals) < len(names) else "")
        if len(vals) > 1
        else "—"
      )
    rows.append(["mean"] + means)
  from mtjax.experiment._grid import markdown_table  # pylint: disable=import-outside-toplevel

  notes = []
  if any("—" in r[1:] for r in rows):
    notes.append(
      "—: does not apply (AUC and logloss are metrics of binary tasks, MSE of regression tasks; "
      "the mean row averages a metric over two tasks or more)"
    )
  if any("n/a" in r for r in rows):
    notes.append("n/a: undefined (e.g. an AUC without both classes in the test split)")
  return markdown_table(header, rows) + ("\n\n" + "; ".join(notes) + "." if notes else "")


def _missing(module: str) -> bool:
  import importlib.util

  try:
    return importlib.util.find_spec(module) is None
  except ModuleNotFoundError:  # the parent package of a dotted name is missing
    return True


def _start_distributed(args) -> bool:
  """Starts ``jax.distributed`` for ``--distributed`` / ``--coordinator`` (then every process
  waits until ``--fresh`` is done); returns whether this process reports (process 0)."""
  explicit = (args.coordinator, args.num_processes, args.process_id)
  if not args.distributed and all(v is None for v in explicit):
    return True
  from mtjax.experiment import ConfigError
  from mtjax.training import _distributed

  if any(v is None for v in explicit) and any(v is not None for v in explicit):
    raise ConfigError(
      "--coordinator, --num-processes and --process-id go together (or use --distributed alone to detect the cluster)"
    )
  _distributed.initialize_distributed(args.coordinator, num_processes=args.num_processes, process_id=args.process_id)
  return _distributed.is_primary()


def main(argv=None) -> int:
  args = _parser().parse_args(argv)
  from mtjax import experiment
  from mtjax.experiment import _registry as reg

  if args.command in ("run", "compare"):
    missing = [m for m in ("tqdm", "matplotlib", "orbax.checkpoint") if _missing(m)]
    if missing:
      print(f"mtjax: the {args.command} command needs {', '.join(missing)}: pip install 'mtjax[cli]'", file=sys.stderr)
      return 2
  try:
    if args.command == "list":
      from mtjax import models

      print("models:     " + ", ".join(models.available()))
      print("methods:    " + ", ".join(reg.METHODS))
      print("datasets:   " + ", ".join(reg.DATASETS))
      print("optimizers: " + ", ".join(reg.OPTIMIZERS))
      return 0
    if args.command == "convert":
      from mtjax.experiment import _config
      from mtjax.experiment import _runner

      raw = _config.resolve_data_paths(_load_raw(args.config), os.path.dirname(os.path.abspath(args.config)))
      if not isinstance(raw.get("data"), dict) or "name" not in raw["data"]:
        raise experiment.ConfigError(f"{args.config}: needs a [data] table with a name")
      t0 = time.time()
      path = _runner.convert_data(raw["data"], args.out, overwrite=args.overwrite)
      from mtjax import data as data_lib

      splits = data_lib.open_store(path)
      sizes = (
        ", ".join(f"{k} {len(v):,}" for k, v in splits.items()) if isinstance(splits, dict) else f"{len(splits):,}"
      )
      print(f"mtjax convert: {raw['data']['name']} -> {path} ({sizes} samples) in {time.time() - t0:.1f} s")
      print(f'train from it with:\n\n[data]\nname = "store"\npath = "{path}"')
      return 0
    if args.command == "run":
      cfg = experiment.from_dict(_override(_load_raw(args.config), args))
      out = args.out or os.path.join("runs", cfg.name)
      if args.fresh and args.from_step is not None:
        raise experiment.ConfigError("--fresh and --from-step exclude each other")
      primary = _start_distributed(args)
      if args.fresh and primary and os.path.isdir(os.path.join(out, "checkpoints")):
        import shutil

        shutil.rmtree(os.path.join(out, "checkpoints"))
      if args.fresh:  # multi-host: no process looks at the folder before process 0 has emptied it
        from mtjax.training import _distributed

        _distributed.barrier("mtjax_cli_fresh")
      seeds = [cfg.train.seed] if args.seed is not None else list(cfg.seeds)
      if len(seeds) > 1 and args.from_step is not None:
        raise experiment.ConfigError("--from-step needs one seed: add --seed N")
      for seed in seeds:  # every seed of the config, each in its own folder when there are several
        sub = out if len(seeds) == 1 else os.path.join(out, f"seed_{seed}")
        t0 = time.time()
        res = experiment.run(cfg, seed=seed, out_dir=sub, progress=not args.no_progress, from_step=args.from_step)
        if not primary:  # multi-host: process 0 reports
          continue
        print(
          f"{cfg.name}: method {res.method}, seed {res.seed}, {cfg.train.steps} steps, "
          f"precision {_precision_line(cfg)}, {res.ms_per_step:.2f} ms/step, {time.time() - t0:.1f} s"
        )
        print("\ntest metrics:\n\n" + _metrics_table(res.test) + "\n")  # blank lines: a markdown table block
        print(f"results, log.jsonl and learning_curves.png in {sub}")
      return 0
    # compare
    raw = _load_raw(args.config) if args.config else dict(experiment.DEFAULT_COMPARE)
    raw = _override(raw, args)
    names = (
      [experiment.parse_method(m) for m in args.methods.split(",") if m.strip()]
      if args.methods
      else list(raw.pop("methods", experiment.DEFAULT_METHODS))
    )
    raw.pop("methods", None)
    methods = [_method_override(m, args) for m in names]
    unlabelled = [{k: v for k, v in m.items() if k != "label"} for m in methods]
    for m in unlabelled:  # validate every method up front, before any training
      experiment.from_dict({**raw, "method": m})
    cfg = experiment.from_dict({**raw, "method": unlabelled[0]})
    out = args.out or os.path.join("runs", f"compare-{cfg.name}")
    t0 = time.time()
    print(
      f"mtjax compare: model {cfg.model['name']}, data {cfg.data['name']}, {len(methods)} methods x "
      f"{len(cfg.seeds)} seed(s), {cfg.train.steps} steps of batch {cfg.train.batch_size}, "
      f"strategy {cfg.train.strategy}, precision {_precision_line(cfg)}"
      + (f", weights every {args.every} steps" if args.every else "")
    )
    experiment.compare(cfg, methods, seeds=cfg.seeds, out_dir=out, progress=not args.no_progress)
    print(
      f"test metrics (mean over seeds); total {time.time() - t0:.0f} s; table, results and learning_curves.png in {out}"
    )
    return 0
  except experiment.ConfigError as e:
    print(f"mtjax: config error: {e}", file=sys.stderr)
    return 2
  except ValueError as e:  # mtjax's own errors (failed checks "[at training step N]", CheckpointError): one line
    if str(e).startswith("mtjax:"):
      print(" ".join(line.strip() for line in str(e).strip().splitlines()), file=sys.stderr)
      return 2
    raise
  except OSError as e:  # writing results or plots into an unwritable folder / a full disk
    print(f"mtjax: {e.strerror or e}" + (f": {e.filename}" if e.filename else ""), file=sys.stderr)
    return 2


if __name__ == "__main__":
  sys.exit(main())
