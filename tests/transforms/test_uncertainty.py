"""Uncertainty weighting against a plain NumPy float64 reference and the exact objective gradient."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import mtjax

SHAPES = {
  "shared": {"Dense_0": {"kernel": (3, 4), "bias": (4,)}, "Dense_1": {"kernel": (4,)}},
  "tower_0": {"kernel": (2,)},
  "tower_1": {"kernel": (2, 2)},
}
IS_LEAF = lambda s: isinstance(s, tuple)  # noqa: E731


def _sample(num_tasks, num_steps, seed):
  rng = np.random.default_rng(seed)
  return [
    (
      jax.tree.map(lambda s: rng.normal(size=(num_tasks,) + s), SHAPES, is_leaf=IS_LEAF),
      rng.uniform(0.1, 4.0, size=num_tasks),
    )
    for _ in range(num_steps)
  ]


def _numpy_uncertainty(steps, *, init_log_var, lr, task_specific):
  """Float64 reference: w = 0.5 exp(-s) per task, then SGD on 0.5 (1 - exp(-s) L)."""
  num_tasks = steps[0][1].shape[0]
  s = np.full(num_tasks, init_log_var, dtype=np.float64)
  history = []
  for grads, losses in steps:
    w = np.array([0.5 * np.exp(-s[i]) for i in range(num_tasks)])
    flat, _ = jax.tree_util.tree_flatten_with_path(grads)
    updates = []
    for path, g in flat:
      shared = path[0].key == "shared"
      acc = np.zeros(g.shape[1:])
      for i in range(num_tasks):
        acc = acc + (w[i] if (shared or task_specific == "weighted") else 1.0) * g[i]
      updates.append(acc)
    grad_s = np.array([0.5 * (1 - np.exp(-s[i]) * losses[i]) for i in range(num_tasks)])
    s = s - lr * grad_s
    history.append((updates, w, s.copy()))
  return history


def test_objective_reference_value():
  np.testing.assert_allclose(mtjax.uncertainty_objective(jnp.array([1.0, 2.0, 4.0]), jnp.zeros(3)), 3.5)
  # General value against a float64 loop.
  losses, s = np.array([0.3, 2.0, 5.0]), np.array([-0.5, 0.2, 1.3])
  expected = sum(0.5 * np.exp(-s[i]) * losses[i] + 0.5 * s[i] for i in range(3))
  with jax.enable_x64(True):
    np.testing.assert_allclose(mtjax.uncertainty_objective(losses, s), expected, rtol=1e-14)
  with pytest.raises(ValueError, match="shape"):
    mtjax.uncertainty_objective(jnp.ones(3), jnp.zeros(2))


@pytest.mark.parametrize(
  "num_tasks,init_log_var,lr,task_specific",
  [
    (1, 0.0, 0.1, "weighted"),
    (2, -0.5, 0.1, "weighted"),
    (3, 0.0, 0.5, "sum"),
    (5, 0.3, 0.05, "weighted"),
    (8, -0.5, 0.2, "sum"),
  ],
)
def test_matches_numpy_reference_over_steps(num_tasks, init_log_var, lr, task_specific):
  steps = _sample(num_tasks, 5, seed=num_tasks)
  ref = _numpy_uncertainty(steps, init_log_var=init_log_var, lr=lr, task_specific=task_specific)
  with jax.enable_x64(True):
    tx = mtjax.uncertainty(
      num_tasks=num_tasks,
      init_log_var=init_log_var,
      log_var_optimizer=optax.sgd(lr),
      shared=mtjax.shared_mask(include="^shared/"),
      task_specific=task_specific,
    )
    params = jax.tree.map(lambda s: jnp.zeros(s, jnp.float64), SHAPES, is_leaf=IS_LEAF)
    state = tx.init(params)
    np.testing.assert_array_equal(state.log_vars, np.full(num_tasks, init_log_var))
    update = jax.jit(tx.update)
    for t, ((upd_ref, w, s), (grads, losses)) in enumerate(zip(ref, steps)):
      upd, state = update(jax.tree.map(jnp.asarray, grads), state, params, task_losses=jnp.asarray(losses))
      for got, want in zip(jax.tree.leaves(upd), upd_ref):
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-14, err_msg=f"step {t}")
      np.testing.assert_allclose(state.weights, w, rtol=1e-12)
      np.testing.assert_allclose(state.log_vars, s, rtol=1e-12, atol=1e-14)
      assert state.log_vars.dtype == jnp.float64


def test_update_is_exact_gradient_of_objective():
  """With task_specific='weighted' the update equals jax.grad of the objective (params and s)."""
  rng = np.random.default_rng(0)
  with jax.enable_x64(True):
    params = {
      "shared": jnp.asarray(rng.normal(size=(3, 4))),
      "tower_0": jnp.asarray(rng.normal(size=4)),
      "tower_1": jnp.asarray(rng.normal(size=4)),
    }
    x = jnp.asarray(rng.normal(size=(6, 3)))
    y = jnp.asarray(rng.normal(size=(2, 6)))

    def loss_fn(p, batch):
      h = jnp.tanh(batch[0] @ p["shared"])
      preds = jnp.stack([h @ p["tower_0"], h @ p["tower_1"]])
      return jnp.mean((preds - batch[1]) ** 2, axis=1)

    lr = 0.3
    tx = mtjax.uncertainty(
      num_tasks=2, init_log_var=-0.5, log_var_optimizer=optax.sgd(lr), shared=mtjax.shared_mask(exclude="tower_")
    )
    state = tx.init(params)
    for _ in range(3):
      losses, grads = mtjax.task_grads(loss_fn)(params, (x, y))
      s = state.log_vars
      upd, state = tx.update(grads, state, params, task_losses=losses)
      obj_p, obj_s = jax.grad(lambda p, s_: mtjax.uncertainty_objective(loss_fn(p, (x, y)), s_), argnums=(0, 1))(
        params, s
      )
      for got, want in zip(jax.tree.leaves(upd), jax.tree.leaves(obj_p)):
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)
      np.testing.assert_allclose(state.log_vars, s - lr * obj_s, rtol=1e-10, atol=1e-12)
      params = jax.tree.map(lambda p, u: p - 0.1 * u, params, upd)


def test_default_adam_and_inject_hyperparams():
  params = {"k": jnp.zeros(2)}
  g = {"k": jnp.eye(2)}
  losses = [jnp.array([1.0, 3.0]), jnp.array([0.5, 2.0]), jnp.array([0.2, 4.0])]
  plain = mtjax.uncertainty(num_tasks=2, learning_rate=0.01)
  manual = mtjax.uncertainty(num_tasks=2, log_var_optimizer=optax.adam(0.01))
  injected = optax.inject_hyperparams(mtjax.uncertainty, static_args=("num_tasks",))(num_tasks=2, learning_rate=0.01)
  sp, sm, si = plain.init(params), manual.init(params), injected.init(params)
  update = jax.jit(injected.update)
  for loss in losses:
    up, sp = plain.update(g, sp, params, task_losses=loss)
    um, sm = manual.update(g, sm, params, task_losses=loss)
    ui, si = update(g, si, params, task_losses=loss)
    np.testing.assert_allclose(up["k"], um["k"], rtol=1e-6)
    np.testing.assert_allclose(up["k"], ui["k"], rtol=1e-6)
  np.testing.assert_allclose(sp.log_vars, si.inner_state.log_vars, rtol=1e-6)
  # The first Adam step moves every s by about lr, against the sign of 0.5 (1 - L).
  np.testing.assert_allclose(
    plain.update(g, plain.init(params), params, task_losses=losses[0])[1].log_vars, [0.0, 0.01], atol=1e-6
  )
  fast = si._replace(hyperparams={**si.hyperparams, "learning_rate": jnp.asarray(0.5)})
  _, s_fast = update(g, fast, params, task_losses=losses[0])
  _, s_slow = update(g, si, params, task_losses=losses[0])
  assert not np.allclose(s_fast.inner_state.log_vars, s_slow.inner_state.log_vars)


def test_converges_to_log_loss():
  # With fixed losses the fixed point of s is log L.
  params = {"k": jnp.zeros(2)}
  tx = mtjax.uncertainty(num_tasks=2, log_var_optimizer=optax.sgd(0.5))
  state = tx.init(params)
  losses = jnp.array([0.5, 3.0])

  def body(state, _):
    _, state = tx.update({"k": jnp.eye(2)}, state, params, task_losses=losses)
    return state, None

  state, _ = jax.lax.scan(body, state, None, length=200)
  np.testing.assert_allclose(state.log_vars, np.log([0.5, 3.0]), rtol=1e-4)


def test_errors():
  params = {"k": jnp.zeros(2)}
  tx = mtjax.uncertainty(num_tasks=2)
  state = tx.init(params)
  with pytest.raises(ValueError, match="needs the per-task losses"):
    tx.update({"k": jnp.eye(2)}, state, params)
  with pytest.raises(ValueError, match="non-finite task losses"):
    tx.update({"k": jnp.eye(2)}, state, params, task_losses=jnp.array([jnp.nan, 1.0]))
  with pytest.raises(Exception, match="non-finite task losses"):
    jax.block_until_ready(jax.jit(tx.update)({"k": jnp.eye(2)}, state, params, task_losses=jnp.array([1.0, jnp.nan])))
  with pytest.raises(ValueError, match="num_tasks"):
    mtjax.uncertainty(num_tasks=None)
  with pytest.raises(ValueError, match=r"shape \(2,\)"):
    tx.update({"k": jnp.eye(2)}, state, params, task_losses=jnp.ones(3))
