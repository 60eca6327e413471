"""Tests for mtjax.pcgrad against a plain NumPy float64 reference on the flat task gradients."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import mtjax
from mtjax.transforms._pcgrad import projection_orders as _projection_orders

J_ORACLE = np.array([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]])
SHAPES = {"a": {"bias": (4,), "kernel": (3, 4)}, "b": {"kernel": (4, 2)}, "c": (5,)}


# The orders an update draws from its state key, replayed by the reference (jitted: compiles once per T).
projection_orders = jax.jit(_projection_orders, static_argnums=1)


def ref_pcgrad(jac, orders, reduction="sum"):
  """PCGrad on the rows of ``jac`` [T, P] (NumPy float64), with the given per-task orders."""
  jac = np.asarray(jac, np.float64)
  out = np.zeros(jac.shape[1])
  for i in range(jac.shape[0]):
    g = jac[i].copy()
    for j in orders[i]:
      ip = g @ jac[j]
      nsq = jac[j] @ jac[j]
      if ip < 0 and nsq > 0:
        g = g - ip / nsq * jac[j]
    out += g
  return out / jac.shape[0] if reduction == "mean" else out


def random_task_grads(rng, num_tasks, dtype, shapes=SHAPES, shift=0.0):
  def leaf(shape):
    return (rng.normal(size=(num_tasks,) + shape) + shift).astype(dtype)

  return jax.tree.map(leaf, shapes, is_leaf=lambda x: isinstance(x, tuple))


def flat(tree, num_tasks=None):
  leaves = jax.tree_util.tree_leaves(tree)
  if num_tasks is None:
    return np.concatenate([np.asarray(l, np.float64).ravel() for l in leaves])
  return np.concatenate([np.asarray(l, np.float64).reshape(num_tasks, -1) for l in leaves], axis=1)


def params_like(task_grads):
  return jax.tree.map(lambda g: jnp.zeros(g.shape[1:], g.dtype), task_grads)


def test_oracle():
  tx = mtjax.pcgrad(key=0, num_tasks=2)
  params = {"w": jnp.zeros(3)}
  updates, state = jax.jit(tx.update)({"w": jnp.asarray(J_ORACLE, jnp.float32)}, tx.init(params), params)
  np.testing.assert_allclose(updates["w"], [0.5848, 3.8012, 3.8012], atol=1e-4)
  np.testing.assert_allclose(state.weights, [2.2222, 1.5789], atol=1e-4)
  np.testing.assert_allclose(ref_pcgrad(J_ORACLE, [[1], [0]]), [0.5848, 3.8012, 3.8012], atol=1e-4)


def test_oracle_in_chain_with_adam_and_mean():
  params = {"w": jnp.zeros(3)}
  grads = {"w": jnp.asarray(J_ORACLE, jnp.float32)}
  tx = optax.chain(mtjax.pcgrad(reduction="mean"), optax.sgd(1.0))
  updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
  np.testing.assert_allclose(updates["w"], -np.array([0.5848, 3.8012, 3.8012]) / 2, atol=1e-4)
  tx = optax.chain(mtjax.pcgrad(), optax.adam(0.1))
  updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
  np.testing.assert_allclose(updates["w"], [-0.1, -0.1, -0.1], atol=1e-4)  # adam's first step: -lr*sign


def test_projection_orders_are_random_orders_of_the_other_tasks():
  key = jax.random.PRNGKey(3)
  seen = set()
  for _ in range(12):
    key, orders = projection_orders(key, 4)
    orders = np.asarray(orders)
    assert orders.shape == (4, 3)
    for i in range(4):
      assert sorted(orders[i].tolist()) == [j for j in range(4) if j != i]
    seen.add(tuple(orders[0].tolist()))
  assert len(seen) >= 3  # fresh draws per step
  _, orders = projection_orders(jax.random.PRNGKey(0), 1)
  assert orders.shape == (1, 0)


@pytest.mark.parametrize("dtype,num_tasks", [("float32", t) for t in range(1, 9)] + [("float64", t) for t in (2, 5, 8)])
def test_against_numpy_reference_over_steps(dtype, num_tasks):
  rng = np.random.default_rng(num_tasks)
  reduction = "mean" if num_tasks % 3 == 2 else "sum"
  with jax.enable_x64(dtype == "float64"):
    tx = mtjax.pcgrad(key=num_tasks, num_tasks=num_tasks, reduction=reduction)
    grads = random_task_grads(rng, num_tasks, dtype)
    params = params_like(grads)
    state = tx.init(params)
    update = jax.jit(tx.update)
    for _ in range(2):  # the key is split at every step: replay the orders of this step
      grads = random_task_grads(rng, num_tasks, dtype)
      next_key, orders = projection_orders(state.key, num_tasks)
      updates, state = update(grads, state, params)
      np.testing.assert_array_equal(state.key, next_key)
      expected = ref_pcgrad(flat(grads, num_tasks), np.asarray(orders), reduction)
      tol = 1e-4 if dtype == "float32" else 1e-10
      np.testing.assert_allclose(flat(updates), expected, rtol=tol, atol=tol)
      assert jax.tree.map(lambda u: u.dtype, updates) == jax.tree.map(lambda p: p.dtype, params)


def test_reference_is_order_sensitive_so_the_replay_matters():
  # Guard on the test's power: for these gradients another order gives another update, and the
  # implementation matches only the orders it drew.
  rng = np.random.default_rng(0)
  jac = rng.normal(size=(4, 6))
  tx = mtjax.pcgrad(key=5)
  params = {"w": jnp.zeros(6)}
  state = tx.init(params)
  _, orders = projection_orders(state.key, 4)
  orders = np.asarray(orders)
  updates, _ = jax.jit(tx.update)({"w": jnp.asarray(jac, jnp.float32)}, state, params)
  drawn = ref_pcgrad(jac, orders)
  reversed_ = ref_pcgrad(jac, orders[:, ::-1])
  assert not np.allclose(drawn, reversed_, atol=1e-3)
  np.testing.assert_allclose(updates["w"], drawn, rtol=1e-4, atol=1e-5)


def test_two_tasks_is_deterministic():
  rng = np.random.default_rng(1)
  grads = random_task_grads(rng, 2, "float32")
  params = params_like(grads)
  tx = mtjax.pcgrad()
  update = jax.jit(tx.update)
  outs = [flat(update(grads, tx.init(params)._replace(key=jax.random.PRNGKey(seed)), params)[0]) for seed in (0, 1, 7)]
  np.testing.assert_allclose(outs[0], outs[1], rtol=1e-6)
  np.testing.assert_allclose(outs[0], outs[2], rtol=1e-6)
  np.testing.assert_allclose(outs[0], ref_pcgrad(flat(grads, 2), [[1], [0]]), rtol=1e-4, atol=1e-5)


def test_non_conflicting_gradients_give_the_plain_sum():
  rng = np.random.default_rng(2)
  grads = jax.tree.map(jnp.abs, random_task_grads(rng, 5, "float32"))  # all inner products >= 0
  params = params_like(grads)
  tx = mtjax.pcgrad(num_tasks=5)
  updates, state = jax.jit(tx.update)(grads, tx.init(params), params)
  np.testing.assert_allclose(flat(updates), flat(grads, 5).sum(0), rtol=1e-6)
  np.testing.assert_array_equal(state.weights, np.ones(5))


def test_shared_mask_task_specific_leaves_get_the_exact_sum():
  rng = np.random.default_rng(3)
  grads = random_task_grads(rng, 3, "float32")
  params = params_like(grads)
  shared = mtjax.shared_mask(exclude=r"^b/")
  tx = mtjax.pcgrad(key=2, shared=shared)
  state = tx.init(params)
  _, orders = projection_orders(state.key, 3)
  updates, _ = jax.jit(tx.update)(grads, state, params)
  np.testing.assert_array_equal(updates["b"]["kernel"], jnp.sum(grads["b"]["kernel"], axis=0))
  shared_grads = {"a": grads["a"], "c": grads["c"]}  # the surgery sees only the shared leaves
  expected = ref_pcgrad(flat(shared_grads, 3), np.asarray(orders))
  np.testing.assert_allclose(flat({"a": updates["a"], "c": updates["c"]}), expected, rtol=1e-4, atol=1e-5)


_DEGENERATE_TX = mtjax.pcgrad(key=1)
_DEGENERATE_UPDATE = jax.jit(_DEGENERATE_TX.update)  # one compile for all cases


@pytest.mark.parametrize("case", ["zero", "zero_row", "identical", "opposite", "tiny", "huge"])
def test_finite_on_degenerate_gradients(case):
  rng = np.random.default_rng(4)
  base = rng.normal(size=(3, 7))
  jac = {
    "zero": 0 * base,
    "zero_row": base * np.array([[1.0], [0.0], [1.0]]),
    "identical": np.repeat(base[:1], 3, 0),
    "opposite": np.stack([base[0], -base[0], base[1]]),
    "tiny": 1e-10 * base,
    "huge": 1e10 * base,
  }[case]
  params = {"w": jnp.zeros(7)}
  state = _DEGENERATE_TX.init(params)
  _, orders = projection_orders(state.key, 3)
  updates, state = _DEGENERATE_UPDATE({"w": jnp.asarray(jac, jnp.float32)}, state, params)
  assert np.all(np.isfinite(updates["w"]))
  expected = ref_pcgrad(jac.astype(np.float32), np.asarray(orders))
  scale = np.abs(jac).max() + 1e-30
  np.testing.assert_allclose(np.asarray(updates["w"]) / scale, expected / scale, atol=1e-4)


def test_jit_no_retrace_and_extra_args_ignored_in_scan():
  rng = np.random.default_rng(5)
  grads = random_task_grads(rng, 3, "float32")
  params = params_like(grads)
  tx = optax.chain(mtjax.pcgrad(key=0, num_tasks=3), optax.adam(1e-2))

  @jax.jit
  @chex.assert_max_traces(n=1)
  def step(state, grads):
    return tx.update(grads, state, params, task_losses=jnp.ones(3), some_unknown_arg=1.0)

  state = tx.init(params)
  _, state = step(state, grads)
  _, state = step(state, grads)

  def body(state, _):
    return step(state, grads)[1], None

  final, _ = jax.lax.scan(body, tx.init(params), None, length=3)
  assert jax.tree.map(lambda x: (x.shape, x.dtype), final) == jax.tree.map(
    lambda x: (x.shape, x.dtype), tx.init(params)
  )


def test_toy_two_task_problem_converges():
  # Two conflicting quadratics on a shared vector; PCGrad + SGD reaches a point where neither
  # task's gradient conflicts with the other's (here: the segment between the two optima).
  targets = jnp.array([[1.0, 0.0], [0.0, 1.0]])

  def losses(p):
    return jnp.sum((p["w"][None, :] - targets) ** 2, axis=1)

  tx = optax.chain(mtjax.pcgrad(key=0), optax.sgd(0.1))
  params = {"w": jnp.array([3.0, 2.0])}

  def body(carry, _):
    params, state = carry
    task_grads = jax.jacrev(losses)(params)
    updates, state = tx.update(task_grads, state, params)
    return (optax.apply_updates(params, updates), state), losses(params).sum()

  (params, _), history = jax.lax.scan(body, (params, tx.init(params)), None, length=100)
  assert history[-1] < 0.2 * history[0]
  np.testing.assert_allclose(params["w"].sum(), 1.0, atol=1e-3)


def test_errors():
  with pytest.raises(ValueError, match="mtjax: pcgrad: reduction"):
    mtjax.pcgrad(reduction="max")
  tx = mtjax.pcgrad(num_tasks=3)
  params = {"w": jnp.zeros(3)}
  with pytest.raises(ValueError, match="num_tasks=3"):
    tx.update({"w": jnp.asarray(J_ORACLE, jnp.float32)}, tx.init(params), params)
