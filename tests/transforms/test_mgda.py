"""MGDA: NumPy float64 references, the oracle, KKT / non-conflict properties, options, errors."""

import doctest

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from mtl_references import np_min_norm_gram

import mtjax
from mtjax._src import solvers
from mtjax.transforms import _mgda

# P = 6 parameters in two leaves, so T = 8 gives a rank-deficient Gram.
SHAPES = {"trunk": {"kernel": (2, 2), "bias": (2,)}}


def _tree(jac, dtype=jnp.float32):
  """Per-task gradient pytree whose flattened rows are jac [T, 6]."""
  jac = np.asarray(jac)
  t = jac.shape[0]
  return {"trunk": {"bias": jnp.asarray(jac[:, :2], dtype), "kernel": jnp.asarray(jac[:, 2:].reshape(t, 2, 2), dtype)}}


def _flat_update(update):
  """Params-shaped update in the same column order as _tree's jac."""
  return np.concatenate(
    [np.asarray(update["trunk"]["bias"], np.float64).ravel(), np.asarray(update["trunk"]["kernel"], np.float64).ravel()]
  )


def np_min_norm(rows):
  """Exact float64 min-norm point of conv(rows) by enumerating supports (independent of the solver)."""
  rows = [np.asarray(r, np.float64) for r in rows]
  return np_min_norm_gram(np.array([[float(np.dot(a, b)) for b in rows] for a in rows]))


def np_mgda(jac, losses, normalization, apply_to):
  """Reference: coefficients on the raw gradients and the update, looping over tasks."""
  jac = np.asarray(jac, np.float64)
  t = jac.shape[0]
  norms = np.array([np.sqrt(np.sum(jac[i] ** 2)) for i in range(t)])
  if normalization == "none":
    n = np.ones(t)
  elif normalization == "l2":
    n = norms
  elif normalization == "loss":
    n = np.asarray(losses, np.float64)
  else:
    n = np.asarray(losses, np.float64) * norms
  rows = [jac[i] / n[i] if n[i] > 0 else np.zeros_like(jac[i]) for i in range(t)]
  w = np_min_norm(rows)
  coef = w.copy() if apply_to == "raw" else np.array([w[i] / n[i] if n[i] > 0 else 0.0 for i in range(t)])
  update = sum(coef[i] * jac[i] for i in range(t))
  return w, coef, update, np.array(rows)


def _jac(rng, t, common=1.0):
  return rng.normal(size=(t, 6)) + common * rng.normal(size=(1, 6))


# Shared jitted default transform: each (T, dtype) compiles once for the whole file.
_DEFAULT = mtjax.mgda()
_default_update = jax.jit(_DEFAULT.update)


def test_oracle():
  tx = mtjax.mgda(num_tasks=2)
  grads = {"w": jnp.array([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]])}
  params = {"w": jnp.zeros(3)}
  update, state = jax.jit(tx.update)(grads, tx.init(params), params)
  np.testing.assert_allclose(update["w"], [0.0, 1.0, 1.0], atol=1e-4)
  np.testing.assert_allclose(state.weights, [0.6, 0.4], atol=1e-4)
  assert isinstance(state, mtjax.MGDAState)
  # Through optax.chain the min-norm direction is descended.
  chain = optax.chain(mtjax.mgda(), optax.sgd(0.5))
  update, _ = chain.update(grads, chain.init(params), params)
  np.testing.assert_allclose(update["w"], [0.0, -0.5, -0.5], atol=1e-4)


def test_matches_reference_and_does_not_conflict():
  """normalization='none' for T = 1..8 (T = 8 > P: rank-deficient Gram)."""
  rng = np.random.default_rng(0)
  tx, update_fn = _DEFAULT, _default_update
  for t in (1, 2, 3, 5, 8):
    for common in (0.0, 2.0):
      jac = _jac(rng, t, common)
      d = _flat_update(update_fn(_tree(jac), tx.init(None))[0])
      _, _, ref_d, _ = np_mgda(jac, None, "none", "raw")
      scale = np.max(np.sum(jac**2, axis=1))
      np.testing.assert_allclose(d, ref_d, atol=2e-3 * np.sqrt(scale))
      # g_t . d >= ||d||^2 - tol for every task: no task is hurt to first order.
      assert np.all(jac @ d >= d @ d - 1e-5 * scale), (t, jac @ d, d @ d)


def test_float64_weights_match_reference():
  rng = np.random.default_rng(1)
  with jax.enable_x64(True):
    tx = mtjax.mgda(num_tasks=5, tol=1e-12)
    update_fn = jax.jit(tx.update)
    solve = jax.jit(lambda g: solvers.min_norm_simplex(g, tol=1e-12).weights)
    for _ in range(3):
      jac = _jac(rng, 5, 1.0)
      update, state = update_fn(_tree(jac, jnp.float64), tx.init(None))
      w, _, ref_d, _ = np_mgda(jac, None, "none", "raw")
      assert state.weights.dtype == jnp.float32  # the logged record
      np.testing.assert_allclose(_flat_update(update), ref_d, atol=1e-8)
      gram = jac @ jac.T
      w_solver = solve(jnp.asarray(gram))
      np.testing.assert_allclose(w_solver, w, atol=1e-7)


