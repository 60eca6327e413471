"""The research scripts: each runs in --fast mode, prints its table and writes its figures.

The scripts are imported from research/ (not a package) and their ``main`` is called in-process.
Besides the smoke runs, the pieces a reader must be able to trust (the toy objectives and their
Pareto front, the paper's model sizes, the depth grouping, the table statistics) are checked
against hand-derived values and plain NumPy.
"""

import importlib
import json
import math
import os
import sys

import jax
import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RESEARCH = os.path.join(REPO, "research")


def _load(name):
  """Imports research/<name>.py (the folder is not a package; the scripts import _common from it)."""
  if RESEARCH not in sys.path:
    sys.path.insert(0, RESEARCH)
  module = importlib.import_module(name)
  assert os.path.dirname(os.path.abspath(module.__file__)) == RESEARCH
  return module


def _is_png(path):
  with open(path, "rb") as f:
    return f.read(8) == b"\x89PNG\r\n\x1a\n" and os.path.getsize(path) > 2000


# ------------------------------------------------------------------ the toy landscape


def test_toy_losses_hand_values():
  toy = _load("toy_landscape")
  t4 = math.tanh(4.0)
  cases = {
    # lower half-plane: c+ = 0, c- = tanh(-x2 / 2); the bowls h_i
    (0.0, -8.0): (t4 * (4.9 - 20.0), t4 * (4.9 - 20.0)),
    (7.0, -8.0): (t4 * -20.0, t4 * (19.6 - 20.0)),
    (-7.0, -8.0): (t4 * (19.6 - 20.0), t4 * -20.0),
    # the origin: c+ = c- = 0
    (0.0, 0.0): (0.0, 0.0),
  }
  for (x1, x2), (l1, l2) in cases.items():
    got = toy.toy_losses(np.array([x1, x2]), xp=np)
    np.testing.assert_allclose(got, [l1, l2], rtol=1e-12, atol=1e-12)
  # upper half-plane, deep in task 1's valley: |0.5(-x1 - 7) - tanh(-x2)| = 0 -> log(eps) + 6
  x2 = 9.0
  x1 = -7.0 - 2.0 * math.tanh(-x2)
  got = toy.toy_losses(np.array([x1, x2]), xp=np)
  assert got[0] == pytest.approx(math.tanh(4.5) * (math.log(5e-6) + 6.0), rel=1e-9)
  # jax and numpy versions agree
  pts = np.random.default_rng(0).uniform(-10, 10, (50, 2))
  np.testing.assert_allclose(
    np.asarray(toy.toy_losses(pts.astype(np.float32))), toy.toy_losses(pts, xp=np), rtol=1e-4, atol=1e-4
  )


