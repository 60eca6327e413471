"""The "subset" strategy (gram_leaves= on a deferred TaskJacobian), mtjax.amortized (every=k, ema) and
task_grads(chunk_size=c): NumPy float64 references built from dense rows, traced backward passes."""

import functools
import os
import re
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import mtjax
from mtjax._src import weighting
from mtjax.transforms._pcgrad import projection_orders

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "transforms"))
from mtl_references import backward_counter  # pylint: disable=wrong-import-position
from mtl_references import np_nonneg_qp  # pylint: disable=wrong-import-position

T = 4
D, H1, H2, B = 5, 6, 4, 16
SHARED = mtjax.shared_mask(exclude="tower")
_counted, BACKWARD_TRACES = backward_counter()  # traced backward passes through the trunk


def _problem(seed=0, num_tasks=T, dtype=jnp.float32):
  rng = np.random.default_rng(seed)
  a = lambda *shape, s=1.0: jnp.asarray(rng.normal(size=shape) * s, dtype)
  params = {
    "trunk": {
      "Dense_0": {"kernel": a(D, H1, s=0.6), "bias": a(H1, s=0.1)},
      "Dense_1": {"kernel": a(H1, H2, s=0.6), "bias": a(H2, s=0.1)},
    },
    "tower": a(H2, num_tasks, s=0.6),
  }
  batch = {"x": a(B, D), "y": a(B, num_tasks)}
  return params, batch


def _loss_fn(params, batch):
  p = params["trunk"]
  h = jnp.tanh(batch["x"] @ p["Dense_0"]["kernel"] + p["Dense_0"]["bias"][None, :])
  h = jnp.tanh(h @ p["Dense_1"]["kernel"] + p["Dense_1"]["bias"][None, :])
  h = mtjax.representation(_counted(h))  # an identity except for strategies "rep" / "shared"
  return jnp.mean((h @ params["tower"] - batch["y"]) ** 2, axis=0)


# ------------------------------------------------------------------------------------------------
# NumPy float64 references: weights from a Gram, updates from flattened dense rows.


def flat_rows(rows, select=None):
  """``[T, P]`` of the leaves whose path matches ``select`` (all when None), float64."""
  out = []
  for path, leaf in jax.tree_util.tree_flatten_with_path(rows)[0]:
    if select is None or re.search(select, "/".join(str(k.key) for k in path)):
      leaf = np.asarray(leaf, np.float64)
      out.append(leaf.reshape(leaf.shape[0], -1))
  return np.concatenate(out, axis=1)


def np_mgda_weights(gram):
  """Min-norm point of the convex hull: v = argmin_{v>=0} v^T G v / 2 - 1^T v, w = v / sum(v)."""
  v = np_nonneg_qp(gram, -np.ones(gram.shape[0]))
  return v / v.sum()


def np_upgrad_weights(gram, regularization=1e-4):
  t = gram.shape[0]
  a = gram / np.trace(gram) + regularization * np.eye(t)
  return sum(np.eye(t)[i] + np_nonneg_qp(a, a @ np.eye(t)[i]) for i in range(t)) / t


def np_pcgrad_weights(gram, orders):
  t = gram.shape[0]
  total = np.zeros(t)
  for i in range(t):
    c = np.eye(t)[i]
    for j in orders[i]:
      ip = c @ gram[:, j]
      if ip < 0 and gram[j, j] > 0:
        c[j] -= ip / gram[j, j]
    total += c
  return total


def np_update(rows, weights, mask=None):
  """``sum_t w_t g_t`` on the shared leaves, the plain sum on the others, params-shaped (float64)."""
  leaves, treedef = jax.tree.flatten(rows)
  shared = [True] * len(leaves) if mask is None else jax.tree.leaves(mask)
  out = [
    np.tensordot(weights if m else np.ones_like(weights), np.asarray(g, np.float64), axes=1)
    for g, m in zip(leaves, shared)
  ]
  return jax.tree.unflatten(treedef, out)


def _assert_tree_close(actual, expected, rtol, atol=0.0, msg=""):
  assert jax.tree.structure(actual) == jax.tree.structure(expected)
  for (path, a), e in zip(jax.tree_util.tree_flatten_with_path(actual)[0], jax.tree.leaves(expected)):
    np.testing.assert_allclose(
      np.asarray(a, np.float64),
      np.asarray(e, np.float64),
      rtol=rtol,
      atol=atol,
      err_msg=msg + jax.tree_util.keystr(path),
    )


