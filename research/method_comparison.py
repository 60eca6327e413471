r"""Gradient methods compared on one model and one data set with conflicting tasks.

Linear scalarization, PCGrad, GradVac, MGDA, PE-LTR, GradNorm, DWA and uncertainty weighting,
each as ``optax.chain(method, optax.adam)``, train the same MMoE on
:func:`mtjax.data.conflicting_tasks` (two click-like binary tasks that agree, and a watch-time-like
regression task on a 10x scale that conflicts with both), several seeds each, through
:func:`mtjax.experiment.compare` (the engine behind ``mtjax compare``): same data split, same
initialisation per seed, same steps. With plain summed losses the large-scale regression task
dominates the shared parameters (the "seesaw" of ranking systems); the methods trade it off
differently.

Reported (from ``compare``, run by :func:`mtjax.experiment.compare_grid`): the test metric per
task (AUC for binary tasks, MSE for the regression task; mean ± std over seeds), the macro AUC of
the binary tasks, Delta_m% over all tasks against linear scalarization
(:func:`mtjax.metrics.delta_m`, signed so that a lower MSE counts as an improvement), median
ms/step; then every method paired seed by seed with linear
scalarization (per-seed differences, wins / losses, sign-flip and t-test p-values) and one sentence
per method generated from those numbers (``GridResult.conclusions()``).
Figures: training-loss curves per task (``compare``), Delta_m% and ms/step per method, the
whole-model task-gradient conflict fraction over training, and the task weights each method
used over training.

Method hyperparameters are the mtjax defaults (``mtjax.experiment.build_tx``: PE-LTR lower
bounds ``0.5 / T`` per task, DWA with one epoch = one pass over the training split, keys from the
seed). The model and data follow ``mtjax.experiment.DEFAULT_COMPARE``.

Run: ``python research/method_comparison.py [--fast] [--out DIR] [--methods a,b,...]``.
"""

from __future__ import annotations

import copy
import os
import sys
from typing import Optional, Sequence

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _common  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402

from mtjax import experiment  # noqa: E402
from mtjax import metrics  # noqa: E402
from mtjax._src.plotting import annotated_bars  # noqa: E402
from mtjax._src.plotting import band  # noqa: E402
from mtjax._src.plotting import band_alpha  # noqa: E402
from mtjax._src.plotting import grid  # noqa: E402
from mtjax._src.plotting import legend_outside  # noqa: E402
from mtjax._src.plotting import method_colors  # noqa: E402
from mtjax._src.plotting import method_styles  # noqa: E402
from mtjax._src.plotting import task_colors  # noqa: E402

NAME = "method_comparison"

FULL = {
  **copy.deepcopy(experiment.DEFAULT_COMPARE),
  "name": NAME,
  "train": {"steps": 500, "batch_size": 256, "log_every": 10, "eval_every": 50},
  "seeds": [0, 1, 2],
  "methods": list(experiment.DEFAULT_METHODS),
}
FAST = {
  "name": NAME,
  "data": {"name": "conflicting", "num_samples": 2000, "seed": 0, "task_types": ["binary", "binary", "regression"]},
  "model": {"name": "mmoe", "num_experts": 2, "expert": [8], "tower": [4, 1]},
  "method": {"name": "linear"},
  "optimizer": {"name": "adam", "learning_rate": 0.003},
  "train": {"steps": 20, "batch_size": 64, "log_every": 5, "eval_every": 5},
  "seeds": [0],
  "methods": ["linear", "pcgrad", "mgda"],
}


def run(setting: dict = FULL, *, out_dir: Optional[str] = None, echo=print) -> dict:
  """Runs :func:`mtjax.experiment.compare_grid` for ``setting`` (a raw config plus ``methods``) on its
  one model, paired per seed against linear scalarization.

  Returns compare's ``{'table', 'results', 'text'}`` plus ``task_names``, ``setting`` and ``grid``
  (the :class:`mtjax.experiment.GridResult`: paired statistics, ``grid.table()``,
  ``grid.conclusions()``).
  """
  raw = {k: v for k, v in setting.items() if k != "methods"}
  cfg = experiment.from_dict(raw)
  paired = experiment.compare_grid(
    cfg, [cfg.model["name"]], setting["methods"], seeds=list(cfg.seeds), baseline="linear", out_dir=out_dir, echo=echo
  )
  model = paired.models[0]
  return {
    "table": paired.tables[model],
    "results": paired.runs[model],
    "text": paired.texts[model],
    "task_names": list(paired.task_names),
    "setting": setting,
    "grid": paired,
  }


