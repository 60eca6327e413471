"""Tests for mtjax.metrics against brute-force float64 references written here."""

import doctest
import math

import numpy as np
import pytest

from mtjax import metrics


def brute_auc(y, s):
  """O(n^2) Mann-Whitney: fraction of (pos, neg) pairs ranked correctly, ties 1/2."""
  pos = [s[i] for i in range(len(y)) if y[i] == 1]
  neg = [s[i] for i in range(len(y)) if y[i] == 0]
  if not pos or not neg:
    return float("nan")
  total = 0.0
  for a in pos:
    for b in neg:
      total += 1.0 if a > b else (0.5 if a == b else 0.0)
  return total / (len(pos) * len(neg))


def brute_gauc(y, s, g, uniform=False):
  num = den = 0.0
  for group in sorted(set(g.tolist())):
    idx = [i for i in range(len(g)) if g[i] == group]
    a = brute_auc(y[idx], s[idx])
    if math.isnan(a):
      continue
    w = 1.0 if uniform else len(idx)
    num += w * a
    den += w
  return num / den if den else float("nan")


def test_doctests():
  result = doctest.testmod(metrics, optionflags=doctest.NORMALIZE_WHITESPACE)
  assert result.attempted > 0 and result.failed == 0


@pytest.mark.parametrize("seed", range(25))
def test_auc_matches_pairwise_reference_with_ties(seed):
  rng = np.random.default_rng(seed)
  n = int(rng.integers(2, 60))
  y = rng.integers(0, 2, n)
  # few distinct values -> many ties, within and across classes
  s = rng.integers(0, 5, n).astype(np.float32) / 4 if seed % 2 else rng.normal(size=n)
  got = metrics.auc(y, s)
  want = brute_auc(y, s)
  if math.isnan(want):
    assert math.isnan(got)
  else:
    assert got == pytest.approx(want, abs=1e-12)


def test_auc_properties():
  rng = np.random.default_rng(0)
  y = rng.integers(0, 2, 200)
  s = rng.normal(size=200) + y
  a = metrics.auc(y, s)
  assert 0.5 < a < 1.0
  assert metrics.auc(y, np.exp(3 * s)) == pytest.approx(a, abs=1e-12)  # only the order matters
  assert metrics.auc(1 - y, s) == pytest.approx(1 - a, abs=1e-12)
  assert metrics.auc(y.astype(bool), s) == pytest.approx(a, abs=1e-12)
  assert metrics.auc(y, np.zeros(200)) == 0.5  # all tied
  assert metrics.auc(y, y) == 1.0


def test_auc_single_class_and_errors():
  assert math.isnan(metrics.auc([0, 0, 0], [0.1, 0.2, 0.3]))
  assert math.isnan(metrics.auc([1], [0.1]))
  with pytest.raises(ValueError, match="mtjax: auc: labels must be binary"):
    metrics.auc([0, 2], [0.1, 0.2])
  with pytest.raises(ValueError, match="NaN or inf"):
    metrics.auc([0, 1], [0.1, np.nan])
  with pytest.raises(ValueError, match="entries"):
    metrics.auc([0, 1], [0.1, 0.2, 0.3])


@pytest.mark.parametrize("seed", range(25))
def test_gauc_matches_reference(seed):
  rng = np.random.default_rng(100 + seed)
  n = int(rng.integers(5, 80))
  g = rng.integers(0, 8, n) * 7 - 3  # arbitrary, unsorted ids; some groups single-class
  y = rng.integers(0, 2, n)
  s = rng.integers(0, 4, n).astype(np.float64) if seed % 2 else rng.normal(size=n)
  for uniform in (False, True):
    got = metrics.gauc(y, s, g, weighting="uniform" if uniform else "impressions")
    want = brute_gauc(y, s, g, uniform=uniform)
    if math.isnan(want):
      assert math.isnan(got)
    else:
      assert got == pytest.approx(want, abs=1e-12)


def test_gauc_single_class_groups_are_skipped():
  y = np.array([1, 0, 1, 1, 1, 0, 0])
  s = np.array([0.9, 0.1, 0.3, 0.2, 0.5, 0.6, 0.4])
  g = np.array(["a", "a", "b", "b", "c", "c", "c"])  # b is single-class, string ids
  # a: AUC 1 (n=2); c: positive 0.5 vs negatives 0.6, 0.4 -> 0.5 (n=3)
  assert metrics.gauc(y, s, g) == pytest.approx((2 * 1.0 + 3 * 0.5) / 5, abs=1e-15)
  assert math.isnan(metrics.gauc([1, 1, 0], [0.1, 0.2, 0.3], [0, 0, 1]))
  # one group == AUC
  rng = np.random.default_rng(3)
  y, s = rng.integers(0, 2, 50), rng.normal(size=50)
  assert metrics.gauc(y, s, np.zeros(50)) == pytest.approx(metrics.auc(y, s), abs=1e-15)


