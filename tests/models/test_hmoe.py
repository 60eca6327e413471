"""HMoE (Li et al., CIKM 2020): a NumPy float64 forward, the task-constrained back-propagation
(scenario d's loss reaches tower d only) and its ablation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mtjax
from mtjax import losses
from mtjax import models


def _np_forward(p, x, t_count, e_count):
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), p)
  x = np.asarray(x, np.float64)
  relu = lambda v: np.maximum(v, 0)  # noqa: E731

  def softmax(z):
    z = z - z.max(-1, keepdims=True)
    return np.exp(z) / np.exp(z).sum(-1, keepdims=True)

  ex = np.stack(
    [relu(x @ p["experts"][f"expert_{e}"]["Dense_0"]["kernel"] + p["experts"][f"expert_{e}"]["Dense_0"]["bias"])
     for e in range(e_count)]
  )  # fmt: skip
  implicit = []
  for t in range(t_count):
    g = softmax(x @ p[f"gate_{t}"]["logits"]["kernel"])
    mixed = np.einsum("be,ebh->bh", g, ex)
    implicit.append((mixed @ p[f"tower_{t}"]["Dense_0"]["kernel"] + p[f"tower_{t}"]["Dense_0"]["bias"])[:, 0])
  implicit = np.stack(implicit)
  out = [np.sum(softmax(x @ p[f"stack_{d}"]["kernel"]) * implicit.T, -1) for d in range(t_count)]
  return np.stack(out), implicit


def test_matches_numpy_float64():
  with jax.enable_x64(True):
    model = models.HMoE(num_tasks=3, num_experts=2, expert=(5,), tower=(1,))
    x = jnp.asarray(np.random.default_rng(0).normal(size=(4, 3)))
    shapes = jax.eval_shape(model.init, jax.random.key(0), x)["params"]
    rng = np.random.default_rng(1)
    params = jax.tree.map(lambda a: jnp.asarray(rng.normal(0, 0.6, a.shape), jnp.float64), shapes)
    out, aux = model.apply({"params": params}, x)
    want, implicit = _np_forward(params, x, 3, 2)
    np.testing.assert_allclose(out, want, rtol=1e-12)
    np.testing.assert_allclose(aux["implicit"], implicit, rtol=1e-12)
    np.testing.assert_allclose(np.sum(aux["stack_weights"], -1), 1.0, rtol=1e-12)


@pytest.mark.parametrize("constrained", [True, False])
def test_task_constrained_back_propagation(constrained):
  model = models.HMoE(num_tasks=3, num_experts=2, expert=(5,), tower=(1,), task_constrained=constrained)
  x = jnp.asarray(np.random.default_rng(2).normal(size=(6, 3)), jnp.float32)
  params = model.init(jax.random.key(0), x)["params"]
  g = jax.grad(lambda p: model.apply({"params": p}, x)[0][0].sum())(params)  # scenario 0's output

  def norm(tree):
    return float(sum(jnp.abs(v).sum() for v in jax.tree.leaves(tree)))

  assert norm(g["tower_0"]) > 0 and norm(g["stack_0"]) > 0 and norm(g["stack_1"]) == 0
  assert (norm(g["tower_1"]) == 0) == constrained  # the other scenarios' towers: only without the constraint
  np.testing.assert_allclose(  # the constraint changes gradients, never values
    model.apply({"params": params}, x)[0], model.clone(task_constrained=not constrained).apply({"params": params}, x)[0]
  )
  mask = models.partition(model)(params)
  assert not mask["stack_1"]["kernel"] and mask["experts"]["expert_0"]["Dense_0"]["kernel"]
  assert (not mask["tower_1"]["Dense_0"]["kernel"]) == constrained
  labels = jnp.asarray(np.random.default_rng(3).random((3, 6)) < 0.5, jnp.float32)
  loss = losses.make_loss_fn(model, "bce", has_aux=False)
  measured = mtjax.infer_shared(loss, params, {"x": x, "labels": labels})
  assert jax.tree.leaves(measured) == jax.tree.leaves(mask)
