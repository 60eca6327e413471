"""task_grads: every strategy equals a NumPy float64 Jacobian; bad loss functions raise clearly."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mtjax

STRATEGIES = ["loop", "map", "vmap", "auto"]


def _model(params, x):
  h = jnp.tanh(x @ params["w1"] + params["b1"][None, :])
  return h @ params["w2"]  # [B, T]


def _loss_fn(params, batch):
  out = _model(params, batch["x"])
  return jnp.mean((out - batch["y"]) ** 2, axis=0)  # [T]


def _numpy_task_grads(params, batch):
  """Plain NumPy float64 reference: analytic per-task gradients, looping over tasks."""
  w1, b1, w2 = (np.asarray(params[k], np.float64) for k in ("w1", "b1", "w2"))
  x, y = np.asarray(batch["x"], np.float64), np.asarray(batch["y"], np.float64)
  n = x.shape[0]
  pre = x @ w1 + b1
  h = np.tanh(pre)
  out = h @ w2
  losses, gw1, gb1, gw2 = [], [], [], []
  for t in range(w2.shape[1]):
    r = out[:, t] - y[:, t]
    losses.append(np.mean(r**2))
    dout = 2 * r / n  # [B]
    g_w2 = np.zeros_like(w2)
    g_w2[:, t] = h.T @ dout
    dh = np.outer(dout, w2[:, t]) * (1 - h**2)
    gw1.append(x.T @ dh)
    gb1.append(dh.sum(0))
    gw2.append(g_w2)
  return np.array(losses), {"w1": np.stack(gw1), "b1": np.stack(gb1), "w2": np.stack(gw2)}


def _problem(num_tasks, seed=0, dtype=jnp.float32):
  rng = np.random.default_rng(seed)
  params = {"w1": rng.normal(size=(5, 7)), "b1": rng.normal(size=(7,)), "w2": rng.normal(size=(7, num_tasks))}
  batch = {"x": rng.normal(size=(16, 5)), "y": rng.normal(size=(16, num_tasks))}
  cast = lambda t: jax.tree.map(lambda a: jnp.asarray(a, dtype), t)
  return cast(params), cast(batch)


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("num_tasks", [1, 3, 6])
def test_matches_numpy_reference(strategy, num_tasks):
  params, batch = _problem(num_tasks, seed=num_tasks)
  losses, grads = jax.jit(mtjax.task_grads(_loss_fn, strategy=strategy))(params, batch)
  ref_losses, ref_grads = _numpy_task_grads(params, batch)
  np.testing.assert_allclose(losses, ref_losses, rtol=1e-5, atol=1e-5)
  for k in ref_grads:
    assert grads[k].shape == (num_tasks,) + params[k].shape
    np.testing.assert_allclose(grads[k], ref_grads[k], rtol=1e-4, atol=1e-5)


def test_float64_strategies_agree():
  with jax.enable_x64(True):
    params, batch = _problem(4, seed=1, dtype=jnp.float64)
    ref_losses, ref_grads = _numpy_task_grads(params, batch)
    for strategy in STRATEGIES:
      losses, grads = mtjax.task_grads(_loss_fn, strategy=strategy)(params, batch)
      assert grads["w1"].dtype == jnp.float64
      np.testing.assert_allclose(losses, ref_losses, rtol=1e-12)
      for k in ref_grads:
        np.testing.assert_allclose(grads[k], ref_grads[k], rtol=1e-10, atol=1e-12)


def test_has_aux_and_argnums():
  params, batch = _problem(2)

  def loss_aux(batch, params):
    losses = _loss_fn(params, batch)
    return losses, {"sum": losses.sum()}

  (losses, aux), grads = mtjax.task_grads(loss_aux, has_aux=True, argnums=1)(batch, params)
  ref_losses, ref_grads = _numpy_task_grads(params, batch)
  np.testing.assert_allclose(aux["sum"], ref_losses.sum(), rtol=1e-5)
  np.testing.assert_allclose(grads["w2"], ref_grads["w2"], rtol=1e-4, atol=1e-5)


def test_sum_of_task_grads_is_grad_of_sum():
  params, batch = _problem(3)
  _, grads = mtjax.task_grads(_loss_fn)(params, batch)
  total = jax.grad(lambda p: _loss_fn(p, batch).sum())(params)
  for k in total:
    np.testing.assert_allclose(grads[k].sum(0), total[k], rtol=1e-4, atol=1e-5)


def test_multi_input_task_grads():
  params, _ = _problem(1)
  rng = np.random.default_rng(3)
  num_tasks = 3
  xs = jnp.asarray(rng.normal(size=(num_tasks, 8, 5)), jnp.float32)
  ys = jnp.asarray(rng.normal(size=(num_tasks, 8, 1)), jnp.float32)

  def task_loss(p, b):
    return _loss_fn(p, b)[0]

  losses, grads = mtjax.multi_input_task_grads(task_loss)(params, {"x": xs, "y": ys})
  assert losses.shape == (num_tasks,)
  for t in range(num_tasks):
    ref_l, ref_g = _numpy_task_grads(params, {"x": xs[t], "y": ys[t]})
    np.testing.assert_allclose(losses[t], ref_l[0], rtol=1e-5)
    for k in ref_g:
      np.testing.assert_allclose(grads[k][t], ref_g[k][0], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
  "bad, match",
  [
    (lambda p, b: _loss_fn(p, b).sum(), "1-D vector"),
    (lambda p, b: jnp.stack([_loss_fn(p, b)] * 2), "1-D vector"),
    (lambda p, b: _loss_fn(p, b)[:0], "empty"),
    (lambda p, b: (_loss_fn(p, b), {"aux": 1.0}), "returned a tuple.*has_aux=True"),
  ],
)
def test_bad_loss_fn_raises(bad, match):
  params, batch = _problem(2)
  with pytest.raises(ValueError, match=match):
    mtjax.task_grads(bad)(params, batch)
  with pytest.raises(ValueError, match=match):
    jax.jit(mtjax.task_grads(bad))(params, batch)


def test_bad_strategy_and_aux():
  with pytest.raises(ValueError, match="strategy"):
    mtjax.task_grads(_loss_fn, strategy="jacrev")
  params, batch = _problem(2)
  with pytest.raises(ValueError, match="has_aux"):
    mtjax.task_grads(_loss_fn, has_aux=True)(params, batch)


def test_multi_input_bad_inputs():
  params, _ = _problem(1)
  with pytest.raises(ValueError, match="same leading task axis"):
    mtjax.multi_input_task_grads(lambda p, b: _loss_fn(p, b)[0])(
      params, {"x": jnp.ones((2, 4, 5)), "y": jnp.ones((3, 4, 1))}
    )
  with pytest.raises(ValueError, match="scalar loss"):
    mtjax.multi_input_task_grads(_loss_fn)(params, {"x": jnp.ones((2, 4, 5)), "y": jnp.ones((2, 4, 1))})


def test_auto_resolves_per_backend():
  assert mtjax.default_strategy("cpu") == "map"
  assert mtjax.default_strategy("gpu") == "vmap"