def test_toy_pareto_front_and_gap():
  toy = _load("toy_landscape")
  front, points = toy.pareto_front(401)
  # non-dominated and sorted: L1 increasing, L2 strictly decreasing
  assert np.all(np.diff(front[:, 0]) >= 0) and np.all(np.diff(front[:, 1]) < 0)
  # the front's ends are the two bowl minima (-20 * tanh(~4) for one task)
  assert front[0, 0] < -19.9 and front[-1, 1] < -19.9
  # the Pareto set is the segment x1 in [-7, 7] near x2 = -8
  assert np.all(np.abs(points[:, 0]) <= 7.05) and np.all(np.abs(points[:, 1] + 8.3) < 1.0)
  # brute-force check of non-domination on a coarse random sample (plain NumPy)
  sample = toy.toy_losses(np.random.default_rng(1).uniform(-10, 10, (4000, 2)), xp=np).T
  for f in front[:: max(1, len(front) // 50)]:
    assert not np.any((sample[:, 0] < f[0] - 1e-9) & (sample[:, 1] < f[1] - 1e-9))
  # dominance gap: ~0 on the front, the origin (0, 0) is dominated by ~15
  assert np.all(toy.dominance_gap(front[::7], front) <= 1e-12)
  gap0 = toy.dominance_gap(np.array([0.0, 0.0]), front)[0]
  loop = max(min(0.0 - f1, 0.0 - f2) for f1, f2 in front)
  assert gap0 == pytest.approx(loop) and gap0 > 14.0


def test_toy_landscape_fast(tmp_path, capsys):
  toy = _load("toy_landscape")
  res = toy.main(["--fast", "--out", str(tmp_path)])
  out = capsys.readouterr().out
  assert "| method" in out and "reached" in out
  for m in toy.FAST.methods:
    assert f"| {m}" in out
    traj = res["methods"][m]["trajectories"]
    assert traj.shape == (len(toy.INITS), toy.FAST.steps // toy.FAST.record_every + 1, 2)
    assert np.all(np.isfinite(traj))
    np.testing.assert_allclose(traj[:, 0], np.asarray(toy.INITS, np.float32))
    # every method lowers the summed loss from every start
    start, end = toy.toy_losses(traj[:, 0], xp=np).sum(0), toy.toy_losses(traj[:, -1], xp=np).sum(0)
    assert np.all(end < start)
  # MGDA moves along common descent directions: it reaches the front from every start
  assert res["methods"]["mgda"]["reached"].all()
  for f in ("trajectories.png", "loss_space.png"):
    assert _is_png(tmp_path / f)
  assert (tmp_path / "table.md").read_text().startswith("Final (L1, L2)")


# ------------------------------------------------------------------ MMoE synthetic ablation


def test_mmoe_paper_sizes():
  ab = _load("mmoe_synthetic_ablation")
  cfg = ab.FULL
  x = np.zeros((2, cfg.dim), np.float32)
  counts = {
    n: ab.count_params(jax.eval_shape(m.init, jax.random.PRNGKey(0), x)["params"])
    for n, m in ab.build_models(cfg).items()
  }
  d, e, h, k, b = cfg.dim, cfg.num_experts, cfg.expert_units, cfg.tower_units, cfg.bottom_units
  tower = lambda width: width * k + k + k + 1  # one ReLU layer + linear output
  assert counts["Shared-Bottom"] == d * b + b + 2 * tower(b)
  assert counts["OMoE"] == e * (d * h + h) + d * e + 2 * tower(h)  # one gate, no bias
  assert counts["MMoE"] == e * (d * h + h) + 2 * d * e + 2 * tower(h)
  # the paper's sizes: 8 experts x 16 units, towers of 8, a 113-unit bottom
  assert (d, e, h, k, b) == (100, 8, 16, 8, 113)
  assert abs(counts["Shared-Bottom"] - counts["MMoE"]) / counts["MMoE"] < 0.15


def test_mmoe_paired_statistics():
  ab = _load("mmoe_synthetic_ablation")
  a, b = np.array([2.0, 3.0, 1.5, 4.0]), np.array([1.0, 2.0, 1.0, 2.0])
  r = np.log(a / b)
  p = ab.paired(a, b)
  se = math.sqrt(sum((v - r.mean()) ** 2 for v in r) / 3) / 2  # sample std / sqrt(n), by hand
  assert p["log_mean"] == pytest.approx(r.mean()) and p["log_se"] == pytest.approx(se)
  assert p["ratio"] == pytest.approx(math.exp(r.mean())) and p["t"] == pytest.approx(r.mean() / se)
  assert (p["above"], p["below"], p["n"]) == (4, 0, 4)
  same = ab.summary([0.5, 0.5, 0.5])  # no spread: infinitely many standard errors from 0
  assert same["log_se"] == 0.0 and same["t"] == math.inf
  one = ab.summary([0.3])  # one seed: no standard error, never significant
  assert math.isnan(one["log_se"]) and math.isnan(one["t"])
  assert ab.summary([0.0, 0.0])["t"] == 0.0


def _trend_res(losses):
  return {"config": {"correlations": [0.5, 0.9, 1.0]}, "losses": {"end": np.asarray(losses, np.float64)}}


def test_mmoe_trends_logic():
  ab = _load("mmoe_synthetic_ablation")
  noise = np.array([1.0, 1.1, 0.9, 1.05])  # per-seed difficulty, shared by every run of a seed
  jitter = np.array([[1.0, 1.02, 0.98, 1.0], [1.01, 0.99, 1.0, 1.0], [0.99, 1.0, 1.01, 1.0]])
  # [model, corr, seed]: SB 3/2/1, OMoE 2.5/1.5/0.9, MMoE 0.9/0.85/0.8 (x difficulty x jitter)
  base = np.array([[3.0, 2.0, 1.0], [2.5, 1.5, 0.9], [0.9, 0.85, 0.8]])
  losses = base[:, :, None] * noise[None, None, :] * jitter[None, :, :]
  tr = ab.trends(_trend_res(losses))
  assert tr["every_model_better_at_higher_correlation"] and tr["mmoe_degrades_least"]
  assert tr["both_moe_beat_shared_bottom"]
  # the paired degradation is the per-seed log ratio; difficulty cancels, the jitter does not
  for i, m in enumerate(ab.MODEL_NAMES):
    ref = np.log(losses[i, 0] / losses[i, 2])
    assert tr["degradation"][m]["log_mean"] == pytest.approx(ref.mean())
    assert tr["better_at_higher"][m]["lowest_vs_highest"]["above"] == 4
  d = np.log(losses[2, 0] / losses[2, 2]) - np.log(losses[0, 0] / losses[0, 2])
  assert tr["mmoe_degradation_minus"]["Shared-Bottom"]["log_mean"] == pytest.approx(d.mean())
  assert tr["mmoe_degradation_minus"]["Shared-Bottom"]["below"] == 4
  won = tr["moe_vs_shared_bottom"]["MMoE"]["pooled"]
  assert (won["below"], won["n"]) == (12, 12)

  # MMoE worse at 0.9 than at 0.5 in every seed: its ordering fails although 0.5 vs 1.0 still holds
  broken = losses.copy()
  broken[2, 1] = broken[2, 0] * 1.05
  tr = ab.trends(_trend_res(broken))
  assert tr["better_at_higher"]["MMoE"]["lowest_vs_highest"]["t"] > ab.SIGNIFICANT
  assert not tr["better_at_higher"]["MMoE"]["holds"] and not tr["every_model_better_at_higher_correlation"]
  assert tr["better_at_higher"]["Shared-Bottom"]["holds"] and tr["better_at_higher"]["OMoE"]["holds"]

  # OMoE loses to Shared-Bottom at correlation 1.0 in every seed: claim 3 fails for OMoE only
  broken = losses.copy()
  broken[1, 2] = broken[0, 2] * 1.1
  tr = ab.trends(_trend_res(broken))
  assert not tr["both_moe_beat_shared_bottom"]
  assert not tr["moe_vs_shared_bottom"]["OMoE"]["holds"] and tr["moe_vs_shared_bottom"]["MMoE"]["holds"]
  assert tr["moe_vs_shared_bottom"]["OMoE"]["per_correlation"][2]["below"] == 0

  # a mean in the right direction but within the seed noise is not evidence
  rng = np.random.default_rng(0)
  flat = np.exp(rng.normal(0.0, 0.5, (3, 3, 4)))
  flat[:, 0] = flat[:, 2] * np.array([1.5, 0.8, 1.3, 0.9])  # mean log ratio > 0, t < 2
  tr = ab.trends(_trend_res(flat))
  p = tr["better_at_higher"]["Shared-Bottom"]["lowest_vs_highest"]
  assert p["log_mean"] > 0 and p["t"] < ab.SIGNIFICANT and not tr["better_at_higher"]["Shared-Bottom"]["holds"]
  # the text says the same
  text = ab.verdict(_trend_res(losses) | {"models": {}})
  assert text.count(": yes") == 4 + 1 + 3 and "NO" not in text


def test_mmoe_end_window():
  ab = _load("mmoe_synthetic_ablation")
  steps = np.arange(100, 2001, 100)
  assert np.flatnonzero(ab.end_mask(steps, ab.FULL)).tolist() == [18, 19]  # steps 1900 and 2000
  assert ab.end_mask(np.array([40, 80, 120]), ab.FAST).tolist() == [False, False, True]


def test_mmoe_synthetic_ablation_fast(tmp_path, capsys):
  ab = _load("mmoe_synthetic_ablation")
  res = ab.main(["--fast", "--out", str(tmp_path)])
  out = capsys.readouterr().out
  assert "| model" in out and "Paper's trends" in out and "End of training" in out and "learning curve" in out
  for m in ab.MODEL_NAMES:
    assert f"| {m}" in out
  cfg = ab.FAST
  for metric in ("end", "curve"):
    loss = res["losses"][metric]
    assert loss.shape == (3, len(cfg.correlations), len(cfg.seeds))
    assert np.all(np.isfinite(loss)) and np.all(loss > 0)
  # the end-of-training loss is the mean of the last evaluations of the selected curve (NumPy)
  for i, m in enumerate(ab.MODEL_NAMES):
    curve = ab.selected_curves(res, m)  # [K, C, S]
    mask = ab.end_mask(res["models"][m]["steps"], cfg)
    np.testing.assert_allclose(res["losses"]["end"][i], curve[mask].mean(0), rtol=1e-6)
    np.testing.assert_allclose(res["losses"]["curve"][i], curve.mean(0), rtol=1e-6)
    # training lowers the test loss of every model (first vs last evaluation, mean over replicas)
    assert curve[-1].mean() < curve[0].mean()
  assert res["label_corr"].shape == (len(cfg.correlations), len(cfg.seeds))
  assert np.all(res["label_corr"][-1] > 0.95)  # p = 1: the labels differ by the noise only
  for f in ("loss_vs_correlation.png", "learning_curves_test.png", "learning_curves_train.png", "correlation_gap.png"):
    assert _is_png(tmp_path / f)
  saved = json.loads((tmp_path / "results.json").read_text())
  assert set(saved["trends"]) == {"end", "curve"} and np.asarray(saved["losses"]["end"]).shape == (3, 3, 2)


def test_mmoe_replica_data_paired():
  ab = _load("mmoe_synthetic_ablation")
  import dataclasses

  cfg = dataclasses.replace(
    ab.FAST, seeds=(0, 1), learning_rates=(1e-3, 1e-2), num_train=64, num_valid=8, num_test=8, batch_size=16
  )
  arrays = ab.make_data(cfg)
  raw = ab.make_data(dataclasses.replace(cfg, standardize_labels=False))
  reps = ab.data_replicas(cfg)
  assert reps == [(p, s) for p in cfg.correlations for s in (0, 1)]
  assert arrays["x_train"].shape == (len(reps), 64, cfg.dim) and arrays["y_train"].shape == (len(reps), 2, 64)
  for r, (p, s) in enumerate(reps):
    ref = ab.data_lib.mmoe_synthetic(80, p, dim=cfg.dim, noise=cfg.noise, seed=s)
    np.testing.assert_array_equal(arrays["x_train"][r], ref.features[:64])
    np.testing.assert_array_equal(raw["y_test"][r], ref.labels[:, 72:])
    # standardized with the training split's statistics, applied to every split
    mean = ref.labels[:, :64].astype(np.float64).mean(1, keepdims=True)
    std = ref.labels[:, :64].astype(np.float64).std(1, keepdims=True)
    np.testing.assert_allclose(arrays["y_train"][r].mean(1), 0.0, atol=1e-5)
    np.testing.assert_allclose(arrays["y_train"][r].std(1), 1.0, atol=1e-5)
    np.testing.assert_allclose(arrays["y_test"][r], (ref.labels[:, 72:] - mean) / std, rtol=1e-5, atol=1e-5)
    assert abs(arrays["label_corr"][r] - np.corrcoef(ref.labels[:, :64].astype(np.float64))[0, 1]) < 1e-9
  # pairing: a seed's task-1 labels are the same at every correlation, task 2's are not
  first = {s: r for r, (p, s) in enumerate(reps) if p == cfg.correlations[0]}
  for r, (p, s) in enumerate(reps):
    np.testing.assert_array_equal(raw["y_train"][r, 0], raw["y_train"][first[s], 0])
    if p != cfg.correlations[0]:
      assert not np.array_equal(raw["y_train"][r, 1], raw["y_train"][first[s], 1])
  # batches: each epoch is a permutation of the training set
  idx = ab.batch_indices(cfg, [0, 1], 0, 8)  # two epochs of 4 batches, two replica seeds
  assert idx.shape == (2, 8, 16)
  for r in range(2):
    for e in range(2):
      assert sorted(idx[r, 4 * e : 4 * (e + 1)].ravel().tolist()) == list(range(64))
  assert not np.array_equal(idx[0], idx[1]) and not np.array_equal(idx[0, :4], idx[0, 4:])


# ------------------------------------------------------------------ gradient similarity


def test_similarity_helpers():
  gs = _load("gradient_similarity")
  paths = [
    "bottom/Dense_0/bias",
    "bottom/Dense_0/kernel",
    "bottom/Dense_10/kernel",
    "input/embedding/embed_cat_0/embedding",
    "bottom/Dense_2/kernel",
  ]
  assert gs.depth_groups(paths) == [0, 0, 10, -1, 2]
  assert gs.layer_names(gs.FULL) == ["layer 1 (input)", "layer 2", "layer 3", "layer 4 (top)"]
  rng = np.random.default_rng(0)
  cos = rng.uniform(-1, 1, (4, 5, 3, 3))
  ref = np.zeros((4, 5))
  for a in range(4):
    for b in range(5):
      ref[a, b] = np.mean([cos[a, b, i, j] for i in range(3) for j in range(3) if i < j])
  np.testing.assert_allclose(gs.pair_cosine(cos), ref)
  w = gs.windows(100)
  assert (w["early"], w["mid"], w["late"]) == (slice(0, 10), slice(50, 75), slice(75, 100))
  assert all(len(range(2)[s]) >= 1 for s in gs.windows(2).values())


def test_similarity_groups_match_numpy():
  """The per-layer cosines the script tracks equal a plain NumPy float64 computation per layer."""
  gs = _load("gradient_similarity")
  import mtjax

  rng = np.random.default_rng(3)
  params = {
    "bottom": {f"Dense_{i}": {"kernel": rng.normal(size=(3, 4)), "bias": rng.normal(size=4)} for i in range(3)},
    "tower_0": {"Dense_0": {"kernel": rng.normal(size=(4, 1))}},
  }
  grads = jax.tree.map(lambda p: rng.normal(size=(2,) + p.shape).astype(np.float32), params)
  grads["bottom"]["Dense_1"] = jax.tree.map(np.zeros_like, grads["bottom"]["Dense_1"])  # a zero layer
  cos = np.asarray(
    mtjax.analysis.cosine_similarity(grads, granularity=gs.depth_groups, shared=mtjax.shared_mask(exclude="tower_"))
  )
  assert cos.shape == (3, 2, 2)
  for i in range(3):
    layer = grads["bottom"][f"Dense_{i}"]
    g = np.stack([np.concatenate([layer["kernel"][t].ravel(), layer["bias"][t].ravel()]) for t in range(2)])
    g = g.astype(np.float64)
    n = np.linalg.norm(g, axis=1)
    ref = 0.0 if np.any(n == 0) else g[0] @ g[1] / (n[0] * n[1])
    assert cos[i, 0, 1] == pytest.approx(ref, abs=1e-5)
  assert cos[1, 0, 1] == 0.0 and np.all(np.isfinite(cos))


def test_gradient_similarity_fast(tmp_path, capsys):
  gs = _load("gradient_similarity")
  res = gs.main(["--fast", "--out", str(tmp_path)])
  out = capsys.readouterr().out
  assert "| layer" in out and "| layer 1 (input)" in out and "| whole model" in out and "| pcgrad" in out
  cfg = gs.FAST
  assert set(res["runs"]) == {(m, p) for m in cfg.methods for p in cfg.correlations}
  for r in res["runs"].values():
    k = len(cfg.bottom)
    c = r["cosine_groups"]
    assert c.shape == (len(cfg.seeds), cfg.steps // cfg.log_every, k, 2, 2)
    # block means of cosine matrices: symmetric, in [-1, 1], unit diagonal (no zero gradient here)
    np.testing.assert_allclose(c, np.swapaxes(c, -1, -2), atol=1e-5)
    assert np.all(np.abs(c) <= 1 + 1e-5)
    np.testing.assert_allclose(np.diagonal(c, axis1=-2, axis2=-1), 1.0, atol=1e-4)
    assert np.all(np.abs(r["alignment"]) <= 1 + 1e-5)
    # with two tasks the conflict indicator is "cosine < 0": its block mean lies in [0, 1]
    assert np.all((r["conflict"] >= 0) & (r["conflict"] <= 1))
  # linear's update is the sum of the two gradients: it never points against both of them
  lin = res["runs"]["linear", cfg.correlations[0]]["alignment"]
  assert np.all(lin.max(-1) > 0)
  for f in (
    "similarity_over_steps.png",
    "similarity_by_layer_and_correlation.png",
    "layer_step_heatmap.png",
    "heatmaps.png",
    "alignment.png",
  ):
    assert _is_png(tmp_path / f)


# ------------------------------------------------------------------ method comparison


def test_method_comparison_fast(tmp_path, capsys):
  mc = _load("method_comparison")
  res = mc.main(["--fast", "--out", str(tmp_path)])
  out = capsys.readouterr().out
  assert "| method" in out and "Δm% vs linear" in out and "ms/step" in out
  for m in mc.FAST["methods"]:
    assert f"| {m}" in out
    row = res["table"][m]
    # two binary tasks (AUC) and a regression task (MSE)
    assert len(row["mean"]) == 3 and all(0.0 <= v <= 1.0 for v in row["mean"][:2]) and row["mean"][2] > 0
    assert row["macro"] == pytest.approx(np.mean(row["mean"][:2]))  # the macro AUC leaves the MSE out
    assert row["ms_per_step"] > 0
  assert "task_2 MSE" in out and "macro AUC" in out
  assert res["table"]["linear"]["delta_m"] == 0.0
  # Delta_m% recomputed in plain NumPy: AUC higher is better, MSE lower is better
  base = np.asarray(res["table"]["linear"]["mean"])
  sign = np.array([1.0, 1.0, -1.0])
  for m in mc.FAST["methods"]:
    ref = 100.0 * np.mean(sign * (np.asarray(res["table"][m]["mean"]) - base) / base)
    assert res["table"][m]["delta_m"] == pytest.approx(ref, abs=1e-9)
  for f in ("learning_curves.png", "delta_m_and_speed.png", "conflict_over_steps.png", "task_weights.png"):
    assert _is_png(tmp_path / f)
  assert "Δm%" in (tmp_path / "table.md").read_text()


# ------------------------------------------------------------------ position debiasing


def test_position_bias_fast(tmp_path, capsys):
  pb = _load("position_bias")
  res = pb.main(["--fast", "--out", str(tmp_path)])
  out = capsys.readouterr().out
  assert "AUC vs unbiased clicks" in out and "youtube - mmoe" in out and "Conclusion:" in out
  for m in pb.MODELS:
    assert f"| {m} " in out
    for k, _, _ in pb.METRICS:
      assert 0.0 < res["results"][m][k][0] < 1.0, (m, k)
  assert _is_png(tmp_path / "debiasing.png")
  saved = json.load(open(tmp_path / "results.json"))
  assert saved["results"]["youtube"]["auc_unbiased"] == res["results"]["youtube"]["auc_unbiased"]


def test_position_bias_metrics_and_conclusion():
  pb = _load("position_bias")
  rng = np.random.default_rng(0)
  a, b = rng.normal(size=50), rng.normal(size=50)
  ranks = lambda v: np.argsort(np.argsort(v)).astype(float)
  assert pb.spearman(a, b) == pytest.approx(np.corrcoef(ranks(a), ranks(b))[0, 1])
  assert pb.spearman(a, 3 * a + 1) == pytest.approx(1.0)
  # The conclusion follows the paired statistics: 8 seeds all better is significant, 1 seed is not.
  keys = [k for k, _, _ in pb.METRICS]
  better = {m: {k: [0.70 + 0.01 * (m == "youtube") + 0.001 * s for s in range(8)] for k in keys} for m in pb.MODELS}
  res = {"results": better, "setting": {"seeds": list(range(8))}}
  text = pb.conclusion(res, pb.tables({**res, "oracle": {"auc_unbiased": [0.9] * 8}})[2])
  assert "rank the unbiased clicks better than mmoe's" in text and "p = 0.008" in text
  one = {m: {k: v[:1] for k, v in r.items()} for m, r in better.items()}
  res1 = {"results": one, "setting": {"seeds": [0]}}
  text1 = pb.conclusion(res1, pb.tables({**res1, "oracle": {"auc_unbiased": [0.9]}})[2])
  assert "do not establish a difference" in text1