def _history(runs, key: str) -> tuple:
  """``(steps [n], values [S, n, ...])`` of one logged quantity over the seeds of a method."""
  hist = [r.history for r in runs if r.history]
  n = min(len(h) for h in hist)
  steps = np.asarray([rec["step"] for rec in hist[0][:n]])
  return steps, np.asarray([[rec[key] for rec in h[:n]] for h in hist], np.float64)


def _colors(res: dict) -> dict:
  """One colour per method, the same in every figure of a run (and in ``learning_curves.png``)."""
  return method_colors(list(res["results"]))


def _seed_delta_m(res: dict, label: str) -> np.ndarray:
  """Delta_m% of each seed of ``label`` against the baseline's run of the same seed (paired: compare runs
  every method on the same seeds), over the tasks of the table's Delta_m%; against the baseline's
  seed mean when the seed counts differ."""
  table = res["table"]
  base_row = table[table["_baseline"]]
  names = _task_order(res)
  keep = [i for i, n in enumerate(names) if n in table[label]["delta_m_tasks"]]
  if not keep:
    return np.zeros(0)
  lower = np.asarray([_lower_is_better(res, n) for n in names])[keep]
  per_seed = np.asarray(table[label]["per_seed"], np.float64)[:, keep]
  base = np.asarray(base_row["per_seed"], np.float64)[:, keep]
  if base.shape != per_seed.shape:
    base = np.broadcast_to(np.asarray(base_row["mean"], np.float64)[keep], per_seed.shape)
  return np.asarray([metrics.delta_m(row, b, lower_is_better=lower) for row, b in zip(per_seed, base)], np.float64)


def _task_order(res: dict) -> list:
  """Task names in the table's column order (the data's order, which ``compare`` uses)."""
  first = next(iter(res["results"].values()))[0]
  return [n for n in first.test if n != "macro"]


def _lower_is_better(res: dict, name: str) -> bool:
  first = next(iter(res["results"].values()))[0]
  return "auc" not in first.test[name]


def plot_summary(res: dict):
  """Delta_m% against the baseline (bars: seed mean, dots: single seeds, values written on the bars;
  an outlier is cut at a robust axis limit with its value written) and median ms/step per method."""
  plt = _common.pyplot()
  labels = [k for k in res["table"] if not k.startswith("_")]
  colors = _colors(res)
  dm = np.asarray([res["table"][k]["delta_m"] for k in labels], np.float64)
  ms = [res["table"][k]["ms_per_step"] for k in labels]
  base = res["table"]["_baseline"]
  width = max(7.5, 0.75 * len(labels) * 2 + 2)
  fig, axes = plt.subplots(1, 2, figsize=(width, 3.6))
  spread = [_seed_delta_m(res, label) if label != base else None for label in labels]
  annotated_bars(
    axes[0],
    labels,
    dm,
    colors=colors,
    notes={base: "baseline"},
    spread=[p if p is not None and p.size > 1 else None for p in spread],
  )
  axes[0].set_ylabel(f"Δm% vs {base} (higher is better)", fontsize=9)
  nseeds = len(next(iter(res["results"].values())))
  paired = f"\ndots: the {nseeds} seeds, each against the baseline's run of that seed" if nseeds > 1 else ""
  axes[0].set_title("Δm% over all tasks (bars: of the seed means)" + paired, fontsize=9)
  annotated_bars(axes[1], labels, ms, colors=colors, fmt="{:.2f}", clip=False)
  axes[1].set_ylabel("ms / step (median)", fontsize=9)
  device = jax.devices()[0].device_kind  # step times mean something on this device only, one run at a time
  axes[1].set_title(
    f"training speed, median ms/step on {device}\n(lower is faster; noisy on a loaded machine)",
    fontsize=9,
  )
  for ax in axes:
    ax.grid(axis="y", alpha=0.25)
  fig.tight_layout()
  return fig


def plot_conflict(res: dict):
  """Whole-model conflict fraction (share of task pairs with negative gradient cosine) over training:
  mean over seeds (EMA) with the min--max band over seeds, one colour per method."""
  plt = _common.pyplot()
  colors = _colors(res)
  styles = method_styles(list(res["results"]))
  fig, ax = plt.subplots(figsize=(6.4, 3.4))
  nseeds = 1
  for label, runs in res["results"].items():
    if not all(r.history and "conflict" in r.history[0] for r in runs):
      continue
    steps, conflict = _history(runs, "conflict")
    nseeds = max(nseeds, conflict.shape[0])
    band(
      ax,
      steps,
      np.asarray([_common.ema(c, 0.2) for c in conflict]),
      color=colors[label],
      label=label,
      ls=styles[label],
      alpha=band_alpha(len(res["results"])),
    )
  ax.set_xlabel("step")
  ax.set_ylabel("conflict fraction (EMA)")
  ax.set_ylim(-0.02, 1.02)
  ax.grid(alpha=0.25)
  ax.set_title(
    "share of task pairs with a negative gradient cosine"
    + (f"\nline: mean, band: min–max over {nseeds} seeds" if nseeds > 1 else ""),
    fontsize=9,
  )
  fig.tight_layout()
  legend_outside(fig, [ax], title="method")
  return fig


