"""Position debiasing with a shallow tower (Zhao et al., RecSys 2019, section 4.3).

Logged clicks depend on the display position an earlier ranker chose, and that ranker promoted some
items for reasons unrelated to relevance (``mtjax.data.position_bias_synthetic``). Three models learn
the same logged clicks and a satisfaction task that the position does not affect:

* ``mmoe``: an MMoE without the bias features (position, device): it learns E[click | x], which mixes
  relevance with the promotion (promoted items were shown higher, so clicked more);
* ``mmoe+position``: the same MMoE with position and device as ordinary inputs, served at the top
  position (position 0 for every candidate, the usual practice);
* ``youtube``: :class:`mtjax.models.YouTubeRanker`, an MMoE plus the shallow tower over position and
  device whose logit is added to the click logit in training (10% position dropout) and left out at
  serving.

Each is scored on a held-out split against the ground truth that logged data hides: the AUC and the
user-grouped AUC (GAUC) of the served click score against counterfactual clicks drawn from the
position-free click-through (the click probability at the top position), and the Spearman
correlation of the score with that click-through. Seeds are paired (same data, same split, same
initialisation seed per model); ``mtjax.experiment.paired_stats`` gives per-seed differences with the
exact sign-flip test.

    python research/position_bias.py            # 8 seeds, 3,000 steps (about 3 minutes on 2 CPU cores)
    python research/position_bias.py --fast      # 1 seed, 150 steps: the smoke test

Writes ``table.md`` (the tables and a generated conclusion), ``results.json`` and
``debiasing.png`` into ``research/outputs/position_bias/`` (or ``--out``).
"""

from __future__ import annotations

import copy
import os
import sys
from typing import Callable, Optional, Sequence

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _common  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import mtjax  # noqa: E402
from mtjax import data  # noqa: E402
from mtjax import experiment  # noqa: E402
from mtjax import metrics  # noqa: E402
from mtjax import models  # noqa: E402

NAME = "position_bias"
BIAS = ("position", "device")
MODELS = ("mmoe", "mmoe+position", "youtube")
FULL = {
  "seeds": list(range(8)),  # the sign-flip test's smallest p with 8 seeds: 2 / 2**8 = 0.008
  "data": dict(num_samples=60000, position_bias=0.4, device_effect=1.0, promotion=1.0, policy_relevance=0.5),
  "model": dict(num_experts=4, expert=(32,), tower=(16, 1)),
  "train": dict(steps=3000, batch_size=512, learning_rate=3e-3),
  "test_fraction": 0.25,
}
FAST = copy.deepcopy(FULL)
FAST.update(seeds=[0])
FAST["data"]["num_samples"] = 6000
FAST["train"].update(steps=150, batch_size=256)

METRICS = (  # (key, header, higher is better)
  ("auc_unbiased", "AUC vs unbiased clicks", True),
  ("gauc_unbiased", "GAUC (user) vs unbiased clicks", True),
  ("spearman", "Spearman vs unbiased CTR", True),
  ("auc_logged", "AUC logged clicks", True),
  ("auc_satisfaction", "AUC satisfaction", True),
)


def build(name: str, spec: models.FeatureSpec, cfg: dict) -> models.MMoE | models.YouTubeRanker:
  """The three models of the comparison (same experts, gates and towers)."""
  if name == "mmoe":
    return models.MMoE(num_tasks=2, features=models.split_spec(spec, BIAS)[0], **cfg)
  if name == "mmoe+position":
    return models.MMoE(num_tasks=2, features=spec, **cfg)
  if name == "youtube":
    return models.YouTubeRanker(
      num_tasks=2, features=spec, bias_features=BIAS, engagement_tasks=(0,), position_dropout=0.1, **cfg
    )
  raise ValueError(f"unknown model {name!r}; known: {MODELS}")


def serving_scores(name: str, model, params, features: dict) -> np.ndarray:
  """``[2, N]`` served logits: the YouTube ranker without its shallow tower, the position model at the top."""
  x = {k: jnp.asarray(v) for k, v in features.items()}
  if name == "youtube":
    out, _ = model.apply({"params": params}, {k: v for k, v in x.items() if k not in BIAS}, serving=True)
  elif name == "mmoe+position":
    out, _ = model.apply({"params": params}, {**x, "position": jnp.zeros_like(x["position"])})
  else:
    out, _ = model.apply({"params": params}, x)
  return np.asarray(out, np.float64)


def logged_scores(model, params, features: dict) -> np.ndarray:
  """``[2, N]`` logits on the logged data, bias features and shallow tower included."""
  out, _ = model.apply({"params": params}, {k: jnp.asarray(v) for k, v in features.items()})
  return np.asarray(out, np.float64)


def spearman(a: np.ndarray, b: np.ndarray) -> float:
  ra = np.argsort(np.argsort(a, kind="stable"), kind="stable").astype(np.float64)
  rb = np.argsort(np.argsort(b, kind="stable"), kind="stable").astype(np.float64)
  return float(np.corrcoef(ra, rb)[0, 1])


