"""DualProj: NumPy float64 reference (brute-force projection of the mean), oracle, non-conflict,
permutation equivariance, options."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from mtl_references import J_ORACLE
from mtl_references import RANK_SHAPES
from mtl_references import gram_of
from mtl_references import np_nonneg_qp
from mtl_references import pack
from mtl_references import random_jac
from mtl_references import unpack

import mtjax

_DEFAULT = mtjax.dualproj()
_EXACT = mtjax.dualproj(regularization=0.0)
_default_update = jax.jit(_DEFAULT.update)
_exact_update = jax.jit(_EXACT.update)


def np_dualproj(jac, regularization=1e-4):
  """Reference: the mean gradient projected onto {x : J x >= 0}, via its dual QP (brute force)."""
  jac = np.asarray(jac, np.float64)
  t = jac.shape[0]
  gram = gram_of(jac)
  trace = np.trace(gram)
  a = (gram / trace if trace > 0 else gram) + regularization * np.eye(t)
  u = np.full(t, 1.0 / t)
  weights = u + np_nonneg_qp(a, a @ u)
  return weights, sum(weights[m] * jac[m] for m in range(t))


def _run(update_fn, tx, jac, shapes=None, dtype=jnp.float32):
  kwargs = {} if shapes is None else {"shapes": shapes}
  update, state = update_fn(pack(jac, dtype=dtype, **kwargs), tx.init(None))
  return unpack(update, **kwargs), state


def test_oracle():
  tx = mtjax.dualproj(num_tasks=2)
  params = {"w": jnp.zeros(3)}
  update, state = jax.jit(tx.update)({"w": jnp.asarray(J_ORACLE, jnp.float32)}, tx.init(params), params)
  np.testing.assert_allclose(update["w"], [0.5563, 1.1109, 1.1109], atol=1e-4)
  assert isinstance(state, mtjax.DualProjState)
  np.testing.assert_allclose(np_dualproj(J_ORACLE)[1], [0.5563, 1.1109, 1.1109], atol=1e-4)
  # The exact projection: mean + (2/18) g_1.
  np.testing.assert_allclose(np_dualproj(J_ORACLE, 0.0)[1], [5 / 9, 10 / 9, 10 / 9], atol=1e-12)


@pytest.mark.parametrize("num_tasks", [1, 4, 8])
def test_matches_reference_and_does_not_conflict(num_tasks):
  rng = np.random.default_rng(num_tasks)
  for common in (0.0, 1.0):
    jac = random_jac(rng, num_tasks, common)
    scale = np.abs(jac).max()
    for update_fn, tx, reg in ((_default_update, _DEFAULT, 1e-4), (_exact_update, _EXACT, 0.0)):
      d, _ = _run(update_fn, tx, jac)
      weights, ref = np_dualproj(jac, reg)
      np.testing.assert_allclose(d, ref, atol=2e-4 * scale, err_msg=f"T={num_tasks} reg={reg}")
      trace = np.trace(gram_of(jac))
      assert np.all(jac @ d >= -reg * trace * weights - 1e-5 * trace), (num_tasks, reg, jac @ d)


def test_float64_rank_deficient():
  rng = np.random.default_rng(9)
  with jax.enable_x64(True):
    tx = mtjax.dualproj(regularization=0.0, tol=1e-12)
    jac = random_jac(rng, 8, 0.5, num=6)
    d, _ = _run(jax.jit(tx.update), tx, jac, RANK_SHAPES, jnp.float64)
    np.testing.assert_allclose(d, np_dualproj(jac, 0.0)[1], atol=1e-8 * np.abs(jac).max())


def test_mean_when_it_conflicts_with_no_task_and_permutation():
  rng = np.random.default_rng(3)
  jac = np.abs(random_jac(rng, 4, 0.0))
  d, _ = _run(_exact_update, _EXACT, jac)
  np.testing.assert_allclose(d, jac.mean(0), rtol=1e-5, atol=1e-6)
  jac = random_jac(rng, 5, 0.3)
  perm = rng.permutation(5)
  d, _ = _run(_default_update, _DEFAULT, jac)
  dp, _ = _run(_default_update, _DEFAULT, jac[perm])
  np.testing.assert_allclose(dp, d, atol=1e-5 * np.abs(jac).max())


def test_errors():
  with pytest.raises(ValueError, match="regularization"):
    mtjax.dualproj(regularization=-0.1)
  with pytest.raises(ValueError, match="max_iters"):
    mtjax.dualproj(max_iters=2.5)
