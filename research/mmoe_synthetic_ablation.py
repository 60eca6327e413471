r"""Shared-Bottom vs OMoE vs MMoE on the MMoE paper's synthetic data at task correlation 0.5 / 0.9 / 1.0.

Reproduces the synthetic-data ablation of Ma et al. (KDD 2018, Sec. 5.3 / Fig. 4): two regression
tasks from :func:`mtjax.data.mmoe_synthetic` whose correlation is controlled by the cosine ``p``
of their weight vectors. The paper reports that (1) every model does better on more correlated
tasks, (2) MMoE's loss grows the least as the correlation drops, and (3) both MoE models beat
Shared-Bottom. This script trains the three models on the same data and checks the three claims.

Setup (paper where it is stated, our choice where it is not):

* data: ``d = 100`` inputs, ``c = 1``, ``m = 10`` sine terms, noise 0.01 (the mtjax defaults);
  a fresh data set (new ``u1, u2, alpha, beta, x``) and a fresh model init for every seed, as in
  the paper's repeated runs (it averaged 200; we average 5); the same seed gives the same draws at
  every correlation, so the correlations are compared on paired data. Sizes are ours (the paper
  gives none): 50,000 training samples, enough that the models do not overfit in 3,000 steps.
* models (paper): MMoE and OMoE with 8 experts, each one ReLU layer of 16 units; towers one ReLU
  layer of 8 units + a linear output; Shared-Bottom with one shared ReLU layer of 113 units
  (the paper's size, ~13056 / (100 + 8 + 8), matched to the MoE models) and the same towers.
  Parameter counts (biases included): Shared-Bottom 13,255, OMoE 14,018, MMoE 14,818.
* training: Adam, the learning rate picked per model from {1e-3, 1e-2} on a validation split
  (the paper grid-searched {1e-4, 1e-3, 1e-2}; 1e-4 is far too slow for 3,000 steps), batch 128,
  plain sum of the two MSE losses (``mtjax.linear``), mini-batches without replacement.
* reported: final test MSE averaged over the two tasks, mean ± std over seeds.

All runs of one model (correlations x seeds x learning rates) are trained at once with
``jax.vmap`` over replicas inside one ``lax.scan``, so each model compiles once.

Run: ``python research/mmoe_synthetic_ablation.py [--fast] [--out DIR] [--seeds N]``.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from typing import Optional, Sequence

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import _common  # noqa: E402
import mtjax  # noqa: E402
from mtjax import data as data_lib  # noqa: E402
from mtjax import models  # noqa: E402

NAME = "mmoe_synthetic_ablation"
MODEL_NAMES = ("Shared-Bottom", "OMoE", "MMoE")


@dataclasses.dataclass(frozen=True)
class Config:
  correlations: tuple = (0.5, 0.9, 1.0)
  seeds: tuple = (0, 1, 2, 3, 4)
  learning_rates: tuple = (1e-3, 1e-2)  # Adam rates; one is picked per model on validation
  num_train: int = 50000
  num_valid: int = 2000
  num_test: int = 5000
  dim: int = 100
  steps: int = 3000
  batch_size: int = 128
  eval_every: int = 100  # steps per scan chunk; validation/test losses are measured after each
  num_experts: int = 8
  expert_units: int = 16
  tower_units: int = 8
  bottom_units: int = 113
  fast_compile: bool = False  # XLA optimization level 0 (see _common.jit_kwargs)


FULL = Config()
FAST = Config(seeds=(0, 1), learning_rates=(1e-2,), num_train=1024, num_valid=256, num_test=256, dim=20, steps=120,
              batch_size=64, eval_every=40, num_experts=4, expert_units=8, tower_units=4, bottom_units=24,
              fast_compile=True)


def build_models(cfg: Config) -> dict:
  tower = (cfg.tower_units, 1)
  return {
      "Shared-Bottom": models.SharedBottom(num_tasks=2, bottom=(cfg.bottom_units,), tower=tower),
      "OMoE": models.OMoE(num_tasks=2, num_experts=cfg.num_experts, expert=(cfg.expert_units,), tower=tower),
      "MMoE": models.MMoE(num_tasks=2, num_experts=cfg.num_experts, expert=(cfg.expert_units,), tower=tower),
  }


def count_params(params) -> int:
  return int(sum(np.size(p) for p in jax.tree.leaves(params)))


def data_replicas(cfg: Config) -> list:
  """``(correlation, seed)`` of every data replica, correlation-major (reshape to ``[C, S]``)."""
  return [(p, s) for p in cfg.correlations for s in cfg.seeds]


def make_data(cfg: Config) -> dict:
  """Train/validation/test arrays stacked over data replicas: x ``[D, N, d]``, labels ``[D, 2, N]``.

  One data set per ``(correlation, seed)`` (:func:`mtjax.data.mmoe_synthetic`), cut into
  consecutive train / validation / test parts.
  """
  n = cfg.num_train + cfg.num_valid + cfg.num_test
  cuts = np.cumsum([0, cfg.num_train, cfg.num_valid, cfg.num_test])
  out = {k: [] for k in ("x_train", "y_train", "x_valid", "y_valid", "x_test", "y_test")}
  for p, s in data_replicas(cfg):
    ds = data_lib.mmoe_synthetic(n, p, dim=cfg.dim, seed=s)
    for split, lo, hi in zip(("train", "valid", "test"), cuts[:-1], cuts[1:]):
      part = ds.subset(np.arange(lo, hi))
      out[f"x_{split}"].append(part.features)
      out[f"y_{split}"].append(part.labels)
  return {k: np.stack(v) for k, v in out.items()}


def batch_indices(cfg: Config, replica_seeds: Sequence[int], start: int, num_steps: int) -> np.ndarray:
  """``[R, num_steps, B]`` sample indices: shuffled epochs (``mtjax.data.epoch_order``) per replica."""
  per_epoch = cfg.num_train // cfg.batch_size
  out = np.empty((len(replica_seeds), num_steps, cfg.batch_size), np.int32)
  orders = {}
  for r, seed in enumerate(replica_seeds):
    for k in range(num_steps):
      epoch, pos = divmod(start + k, per_epoch)
      if (seed, epoch) not in orders:
        orders[seed, epoch] = data_lib.epoch_order(cfg.num_train, seed=seed, epoch=epoch)
      out[r, k] = orders[seed, epoch][pos * cfg.batch_size:(pos + 1) * cfg.batch_size]
  return out


def train_model(model, cfg: Config, arrays: dict, *, log=print) -> dict:
  """Trains one model on every (data replica, learning rate) at once.

  Returns ``{'num_params', 'steps' [K], 'train_curve' / 'valid_curve' / 'test_curve' [K, D, L, 2],
  'seconds'}`` (``K`` evaluation points, ``D`` data replicas, ``L`` learning rates, 2 tasks).
  """
  a = {k: jnp.asarray(v) for k, v in arrays.items()}
  loss_fn = mtjax.losses.make_loss_fn(model, "mse", has_aux=False)
  grad_fn = mtjax.task_grads(loss_fn)
  # Adam with a per-replica learning rate: the direction of optax.adam, scaled by -lr below.
  tx = optax.chain(mtjax.linear(num_tasks=2), optax.scale_by_adam())

  def init(key, x):  # one replica (a vmapped init compiles slowly)
    return model.init(key, x[: cfg.batch_size])["params"]

  def train_chunk(params, opt_state, lr, x, y, idx):  # one replica; idx [S, B]
    def body(carry, i):
      params, opt_state = carry
      losses, grads = grad_fn(params, {"x": x[i], "labels": y[:, i]})
      updates, opt_state = tx.update(grads, opt_state, params, task_losses=losses)
      updates = jax.tree.map(lambda u: -lr * u, updates)
      return (optax.apply_updates(params, updates), opt_state), losses

    (params, opt_state), losses = jax.lax.scan(body, (params, opt_state), idx)
    return params, opt_state, jnp.mean(losses, axis=0)

  def eval_losses(params, x, y):
    outputs, _ = model.apply({"params": params}, x)
    return jnp.mean(jnp.square(outputs - y), axis=1)  # [2]

  reps = data_replicas(cfg)
  num_lr = len(cfg.learning_rates)
  jit_kwargs = _common.jit_kwargs(cfg.fast_compile)
  init = jax.jit(init, **jit_kwargs)
  by_seed = {s: init(jax.random.PRNGKey(s), a["x_train"][0]) for s in cfg.seeds}  # same init at every p, lr
  num_params = count_params(by_seed[cfg.seeds[0]])
  params = jax.tree.map(lambda *p: jnp.stack([jnp.stack([q] * num_lr) for q in p]), *[by_seed[s] for _, s in reps])
  opt_state = jax.vmap(jax.vmap(tx.init))(params)
  lrs = jnp.asarray(cfg.learning_rates, jnp.float32)
  # inner vmap: learning rates (shared data); outer vmap: data replicas
  chunk = jax.vmap(jax.vmap(train_chunk, in_axes=(0, 0, 0, None, None, None)), in_axes=(0, 0, None, 0, 0, 0))
  chunk = jax.jit(chunk, donate_argnums=(0, 1), **jit_kwargs)
  evaluate = jax.jit(jax.vmap(jax.vmap(eval_losses, in_axes=(0, None, None))), **jit_kwargs)
  curves = {"steps": [], "train_curve": [], "valid_curve": [], "test_curve": []}
  done = 0
  with _common.Timer() as timer:
    while done < cfg.steps:
      n = min(cfg.eval_every, cfg.steps - done)
      idx = jnp.asarray(batch_indices(cfg, [s for _, s in reps], done, n))
      params, opt_state, train_losses = chunk(params, opt_state, lrs, a["x_train"], a["y_train"], idx)
      done += n
      curves["steps"].append(done)
      curves["train_curve"].append(np.asarray(train_losses))
      curves["valid_curve"].append(np.asarray(evaluate(params, a["x_valid"], a["y_valid"])))
      curves["test_curve"].append(np.asarray(evaluate(params, a["x_test"], a["y_test"])))
  log(f"  {num_params} parameters; trained {len(reps)} data replicas x {num_lr} learning rates x {cfg.steps} "
      f"steps in {timer.seconds:.1f} s")
  return {"num_params": num_params, "seconds": timer.seconds, **{k: np.asarray(v) for k, v in curves.items()}}


def run(cfg: Config = FULL, *, log=print) -> dict:
  """Trains the three models and picks each model's learning rate on validation.

  Returns ``{'config', 'models': {name: train_model output + 'best_lr'}, 'final': [M, C, S]}``
  where ``final`` is the final test MSE (mean of the two tasks) at the selected rate.
  """
  arrays = make_data(cfg)
  c, s = len(cfg.correlations), len(cfg.seeds)
  results, final = {}, []
  for name, model in build_models(cfg).items():
    log(f"{name}:")
    r = train_model(model, cfg, arrays, log=log)
    valid = r["valid_curve"][-1].mean(-1).mean(0)  # [L]: mean over data replicas and tasks
    r["best_lr_index"] = int(np.argmin(valid))
    r["best_lr"] = cfg.learning_rates[r["best_lr_index"]]
    final.append(r["test_curve"][-1, :, r["best_lr_index"]].mean(-1).reshape(c, s))
    results[name] = r
  return {"config": dataclasses.asdict(cfg), "models": results, "final": np.stack(final)}


def selected_curves(res: dict, name: str, split: str) -> np.ndarray:
  """``[K, C, S]`` curve of one model at its selected learning rate (mean of the two tasks)."""
  cfg = res["config"]
  r = res["models"][name]
  curve = r[f"{split}_curve"][:, :, r["best_lr_index"]].mean(-1)  # [K, D]
  return curve.reshape(len(curve), len(cfg["correlations"]), len(cfg["seeds"]))


def trends(res: dict) -> dict:
  """The paper's three claims, evaluated on the mean final test losses (and per seed, paired)."""
  cors = list(res["config"]["correlations"])
  final = res["final"]  # [M, C, S]
  mean = final.mean(-1)  # [M, C]
  order = np.argsort(cors)[::-1]  # highest correlation first
  better_at_higher = {m: bool(np.all(np.diff(mean[i, order]) > 0)) for i, m in enumerate(MODEL_NAMES)}
  hi, lo = int(np.argmax(cors)), int(np.argmin(cors))
  degradation = {m: float(mean[i, lo] - mean[i, hi]) for i, m in enumerate(MODEL_NAMES)}
  rel_degradation = {m: float(mean[i, lo] / mean[i, hi] - 1.0) for i, m in enumerate(MODEL_NAMES)}
  sb = MODEL_NAMES.index("Shared-Bottom")
  moe_beat_sb = {m: bool(np.all(mean[MODEL_NAMES.index(m)] < mean[sb])) for m in ("OMoE", "MMoE")}
  # paired: in how many (correlation, seed) runs on the same data does the MoE model beat Shared-Bottom
  wins = {m: f"{int(np.sum(final[MODEL_NAMES.index(m)] < final[sb]))}/{final[sb].size}" for m in ("OMoE", "MMoE")}
  return {
      "every_model_better_at_higher_correlation": all(better_at_higher.values()),
      "better_at_higher": better_at_higher,
      "mmoe_degrades_least": min(degradation, key=degradation.get) == "MMoE",
      "degradation": degradation,
      "relative_degradation": rel_degradation,
      "both_moe_beat_shared_bottom": all(moe_beat_sb.values()),
      "moe_beat_shared_bottom": moe_beat_sb,
      "paired_wins_over_shared_bottom": wins,
  }


