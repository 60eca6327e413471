"""PE-LTR: NumPy float64 reimplementation of both steps, oracles, properties, bounds validation."""

import doctest
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import mtjax
from mtjax._src import solvers
from mtjax.transforms import _pareto_ltr

ORACLE_J = np.array([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]])


def _tree(jac, dtype=jnp.float32):
  """Per-task gradient pytree (two leaves) whose flattened rows are jac [T, 6]."""
  jac = np.asarray(jac)
  t = jac.shape[0]
  return {"trunk": {"bias": jnp.asarray(jac[:, :2], dtype), "kernel": jnp.asarray(jac[:, 2:].reshape(t, 2, 2), dtype)}}


def _flat_update(update):
  return np.concatenate(
    [np.asarray(update["trunk"]["bias"], np.float64).ravel(), np.asarray(update["trunk"]["kernel"], np.float64).ravel()]
  )


def np_project_bisection(v, total):
  """Projection onto {x >= 0, sum x = total} by bisection on the threshold (not sort-based)."""
  v = np.asarray(v, np.float64)
  if total <= 0:
    return np.zeros_like(v)
  lo, hi = v.min() - total, v.max()  # sum(max(v - lo, 0)) >= total >= sum(max(v - hi, 0)) = 0
  for _ in range(200):
    mid = 0.5 * (lo + hi)
    if np.sum(np.maximum(v - mid, 0.0)) > total:
      lo = mid
    else:
      hi = mid
  return np.maximum(v - 0.5 * (lo + hi), 0.0)


def np_pareto_ltr(jac, c):
  """Both PE-LTR steps in float64 on J directly (loops over tasks). Returns (w, w_hat)."""
  jac = np.asarray(jac, np.float64)
  c = np.asarray(c, np.float64)
  t = jac.shape[0]
  gram = np.array([[float(np.dot(jac[i], jac[j])) for j in range(t)] for i in range(t)])
  kkt = np.zeros((t + 1, t + 1))
  kkt[:t, :t] = gram
  kkt[:t, t] = 1.0
  kkt[t, :t] = 1.0
  rhs = np.concatenate([-gram @ c, [1.0 - c.sum()]])
  w_hat = np.linalg.lstsq(kkt, rhs, rcond=None)[0][:t]
  return c + np_project_bisection(w_hat, 1.0 - c.sum()), w_hat


def _jac(rng, t, common=1.0):
  return rng.normal(size=(t, 6)) + common * rng.normal(size=(1, 6))


def _random_bounds(rng, t):
  c = rng.dirichlet(np.ones(t)) * rng.uniform(0.0, 1.0)
  c[rng.random(t) < 0.3] = 0.0
  return c


# PE-LTR with traced lower bounds (read from the state): one compilation per (T, dtype), any bounds.
_INJECTED = optax.inject_hyperparams(mtjax.pareto_ltr)
_UPDATE = jax.jit(lambda grads, state: _INJECTED(lower_bounds=jnp.zeros(1)).update(grads, state))


def _run_injected(jac, c, dtype=jnp.float32):
  tx = _INJECTED(lower_bounds=jnp.asarray(c, dtype))
  update, state = _UPDATE(_tree(jac, dtype), tx.init(None))
  return _flat_update(update), np.asarray(state.inner_state.weights, np.float64)


@pytest.mark.parametrize(
  "bounds,expected", [((0.0, 0.0), (0.6, 0.4)), ((0.2, 0.2), (0.6, 0.4)), ((0.7, 0.1), (0.7, 0.3))]
)
def test_oracles(bounds, expected):
  tx = mtjax.pareto_ltr(bounds)
  params = {"w": jnp.zeros(3)}
  update, state = jax.jit(tx.update)({"w": jnp.asarray(ORACLE_J, jnp.float32)}, tx.init(params), params)
  np.testing.assert_allclose(state.weights, expected, atol=1e-4)
  np.testing.assert_allclose(update["w"], np.asarray(expected) @ ORACLE_J, atol=1e-4)
  w_ref, _ = np_pareto_ltr(ORACLE_J, bounds)
  np.testing.assert_allclose(w_ref, expected, atol=1e-9)  # the reference agrees with the doc
  assert isinstance(state, mtjax.ParetoLTRState)


def test_matches_numpy_reference_and_constraints():
  rng = np.random.default_rng(0)
  for t in (1, 2, 3, 5, 8):  # T = 8 > P = 6: rank-deficient Gram
    for _ in range(3):
      jac = _jac(rng, t, common=rng.uniform(0, 2))
      c = _random_bounds(rng, t)
      d, w = _run_injected(jac, c)
      w_ref, _ = np_pareto_ltr(jac, c)
      np.testing.assert_allclose(w, w_ref, atol=2e-3)
      np.testing.assert_allclose(d, w_ref @ jac, atol=2e-3 * np.abs(jac).max() * t)
      assert np.all(w >= c - 1e-6) and abs(w.sum() - 1.0) < 1e-5


