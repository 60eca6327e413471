"""The default rows from per-task backward passes that skip the other tasks' heads (task_grads._task_vjps).

With cotangent e_t a VJP runs backward through every task's head (zeros XLA cannot skip: O(T^2) head
passes). When the loss's task losses are separable (it ends in jnp.stack of per-task scalars and reads
the model's stacked outputs by index; or it computes its [T] losses from the stacked outputs position-wise
along the task axis), task_grads linearizes once and transposes each task's loss alone; the rows are the
same (float64, 1e-12), and a task's backward pass reads only its own head. Losses that mix the tasks'
rows keep the e_t rows.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import mtjax
import mtjax._src.task_grads as tg_lib
from mtjax import losses
from mtjax import models

_SPEC = models.FeatureSpec(
  categorical=(models.Categorical("user", 50, 4), models.Categorical("item", 30, 4)), dense=(models.Dense("n"),)
)


def _model(name, num_tasks):
  kinds = {
    "mmoe": lambda: models.MMoE(num_tasks=num_tasks, num_experts=3, expert=(6,), tower=(4, 1), features=_SPEC),
    "shared_bottom": lambda: models.SharedBottom(num_tasks=num_tasks, bottom=(6,), tower=(4, 1), features=_SPEC),
    "ple": lambda: models.PLE(
      num_tasks=num_tasks,
      num_levels=2,
      num_shared_experts=1,
      num_specific_experts=1,
      expert=(6,),
      tower=(4, 1),
      features=_SPEC,
    ),
  }
  return kinds[name]()


def _setup(name, num_tasks, dtype=jnp.float32):
  rng = np.random.default_rng(0)
  b = 16
  x = {
    "user": jnp.asarray(rng.integers(-2, 52, size=b), jnp.int32),  # out-of-vocabulary ids too
    "item": jnp.asarray(np.r_[np.full(8, 3), rng.integers(0, 30, size=8)], jnp.int32),  # repeated ids
    "n": jnp.asarray(rng.normal(size=(b, 1)), dtype),
  }
  model = _model(name, num_tasks)
  params = model.init(jax.random.PRNGKey(1), x)["params"]
  params = jax.tree.map(lambda a: a.astype(dtype), params)
  batch = {"x": x, "labels": jnp.asarray(rng.integers(0, 2, size=(num_tasks, b)), dtype)}
  return losses.make_loss_fn(model, "bce"), params, batch


def _rows(loss_fn, params, batch, *, per_task, **kw):
  old = tg_lib._TASK_VJPS.min_tasks
  tg_lib._TASK_VJPS.min_tasks = old if per_task else 10**6
  try:
    seen = {}

    def f(p, bt):
      (_, _), jac = mtjax.task_grads(loss_fn, has_aux=True, deferred=True, **kw)(p, bt)
      seen["per_task"] = jac.task_vjps is not None
      return mtjax.densify(jac.materialize())

    return jax.jit(f)(params, batch), seen["per_task"]
  finally:
    tg_lib._TASK_VJPS.min_tasks = old


@pytest.mark.parametrize("name", ["mmoe", "shared_bottom", "ple"])
def test_per_task_rows_equal_the_e_t_rows(name):
  with jax.enable_x64(True):
    loss_fn, params, batch = _setup(name, 4, jnp.float64)
    got, used = _rows(loss_fn, params, batch, per_task=True)
    want, plain = _rows(loss_fn, params, batch, per_task=False)
  assert used and not plain
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14)
  # a task's row of another task's tower is exactly zero, and its own is not
  for t in range(4):
    tower = got[f"tower_{t}"]
    leaves = jax.tree.leaves(tower)
    assert all(np.all(np.asarray(x)[[s for s in range(4) if s != t]] == 0) for x in leaves)
    assert any(np.any(np.asarray(x)[t] != 0) for x in leaves)


def test_methods_and_masks_give_the_same_updates():
  """PCGrad with a shared= mask, GradVac with layer groups, MGDA, GradNorm (deferred Jacobian): same updates."""
  loss_fn, params, batch = _setup("mmoe", 5)
  shared = models.partition(models.MMoE(num_tasks=5, num_experts=3, expert=(6,), tower=(4, 1)))(params)

  def update(per_task):
    old = tg_lib._TASK_VJPS.min_tasks
    tg_lib._TASK_VJPS.min_tasks = old if per_task else 10**6
    try:
      out = []
      for tx in (
        mtjax.pcgrad(num_tasks=5, key=0, shared=shared),
        mtjax.gradvac(num_tasks=5, key=0, granularity="layer"),
        mtjax.mgda(num_tasks=5),
        mtjax.gradnorm(num_tasks=5),
      ):

        def f(p, bt, tx=tx):
          (task_losses, _), jac = mtjax.task_grads(loss_fn, has_aux=True, deferred=True)(p, bt)
          return tx.update(jac, tx.init(p), p, task_losses=task_losses)[0]

        out.append(jax.jit(f)(params, batch))
      return out
    finally:
      tg_lib._TASK_VJPS.min_tasks = old

  for a, b in zip(jax.tree.leaves(update(True)), jax.tree.leaves(update(False))):
    np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-7)


def _dot_counts(loss_fn, params, batch, num_tasks, task, dtype=jnp.float32):
  """``dot_general`` counts in the jaxprs of task ``task``'s per-task backward pass and of its e_t VJP."""
  counts = {}

  def f(p, bt):
    (_, _), jac = mtjax.task_grads(loss_fn, has_aux=True, deferred=True)(p, bt)
    count = lambda fn: str(jax.make_jaxpr(fn)()).count("dot_general")
    counts["task"] = count(lambda: jac.task_vjps[task](jnp.ones((), dtype)))
    counts["e_t"] = count(lambda: jac.vjp_fn(jnp.eye(num_tasks, dtype=dtype)[task]))
    return 0.0

  jax.eval_shape(f, params, batch)
  return counts