@pytest.mark.parametrize(
  "normalization,apply_to", [("l2", "raw"), ("l2", "normalized"), ("loss", "normalized"), ("loss+", "raw")]
)
def test_normalizations_match_reference(normalization, apply_to):
  rng = np.random.default_rng(2)
  tx = mtjax.mgda(num_tasks=4, normalization=normalization, apply_to=apply_to)
  update_fn = jax.jit(tx.update)
  for _ in range(2):
    jac = _jac(rng, 4, 1.0) * rng.uniform(0.1, 10.0, size=(4, 1))
    losses = rng.uniform(0.2, 3.0, size=4)
    update, state = update_fn(_tree(jac), tx.init(None), task_losses=jnp.asarray(losses, jnp.float32))
    w, coef, ref_d, rows = np_mgda(jac, losses, normalization, apply_to)
    np.testing.assert_allclose(state.weights, coef, rtol=2e-3, atol=2e-3 * np.abs(coef).max())
    np.testing.assert_allclose(_flat_update(update), ref_d, atol=2e-3 * np.abs(ref_d).max() + 1e-6)
    if apply_to == "normalized":  # the guarantee holds for the normalized gradients
      d = _flat_update(update)
      scale = np.max(np.sum(rows**2, axis=1))
      assert np.all(rows @ d >= d @ d - 1e-4 * scale)


def test_normalization_none_ignores_apply_to_and_losses():
  rng = np.random.default_rng(3)
  jac = _jac(rng, 3)
  b = mtjax.mgda(apply_to="normalized")
  ua, _ = _default_update(_tree(jac), _DEFAULT.init(None), task_losses=jnp.array([1.0, 5.0, 9.0]), unknown_extra=1)
  ub, _ = jax.jit(b.update)(_tree(jac), b.init(None))
  np.testing.assert_allclose(_flat_update(ua), _flat_update(ub), atol=1e-6)


def test_permutation_equivariance():
  rng = np.random.default_rng(4)
  jac = _jac(rng, 5)
  perm = rng.permutation(5)
  u, _ = _default_update(_tree(jac), _DEFAULT.init(None))
  up, _ = _default_update(_tree(jac[perm]), _DEFAULT.init(None))
  w = np_mgda(jac, None, "none", "raw")[0]
  gram, gram_p = jac @ jac.T, jac[perm] @ jac[perm].T
  solve = jax.jit(lambda g: solvers.min_norm_simplex(g).weights)
  np.testing.assert_allclose(
    solve(jnp.asarray(gram_p, jnp.float32)), np.asarray(solve(jnp.asarray(gram, jnp.float32)))[perm], atol=1e-4
  )
  np.testing.assert_allclose(np.asarray(solve(jnp.asarray(gram, jnp.float32))), w, atol=1e-4)
  np.testing.assert_allclose(_flat_update(up), _flat_update(u), atol=1e-4)


@pytest.mark.parametrize("dtype,normalization", [("float32", "none"), ("float32", "loss+"), ("float64", "l2")])
def test_finite_on_degenerate_gradients(dtype, normalization):
  rng = np.random.default_rng(5)
  g = rng.normal(size=(1, 6))
  with jax.enable_x64(dtype == "float64"):
    if normalization == "none" and dtype == "float32":
      tx, update_fn = _DEFAULT, _default_update
    else:
      tx = mtjax.mgda(normalization=normalization)
      update_fn = jax.jit(tx.update)
    # All with T = 3 (one compilation); rank 2 for "rank_deficient", rank 1 for the next two.
    cases = {
      "zero": np.zeros((3, 6)),
      "identical": np.repeat(g, 3, axis=0),
      "opposite": np.concatenate([g, -g, g]),
      "rank_deficient": rng.normal(size=(3, 2)) @ rng.normal(size=(2, 6)),
      "random": _jac(rng, 3),
    }
    for name, jac in cases.items():
      for scale in (1e-10, 1.0, 1e10):
        j = jac * scale
        losses = jnp.asarray(np.full(j.shape[0], scale if name != "zero" else 0.0), dtype)
        update, _ = update_fn(_tree(j, dtype), tx.init(None), task_losses=losses)
        d = _flat_update(update)
        assert np.all(np.isfinite(d)), (name, scale)
        if name == "zero":
          assert np.all(d == 0)
        if name == "identical" and normalization == "none":
          np.testing.assert_allclose(d, g[0] * scale, rtol=1e-4)
        if name == "opposite":
          assert np.linalg.norm(d) <= 1e-3 * np.linalg.norm(g) * scale