def test_float64_matches_reference():
  rng = np.random.default_rng(1)
  with jax.enable_x64(True):
    for _ in range(4):
      jac = _jac(rng, 5, 1.0)
      c = _random_bounds(rng, 5)
      d, w = _run_injected(jac, c, jnp.float64)
      w_ref, _ = np_pareto_ltr(jac, c)
      np.testing.assert_allclose(w, w_ref, atol=1e-6)  # the state records float32
      np.testing.assert_allclose(d, w_ref @ jac, atol=1e-9 * np.abs(jac).max() * 5 + 1e-12)


def test_unbounded_is_min_norm_when_relaxed_solution_is_feasible():
  """c = 0 and a feasible step-1 solution (always for T = 2 after projection): the MGDA point."""
  rng = np.random.default_rng(2)
  checked = 0
  for t in (2, 3):
    for _ in range(6):
      jac = _jac(rng, t, common=2.0)
      _, w_hat = np_pareto_ltr(jac, np.zeros(t))
      if t > 2 and np.any(w_hat < 0):
        continue
      d, w = _run_injected(jac, np.zeros(t))
      scale = np.max(np.sum(jac**2, axis=1))
      # g_t . d >= ||d||^2 - tol: non-conflicting (equality on the support).
      assert np.all(jac @ d >= d @ d - 1e-4 * scale), (jac @ d, d @ d)
      mgda_w = jax.jit(solvers.min_norm_simplex)(jnp.asarray(jac @ jac.T, jnp.float32)).weights
      np.testing.assert_allclose(w, mgda_w, atol=2e-3)
      checked += 1
  assert checked >= 6


def test_projection_step_is_the_papers_heuristic():
  """T = 3, c = 0, infeasible relaxed solution: projecting it is not the exact min-norm point.

  The result follows the paper (and matches the reference) even though it conflicts with task 0;
  MGDA's exact solution does not.
  """
  jac = np.array([[0.0, -1.0, -1.0], [-5.0, 4.0, 2.0], [-1.0, 2.0, 1.0]])
  tx = mtjax.pareto_ltr([0.0, 0.0, 0.0])
  params = {"w": jnp.zeros(3)}
  update, state = jax.jit(tx.update)({"w": jnp.asarray(jac, jnp.float32)}, tx.init(params), params)
  w_ref, w_hat = np_pareto_ltr(jac, np.zeros(3))
  assert np.any(w_hat < 0)
  np.testing.assert_allclose(state.weights, w_ref, atol=1e-4)
  np.testing.assert_allclose(w_ref, [0.48, 0.0, 0.52], atol=1e-9)
  d = np.asarray(update["w"], np.float64)
  assert (jac @ d)[0] < -0.5  # conflicts with task 0 ...
  tm = mtjax.mgda()
  d_mgda = np.asarray(jax.jit(tm.update)({"w": jnp.asarray(jac, jnp.float32)}, tm.init(params), params)[0]["w"])
  assert np.all(jac @ d_mgda >= d_mgda @ d_mgda - 1e-4 * 45)  # ... the exact min-norm point does not
  assert d_mgda @ d_mgda < d @ d


def test_bounds_summing_to_one_and_single_task():
  rng = np.random.default_rng(3)
  jac = _jac(rng, 3)
  for c in ([0.5, 0.3, 0.2], [1.0, 0.0, 0.0]):
    _, w = _run_injected(jac, c)
    np.testing.assert_allclose(w, c, atol=1e-6)
  for c in ([0.0], [0.3], [1.0]):
    d, w = _run_injected(jac[:1], c)
    np.testing.assert_allclose(w, [1.0], atol=1e-6)
    np.testing.assert_allclose(d, jac[0], rtol=1e-5)