def test_a_task_backward_pass_skips_the_other_heads():
  """The jaxpr of task t's backward pass has one tower's matrix products, the e_t VJP's has every tower's."""
  loss_fn, params, batch = _setup("mmoe", 6)
  counts = _dot_counts(loss_fn, params, batch, 6, 2)
  # per tower layer and task: 2 products backward (kernel, input) x 2 layers; 6 towers vs 1
  assert counts["e_t"] - counts["task"] >= 5 * 4, counts


def test_when_the_per_task_passes_are_not_used():
  loss_fn, params, batch = _setup("mmoe", 4)
  assert not _rows(loss_fn, params, batch, per_task=True, chunk_size=2)[1]  # chunked rows
  assert not _rows(loss_fn, params, batch, per_task=True, strategy="vmap")[1]
  loss2, params2, batch2 = _setup("mmoe", 2)
  assert not _rows(loss2, params2, batch2, per_task=True)[1]  # T = 2: below the range

  # a loss that does not end in a stack of per-task scalars: the plain rows, same values
  def mean_loss(p, bt):
    task_losses, aux = loss_fn(p, bt)
    return jnp.mean(jnp.stack([task_losses, task_losses]), axis=0), aux

  got, used = _rows(mean_loss, params, batch, per_task=True)
  want, _ = _rows(loss_fn, params, batch, per_task=False)
  assert not used
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-8)


def _vectorized(name, num_tasks, dtype, tail):
  """A hand-written vectorized loss: the model's stacked ``[T, B]`` logits, then ``tail(logits, labels, p)``."""
  _, params, batch = _setup(name, num_tasks, dtype)
  net = _model(name, num_tasks)

  def loss_fn(p, bt):
    logits, aux = net.apply({"params": p}, bt["x"])
    return tail(logits, bt["labels"], p), aux

  return loss_fn, params, batch


def _bce(logits, labels, p):
  del p
  return jnp.mean(optax.sigmoid_binary_cross_entropy(logits, labels), axis=1)


