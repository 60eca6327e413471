"""UPGrad: NumPy float64 reference (brute-force dual-cone projections), the oracle, non-conflict,
linearity under positive task scaling, permutation equivariance, options and errors."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from mtl_references import J_ORACLE
from mtl_references import RANK_SHAPES
from mtl_references import gram_of
from mtl_references import np_nonneg_qp
from mtl_references import pack
from mtl_references import random_jac
from mtl_references import unpack

import mtjax

# One compiled update per (T, dtype) for the default and for the exact projection.
_DEFAULT = mtjax.upgrad()
_EXACT = mtjax.upgrad(regularization=0.0)
_default_update = jax.jit(_DEFAULT.update)
_exact_update = jax.jit(_EXACT.update)


def np_projection(jac, i, regularization):
  """Coefficients ``c`` with ``pi(g_i) = sum_m c_m g_m`` (the dual-cone projection of task i)."""
  gram = gram_of(jac)
  t = gram.shape[0]
  trace = np.trace(gram)
  a = (gram / trace if trace > 0 else gram) + regularization * np.eye(t)
  e = np.eye(t)[i]
  return e + np_nonneg_qp(a, a @ e)


def np_upgrad(jac, regularization=1e-4, scales=None):
  """Reference: the mean of the projected task gradients (optionally scaled per task), looping over tasks."""
  jac = np.asarray(jac, np.float64)
  t = jac.shape[0]
  scales = np.ones(t) if scales is None else scales
  out = np.zeros(jac.shape[1])
  weights = np.zeros(t)
  for i in range(t):
    c = np_projection(jac, i, regularization)
    weights += scales[i] * c / t
    out += scales[i] * sum(c[m] * jac[m] for m in range(t)) / t
  return weights, out


def _run(update_fn, tx, jac, dtype=jnp.float32):
  update, state = update_fn(pack(jac, dtype=dtype), tx.init(None))
  return unpack(update), state


def test_oracle():
  tx = mtjax.upgrad(num_tasks=2)
  params = {"w": jnp.zeros(3)}
  update, state = jax.jit(tx.update)({"w": jnp.asarray(J_ORACLE, jnp.float32)}, tx.init(params), params)
  np.testing.assert_allclose(update["w"], [0.2929, 1.9004, 1.9004], atol=1e-4)
  assert isinstance(state, mtjax.UPGradState)
  _, ref = np_upgrad(J_ORACLE)
  np.testing.assert_allclose(ref, [0.2929, 1.9004, 1.9004], atol=1e-4)
  # The exact projection (the paper's definition) differs in the 4th digit.
  _, exact = np_upgrad(J_ORACLE, 0.0)
  np.testing.assert_allclose(exact, [0.2924, 1.9006, 1.9006], atol=1e-4)


@pytest.mark.parametrize("num_tasks", [1, 3, 8])
def test_matches_reference(num_tasks):
  rng = np.random.default_rng(num_tasks)
  for common in (0.0, 1.5):
    jac = random_jac(rng, num_tasks, common)
    scale = np.abs(jac).max()
    for update_fn, tx, reg in ((_default_update, _DEFAULT, 1e-4), (_exact_update, _EXACT, 0.0)):
      d, state = _run(update_fn, tx, jac)
      _, ref = np_upgrad(jac, reg)
      np.testing.assert_allclose(d, ref, atol=2e-4 * scale, err_msg=f"T={num_tasks} reg={reg}")
      assert state.weights.shape == (0,)


def test_float64_and_rank_deficient():
  rng = np.random.default_rng(11)
  with jax.enable_x64(True):
    tx = mtjax.upgrad(num_tasks=8, regularization=0.0, tol=1e-12)
    update_fn = jax.jit(tx.update)
    for common in (0.0, 1.0):
      jac = random_jac(rng, 8, common, num=6)  # T = 8 > P = 6: singular Gram
      update, state = update_fn(pack(jac, RANK_SHAPES, jnp.float64), tx.init(None))
      weights, ref = np_upgrad(jac, 0.0)
      d = unpack(update, RANK_SHAPES)
      np.testing.assert_allclose(d, ref, atol=1e-8 * np.abs(jac).max())
      assert np.all(jac @ d >= -1e-9 * np.abs(jac).max() ** 2)


def test_no_conflict():
  rng = np.random.default_rng(2)
  for trial in range(6):
    t = 2 + trial % 4
    jac = random_jac(rng, t, 0.3)
    jac[1] = -0.8 * jac[0] + 0.3 * jac[1]  # a strongly conflicting pair
    gram = gram_of(jac)
    for update_fn, tx, reg in ((_exact_update, _EXACT, 0.0), (_default_update, _DEFAULT, 1e-4)):
      d, _ = _run(update_fn, tx, jac)
      weights, _ = np_upgrad(jac, reg)
      # g_t . d >= -reg tr(G) w_t, up to float32 rounding.
      bound = -reg * np.trace(gram) * weights - 1e-5 * np.trace(gram)
      assert np.all(jac @ d >= bound), (trial, reg, jac @ d, bound)


def test_mean_when_no_gradients_conflict():
  rng = np.random.default_rng(3)
  jac = np.abs(random_jac(rng, 4, 0.0))  # all pairwise inner products positive
  d, _ = _run(_exact_update, _EXACT, jac)
  np.testing.assert_allclose(d, jac.mean(0), rtol=1e-5, atol=1e-6)


def test_linear_under_positive_task_scaling():
  rng = np.random.default_rng(4)
  jac = random_jac(rng, 4, 0.2)
  scales = np.array([0.1, 3.0, 1.0, 20.0])
  d, _ = _run(_exact_update, _EXACT, scales[:, None] * jac)
  _, expected = np_upgrad(jac, 0.0, scales)  # (1/T) sum_i s_i pi(g_i): the dual cone does not move
  np.testing.assert_allclose(d, expected, atol=1e-4 * np.abs(expected).max())
  # With the ridge it holds approximately while reg * tr(G) is small next to every |g_i|^2.
  mild = np.array([0.5, 2.0, 1.0, 1.5])
  d_reg, _ = _run(_default_update, _DEFAULT, mild[:, None] * jac)
  expected = np_upgrad(jac, 0.0, mild)[1]
  np.testing.assert_allclose(d_reg, expected, atol=1e-2 * np.abs(expected).max())


def test_permutation_equivariance():
  rng = np.random.default_rng(5)
  jac = random_jac(rng, 5, 0.5)
  perm = rng.permutation(5)
  tx = mtjax.upgrad(num_tasks=5)
  update_fn = jax.jit(tx.update)
  u, s = update_fn(pack(jac), tx.init(None))
  up, sp = update_fn(pack(jac[perm]), tx.init(None))
  np.testing.assert_allclose(unpack(up), unpack(u), atol=1e-5 * np.abs(jac).max())
  np.testing.assert_allclose(sp.weights, np.asarray(s.weights)[perm], atol=1e-5)


def test_inject_hyperparams_and_errors():
  rng = np.random.default_rng(6)
  jac = random_jac(rng, 3, 0.5)
  tx = optax.inject_hyperparams(mtjax.upgrad, static_args=("num_tasks", "max_iters"))(num_tasks=3)
  update_fn = jax.jit(tx.update)
  state = tx.init(None)
  update, _ = update_fn(pack(jac), state)
  np.testing.assert_allclose(unpack(update), np_upgrad(jac)[1], atol=2e-4 * np.abs(jac).max())
  state.hyperparams["regularization"] = jnp.asarray(0.0)
  update, _ = update_fn(pack(jac), state)
  np.testing.assert_allclose(unpack(update), np_upgrad(jac, 0.0)[1], atol=2e-4 * np.abs(jac).max())
  with pytest.raises(ValueError, match="regularization"):
    mtjax.upgrad(regularization=-1.0)
  with pytest.raises(ValueError, match="max_iters"):
    mtjax.upgrad(max_iters=-1)
  traced = optax.inject_hyperparams(mtjax.upgrad)(max_iters=10)
  with pytest.raises(ValueError, match="static_args"):
    jax.jit(traced.update)(pack(jac), traced.init(None))
