"""IMTL-G: the paper's closed form (differences of gradients and of unit gradients) in NumPy float64,
the oracle, the equal-projection property, degenerate Grams, permutation equivariance."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mtjax
from mtl_references import J_ORACLE, RANK_SHAPES, pack, random_jac, unpack

_TX = mtjax.imtl()
_update = jax.jit(_TX.update)


def np_imtl(jac):
  """Paper: alpha_{2:T} = g_1 U^T (D U^T)^{-1}, alpha_1 = 1 - sum; D_t = g_1 - g_t, U_t = u_1 - u_t."""
  jac = np.asarray(jac, np.float64)
  t = jac.shape[0]
  if t == 1:
    return np.ones(1), jac[0]
  units = [jac[i] / np.linalg.norm(jac[i]) for i in range(t)]
  d_rows = np.stack([jac[0] - jac[i] for i in range(1, t)])
  u_rows = np.stack([units[0] - units[i] for i in range(1, t)])
  rest = jac[0] @ u_rows.T @ np.linalg.inv(d_rows @ u_rows.T)
  alpha = np.concatenate([[1.0 - rest.sum()], rest])
  return alpha, sum(alpha[i] * jac[i] for i in range(t))


def _run(jac, shapes=None, dtype=jnp.float32, update_fn=_update, tx=_TX):
  kwargs = {} if shapes is None else {"shapes": shapes}
  update, state = update_fn(pack(jac, dtype=dtype, **kwargs), tx.init(None))
  return unpack(update, **kwargs), state


def test_oracle():
  tx = mtjax.imtl(num_tasks=2)
  params = {"w": jnp.zeros(3)}
  update, state = jax.jit(tx.update)({"w": jnp.asarray(J_ORACLE, jnp.float32)}, tx.init(params), params)
  np.testing.assert_allclose(update["w"], [0.0767, 1.0, 1.0], atol=1e-4)
  np.testing.assert_allclose(np_imtl(J_ORACLE)[1], [0.0767, 1.0, 1.0], atol=1e-4)
  assert isinstance(state, mtjax.IMTLState)
  np.testing.assert_allclose(np.sum(state.weights), 1.0, atol=1e-6)


@pytest.mark.parametrize("num_tasks", [1, 3, 8])
def test_matches_paper_closed_form_and_projections_are_equal(num_tasks):
  rng = np.random.default_rng(num_tasks)
  for common in (0.0, 2.0):
    jac = random_jac(rng, num_tasks, common)
    d, _ = _run(jac)
    _, ref = np_imtl(jac)
    np.testing.assert_allclose(d, ref, rtol=2e-3, atol=2e-3 * np.abs(ref).max())
    projections = jac @ d / np.linalg.norm(jac, axis=1)
    np.testing.assert_allclose(projections, projections[0], rtol=1e-3, atol=1e-4 * np.abs(jac).max())


def test_float64():
  rng = np.random.default_rng(12)
  with jax.enable_x64(True):
    jac = random_jac(rng, 6, 1.0)
    tx = mtjax.imtl(num_tasks=6)
    d, state = _run(jac, dtype=jnp.float64, update_fn=jax.jit(tx.update), tx=tx)
    alpha, ref = np_imtl(jac)
    np.testing.assert_allclose(d, ref, atol=1e-9 * np.abs(ref).max())
    np.testing.assert_allclose(state.weights, alpha, atol=1e-6)  # the record is float32


def test_degenerate_grams():
  rng = np.random.default_rng(13)
  g = rng.normal(size=10)
  # Identical gradients: d = g. Zero: d = 0. Collinear opposite of different norms: the equal
  # projections are met only by d = 0 (the pinv(G) n shortcut would move along g).
  cases = {"identical": (np.stack([g, g, g]), g), "zero": (np.zeros((3, 10)), np.zeros(10)),
           "opposite": (np.stack([g, -3.0 * g, 2.0 * g]), np.zeros(10))}
  for name, (jac, expected) in cases.items():
    for scale in (1e-10, 1.0, 1e10):
      d, _ = _run(scale * jac)
      np.testing.assert_allclose(d / scale, expected, atol=1e-4 * np.abs(g).max(), err_msg=f"{name} {scale}")
  # T = 8 > P = 6 (rank-deficient): some alpha summing to 1 has J^T alpha = 0, so the projections
  # are all equal to 0 (d = 0, the minimum-norm solution picks one such alpha).
  jac = random_jac(rng, 8, 1.0, num=6)
  d, state = _run(jac, shapes=RANK_SHAPES)
  np.testing.assert_allclose(d, 0.0, atol=1e-5 * np.abs(jac).max())


def test_permutation_equivariance():
  rng = np.random.default_rng(14)
  jac = random_jac(rng, 5, 1.0)
  perm = rng.permutation(5)
  d, _ = _run(jac)
  dp, _ = _run(jac[perm])
  np.testing.assert_allclose(dp, d, rtol=1e-4, atol=1e-5 * np.abs(d).max())
