"""FAMO against a plain NumPy float64 reference of the paper's loop (both forms, SGD and Adam logits)."""

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
AFTER = "previous_task_losses_after_step"


def _sample(num_tasks, num_steps, seed):
  rng = np.random.default_rng(seed)
  return [
    (
      jax.tree.map(lambda s: rng.normal(size=(num_tasks,) + s), SHAPES, is_leaf=IS_LEAF),
      rng.uniform(0.1, 4.0, size=num_tasks),
      rng.uniform(0.1, 4.0, size=num_tasks),
    )
    for _ in range(num_steps)
  ]


def _numpy_famo(steps, *, form, update, lr, gamma, min_losses, eps, task_specific):
  """Float64 loop: the paper's weights c z_i / l_i and the logit step on the softmax Jacobian."""
  num_tasks = steps[0][1].shape[0]
  xi = np.zeros(num_tasks)
  m, v, k = np.zeros(num_tasks), np.zeros(num_tasks), 0
  prev = None
  history = []
  for grads, losses, after in steps:
    cur = losses - min_losses + eps
    if prev is not None:
      post = cur if form == "next_batch" else after - min_losses + eps
      delta = np.array([np.log(prev[i]) - np.log(post[i]) for i in range(num_tasks)])
      z = np.exp(xi) / np.sum(np.exp(xi))
      jac = np.diag(z) - np.outer(z, z)  # d softmax / d xi
      g = jac.T @ delta + gamma * xi
      if update == "sgd":
        xi = xi - lr * g
      else:  # Adam (PyTorch's, weight decay already in g)
        k += 1
        m = 0.9 * m + 0.1 * g
        v = 0.999 * v + 0.001 * g * g
        xi = xi - lr * (m / (1 - 0.9**k)) / (np.sqrt(v / (1 - 0.999**k)) + 1e-8)
    z = np.exp(xi) / np.sum(np.exp(xi))
    c = 1.0 / sum(z[j] / cur[j] for j in range(num_tasks))
    w = np.array([c * z[i] / cur[i] for i in range(num_tasks)])
    flat, _ = jax.tree_util.tree_flatten_with_path(grads)
    updates = []
    for path, gr in flat:
      shared = path[0].key == "shared"
      acc = np.zeros(gr.shape[1:])
      for i in range(num_tasks):
        acc = acc + (w[i] if (shared or task_specific == "weighted") else 1.0) * gr[i]
      updates.append(acc)
    history.append((updates, w, xi.copy()))
    prev = cur
  return history


@pytest.mark.parametrize(
  "num_tasks,form,update,lr,gamma,min_losses,task_specific",
  [
    (1, "extra_forward", "sgd", 0.5, 1e-3, 0.0, "weighted"),
    (2, "extra_forward", "sgd", 0.5, 1e-3, 0.05, "weighted"),
    (3, "next_batch", "sgd", 1.0, 0.01, 0.0, "sum"),
    (5, "extra_forward", "adam", 0.025, 0.01, 0.0, "weighted"),
    (8, "next_batch", "adam", 0.1, 1e-3, 0.02, "sum"),
  ],
)
def test_matches_numpy_reference_over_steps(num_tasks, form, update, lr, gamma, min_losses, task_specific):
  steps = _sample(num_tasks, 6, seed=num_tasks)
  eps = 1e-8
  ref = _numpy_famo(
    steps, form=form, update=update, lr=lr, gamma=gamma, min_losses=min_losses, eps=eps, task_specific=task_specific
  )
  with jax.enable_x64(True):
    tx = mtjax.famo(
      num_tasks=num_tasks,
      learning_rate=lr,
      gamma=gamma,
      min_losses=min_losses,
      eps=eps,
      post_step_losses=form,
      logit_update=update,
      shared=mtjax.shared_mask(include="^shared/"),
      task_specific=task_specific,
    )
    params = jax.tree.map(lambda s: jnp.zeros(s, jnp.float64), SHAPES, is_leaf=IS_LEAF)
    state = tx.init(params)
    update_fn = jax.jit(tx.update)
    for t, ((upd_ref, w, xi), (grads, losses, after)) in enumerate(zip(ref, steps)):
      extra = {AFTER: jnp.asarray(after)} if form == "extra_forward" else {}
      upd, state = update_fn(jax.tree.map(jnp.asarray, grads), state, params, task_losses=jnp.asarray(losses), **extra)
      for got, want in zip(jax.tree.leaves(upd), upd_ref):
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-13, err_msg=f"step {t}")
      np.testing.assert_allclose(state.weights, w, rtol=1e-10, err_msg=f"step {t}")
      np.testing.assert_allclose(state.logits, xi, rtol=1e-9, atol=1e-13, err_msg=f"step {t}")
      np.testing.assert_allclose(np.sum(state.weights), 1.0, rtol=1e-12)
      assert state.logits.dtype == jnp.float64 and int(state.count) == t + 1


