"""Deferred per-task gradients (task_grads(deferred=True) -> TaskJacobian): same updates, fewer backward passes."""

import functools
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import mtjax

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "transforms"))
from mtl_references import backward_counter  # pylint: disable=wrong-import-position

T = 3
FACTORIES = {
  "linear": lambda **kw: mtjax.linear(num_tasks=T, **kw),
  "dwa": lambda **kw: mtjax.dwa(num_tasks=T, steps_per_epoch=1, **kw),
  "uncertainty": lambda **kw: mtjax.uncertainty(num_tasks=T, **kw),
  "rlw": lambda **kw: mtjax.rlw(key=1, num_tasks=T, **kw),
  "pcgrad": lambda **kw: mtjax.pcgrad(key=1, num_tasks=T, **kw),
  "mgda": lambda **kw: mtjax.mgda(num_tasks=T, **kw),
  "gradvac": lambda **kw: mtjax.gradvac(key=1, num_tasks=T, granularity="layer", **kw),
  "gradnorm": lambda **kw: mtjax.gradnorm(num_tasks=T, **kw),
  "upgrad": lambda **kw: mtjax.upgrad(num_tasks=T, **kw),
  "graddrop": lambda **kw: mtjax.graddrop(key=1, num_tasks=T, **kw),
  # the loss-only methods of issue #12 (FAMO in its next-batch form: the step below passes only task_losses)
  "famo": lambda **kw: mtjax.famo(num_tasks=T, post_step_losses="next_batch", logit_update="adam", **kw),
  "stch": lambda **kw: mtjax.stch(num_tasks=T, mu=0.5, normalization="log_nadir", warmup_steps=1, **kw),
  "gls": lambda **kw: mtjax.gls(num_tasks=T, **kw),
  "scale_invariant": lambda **kw: mtjax.scale_invariant(num_tasks=T, **kw),
  "imtl-loss": lambda **kw: mtjax.imtl(num_tasks=T, mode="loss", learning_rate=0.1, **kw),
  "imtl-hybrid": lambda **kw: mtjax.imtl(num_tasks=T, mode="hybrid", learning_rate=0.1, **kw),  # Gram: T passes
}
LOSS_ONLY = (
  "linear",
  "dwa",
  "uncertainty",
  "rlw",  # weights that do not read the gradients
  "famo",
  "stch",
  "gls",
  "scale_invariant",
  "imtl-loss",
)
SHARED = mtjax.shared_mask(exclude="tower")
_counted, BACKWARD_TRACES = backward_counter()  # traced backward passes through the trunk


def _problem(seed=0):
  rng = np.random.default_rng(seed)
  params = {
    "trunk": {"kernel": jnp.asarray(rng.normal(size=(5, 4)) * 0.5, jnp.float32), "bias": jnp.zeros(4, jnp.float32)},
    "tower": jnp.asarray(rng.normal(size=(4, T)) * 0.5, jnp.float32),
  }
  batch = {
    "x": jnp.asarray(rng.normal(size=(32, 5)), jnp.float32),
    "y": jnp.asarray(rng.normal(size=(32, T)), jnp.float32),
  }
  return params, batch


def _loss_fn(params, batch):
  h = _counted(jnp.tanh(batch["x"] @ params["trunk"]["kernel"] + params["trunk"]["bias"][None, :]))
  return jnp.mean((h @ params["tower"] - batch["y"]) ** 2, axis=0)


@functools.cache
def _steps(name, masked):
  kw = {"shared": SHARED} if masked else {}
  tx = optax.chain(FACTORIES[name](**kw), optax.sgd(0.1))

  def step(params, state, batch, deferred):
    losses, grads = mtjax.task_grads(_loss_fn, strategy="loop", deferred=deferred)(params, batch)
    updates, state = tx.update(grads, state, params, task_losses=losses)
    return optax.apply_updates(params, updates), state

  return tx, jax.jit(functools.partial(step, deferred=False)), jax.jit(functools.partial(step, deferred=True))


@pytest.mark.parametrize("masked", [False, True], ids=["all-shared", "towers-task-specific"])
@pytest.mark.parametrize("name", list(FACTORIES))
def test_deferred_gives_the_same_updates(name, masked):
  tx, dense, deferred = _steps(name, masked)
  params, batch = _problem()
  a = b = (params, tx.init(params))
  for seed in range(3):  # a few steps, so that method state (loss history, keys, weights) is used
    _, batch = _problem(seed)
    a = dense(*a, batch)
    b = deferred(*b, batch)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=2e-5, atol=1e-6, err_msg=name)


