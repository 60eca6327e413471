"""Aligned-MTL: a NumPy float64 reference from the SVD of the task Jacobian (the aligned matrix
sigma U V^T), the oracle, the scale and reduction options, rank-deficient Jacobians, invariances."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from mtl_references import J_ORACLE
from mtl_references import RANK_SHAPES
from mtl_references import pack
from mtl_references import random_jac
from mtl_references import unpack

import mtjax


def np_aligned(jac, scale="min", reduction="mean"):
  """Reference: J = U S V^T (rank r); aligned rows sigma U_r V_r^T; d = aligned^T omega."""
  jac = np.asarray(jac, np.float64)
  t = jac.shape[0]
  u, s, vt = np.linalg.svd(jac, full_matrices=False)
  keep = s**2 > (s[0] ** 2 if s.size else 0.0) * 1e-10
  u, s, vt = u[:, keep], s[keep], vt[keep]
  eig = np.sort(s**2)
  if eig.size == 0:
    return np.zeros(jac.shape[1])
  sigma_sq = {"min": eig[0], "median": eig[(eig.size - 1) // 2], "rmse": eig.mean()}[scale]
  aligned = np.sqrt(sigma_sq) * u @ vt  # rows: the aligned task gradients
  omega = np.full(t, 1.0 / t if reduction == "mean" else 1.0)
  return sum(omega[i] * aligned[i] for i in range(t))


_UPDATES = {scale: jax.jit(mtjax.aligned_mtl(scale=scale).update) for scale in ("min", "median", "rmse")}


def _run(jac, scale="min", shapes=None, dtype=jnp.float32):
  kwargs = {} if shapes is None else {"shapes": shapes}
  update, state = _UPDATES[scale](pack(jac, dtype=dtype, **kwargs), mtjax.aligned_mtl().init(None))
  return unpack(update, **kwargs), state


def test_oracle():
  tx = mtjax.aligned_mtl(num_tasks=2)
  params = {"w": jnp.zeros(3)}
  update, state = jax.jit(tx.update)({"w": jnp.asarray(J_ORACLE, jnp.float32)}, tx.init(params), params)
  np.testing.assert_allclose(update["w"], [0.2133, 0.9673, 0.9673], atol=1e-4)
  np.testing.assert_allclose(np_aligned(J_ORACLE), [0.2133, 0.9673, 0.9673], atol=1e-4)
  assert isinstance(state, mtjax.AlignedMTLState)


@pytest.mark.parametrize("num_tasks", [1, 3, 7])
def test_matches_svd_reference(num_tasks):
  rng = np.random.default_rng(num_tasks)
  jac = random_jac(rng, num_tasks, 1.0) * rng.uniform(0.2, 5.0, size=(num_tasks, 1))
  for scale in ("min", "median", "rmse"):
    d, _ = _run(jac, scale)
    ref = np_aligned(jac, scale)
    np.testing.assert_allclose(d, ref, rtol=1e-3, atol=1e-3 * np.abs(ref).max(), err_msg=scale)


def test_sum_reduction_and_rank_deficient():
  rng = np.random.default_rng(5)
  tx = mtjax.aligned_mtl(reduction="sum", num_tasks=8)
  jac = random_jac(rng, 8, 0.5, num=6)  # T = 8 > P = 6: rank 6
  update, state = jax.jit(tx.update)(pack(jac, RANK_SHAPES), tx.init(None))
  ref = np_aligned(jac, "min", "sum")
  np.testing.assert_allclose(unpack(update, RANK_SHAPES), ref, rtol=1e-3, atol=1e-3 * np.abs(ref).max())
  # Identical gradients (rank 1): the aligned gradients are the common gradient.
  g = rng.normal(size=10)
  d, _ = _run(np.stack([g, g, g]))
  np.testing.assert_allclose(d, g, rtol=1e-4, atol=1e-5)


def test_float64_aligned_rows_are_orthogonal_with_equal_norms():
  rng = np.random.default_rng(6)
  with jax.enable_x64(True):
    from mtjax.transforms._aligned_mtl import balance_matrix

    jac = random_jac(rng, 4, 1.0)
    gram = jac @ jac.T
    balance = np.asarray(jax.jit(balance_matrix, static_argnums=1)(jnp.asarray(gram), "min"))
    aligned = balance @ jac
    eig_min = np.linalg.eigvalsh(gram)[0]
    np.testing.assert_allclose(aligned @ aligned.T, eig_min * np.eye(4), atol=1e-9 * eig_min)
    d, _ = _run(jac, dtype=jnp.float64)
    np.testing.assert_allclose(d, np_aligned(jac), atol=1e-9 * np.abs(jac).max())


def test_scale_invariance_and_permutation():
  rng = np.random.default_rng(7)
  jac = random_jac(rng, 5, 1.0)
  d, _ = _run(jac)
  for s in (1e-8, 1e8):
    ds, _ = _run(s * jac)
    np.testing.assert_allclose(ds / s, d, rtol=1e-3, atol=1e-4 * np.abs(d).max())
  perm = rng.permutation(5)
  dp, _ = _run(jac[perm])
  np.testing.assert_allclose(dp, d, rtol=1e-4, atol=1e-5 * np.abs(d).max())


def test_errors():
  with pytest.raises(ValueError, match="scale"):
    mtjax.aligned_mtl(scale="max")
  with pytest.raises(ValueError, match="reduction"):
    mtjax.aligned_mtl(reduction="median")