def test_extra_forward_form_is_the_papers_loop():
  """Training with the extra forward (previous batch at the new parameters) = the paper's loop, in which
  the logits are stepped right after each parameter step with the same batch's losses."""
  rng = np.random.default_rng(0)
  with jax.enable_x64(True):
    params = {"w": jnp.asarray(rng.normal(size=(3, 2)))}
    batches = [(jnp.asarray(rng.normal(size=(8, 3))), jnp.asarray(rng.normal(size=(8, 2)))) for _ in range(5)]

    def loss_fn(p, batch):
      return jnp.mean((batch[0] @ p["w"] - batch[1]) ** 2, axis=0) + 0.1

    tx = mtjax.famo(num_tasks=2, learning_rate=0.5, eps=0.0)
    state = tx.init(params)
    p, prev = params, batches[0]
    for batch in batches:
      losses, grads = mtjax.task_grads(loss_fn)(p, batch)
      upd, state = tx.update(grads, state, p, task_losses=losses, **{AFTER: loss_fn(p, prev)})
      p, prev = optax.apply_updates(p, jax.tree.map(lambda u: -0.1 * u, upd)), batch
    # The paper's loop, by hand: weights, step, losses of the same batch after the step, logit step.
    xi, q = np.zeros(2), params
    for batch in batches:
      losses, grads = mtjax.task_grads(loss_fn)(q, batch)
      z = np.exp(xi) / np.exp(xi).sum()
      w = (z / np.asarray(losses)) / np.sum(z / np.asarray(losses))
      q = {"w": q["w"] - 0.1 * np.tensordot(w, np.asarray(grads["w"]), axes=1)}
      delta = np.log(np.asarray(losses)) - np.log(np.asarray(loss_fn(q, batch)))
      xi = xi - 0.5 * ((np.diag(z) - np.outer(z, z)) @ delta + 1e-3 * xi)
    np.testing.assert_allclose(p["w"], q["w"], rtol=1e-10)
    # The transform's logits lag one logit step behind (the last one happens at the next update).
    z = np.exp(xi) / np.exp(xi).sum()
    losses = np.asarray(loss_fn(p, batches[0]))
    _, state = tx.update(
      mtjax.task_grads(loss_fn)(p, batches[0])[1], state, p, task_losses=losses, **{AFTER: loss_fn(p, batches[-1])}
    )
    np.testing.assert_allclose(state.logits, xi, rtol=1e-10)
    np.testing.assert_allclose(state.weights, (z / losses) / np.sum(z / losses), rtol=1e-10)


def test_weights_are_stable_for_extreme_losses():
  tx = mtjax.famo(num_tasks=3, post_step_losses="next_batch")
  params = {"k": jnp.zeros(3)}
  state = tx.init(params)
  for losses in ([1e-30, 1.0, 1e30], [1e30, 1e-30, 1.0]):
    upd, state = tx.update({"k": jnp.eye(3)}, state, params, task_losses=jnp.asarray(losses, jnp.float32))
    assert np.all(np.isfinite(upd["k"])) and np.all(np.isfinite(state.logits))
  np.testing.assert_allclose(np.sum(state.weights), 1.0, rtol=1e-6)


