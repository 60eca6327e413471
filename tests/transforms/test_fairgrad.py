"""FairGrad: a NumPy float64 reference (cyclic coordinate solves of G w = w^(-1/alpha)), the oracle,
the scaling degree, per-task scale invariance at alpha = 1, Pareto-stationary inputs, and the
no-silent-fallback contract (non-convergence raises, or is recorded with checks off)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from mtl_references import J_ORACLE
from mtl_references import gram_of
from mtl_references import np_balance
from mtl_references import pack
from mtl_references import random_jac
from mtl_references import unpack

import mtjax
from mtjax._src import solvers


def _make(alpha, **kw):
  return mtjax.fairgrad(alpha, **kw)


# alpha is traced: one compilation per T for every alpha.
_update = jax.jit(lambda grads, alpha: _make(alpha).update(grads, _make(alpha).init(None)))


def np_fairgrad(jac, alpha):
  jac = np.asarray(jac, np.float64)
  w = np_balance(gram_of(jac), alpha)
  return w, sum(w[i] * jac[i] for i in range(jac.shape[0]))


def test_oracle():
  tx = mtjax.fairgrad(1.0, num_tasks=2)
  params = {"w": jnp.zeros(3)}
  update, state = jax.jit(tx.update)({"w": jnp.asarray(J_ORACLE, jnp.float32)}, tx.init(params), params)
  np.testing.assert_allclose(update["w"], [0.0766, 0.9985, 0.9985], atol=1e-4)
  np.testing.assert_allclose(np_fairgrad(J_ORACLE, 1.0)[1], [0.0766, 0.9985, 0.9985], atol=1e-4)
  assert isinstance(state, mtjax.FairGradState) and int(state.status) == solvers.SOLVED


@pytest.mark.parametrize("num_tasks", [1, 3, 5])
def test_matches_reference(num_tasks):
  rng = np.random.default_rng(num_tasks)
  jac = random_jac(rng, num_tasks, 1.5) * rng.uniform(0.3, 3.0, size=(num_tasks, 1))
  for alpha in (0.5, 1.0, 2.0, 5.0):
    update, state = _update(pack(jac), alpha)
    w, ref = np_fairgrad(jac, alpha)
    np.testing.assert_allclose(unpack(update), ref, rtol=1e-3, atol=1e-3 * np.abs(ref).max(), err_msg=f"alpha={alpha}")
    assert int(state.status) == solvers.SOLVED


def test_float64_solves_the_equations():
  rng = np.random.default_rng(7)
  with jax.enable_x64(True):
    jac = random_jac(rng, 4, 0.7)
    gram = gram_of(jac)
    for alpha in (0.5, 1.0, 3.0):
      tx = mtjax.fairgrad(alpha, num_tasks=4, tol=1e-20)
      update, _ = jax.jit(tx.update)(pack(jac, dtype=jnp.float64), tx.init(None))
      w = np.linalg.lstsq(jac.T, unpack(update), rcond=None)[0]  # the weights behind the update
      np.testing.assert_allclose(gram @ w, w ** (-1.0 / alpha), rtol=1e-9)
      np.testing.assert_allclose(w, np_balance(gram, alpha), rtol=1e-8)


def test_scaling_degree_and_per_task_invariance():
  rng = np.random.default_rng(8)
  jac = random_jac(rng, 3, 1.0)
  for alpha in (0.5, 1.0, 2.0):
    d = unpack(_update(pack(jac), alpha)[0])
    for s in (1e-3, 1e3):
      ds = unpack(_update(pack(s * jac), alpha)[0])
      np.testing.assert_allclose(ds, s ** ((1 - alpha) / (1 + alpha)) * d, rtol=2e-3, atol=1e-5)
  # alpha = 1: w_i g_i does not change when g_i is rescaled (mixed scales included).
  d = unpack(_update(pack(jac), 1.0)[0])
  scales = np.array([1e-4, 1.0, 1e4])
  np.testing.assert_allclose(
    unpack(_update(pack(scales[:, None] * jac), 1.0)[0]), d, rtol=2e-3, atol=1e-4 * np.abs(d).max()
  )


def test_pareto_stationary_and_zero_tasks():
  rng = np.random.default_rng(9)
  g = rng.normal(size=10)
  for jac in (np.stack([g, -g, 0.5 * g]), np.zeros((3, 10)), np.stack([g, -2.0 * g, rng.normal(size=10)])[:2]):
    update, state = _update(pack(jac), 1.0)
    np.testing.assert_array_equal(unpack(update), 0.0)
    assert int(state.status) == solvers.STATIONARY
  # A zero task gradient is left out: the others are solved alone.
  jac = random_jac(rng, 3, 1.0)
  jac[1] = 0.0
  update, state = _update(pack(jac), 2.0)
  _, ref = np_fairgrad(jac[[0, 2]], 2.0)
  np.testing.assert_allclose(unpack(update), ref, rtol=1e-3, atol=1e-3 * np.abs(ref).max())
  assert int(state.status) == solvers.SOLVED


def test_no_silent_fallback():
  rng = np.random.default_rng(10)
  jac = random_jac(rng, 4, 0.3)
  tx = mtjax.fairgrad(4.0, max_iters=1)  # one Newton step is not enough
  update_fn = jax.jit(tx.update)
  with pytest.raises(Exception, match="fairgrad: the weight solver did not converge") as info:
    jax.block_until_ready(update_fn(pack(jac), tx.init(None)))
  assert isinstance(info.value, (ValueError, jax.errors.JaxRuntimeError))
  with mtjax.runtime_checks(False):  # read at trace time: a fresh transform, traced in the context
    unchecked = mtjax.fairgrad(4.0, max_iters=1)
    update, state = jax.jit(unchecked.update)(pack(jac), unchecked.init(None))
  assert int(state.status) == solvers.NOT_CONVERGED
  assert np.all(np.isfinite(unpack(update)))


def test_inject_hyperparams_and_errors():
  rng = np.random.default_rng(11)
  jac = random_jac(rng, 3, 1.0)
  tx = optax.inject_hyperparams(mtjax.fairgrad, static_args=("num_tasks", "max_iters"))(alpha=2.0)
  update_fn = jax.jit(tx.update)
  state = tx.init(None)
  np.testing.assert_allclose(unpack(update_fn(pack(jac), state)[0]), np_fairgrad(jac, 2.0)[1], rtol=1e-3)
  state.hyperparams["alpha"] = jnp.asarray(-1.0)
  with pytest.raises(Exception, match="alpha must be > 0"):
    jax.block_until_ready(update_fn(pack(jac), state))
  with pytest.raises(ValueError, match="alpha must be > 0"):
    mtjax.fairgrad(0.0)