def plot_weights(res: dict, *, ncols: int = 4):
  """Task weights recorded by each method over training (mean over seeds, EMA; band: min--max over
  seeds), one panel per method in a grid of at most ``ncols`` columns, one colour per task."""
  labels = list(res["results"])
  colors = _colors(res)
  fig, axes = grid(len(labels), ncols=ncols, panel=(3.2, 2.5))
  names = _task_order(res)
  tcol = task_colors(len(names))
  for ax, label in zip(axes, labels):
    steps, w = _history(res["results"][label], "weights")  # [S, n, T] or [S, n, K, T]
    if w.ndim == 4:  # per-group weights: show the mean over groups
      w = w.mean(2)
    for t in range(w.shape[-1]):
      ys = np.asarray([_common.ema(seed[:, t], 0.2) for seed in w])
      band(
        ax,
        steps,
        ys,
        color=tcol[t % len(tcol)],
        label=names[t] if t < len(names) else f"t{t}",
        lw=1.3,
        ls=("-", "--", ":", "-.")[t % 4],
      )  # styles too: equal weights (linear) overlap
    ax.set_title(label, fontsize=9.5, color=colors[label], fontweight="bold")
    ax.grid(alpha=0.25)
    ax.tick_params(labelsize=7.5)
  ncols_used = min(len(labels), ncols)
  for i, ax in enumerate(axes):
    if i % ncols_used == 0:
      ax.set_ylabel("task weight", fontsize=8.5)
    if i >= len(axes) - ncols_used:
      ax.set_xlabel("step", fontsize=8.5)
  fig.suptitle("task weights over training (EMA; line: mean, band: min–max over seeds)", fontsize=10)
  fig.tight_layout()
  legend_outside(fig, axes[:1], title="task")
  return fig


def main(argv: Optional[Sequence[str]] = None) -> dict:
  p = _common.parser(
    NAME, "Linear, PCGrad, GradVac, MGDA, PE-LTR, GradNorm, DWA and uncertainty on an MMoE with conflicting tasks."
  )
  p.add_argument("--methods", default=None, help="comma-separated methods, each name[:key=value...]")
  p.add_argument("--seeds", type=int, default=None, help="number of seeds (default 3, --fast 1)")
  p.add_argument("--steps", type=int, default=None, help="training steps (default 500, --fast 20)")
  args = p.parse_args(argv)
  _common.use_agg()
  setting = copy.deepcopy(FAST if args.fast else FULL)
  if args.methods:
    setting["methods"] = [m.strip() for m in args.methods.split(",") if m.strip()]
  if args.seeds:
    setting["seeds"] = list(range(args.seeds))
  if args.steps:
    setting["train"]["steps"] = args.steps
  out = _common.out_dir(args.out, NAME)
  lines = []
  with _common.Timer() as timer:
    res = run(setting, out_dir=out, echo=lines.append)  # echo: one line per finished run and the tables
  table = [line for line in res["text"].splitlines() if line.startswith("|")]
  paired = res["grid"]
  text = (
    f"Test metric per task (AUC for binary tasks, MSE for regression; mean ± std over "
    f"{len(setting['seeds'])} seeds), {setting['train']['steps']} steps, model {setting['model']}, "
    f"data {setting['data']}:\n\n"
    + "\n".join(table)
    + f"\n\nPaired per seed against {paired.baseline} (mtjax.experiment.compare_grid; mean ± s.e. over seeds "
    f"of the per-seed differences):\n\n{paired.table()}\n\n{paired.conclusions()}"
    + f"\n\nwall time {timer.seconds:.1f} s"
  )
  print(text)
  _common.write_text(os.path.join(out, "table.md"), text)
  _common.save(plot_summary(res), os.path.join(out, "delta_m_and_speed.png"))
  _common.save(plot_conflict(res), os.path.join(out, "conflict_over_steps.png"))
  _common.save(plot_weights(res), os.path.join(out, "task_weights.png"))
  print(f"figures and results in {out} (learning_curves.png from mtjax.experiment.compare)")
  res["text"] = text
  res["out"] = out
  return res


if __name__ == "__main__":
  main()