def test_inject_hyperparams_and_optimizer_override():
  params = {"k": jnp.zeros(2)}
  g = {"k": jnp.eye(2)}
  seq = [jnp.array([1.0, 3.0]), jnp.array([0.5, 2.9]), jnp.array([0.2, 2.8])]
  plain = mtjax.famo(num_tasks=2, learning_rate=0.3, post_step_losses="next_batch")
  manual = mtjax.famo(num_tasks=2, logit_optimizer=optax.sgd(0.3), post_step_losses="next_batch")
  injected = optax.inject_hyperparams(mtjax.famo, static_args=("num_tasks",))(
    num_tasks=2, learning_rate=0.3, post_step_losses="next_batch"
  )
  sp, sm, si = plain.init(params), manual.init(params), injected.init(params)
  update = jax.jit(injected.update)
  for loss in seq:
    up, sp = plain.update(g, sp, params, task_losses=loss)
    um, sm = manual.update(g, sm, params, task_losses=loss)
    ui, si = update(g, si, params, task_losses=loss)
    np.testing.assert_allclose(up["k"], um["k"], rtol=1e-6)
    np.testing.assert_allclose(up["k"], ui["k"], rtol=1e-6)
  np.testing.assert_allclose(sp.logits, si.inner_state.logits, rtol=1e-6)
  # The extra argument passes through optax.inject_hyperparams too.
  paper = optax.inject_hyperparams(mtjax.famo, static_args=("num_tasks",))(num_tasks=2)
  _, s = paper.update(g, paper.init(params), params, task_losses=seq[0], **{AFTER: seq[0]})
  _, s = paper.update(g, s, params, task_losses=seq[1], **{AFTER: jnp.array([0.5, 3.0])})
  assert s.inner_state.logits[0] < s.inner_state.logits[1]  # task 0 fell more: less weight


def test_errors():
  params = {"k": jnp.zeros(2)}
  g = {"k": jnp.eye(2)}
  losses = jnp.array([1.0, 2.0])
  tx = mtjax.famo(num_tasks=2)
  state = tx.init(params)
  with pytest.raises(ValueError, match=f"mtjax: famo: .*needs {AFTER}="):
    tx.update(g, state, params, task_losses=losses)
  with pytest.raises(ValueError, match="needs the per-task losses"):
    tx.update(g, state, params, **{AFTER: losses})
  with pytest.raises(ValueError, match=rf"{AFTER} must have shape \(2,\)"):
    tx.update(g, state, params, task_losses=losses, **{AFTER: jnp.ones(3)})
  with pytest.raises(ValueError, match="non-finite task losses passed to famo"):
    tx.update(g, state, params, task_losses=losses, **{AFTER: jnp.array([1.0, jnp.nan])})
  nb = mtjax.famo(num_tasks=2, post_step_losses="next_batch")
  with pytest.raises(ValueError, match="does not use it"):
    nb.update(g, nb.init(params), params, task_losses=losses, **{AFTER: losses})
  # Non-positive shifted losses: eagerly a ValueError, under jit a runtime error, never NaN.
  shifted = mtjax.famo(num_tasks=2, post_step_losses="next_batch", min_losses=1.5)
  with pytest.raises(ValueError, match="mtjax: famo: the task losses minus min_losses plus eps must be positive"):
    shifted.update(g, shifted.init(params), params, task_losses=losses)
  with pytest.raises(Exception, match="must be positive"):
    jax.block_until_ready(jax.jit(shifted.update)(g, shifted.init(params), params, task_losses=losses))
  for kwargs, match in (
    (dict(post_step_losses="x"), "post_step_losses"),
    (dict(logit_update="rmsprop"), "logit_update"),
    (dict(min_losses=np.zeros(3)), "min_losses"),
    (dict(num_tasks=0), "num_tasks"),
  ):
    with pytest.raises(ValueError, match=match):
      mtjax.famo(**{"num_tasks": 2, **kwargs})


def test_experiment_registry_uses_the_next_batch_form():
  from mtjax.experiment import _registry as reg  # pylint: disable=import-outside-toplevel

  tx = reg.METHODS["famo"](num_tasks=2)
  params = {"k": jnp.zeros(2)}
  upd, _ = tx.update({"k": jnp.eye(2)}, tx.init(params), params, task_losses=jnp.array([1.0, 3.0]))
  np.testing.assert_allclose(upd["k"], [0.75, 0.25], rtol=1e-6)
