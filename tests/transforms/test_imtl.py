"""IMTL-G: the paper's closed form (differences of gradients and of unit gradients) in NumPy float64,
the oracle, the equal-projection property, degenerate Grams, permutation equivariance."""

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
  cases = {
    "identical": (np.stack([g, g, g]), g),
    "zero": (np.zeros((3, 10)), np.zeros(10)),
    "opposite": (np.stack([g, -3.0 * g, 2.0 * g]), np.zeros(10)),
  }
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


# ----------------------------------------------------------------------------- IMTL-L and the hybrid IMTL

LOSS_SHAPES = {
  "shared": {"Dense_0": {"kernel": (3, 4), "bias": (4,)}, "Dense_1": {"kernel": (4,)}},
  "tower_0": {"kernel": (2,)},
  "tower_1": {"kernel": (2, 2)},
}
_IS_LEAF = lambda s: isinstance(s, tuple)  # noqa: E731


def np_imtl_loss(steps, *, mode, lr, init, task_specific):
  """Float64 loop: weights e^s (IMTL-L) or alpha(e^s J) e^s (hybrid, the paper's closed form on the scaled
  shared rows), then SGD on s with the gradient e^s L - 1."""
  t = steps[0][1].shape[0]
  s = np.full(t, init, np.float64)
  history = []
  for grads, losses in steps:
    flat = jax.tree_util.tree_flatten_with_path(grads)[0]
    shared = [path[0].key == "shared" for path, _ in flat]
    e = np.exp(s)
    if mode == "hybrid":
      rows = np.concatenate([g.reshape(t, -1) for (_, g), sh in zip(flat, shared) if sh], axis=1)
      alpha, _ = np_imtl(e[:, None] * rows)
      w = alpha * e
    else:
      w = e
    updates = []
    for (_, g), sh in zip(flat, shared):
      acc = np.zeros(g.shape[1:])
      for i in range(t):
        acc = acc + (w[i] if (sh or task_specific == "weighted") else 1.0) * g[i]
      updates.append(acc)
    s = s - lr * np.array([e[i] * losses[i] - 1.0 for i in range(t)])
    history.append((updates, w, s.copy()))
  return history


@pytest.mark.parametrize(
  "mode,num_tasks,init,task_specific",
  [
    ("loss", 1, 0.0, "weighted"),
    ("loss", 3, -0.5, "sum"),
    ("loss", 8, 0.2, "weighted"),
    ("hybrid", 2, 0.0, "weighted"),
    ("hybrid", 3, 0.3, "sum"),
    ("hybrid", 5, -0.2, "weighted"),
  ],
)
def test_loss_and_hybrid_modes_match_numpy_reference_over_steps(mode, num_tasks, init, task_specific):
  import optax  # pylint: disable=import-outside-toplevel

  rng = np.random.default_rng(num_tasks)
  steps = [
    (
      jax.tree.map(lambda s: rng.normal(size=(num_tasks,) + s), LOSS_SHAPES, is_leaf=_IS_LEAF),
      rng.uniform(0.1, 4.0, size=num_tasks),
    )
    for _ in range(5)
  ]
  lr = 0.2
  ref = np_imtl_loss(steps, mode=mode, lr=lr, init=init, task_specific=task_specific)
  with jax.enable_x64(True):
    tx = mtjax.imtl(
      num_tasks=num_tasks,
      mode=mode,
      init_loss_scale=init,
      loss_scale_optimizer=optax.sgd(lr),
      shared=mtjax.shared_mask(include="^shared/"),
      task_specific=task_specific,
    )
    params = jax.tree.map(lambda s: jnp.zeros(s, jnp.float64), LOSS_SHAPES, is_leaf=_IS_LEAF)
    state = tx.init(params)
    assert isinstance(state, mtjax.IMTLLossState)
    update = jax.jit(tx.update)
    for step, ((upd_ref, w, s), (grads, losses)) in enumerate(zip(ref, steps)):
      upd, state = update(jax.tree.map(jnp.asarray, grads), state, params, task_losses=jnp.asarray(losses))
      scale = max(np.abs(u).max() for u in upd_ref)
      for got, want in zip(jax.tree.leaves(upd), upd_ref):
        np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-11 * scale, err_msg=f"{mode} step {step}")
      np.testing.assert_allclose(state.weights, w, rtol=1e-9, atol=1e-12, err_msg=f"{mode} step {step}")
      np.testing.assert_allclose(state.loss_scales, s, rtol=1e-12, atol=1e-14)


def test_loss_mode_is_the_gradient_of_the_scaled_losses_and_converges():
  rng = np.random.default_rng(3)
  with jax.enable_x64(True):
    params = {"shared": jnp.asarray(rng.normal(size=(3, 4))), "tower": jnp.asarray(rng.normal(size=(4, 2)))}
    x = jnp.asarray(rng.normal(size=(6, 3)))

    def loss_fn(p, x):
      return jnp.mean((jnp.tanh(x @ p["shared"]) @ p["tower"] - 1.0) ** 2, axis=0)

    import optax  # pylint: disable=import-outside-toplevel

    tx = mtjax.imtl(num_tasks=2, mode="loss", init_loss_scale=0.3, loss_scale_optimizer=optax.sgd(0.1))
    state = tx.init(params)
    losses, grads = mtjax.task_grads(loss_fn)(params, x)
    s = state.loss_scales
    upd, state = tx.update(grads, state, params, task_losses=losses)
    objective = lambda p, s_: jnp.sum(jnp.exp(s_) * loss_fn(p, x) - s_)  # noqa: E731
    want_p, want_s = jax.grad(objective, argnums=(0, 1))(params, s)
    for got, ref in zip(jax.tree.leaves(upd), jax.tree.leaves(want_p)):
      np.testing.assert_allclose(got, ref, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(state.loss_scales, s - 0.1 * want_s, rtol=1e-12)
  # With fixed losses the scales converge to s = -log L (every scaled loss e^s L = 1).
  params = {"k": jnp.zeros(2)}
  tx = mtjax.imtl(num_tasks=2, mode="loss", loss_scale_optimizer=optax.sgd(0.3))

  def body(state, _):
    return tx.update({"k": jnp.eye(2)}, state, params, task_losses=jnp.array([0.5, 3.0]))[1], None

  state, _ = jax.lax.scan(body, tx.init(params), None, length=300)
  np.testing.assert_allclose(state.loss_scales, -np.log([0.5, 3.0]), rtol=1e-4)


def test_gradient_mode_state_is_unchanged_and_mode_errors():
  params = {"k": jnp.zeros(2)}
  assert mtjax.IMTLState._fields == ("weights",)
  assert isinstance(mtjax.imtl(num_tasks=2).init(params), mtjax.IMTLState)
  assert isinstance(mtjax.imtl(num_tasks=2, mode="gradient").init(params), mtjax.IMTLState)
  with pytest.raises(ValueError, match="mode must be one of"):
    mtjax.imtl(mode="both")
  with pytest.raises(ValueError, match="needs num_tasks"):
    mtjax.imtl(mode="loss")
  tx = mtjax.imtl(num_tasks=2, mode="hybrid")
  with pytest.raises(ValueError, match="needs the per-task losses"):
    tx.update({"k": jnp.eye(2)}, tx.init(params), params)
  with pytest.raises(ValueError, match="mtjax: imtl: task losses must be positive"):
    tx.update({"k": jnp.eye(2)}, tx.init(params), params, task_losses=jnp.array([0.0, 1.0]))