def evaluate(name: str, model, params, test: data.MultiTaskDataset) -> dict:
  served = serving_scores(name, model, params, test.features)
  logged = logged_scores(model, params, test.features)
  ex = test.extras
  return {
    "auc_unbiased": metrics.auc(ex["unbiased_click"], served[0]),
    "gauc_unbiased": metrics.gauc(ex["unbiased_click"], served[0], test.features["user"]),
    "spearman": spearman(served[0], ex["unbiased_ctr"]),
    "auc_logged": metrics.auc(test.labels[0], logged[0]),
    "auc_satisfaction": metrics.auc(test.labels[1], served[1]),
  }


def run(setting: dict, *, echo: Callable[[str], None] = print) -> dict:
  """Trains every model on every seed; returns per-seed metrics, paired statistics and the texts."""
  results = {m: {k: [] for k, _, _ in METRICS} for m in MODELS}
  ms = {m: [] for m in MODELS}
  oracle = {"auc_unbiased": [], "spearman_logged_ctr": []}
  for seed in setting["seeds"]:
    ds = data.position_bias_synthetic(seed=seed, **setting["data"])
    frac = setting["test_fraction"]
    train, test = ds.split([1.0 - frac, frac], seed=seed)
    # Ceilings from the ground truth: the true unbiased CTR itself, and the logged CTR (what the
    # position-blind model can at best learn is between the two).
    oracle["auc_unbiased"].append(metrics.auc(test.extras["unbiased_click"], test.extras["unbiased_ctr"]))
    oracle["spearman_logged_ctr"].append(spearman(test.extras["true_ctr"], test.extras["unbiased_ctr"]))
    for name in MODELS:
      model = build(name, ds.spec, setting["model"])
      tx = optax.chain(mtjax.linear(num_tasks=2), optax.adam(setting["train"]["learning_rate"]))
      fit = mtjax.training.fit(
        model,
        tx,
        train,
        steps=setting["train"]["steps"],
        batch_size=setting["train"]["batch_size"],
        seed=seed,
        progress=False,
        track_similarity=False,
        log_every=max(1, setting["train"]["steps"]),
        shared=models.partition(model),
      )
      got = evaluate(name, model, fit.state.params, test)
      for k, v in got.items():
        results[name][k].append(v)
      ms[name].append(fit.ms_per_step)
      echo(f"seed {seed} {name:14s} " + ", ".join(f"{k} {v:.4f}" for k, v in got.items()))
  return {"results": results, "ms_per_step": ms, "oracle": oracle, "setting": setting}


def tables(res: dict) -> tuple[str, str, list]:
  """The per-model table (mean ± std over seeds), the paired table against both baselines, the stats."""
  r = res["results"]
  rows = [[m] + [_common.mean_std(r[m][k]) for k, _, _ in METRICS] for m in MODELS]
  rows.append(["(ground truth: unbiased CTR)", _common.mean_std(res["oracle"]["auc_unbiased"]), "", "1", "", ""])
  per_model = experiment.markdown_table(["model"] + [h for _, h, _ in METRICS], rows)
  paired_rows, stats = [], []
  for base in ("mmoe", "mmoe+position"):
    cells = [f"youtube - {base}"]
    for k, _, _ in METRICS:
      s = experiment.paired_stats(r["youtube"][k], r[base][k])
      stats.append((base, k, s))
      cells.append(_fmt(s))
    paired_rows.append(cells)
  paired = experiment.markdown_table(["difference (per seed)"] + [h for _, h, _ in METRICS], paired_rows)
  return per_model, paired, stats


def _fmt(s) -> str:
  if s.mean is None:
    return "n/a"
  se = "" if s.se is None else f" ± {s.se:.4f}"
  p = "" if s.p is None else f" (p {s.p:.3f}, {s.wins}/{s.n} seeds better)"
  return f"{s.mean:+.4f}{se}{p}"


def conclusion(res: dict, stats: list) -> str:
  """A verdict generated from the paired statistics (what the numbers support, with the seed count)."""
  n = len(res["setting"]["seeds"])
  by = {(b, k): s for b, k, s in stats}
  lines = []
  for base in ("mmoe", "mmoe+position"):
    s = by[base, "auc_unbiased"]
    g = by[base, "gauc_unbiased"]
    if s.mean is None:
      continue
    direction = "higher" if s.mean > 0 else "lower"
    if s.significant() and g.significant() and s.mean > 0 and g.mean > 0:
      verdict = (
        f"the shallow tower's served scores rank the unbiased clicks better than {base}'s: AUC {s.mean:+.4f} "
        f"({s.wins}/{s.n} seeds, sign-flip p = {s.p:.3f}), GAUC {g.mean:+.4f} ({g.wins}/{g.n}, p = {g.p:.3f})"
      )
    elif s.significant() and s.mean < 0:
      verdict = (
        f"the shallow tower's served scores rank the unbiased clicks worse than {base}'s "
        f"(AUC {s.mean:+.4f}, p = {s.p:.3f})"
      )
    else:
      verdict = (
        f"against {base} the AUC vs unbiased clicks is {direction} by {abs(s.mean):.4f} on average "
        f"({s.wins}/{s.n} seeds better); {n} seed(s) do not establish a difference at p < 0.05"
      )
    lines.append(verdict)
  sat = by["mmoe", "auc_satisfaction"]
  if sat.mean is not None:
    sig = "significant" if sat.significant() else "not significant"
    lines.append(
      f"the satisfaction AUC, a task the position does not affect, moves by {sat.mean:+.4f} against mmoe "
      f"({sat.wins}/{sat.n} seeds better, {sig} at p < 0.05)"
    )
  return "Conclusion: " + "; ".join(lines) + "."