@pytest.mark.parametrize("masked", [False, True], ids=["all-shared", "towers-task-specific"])
@pytest.mark.parametrize("name", list(FACTORIES))
def test_deferred_backward_passes(name, masked):
  kw = {"shared": SHARED} if masked else {}
  tx = FACTORIES[name](**kw)
  params, batch = _problem()
  state = tx.init(params)

  def step(deferred):
    losses, grads = mtjax.task_grads(_loss_fn, strategy="loop", deferred=deferred)(params, batch)
    return tx.update(grads, state, params, task_losses=losses)[0]

  del BACKWARD_TRACES[:]
  jax.make_jaxpr(lambda: step(True))()
  deferred_passes = len(BACKWARD_TRACES)
  del BACKWARD_TRACES[:]
  jax.make_jaxpr(lambda: step(False))()
  assert len(BACKWARD_TRACES) == T
  if name in LOSS_ONLY:  # J^T w in one pass (they weight task-specific leaves too by default)
    assert deferred_passes == 1, deferred_passes
  elif name == "gradnorm" and not masked:
    # GradNorm's Gram is of the last shared layer only (the trunk; the tower is shared but outside the
    # Gram): the "subset" strategy traces T passes for the trunk's rows (cheaper after XLA's dead-code
    # elimination: only the trunk's rows are kept) + 1 pass of sum_t w_t L_t for the update. With the
    # towers task-specific the last shared layer is every shared leaf, so it takes the T full rows.
    assert deferred_passes == T + 1, deferred_passes
  else:
    assert deferred_passes == T, deferred_passes


def test_plain_sum_on_task_specific_leaves_takes_a_second_pass():
  params, batch = _problem()
  tx = mtjax.dwa(num_tasks=T, steps_per_epoch=1, shared=SHARED, task_specific="sum")
  state = tx.init(params)

  def step(deferred):
    losses, grads = mtjax.task_grads(_loss_fn, strategy="loop", deferred=deferred)(params, batch)
    return tx.update(grads, state, params, task_losses=losses)[0]

  del BACKWARD_TRACES[:]
  deferred = step(True)
  assert len(BACKWARD_TRACES) == 2  # J^T w for the shared leaves, J^T 1 for the towers
  for x, y in zip(jax.tree.leaves(deferred), jax.tree.leaves(step(False))):
    np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)


def test_task_jacobian_api():
  params, batch = _problem()
  losses, jac = mtjax.task_grads(_loss_fn, deferred=True)(params, batch)
  _, dense = mtjax.task_grads(_loss_fn)(params, batch)
  assert isinstance(jac, mtjax.TaskJacobian) and jac.num_tasks == T
  w = jnp.array([0.5, -1.0, 2.0])
  expected = jax.tree.map(lambda g: jnp.tensordot(w, g, axes=1), dense)
  for x, y in zip(jax.tree.leaves(jac.weighted_sum(w)), jax.tree.leaves(expected)):
    np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)
  for x, y in zip(jax.tree.leaves(jac.materialize()), jax.tree.leaves(dense)):
    np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7)
  assert jax.tree.map(lambda s: s.shape, jac.shapes()) == jax.tree.map(jnp.shape, dense)
  # A pytree: it crosses jit boundaries.
  out = jax.jit(lambda j: j.weighted_sum(w))(jac)
  np.testing.assert_allclose(out["tower"], expected["tower"], rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match="needs 3 weights"):
    jac.weighted_sum(jnp.ones(2))
  # Analysis accepts it too (and materializes it).
  for k, v in mtjax.analysis.track(jac).items():
    np.testing.assert_allclose(v, mtjax.analysis.track(dense)[k], rtol=1e-5, atol=1e-6, err_msg=k)
  # Its validation is the transforms' usual one.
  with pytest.raises(ValueError, match="num_tasks"):
    mtjax.dwa(num_tasks=2, steps_per_epoch=1).update(
      jac, mtjax.dwa(num_tasks=2, steps_per_epoch=1).init(params), params, task_losses=losses[:2]
    )


def test_fit_without_similarity_tracking_trains_the_same():
  ds = mtjax.data.conflicting_tasks(num_samples=512, seed=0)
  model = mtjax.models.MMoE(num_tasks=3, num_experts=2, expert=(8,), tower=(4, 1), features=ds.spec)
  tx = optax.chain(mtjax.uncertainty(num_tasks=3), optax.adam(1e-2))
  kw = dict(steps=5, batch_size=64, seed=1, progress=False, log_every=1)
  tracked = mtjax.training.fit(model, tx, ds, **kw)
  deferred = mtjax.training.fit(model, tx, ds, track_similarity=False, **kw)
  np.testing.assert_allclose(
    [r["losses"] for r in deferred.history], [r["losses"] for r in tracked.history], rtol=1e-5, atol=1e-6
  )
  assert "cosine" in tracked.history[0] and "cosine" not in deferred.history[0]