def table(res: dict) -> str:
  cors = res["config"]["correlations"]
  header = (["model", "params"] + [f"corr {p:g}" for p in cors] + [f"loss({min(cors):g}) - loss({max(cors):g})"]
            + ["Adam lr"])
  tr = trends(res)
  rows = []
  for i, m in enumerate(MODEL_NAMES):
    cells = [m, str(res["models"][m]["num_params"])]
    cells += [_common.mean_std(res["final"][i, j]) for j in range(len(cors))]
    cells.append(f"{tr['degradation'][m]:+.4f} ({100 * tr['relative_degradation'][m]:+.1f}%)")
    cells.append(f"{res['models'][m]['best_lr']:g}")
    rows.append(cells)
  return _common.markdown_table(header, rows)


def verdict(res: dict) -> str:
  tr = trends(res)
  yes = lambda b: "yes" if b else "NO"
  lines = [
      f"- every model better at higher correlation: {yes(tr['every_model_better_at_higher_correlation'])} "
      f"({', '.join(f'{m}: {yes(v)}' for m, v in tr['better_at_higher'].items())})",
      f"- MMoE degrades least from the highest to the lowest correlation: {yes(tr['mmoe_degrades_least'])} "
      f"({', '.join(f'{m}: {v:+.4f}' for m, v in tr['degradation'].items())})",
      f"- both MoE models beat Shared-Bottom at every correlation (means): {yes(tr['both_moe_beat_shared_bottom'])} "
      f"({', '.join(f'{m}: {yes(v)}' for m, v in tr['moe_beat_shared_bottom'].items())}; paired runs won: "
      f"{', '.join(f'{m} {v}' for m, v in tr['paired_wins_over_shared_bottom'].items())})",
  ]
  return "\n".join(lines)