# ------------------------------------------------------------------------------------------------
# subset: gram_leaves= on a deferred TaskJacobian

SUBSET = {
  "pcgrad": lambda **kw: mtjax.pcgrad(key=2, num_tasks=T, gram_leaves="Dense_1", **kw),
  "mgda": lambda **kw: mtjax.mgda(num_tasks=T, gram_leaves="Dense_1", **kw),
  "upgrad": lambda **kw: mtjax.upgrad(num_tasks=T, gram_leaves="Dense_1", tol=1e-12, max_iters=500, **kw),
}


@pytest.mark.parametrize("name,masked", [("pcgrad", False), ("mgda", False), ("upgrad", False), ("mgda", True)])
def test_subset_matches_numpy_and_dense_rows(name, masked):
  with jax.enable_x64(True):
    tx = SUBSET[name](**({"shared": SHARED} if masked else {}))

    @jax.jit
    def step(params, state, batch):
      losses, jac = mtjax.task_grads(_loss_fn, strategy="loop", deferred=True)(params, batch)
      _, rows = mtjax.task_grads(_loss_fn, strategy="loop")(params, batch)
      return rows, tx.update(jac, state, params, task_losses=losses), tx.update(rows, state, params, task_losses=losses)

    params, batch = _problem(1, dtype=jnp.float64)
    state = tx.init(params)
    rows, (update, new_state), (dense_update, _) = step(params, state, batch)
    sub = flat_rows(rows, "Dense_1")
    gram = sub @ sub.T
    if name == "mgda":
      w = np_mgda_weights(gram)
    elif name == "upgrad":
      w = np_upgrad_weights(gram)
    else:
      w = np_pcgrad_weights(gram, np.asarray(projection_orders(state.key, T)[1]))
    full = flat_rows(rows)
    assert not np.allclose(np_mgda_weights(full @ full.T), np_mgda_weights(gram), atol=1e-3)  # the subset matters
    np.testing.assert_allclose(new_state.weights, w, rtol=1e-6, atol=1e-7)
    expected = np_update(rows, w, SHARED(params) if masked else None)
    _assert_tree_close(update, expected, rtol=1e-8, atol=1e-12)
    _assert_tree_close(update, dense_update, rtol=1e-9, atol=1e-13)


@pytest.mark.parametrize("masked", [False, True], ids=["all-shared", "tower-task-specific"])
def test_subset_backward_passes(masked):
  tx = SUBSET["pcgrad"](**({"shared": SHARED} if masked else {}))
  params, batch = _problem()
  state = tx.init(params)

  def step(deferred):
    losses, grads = mtjax.task_grads(_loss_fn, strategy="loop", deferred=deferred)(params, batch)
    return tx.update(grads, state, params, task_losses=losses)[0]

  del BACKWARD_TRACES[:]
  jax.make_jaxpr(lambda: step(True))()
  # T passes for the rows of Dense_1 (XLA keeps only what those rows need) + 1 of sum_t w_t L_t; with the
  # tower task-specific, its plain sum takes one more pass (cotangent 1).
  assert len(BACKWARD_TRACES) == T + (2 if masked else 1)
  del BACKWARD_TRACES[:]
  jax.make_jaxpr(lambda: step(False))()
  assert len(BACKWARD_TRACES) == T


def test_subset_program_does_not_hold_the_full_rows():
  """The compiled subset step does fewer matrix products than the same step on the full rows."""
  tx = SUBSET["mgda"]()
  params, batch = _problem()
  state = tx.init(params)

  def step(deferred, params, batch):
    losses, grads = mtjax.task_grads(_loss_fn, strategy="loop", deferred=deferred)(params, batch)
    return tx.update(grads, state, params, task_losses=losses)[0]

  def dots(deferred):
    hlo = jax.jit(functools.partial(step, deferred)).lower(params, batch).compile().as_text()
    return len(re.findall(r"\bdot\(", hlo))

  subset, full = dots(True), dots(False)
  # Full rows: T backward passes of ~5 products each; subset: T passes of ~2 (Dense_1's rows) + 1 full.
  assert 0 < subset < full, (subset, full)


