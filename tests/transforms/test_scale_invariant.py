"""Scale-invariant (log-loss) scalarization against a NumPy float64 reference and jax.grad of sum log L."""

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


@pytest.mark.parametrize("num_tasks,task_specific", [(1, "weighted"), (3, "sum"), (8, "weighted")])
def test_matches_numpy_reference(num_tasks, task_specific):
  rng = np.random.default_rng(num_tasks)
  with jax.enable_x64(True):
    tx = mtjax.scale_invariant(
      num_tasks=num_tasks, shared=mtjax.shared_mask(include="^shared/"), task_specific=task_specific
    )
    params = jax.tree.map(lambda s: jnp.zeros(s, jnp.float64), SHAPES, is_leaf=IS_LEAF)
    state = tx.init(params)
    update = jax.jit(tx.update)
    for step in range(3):
      grads = jax.tree.map(lambda s: rng.normal(size=(num_tasks,) + s), SHAPES, is_leaf=IS_LEAF)
      losses = rng.uniform(0.05, 5.0, size=num_tasks)
      w = np.array([1.0 / losses[i] for i in range(num_tasks)])
      upd, state = update(jax.tree.map(jnp.asarray, grads), state, params, task_losses=jnp.asarray(losses))
      for (path, g), got in zip(jax.tree_util.tree_flatten_with_path(grads)[0], jax.tree.leaves(upd)):
        shared = path[0].key == "shared"
        want = sum((w[i] if (shared or task_specific == "weighted") else 1.0) * g[i] for i in range(num_tasks))
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-14, err_msg=f"step {step}")
      np.testing.assert_allclose(state.weights, w, rtol=1e-12)


def test_update_is_the_gradient_of_the_log_losses_and_scale_invariant():
  rng = np.random.default_rng(0)
  with jax.enable_x64(True):
    params = {"shared": jnp.asarray(rng.normal(size=(3, 4))), "tower": jnp.asarray(rng.normal(size=(4, 2)))}
    x = jnp.asarray(rng.normal(size=(6, 3)))

    def loss_fn(p, x, scale=jnp.ones(2)):  # noqa: B008 (an immutable array, made under enable_x64)
      return scale * jnp.mean((jnp.tanh(x @ p["shared"]) @ p["tower"] - 1.0) ** 2, axis=0)

    tx = mtjax.scale_invariant(num_tasks=2)
    losses, grads = mtjax.task_grads(loss_fn)(params, x)
    upd, _ = tx.update(grads, tx.init(params), params, task_losses=losses)
    want = jax.grad(lambda p: jnp.sum(jnp.log(loss_fn(p, x))))(params)
    for got, ref in zip(jax.tree.leaves(upd), jax.tree.leaves(want)):
      np.testing.assert_allclose(got, ref, rtol=1e-10, atol=1e-12)
    scaled = lambda p, x: loss_fn(p, x, jnp.array([1e-3, 1e4]))  # noqa: E731
    losses, grads = mtjax.task_grads(scaled)(params, x)
    upd2, _ = tx.update(grads, tx.init(params), params, task_losses=losses)
    for got, ref in zip(jax.tree.leaves(upd2), jax.tree.leaves(upd)):
      np.testing.assert_allclose(got, ref, rtol=1e-9, atol=1e-12)


def test_nonpositive_losses_raise():
  params = {"k": jnp.zeros(2)}
  tx = mtjax.scale_invariant(num_tasks=2)
  with pytest.raises(ValueError, match="mtjax: scale_invariant: task losses must be positive"):
    tx.update({"k": jnp.eye(2)}, tx.init(params), params, task_losses=jnp.array([1.0, 0.0]))
  with pytest.raises(Exception, match="mtjax: scale_invariant: task losses must be positive"):
    jax.block_until_ready(
      jax.jit(tx.update)({"k": jnp.eye(2)}, tx.init(params), params, task_losses=jnp.array([-1.0, 1.0]))
    )
