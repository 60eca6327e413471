"""Leaf-level operations on per-task gradients (dense ``[T, ...]`` arrays or :class:`SparseRows`).

The Gram core (``weighting.py``), the Jacobian objects of ``task_grads.py`` and the analysis all go
through these, so a sparse embedding table and a dense leaf give the same Gram entries and updates.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp

from mtjax._src import numerics
from mtjax._src.sparse import SparseRows
from mtjax._src.sparse import is_sparse

PyTree = Any


class Layout(NamedTuple):
  """Static description of one method's view of the parameters (per leaf, flattening order)."""

  mask: tuple  # bool per leaf: shared
  group: tuple  # Gram group per leaf (-1: in no Gram; always -1 for task-specific leaves)
  num_groups: int  # K
  task_specific: str  # "sum" | "weighted"
  paths: tuple  # '/'-joined leaf paths
  method: str
  mask_given: bool = True  # False: the method got no shared= (every leaf shared by default)
  # dtype of each leaf's update (mixed precision: the params' float32 for bfloat16 rows, so the
  # weighted sum is rounded once); () keeps each leaf's own dtype.
  out_dtypes: tuple = ()


def flatten(tree: PyTree):
  """``(leaves, treedef)`` with :class:`SparseRows` kept as leaves."""
  return jax.tree_util.tree_flatten(tree, is_leaf=is_sparse)


def flatten_with_path(tree: PyTree):
  return jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_sparse)


def leaf_gram(leaf, dtype=None) -> jax.Array:
  """``[T, T]`` Gram of one leaf's task gradients."""
  if isinstance(leaf, SparseRows):
    g = leaf.gram()
  else:
    g = numerics.leaf_gram(leaf)
  return g if dtype is None else g.astype(dtype)


def leaf_weighted_sum(weights: jax.Array, leaf, dtype=None) -> jax.Array:
  """``sum_t w_t g_t`` of one leaf, params-shaped (in ``dtype``, default the leaf's)."""
  if isinstance(leaf, SparseRows):
    return leaf.weighted_sum(weights, dtype)
  return numerics.weighted_task_sum(weights, leaf, dtype)


def leaf_sum(leaf, dtype=None) -> jax.Array:
  """``sum_t g_t`` of one leaf, params-shaped (in ``dtype``, default the leaf's)."""
  if isinstance(leaf, SparseRows):
    return leaf.sum(dtype)
  return jnp.sum(leaf if dtype is None else leaf.astype(dtype), axis=0)


def leaf_dtype(leaf):
  return leaf.dtype if isinstance(leaf, SparseRows) else jnp.result_type(leaf)


def compute_grams(leaves: Sequence[Any], ids: Sequence[int], k: int) -> jax.Array:
  """``[K, T, T]``: per-leaf Grams summed into their groups (``ids[i] = -1`` skips leaf ``i``)."""
  num_tasks = leaves[0].shape[0]
  dtype = numerics.gram_dtype(jnp.result_type(*[leaf_dtype(x) for x in leaves]))
  sums: list = [None] * k
  for leaf, i in zip(leaves, ids):
    if i < 0:
      continue
    g = leaf_gram(leaf, dtype)
    sums[i] = g if sums[i] is None else sums[i] + g
  sums = [s if s is not None else jnp.zeros((num_tasks, num_tasks), dtype) for s in sums]
  return jnp.stack(sums)


def weights_for_leaf(weights: jax.Array, i: int, layout: Layout) -> jax.Array:
  if weights.ndim == 1:
    return weights
  gid = layout.group[i]
  if gid < 0:
    raise ValueError(f"mtjax: {layout.method}: leaf '{layout.paths[i]}' is in no group but the weights are per group.")
  return weights[gid]


def task_specific_weights(weights: jax.Array, layout: Layout):
  """The coefficients of the task-specific leaves: ``None`` for the plain sum, else ``[T]``."""
  if layout.task_specific != "weighted":
    return None
  if weights.ndim != 1:
    raise ValueError(f"mtjax: {layout.method}: task_specific='weighted' needs one weight per task, not per group.")
  return weights


def combine_leaf(i: int, leaf, weights: jax.Array, layout: Layout):
  """The update of leaf ``i`` from its task gradients (in ``layout.out_dtypes[i]`` when given)."""
  dtype = layout.out_dtypes[i] if layout.out_dtypes else None
  if layout.mask[i]:
    return leaf_weighted_sum(weights_for_leaf(weights, i, layout), leaf, dtype)
  ts = task_specific_weights(weights, layout)
  return leaf_sum(leaf, dtype) if ts is None else leaf_weighted_sum(ts, leaf, dtype)


def rows_gram_and_combiner(leaves: Sequence[Any], layout: Layout, need_gram: bool):
  """Gram stack (or None) and the ``weights -> update leaves`` function for stacked rows."""
  grams = None
  if need_gram:
    grams = compute_grams(leaves, layout.group, max(layout.num_groups, 1))

  def combine(weights):
    return [combine_leaf(i, leaf, weights, layout) for i, leaf in enumerate(leaves)]

  return grams, combine


def update_dtypes(leaves: Sequence[Any], params: PyTree) -> tuple:
  """The dtype of each leaf's update: its rows' dtype promoted with its parameter's (mixed precision:
  bfloat16 rows of float32 master params give a float32 update); ``()`` without ``params``."""
  if params is None:
    return ()
  p_leaves = jax.tree.leaves(params)
  if len(p_leaves) != len(leaves):
    return ()
  return tuple(
    jnp.promote_types(leaf_dtype(x), p.dtype if hasattr(p, "dtype") else jnp.result_type(p))
    for x, p in zip(leaves, p_leaves)
  )


def upcast_rows(updates: PyTree, params: PyTree) -> PyTree:
  """Per-task gradients cast to their update dtype (:func:`update_dtypes`): bfloat16 rows of float32
  params become float32, so a method that does more than a Gram and a weighted sum (projections,
  masks, tracked gradients in its state) computes and keeps its state in float32. Unchanged without
  ``params`` or when the dtypes agree (the default float32 path is untouched)."""
  leaves, treedef = flatten(updates)
  dtypes = update_dtypes(leaves, params)
  if not dtypes or all(leaf_dtype(x) == d for x, d in zip(leaves, dtypes)):
    return updates
  out = []
  for x, d in zip(leaves, dtypes):
    if leaf_dtype(x) == d:
      out.append(x)
    elif isinstance(x, SparseRows):
      out.append(x.map_rows(lambda v, d=d: v.astype(d)))
    else:
      out.append(jnp.asarray(x).astype(d))
  return jax.tree_util.tree_unflatten(treedef, out)