def test_gradnorm_deferred_equals_dense():
  with jax.enable_x64(True):
    tx = mtjax.gradnorm(num_tasks=T)  # Gram of the last shared layer: Dense_1 (the tower has no 'kernel')

    @jax.jit
    def step(params, a, b, batch):
      losses, jac = mtjax.task_grads(_loss_fn, strategy="loop", deferred=True)(params, batch)
      _, rows = mtjax.task_grads(_loss_fn, strategy="loop")(params, batch)
      return tx.update(jac, a, params, task_losses=losses), tx.update(rows, b, params, task_losses=losses)

    params, _ = _problem(0, dtype=jnp.float64)
    a = b = tx.init(params)
    for seed in range(3):  # learned weights move, the initial losses are set at the first step
      _, batch = _problem(seed + 1, dtype=jnp.float64)
      (ua, a), (ub, b) = step(params, a, b, batch)
      _assert_tree_close(ua, ub, rtol=1e-9, atol=1e-13, msg=f"step {seed}: ")
    _assert_tree_close(a, b, rtol=1e-9, atol=1e-13)
    assert not np.allclose(a.weights, 1.0)


# ------------------------------------------------------------------------------------------------
# amortized

SHAPES = {"a": {"kernel": (3, 2), "bias": (2,)}, "b": (3,), "tower": (2,)}


def _random_grads(rng, num_tasks=T):
  return jax.tree.map(
    lambda s: jnp.asarray(rng.normal(size=(num_tasks,) + s) + 0.5 * rng.normal(size=s), jnp.float32),
    SHAPES,
    is_leaf=lambda x: isinstance(x, tuple),
  )


def _params():
  return jax.tree.map(lambda s: jnp.zeros(s, jnp.float32), SHAPES, is_leaf=lambda x: isinstance(x, tuple))


STATEFUL = {
  "pcgrad": lambda **kw: mtjax.pcgrad(key=7, num_tasks=T, **kw),
  "gradvac": lambda **kw: mtjax.gradvac(key=7, num_tasks=T, beta=0.5, **kw),
  "mgda": lambda **kw: mtjax.mgda(num_tasks=T, **kw),
}


@pytest.mark.parametrize("name", list(STATEFUL))
def test_amortized_every_1_is_the_method(name):
  method = STATEFUL[name]()
  tx = mtjax.amortized(STATEFUL[name](), every=1)
  params = _params()
  ref_state, state = method.init(params), tx.init(params)

  @jax.jit
  def step(g, ref_state, state):
    return method.update(g, ref_state, params), tx.update(g, state, params)

  rng = np.random.default_rng(0)
  for _ in range(3):
    (ref_u, ref_state), (u, state) = step(_random_grads(rng), ref_state, state)
    for x, y in zip(jax.tree.leaves(u), jax.tree.leaves(ref_u)):
      np.testing.assert_array_equal(x, y)
  for x, y in zip(jax.tree.leaves(state.inner_state), jax.tree.leaves(ref_state)):
    np.testing.assert_array_equal(x, y)
  np.testing.assert_array_equal(state.weights, ref_state.weights)
  assert int(state.count) == 3


@pytest.mark.parametrize("name", ["pcgrad", "mgda"])
def test_amortized_every_k_reuses_the_weights(name):
  k = 3
  method = STATEFUL[name](shared=SHARED)
  tx = mtjax.amortized(STATEFUL[name](shared=SHARED), every=k)
  params = _params()
  ref_state, state = method.init(params), tx.init(params)
  ref_update, update = jax.jit(method.update), jax.jit(tx.update)
  mask = SHARED(params)
  rng = np.random.default_rng(1)
  for step in range(2 * k + 1):
    g = _random_grads(rng)
    before = state
    u, state = update(g, state, params)
    assert int(state.count) == step + 1
    if step % k == 0:  # refresh: exactly the method (whose state advances)
      ref_u, ref_state = ref_update(g, ref_state, params)
      np.testing.assert_array_equal(state.weights, ref_state.weights)
      for x, y in zip(jax.tree.leaves((u, state.inner_state)), jax.tree.leaves((ref_u, ref_state))):
        np.testing.assert_array_equal(x, y)
    else:  # reuse: the stored weights, inner state untouched
      w = np.asarray(before.weights, np.float64)
      _assert_tree_close(u, np_update(g, w, mask), rtol=1e-5, atol=1e-6, msg=f"step {step}: ")
      for x, y in zip(jax.tree.leaves(state.inner_state), jax.tree.leaves(before.inner_state)):
        np.testing.assert_array_equal(x, y)
      np.testing.assert_array_equal(state.weights, before.weights)


