"""ConFIG: a NumPy float64 reference on the Jacobian itself (least squares on the normalized rows),
the oracle, equal cosines, linearity under positive task scaling, degenerate inputs, permutation."""

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

_TX = mtjax.config()
_update = jax.jit(_TX.update)


def np_config(jac):
  """Reference: x = min-norm solution of J_n x = 1; g_u = x/|x|; d = (sum_i g_i . g_u) g_u."""
  jac = np.asarray(jac, np.float64)
  t = jac.shape[0]
  rows = []
  for i in range(t):
    n = np.linalg.norm(jac[i])
    rows.append(jac[i] / n if n > 0 else np.zeros_like(jac[i]))
  x = np.linalg.lstsq(np.stack(rows), np.ones(t), rcond=None)[0]
  if np.linalg.norm(x) < 1e-12:
    return np.zeros(jac.shape[1])
  unit = x / np.linalg.norm(x)
  return sum(float(jac[i] @ unit) for i in range(t)) * unit


def _run(jac, shapes=None, dtype=jnp.float32):
  kwargs = {} if shapes is None else {"shapes": shapes}
  update, state = _update(pack(jac, dtype=dtype, **kwargs), _TX.init(None))
  return unpack(update, **kwargs), state


def test_oracle():
  tx = mtjax.config(num_tasks=2)
  params = {"w": jnp.zeros(3)}
  update, state = jax.jit(tx.update)({"w": jnp.asarray(J_ORACLE, jnp.float32)}, tx.init(params), params)
  np.testing.assert_allclose(update["w"], [0.1588, 2.0706, 2.0706], atol=1e-4)
  np.testing.assert_allclose(np_config(J_ORACLE), [0.1588, 2.0706, 2.0706], atol=1e-4)
  assert isinstance(state, mtjax.ConFIGState)


@pytest.mark.parametrize("num_tasks", [1, 3, 8])
def test_matches_reference_with_equal_cosines(num_tasks):
  rng = np.random.default_rng(num_tasks)
  for common in (0.0, 1.0):
    jac = random_jac(rng, num_tasks, common) * rng.uniform(0.1, 10.0, size=(num_tasks, 1))
    d, _ = _run(jac)
    ref = np_config(jac)
    np.testing.assert_allclose(d, ref, rtol=1e-3, atol=1e-3 * np.abs(ref).max(), err_msg=f"T={num_tasks}")
    cosines = jac @ d / (np.linalg.norm(jac, axis=1) * np.linalg.norm(d))
    np.testing.assert_allclose(cosines, cosines[0], atol=1e-4)
    assert np.all(cosines > 0)  # no conflict


def test_linear_under_positive_task_scaling_and_permutation():
  rng = np.random.default_rng(9)
  jac = random_jac(rng, 4, 0.5)
  d, _ = _run(jac)
  unit = d / np.linalg.norm(d)
  scales = np.array([0.01, 1.0, 7.0, 100.0])
  ds, _ = _run(scales[:, None] * jac)
  expected = sum(scales[i] * float(jac[i] @ unit) for i in range(4)) * unit  # same direction, lengths scale
  np.testing.assert_allclose(ds, expected, rtol=1e-3, atol=1e-4 * np.abs(expected).max())
  perm = rng.permutation(4)
  dp, _ = _run(jac[perm])
  np.testing.assert_allclose(dp, d, rtol=1e-4, atol=1e-5 * np.abs(d).max())


def test_degenerate_and_float64():
  rng = np.random.default_rng(10)
  g = rng.normal(size=10)
  np.testing.assert_allclose(_run(np.stack([g, g, g]))[0], 3.0 * g, rtol=1e-4, atol=1e-5)  # identical
  np.testing.assert_allclose(_run(np.stack([g, -g]))[0], 0.0, atol=1e-5)  # opposite: x = 0
  jac = random_jac(rng, 3, 1.0)
  jac[1] = 0.0  # a zero task is left out
  np.testing.assert_allclose(_run(jac)[0], np_config(jac), rtol=1e-3, atol=1e-4 * np.abs(jac).max())
  jac = random_jac(rng, 8, 1.0, num=6)  # T > P: least-squares direction
  d, _ = _run(jac, shapes=RANK_SHAPES)
  ref = np_config(jac)
  np.testing.assert_allclose(d, ref, rtol=1e-3, atol=1e-3 * np.abs(ref).max())
  with jax.enable_x64(True):
    jac = random_jac(rng, 5, 1.0)
    d, _ = _run(jac, dtype=jnp.float64)
    np.testing.assert_allclose(d, np_config(jac), atol=1e-9 * np.abs(jac).max())
