"""CAGrad: a NumPy float64 reference that solves the *primal* problem (bisection on the worst-task
improvement, projections by brute force), the oracle, rescale options, c = 0 and c >= 1 properties,
the g_w = 0 case, permutation equivariance and errors."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from mtl_references import J_ORACLE
from mtl_references import gram_of
from mtl_references import np_nonneg_qp
from mtl_references import pack
from mtl_references import random_jac
from mtl_references import unpack

import mtjax
from mtjax._src.solvers import cagrad_dual

_DEFAULT = mtjax.cagrad()  # c = 0.4
_default_update = jax.jit(_DEFAULT.update)
_update_c = jax.jit(lambda grads, c: mtjax.cagrad(c).update(grads, mtjax.cagrad(c).init(None))[0])


def np_projection_distance(jac, g0, h):
  """Projection of g0 onto {d : J d >= h} (dual QP by brute force); ``None`` if empty."""
  gram = gram_of(jac)
  v = np_nonneg_qp(gram, jac @ g0 - h)
  if v is None:
    return None, np.inf
  d = g0 + sum(v[m] * jac[m] for m in range(jac.shape[0]))
  return d, float(np.linalg.norm(d - g0))


def np_cagrad(jac, c):
  """Reference for max_d min_i g_i . d s.t. |d - g0| <= c |g0| (not Pareto-stationary inputs).

  The optimal d is the projection of g0 onto {d : J d >= h*} for the largest h* whose projection
  distance is at most r = c |g0| (the distance grows with h): bisection on h.
  """
  jac = np.asarray(jac, np.float64)
  t = jac.shape[0]
  g0 = sum(jac[m] for m in range(t)) / t
  r = c * np.linalg.norm(g0)
  lo = min(float(jac[i] @ g0) for i in range(t))  # g0 itself is feasible
  hi = min(float(jac[i] @ g0 + r * np.linalg.norm(jac[i])) for i in range(t))  # no d in the ball does better
  for _ in range(80):
    mid = 0.5 * (lo + hi)
    if np_projection_distance(jac, g0, mid)[1] <= r:
      lo = mid
    else:
      hi = mid
  return np_projection_distance(jac, g0, lo)[0]


def test_oracle_and_rescale():
  params = {"w": jnp.zeros(3)}
  grads = {"w": jnp.asarray(J_ORACLE, jnp.float32)}
  expected = np.array([0.1835, 1.2041, 1.2041])
  for rescale, factor in (("none", 1.0), ("1/(1+c^2)", 1 / 1.25), ("1/(1+c)", 1 / 1.5)):
    tx = mtjax.cagrad(c=0.5, num_tasks=2, rescale=rescale)
    update, state = jax.jit(tx.update)(grads, tx.init(params), params)
    np.testing.assert_allclose(update["w"], expected * factor, atol=1e-4)
    assert isinstance(state, mtjax.CAGradState)
  np.testing.assert_allclose(np_cagrad(J_ORACLE, 0.5), expected, atol=1e-4)


@pytest.mark.parametrize("num_tasks", [1, 3, 8])
def test_matches_primal_reference(num_tasks):
  rng = np.random.default_rng(num_tasks)
  for common in (0.5, 1.5):
    jac = random_jac(rng, num_tasks, common)
    d, _ = _default_update(pack(jac), _DEFAULT.init(None))
    ref = np_cagrad(jac, 0.4)
    np.testing.assert_allclose(unpack(d), ref, atol=2e-4 * np.abs(jac).max(), err_msg=f"T={num_tasks}")


def test_other_radii_float64_and_no_conflict_for_c_at_least_one():
  rng = np.random.default_rng(7)
  for c in (0.1, 0.9, 1.0, 2.5):
    jac = random_jac(rng, 4, 0.3)
    d = unpack(_update_c(pack(jac), c))
    ref = np_cagrad(jac, c)
    np.testing.assert_allclose(d, ref, atol=2e-4 * np.abs(jac).max(), err_msg=f"c={c}")
    if c >= 1:  # the ball contains 0: the direction conflicts with no task
      assert np.all(jac @ d >= -1e-5 * np.abs(jac).max() ** 2), (c, jac @ d)
  with jax.enable_x64(True):
    tx = mtjax.cagrad(0.7, tol=1e-12)
    jac = random_jac(rng, 5, 0.5)
    update, _ = jax.jit(tx.update)(pack(jac, dtype=jnp.float64), tx.init(None))
    np.testing.assert_allclose(unpack(update), np_cagrad(jac, 0.7), atol=1e-7 * np.abs(jac).max())


def test_c_zero_is_the_mean_gradient():
  rng = np.random.default_rng(8)
  jac = random_jac(rng, 4, 0.0)
  np.testing.assert_allclose(unpack(_update_c(pack(jac), 0.0)), jac.mean(0), rtol=1e-5, atol=1e-6)


def test_zero_dual_norm_gives_the_primal_point():
  """[g, -2g]: 0 is in the convex hull; with c >= 1 the ball contains 0 and F >= 0 = F(2/3, 1/3)."""
  rng = np.random.default_rng(9)
  g = rng.normal(size=10)
  jac = np.stack([g, -2.0 * g])
  d = unpack(_update_c(pack(jac), 1.5))
  np.testing.assert_allclose(d, 0.0, atol=1e-5 * np.abs(g).max())  # (1 - min(c, 1)) g0 = 0
  result = cagrad_dual(jnp.asarray(gram_of(jac), jnp.float32), 1.5)
  assert float(result.norm) == 0.0
  # With c < 1 the optimum is at a vertex (g_w = g): d = g0 + c |g0| g / |g| = -g / 2 + 0.5 g / 2.
  np.testing.assert_allclose(unpack(_update_c(pack(jac), 0.5)), -0.25 * g, atol=1e-5 * np.abs(g).max())
  # Opposite gradients of equal norm: g0 = 0, r = 0, d = 0.
  np.testing.assert_allclose(unpack(_update_c(pack(np.stack([g, -g])), 0.4)), 0.0, atol=1e-6)


def test_permutation_equivariance():
  rng = np.random.default_rng(10)
  jac = random_jac(rng, 5, 0.5)
  perm = rng.permutation(5)
  tx = mtjax.cagrad(num_tasks=5)
  update_fn = jax.jit(tx.update)
  u, s = update_fn(pack(jac), tx.init(None))
  up, sp = update_fn(pack(jac[perm]), tx.init(None))
  np.testing.assert_allclose(unpack(up), unpack(u), atol=1e-5 * np.abs(jac).max())
  np.testing.assert_allclose(sp.weights, np.asarray(s.weights)[perm], atol=1e-5)


def test_errors():
  with pytest.raises(ValueError, match="rescale"):
    mtjax.cagrad(rescale="1/(1+c**2)")
  with pytest.raises(ValueError, match="c must be >= 0"):
    mtjax.cagrad(-0.1)
  jac = random_jac(np.random.default_rng(0), 3, 0.5)
  tx = optax.inject_hyperparams(mtjax.cagrad, static_args=("num_tasks", "max_iters"))(c=0.4)
  state = tx.init(None)
  state.hyperparams["c"] = jnp.asarray(-1.0)
  with pytest.raises(Exception, match="c must be >= 0"):
    jax.block_until_ready(jax.jit(tx.update)(pack(jac), state))


def test_float32_tiny_task_next_to_a_large_one():
  """Issue #11: a task 0.1% the norm of another was read as a zero gradient in float32 (0.6 * mean)."""
  jac = np.array([[0.010918994, -0.0014713896], [11.354426, 15.893018]])
  ref = np_cagrad(jac, 0.4)
  np.testing.assert_allclose(ref, [9.555, 7.424], atol=1e-3)
  update = jax.jit(mtjax.cagrad().update)({"w": jnp.asarray(jac, jnp.float32)}, mtjax.cagrad().init(None))[0]["w"]
  np.testing.assert_allclose(update, ref, rtol=1e-5)
  np.testing.assert_allclose(float(np.min(jac @ np.asarray(update, np.float64))), 0.0934, atol=1e-4)
  rng = np.random.default_rng(11)  # task norms over 8 orders of magnitude: float32 == float64 reference
  for _ in range(6):
    jac = rng.normal(size=(4, 5)) * 10.0 ** rng.uniform(-4, 4, size=(4, 1))
    jac32 = jac.astype(np.float32)
    update = jax.jit(mtjax.cagrad(0.9).update)({"w": jnp.asarray(jac32)}, mtjax.cagrad().init(None))[0]["w"]
    ref = np_cagrad(jac32.astype(np.float64), 0.9)
    np.testing.assert_allclose(update, ref, atol=1e-5 * np.linalg.norm(jac32.mean(0)) * 1.9)