def test_amortized_ema_of_the_weights():
  every, beta = 2, 0.75
  method = mtjax.mgda(num_tasks=T)
  tx = mtjax.amortized(mtjax.mgda(num_tasks=T), every=every, ema=beta)
  params = _params()
  ref_state, state = method.init(params), tx.init(params)
  ref_update, update = jax.jit(method.update), jax.jit(tx.update)
  rng = np.random.default_rng(2)
  w_bar = None
  for step in range(5):
    g = _random_grads(rng)
    u, state = update(g, state, params)
    if step % every == 0:
      _, ref_state = ref_update(g, ref_state, params)
      w = np.asarray(ref_state.weights, np.float64)  # the method's weights at this refresh
      w_bar = w if w_bar is None else beta * w_bar + (1.0 - beta) * w
    np.testing.assert_allclose(state.weights, w_bar, rtol=1e-6, atol=1e-7)
    _assert_tree_close(u, np_update(g, w_bar), rtol=1e-5, atol=1e-6, msg=f"step {step}: ")
  assert not np.allclose(w_bar, w)  # the average differs from the last weights


def test_amortized_with_a_deferred_jacobian():
  k = 2
  tx = mtjax.amortized(mtjax.mgda(num_tasks=T, shared=SHARED), every=k)

  def step(params, state, batch, deferred):
    losses, grads = mtjax.task_grads(_loss_fn, strategy="loop", deferred=deferred)(params, batch)
    return tx.update(grads, state, params, task_losses=losses)

  params, _ = _problem(0)
  state = tx.init(params)
  jaxpr = jax.make_jaxpr(functools.partial(step, deferred=True))(params, state, _problem(1)[1])
  assert "cond" in str(jaxpr)  # refresh (rows, solve) or reuse (one backward), chosen on device
  lazy, dense = jax.jit(functools.partial(step, deferred=True)), jax.jit(functools.partial(step, deferred=False))
  a = b = state
  for seed in range(2 * k):
    _, batch = _problem(seed + 1)
    ua, a = lazy(params, a, batch)
    ub, b = dense(params, b, batch)
    _assert_tree_close(ua, ub, rtol=1e-5, atol=1e-6, msg=f"step {seed}: ")
  np.testing.assert_allclose(a.weights, b.weights, rtol=1e-5)


@pytest.mark.parametrize("masked", [False, True], ids=["all-shared", "tower-task-specific"])
def test_fixed_weights_reuse_path_is_one_backward_pass(masked):
  """The reuse branch: the core given FIXED_WEIGHTS skips the solve and does J^T w in one pass."""
  tx = mtjax.mgda(num_tasks=T, **({"shared": SHARED} if masked else {}))
  params, batch = _problem(3)
  state = tx.init(params)
  w = jnp.array([0.1, 0.4, 0.2, 0.3], jnp.float32)

  def reuse(deferred):
    losses, grads = mtjax.task_grads(_loss_fn, strategy="loop", deferred=deferred)(params, batch)
    return tx.update(grads, state, params, task_losses=losses, **{weighting.FIXED_WEIGHTS: w})

  del BACKWARD_TRACES[:]
  update, new_state, rows = jax.jit(lambda: reuse(True) + (mtjax.task_grads(_loss_fn)(params, batch)[1],))()
  assert len(BACKWARD_TRACES) == (2 if masked else 1) + 1  # (+ the tower's plain sum) + the reference rows
  for x, y in zip(jax.tree.leaves(new_state), jax.tree.leaves(state)):
    np.testing.assert_array_equal(x, y)  # no solve, state unchanged
  _assert_tree_close(
    update, np_update(rows, np.asarray(w, np.float64), SHARED(params) if masked else None), rtol=1e-5, atol=1e-6
  )


