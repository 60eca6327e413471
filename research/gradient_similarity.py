r"""Task-gradient similarity over training and across depth (the GradVac observations).

Wang, Tsvetkov, Firat, Cao (*Gradient Vaccine*, ICLR 2021) measured the cosine similarity of
task gradients while training multilingual models and observed that it (1) settles to a fairly
stable level after the first phase of training, (2) differs between layers, so one global target
does not fit every layer (hence GradVac's per-layer EMA targets), and (3) is higher for more
closely related tasks.

This script checks the three observations with :mod:`mtjax.analysis` on a Shared-Bottom network
(4 shared ReLU layers, one tower per task) trained on the two regression tasks of
:func:`mtjax.data.mmoe_synthetic` at several task correlations ``p``. Every step computes the
per-task gradients once (:func:`mtjax.task_grads`), and :func:`mtjax.analysis.track` turns them,
inside the jitted step and without a second backward, into cosine matrices per shared layer
(towers are task-specific and left out), the whole-model conflict indicator and the alignment
``cos(g_t, d)`` of every task gradient with the method's combined direction ``d`` (the view after
the method's surgery). Training runs with ``linear`` (plain sum) and ``pcgrad``.

Why regression: on tasks with Bernoulli labels (e.g. :func:`mtjax.data.conflicting_tasks`), once a
model reaches the noise floor the mini-batch gradients are dominated by independent label noise
and every cosine decays to ~0, in every layer; the low-noise regression tasks keep a systematic
residual, as large models on large data do, so the similarity keeps a level.

Reported: per layer, the mean task-gradient cosine early (first 10% of steps), mid (50-75%) and
late (last 25%) at the main correlation, and late at the other correlations; per method and
correlation, the late alignment of each task with the update and the share of steps whose two
whole-model task gradients conflict. Figures: similarity over steps per layer, per layer and
correlation, a layer x step heatmap, late cosine heatmaps per layer, alignment over steps.

Run: ``python research/gradient_similarity.py [--fast] [--out DIR]``.
"""

from __future__ import annotations

import dataclasses
import os
import re
import sys
from typing import Optional, Sequence

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _common  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import mtjax  # noqa: E402
from mtjax import data as data_lib  # noqa: E402
from mtjax import models  # noqa: E402
from mtjax._src.plotting import band  # noqa: E402
from mtjax._src.plotting import grid  # noqa: E402
from mtjax._src.plotting import legend_outside  # noqa: E402
from mtjax._src.plotting import method_colors  # noqa: E402
from mtjax._src.plotting import task_colors  # noqa: E402

NAME = "gradient_similarity"


@dataclasses.dataclass(frozen=True)
class Config:
  correlations: tuple = (0.9, 0.5, 0.0)
  main_correlation: float = 0.5
  methods: tuple = ("linear", "pcgrad")
  seeds: tuple = (0, 1, 2)  # each seed: a fresh data set and initialisation
  num_samples: int = 50000
  dim: int = 100
  bottom: tuple = (64, 64, 64, 32)
  tower: tuple = (16, 1)
  steps: int = 1500
  batch_size: int = 512
  learning_rate: float = 1e-3
  log_every: int = 10  # statistics are averaged over each block of log_every steps
  fast_compile: bool = False


FULL = Config()
FAST = Config(
  correlations=(0.5, 0.0),
  methods=("linear", "pcgrad"),
  seeds=(0,),
  num_samples=2000,
  dim=20,
  bottom=(16, 16, 8),
  tower=(4, 1),
  steps=60,
  batch_size=64,
  log_every=5,
  fast_compile=True,
)


def depth_groups(paths: Sequence[str]) -> list:
  """Group id per shared leaf path: ``i`` for ``bottom/Dense_i``; -1 (left out) for anything else."""
  ids = []
  for p in paths:
    m = re.search(r"bottom/Dense_(\d+)/", p)
    ids.append(int(m.group(1)) if m else -1)
  return ids


def layer_names(cfg: Config) -> list:
  n = len(cfg.bottom)
  return [f"layer {i + 1}" + (" (input)" if i == 0 else " (top)" if i == n - 1 else "") for i in range(n)]