def test_stationary_points():
  """g0 at rounding level gives d = g0 (~0), not c sqrt(eps) |J|; a zero combination with c < 1 gives the
  point of the ball closest to g0 with J d >= 0 (worst-task improvement 0, the optimum)."""
  rng = np.random.default_rng(12)
  g1, g2 = rng.normal(size=6), rng.normal(size=6)
  jac = np.stack([g1, g2, -(g1 + g2)]).astype(np.float32)
  update = jax.jit(mtjax.cagrad(0.4).update)({"w": jnp.asarray(jac)}, mtjax.cagrad().init(None))[0]["w"]
  assert np.linalg.norm(update) <= 1e-6 * np.abs(jac).max(), np.linalg.norm(update)
  h = rng.normal(size=5)
  jac = np.stack([g1[:5], -2.0 * g1[:5], h])
  for c in (0.4, 0.9, 1.5):
    tx = mtjax.cagrad(c)
    d = np.asarray(tx.update({"w": jnp.asarray(jac, jnp.float32)}, tx.init(None))[0]["w"], np.float64)
    ref = np_cagrad(jac, c)
    np.testing.assert_allclose(np.min(jac @ d), np.min(jac @ ref), atol=1e-5 * np.abs(jac).max() ** 2, err_msg=f"{c}")
