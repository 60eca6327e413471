"""mtjax.fusion: the fusion rules against their formulas, the Pareto front against a brute-force
definition, the search's metrics against mtjax.metrics on the fused score, and the errors."""

import itertools

import numpy as np
import pytest

from mtjax import fusion
from mtjax import metrics


def _data(n=400, t=3, seed=0):
  rng = np.random.default_rng(seed)
  labels = rng.random((t, n)) < np.array([0.3, 0.2, 0.4])[:t, None]
  # each task's score sees its own label plus noise; tasks 0 and 1 partly share a signal
  shared = rng.random(n)
  scores = 0.35 * labels + 0.5 * rng.random((t, n)) + 0.15 * shared
  return np.clip(scores, 0.01, 0.99), labels


def test_rules_match_their_formulas():
  rng = np.random.default_rng(0)
  s = rng.uniform(0.01, 1.0, size=(3, 20))
  w = np.array([0.2, 0.5, 1.3])
  a = np.array([0.1, 1.0, 0.5])
  np.testing.assert_allclose(fusion.fuse(s, w), (w[:, None] * s).sum(0), rtol=1e-12)
  np.testing.assert_allclose(fusion.fuse(s, w, rule="weighted_product"), np.prod(s ** w[:, None], axis=0), rtol=1e-12)
  np.testing.assert_allclose(
    fusion.fuse(s, w, rule="exponent_product", alpha=a), np.prod((a[:, None] + s) ** w[:, None], axis=0), rtol=1e-12
  )
  # the ranking is invariant to the weights' scale (why the search samples the simplex)
  for rule, kw in (("weighted_sum", {}), ("weighted_product", {}), ("exponent_product", {"alpha": a})):
    r1 = np.argsort(fusion.fuse(s, w, rule=rule, **kw))
    r2 = np.argsort(fusion.fuse(s, 7.0 * w, rule=rule, **kw))
    np.testing.assert_array_equal(r1, r2)


def test_pareto_front_matches_brute_force():
  rng = np.random.default_rng(1)
  for _ in range(20):
    v = np.round(rng.random((15, 3)), 1)  # rounding makes ties and duplicates
    v[rng.integers(15)] = np.nan
    want = [
      i
      for i in range(15)
      if np.all(np.isfinite(v[i]))
      and not any(
        np.all(v[j] >= v[i]) and np.any(v[j] > v[i]) for j in range(15) if j != i and np.all(np.isfinite(v[j]))
      )
    ]
    assert fusion.pareto_front(v).tolist() == want


@pytest.mark.parametrize("rule", fusion.RULES)
def test_search_metrics_are_the_fused_scores_metrics(rule):
  scores, labels = _data()
  alpha = [0.05, 0.05, 0.05] if rule == "exponent_product" else None
  res = fusion.search(scores, labels, rule=rule, num_samples=40, seed=3, alpha=alpha, task_names=["a", "b", "c"])
  assert res.weights.shape == (44, 3) and res.metrics.shape == (44, 3)
  np.testing.assert_allclose(res.weights.sum(1), 1.0)
  np.testing.assert_array_equal(res.weights[:3], np.eye(3))  # the single-task ends are candidates
  for k in (0, 3, 17, 43):
    fused = fusion.fuse(scores, res.weights[k], rule=rule, alpha=alpha)
    for t in range(3):
      assert res.metrics[k, t] == metrics.auc(labels[t], fused)
  np.testing.assert_array_equal(res.pareto, fusion.pareto_front(res.metrics))
  for t in range(3):  # ranking by task t's own score: its own AUC is the front's best for that task
    assert res.single_task[t, t] == metrics.auc(labels[t], scores[t])
    assert res.single_task[t, t] >= res.metrics[:, t].max() - 1e-12
  # the equal-preference best is on the front; a preference for task 2 alone picks its own score
  assert res.best() in res.pareto
  assert res.metrics[res.best([0, 0, 1]), 2] == res.metrics[:, 2].max()
  table = res.table()
  assert "| a alone" in table and "front #" in table and "AUC c" in table
  same = fusion.search(scores, labels, rule=rule, num_samples=40, seed=3, alpha=alpha)
  np.testing.assert_array_equal(same.weights, res.weights)


def test_search_gauc_masks_and_candidates():
  scores, labels = _data(t=2)
  users = np.random.default_rng(4).integers(0, 30, scores.shape[1])
  masks = np.ones_like(labels)
  masks[1, ::3] = False  # task 1 observed on two thirds of the samples
  cand = np.array(list(itertools.product([0.0, 1.0, 2.0], repeat=2)))[1:]  # [8, 2], the all-zero row left out
  res = fusion.search(scores, labels, metric="gauc", groups=users, masks=masks, candidates=cand)
  assert res.weights.shape == (8, 2)
  k = 5
  fused = fusion.fuse(scores, res.weights[k])
  sel = masks[1].astype(bool)
  assert res.metrics[k, 1] == metrics.gauc(labels[1][sel], fused[sel], users[sel])
  assert res.metrics[k, 0] == metrics.gauc(labels[0], fused, users)


def test_plot(tmp_path):
  import matplotlib

  matplotlib.use("Agg")
  scores, labels = _data(t=2)
  fig = fusion.search(scores, labels, num_samples=30).plot()
  fig.savefig(tmp_path / "front.png")
  assert (tmp_path / "front.png").stat().st_size > 2000


@pytest.mark.parametrize(
  "call, match",
  [
    (lambda s, y: fusion.fuse(s[0], [1.0]), r"scores must be \[T, N\]"),
    (lambda s, y: fusion.fuse(s, [1.0, 1.0]), r"weights must be \[T\] = \(3,\)"),
    (lambda s, y: fusion.fuse(s, [1.0, -1.0, 0.0]), "finite and non-negative"),
    (lambda s, y: fusion.fuse(s - 1.0, [1.0, 1.0, 1.0], rule="weighted_product"), "needs positive scores"),
    (lambda s, y: fusion.fuse(s, [1, 1, 1], rule="exponent_product"), "needs alpha"),
    (lambda s, y: fusion.fuse(s, [1, 1, 1], rule="exponent_product", alpha=[0, 1, 1]), "positive offsets"),
    (lambda s, y: fusion.fuse(s, [1, 1, 1], alpha=[1, 1, 1]), "alpha applies to 'exponent_product' only"),
    (lambda s, y: fusion.fuse(s, [1, 1, 1], rule="max"), "unknown rule 'max'"),
    (lambda s, y: fusion.search(s, y[:2]), r"labels must be \[T, N\]"),
    (lambda s, y: fusion.search(s, y, metric="gauc"), "needs groups"),
    (lambda s, y: fusion.search(s, y, metric="ndcg"), "'auc' or 'gauc'"),
    (lambda s, y: fusion.search(s, y, candidates=[[1.0, -1.0, 0.0]]), "finite non-negative"),
    (lambda s, y: fusion.search(s, y, task_names=["a"]), "1 task names for 3 tasks"),
    (lambda s, y: fusion.pareto_front([1.0, 2.0]), r"values must be \[K, T\]"),
  ],
)
def test_errors(call, match):
  scores, labels = _data()
  with pytest.raises(ValueError, match=match):
    call(scores, labels)