def _bce_masked_weighted_plus_l2(logits, labels, p):
  """Position-wise terms of several kinds: a mask, a transpose, per-task weights, an l2 term of every task."""
  mask = (jnp.arange(labels.shape[1]) % 3 != 0).astype(logits.dtype)
  per = optax.sigmoid_binary_cross_entropy(logits.T, labels.T).T * mask[None, :]
  trunk = [v for k, v in p.items() if not k.startswith("tower")]  # every task's gradient has this term
  l2 = sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(trunk))
  scale = jnp.linspace(1.0, 2.0, logits.shape[0], dtype=logits.dtype)
  return scale * jnp.sum(per, axis=-1) / jnp.sum(mask) + 1e-3 * l2


@pytest.mark.parametrize(
  "name,tail", [("mmoe", _bce), ("shared_bottom", _bce_masked_weighted_plus_l2), ("mmoe", _bce_masked_weighted_plus_l2)]
)
def test_vectorized_losses_use_the_per_task_passes(name, tail):
  """``jnp.mean(bce(logits, y), axis=1)`` on the stacked logits: row t of the stack is all that l_t reads,
  so task t's backward pass runs from l_t alone; the rows are the e_t rows and jax.jacrev's (float64)."""
  with jax.enable_x64(True):
    loss_fn, params, batch = _vectorized(name, 4, jnp.float64, tail)
    got, used = _rows(loss_fn, params, batch, per_task=True)
    want, plain = _rows(loss_fn, params, batch, per_task=False)
    exact = jax.jacrev(lambda p: loss_fn(p, batch)[0])(params)
  assert used and not plain
  for a, b, c in zip(jax.tree.leaves(got), jax.tree.leaves(want), jax.tree.leaves(exact)):
    np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(a, c, rtol=1e-10, atol=1e-13)
  if name == "mmoe":  # task t's pass holds one tower's products, not every tower's
    with jax.enable_x64(True):
      counts = _dot_counts(loss_fn, params, batch, 4, 1, jnp.float64)
    assert counts["e_t"] - counts["task"] >= 3 * 4, counts


def _mixes_tasks_softmax(logits, labels, p):
  del p
  return -jnp.mean(labels * jax.nn.log_softmax(logits, axis=0), axis=1)


def _mixes_tasks_matmul(logits, labels, p):
  del p
  mix = jnp.eye(logits.shape[0], dtype=logits.dtype) + 0.5
  return jnp.mean(optax.sigmoid_binary_cross_entropy(mix @ logits, labels), axis=1)


def _mixes_tasks_reversed(logits, labels, p):
  del p
  return jnp.mean(optax.sigmoid_binary_cross_entropy(logits[::-1], labels), axis=1)


def _mixes_tasks_total(logits, labels, p):
  del p
  per = jnp.mean(optax.sigmoid_binary_cross_entropy(logits, labels), axis=1)
  return per + 0.1 * jnp.mean(logits)  # a term that reads every task's row


@pytest.mark.parametrize("tail", [_mixes_tasks_softmax, _mixes_tasks_matmul, _mixes_tasks_reversed, _mixes_tasks_total])
def test_vectorized_losses_that_mix_tasks_keep_the_e_t_rows(tail):
  """A loss whose l_t reads other tasks' rows of the stack (a softmax over tasks, a task-mixing matrix, a
  reversed task order, a term of every row) is not row-local: the e_t rows, exact."""
  with jax.enable_x64(True):
    loss_fn, params, batch = _vectorized("mmoe", 4, jnp.float64, tail)
    got, used = _rows(loss_fn, params, batch, per_task=True)
    exact = jax.jacrev(lambda p: loss_fn(p, batch)[0])(params)
  assert not used
  for a, c in zip(jax.tree.leaves(got), jax.tree.leaves(exact)):
    np.testing.assert_allclose(a, c, rtol=1e-10, atol=1e-13)
