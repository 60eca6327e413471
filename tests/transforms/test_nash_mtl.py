"""Nash-MTL: a NumPy float64 reference (cyclic coordinate solves of w_i (G w)_i = 1), the oracle,
the bargaining properties, the normalization option, Pareto-stationary inputs and non-convergence."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from mtl_references import J_ORACLE
from mtl_references import gram_of
from mtl_references import np_balance
from mtl_references import pack
from mtl_references import random_jac
from mtl_references import unpack

import mtjax
from mtjax._src import solvers

_TX = mtjax.nash_mtl()
_update = jax.jit(_TX.update)
_FROB = mtjax.nash_mtl(normalization="frobenius")
_frob_update = jax.jit(_FROB.update)


def np_nash(jac):
  jac = np.asarray(jac, np.float64)
  w = np_balance(gram_of(jac), 1.0)
  return w, sum(w[i] * jac[i] for i in range(jac.shape[0]))


def _run(jac, update_fn=_update, tx=_TX, dtype=jnp.float32):
  update, state = update_fn(pack(jac, dtype=dtype), tx.init(None))
  return unpack(update), state


def test_oracle():
  tx = mtjax.nash_mtl(num_tasks=2)
  params = {"w": jnp.zeros(3)}
  update, state = jax.jit(tx.update)({"w": jnp.asarray(J_ORACLE, jnp.float32)}, tx.init(params), params)
  np.testing.assert_allclose(update["w"], [0.0766, 0.9985, 0.9985], atol=1e-4)  # = FairGrad(alpha=1)
  w, ref = np_nash(J_ORACLE)
  np.testing.assert_allclose(state.weights, w, rtol=1e-4)
  np.testing.assert_allclose(w * (gram_of(J_ORACLE) @ w), 1.0, rtol=1e-10)
  assert isinstance(state, mtjax.NashMTLState) and int(state.status) == solvers.SOLVED


@pytest.mark.parametrize("num_tasks", [1, 3, 8])
def test_matches_reference_and_bargaining_properties(num_tasks):
  rng = np.random.default_rng(num_tasks)
  jac = random_jac(rng, num_tasks, 1.5) * rng.uniform(0.3, 3.0, size=(num_tasks, 1))
  d, state = _run(jac)
  w, ref = np_nash(jac)
  np.testing.assert_allclose(d, ref, rtol=1e-3, atol=1e-3 * np.abs(ref).max())
  # Every task improves, g_i . d = 1 / w_i, and |d|^2 = T.
  np.testing.assert_allclose(jac @ d, 1.0 / w, rtol=2e-3)
  np.testing.assert_allclose(d @ d, num_tasks, rtol=2e-3)
  if num_tasks == 3:  # the authors' normalization: the same direction times sqrt(|G|_F)
    d_frob, _ = _run(jac, _frob_update, _FROB)
    np.testing.assert_allclose(
      d_frob, np.sqrt(np.linalg.norm(gram_of(jac))) * ref, rtol=1e-3, atol=1e-3 * np.abs(d_frob).max()
    )


def test_invariant_to_per_task_scaling_and_permutation():
  rng = np.random.default_rng(9)
  jac = random_jac(rng, 4, 1.0)
  d, _ = _run(jac)
  scales = np.array([1e-6, 1.0, 30.0, 1e5])
  np.testing.assert_allclose(_run(scales[:, None] * jac)[0], d, rtol=2e-3, atol=1e-4 * np.abs(d).max())
  perm = rng.permutation(4)
  np.testing.assert_allclose(_run(jac[perm])[0], d, rtol=1e-4, atol=1e-5 * np.abs(d).max())


def test_float64():
  rng = np.random.default_rng(10)
  with jax.enable_x64(True):
    jac = random_jac(rng, 5, 0.8)
    tx = mtjax.nash_mtl(num_tasks=5, tol=1e-20)
    d, state = _run(jac, jax.jit(tx.update), tx, jnp.float64)
    w, ref = np_nash(jac)
    np.testing.assert_allclose(d, ref, rtol=1e-9, atol=1e-10 * np.abs(ref).max())


def test_stationary_inputs_give_a_zero_update():
  rng = np.random.default_rng(11)
  g = rng.normal(size=10)
  for jac in (np.stack([g, -g, g]), np.zeros((3, 10)), np.stack([g, -0.1 * g, rng.normal(size=10)])[:2]):
    d, state = _run(jac)
    np.testing.assert_array_equal(d, 0.0)
    assert int(state.status) == solvers.STATIONARY
  # Nearly opposite but not stationary: solved, every task still improves.
  h = rng.normal(size=10)
  jac = np.stack([g, -g + 0.05 * h])
  d, state = _run(jac)
  assert int(state.status) == solvers.SOLVED and np.all(jac @ d > 0)
  np.testing.assert_allclose(d @ d, 2.0, rtol=1e-2)


def test_no_silent_fallback_and_errors():
  rng = np.random.default_rng(12)
  jac = random_jac(rng, 5, 0.2)
  tx = mtjax.nash_mtl(max_iters=1)
  with pytest.raises(Exception, match="nash_mtl: the weight solver did not converge"):
    jax.block_until_ready(jax.jit(tx.update)(pack(jac), tx.init(None)))
  with pytest.raises(ValueError, match="normalization"):
    mtjax.nash_mtl(normalization="l2")