def test_permutation_equivariance():
  rng = np.random.default_rng(4)
  for _ in range(3):
    jac = _jac(rng, 5)
    c = _random_bounds(rng, 5)
    perm = rng.permutation(5)
    d, w = _run_injected(jac, c)
    dp, wp = _run_injected(jac[perm], c[perm])
    np.testing.assert_allclose(wp, w[perm], atol=1e-4)
    np.testing.assert_allclose(dp, d, atol=1e-3)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_finite_on_degenerate_gradients(dtype):
  rng = np.random.default_rng(5)
  g = rng.normal(size=(1, 6))
  with jax.enable_x64(dtype == "float64"):
    cases = {
      "zero": np.zeros((3, 6)),
      "identical": np.repeat(g, 3, axis=0),
      "opposite": np.concatenate([g, -g, g]),
      "rank_deficient": rng.normal(size=(3, 2)) @ rng.normal(size=(2, 6)),
      "random": _jac(rng, 3),
    }
    for name, jac in cases.items():
      for c in (np.zeros(3), np.array([0.1, 0.2, 0.3])):
        for scale in (1e-10, 1.0, 1e10):
          d, w = _run_injected(jac * scale, c, dtype)
          assert np.all(np.isfinite(d)) and np.all(np.isfinite(w)), (name, scale)
          assert np.all(w >= c - 1e-5) and abs(w.sum() - 1) < 1e-5, (name, scale, w)
          if name in ("zero", "identical"):  # every w is optimal: pinv picks the even split
            np.testing.assert_allclose(w, c + (1 - c.sum()) / 3, atol=1e-3)
          if name == "opposite" and not c.any():
            assert np.linalg.norm(d) <= 1e-3 * np.linalg.norm(g) * scale


def test_shared_mask_and_task_specific_leaves():
  rng = np.random.default_rng(6)
  jac = _jac(rng, 3)
  tower = rng.normal(size=(3, 4))
  c = np.array([0.1, 0.0, 0.2])
  grads = dict(_tree(jac), tower={"kernel": jnp.asarray(tower, jnp.float32)})
  params = jax.tree.map(lambda x: x[0], grads)
  w_ref, _ = np_pareto_ltr(jac, c)
  for task_specific in ("sum", "weighted"):
    tx = mtjax.pareto_ltr(c, shared=mtjax.shared_mask(exclude="tower"), task_specific=task_specific)
    update, state = jax.jit(tx.update)(grads, tx.init(params), params, task_losses=jnp.ones(3), other=1)
    np.testing.assert_allclose(state.weights, w_ref, atol=1e-4)
    np.testing.assert_allclose(_flat_update(update), w_ref @ jac, atol=1e-4)
    expected_tower = tower.sum(0) if task_specific == "sum" else w_ref @ tower
    np.testing.assert_allclose(update["tower"]["kernel"], expected_tower, atol=1e-4)


def test_bad_bounds():
  with pytest.raises(ValueError, match="sum to more than 1"):
    mtjax.pareto_ltr([0.7, 0.4])
  with pytest.raises(ValueError, match="non-negative"):
    mtjax.pareto_ltr([0.5, -0.1])
  with pytest.raises(ValueError, match="num_tasks=3"):
    mtjax.pareto_ltr([0.1, 0.1], num_tasks=3)
  with pytest.raises(ValueError, match="1-D"):
    mtjax.pareto_ltr([[0.1, 0.1]])
  with pytest.raises(ValueError, match="1-D"):
    mtjax.pareto_ltr(0.1)
  mtjax.pareto_ltr(np.array([0.7, 0.2, 0.1], np.float32))  # sums to 1 up to rounding: accepted
  # Gradients with a different number of tasks than bounds.
  tx = mtjax.pareto_ltr([0.1, 0.1])
  with pytest.raises(ValueError, match="num_tasks=2"):
    tx.update(_tree(np.ones((3, 6))), tx.init(None))


def test_bad_traced_bounds_raise_at_runtime():
  jac = np.array([[1.0, 0.0, 0.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0, 0.0, 0.0]])
  tx = _INJECTED(lower_bounds=jnp.array([0.2, 0.2]))
  state = tx.init(None)
  update_fn = jax.jit(tx.update)
  jax.block_until_ready(update_fn(_tree(jac), state))
  for bad, message in (([0.8, 0.5], "sum to more than 1"), ([0.5, -0.2], "non-negative")):
    state.hyperparams["lower_bounds"] = jnp.asarray(bad)
    with pytest.raises(Exception, match=message):  # a JaxRuntimeError carrying the ValueError text
      jax.block_until_ready(update_fn(_tree(jac), state))
    with pytest.raises(ValueError, match=message):  # concrete bounds outside jit: a plain ValueError
      tx.update(_tree(jac), state)


def test_docstring_examples():
  result = doctest.testmod(_pareto_ltr)
  assert result.attempted > 0 and result.failed == 0


# ----------------------------------------------------------------------------- solver="exact"