def make_method(name: str, num_tasks: int, shared=None):
  """The method, comparing tasks on ``shared`` (the model's partition: the towers are task-specific)."""
  if name == "linear":
    return mtjax.linear(num_tasks=num_tasks)
  if name == "pcgrad":
    return mtjax.pcgrad(key=0, num_tasks=num_tasks, shared=shared)
  if name == "gradvac":
    return mtjax.gradvac(key=0, num_tasks=num_tasks, granularity="layer", shared=shared)
  if name == "mgda":
    return mtjax.mgda(num_tasks=num_tasks, shared=shared)
  raise ValueError(f"unknown method {name!r}; choose linear, pcgrad, gradvac or mgda")


def datasets(cfg: Config, correlation: float) -> list:
  """One training set per seed (:func:`mtjax.data.mmoe_synthetic`, noise 0.01)."""
  return [data_lib.mmoe_synthetic(cfg.num_samples, correlation, dim=cfg.dim, seed=s) for s in cfg.seeds]


def make_block_fn(method_name: str, cfg: Config, num_tasks: int = 2):
  """``(init, block)``: jitted init and a jitted scan over ``log_every`` steps returning mean statistics."""
  model = models.SharedBottom(num_tasks=num_tasks, bottom=cfg.bottom, tower=cfg.tower)
  loss_fn = mtjax.losses.make_loss_fn(model, "mse", has_aux=False)
  grad_fn = mtjax.task_grads(loss_fn)
  shared = models.partition(model)  # the towers are task-specific: compare tasks on the shared bottom only
  method = make_method(method_name, num_tasks, shared)
  adam = optax.adam(cfg.learning_rate)
  jit_kwargs = _common.jit_kwargs(cfg.fast_compile)

  def init(key, x):
    params = model.init(key, x)["params"]
    return params, method.init(params), adam.init(params)

  def block(carry, batches):
    def step(carry, batch):
      params, method_state, adam_state = carry
      losses, grads = grad_fn(params, batch)
      direction, method_state = method.update(grads, method_state, params, task_losses=losses)
      updates, adam_state = adam.update(direction, adam_state, params)
      stats = mtjax.analysis.track(grads, direction, granularity=depth_groups, shared=shared)
      stats["losses"] = losses
      return (optax.apply_updates(params, updates), method_state, adam_state), stats

    carry, stats = jax.lax.scan(step, carry, batches)
    return carry, jax.tree.map(lambda s: jnp.mean(s, axis=0), stats)

  return jax.jit(init, **jit_kwargs), jax.jit(block, donate_argnums=(0,), **jit_kwargs)


def train(init, block, cfg: Config, train_sets: Sequence) -> dict:
  """Trains one (method, correlation) for every seed; returns statistics stacked ``[S, R, ...]``."""
  histories = []
  for seed, ds in zip(cfg.seeds, train_sets):
    it = data_lib.BatchIterator(ds, cfg.batch_size, seed=seed)
    carry = init(jax.random.PRNGKey(seed), ds.batch(np.arange(cfg.batch_size))["x"])
    hist = mtjax.analysis.SimilarityHistory()
    for done in range(cfg.log_every, cfg.steps + 1, cfg.log_every):
      batches = [next(it) for _ in range(cfg.log_every)]
      carry, stats = block(carry, jax.tree.map(lambda *b: np.stack(b), *batches))
      hist.append(done, stats)
    histories.append(hist)
  keys = histories[0].records[0].keys()
  return {"steps": np.asarray(histories[0].steps), **{k: np.stack([h.array(k) for h in histories]) for k in keys}}


def run(cfg: Config = FULL, *, log=print) -> dict:
  """``{'config', 'layers', 'runs': {(method, correlation): stats}}``; each method compiles once."""
  data = {p: datasets(cfg, p) for p in cfg.correlations}
  out = {"config": dataclasses.asdict(cfg), "layers": layer_names(cfg), "task_names": ["task_1", "task_2"], "runs": {}}
  for m in cfg.methods:
    init, block = make_block_fn(m, cfg)
    for p in cfg.correlations:
      with _common.Timer() as t:
        out["runs"][m, p] = train(init, block, cfg, data[p])
      log(f"  {m} at correlation {p:g}: {len(cfg.seeds)} seeds x {cfg.steps} steps in {t.seconds:.1f} s")
  return out


