"""Shared input handling of the methods that take several independent micro-batches (MoDo, SDMGrad).

Their ``update`` takes per-task gradients with a leading micro-batch axis, every leaf
``[M, T, *param.shape]`` (from :func:`mtjax.micro_batch_task_grads`), and needs the CROSS Gram
matrices :math:`J_a J_b^\\top` of the shared leaves between two micro-batches.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mtjax._src import composition
from mtjax._src import numerics
from mtjax._src import rows as rows_lib
from mtjax._src import tree as tree_lib
from mtjax._src.sparse import SparseRows
from mtjax._src.sparse import is_sparse
from mtjax._src.task_grads import is_lazy

PyTree = Any


class MicroBatchInputs(NamedTuple):
  leaves: list  # [M, T, *shape] per leaf (flattening order)
  treedef: Any
  paths: list
  mask: list  # shared flag per leaf
  num_tasks: int
  checks: tuple  # pending numerics checks (losses, gradients)


def how_to(num_batches: int) -> str:
  return (
    f"compute them with mtjax.micro_batch_task_grads(mtjax.task_grads(loss_fn, sparse=False), {num_batches})"
    f"(params, batch), which splits the batch into {num_batches} independent micro-batches (in "
    f"mtjax.training.fit / make_train_step: micro_batches={num_batches})"
  )


def check_inputs(
  updates: PyTree,
  params: Optional[PyTree],
  task_losses,
  *,
  num_batches: int,
  num_tasks: Optional[int],
  shared: tree_lib.SharedSpec,
  method: str,
) -> MicroBatchInputs:
  """Validates ``[M, T, *param.shape]`` micro-batch task gradients (M static) and resolves the mask."""
  composition.check_first_in_chain(method)  # no optimizer before the method
  if is_lazy(updates):
    raise ValueError(
      f"mtjax: {method}: got a lazy Jacobian (task_grads(deferred=True) or strategy='rep'/'shared'); {method} "
      f"needs the stacked per-task gradients of {num_batches} independent micro-batches, every leaf "
      f"[{num_batches}, T, *param.shape]: {how_to(num_batches)}."
    )
  updates = rows_lib.upcast_rows(updates, params)  # mixed precision: bfloat16 rows of float32 params
  flat, treedef = jax.tree_util.tree_flatten_with_path(updates, is_leaf=is_sparse)
  if not flat:
    raise ValueError(f"mtjax: {method}: the task gradients are an empty pytree.")
  paths = [tree_lib.path_str(p) for p, _ in flat]
  leaves = [leaf for _, leaf in flat]
  p_shapes = None
  if params is not None:
    p_flat, p_def = jax.tree_util.tree_flatten(params)
    if p_def != treedef:
      raise ValueError(
        f"mtjax: {method}: the task gradients and params have different tree structures; the task gradients "
        f"must be the per-task gradients of these params, every leaf [{num_batches}, T, *param.shape]."
      )
    p_shapes = [tuple(np.shape(p)) for p in p_flat]
  found = None
  for k, (path, leaf) in enumerate(zip(paths, leaves)):
    if isinstance(leaf, SparseRows):
      raise ValueError(
        f"mtjax: {method}: leaf '{path}' holds sparse embedding rows (SparseRows); {method} needs dense "
        f"[{num_batches}, T, *param.shape] leaves: {how_to(num_batches)}."
      )
    shape = tuple(np.shape(leaf))
    if len(shape) < 2 or shape[0] != num_batches or (p_shapes is not None and shape[1:] == p_shapes[k]):
      raise ValueError(
        f"mtjax: {method}: leaf '{path}' of the task gradients has shape {shape}; {method} (num_batches="
        f"{num_batches}) needs the per-task gradients of {num_batches} independent micro-batches, every leaf "
        f"[{num_batches}, T, *param.shape]: {how_to(num_batches)}."
      )
    if found is None:
      found, first = shape[1], path
    elif shape[1] != found:
      raise ValueError(
        f"mtjax: {method}: leaves of the task gradients disagree on the task axis (axis 1): '{first}' has "
        f"{found} tasks but '{path}' has shape {shape}. Every leaf must be [{num_batches}, T, *param.shape]."
      )
  if num_tasks is not None and found != num_tasks:
    raise ValueError(
      f"mtjax: the transform was built with num_tasks={num_tasks} but the task gradients given to {method} "
      f"have {found} tasks on axis 1 (leaf '{paths[0]}', shape {tuple(np.shape(leaves[0]))}); every leaf must "
      f"be [{num_batches}, T, *param.shape]."
    )
  if p_shapes is not None:
    for path, g, p in zip(paths, leaves, p_shapes):
      if tuple(np.shape(g)[2:]) != p:
        raise ValueError(
          f"mtjax: {method}: leaf '{path}': task gradient shape {tuple(np.shape(g))} does not match param shape "
          f"{p} with leading [micro-batch, task] axes [{num_batches}, T]."
        )
  per_batch = jax.tree.unflatten(
    treedef, [jax.ShapeDtypeStruct(tuple(np.shape(x))[1:], jnp.result_type(x)) for x in leaves]
  )
  mask = tree_lib.resolve_shared(shared, per_batch, params)
  if not any(mask):
    raise ValueError(f"mtjax: {method}: the shared= mask marks no leaf as shared; nothing to weight.")
  checks = []
  if task_losses is not None:
    losses = jnp.asarray(task_losses)
    if losses.shape not in ((found,), (num_batches, found)):
      raise ValueError(
        f"mtjax: {method}: task_losses must have shape ({found},) or ({num_batches}, {found}) (one loss per task, "
        f"optionally per micro-batch), got {losses.shape}."
      )
    checks.append(numerics.finite_check(losses, f"task losses passed to {method}"))
  bad = jnp.logical_not(jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves])))
  checks.append(
    numerics.condition_check(
      bad,
      f"mtjax: non-finite task gradients given to {method} (NaN/inf in a task gradient). Check the loss "
      "for NaN/inf (log of 0, division by zero, exploding logits).",
    )
  )
  return MicroBatchInputs(leaves, treedef, paths, list(mask), int(found), tuple(checks))


def acc_dtype(leaves: Sequence[jax.Array]):
  return numerics.gram_dtype(jnp.result_type(*leaves))


def cross_gram(leaves: Sequence[jax.Array], mask: Sequence[bool], a: int, b: int) -> jax.Array:
  """``[T, T]`` cross Gram :math:`J_a J_b^\\top` of the shared leaves, leaf by leaf (``precision=HIGHEST``)."""
  acc = acc_dtype(leaves)
  total = None
  for leaf, shared in zip(leaves, mask):
    if not shared:
      continue
    t = leaf.shape[1]
    x = jnp.reshape(leaf[a], (t, -1))
    y = jnp.reshape(leaf[b], (t, -1))
    g = jnp.matmul(x, y.T, precision=numerics.HIGHEST, preferred_element_type=acc).astype(acc)
    total = g if total is None else total + g
  return total


def combine(leaves: Sequence[jax.Array], mask: Sequence[bool], weights: jax.Array, batches: Sequence[int]) -> list:
  """Per leaf: the mean over ``batches`` of :math:`J_m^\\top w` (shared) or of the plain task sum (task-specific)."""
  out = []
  for leaf, shared in zip(leaves, mask):
    parts = []
    for m in batches:
      if shared:
        parts.append(numerics.weighted_task_sum(weights, leaf[m]))
      else:
        parts.append(jnp.sum(leaf[m], axis=0))
    u = parts[0]
    for p in parts[1:]:
      u = u + p
    if len(parts) > 1:
      u = (u / len(parts)).astype(leaf.dtype)
    out.append(u)
  return out


def matvec(matrix: jax.Array, vector: jax.Array) -> jax.Array:
  return jnp.matmul(matrix, vector, precision=numerics.HIGHEST)
