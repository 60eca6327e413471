"""Synthetic generators: determinism, the stated formulas (float64 references), task correlation,
the funnel's masks and ground truth, conflicting task directions."""

import numpy as np
import pytest

from mtjax import data


def _arrays(ds):
  feats = ds.features if isinstance(ds.features, dict) else {"x": ds.features}
  return list(feats.values()) + [ds.labels] + ([] if ds.masks is None else [ds.masks]) + list(ds.extras.values())


@pytest.mark.parametrize(
  "make",
  [
    lambda s: data.mmoe_synthetic(300, 0.7, dim=10, seed=s),
    lambda s: data.funnel_synthetic(300, seed=s),
    lambda s: data.conflicting_tasks(300, seed=s),
  ],
)
def test_deterministic_under_seed(make):
  a, b, c = make(3), make(3), make(4)
  for x, y in zip(_arrays(a), _arrays(b)):
    np.testing.assert_array_equal(x, y)
  assert not np.array_equal(a.labels, c.labels)


def test_mmoe_synthetic_matches_formula():
  p, dim, m = 0.3, 12, 10
  ds = data.mmoe_synthetic(500, p, dim=dim, scale=2.0, num_sines=m, noise=0.01, seed=5)
  w, alpha, beta = ds.metadata["w"], ds.metadata["alpha"], ds.metadata["beta"]
  assert w.shape == (2, dim) and alpha.shape == beta.shape == (m,)
  np.testing.assert_allclose(np.linalg.norm(w, axis=1), [2.0, 2.0], rtol=1e-12)
  np.testing.assert_allclose(w[0] @ w[1] / 4.0, p, atol=1e-12)  # cosine = p
  x = ds.features.astype(np.float64)
  for k in range(2):  # plain float64 reference, task by task
    z = x @ w[k]
    ref = z.copy()
    for i in range(m):
      ref += np.sin(alpha[i] * z + beta[i])
    resid = ds.labels[k] - ref
    assert np.abs(resid).max() < 0.06  # Gaussian noise of std 0.01 (+ float32 rounding)
    assert 0.005 < resid.std() < 0.015
  assert ds.task_types == ("regression", "regression") and ds.spec is None


def test_mmoe_label_correlation_falls_with_p():
  corr = []
  for p in (1.0, 0.9, 0.5):
    ds = data.mmoe_synthetic(20000, p, seed=0)
    y = ds.labels.astype(np.float64)
    corr.append(np.corrcoef(y[0], y[1])[0, 1])
  assert corr[0] > 0.999
  assert corr[0] > corr[1] + 0.1 and corr[1] > corr[2] + 0.1, corr


def test_mmoe_errors():
  with pytest.raises(ValueError, match="correlation"):
    data.mmoe_synthetic(10, 1.5)


def test_funnel_masks_labels_and_ground_truth():
  ds = data.funnel_synthetic(20000, ctr_rate=0.1, cvr_rate=0.2, seed=1)
  click, conv = ds.labels
  ex = ds.extras
  assert ds.task_names == ("click", "conversion")
  assert ds.masks[0].all()
  np.testing.assert_array_equal(ds.masks[1], click > 0)  # conversion observed only where clicked
  assert (conv <= click).all()  # no conversion without a click
  np.testing.assert_array_equal(conv, click * ex["conversion_if_clicked"])
  for name in ("true_ctr", "true_cvr", "true_ctcvr"):
    assert (ex[name] > 0).all() and (ex[name] < 1).all()
  np.testing.assert_allclose(ex["true_ctcvr"], ex["true_ctr"] * ex["true_cvr"], rtol=1e-6)
  assert abs(ex["true_ctr"].mean() - 0.1) < 0.01 and abs(ex["true_cvr"].mean() - 0.2) < 0.01
  assert abs(click.mean() - 0.1) < 0.01
  assert abs(ex["conversion_if_clicked"].mean() - 0.2) < 0.015
  # labels are drawn from the stated probabilities: calibration in deciles of the truth
  for label, prob in ((click, ex["true_ctr"]), (ex["conversion_if_clicked"], ex["true_cvr"])):
    edges = np.quantile(prob, np.linspace(0, 1, 6))
    bins = np.clip(np.searchsorted(edges, prob, side="right") - 1, 0, 4)
    for k in range(5):
      sel = bins == k
      assert abs(label[sel].mean() - prob[sel].mean()) < 0.03
  # categorical ids inside the spec vocabularies
  for f in ds.spec.categorical:
    assert ds.features[f.name].min() >= 0 and ds.features[f.name].max() < f.vocab_size
  np.testing.assert_array_equal(ex["user_id"], ds.features["user"])


