"""mtjax.micro_batch_task_grads: splitting the batch equals computing per slice by hand; clear errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mtjax


def loss_fn(params, batch):
  z = jnp.tanh(batch["x"] @ params["w"])
  return jnp.stack(
    [jnp.mean((z[:, 0] - batch["y"][:, 0]) ** 2), jnp.mean(z[:, 1] * batch["y"][:, 1]) + jnp.sum(params["b"] ** 2)]
  )


def aux_loss_fn(params, batch):
  losses = loss_fn(params, batch)
  return losses, {"n": jnp.sum(batch["x"])}


def setup(n=6):
  rng = np.random.default_rng(0)
  params = {
    "w": jnp.asarray(rng.normal(size=(3, 2)), jnp.float32),
    "b": jnp.asarray(rng.normal(size=(2,)), jnp.float32),
  }
  batch = {
    "x": jnp.asarray(rng.normal(size=(n, 3)), jnp.float32),
    "y": jnp.asarray(rng.normal(size=(n, 2)), jnp.float32),
  }
  return params, batch


def slice_batch(batch, m, size, axis=0):
  return jax.tree.map(lambda x: jax.lax.slice_in_dim(x, m * size, (m + 1) * size, axis=axis), batch)


def test_equals_per_slice_by_hand():
  params, batch = setup()
  fn = jax.jit(mtjax.micro_batch_task_grads(mtjax.task_grads(loss_fn), 3))
  losses, grads = fn(params, batch)
  assert losses.shape == (3, 2) and grads["w"].shape == (3, 2, 3, 2) and grads["b"].shape == (3, 2, 2)
  ref_fn = jax.jit(mtjax.task_grads(loss_fn))  # one compile for the three slices
  for m in range(3):
    ref_l, ref_g = ref_fn(params, slice_batch(batch, m, 2))
    np.testing.assert_allclose(losses[m], ref_l, rtol=1e-6)
    for k in ("w", "b"):
      np.testing.assert_allclose(grads[k][m], ref_g[k], rtol=1e-5, atol=1e-7)
  # One micro-batch: the plain result with a leading axis of 1.
  l1, g1 = jax.jit(mtjax.micro_batch_task_grads(mtjax.task_grads(loss_fn), 1))(params, batch)
  l0, g0 = jax.jit(mtjax.task_grads(loss_fn))(params, batch)
  np.testing.assert_allclose(l1[0], l0, rtol=1e-6)
  np.testing.assert_allclose(g1["w"][0], g0["w"], rtol=1e-5, atol=1e-7)


def test_has_aux_and_multi_input():
  params, batch = setup()
  (losses, aux), grads = jax.jit(mtjax.micro_batch_task_grads(mtjax.task_grads(aux_loss_fn, has_aux=True), 2))(
    params, batch
  )
  assert losses.shape == (2, 2) and aux["n"].shape == (2,) and grads["w"].shape == (2, 2, 3, 2)
  np.testing.assert_allclose(aux["n"][1], jnp.sum(batch["x"][3:]), rtol=1e-6)

  def one_task(p, b):  # the loss of one task on its own batch [B, ...]
    return jnp.mean((jnp.tanh(b["x"] @ p["w"])[:, 0] - b["y"]) ** 2)

  task_batches = {"x": jnp.stack([batch["x"], -batch["x"]]), "y": jnp.stack([batch["y"][:, 0], batch["y"][:, 1]])}
  losses, grads = mtjax.micro_batch_task_grads(mtjax.multi_input_task_grads(one_task), 3, axis=1)(params, task_batches)
  assert losses.shape == (3, 2) and grads["w"].shape == (3, 2, 3, 2)
  ref_l, ref_g = mtjax.multi_input_task_grads(one_task)(params, slice_batch(task_batches, 1, 2, axis=1))
  np.testing.assert_allclose(losses[1], ref_l, rtol=1e-6)
  np.testing.assert_allclose(grads["w"][1], ref_g["w"], rtol=1e-5, atol=1e-7)


def test_errors():
  params, batch = setup()
  with pytest.raises(ValueError, match=r"mtjax: micro_batch_task_grads: leaf .*'x'.* batch size 6 .*4 equal"):
    mtjax.micro_batch_task_grads(mtjax.task_grads(loss_fn), 4)(params, batch)
  for bad in (0, -1, 1.5, True):
    with pytest.raises(ValueError, match="num_micro_batches must be a positive int"):
      mtjax.micro_batch_task_grads(mtjax.task_grads(loss_fn), bad)
  with pytest.raises(ValueError, match="lazy Jacobian"):
    mtjax.micro_batch_task_grads(mtjax.task_grads(loss_fn, deferred=True), 2)(params, batch)
  with pytest.raises(ValueError, match="batch_argnums=3 but only 2 positional"):
    mtjax.micro_batch_task_grads(mtjax.task_grads(loss_fn), 2, batch_argnums=3)(params, batch)
  with pytest.raises(ValueError, match="no batch axis 0"):
    mtjax.micro_batch_task_grads(mtjax.task_grads(lambda p, b, s: loss_fn(p, b) * s), 2, batch_argnums=2)(
      params, batch, jnp.float32(2.0)
    )


def test_sparse_rows_are_rejected():
  rng = np.random.default_rng(1)
  params = {"emb": jnp.asarray(rng.normal(size=(5, 2)), jnp.float32)}
  ids = jnp.array([0, 1, 2, 3])

  def emb_loss(p, i):
    e = mtjax.embedding_lookup(p["emb"], i)
    return jnp.stack([jnp.sum(e[:, 0] ** 2), jnp.sum(e[:, 1])])

  with pytest.raises(ValueError, match=r"sparse=False"):
    mtjax.micro_batch_task_grads(mtjax.task_grads(emb_loss), 2)(params, ids)
  _, grads = mtjax.micro_batch_task_grads(mtjax.task_grads(emb_loss, sparse=False), 2)(params, ids)
  assert grads["emb"].shape == (2, 2, 5, 2)
