"""The ``granularity`` callable contract: one leaf path -> group name / int id / None; the list form still works."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import mtjax
from mtjax import analysis
from mtjax._src import weighting


def _grads(num_tasks=3, seed=0):
  rng = np.random.default_rng(seed)
  shapes = {
    "enc": {"Dense_0": {"kernel": (5, 4), "bias": (4,)}, "Dense_1": {"kernel": (4, 3), "bias": (3,)}},
    "head": {"w": (3,)},
  }
  return jax.tree.map(
    lambda s: jnp.asarray(rng.normal(size=(num_tasks,) + s), jnp.float32),
    shapes,
    is_leaf=lambda s: isinstance(s, tuple),
  )


def _layer_of(path):  # the per-leaf equivalent of granularity="layer"
  return path.rsplit("/", 1)[0]


def test_per_leaf_callable_equals_layer():
  g = _grads(seed=1)
  np.testing.assert_allclose(
    analysis.cosine_similarity(g, granularity=_layer_of), analysis.cosine_similarity(g, granularity="layer"), atol=1e-6
  )
  assert (
    analysis.group_names(g, granularity=_layer_of)
    == analysis.group_names(g, granularity="layer")
    == ["enc/Dense_0", "enc/Dense_1", "head"]
  )
  np.testing.assert_allclose(
    analysis.gradient_norms(g, granularity=_layer_of), analysis.gradient_norms(g, granularity="layer"), atol=1e-6
  )
  tracked = analysis.track(g, granularity=_layer_of)
  np.testing.assert_allclose(tracked["cosine_groups"], analysis.track(g)["cosine_groups"], atol=1e-6)


def test_per_leaf_callable_names_ints_and_none():
  g = _grads(seed=2)
  depth = lambda path: int(m.group(1)) if (m := re.search(r"Dense_(\d+)/", path)) else None
  assert analysis.group_names(g, granularity=depth) == ["group_0", "group_1"]
  cos = analysis.cosine_similarity(g, granularity=depth)
  assert cos.shape == (2, 3, 3)
  np.testing.assert_allclose(cos, analysis.cosine_similarity(g, granularity="layer")[:2], atol=1e-6)
  # names in order of first appearance (flattening order: enc/... before head/...), None leaves a leaf out
  part = lambda path: None if path.endswith("bias") else ("body" if path.startswith("enc") else "top")
  assert analysis.group_names(g, granularity=part) == ["body", "top"]
  kernels = {
    "enc": {"Dense_0": {"kernel": g["enc"]["Dense_0"]["kernel"]}, "Dense_1": {"kernel": g["enc"]["Dense_1"]["kernel"]}}
  }
  np.testing.assert_allclose(
    analysis.cosine_similarity(g, granularity=part)[0], analysis.cosine_similarity(kernels)[0], atol=1e-6
  )


def test_list_form_callable_still_works():
  g = _grads(seed=3)

  def depth_groups(paths):  # the older form, as in research/gradient_similarity.py
    return [int(m.group(1)) if (m := re.search(r"Dense_(\d+)/", p)) else -1 for p in paths]

  per_leaf = lambda path: int(m.group(1)) if (m := re.search(r"Dense_(\d+)/", path)) else None
  np.testing.assert_allclose(
    analysis.cosine_similarity(g, granularity=depth_groups),
    analysis.cosine_similarity(g, granularity=per_leaf),
    atol=1e-6,
  )
  assert analysis.group_names(g, granularity=depth_groups) == ["group_0", "group_1"]
  assert weighting.group_ids(lambda paths: np.arange(len(paths)), ["a/x", "b/y"]) == [0, 1]
  with pytest.raises(ValueError, match="mtjax: groups callable returned 1 ids for 5 shared leaves"):
    analysis.cosine_similarity(g, granularity=lambda paths: [0])


def test_list_form_callable_errors_are_not_hidden():
  def picky(paths):
    raise ValueError("mtjax: picky: no layer chosen")

  with pytest.raises(ValueError, match="picky: no layer chosen"):
    analysis.cosine_similarity(_grads(), granularity=picky)


def test_bad_callable_results_raise():
  g = _grads()
  with pytest.raises(ValueError, match="mtjax: a granularity .* returned float for 'enc/Dense_0/bias'"):
    analysis.cosine_similarity(g, granularity=lambda path: 0.5)
  with pytest.raises(ValueError, match="mtjax: a granularity .* returned both names and int ids"):
    analysis.group_names(g, granularity=lambda path: "head" if path.startswith("head") else 0)


def test_transforms_take_a_per_leaf_callable():
  g = _grads(num_tasks=2, seed=5)
  params = jax.tree.map(lambda x: jnp.zeros(x.shape[1:]), g)
  outs = []
  for granularity in ("layer", _layer_of):
    tx = mtjax.gradvac(key=0, num_tasks=2, beta=0.5, granularity=granularity)
    state = tx.init(params)
    assert state.weights.shape == (3, 2)  # one weight vector per layer group
    for _ in range(2):
      update, state = tx.update(g, state, params)
    outs.append(update)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), *outs)
  tx = optax.chain(mtjax.gradvac(key=0, num_tasks=2, granularity=_layer_of), optax.sgd(0.1))
  updates, _ = tx.update(g, tx.init(params), params)
  assert jax.tree.structure(updates) == jax.tree.structure(params)
