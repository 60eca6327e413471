"""RLW: replayed draws against a NumPy float64 reference (softmax and the weighted sum looping over
tasks), the key contract, sum_to, task-specific leaves and the weights' distribution."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from mtl_references import pack
from mtl_references import random_jac
from mtl_references import unpack

import mtjax
from mtjax.transforms._rlw import draw_weights


def np_softmax(z):
  z = np.asarray(z, np.float64)
  e = np.exp(z - z.max())
  return e / e.sum()


@pytest.mark.parametrize("num_tasks", [1, 3, 8])
def test_matches_reference_over_steps(num_tasks):
  rng = np.random.default_rng(num_tasks)
  tx = mtjax.rlw(key=num_tasks, num_tasks=num_tasks)
  update_fn = jax.jit(tx.update)
  state = tx.init(None)
  seen = []
  for _ in range(3):
    jac = random_jac(rng, num_tasks)
    next_key, sub = jax.random.split(state.key)
    z = np.asarray(jax.random.normal(sub, (num_tasks,), jnp.float32))
    update, state = update_fn(pack(jac), state)
    np.testing.assert_array_equal(state.key, next_key)  # split at every update
    weights = np_softmax(z)
    np.testing.assert_allclose(state.weights, weights, rtol=1e-5)
    np.testing.assert_allclose(unpack(update), sum(weights[t] * jac[t] for t in range(num_tasks)), rtol=1e-4, atol=1e-5)
    seen.append(np.asarray(state.weights))
  if num_tasks > 1:
    assert not np.allclose(seen[0], seen[1])  # fresh weights every step


def test_sum_to_num_tasks_float64_and_task_specific_leaves():
  rng = np.random.default_rng(4)
  jac = random_jac(rng, 3)
  grads = dict(pack(jac), tower={"kernel": jnp.asarray(rng.normal(size=(3, 2)), jnp.float32)})
  tx = mtjax.rlw(key=5, num_tasks=3, sum_to="num_tasks", shared=mtjax.shared_mask(exclude="tower"))
  update, state = jax.jit(tx.update)(grads, tx.init(None))
  _, expected = draw_weights(tx.init(None).key, 3, "num_tasks")
  np.testing.assert_allclose(state.weights, expected, rtol=1e-6)
  np.testing.assert_allclose(np.sum(state.weights), 3.0, rtol=1e-6)
  # task_specific="weighted" (default): the exact gradient of the weighted loss on every leaf.
  np.testing.assert_allclose(
    update["tower"]["kernel"], np.asarray(expected) @ np.asarray(grads["tower"]["kernel"]), rtol=1e-5
  )
  with jax.enable_x64(True):  # float32 draws: the same weights for float64 gradients
    tx64 = mtjax.rlw(key=5, num_tasks=3, sum_to="num_tasks", shared=mtjax.shared_mask(exclude="tower"))
    grads64 = jax.tree.map(lambda g: jnp.asarray(g, jnp.float64), grads)
    update64, state64 = jax.jit(tx64.update)(grads64, tx64.init(None))
    np.testing.assert_array_equal(state64.weights, state.weights)
    assert update64["tower"]["kernel"].dtype == jnp.float64


def test_weights_distribution():
  keys = jax.random.split(jax.random.PRNGKey(0), 4000)
  weights = np.asarray(jax.vmap(lambda k: draw_weights(k, 4)[1])(keys))
  assert np.all(weights > 0)
  np.testing.assert_allclose(weights.sum(1), 1.0, rtol=1e-6)
  np.testing.assert_allclose(weights.mean(0), 0.25, atol=0.01)  # exchangeable tasks
  assert weights.std(0).min() > 0.1


def test_errors():
  with pytest.raises(ValueError, match="sum_to"):
    mtjax.rlw(sum_to="T")