def plot(res: dict):
  """Per metric: each seed's value per model, one grey line per seed (the pairing), the mean as a bar
  tick; the y axis is the metric's own range (no bars: a bar whose base is not 0 would exaggerate)."""
  plt = _common.pyplot()
  from mtjax._src.plotting import method_colors  # pylint: disable=import-outside-toplevel

  keys = [k for k, _, _ in METRICS[:3]]
  fig, axes = plt.subplots(1, len(keys), figsize=(3.6 * len(keys), 3.4))
  colors = method_colors(list(MODELS))
  x = np.arange(len(MODELS))
  for ax, k in zip(axes, keys):
    vals = np.array([res["results"][m][k] for m in MODELS])  # [M, S]
    for s in range(vals.shape[1]):
      ax.plot(x, vals[:, s], color="0.75", lw=0.8, zorder=1)
    for i, m in enumerate(MODELS):
      ax.scatter(np.full(vals.shape[1], i), vals[i], s=14, color=colors[m], edgecolor="black", lw=0.4, zorder=2)
      mean = float(vals[i].mean())
      ax.hlines(mean, i - 0.25, i + 0.25, color=colors[m], lw=2.5, zorder=3)
      ax.annotate(f"{mean:.4f}", (i + 0.27, mean), va="center", fontsize=7.5)
    ax.set_xticks(x, list(MODELS), fontsize=8)
    ax.set_xlim(-0.5, len(MODELS) - 0.2)
    ax.set_title(dict((a, b) for a, b, _ in METRICS)[k], fontsize=9)
    ax.grid(axis="y", alpha=0.25)
  n = len(res["setting"]["seeds"])
  fig.suptitle(
    f"served click scores against the position-free ground truth (higher is better)\n"
    f"dots: {n} seed(s), grey lines join a seed's models, ticks: means",
    fontsize=9,
  )
  fig.tight_layout(rect=(0, 0, 1, 0.95))
  return fig


def main(argv: Optional[Sequence[str]] = None) -> dict:
  p = _common.parser(NAME, "Position debiasing with the YouTube ranker's shallow tower against two MMoE baselines.")
  p.add_argument("--seeds", type=int, default=None, help="number of seeds (default 8, --fast 1)")
  p.add_argument("--steps", type=int, default=None, help="training steps (default 3000, --fast 150)")
  args = p.parse_args(argv)
  _common.use_agg()
  setting = copy.deepcopy(FAST if args.fast else FULL)
  if args.seeds:
    setting["seeds"] = list(range(args.seeds))
  if args.steps:
    setting["train"]["steps"] = args.steps
  out = _common.out_dir(args.out, NAME)
  with _common.Timer() as timer:
    res = run(setting)
  per_model, paired, stats = tables(res)
  d, t = setting["data"], setting["train"]
  text = (
    f"Position debiasing (data: position_bias_synthetic, {d['num_samples']} impressions, position bias "
    f"{d['position_bias']}, device effect {d['device_effect']}, promotion {d['promotion']}; "
    f"{t['steps']} steps of batch {t['batch_size']}, Adam {t['learning_rate']}, linear scalarization; "
    f"test split {setting['test_fraction']}; mean ± std over {len(setting['seeds'])} seed(s)). "
    "Scores are the served ones (YouTube ranker: shallow tower left out; mmoe+position: position 0); "
    "AUC logged clicks uses the logged positions.\n\n"
    f"{per_model}\n\nPaired per seed (mean ± s.e. of the differences, exact sign-flip p):\n\n{paired}\n\n"
    f"{conclusion(res, stats)}\n\nwall time {timer.seconds:.1f} s on {jax.devices()[0].device_kind}"
  )
  print(text)
  _common.write_text(os.path.join(out, "table.md"), text)
  _common.write_json(
    os.path.join(out, "results.json"),
    res,
  )
  _common.save(plot(res), os.path.join(out, "debiasing.png"))
  print(f"table, results and debiasing.png in {out}")
  res["text"] = text
  res["out"] = out
  return res


if __name__ == "__main__":
  main()
