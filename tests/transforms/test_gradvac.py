"""Tests for mtjax.gradvac against a plain NumPy float64 reference on the flat task gradients."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from mtl_references import np_pcgrad

import mtjax
from mtjax.transforms._pcgrad import projection_orders as _projection_orders

J_ORACLE = np.array([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]])
SHAPES = {"a": {"bias": (4,), "kernel": (3, 4)}, "b": {"kernel": (4, 2)}, "c": (5,)}
# Flattening order of SHAPES, the layer of each leaf, and the groups per granularity (by hand).
LEAF_PATHS = ["a/bias", "a/kernel", "b/kernel", "c"]
GROUPS = {"model": [0, 0, 0, 0], "layer": [0, 0, 1, 2], "leaf": [0, 1, 2, 3]}

# The orders an update draws from its state key, replayed by the reference.
projection_orders = jax.jit(_projection_orders, static_argnums=1)


def ref_gradvac(jac, segments, targets, orders, beta, reduction="sum"):
  """GradVac on the rows of ``jac`` [T, P] (NumPy float64).

  Args:
    jac: flat task gradients.
    segments: per group, the list of column index arrays belonging to it.
    targets: [K, T, T] EMA targets (not modified).
    orders: [T, T - 1] order of the j's for each i.
    beta: EMA rate.

  Returns:
    (update [P], new targets [K, T, T], number of vaccine steps taken with a positive target).
  """
  jac = np.asarray(jac, np.float64)
  targets = np.array(targets, np.float64)
  num_tasks = jac.shape[0]
  out = np.zeros(jac.shape[1])
  positive_steps = 0
  for k, cols in enumerate(segments):
    cols = np.concatenate(cols)
    jk = jac[:, cols]
    for i in range(num_tasks):
      g = jk[i].copy()
      for j in orders[i]:
        gj = jk[j]
        ni, nj = np.linalg.norm(g), np.linalg.norm(gj)
        if ni == 0 or nj == 0:
          continue
        phi = np.clip(g @ gj / (ni * nj), -1, 1)
        phi_hat = targets[k, i, j]
        if phi < phi_hat:
          g = g + gj * ni * (phi_hat * np.sqrt(1 - phi**2) - phi * np.sqrt(1 - phi_hat**2)) / (
            nj * np.sqrt(1 - phi_hat**2)
          )
          positive_steps += phi_hat > 0
        targets[k, i, j] = (1 - beta) * phi_hat + beta * phi
      out[cols] += g
  if reduction == "mean":
    out /= num_tasks
  return out, targets, positive_steps


def segments_for(granularity, shapes=SHAPES, paths=LEAF_PATHS):
  """Column index arrays of the flat vector per group."""
  sizes = {"a/bias": 4, "a/kernel": 12, "b/kernel": 8, "c": 5}
  ids = GROUPS[granularity]
  segments = [[] for _ in range(max(ids) + 1)]
  offset = 0
  for path, gid in zip(paths, ids):
    segments[gid].append(np.arange(offset, offset + sizes[path]))
    offset += sizes[path]
  return segments


def random_task_grads(rng, num_tasks, dtype, shift=0.0):
  def leaf(shape):
    return (rng.normal(size=(num_tasks,) + shape) + shift).astype(dtype)

  return jax.tree.map(leaf, SHAPES, is_leaf=lambda x: isinstance(x, tuple))


def flat(tree, num_tasks=None):
  leaves = jax.tree_util.tree_leaves(tree)
  if num_tasks is None:
    return np.concatenate([np.asarray(l, np.float64).ravel() for l in leaves])
  return np.concatenate([np.asarray(l, np.float64).reshape(num_tasks, -1) for l in leaves], axis=1)


def params_like(task_grads):
  return jax.tree.map(lambda g: jnp.zeros(g.shape[1:], g.dtype), task_grads)


def test_leaf_order_assumed_by_the_reference():
  assert mtjax.shared_mask()(params_like(random_task_grads(np.random.default_rng(0), 2, "float32"))) == jax.tree.map(
    lambda _: True, SHAPES, is_leaf=lambda x: isinstance(x, tuple)
  )
  paths = [
    "/".join(str(k.key) for k in p)
    for p, _ in jax.tree_util.tree_flatten_with_path(
      jax.tree.map(lambda s: 0, SHAPES, is_leaf=lambda x: isinstance(x, tuple))
    )[0]
  ]
  assert paths == LEAF_PATHS


def test_oracle_first_step_is_pcgrad():
  params = {"w": jnp.zeros(3)}
  grads = {"w": jnp.asarray(J_ORACLE, jnp.float32)}
  tx = mtjax.gradvac(num_tasks=2, beta=0.5)
  updates, state = jax.jit(tx.update)(grads, tx.init(params), params)
  np.testing.assert_allclose(updates["w"], [0.5848, 3.8012, 3.8012], atol=1e-4)
  np.testing.assert_allclose(state.weights, [[2.2222, 1.5789]], atol=1e-4)
  cos = -22 / np.sqrt(18 * 38)
  np.testing.assert_allclose(state.targets, [[[0, 0.5 * cos], [0.5 * cos, 0]]], atol=1e-6)
  chained = optax.chain(mtjax.gradvac(num_tasks=2), optax.sgd(0.1))
  updates, _ = jax.jit(chained.update)(grads, chained.init(params), params)
  np.testing.assert_allclose(updates["w"], -0.1 * np.array([0.5848, 3.8012, 3.8012]), atol=1e-4)


@pytest.mark.parametrize("num_tasks", [6])
def test_first_step_equals_pcgrad_with_the_same_key(num_tasks):
  rng = np.random.default_rng(num_tasks)
  grads = random_task_grads(rng, num_tasks, "float32")
  params = params_like(grads)
  gv = mtjax.gradvac(key=4, num_tasks=num_tasks, beta=0.1)
  pc = mtjax.pcgrad(key=4, num_tasks=num_tasks)
  u_gv, s_gv = jax.jit(gv.update)(grads, gv.init(params), params)
  u_pc, s_pc = jax.jit(pc.update)(grads, pc.init(params), params)
  np.testing.assert_allclose(flat(u_gv), flat(u_pc), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(s_gv.weights[0], s_pc.weights, rtol=1e-5, atol=1e-6)
  _, orders = projection_orders(gv.init(params).key, num_tasks)
  np.testing.assert_allclose(flat(u_gv), np_pcgrad(flat(grads, num_tasks), np.asarray(orders)), rtol=1e-4, atol=1e-4)


CASES = [
  ("float32", t, g, "mean" if t == 3 else "sum")
  for t, g in zip(range(1, 9), ["model", "leaf", "layer", "model", "leaf", "model", "layer", "model"])
] + [("float64", 2, "layer", "sum"), ("float64", 5, "leaf", "mean"), ("float64", 8, "model", "sum")]


@pytest.mark.parametrize("dtype,num_tasks,granularity,reduction", CASES)
def test_against_numpy_reference_over_steps(dtype, num_tasks, granularity, reduction):
  rng = np.random.default_rng(10 * num_tasks + len(granularity))
  beta = 0.3
  segments = segments_for(granularity)
  with jax.enable_x64(dtype == "float64"):
    tx = mtjax.gradvac(key=num_tasks, num_tasks=num_tasks, beta=beta, granularity=granularity, reduction=reduction)
    params = params_like(random_task_grads(rng, num_tasks, dtype))
    state = tx.init(params)
    assert state.targets.shape == (len(segments), num_tasks, num_tasks)
    assert state.targets.dtype == jnp.dtype(dtype)
    # Random nonzero targets exercise the vaccine step with phi_hat != 0 from the first step.
    targets = rng.uniform(-0.8, 0.9, size=state.targets.shape)
    state = state._replace(targets=jnp.asarray(targets, dtype))
    update = jax.jit(tx.update)
    positive_steps = 0
    for _ in range(3):
      grads = random_task_grads(rng, num_tasks, dtype, shift=0.3)
      next_key, orders = projection_orders(state.key, num_tasks)
      updates, state = update(grads, state, params)
      np.testing.assert_array_equal(state.key, next_key)
      expected, targets, n = ref_gradvac(flat(grads, num_tasks), segments, targets, np.asarray(orders), beta, reduction)
      positive_steps += n
      tol = 2e-4 if dtype == "float32" else 1e-9
      np.testing.assert_allclose(flat(updates), expected, rtol=tol, atol=tol)
      np.testing.assert_allclose(state.targets, targets, rtol=tol, atol=tol)
      assert state.targets.dtype == jnp.dtype(dtype)
      assert state.weights.shape == (len(segments), num_tasks)
    if num_tasks > 1:
      assert positive_steps > 0  # the general vaccine formula was exercised, not only PCGrad's


def test_reference_formula_reaches_the_target_cosine():
  # Sanity of the reference itself: after one adjustment cos(g_i', g_j) equals phi_hat.
  rng = np.random.default_rng(0)
  jac = rng.normal(size=(2, 9))
  targets = np.full((1, 2, 2), 0.8)
  _, _, n = ref_gradvac(jac, [[np.arange(9)]], targets, [[1], [0]], 0.5)
  assert n == 2
  g0, g1 = jac
  ni, nj = np.linalg.norm(g0), np.linalg.norm(g1)
  phi = g0 @ g1 / (ni * nj)
  adj = g0 + g1 * ni * (0.8 * np.sqrt(1 - phi**2) - phi * np.sqrt(1 - 0.64)) / (nj * 0.6)
  np.testing.assert_allclose(adj @ g1 / (np.linalg.norm(adj) * nj), 0.8, atol=1e-12)


def test_ema_target_values_for_two_tasks():
  # With T = 2, phi is always cos(g_0, g_1) of the step (measured before any adjustment), so
  # both off-diagonal targets follow the EMA of that cosine; the diagonal stays 0.
  rng = np.random.default_rng(1)
  beta = 0.3
  tx = mtjax.gradvac(num_tasks=2, beta=beta, granularity="leaf")
  params = {"u": jnp.zeros(4), "v": jnp.zeros(3)}
  state = tx.init(params)
  update = jax.jit(tx.update)
  expected = np.zeros((2,))
  for _ in range(4):
    grads = {
      "u": jnp.asarray(rng.normal(size=(2, 4)), jnp.float32),
      "v": jnp.asarray(rng.normal(size=(2, 3)), jnp.float32),
    }
    _, state = update(grads, state, params)
    for k, name in enumerate(["u", "v"]):
      g = np.asarray(grads[name], np.float64)
      cos = g[0] @ g[1] / np.linalg.norm(g[0]) / np.linalg.norm(g[1])
      expected[k] = (1 - beta) * expected[k] + beta * cos
    np.testing.assert_allclose(state.targets[:, 0, 1], expected, atol=1e-5)
    np.testing.assert_allclose(state.targets[:, 1, 0], expected, atol=1e-5)
    np.testing.assert_array_equal(state.targets[:, 0, 0], 0)
    np.testing.assert_array_equal(state.targets[:, 1, 1], 0)


def test_beta_is_traceable_under_inject_hyperparams():
  rng = np.random.default_rng(2)
  grads = random_task_grads(rng, 3, "float32", shift=0.2)
  params = params_like(grads)
  plain = mtjax.gradvac(key=1, num_tasks=3, beta=0.3, granularity="layer")
  injected = optax.inject_hyperparams(mtjax.gradvac, static_args=("num_tasks", "granularity"))(
    key=1, num_tasks=3, beta=0.3, granularity="layer"
  )
  u1, s1 = jax.jit(plain.update)(grads, plain.init(params), params)
  update = jax.jit(chex.assert_max_traces(injected.update, n=1))
  u2, s2 = update(grads, injected.init(params), params)
  np.testing.assert_allclose(flat(u1), flat(u2), rtol=1e-6)
  np.testing.assert_allclose(s1.targets, s2.inner_state.targets, rtol=1e-6)
  state = injected.init(params)
  state.hyperparams["beta"] = jnp.asarray(0.6, jnp.float32)
  _, s3 = update(grads, state, params)  # no retrace for a new beta value
  np.testing.assert_allclose(s3.inner_state.targets, 2 * s2.inner_state.targets, rtol=1e-5, atol=1e-7)


def test_shared_mask_task_specific_leaves_get_the_exact_sum():
  rng = np.random.default_rng(3)
  num_tasks = 3
  grads = random_task_grads(rng, num_tasks, "float32", shift=0.2)
  params = params_like(grads)
  tx = mtjax.gradvac(key=2, num_tasks=num_tasks, granularity="layer", shared=mtjax.shared_mask(exclude=r"^b/"))
  state = tx.init(params)
  assert state.targets.shape == (2, 3, 3)  # layers a and c only
  state = state._replace(targets=jnp.full((2, 3, 3), 0.5))
  _, orders = projection_orders(state.key, num_tasks)
  updates, _ = jax.jit(tx.update)(grads, state, params)
  np.testing.assert_array_equal(updates["b"]["kernel"], jnp.sum(grads["b"]["kernel"], axis=0))
  shared_flat = flat({"a": grads["a"], "c": grads["c"]}, num_tasks)  # a/bias, a/kernel, c
  segments = [[np.arange(0, 16)], [np.arange(16, 21)]]
  expected, _, _ = ref_gradvac(shared_flat, segments, np.full((2, 3, 3), 0.5), np.asarray(orders), 0.5)
  np.testing.assert_allclose(flat({"a": updates["a"], "c": updates["c"]}), expected, rtol=2e-4, atol=2e-4)


_DEGENERATE_TX = mtjax.gradvac(key=1, num_tasks=3, beta=0.5, granularity="leaf")
_DEGENERATE_UPDATE = jax.jit(_DEGENERATE_TX.update)  # one compile for all cases


@pytest.mark.parametrize(
  "case", ["zero", "zero_row", "identical", "opposite", "tiny", "huge", "targets_near_one", "targets_at_plus_minus_one"]
)
def test_finite_on_degenerate_inputs(case):
  rng = np.random.default_rng(4)
  base = rng.normal(size=(3, 2, 5))
  jac = {
    "zero": 0 * base,
    "zero_row": base * np.array([1.0, 0.0, 1.0])[:, None, None],
    "identical": np.repeat(base[:1], 3, 0),
    "opposite": np.stack([base[0], -base[0], base[1]]),
    "tiny": 1e-10 * base,
    "huge": 1e10 * base,
  }.get(case, base)
  params = {"x": jnp.zeros(5), "y": jnp.zeros(5)}
  grads = {"x": jnp.asarray(jac[:, 0], jnp.float32), "y": jnp.asarray(jac[:, 1], jnp.float32)}
  state = _DEGENERATE_TX.init(params)
  if case == "targets_near_one":
    state = state._replace(targets=jnp.full_like(state.targets, 1 - 1e-7))
  if case == "targets_at_plus_minus_one":
    state = state._replace(targets=jnp.asarray(rng.choice([-1.0, 1.0], size=state.targets.shape), jnp.float32))
  for _ in range(3):  # later steps run with the nonzero targets of earlier steps
    updates, state = _DEGENERATE_UPDATE(grads, state, params)
    assert all(np.all(np.isfinite(u)) for u in jax.tree_util.tree_leaves(updates)), case
    assert np.all(np.isfinite(state.targets)) and np.all(np.abs(state.targets) <= 1 + 1e-6), case
  if case == "zero":
    np.testing.assert_array_equal(state.targets, 0)  # undefined cosines leave the targets alone
  if case == "identical":  # cos = 1 everywhere: no adjustment, the update is the plain sum
    np.testing.assert_allclose(flat(updates), flat(grads, 3).sum(0), rtol=1e-5)


def test_single_task_and_state_structure_in_scan():
  grads = {"w": jnp.asarray([[1.0, -2.0, 3.0]])}
  params = {"w": jnp.zeros(3)}
  tx = mtjax.gradvac(num_tasks=1)
  updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
  np.testing.assert_array_equal(updates["w"], grads["w"][0])

  targets = jnp.array([[1.0, 0.0], [0.0, 1.0]])

  def losses(p):
    return jnp.sum((p["w"][None, :] - targets) ** 2, axis=1)

  tx = optax.chain(mtjax.gradvac(num_tasks=2, beta=0.1, granularity="leaf"), optax.sgd(0.05))
  params = {"w": jnp.array([3.0, 2.0])}

  def body(carry, _):
    params, state = carry
    updates, state = tx.update(
      jax.jacrev(losses)(params), state, params, task_losses=losses(params), unknown_extra_arg=1
    )
    return (optax.apply_updates(params, updates), state), losses(params).sum()

  init = tx.init(params)
  (params, final), history = jax.lax.scan(body, (params, init), None, length=60)
  assert jax.tree.map(lambda x: (x.shape, x.dtype), final) == jax.tree.map(lambda x: (x.shape, x.dtype), init)
  assert history[-1] < 0.2 * history[0]
  assert np.all(np.isfinite(history))


def test_errors():
  with pytest.raises(ValueError, match="mtjax: gradvac: num_tasks"):
    mtjax.gradvac(num_tasks=None)
  with pytest.raises(ValueError, match="mtjax: gradvac: unknown granularity"):
    mtjax.gradvac(num_tasks=2, granularity="block")
  with pytest.raises(ValueError, match="mtjax: gradvac: beta"):
    mtjax.gradvac(num_tasks=2, beta=1.5)
  with pytest.raises(ValueError, match="mtjax: gradvac: reduction"):
    mtjax.gradvac(num_tasks=2, reduction="max")
  tx = mtjax.gradvac(num_tasks=2, granularity="leaf")
  state = tx.init({"w": jnp.zeros(3)})
  params = {"w": jnp.zeros(3), "v": jnp.zeros(2)}
  grads = {"w": jnp.ones((2, 3)), "v": jnp.ones((2, 2))}
  with pytest.raises(ValueError, match="initialized for 1"):
    tx.update(grads, state, params)
