"""Gradient similarity against a NumPy float64 reference; in-step tracking equals offline numbers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mtjax
from mtjax import analysis


def _grads(num_tasks, seed=0):
  rng = np.random.default_rng(seed)
  shapes = {"enc": {"Dense_0": {"kernel": (5, 4), "bias": (4,)}, "Dense_1": {"kernel": (4, 3)}}, "head": {"w": (3,)}}
  return jax.tree.map(
    lambda s: jnp.asarray(rng.normal(size=(num_tasks,) + s), jnp.float32),
    shapes,
    is_leaf=lambda s: isinstance(s, tuple),
  )


def _np_cos(vectors):
  """Reference: loops over task pairs; zero vectors give 0."""
  t = len(vectors)
  out = np.zeros((t, t))
  for i in range(t):
    for j in range(t):
      ni, nj = np.linalg.norm(vectors[i]), np.linalg.norm(vectors[j])
      out[i, j] = 0.0 if ni == 0 or nj == 0 else vectors[i] @ vectors[j] / (ni * nj)
  return out


def _flat(leaves, t):
  return np.concatenate([np.asarray(l[t], np.float64).ravel() for l in leaves])


@pytest.mark.parametrize("num_tasks", [1, 2, 5])
def test_model_layer_leaf_against_numpy(num_tasks):
  g = _grads(num_tasks, seed=num_tasks)
  leaves = jax.tree.leaves(g)
  model = analysis.cosine_similarity(g)
  ref = _np_cos([_flat(leaves, t) for t in range(num_tasks)])
  np.testing.assert_allclose(model[0], ref, atol=1e-5)
  per_leaf = analysis.cosine_similarity(g, granularity="leaf")
  assert per_leaf.shape == (len(leaves), num_tasks, num_tasks)
  for k, leaf in enumerate(leaves):
    np.testing.assert_allclose(per_leaf[k], _np_cos([_flat([leaf], t) for t in range(num_tasks)]), atol=1e-5)
  per_layer = analysis.cosine_similarity(g, granularity="layer")
  names = analysis.group_names(g, granularity="layer")
  assert names == ["enc/Dense_0", "enc/Dense_1", "head"]
  d0 = jax.tree.leaves(g["enc"]["Dense_0"])
  np.testing.assert_allclose(per_layer[0], _np_cos([_flat(d0, t) for t in range(num_tasks)]), atol=1e-5)
  for c in (model, per_leaf, per_layer):
    np.testing.assert_allclose(c, np.swapaxes(np.asarray(c), -1, -2), atol=1e-6)  # symmetric
    np.testing.assert_allclose(np.diagonal(c, axis1=-2, axis2=-1), 1.0, atol=1e-5)  # unit diagonal


def test_per_leaf_consistent_with_global():
  g = _grads(3, seed=7)
  leaves = jax.tree.leaves(g)
  grams = [np.einsum("ti,si->ts", np.asarray(l).reshape(3, -1), np.asarray(l).reshape(3, -1)) for l in leaves]
  total = sum(grams)
  norms = np.sqrt(np.diag(total))
  np.testing.assert_allclose(analysis.cosine_similarity(g)[0], total / np.outer(norms, norms), atol=1e-5)
  np.testing.assert_allclose(analysis.gradient_norms(g)[0], norms, rtol=1e-5)


def test_zero_gradients_give_zero_not_nan():
  g = {"w": jnp.array([[0.0, 0.0], [1.0, 1.0], [0.0, 0.0]])}
  cos = analysis.cosine_similarity(g)[0]
  assert np.all(np.isfinite(cos))
  np.testing.assert_array_equal(cos[0], [0.0, 0.0, 0.0])
  assert float(cos[1, 1]) == pytest.approx(1.0)
  assert float(analysis.norm_ratio(analysis.gradient_norms(g))[0]) == 0.0


def test_conflict_fraction_and_alignment():
  cos = jnp.array([[1.0, -0.5, 0.2], [-0.5, 1.0, -0.1], [0.2, -0.1, 1.0]])
  assert float(analysis.conflict_fraction(cos)) == pytest.approx(2 / 3)
  assert float(analysis.conflict_fraction(jnp.ones((1, 1)))) == 0.0
  g = {"w": jnp.array([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]])}
  # MGDA's direction [0, 1, 1] (the reference value) serves both tasks.
  align = analysis.update_alignment(g, {"w": jnp.array([0.0, 1.0, 1.0])})[0]
  ref = [np.dot(v, [0, 1, 1]) / np.linalg.norm(v) / np.sqrt(2) for v in np.asarray(g["w"])]
  np.testing.assert_allclose(align, ref, atol=1e-6)


def test_in_step_tracking_equals_offline():
  """Stats computed inside a jitted step (from task_grads) equal offline numbers from the same grads."""
  rng = np.random.default_rng(0)
  params = {
    "enc": {"kernel": jnp.asarray(rng.normal(size=(4, 3)), jnp.float32)},
    "head": {"kernel": jnp.asarray(rng.normal(size=(3, 2)), jnp.float32)},
  }
  x = jnp.asarray(rng.normal(size=(8, 4)), jnp.float32)
  y = jnp.asarray(rng.normal(size=(8, 2)), jnp.float32)

  def loss_fn(p, x, y):
    return jnp.mean((jnp.tanh(x @ p["enc"]["kernel"]) @ p["head"]["kernel"] - y) ** 2, axis=0)

  tx = mtjax.linear(num_tasks=2)

  @jax.jit
  def step(p, s):
    losses, grads = mtjax.task_grads(loss_fn)(p, x, y)
    update, s = tx.update(grads, s, p, task_losses=losses)
    return update, s, analysis.track(grads, update, granularity="layer"), grads

  update, _, stats, grads = step(params, tx.init(params))
  hist = analysis.SimilarityHistory()
  hist.append(0, stats)
  np.testing.assert_allclose(stats["cosine"], analysis.cosine_similarity(grads)[0], atol=1e-6)
  np.testing.assert_allclose(stats["cosine_groups"], analysis.cosine_similarity(grads, granularity="layer"), atol=1e-6)
  np.testing.assert_allclose(stats["alignment"], analysis.update_alignment(grads, update)[0], atol=1e-6)
  np.testing.assert_allclose(hist.pair_series(0, 1), [float(stats["cosine"][0, 1])])
  assert hist.array("conflict_groups").shape == (1, 2)


def test_plots_write_files(tmp_path):
  g = _grads(3)
  cos = analysis.cosine_similarity(g, granularity="layer")
  analysis.plot_similarity_heatmaps(cos, analysis.group_names(g, granularity="layer"), path=tmp_path / "h.png")
  analysis.plot_similarity_over_steps(
    np.arange(5), np.linspace(-1, 1, 10).reshape(5, 2), ["a", "b"], path=tmp_path / "c.png"
  )
  assert (tmp_path / "h.png").stat().st_size > 1000 and (tmp_path / "c.png").stat().st_size > 1000