def pair_cosine(cos: np.ndarray) -> np.ndarray:
  """Mean of the off-diagonal entries of ``[..., T, T]`` matrices (the one pair for T = 2)."""
  t = cos.shape[-1]
  iu = np.triu_indices(t, 1)
  return cos[..., iu[0], iu[1]].mean(-1)


def windows(num_records: int) -> dict:
  """Record index ranges of the early (first 10%), mid (50-75%) and late (last 25%) phases."""
  n = num_records
  return {
    "early": slice(0, max(1, n // 10)),
    "mid": slice(n // 2, max(n // 2 + 1, 3 * n // 4)),
    "late": slice(min(3 * n // 4, n - 1), n),
  }


def _phase(series: np.ndarray, phase: str) -> np.ndarray:
  """Per-seed mean of ``[S, R, ...]`` over the records of a phase -> ``[S, ...]``."""
  return series[:, windows(series.shape[1])[phase]].mean(1)


def layer_table(res: dict, method: str = "linear") -> str:
  cfg = res["config"]
  main = cfg["main_correlation"]
  others = [p for p in cfg["correlations"] if p != main]
  header = ["layer"] + [f"{ph} (p={main:g})" for ph in ("early", "mid", "late")] + [f"late (p={p:g})" for p in others]
  rows = []
  for k, name in enumerate(res["layers"] + ["whole model"]):

    def series(p):
      r = res["runs"][method, p]
      return pair_cosine(r["cosine_groups"][:, :, k] if k < len(res["layers"]) else r["cosine"])

    cells = [name] + [_common.mean_std(_phase(series(main), ph), 3) for ph in ("early", "mid", "late")]
    cells += [_common.mean_std(_phase(series(p), "late"), 3) for p in others]
    rows.append(cells)
  return _common.markdown_table(header, rows)


def alignment_table(res: dict) -> str:
  names = res["task_names"]
  header = ["method", "p"] + [f"late cos({n}, d)" for n in names] + ["late cos(g1, g2)", "steps with conflict"]
  rows = []
  for (m, p), r in res["runs"].items():
    al = _phase(r["alignment"], "late")  # [S, T]
    rows.append(
      [m, f"{p:g}"]
      + [_common.mean_std(al[:, t], 3) for t in range(len(names))]
      + [_common.mean_std(_phase(pair_cosine(r["cosine"]), "late"), 3), f"{100 * r['conflict'].mean():.1f}%"]
    )
  return _common.markdown_table(header, rows)


def observations(res: dict, method: str = "linear") -> str:
  cfg = res["config"]
  main = cfg["main_correlation"]
  r = res["runs"][method, main]
  layer_cos = pair_cosine(r["cosine_groups"])  # [S, R, K]
  early, mid, late = (_phase(layer_cos, ph).mean(0) for ph in ("early", "mid", "late"))
  names = res["layers"]
  by_corr = {
    p: float(_phase(pair_cosine(res["runs"][method, p]["cosine"]), "late").mean()) for p in cfg["correlations"]
  }
  order = sorted(by_corr, reverse=True)
  ordered = all(by_corr[a] > by_corr[b] for a, b in zip(order, order[1:]))
  return "\n".join(
    [
      f"- settles (p={main:g}): largest per-layer change early -> mid {np.abs(mid - early).max():.3f}, "
      f"mid -> late {np.abs(late - mid).max():.3f}",
      f"- differs by depth (p={main:g}): late cosine from {late.min():+.3f} ({names[int(np.argmin(late))]}) to "
      f"{late.max():+.3f} ({names[int(np.argmax(late))]})",
      f"- higher for more related tasks: late whole-model cosine "
      f"{', '.join(f'p={p:g}: {by_corr[p]:+.3f}' for p in order)} -> {'ordered' if ordered else 'NOT ordered'} by p",
    ]
  )


def plot_over_steps(res: dict, method: str = "linear", correlation: Optional[float] = None, smooth: float = 0.1):
  """Task-gradient cosine per layer over steps (seed mean, EMA-smoothed)."""
  p = res["config"]["main_correlation"] if correlation is None else correlation
  r = res["runs"][method, p]
  series = pair_cosine(r["cosine_groups"]).mean(0)  # [R, K]
  return mtjax.analysis.plot_similarity_over_steps(
    r["steps"],
    _common.ema(series, smooth),
    labels=res["layers"],
    title=f"task-gradient cosine per layer ({method}, p={p:g})",
  )


def plot_by_correlation(res: dict, method: str = "linear", smooth: float = 0.1):
  """One panel per layer (and the whole model), one curve per task correlation (line: seed mean,
  band: min--max over seeds; EMA-smoothed); one legend outside the panels."""
  plt = _common.pyplot()
  cors = res["config"]["correlations"]
  names = res["layers"] + ["whole model"]
  fig, axes = grid(len(names), ncols=4, panel=(3.1, 2.8), sharey=True)
  cmap = plt.get_cmap("viridis")
  order = sorted(cors, reverse=True)
  nseeds = 1
  for p in cors:
    r = res["runs"][method, p]
    series = np.concatenate([pair_cosine(r["cosine_groups"]), pair_cosine(r["cosine"])[..., None]], -1)  # [S, R, K+1]
    nseeds = series.shape[0]
    colour = cmap(0.85 * order.index(p) / max(1, len(order) - 1))
    for k, ax in enumerate(axes):
      band(
        ax,
        r["steps"],
        np.asarray([_common.ema(seed[:, k], smooth) for seed in series]),
        color=colour,
        label=f"p = {p:g}",
      )
  for i, (ax, name) in enumerate(zip(axes, names)):
    ax.axhline(0, color="gray", lw=0.8, ls="--")
    ax.set_title(name, fontsize=9)
    ax.set_xlabel("step")
    ax.grid(alpha=0.25)
    if i % 4 == 0:
      ax.set_ylabel(f"task-gradient cosine ({method})", fontsize=8.5)
  fig.suptitle(
    "task-gradient cosine per layer and task correlation p"
    + (f" (line: mean, band: min–max over {nseeds} seeds)" if nseeds > 1 else ""),
    fontsize=9.5,
  )
  fig.tight_layout()
  legend_outside(fig, axes[:1], title="task correlation")
  return fig


def plot_layer_step_heatmap(res: dict, method: str = "linear", correlation: Optional[float] = None):
  """Cosine as colour over (layer, step): depth on the vertical axis, training time on the horizontal."""
  plt = _common.pyplot()
  p = res["config"]["main_correlation"] if correlation is None else correlation
  r = res["runs"][method, p]
  series = pair_cosine(r["cosine_groups"]).mean(0)  # [R, K]
  lim = max(1e-3, float(np.abs(series).max()))
  fig, ax = plt.subplots(figsize=(7, 0.5 * len(res["layers"]) + 1.2))
  im = ax.imshow(
    series.T,
    aspect="auto",
    origin="lower",
    cmap="RdBu_r",
    vmin=-lim,
    vmax=lim,
    extent=(r["steps"][0], r["steps"][-1], -0.5, len(res["layers"]) - 0.5),
  )
  ax.set_yticks(range(len(res["layers"])), res["layers"], fontsize=8)
  ax.set_xlabel("step")
  ax.set_title(f"task-gradient cosine by layer and step ({method}, p={p:g})", fontsize=9)
  cb = fig.colorbar(im, ax=ax)
  cb.set_label(f"cosine (colour range ±{lim:.2f})", fontsize=8)
  return fig


def plot_heatmaps(res: dict, method: str = "linear", correlation: Optional[float] = None):
  """Late-training cosine matrices per layer (seed mean) with :func:`mtjax.analysis.plot_similarity_heatmaps`."""
  p = res["config"]["main_correlation"] if correlation is None else correlation
  r = res["runs"][method, p]
  cos = _phase(r["cosine_groups"], "late").mean(0)  # [K, T, T]
  fig = mtjax.analysis.plot_similarity_heatmaps(cos, res["layers"], res["task_names"], max_cols=len(res["layers"]))
  nseeds = r["cosine_groups"].shape[0]
  fig.suptitle(  # what each cell is: a reader can't tell the phase, the run or the averaging otherwise
    f"task-gradient cosine per layer: {method}, label correlation p = {p}, late training, mean of {nseeds} seed(s)",
    fontsize=9,
    y=1.08,
  )
  return fig


def plot_alignment(res: dict, correlation: Optional[float] = None, smooth: float = 0.1):
  """``cos(g_t, d)`` of every task with each method's combined direction, over steps: one panel per
  method (title in the method's colour), one colour per task (line: seed mean, band: min--max)."""
  p = res["config"]["main_correlation"] if correlation is None else correlation
  methods = list(res["config"]["methods"])
  colors = method_colors(methods)
  tcol = task_colors(len(res["task_names"]))
  fig, axes = grid(len(methods), ncols=4, panel=(3.6, 2.8), sharey=True)
  for i, (ax, m) in enumerate(zip(axes, methods)):
    r = res["runs"][m, p]
    al = r["alignment"]  # [S, R, T]
    for t, name in enumerate(res["task_names"]):
      band(
        ax,
        r["steps"],
        np.asarray([_common.ema(seed[:, t], smooth) for seed in al]),
        color=tcol[t],
        label=name,
        ls=("-", "--", ":", "-.")[t % 4],
      )
    ax.axhline(0, color="gray", lw=0.8, ls="--")
    ax.set_title(m, fontsize=9.5, color=colors[m], fontweight="bold")
    ax.set_xlabel("step")
    ax.grid(alpha=0.25)
    if i % 4 == 0:
      ax.set_ylabel("cos(task gradient, update)", fontsize=8.5)
  fig.suptitle(f"alignment of each task gradient with the update direction (p = {p:g}, EMA)", fontsize=9.5)
  fig.tight_layout()
  legend_outside(fig, axes[:1], title="task")
  return fig


def main(argv: Optional[Sequence[str]] = None) -> dict:
  p = _common.parser(NAME, "Task-gradient similarity over training and across layers (GradVac observations).")
  p.add_argument("--steps", type=int, default=None, help="training steps (default 1500, --fast 60)")
  args = p.parse_args(argv)
  _common.use_agg()
  cfg = FAST if args.fast else FULL
  if args.steps:
    cfg = dataclasses.replace(cfg, steps=args.steps)
  out = _common.out_dir(args.out, NAME)
  with _common.Timer() as timer:
    res = run(cfg)
  text = (
    f"Task-gradient cosine per shared layer (linear, mean ± std over {len(cfg.seeds)} seeds, {cfg.steps} "
    f"steps, averaged over blocks of {cfg.log_every} steps):\n\n{layer_table(res)}\n\nObservations:\n"
    f"{observations(res)}\n\nAfter the method's surgery: alignment of each task gradient with the update "
    f"direction d (late training):\n\n{alignment_table(res)}\n\nwall time {timer.seconds:.1f} s"
  )
  print(text)
  _common.write_text(os.path.join(out, "table.md"), text)
  _common.write_json(
    os.path.join(out, "results.json"),
    {
      "config": res["config"],
      "layers": res["layers"],
      "wall_seconds": timer.seconds,
      "runs": {
        f"{m}@{p:g}": {k: r[k] for k in ("steps", "cosine", "cosine_groups", "alignment", "conflict")}
        for (m, p), r in res["runs"].items()
      },
    },
  )
  _common.save(plot_over_steps(res), os.path.join(out, "similarity_over_steps.png"))
  _common.save(plot_by_correlation(res), os.path.join(out, "similarity_by_layer_and_correlation.png"))
  _common.save(plot_layer_step_heatmap(res), os.path.join(out, "layer_step_heatmap.png"))
  _common.save(plot_heatmaps(res), os.path.join(out, "heatmaps.png"))
  _common.save(plot_alignment(res), os.path.join(out, "alignment.png"))
  print(f"figures and results in {out}")
  res["text"] = text
  res["out"] = out
  return res


if __name__ == "__main__":
  main()