def test_funnel_selection_bias_and_position_bias():
  gaps = {}
  for rho in (0.8, 0.0, -0.8):
    ds = data.funnel_synthetic(30000, correlation=rho, ctr_rate=0.2, seed=2)
    cvr, clicked = ds.extras["true_cvr"], ds.labels[0] > 0
    gaps[rho] = cvr[clicked].mean() - cvr.mean()  # clicked population vs all impressions
  assert gaps[0.8] > 0.02 and gaps[-0.8] < -0.02 and abs(gaps[0.0]) < 0.01, gaps
  ds = data.funnel_synthetic(30000, position_bias=0.5, seed=2)
  rate = [ds.extras["true_ctr"][ds.features["position"] == k].mean() for k in range(5)]
  assert all(a > b for a, b in zip(rate, rate[1:]))


def test_conflicting_tasks_matches_formula():
  ds = data.conflicting_tasks(3000, seed=4)
  md = ds.metadata
  w, cos = md["w"], md["task_cosines"]
  np.testing.assert_allclose(w @ w.T, cos, atol=1e-10)
  np.testing.assert_allclose(cos, [[1, 0.5, -0.5], [0.5, 1, -0.5], [-0.5, -0.5, 1]])
  # float64 reference: h = [tables[f][id_f] ..., dense], z_t = w_t . h, p_t = sigmoid(gamma g(z_t))
  h = np.concatenate(
    [md["tables"][f][ds.features[f"cat_{f}"]] for f in range(3)] + [ds.features["dense"].astype(np.float64)], axis=1
  )
  m = len(md["alpha"])
  for t in range(3):
    z = h @ w[t]
    g = z + md["nonlinearity"] / np.sqrt(m) * sum(np.sin(md["alpha"][i] * z + md["beta"][i]) for i in range(m))
    p = 1.0 / (1.0 + np.exp(-md["signal"] * g))
    np.testing.assert_allclose(ds.extras["true_probability"][:, t], p, atol=2e-6)
  assert set(np.unique(ds.labels)) <= {0.0, 1.0}
  assert ds.spec.names == ("cat_0", "cat_1", "cat_2", "dense")
  assert [f.vocab_size for f in ds.spec.categorical] == [20, 50, 100]


def test_conflicting_tasks_regression_task():
  kw = dict(num_samples=20000, seed=3)
  binary = data.conflicting_tasks(**kw)
  mixed = data.conflicting_tasks(
    **kw, task_types=("binary", "binary", "regression"), regression_scale=10.0, regression_noise=0.5
  )
  assert mixed.task_types == ("binary", "binary", "regression")
  # The binary tasks are the same draws; the regression target is s * (g + sigma * eps).
  np.testing.assert_array_equal(mixed.labels[:2], binary.labels[:2])
  md = mixed.metadata
  h = np.concatenate(
    [md["tables"][f][mixed.features[f"cat_{f}"]] for f in range(3)] + [mixed.features["dense"].astype(np.float64)],
    axis=1,
  )
  z = h @ md["w"][2]
  m = len(md["alpha"])
  g = z + md["nonlinearity"] / np.sqrt(m) * sum(np.sin(md["alpha"][i] * z + md["beta"][i]) for i in range(m))
  np.testing.assert_allclose(mixed.extras["true_mean"][:, 2], 10.0 * g, rtol=1e-5, atol=1e-4)
  np.testing.assert_array_equal(mixed.extras["true_mean"][:, :2], 0.0)
  residual = mixed.labels[2].astype(np.float64) - mixed.extras["true_mean"][:, 2]
  assert abs(residual.mean()) < 0.1 and abs(residual.std() - 5.0) < 0.1  # Bayes MSE (s sigma)^2 = 25
  # The regression task still conflicts with the binary ones, and is on a 10x larger scale.
  assert np.corrcoef(mixed.labels[0], mixed.labels[2])[0, 1] < -0.1
  assert mixed.labels[2].std() > 5 * mixed.labels[0].std()
  with pytest.raises(ValueError, match="task_types"):
    data.conflicting_tasks(10, 3, task_types=("binary", "regression"))
  with pytest.raises(ValueError, match="task_types"):
    data.conflicting_tasks(10, 2, task_types=("binary", "ranking"))
  with pytest.raises(ValueError, match="regression_scale"):
    data.conflicting_tasks(10, 2, regression_scale=0.0)


def test_conflicting_tasks_label_correlations():
  ds = data.conflicting_tasks(20000, seed=0)
  c = np.corrcoef(ds.labels.astype(np.float64))
  assert c[0, 1] > 0.1 and c[0, 2] < -0.1 and c[1, 2] < -0.1, c
  ds = data.conflicting_tasks(20000, 2, task_cosines=0.9, seed=0)
  assert np.corrcoef(ds.labels.astype(np.float64))[0, 1] > 0.3
  for bad in (-0.6, [[1.0, 2.0, 0.0], [2.0, 1.0, 0.0], [0.0, 0.0, 1.0]]):  # below -1/(T-1); not PSD
    with pytest.raises(ValueError, match="task_cosines"):
      data.conflicting_tasks(10, 3, task_cosines=bad)
