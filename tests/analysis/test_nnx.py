"""Flax NNX models: leaf names without the Variable's ``value`` step, training and gradient analysis."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn
from flax import nnx

import mtjax
from mtjax import analysis
from mtjax._src import tree as tree_lib

NUM_TASKS = 3


class NnxMultiTask(nnx.Module):
  """Shared trunk (two Linear layers) and one Linear head per task."""

  def __init__(self, num_tasks: int, rngs: nnx.Rngs):
    self.trunk = nnx.Linear(6, 16, rngs=rngs)
    self.hidden = nnx.Linear(16, 8, rngs=rngs)
    self.heads = nnx.List([nnx.Linear(8, 1, rngs=rngs) for _ in range(num_tasks)])

  def __call__(self, x):
    h = nnx.relu(self.hidden(nnx.relu(self.trunk(x))))
    return jnp.concatenate([head(h) for head in self.heads], axis=-1)


class LinenMultiTask(nn.Module):
  """The linen equivalent: the same layers (``head_i`` here, ``heads/i`` in the NNX state)."""

  num_tasks: int

  @nn.compact
  def __call__(self, x):
    h = nn.relu(nn.Dense(16, name="trunk")(x))
    h = nn.relu(nn.Dense(8, name="hidden")(h))
    return jnp.concatenate([nn.Dense(1, name=f"head_{i}")(h) for i in range(self.num_tasks)], axis=-1)


def _data(n=96, seed=0):
  x = jax.random.normal(jax.random.PRNGKey(seed), (n, 6))
  y = jnp.stack([x[:, 0] + x[:, 1], -x[:, 0] + 0.5 * x[:, 2], jnp.sin(x[:, 3])], axis=1)[:, :NUM_TASKS]
  return {"x": x, "y": y}


def _nnx_loss(graphdef):
  def loss_fn(params, batch):  # -> [T]: one loss per task, over the pure state
    preds = nnx.merge(graphdef, params)(batch["x"])
    return jnp.mean((preds - batch["y"]) ** 2, axis=0)

  return loss_fn


LAYERS = ["heads/0", "heads/1", "heads/2", "hidden", "trunk"]


def test_nnx_leaf_paths_have_no_value_step():
  model = NnxMultiTask(NUM_TASKS, nnx.Rngs(0))
  raw = [p for p, _ in jax.tree_util.tree_flatten_with_path(nnx.split(model)[1])[0]]
  assert all(isinstance(p[-1], jax.tree_util.GetAttrKey) and p[-1].name == "value" for p in raw)  # what flax gives
  split_paths = tree_lib.leaf_paths(nnx.split(model)[1])
  param_paths = tree_lib.leaf_paths(nnx.state(model, nnx.Param))
  pure_paths = tree_lib.leaf_paths(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
  assert split_paths == param_paths == pure_paths
  assert "trunk/kernel" in split_paths and "heads/0/bias" in split_paths
  assert not any(p.endswith("value") for p in split_paths)
  # shared= masks built from path patterns see the same names: an anchored pattern matches the kernels.
  mask = mtjax.shared_mask(include=r"kernel$", exclude=r"^heads/")(nnx.state(model, nnx.Param))
  assert [p for p, m in zip(split_paths, jax.tree.leaves(mask)) if m] == ["hidden/kernel", "trunk/kernel"]
  # and errors name the leaf without the value step.
  grads = jax.tree.map(lambda p: p[0] if p.ndim == 2 else jnp.zeros(()), nnx.split(model)[1])
  with pytest.raises(ValueError, match=r"mtjax: leaf 'heads/0/bias' of task_grads is a scalar"):
    tree_lib.check_task_axis(grads)


def test_nnx_and_linen_give_the_same_layer_groups_and_cosines():
  batch = _data()
  model = NnxMultiTask(NUM_TASKS, nnx.Rngs(1))
  graphdef, params = nnx.split(model)
  pure = nnx.to_pure_dict(params)
  linen_params = {
    "trunk": pure["trunk"],
    "hidden": pure["hidden"],
    **{f"head_{i}": pure["heads"][i] for i in range(NUM_TASKS)},
  }
  linen = LinenMultiTask(NUM_TASKS)
  assert jax.tree.structure(linen.init(jax.random.PRNGKey(0), batch["x"])["params"]) == jax.tree.structure(linen_params)

  def linen_loss(p, b):
    return jnp.mean((linen.apply({"params": p}, b["x"]) - b["y"]) ** 2, axis=0)

  nnx_losses, nnx_grads = mtjax.task_grads(_nnx_loss(graphdef))(params, batch)
  linen_losses, linen_grads = mtjax.task_grads(linen_loss)(linen_params, batch)
  np.testing.assert_allclose(nnx_losses, linen_losses, rtol=1e-6)

  nnx_names = analysis.group_names(nnx_grads, granularity="layer")
  linen_names = analysis.group_names(linen_grads, granularity="layer")
  assert nnx_names == LAYERS
  assert linen_names == ["head_0", "head_1", "head_2", "hidden", "trunk"]
  assert len(nnx_names) == len(linen_names) == 5  # kernel and bias of a layer are one group, as in linen
  nnx_cos = analysis.cosine_similarity(nnx_grads, granularity="layer")
  linen_cos = analysis.cosine_similarity(linen_grads, granularity="layer")
  assert nnx_cos.shape == linen_cos.shape == (5, NUM_TASKS, NUM_TASKS)
  np.testing.assert_allclose(nnx_cos, linen_cos, atol=1e-5)
  shared = mtjax.shared_mask(exclude="head")
  assert analysis.group_names(nnx_grads, granularity="layer", shared=shared) == ["hidden", "trunk"]
  assert analysis.group_names(linen_grads, granularity="layer", shared=shared) == ["hidden", "trunk"]
  np.testing.assert_allclose(
    analysis.cosine_similarity(nnx_grads, granularity="layer", shared=shared),
    analysis.cosine_similarity(linen_grads, granularity="layer", shared=shared),
    atol=1e-5,
  )


def test_train_nnx_multitask_with_pcgrad_and_track():
  batch = _data(seed=2)
  model = NnxMultiTask(NUM_TASKS, nnx.Rngs(2))
  graphdef, params = nnx.split(model)
  loss_fn = _nnx_loss(graphdef)
  shared = mtjax.shared_mask(exclude="heads")
  tx = optax.chain(mtjax.pcgrad(key=0, num_tasks=NUM_TASKS, shared=shared), optax.adam(1e-2))
  opt_state = tx.init(params)

  @jax.jit
  def step(params, opt_state, batch):
    losses, grads = mtjax.task_grads(loss_fn)(params, batch)
    updates, opt_state = tx.update(grads, opt_state, params, task_losses=losses)
    stats = analysis.track(grads, granularity="layer", shared=shared)
    return optax.apply_updates(params, updates), opt_state, losses, stats, grads

  hist = analysis.SimilarityHistory()
  first = None
  for i in range(25):
    params, opt_state, losses, stats, grads = step(params, opt_state, batch)
    first = losses if first is None else first
    hist.append(i, stats)
  assert type(params) is type(nnx.split(model)[1])  # still an NNX state: nnx.merge rebuilds the model
  final = loss_fn(params, batch)
  assert float(jnp.sum(final)) < 0.5 * float(jnp.sum(first)), (first, final)
  assert np.all(np.asarray(final) < np.asarray(first))

  names = analysis.group_names(grads, granularity="layer", shared=shared)
  assert names == ["hidden", "trunk"]
  assert hist.steps == list(range(25))
  assert hist.array("cosine_groups").shape == (25, len(names), NUM_TASKS, NUM_TASKS)
  assert hist.array("conflict_groups").shape == (25, len(names))
  assert hist.pair_series(0, 1).shape == (25,)
  # the last in-step record equals the offline numbers on the same gradients
  np.testing.assert_allclose(
    hist.records[-1]["cosine_groups"], analysis.cosine_similarity(grads, granularity="layer", shared=shared), atol=1e-5
  )
  np.testing.assert_allclose(np.diagonal(hist.array("cosine"), axis1=-2, axis2=-1), 1.0, atol=1e-5)
  # a per-leaf callable: one group for the trunk, one for the heads
  by_part = lambda path: "heads" if path.startswith("heads/") else "trunk"
  assert analysis.group_names(grads, granularity=by_part) == ["heads", "trunk"]
  assert analysis.track(grads, granularity=by_part)["cosine_groups"].shape == (2, NUM_TASKS, NUM_TASKS)


def test_nnx_optimizer_with_task_grads():
  batch = _data(seed=3)
  model = NnxMultiTask(NUM_TASKS, nnx.Rngs(3))
  tx = optax.chain(
    mtjax.pcgrad(key=0, num_tasks=NUM_TASKS, shared=mtjax.shared_mask(exclude="heads")), optax.adam(1e-2)
  )
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

  @nnx.jit
  def step(model, optimizer, batch):
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss_fn(params):
      preds = nnx.merge(graphdef, params, rest)(batch["x"])
      return jnp.mean((preds - batch["y"]) ** 2, axis=0)

    losses, grads = mtjax.task_grads(loss_fn)(params)
    optimizer.update(model, grads, task_losses=losses)
    return losses, analysis.track(grads, granularity="layer")

  first = None
  for _ in range(20):
    losses, stats = step(model, optimizer, batch)
    first = losses if first is None else first
  assert int(optimizer.step[...]) == 20
  assert float(jnp.sum(losses)) < 0.7 * float(jnp.sum(first)), (first, losses)
  assert stats["cosine_groups"].shape == (len(LAYERS), NUM_TASKS, NUM_TASKS)
  _, params = nnx.split(model, nnx.Param)
  assert analysis.group_names(jax.tree.map(lambda p: p[None], params), granularity="layer") == LAYERS