def np_exact_qp(gram, c):
  """Independent float64 reference of min w^T G w over {w >= c, sum w = 1}: enumerate the supports
  S of x = w - c, solve the equality-constrained KKT system on S (least squares), keep the
  feasible points and return the one with the smallest objective (exact for small T)."""
  import itertools

  t = len(c)
  s = 1.0 - c.sum()
  if s <= 0:
    return c.copy()
  best, best_val = None, np.inf
  for k in range(1, t + 1):
    for support in itertools.combinations(range(t), k):
      idx = list(support)
      g_ss = gram[np.ix_(idx, idx)]
      kkt = np.block([[g_ss, np.ones((k, 1))], [np.ones((1, k)), np.zeros((1, 1))]])
      rhs = np.concatenate([-(gram @ c)[idx], [s]])
      sol = np.linalg.lstsq(kkt, rhs, rcond=None)[0]
      x = np.zeros(t)
      x[idx] = sol[:k]
      if np.any(x < -1e-12) or abs(x.sum() - s) > 1e-9:
        continue
      w = c + np.maximum(x, 0.0)
      val = w @ gram @ w
      if val < best_val - 1e-15:
        best, best_val = w, val
  return best


def test_exact_solver_matches_enumerated_qp_reference():
  rng = np.random.default_rng(11)
  worst = 0.0
  # jitted once per T (eager, every call recompiles the solver's loops: ~80 s instead of a few)
  exact = jax.jit(functools.partial(_pareto_ltr.pareto_ltr_exact_weights, tol=1e-12))
  with jax.enable_x64(True):
    for trial in range(40):
      t = int(rng.integers(2, 6))
      jac = _jac(rng, t, common=rng.uniform(0.0, 1.5))
      c = _random_bounds(rng, t) if trial % 2 else np.zeros(t)
      gram = jac @ jac.T
      w = np.asarray(exact(jnp.asarray(gram), jnp.asarray(c)))
      w_ref = np_exact_qp(gram, c)
      assert np.all(w >= c - 1e-12) and abs(w.sum() - 1.0) < 1e-12
      # The objective is what is unique (the weights need not be when G is singular).
      scale = np.max(np.diag(gram))
      gap = (w @ gram @ w - w_ref @ gram @ w_ref) / scale
      assert gap > -1e-12, (trial, gap)  # never below the exact optimum
      worst = max(worst, gap)
  assert worst < 1e-8, worst


def test_exact_solver_removes_the_papers_conflict():
  """The issue's reproducer: with c = 0 the paper's steps conflict with a task (J d has -0.131);
  the exact solve is MGDA's min-norm point, which conflicts with none."""
  jac = np.array([[0.3201, 0.9170], [0.5642, -0.5622], [-0.2903, 0.9939]])
  params = {"w": jnp.zeros(2)}
  grads = {"w": jnp.asarray(jac, jnp.float32)}
  outs = {}
  for solver in ("paper", "exact"):
    tx = mtjax.pareto_ltr([0.0, 0.0, 0.0], solver=solver)
    update, _ = jax.jit(tx.update)(grads, tx.init(params), params)
    outs[solver] = np.asarray(update["w"], np.float64)
  assert np.min(jac @ outs["paper"]) < -0.13  # the update is -d in descent form: J d uses the update itself
  tm = mtjax.mgda(tol=1e-8)
  d_mgda = np.asarray(jax.jit(tm.update)(grads, tm.init(params), params)[0]["w"], np.float64)
  np.testing.assert_allclose(outs["exact"], d_mgda, atol=1e-5)
  assert np.min(jac @ outs["exact"]) >= outs["exact"] @ outs["exact"] - 1e-5


def test_exact_solver_bounds_and_options():
  rng = np.random.default_rng(5)
  jac = _jac(rng, 4)
  c = np.array([0.4, 0.1, 0.0, 0.2])
  params = jax.tree.map(lambda g: jnp.zeros(g.shape[1:]), _tree(jac))
  tx = mtjax.pareto_ltr(c, solver="exact")
  _, state = jax.jit(tx.update)(_tree(jac), tx.init(params), params)
  w = np.asarray(state.weights, np.float64)
  assert np.all(w >= c - 1e-6) and abs(w.sum() - 1) < 1e-5
  np.testing.assert_allclose(w, np_exact_qp(jac @ jac.T, c), atol=1e-4)
  # Bounds summing to one: w = c.
  tx = mtjax.pareto_ltr([0.5, 0.5], solver="exact")
  _, state = tx.update({"w": jnp.asarray(jac[:2, :3], jnp.float32)}, tx.init({"w": jnp.zeros(3)}), None)
  np.testing.assert_allclose(state.weights, [0.5, 0.5], atol=1e-7)
  with pytest.raises(ValueError, match="solver must be one of"):
    mtjax.pareto_ltr([0.5, 0.5], solver="qp")
  # Under optax.inject_hyperparams the bounds are traced; the exact solver's max_iters is static.
  injected = optax.inject_hyperparams(mtjax.pareto_ltr, static_args=("max_iters",))(
    lower_bounds=jnp.asarray(c, jnp.float32), solver="exact"
  )
  _, state = jax.jit(injected.update)(_tree(jac), injected.init(params), params)
  np.testing.assert_allclose(state.inner_state.weights, w, atol=1e-6)