def test_logloss_matches_formula():
  rng = np.random.default_rng(0)
  y = rng.integers(0, 2, 100).astype(np.float64)
  p = rng.uniform(0.01, 0.99, 100)
  want = -np.mean([yi * math.log(pi) + (1 - yi) * math.log(1 - pi) for yi, pi in zip(y, p)])
  assert metrics.logloss(y, p) == pytest.approx(want, rel=1e-12)
  # soft labels
  ys = rng.uniform(0, 1, 100)
  want = -np.mean([yi * math.log(pi) + (1 - yi) * math.log(1 - pi) for yi, pi in zip(ys, p)])
  assert metrics.logloss(ys, p) == pytest.approx(want, rel=1e-12)
  # clipping: p = 0 for a positive costs -log(eps)
  assert metrics.logloss([1.0], [0.0]) == pytest.approx(-math.log(1e-7), rel=1e-12)
  assert metrics.logloss([0.0], [1.0], eps=1e-3) == pytest.approx(-math.log(1e-3), rel=1e-9)
  assert metrics.logloss([1.0, 0.0], [1.0, 0.0], eps=0) == 0.0
  # from logits, including huge logits, agrees with the probability form
  x = rng.normal(size=100) * 3
  pr = 1 / (1 + np.exp(-x))
  assert metrics.logloss(y, x, from_logits=True) == pytest.approx(metrics.logloss(y, pr, eps=0), rel=1e-10)
  assert metrics.logloss([1.0, 0.0], [-50.0, 50.0], from_logits=True) == pytest.approx(50.0, rel=1e-12)
  with pytest.raises(ValueError, match="from_logits"):
    metrics.logloss([1.0], [2.0])


@pytest.mark.parametrize("metric", [metrics.auc, metrics.logloss])
def test_per_task_masks_and_macro(metric):
  rng = np.random.default_rng(7)
  t, b = 3, 40
  y = rng.integers(0, 2, (t, b))
  s = rng.uniform(0.05, 0.95, (t, b))
  m = rng.uniform(size=(t, b)) < 0.6
  out = metrics.per_task(metric, y, s, m, names=("a", "b", "c"))
  assert list(out) == ["a", "b", "c", "macro"]
  want = []
  for k, name in enumerate("abc"):
    idx = [i for i in range(b) if m[k, i]]
    ref = (
      brute_auc(y[k, idx], s[k, idx])
      if metric is metrics.auc
      else -np.mean([y[k, i] * math.log(s[k, i]) + (1 - y[k, i]) * math.log(1 - s[k, i]) for i in idx])
    )
    assert out[name] == pytest.approx(ref, abs=1e-12)
    want.append(ref)
  assert out["macro"] == pytest.approx(np.mean(want), abs=1e-12)


def test_per_task_macro_skips_undefined_and_groups():
  y = np.array([[1, 0, 1, 0], [1, 1, 1, 1]])  # task 1 single-class -> nan AUC
  s = np.array([[0.9, 0.1, 0.2, 0.3], [0.1, 0.2, 0.3, 0.4]])
  out = metrics.per_task(metrics.auc, y, s)
  assert math.isnan(out["task_1"])
  assert out["macro"] == out["task_0"] == pytest.approx(brute_auc(y[0], s[0]))
  groups = np.array([0, 0, 1, 1])
  out = metrics.per_task(metrics.gauc, y, s, groups=groups, macro=False)
  assert out["task_0"] == pytest.approx(brute_gauc(y[0], s[0], groups))
  assert "macro" not in out
  with pytest.raises(ValueError, match="distinct task names"):
    metrics.per_task(metrics.auc, y, s, names=("x",))


def test_delta_m_worked_example():
  # AUC: (0.80 - 0.75) / 0.75 = +6.667%; logloss (lower is better): -(0.40 - 0.50) / 0.50 = +20%
  # MSE (lower is better, got worse): -(0.33 - 0.30) / 0.30 = -10%
  mtl = {"ctr_auc": 0.80, "logloss": 0.40, "mse": 0.33}
  base = {"mse": 0.30, "ctr_auc": 0.75, "logloss": 0.50}
  lower = {"ctr_auc": False, "logloss": True, "mse": True}
  want = (100 * 0.05 / 0.75 + 20.0 - 10.0) / 3
  assert metrics.delta_m(mtl, base, lower) == pytest.approx(want, rel=1e-12)
  assert metrics.delta_m([0.80, 0.40, 0.33], [0.75, 0.50, 0.30], [False, True, True]) == pytest.approx(want, rel=1e-12)
  assert metrics.delta_m([0.8, 0.6], [0.8, 0.6]) == 0.0
  assert metrics.delta_m([0.4], [0.5], True) == pytest.approx(20.0)


def test_delta_m_errors():
  with pytest.raises(ValueError, match="zero or non-finite for \\['b'\\]"):
    metrics.delta_m({"a": 1.0, "b": 1.0}, {"a": 1.0, "b": 0.0})
  with pytest.raises(ValueError, match="only in metrics \\['c'\\]"):
    metrics.delta_m({"a": 1.0, "c": 1.0}, {"a": 1.0, "b": 2.0})
  with pytest.raises(ValueError, match="same length"):
    metrics.delta_m([1.0, 2.0], [1.0])
  with pytest.raises(ValueError, match="lower_is_better has 3 entries"):
    metrics.delta_m([1.0, 2.0], [1.0, 2.0], [True, False, True])
  with pytest.raises(ValueError, match="'macro'"):
    metrics.delta_m({"a": 1.0, "macro": 1.0}, {"a": 1.0, "macro": 1.0})
  with pytest.raises(ValueError, match="lower_is_better names"):
    metrics.delta_m({"a": 1.0}, {"a": 2.0}, {"b": True})
  with pytest.raises(ValueError, match="non-finite metric"):
    metrics.delta_m([float("nan")], [1.0])
