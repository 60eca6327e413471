"""GradDrop: replayed uniform draws against a NumPy float64 reference that loops over coordinates and
tasks, leak, sign-consistent coordinates, unbiasedness, task-specific leaves, the kept-fraction record."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from mtl_references import SHAPES
from mtl_references import pack
from mtl_references import random_jac
from mtl_references import unpack

import mtjax


def replay_uniforms(key, grads):
  """The uniforms an update draws: one float32 array per leaf, from fold_in(split(key)[1], leaf index)."""
  _, sub = jax.random.split(key)
  leaves = jax.tree.leaves(grads)
  return [
    np.asarray(jax.random.uniform(jax.random.fold_in(sub, i), l.shape[1:], jnp.float32)).ravel()
    for i, l in enumerate(leaves)
  ]


def np_graddrop(jac, uniforms, leak):
  """Reference on the flat [T, P] Jacobian (uniforms flattened in the same order)."""
  jac = np.asarray(jac, np.float64)
  t, p = jac.shape
  leak = np.broadcast_to(np.asarray(leak, np.float64), (t,))
  out = np.zeros(p)
  kept = np.zeros(t)
  for k in range(p):
    column = jac[:, k]
    total, absolute = column.sum(), np.abs(column).sum()
    purity = 0.5 * (1.0 + (total / absolute if absolute > 0 else 0.0))
    keep_positive = uniforms[k] < np.float32(purity)
    for i in range(t):
      sign_ok = column[i] > 0 if keep_positive else column[i] < 0
      mask = leak[i] + (1.0 - leak[i]) * float(sign_ok)
      out[k] += mask * column[i]
      kept[i] += mask * column[i] ** 2
  return out, kept / np.maximum((jac**2).sum(1), 1e-300)


def _flat_uniforms(key, grads):
  # jax.tree.leaves order is the sorted-key order: a/bias, a/kernel, b; reorder to SHAPES' packing.
  by_path = dict(zip(["a/bias", "a/kernel", "b"], replay_uniforms(key, grads)))
  return np.concatenate([by_path[path] for path, _ in SHAPES])


@pytest.mark.parametrize(
  "num_tasks,leak", [(1, 0.0), (2, 0.0), (3, 0.25), (8, (0.0, 1.0, 0.5, 0.0, 0.1, 0.0, 0.0, 0.9))]
)
def test_matches_reference_over_steps(num_tasks, leak):
  rng = np.random.default_rng(num_tasks)
  tx = mtjax.graddrop(key=num_tasks, num_tasks=num_tasks, leak=leak)
  update_fn = jax.jit(tx.update)
  state = tx.init(None)
  for _ in range(2):
    jac = random_jac(rng, num_tasks, 0.5)
    grads = pack(jac)
    uniforms = _flat_uniforms(state.key, grads)
    update, state = update_fn(grads, state)
    ref, kept = np_graddrop(jac, uniforms, leak)
    np.testing.assert_allclose(unpack(update), ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(state.weights, kept, rtol=1e-5, atol=1e-6)


def test_sign_consistent_coordinates_are_kept_and_one_task_is_identity():
  rng = np.random.default_rng(5)
  tx = mtjax.graddrop(key=3)
  update_fn = jax.jit(tx.update)
  jac = np.abs(random_jac(rng, 3)) * np.sign(rng.normal(size=(1, 10)))  # every column has one sign
  np.testing.assert_allclose(unpack(update_fn(pack(jac), tx.init(None))[0]), jac.sum(0), rtol=1e-6)
  jac = random_jac(rng, 1)
  np.testing.assert_allclose(unpack(update_fn(pack(jac), tx.init(None))[0]), jac[0], rtol=1e-6)
  # leak = 1 for every task: the plain sum.
  full = mtjax.graddrop(key=3, leak=1.0)
  jac = random_jac(rng, 3)
  np.testing.assert_allclose(
    unpack(jax.jit(full.update)(pack(jac), full.init(None))[0]), jac.sum(0), rtol=1e-5, atol=1e-6
  )


def test_unbiased_for_the_summed_gradient():
  rng = np.random.default_rng(6)
  jac = random_jac(rng, 3)
  tx = mtjax.graddrop()
  grads = pack(jac)
  keys = jax.random.split(jax.random.PRNGKey(1), 3000)
  updates = jax.jit(jax.vmap(lambda k: tx.update(grads, tx.init(None)._replace(key=k))[0]))(keys)
  flat = np.concatenate(
    [
      np.asarray(updates["a"]["kernel"]).reshape(3000, -1),
      np.asarray(updates["a"]["bias"]).reshape(3000, -1),
      np.asarray(updates["b"]).reshape(3000, -1),
    ],
    axis=1,
  )  # SHAPES' column order
  spread = np.abs(jac).sum(0)  # |update - E| <= sum_t |g_t| per coordinate
  np.testing.assert_allclose(flat.mean(0), jac.sum(0), atol=float(5 * spread.max() / np.sqrt(3000)))


def test_task_specific_leaves_and_errors():
  rng = np.random.default_rng(7)
  grads = dict(pack(random_jac(rng, 3)), tower={"kernel": jnp.asarray(rng.normal(size=(3, 4)), jnp.float32)})
  tx = mtjax.graddrop(num_tasks=3, shared=mtjax.shared_mask(exclude="tower"))
  update, _ = jax.jit(tx.update)(grads, tx.init(None))
  np.testing.assert_array_equal(update["tower"]["kernel"], jnp.sum(grads["tower"]["kernel"], axis=0))
  with pytest.raises(ValueError, match="leak must be in"):
    mtjax.graddrop(leak=1.5)
  with pytest.raises(ValueError, match="leak"):
    mtjax.graddrop(num_tasks=3, leak=(0.1, 0.2))
  bad = jax.tree.map(lambda g: g.at[0].set(jnp.nan), grads)
  with pytest.raises(Exception, match="non-finite task gradients given to graddrop"):
    jax.block_until_ready(jax.jit(tx.update)(bad, tx.init(None)))
