"""The conformance table's checks for the methods whose update takes micro-batch gradients ``[M, T, ...]``.

``tests/transforms/test_conformance.py`` feeds ``[T, *shape]`` gradients, which MoDo and SDMGrad
(three batches) reject by design, so ``test_modo.py`` / ``test_sdmgrad.py`` run these equivalents:
chain with adam + unknown extra args + no retrace, ``optax.inject_hyperparams``, float32 vs float64,
edge gradients, T = 1 and T = 8, convergence in ``lax.scan`` on a toy problem, bad input, non-finite
gradients / losses and the state contract. Independent NumPy references live in the method files.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import mtjax

SHAPES = {"bottom": {"kernel": (3, 2), "bias": (2,)}, "tower_0": {"kernel": (2,)}, "tower_1": {"kernel": (2,)}}
SHARED = mtjax.shared_mask(exclude="tower_")
T = 3


def tree_of(fn):
  return jax.tree.map(fn, SHAPES, is_leaf=lambda x: isinstance(x, tuple))


def grads_of(rng, m, t, dtype=np.float32, scale=1.0):
  return tree_of(lambda s: (scale * rng.normal(size=(m, t) + s)).astype(dtype))


def params_of(rng, dtype=np.float32):
  return tree_of(lambda s: rng.normal(size=s).astype(dtype))


def close(a, b, rtol, atol, what=""):
  assert jax.tree.structure(a) == jax.tree.structure(b), what
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(x, np.float64), np.asarray(y, np.float64), rtol=rtol, atol=atol, err_msg=what)


def finite(tree, what=""):
  for leaf in jax.tree.leaves(tree):
    assert np.all(np.isfinite(np.asarray(leaf))), what


def tap():
  return optax.GradientTransformation(lambda p: jax.tree.map(jnp.zeros_like, p), lambda u, s, p=None: (u, u))


def check_chain_extra_args_no_retrace(factory, m):
  rng = np.random.default_rng(0)
  params = params_of(rng)
  tx = optax.chain(factory(num_tasks=T, shared=SHARED), tap(), optax.adam(1e-2))
  traces = []

  def step(g, s, p, losses):
    traces.append(1)
    return tx.update(g, s, p, task_losses=losses, foo=1, bar="x")

  step = jax.jit(step)
  state = tx.init(params)
  for k in range(3):
    updates, state = step(grads_of(rng, m, T), state, params, rng.uniform(0.5, 2, size=T).astype(np.float32))
    for out in (updates, state[1]):
      assert jax.tree.structure(out) == jax.tree.structure(params)
      for u, p in zip(jax.tree.leaves(out), jax.tree.leaves(params)):
        assert u.shape == p.shape and u.dtype == p.dtype
    finite((updates, state), f"step {k}")
  assert len(traces) == 1
  # [M, T] losses are accepted too (the method alone).
  method = factory(num_tasks=T)
  updates, _ = method.update(grads_of(rng, m, T), method.init(params), params, task_losses=np.ones((m, T), np.float32))
  finite(updates)


def check_inject_hyperparams(factory, m, options, static=("num_tasks",)):
  rng = np.random.default_rng(1)
  params = params_of(rng)
  plain = factory(num_tasks=T, shared=SHARED, **options)
  inject = optax.inject_hyperparams(factory, static_args=tuple(static) + ("shared",))(
    num_tasks=T, shared=SHARED, **options
  )
  s_p, s_i = plain.init(params), inject.init(params)
  up_i = jax.jit(inject.update)
  for _ in range(3):
    g = grads_of(rng, m, T)
    u_p, s_p = plain.update(g, s_p, params)
    u_i, s_i = up_i(g, s_i, params)
    close(u_p, u_i, 1e-5, 1e-6, "updates")
    close(s_p, s_i.inner_state, 1e-5, 1e-6, "state")


def check_float32_float64(factory, m):
  rng = np.random.default_rng(2)
  params32 = params_of(rng)
  seq = [grads_of(rng, m, T) for _ in range(4)]
  tx = factory(num_tasks=T, shared=SHARED)
  s32 = tx.init(params32)
  out32 = []
  for g in seq:
    u, s32 = tx.update(g, s32, params32)
    out32.append((u, s32))
  with jax.enable_x64(True):
    cast = lambda tree: jax.tree.map(lambda x: np.asarray(x, np.float64), tree)
    params64 = cast(params32)
    s64 = tx.init(params64)
    for g, (u32, st32) in zip(seq, out32):
      u64, s64 = tx.update(cast(g), s64, params64)
      assert all(x.dtype == jnp.float64 for x in jax.tree.leaves((u64, s64)))
      close(u32, u64, 1e-3, 1e-5)
      close(st32.weights, s64.weights, 1e-3, 1e-5)


def check_edge_gradients(factory, m, degree_one: bool):
  rng = np.random.default_rng(3)
  params = params_of(rng)
  tx = factory(num_tasks=T, shared=SHARED)
  step = jax.jit(tx.update)
  state = tx.init(params)
  base = grads_of(rng, m, T)
  kinds = {
    "zero": jax.tree.map(np.zeros_like, base),
    "identical": jax.tree.map(lambda g: np.repeat(np.repeat(g[:1, :1], T, axis=1), m, axis=0), base),
    "opposite": jax.tree.map(
      lambda g: np.repeat(
        g[:1, :1] * np.array([1.0, -1.0, 1.0], np.float32).reshape((1, -1) + (1,) * (g.ndim - 2)), m, axis=0
      ),
      base,
    ),
    "mixed_scales": jax.tree.map(
      lambda g: (g * np.array([1e10, 1.0, 1e-10], np.float32).reshape((1, -1) + (1,) * (g.ndim - 2))).astype(
        np.float32
      ),
      base,
    ),
  }
  for kind, g in kinds.items():
    d, new_state = step(g, state, params)
    finite((d, new_state), kind)
    if kind == "zero":
      for leaf in jax.tree.leaves(d):
        np.testing.assert_array_equal(leaf, 0.0)
    if kind == "identical":  # a positive multiple of the common gradient on the shared leaves
      u = np.concatenate([np.ravel(d["bottom"][k]) for k in ("bias", "kernel")])
      c = np.concatenate([np.ravel(g["bottom"][k][0, 0]) for k in ("bias", "kernel")])
      alpha = float(u @ c / (c @ c))
      assert alpha > 0
      np.testing.assert_allclose(u, alpha * c, rtol=1e-4, atol=1e-6)
  d1, _ = step(base, state, params)
  for s in (1e-10, 1e3, 1e10):
    d, new_state = step(jax.tree.map(lambda g: (g * s).astype(np.float32), base), state, params)
    finite((d, new_state), f"scale {s}")
    if degree_one:
      close(jax.tree.map(lambda x: np.asarray(x, np.float64) / s, d), d1, 1e-4, 1e-6, f"scale {s}")


def check_task_counts(factory, m):
  for t in (1, 8):
    rng = np.random.default_rng(4 + t)
    params = params_of(rng)
    tx = factory(num_tasks=t)
    state = tx.init(params)
    g = grads_of(rng, m, t)
    d, state = jax.jit(tx.update)(g, state, params)
    finite((d, state))
    w = np.asarray(state.weights)
    assert w.shape == (t,) and abs(w.sum() - 1) < 1e-5 and np.all(w >= 0)
    if t == 1:  # one task: its gradient of the direction's batch (the mean of the last ones)
      np.testing.assert_allclose(w, [1.0])


def check_toy_convergence(factory, m, lr=0.1, steps=300):
  """Two tasks ``L_i = |x - a_i|^2 / 2`` with per-micro-batch noise-free gradients: the iterate reaches
  the Pareto segment between ``a_1`` and ``a_2``."""
  a = jnp.array([[1.0, 0.0, 0.5, -1.0], [-1.0, 1.0, 0.5, 0.0]])
  tx = optax.chain(factory(num_tasks=2), optax.sgd(lr))
  x0 = {"x": jnp.array([3.0, -2.0, 0.0, 2.0])}

  def body(carry, _):
    x, s = carry
    g = x["x"][None] - a  # [T, P]
    u, s = tx.update({"x": jnp.broadcast_to(g, (m,) + g.shape)}, s, x)
    return (optax.apply_updates(x, u), s), None

  (x, _), _ = jax.lax.scan(body, (x0, tx.init(x0)), None, length=steps)
  x = np.asarray(x["x"], np.float64)
  a = np.asarray(a, np.float64)
  seg = a[1] - a[0]
  tau = np.clip((x - a[0]) @ seg / (seg @ seg), 0, 1)
  assert np.linalg.norm(x - (a[0] + tau * seg)) < 0.05, x


def check_bad_input(factory, m, method):
  rng = np.random.default_rng(5)
  params = params_of(rng)
  tx = factory(num_tasks=T, shared=SHARED)
  state = tx.init(params)
  g = grads_of(rng, m, T)
  # The plain [T, ...] input of the other methods: names the leaf and says how to get micro-batches.
  with pytest.raises(ValueError, match=rf"mtjax: {method}: leaf 'bottom/bias'.*\(3, 2\).*micro_batch_task_grads"):
    tx.update(jax.tree.map(lambda x: x[0], g), state, params)
  # The wrong number of micro-batches.
  other = m + 1
  with pytest.raises(ValueError, match=rf"mtjax: {method}: leaf .*\({other}, 3, .*\[{m}, T, \*param.shape\]"):
    tx.update(jax.tree.map(lambda x: np.concatenate([x, x[:1]]), g), state, params)
  # One leaf without the task axis.
  bad = {**g, "tower_0": {"kernel": g["tower_0"]["kernel"][:, 0]}}
  with pytest.raises(ValueError, match=rf"mtjax: {method}: .*tower_0"):
    tx.update(bad, state, params)
  # num_tasks mismatch.
  with pytest.raises(ValueError, match="mtjax: .*num_tasks=3"):
    tx.update(jax.tree.map(lambda x: x[:, :2], g), state, params)
  # params mismatch.
  with pytest.raises(ValueError, match=rf"mtjax: {method}: leaf 'tower_1/kernel'"):
    tx.update(g, state, {**params, "tower_1": {"kernel": np.zeros(3, np.float32)}})
  # task_losses of the wrong shape.
  with pytest.raises(ValueError, match=rf"mtjax: {method}: task_losses"):
    tx.update(g, state, params, task_losses=np.ones(T + 1, np.float32))

  # A lazy Jacobian (deferred) is rejected.
  def loss_fn(p, x):
    return jnp.stack(
      [jnp.sum(p["bottom"]["bias"] * x), jnp.sum(p["tower_0"]["kernel"] * x), jnp.sum(p["tower_1"]["kernel"] * x)]
    )

  _, lazy = mtjax.task_grads(loss_fn, deferred=True)(params, jnp.ones(2))
  with pytest.raises(ValueError, match=rf"mtjax: {method}: got a lazy Jacobian"):
    tx.update(lazy, state, params)
  # Bad hyperparameters.
  with pytest.raises(ValueError, match=rf"mtjax: {method}: num_tasks"):
    factory(num_tasks=0)
  with pytest.raises(ValueError, match=rf"mtjax: {method}: gamma"):
    factory(num_tasks=2, gamma=-1.0)
  with pytest.raises(ValueError, match=rf"mtjax: {method}: num_batches"):
    factory(num_tasks=2, num_batches=4)


def check_nonfinite(factory, m, method):
  rng = np.random.default_rng(6)
  params = params_of(rng)
  tx = factory(num_tasks=T, shared=SHARED)
  state = tx.init(params)
  g = grads_of(rng, m, T)
  bad = jax.tree.map(np.copy, g)
  bad["tower_1"]["kernel"][m - 1, 2, 0] = np.inf  # a task-specific leaf of the direction's batch
  with pytest.raises(ValueError, match="mtjax: non-finite task gradients"):
    tx.update(bad, state, params)
  with pytest.raises(Exception, match="mtjax: non-finite task gradients"):
    jax.block_until_ready(jax.jit(tx.update)(bad, state, params))
  losses = np.array([1.0, np.nan, 1.0], np.float32)
  with pytest.raises(Exception, match="mtjax: non-finite task losses"):
    jax.block_until_ready(jax.jit(lambda g_, s: tx.update(g_, s, params, task_losses=losses))(g, state))


def check_state_contract(factory, m, state_type):
  rng = np.random.default_rng(8)
  params = params_of(rng)
  tx = factory(num_tasks=T, shared=SHARED)
  step = jax.jit(tx.update)
  s0 = tx.init(params)
  _, s1 = step(grads_of(rng, m, T), s0, params)
  for s in (s0, s1):
    assert type(s) is state_type and "weights" in s._fields
    leaves, treedef = jax.tree.flatten(s)
    assert type(jax.tree.unflatten(treedef, leaves)) is state_type
  assert jax.tree.structure(s0) == jax.tree.structure(s1)
  for a, b in zip(jax.tree.leaves(s0), jax.tree.leaves(s1)):
    assert a.shape == b.shape and a.dtype == b.dtype
  np.testing.assert_allclose(np.asarray(s0.weights), np.full(T, 1.0 / T), rtol=1e-6)
  crossed = jax.jit(lambda s: s)(s1)
  g = grads_of(rng, m, T)
  close(step(g, crossed, params), step(g, s1, params), 0, 0)
