"""GLS against a plain NumPy float64 reference, the exact gradient of the geometric mean, stability."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mtjax

SHAPES = {
  "shared": {"Dense_0": {"kernel": (3, 4), "bias": (4,)}, "Dense_1": {"kernel": (4,)}},
  "tower_0": {"kernel": (2,)},
  "tower_1": {"kernel": (2, 2)},
}
IS_LEAF = lambda s: isinstance(s, tuple)  # noqa: E731


def _numpy_gls(grads, losses, task_specific):
  t = losses.shape[0]
  gm = np.prod(losses) ** (1.0 / t)
  w = np.array([gm / (t * losses[i]) for i in range(t)])
  out = []
  for path, g in jax.tree_util.tree_flatten_with_path(grads)[0]:
    shared = path[0].key == "shared"
    acc = np.zeros(g.shape[1:])
    for i in range(t):
      acc = acc + (w[i] if (shared or task_specific == "weighted") else 1.0) * g[i]
    out.append(acc)
  return out, w


@pytest.mark.parametrize("num_tasks,task_specific", [(1, "weighted"), (2, "sum"), (3, "weighted"), (8, "sum")])
def test_matches_numpy_reference(num_tasks, task_specific):
  rng = np.random.default_rng(num_tasks)
  with jax.enable_x64(True):
    tx = mtjax.gls(num_tasks=num_tasks, shared=mtjax.shared_mask(include="^shared/"), task_specific=task_specific)
    params = jax.tree.map(lambda s: jnp.zeros(s, jnp.float64), SHAPES, is_leaf=IS_LEAF)
    state = tx.init(params)
    update = jax.jit(tx.update)
    for step in range(3):
      grads = jax.tree.map(lambda s: rng.normal(size=(num_tasks,) + s), SHAPES, is_leaf=IS_LEAF)
      losses = rng.uniform(0.05, 5.0, size=num_tasks)
      ref, w = _numpy_gls(grads, losses, task_specific)
      upd, state = update(jax.tree.map(jnp.asarray, grads), state, params, task_losses=jnp.asarray(losses))
      for got, want in zip(jax.tree.leaves(upd), ref):
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-14, err_msg=f"step {step}")
      np.testing.assert_allclose(state.weights, w, rtol=1e-12)


def test_update_is_the_gradient_of_the_geometric_mean():
  rng = np.random.default_rng(0)
  with jax.enable_x64(True):
    params = {"shared": jnp.asarray(rng.normal(size=(3, 4))), "tower": jnp.asarray(rng.normal(size=(4, 3)))}
    x = jnp.asarray(rng.normal(size=(6, 3)))

    def loss_fn(p, x):
      return jnp.mean((jnp.tanh(x @ p["shared"]) @ p["tower"] - 1.0) ** 2, axis=0)

    losses, grads = mtjax.task_grads(loss_fn)(params, x)
    tx = mtjax.gls(num_tasks=3)
    upd, _ = tx.update(grads, tx.init(params), params, task_losses=losses)
    want = jax.grad(lambda p: jnp.prod(loss_fn(p, x)) ** (1 / 3))(params)
    for got, ref in zip(jax.tree.leaves(upd), jax.tree.leaves(want)):
      np.testing.assert_allclose(got, ref, rtol=1e-10, atol=1e-12)


def test_extreme_losses_are_finite():
  # The product of the losses under/overflows float32; the log-space weights do not.
  t = 8
  losses = jnp.asarray([1e-30, 1e30, 1e-20, 1e20, 1.0, 1e-10, 1e10, 3.0], jnp.float32)
  tx = mtjax.gls(num_tasks=t)
  params = {"k": jnp.zeros(t)}
  upd, state = tx.update({"k": jnp.eye(t)}, tx.init(params), params, task_losses=losses)
  gm = np.exp(np.mean(np.log(np.asarray(losses, np.float64))))
  np.testing.assert_allclose(upd["k"], gm / (t * np.asarray(losses, np.float64)), rtol=1e-5)


def test_nonpositive_losses_raise():
  params = {"k": jnp.zeros(2)}
  tx = mtjax.gls(num_tasks=2)
  for bad in ([0.0, 1.0], [-1.0, 2.0]):
    with pytest.raises(ValueError, match="mtjax: gls: task losses must be positive"):
      tx.update({"k": jnp.eye(2)}, tx.init(params), params, task_losses=jnp.asarray(bad))
    with pytest.raises(Exception, match="mtjax: gls: task losses must be positive"):
      jax.block_until_ready(
        jax.jit(tx.update)({"k": jnp.eye(2)}, tx.init(params), params, task_losses=jnp.asarray(bad))
      )
  with pytest.raises(ValueError, match="num_tasks"):
    mtjax.gls(num_tasks=0)