def plot_loss_vs_correlation(res: dict):
  plt = _common.pyplot()
  cors = np.asarray(res["config"]["correlations"])
  fig, ax = plt.subplots(figsize=(5, 3.5))
  for i, m in enumerate(MODEL_NAMES):
    y = res["final"][i]
    ax.errorbar(cors, y.mean(-1), yerr=y.std(-1), marker="o", capsize=3, label=m)
  ax.set_xlabel("task correlation p")
  ax.set_ylabel("final test MSE (mean of 2 tasks)")
  ax.set_title("MMoE synthetic ablation (mean ± std over seeds)")
  ax.legend()
  return fig


def plot_learning_curves(res: dict, *, split: str = "test"):
  """Loss over steps, one panel per correlation, one curve per model (selected rate; mean over seeds and tasks)."""
  plt = _common.pyplot()
  cors = res["config"]["correlations"]
  fig, axes = plt.subplots(1, len(cors), figsize=(4 * len(cors), 3.2), squeeze=False, sharey=True)
  for m in MODEL_NAMES:
    curve = selected_curves(res, m, split).mean(-1)  # [K, C]
    for j in range(len(cors)):
      axes[0, j].plot(res["models"][m]["steps"], curve[:, j], label=m)
  for j, p in enumerate(cors):
    axes[0, j].set_title(f"correlation {p:g}")
    axes[0, j].set_xlabel("step")
    axes[0, j].set_yscale("log")
  axes[0, 0].set_ylabel(f"{split} MSE" + (" (mean over each chunk)" if split == "train" else ""))
  axes[0, -1].legend()
  fig.tight_layout()
  return fig


