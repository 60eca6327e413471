"""Issue #11: misuse that used to train silently now raises a clear ``mtjax:`` error."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mtjax
from mtjax import losses


def test_summed_gradient_without_num_tasks_or_params_is_ambiguous():
  tx = mtjax.pcgrad()
  with pytest.raises(ValueError, match="every leaf is 1-D .*num_tasks=T"):
    tx.update({"w": jnp.ones(5)}, tx.init(None))
  # Disambiguated by num_tasks or params: scalar parameters with 5 tasks.
  tx = mtjax.pcgrad(num_tasks=5)
  tx.update({"w": jnp.ones(5)}, tx.init(None))
  tx = mtjax.pcgrad()
  tx.update({"w": jnp.ones(5)}, tx.init(None), {"w": jnp.ones(())})


def test_linear_weights_count_names_weights():
  tx = mtjax.linear([1.0, 1.0])
  with pytest.raises(ValueError, match="linear: weights has 2 entries but the task gradients have 3 tasks"):
    tx.update({"w": jnp.ones((3, 2))}, tx.init(None))
  with pytest.raises(ValueError, match="weights has 2 entries but num_tasks=3"):
    mtjax.linear([1.0, 1.0], num_tasks=3)


def test_bce_rejects_labels_outside_unit_interval_eagerly_and_under_jit():
  with pytest.raises(ValueError, match=r"mtjax: bce_with_logits: binary labels must lie in \[0, 1\]"):
    losses.bce_with_logits(jnp.zeros(3), jnp.array([-1.0, 1.0, 1.0]))
  loss = jax.jit(lambda x, y: jnp.sum(losses.bce_with_logits(x, y)))
  with pytest.raises(Exception, match=r"binary labels must lie in \[0, 1\]"):
    jax.block_until_ready(loss(jnp.zeros(3), jnp.array([-1.0, 1.0, 1.0])))
  np.testing.assert_allclose(jax.grad(loss)(jnp.zeros(2), jnp.array([0.0, 0.25])), [0.5, 0.25])
  # Masked -1 markers are fine through per_task_loss (masked labels are zeroed first).
  out = losses.per_task_loss(jnp.zeros((1, 2)), jnp.array([[1.0, -1.0]]), jnp.array([[True, False]]))
  assert np.isfinite(out).all()


def test_feature_spec_model_rejects_dense_input():
  import inspect

  from mtjax.models._features import Categorical
  from mtjax.models._features import FeatureSpec
  from mtjax.models._layers import InputLayer

  params = inspect.signature(Categorical).parameters
  cat = Categorical(**{k: v for k, v in (("name", "a"), ("vocab_size", 4), ("embed_dim", 2)) if k in params})
  layer = InputLayer(features=FeatureSpec(categorical=(cat,)))
  with pytest.raises(ValueError, match="built with features=FeatureSpec"):
    layer.init(jax.random.PRNGKey(0), jnp.ones((2, 3)))


def test_fit_detects_an_optimizer_placed_before_the_method():
  """optax.chain(adam, pcgrad) would give Adam per-task moments [T, ...]: fit refuses it up front."""
  import optax

  from mtjax import data
  from mtjax import models
  from mtjax import training

  ds = data.conflicting_tasks(num_samples=200, seed=0)
  dense = models.MMoE(num_tasks=3, num_experts=2, expert=(4,), tower=(2, 1))  # dense input: no sparse rows
  dense_ds = data.MultiTaskDataset(
    features=np.random.default_rng(0).normal(size=(200, 5)).astype(np.float32),
    labels=ds.labels,
    task_names=ds.task_names,
  )
  wrong = optax.chain(optax.adam(1e-2), mtjax.pcgrad(num_tasks=3))
  with pytest.raises(
    ValueError,
    match=r"optimizer state changes shape after one step \(\((\d+, )*\d*,?\) -> \(3, .*\)\).*"
    r"Put the mtjax method first",
  ):
    training.fit(dense, wrong, dense_ds, steps=1, batch_size=32, progress=False)
  embedded = models.MMoE(num_tasks=3, num_experts=2, expert=(4,), tower=(2, 1), features=ds.spec)
  with pytest.raises(ValueError, match="Put the mtjax method first"):
    training.fit(embedded, wrong, ds, steps=1, batch_size=32, progress=False)