def test_amortized_gradvac_one_group_record_reuses_as_task_weights():
  """GradVac (granularity="model") records its [T] weights as [1, T]; the reuse step applies them as [T]:
  one backward pass from a deferred Jacobian, and gram_leaves= works (a per-group [1, T] raised for the
  shared leaves outside the Gram, as it did with task_specific="weighted")."""
  params, batch = _problem(2)
  rows = jax.jit(mtjax.task_grads(_loss_fn))(params, batch)[1]
  for kw in ({"gram_leaves": "Dense_1"},):
    method = mtjax.gradvac(key=1, num_tasks=T, **kw)
    tx = mtjax.amortized(mtjax.gradvac(key=1, num_tasks=T, **kw), every=2)

    @jax.jit
    def run(rows):
      state = tx.init(params)
      _, state = tx.update(rows, state, params)  # refresh
      u, state = tx.update(rows, state, params)  # reuse
      return u, state, method.update(rows, method.init(params), params)[0]  # same key: same weights

    u, state, ref = run(rows)
    assert state.weights.shape == (1, T)
    _assert_tree_close(u, ref, rtol=1e-5, atol=1e-6, msg=f"{kw}: ")
  tx = mtjax.amortized(mtjax.gradvac(key=1, num_tasks=T), every=2)
  state = tx.init(params)

  def step():
    losses, grads = mtjax.task_grads(_loss_fn, strategy="loop", deferred=True)(params, batch)
    return tx.update(grads, state, params, task_losses=losses)[0]

  del BACKWARD_TRACES[:]
  jax.make_jaxpr(step)()
  assert len(BACKWARD_TRACES) == T + 1  # both branches of the cond: T rows on refresh, 1 pass on reuse


def test_amortized_errors():
  with pytest.raises(ValueError, match="GradDrop and plain optax transforms"):
    mtjax.amortized(mtjax.graddrop(num_tasks=T), every=2)
  with pytest.raises(ValueError, match="GradDrop and plain optax transforms"):
    mtjax.amortized(optax.sgd(0.1), every=2)
  tx = mtjax.amortized(mtjax.mgda(), every=2)  # no num_tasks: no weights record
  with pytest.raises(ValueError, match="num_tasks=T"):
    tx.init(_params())
  with pytest.raises(ValueError, match="every must be >= 1"):
    mtjax.amortized(mtjax.mgda(num_tasks=T), every=0)
  with pytest.raises(ValueError, match=r"ema must be a number in \[0, 1\)"):
    mtjax.amortized(mtjax.mgda(num_tasks=T), every=2, ema=1.0)


# ------------------------------------------------------------------------------------------------
# chunk_size


@pytest.mark.parametrize("strategy", ["map", "vmap"])
def test_chunked_rows_equal_unchunked(strategy):
  num_tasks = 5
  params, batch = _problem(4, num_tasks=num_tasks)

  @jax.jit
  def all_rows(params, batch):
    out = {}
    for c in (None, 1, 2, 3):
      out[f"rows-{c}"] = mtjax.task_grads(_loss_fn, strategy=strategy, chunk_size=c)(params, batch)[1]
      out[f"deferred-{c}"] = mtjax.task_grads(_loss_fn, strategy=strategy, deferred=True, chunk_size=c)(params, batch)[
        1
      ].materialize()
    return out

  out = all_rows(params, batch)
  for key, rows in out.items():
    _assert_tree_close(rows, out["rows-None"], rtol=1e-6, atol=1e-7, msg=f"{key}: ")


def test_chunked_shared_jacobian_equals_unchunked():
  num_tasks = 5
  params, batch = _problem(5, num_tasks=num_tasks)
  tx = mtjax.mgda(num_tasks=num_tasks)

  @jax.jit
  def run(params, batch):
    out = []
    for c in (None, 2, 3):
      losses, jac = mtjax.task_grads(_loss_fn, strategy="shared", chunk_size=c)(params, batch)
      assert isinstance(jac, mtjax.SharedJacobian) and jac.chunk_size == c
      out.append((jac.materialize(), tx.update(jac, tx.init(params), params, task_losses=losses)[0]))
    return out, mtjax.task_grads(_loss_fn, strategy="loop")(params, batch)[1]

  out, rows = run(params, batch)
  for c, got in zip((2, 3), out[1:]):
    # chunks sum in another order: a few float32 ulps of the largest entry (~2.3) apart
    _assert_tree_close(got, out[0], rtol=1e-6, atol=1e-6, msg=f"chunk {c}: ")
  _assert_tree_close(out[0][0], rows, rtol=1e-5, atol=1e-6)  # the exact rows
