r"""Gradient methods compared on one model and one data set with conflicting tasks.

Linear scalarization, PCGrad, GradVac, MGDA, PE-LTR, GradNorm, DWA and uncertainty weighting,
each as ``optax.chain(method, optax.adam)``, train the same MMoE on
:func:`mtjax.data.conflicting_tasks` (two click-like binary tasks that agree, and a watch-time-like
regression task on a 10x scale that conflicts with both), several seeds each, through
:func:`mtjax.experiment.compare` (the engine behind ``mtjax compare``): same data split, same
initialisation per seed, same steps. With plain summed losses the large-scale regression task
dominates the shared parameters (the "seesaw" of ranking systems); the methods trade it off
differently.

Reported (from ``compare``): the test metric per task (AUC for binary tasks, MSE for the
regression task; mean ± std over seeds), the macro AUC of the binary tasks, Delta_m% over all
tasks against linear scalarization (:func:`mtjax.metrics.delta_m`, signed so that a lower MSE
counts as an improvement), median ms/step.
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

import numpy as np  # noqa: E402

import _common  # noqa: E402
from mtjax import experiment  # noqa: E402

NAME = "method_comparison"

FULL = {
    **copy.deepcopy(experiment.DEFAULT_COMPARE),
    "name": NAME,
    "train": {"steps": 500, "batch_size": 256, "log_every": 10},
    "seeds": [0, 1, 2],
    "methods": list(experiment.DEFAULT_METHODS),
}
FAST = {
    "name": NAME,
    "data": {"name": "conflicting", "num_samples": 2000, "seed": 0, "task_types": ["binary", "binary", "regression"]},
    "model": {"name": "mmoe", "num_experts": 2, "expert": [8], "tower": [4, 1]},
    "method": {"name": "linear"},
    "optimizer": {"name": "adam", "learning_rate": 0.003},
    "train": {"steps": 20, "batch_size": 64, "log_every": 5},
    "seeds": [0],
    "methods": ["linear", "pcgrad", "mgda"],
}


def run(setting: dict = FULL, *, out_dir: Optional[str] = None, echo=print) -> dict:
  """Runs :func:`mtjax.experiment.compare` for ``setting`` (a raw config plus ``methods``).

  Returns compare's ``{'table', 'results', 'text'}`` plus ``task_names`` and ``setting``.
  """
  raw = {k: v for k, v in setting.items() if k != "methods"}
  cfg = experiment.from_dict(raw)
  methods = [m if isinstance(m, dict) else experiment.parse_method(m) for m in setting["methods"]]
  out = experiment.compare(cfg, methods, seeds=list(cfg.seeds), out_dir=out_dir, progress=False, echo=echo)
  first = next(iter(out["results"].values()))[0]
  out["task_names"] = list(first.test.keys() - {"macro"})
  out["task_names"].sort()
  out["setting"] = setting
  return out


def _history(runs, key: str) -> tuple:
  """``(steps [n], values [S, n, ...])`` of one logged quantity over the seeds of a method."""
  hist = [r.history for r in runs if r.history]
  n = min(len(h) for h in hist)
  steps = np.asarray([rec["step"] for rec in hist[0][:n]])
  return steps, np.asarray([[rec[key] for rec in h[:n]] for h in hist], np.float64)


def plot_summary(res: dict):
  """Delta_m% against linear and median ms/step per method."""
  plt = _common.pyplot()
  labels = [k for k in res["table"] if not k.startswith("_")]
  dm = [res["table"][k]["delta_m"] for k in labels]
  ms = [res["table"][k]["ms_per_step"] for k in labels]
  fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
  axes[0].bar(labels, dm, color=["tab:green" if v >= 0 else "tab:red" for v in dm])
  axes[0].axhline(0, color="gray", lw=0.8)
  axes[0].set_ylabel(f"Δm% vs {res['table']['_baseline']}")
  axes[1].bar(labels, ms, color="tab:blue")
  axes[1].set_ylabel("ms / step (median)")
  for ax in axes:
    ax.tick_params(axis="x", rotation=45)
  fig.tight_layout()
  return fig


def plot_conflict(res: dict):
  """Whole-model conflict fraction (share of task pairs with negative gradient cosine) over training."""
  plt = _common.pyplot()
  fig, ax = plt.subplots(figsize=(6, 3.2))
  for label, runs in res["results"].items():
    if not all(r.history and "conflict" in r.history[0] for r in runs):
      continue
    steps, conflict = _history(runs, "conflict")
    y = _common.ema(conflict.mean(0), 0.2)
    ax.plot(steps, y, label=label)
  ax.set_xlabel("step")
  ax.set_ylabel("conflict fraction (EMA)")
  ax.set_ylim(-0.02, 1.02)
  ax.legend(fontsize=7, ncol=2)
  fig.tight_layout()
  return fig


def plot_weights(res: dict):
  """Task weights recorded by each method over training (mean over seeds, EMA), one panel per method."""
  plt = _common.pyplot()
  labels = list(res["results"])
  fig, axes = plt.subplots(1, len(labels), figsize=(2.8 * len(labels), 2.8), squeeze=False, sharey=False)
  for ax, label in zip(axes[0], labels):
    steps, w = _history(res["results"][label], "weights")
    w = w.mean(0)
    if w.ndim == 3:  # per-group weights [n, K, T]: show the mean over groups
      w = w.mean(1)
    w = _common.ema(w, 0.2)
    for t in range(w.shape[-1]):
      ax.plot(steps, w[:, t], label=res["task_names"][t] if t < len(res["task_names"]) else f"t{t}")
    ax.set_title(label, fontsize=9)
    ax.set_xlabel("step")
  axes[0, 0].set_ylabel("task weight")
  axes[0, -1].legend(fontsize=7)
  fig.tight_layout()
  return fig


def main(argv: Optional[Sequence[str]] = None) -> dict:
  p = _common.parser(NAME, "Linear, PCGrad, GradVac, MGDA, PE-LTR, GradNorm, DWA and uncertainty on an MMoE "
                           "with conflicting tasks.")
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
    res = run(setting, out_dir=out, echo=lines.append)
  table = [line for line in lines if line.startswith("|")]  # compare also echoes one line per finished run
  text = (f"Test metric per task (AUC for binary tasks, MSE for regression; mean ± std over "
          f"{len(setting['seeds'])} seeds), {setting['train']['steps']} steps, model {setting['model']}, "
          f"data {setting['data']}:\n\n" + "\n".join(table)
          + f"\n\nwall time {timer.seconds:.1f} s")
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