def main(argv: Optional[Sequence[str]] = None) -> dict:
  p = _common.parser(NAME, "Shared-Bottom vs OMoE vs MMoE at task correlation 0.5 / 0.9 / 1.0 (Ma et al., 2018).")
  p.add_argument("--seeds", type=int, default=None, help="number of seeds (default 5, --fast 2)")
  p.add_argument("--steps", type=int, default=None, help="training steps (default 3000, --fast 120)")
  args = p.parse_args(argv)
  _common.use_agg()
  cfg = FAST if args.fast else FULL
  if args.seeds:
    cfg = dataclasses.replace(cfg, seeds=tuple(range(args.seeds)))
  if args.steps:
    cfg = dataclasses.replace(cfg, steps=args.steps)
  out = _common.out_dir(args.out, NAME)
  with _common.Timer() as timer:
    res = run(cfg)
  text = (f"Final test MSE (mean of the 2 tasks), mean ± std over {len(cfg.seeds)} seeds, "
          f"{cfg.steps} steps:\n\n{table(res)}\n\nPaper's trends:\n{verdict(res)}\n\nwall time {timer.seconds:.1f} s")
  print(text)
  _common.write_text(os.path.join(out, "table.md"), text)
  _common.write_json(os.path.join(out, "results.json"),
                     {"config": res["config"], "final": res["final"], "trends": trends(res),
                      "num_params": {m: res["models"][m]["num_params"] for m in MODEL_NAMES},
                      "wall_seconds": timer.seconds})
  _common.save(plot_loss_vs_correlation(res), os.path.join(out, "loss_vs_correlation.png"))
  _common.save(plot_learning_curves(res, split="test"), os.path.join(out, "learning_curves_test.png"))
  _common.save(plot_learning_curves(res, split="train"), os.path.join(out, "learning_curves_train.png"))
  print(f"figures and results in {out}")
  res["text"] = text
  res["out"] = out
  return res


if __name__ == "__main__":
  main()