def test_shared_mask_and_task_specific_leaves():
  rng = np.random.default_rng(6)
  jac = _jac(rng, 3)
  tower = rng.normal(size=(3, 4))
  grads = dict(_tree(jac), tower={"kernel": jnp.asarray(tower, jnp.float32)})
  params = jax.tree.map(lambda x: x[0], grads)
  mask = mtjax.shared_mask(exclude="tower")
  for task_specific in ("sum", "weighted"):
    tx = mtjax.mgda(num_tasks=3, shared=mask, task_specific=task_specific)
    update, _ = jax.jit(tx.update)(grads, tx.init(params), params)
    w, _, ref_d, _ = np_mgda(jac, None, "none", "raw")
    np.testing.assert_allclose(_flat_update(update), ref_d, atol=1e-4)
    expected_tower = tower.sum(0) if task_specific == "sum" else w @ tower
    np.testing.assert_allclose(update["tower"]["kernel"], expected_tower, atol=1e-4)


def test_inject_hyperparams_traced_tol():
  rng = np.random.default_rng(7)
  jac = _jac(rng, 4)
  tx = optax.inject_hyperparams(mtjax.mgda, static_args=("num_tasks", "max_iters"))(num_tasks=4, tol=1e-6)
  state = tx.init(None)
  update_fn = jax.jit(tx.update)
  update, state = update_fn(_tree(jac), state)
  _, _, ref_d, _ = np_mgda(jac, None, "none", "raw")
  np.testing.assert_allclose(_flat_update(update), ref_d, atol=2e-3)
  state.hyperparams["tol"] = jnp.asarray(1e-3)
  update2, _ = update_fn(_tree(jac), state)
  assert np.all(np.isfinite(_flat_update(update2)))
  traced_iters = optax.inject_hyperparams(mtjax.mgda, static_args=("num_tasks",))(num_tasks=4, max_iters=10)
  with pytest.raises(ValueError, match="static_args"):
    jax.jit(traced_iters.update)(_tree(jac), traced_iters.init(None))


def test_converges_to_pareto_stationary_point():
  """Two quadratics with minima a, b: MGDA + SGD stops on the Pareto set (the segment [a, b])."""
  a, b = jnp.array([1.0, 0.0]), jnp.array([0.0, 1.0])

  def losses(x):
    return jnp.stack([jnp.sum((x - a) ** 2), 2.0 * jnp.sum((x - b) ** 2)])

  tx = optax.chain(mtjax.mgda(num_tasks=2), optax.sgd(0.1))
  x0 = jnp.array([2.0, 2.0])

  def step(carry, _):
    x, state = carry
    grads = jax.jacrev(losses)(x)  # [T, 2]
    update, state = tx.update(grads, state, x)
    return (optax.apply_updates(x, update), state), None

  (x, _), _ = jax.lax.scan(step, (x0, tx.init(x0)), None, length=200)
  x = np.asarray(x)
  # On the segment between the minima: x = b + s (a - b), s in [0, 1].
  assert abs(x[0] + x[1] - 1.0) < 1e-2 and -1e-2 <= x[0] <= 1.01
  assert np.all(np.asarray(losses(jnp.asarray(x))) < np.asarray(losses(x0)))


def test_errors():
  rng = np.random.default_rng(8)
  grads = _tree(_jac(rng, 2))
  for normalization in ("loss", "loss+"):
    tx = mtjax.mgda(normalization=normalization)
    with pytest.raises(ValueError, match="task_losses"):
      tx.update(grads, tx.init(None))
    with pytest.raises(ValueError, match="non-negative"):
      tx.update(grads, tx.init(None), task_losses=jnp.array([1.0, -0.5]))
    if normalization == "loss":  # under jit: raised through a host callback
      with pytest.raises(Exception, match="non-negative"):
        jax.block_until_ready(jax.jit(tx.update)(grads, tx.init(None), task_losses=jnp.array([1.0, -0.5])))
    with pytest.raises(ValueError, match=r"shape \(2,\)"):
      tx.update(grads, tx.init(None), task_losses=jnp.ones(3))
  with pytest.raises(ValueError, match="normalization"):
    mtjax.mgda(normalization="L2")
  with pytest.raises(ValueError, match="apply_to"):
    mtjax.mgda(apply_to="both")
  with pytest.raises(ValueError, match="max_iters"):
    mtjax.mgda(max_iters=-3)
  tx = mtjax.mgda(num_tasks=3)
  with pytest.raises(ValueError, match="num_tasks=3"):
    tx.update(grads, tx.init(None))


def test_docstring_examples():
  result = doctest.testmod(_mgda)
  assert result.attempted > 0 and result.failed == 0
