"""Task-gradient similarity and conflict, computed from per-task gradients without a second backward.

Everything here takes the ``task_grads`` pytree that :func:`mtjax.task_grads` returns (every leaf
``[T, *param.shape]``) and works leaf by leaf through small Gram matrices (one ``matmul`` per
leaf, no concatenation), so it is cheap enough to run inside the jitted training step.
"""

from __future__ import annotations

from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from mtjax._src import numerics
from mtjax._src import rows as rows_lib
from mtjax._src import tree as tree_lib
from mtjax._src import weighting
from mtjax._src.sparse import SparseRows
from mtjax._src.sparse import is_sparse
from mtjax._src.task_grads import is_lazy
from mtjax._src.task_grads import materialize

PyTree = Any


def _grams(task_grads: PyTree, groups, shared) -> jax.Array:
  task_grads = materialize(task_grads)  # a deferred TaskJacobian: its T rows
  tree_lib.check_task_axis(task_grads)
  mask = tree_lib.resolve_shared(shared, task_grads)
  leaves = rows_lib.flatten(task_grads)[0]
  paths = tree_lib.leaf_paths(task_grads)
  idx = [i for i, m in enumerate(mask) if m]
  if not idx:
    raise ValueError("mtjax: the shared= mask selects no leaf; nothing to compare.")
  ids = weighting.group_ids(groups, [paths[i] for i in idx])
  return weighting.compute_grams([leaves[i] for i in idx], ids, max(ids) + 1)


def cosine_similarity(task_grads: PyTree, *, granularity: weighting.GroupSpec = "model", shared=None) -> jax.Array:
  r"""Task-gradient cosine-similarity matrices.

  .. math:: C^{(k)}_{ij} = \frac{\langle g_i^{(k)}, g_j^{(k)} \rangle}{\|g_i^{(k)}\| \, \|g_j^{(k)}\|}

  for each parameter group ``k`` (the whole model, each layer, or each leaf). A zero gradient has
  similarity 0 with everything (also with itself), never NaN.

  Examples:
    >>> import jax.numpy as jnp, mtjax
    >>> g = {'w': jnp.array([[1., 0.], [1., 1.], [-1., 0.]])}
    >>> mtjax.analysis.cosine_similarity(g)[0].round(3)
    Array([[ 1.   ,  0.707, -1.   ],
           [ 0.707,  1.   , -0.707],
           [-1.   , -0.707,  1.   ]], dtype=float32)

  Args:
    task_grads: per-task gradients, every leaf ``[T, ...]``.
    granularity: ``"model"`` (one matrix), ``"layer"`` (leaves with the same parent path, e.g. a
      Dense kernel and bias; a Flax NNX state's ``.value`` step is not part of a path), ``"leaf"``
      (one per parameter tensor), or a callable mapping ONE leaf path (``'trunk/Dense_0/kernel'``)
      to a group name (``str``), an ``int`` id, or ``None`` to leave the leaf out. (A callable on
      the list of all paths returning one int id per path, the older form, still works.)
    shared: restrict to shared leaves (pytree of bools or callable, see :func:`mtjax.shared_mask`).

  Returns:
    ``[K, T, T]`` cosine matrices, ``K = 1`` for ``"model"``; use :func:`group_names` for labels.
  """
  grams = _grams(task_grads, granularity, shared)
  return numerics.cosine_from_gram(grams)


def group_names(task_grads: PyTree, *, granularity: weighting.GroupSpec = "model", shared=None) -> list[str]:
  """Labels of the groups of :func:`cosine_similarity` (static, no computation).

  ``"model"`` gives ``['model']``, ``"leaf"`` the leaf paths, ``"layer"`` the parent paths, a
  callable returning names those names (in order of first appearance), one returning int ids
  ``group_<id>``. Order and count match the ``K`` axis of :func:`cosine_similarity` and :func:`track`.

  Example:
    >>> import jax.numpy as jnp, mtjax
    >>> g = {'trunk': {'kernel': jnp.ones((2, 3)), 'bias': jnp.ones((2, 1))}, 'head_0': {'kernel': jnp.ones((2, 3))}}
    >>> mtjax.analysis.group_names(g, granularity="layer")
    ['head_0', 'trunk']
    >>> mtjax.analysis.group_names(g, granularity=lambda path: "heads" if path.startswith("head") else "trunk")
    ['heads', 'trunk']
  """
  if is_lazy(task_grads):
    task_grads = task_grads.shapes()
  abstract = jax.tree.map(
    lambda g: jax.ShapeDtypeStruct(jnp.shape(g), g.dtype if is_sparse(g) else jnp.result_type(g)),
    task_grads,
    is_leaf=is_sparse,
  )
  mask = tree_lib.resolve_shared(shared, abstract)
  paths = [p for p, m in zip(tree_lib.leaf_paths(abstract), mask) if m]
  return weighting.group_labels(granularity, paths)[1]


def conflict_fraction(cosines: jax.Array) -> jax.Array:
  """Share of task pairs ``i < j`` with negative cosine, per matrix (``[..., T, T] -> [...]``).

  With a single task there are no pairs and the fraction is 0.
  """
  t = cosines.shape[-1]
  iu = np.triu_indices(t, k=1)
  if len(iu[0]) == 0:
    return jnp.zeros(cosines.shape[:-2], cosines.dtype)
  pairs = cosines[..., iu[0], iu[1]]
  return jnp.mean((pairs < 0).astype(cosines.dtype), axis=-1)


def gradient_norms(task_grads: PyTree, *, granularity: weighting.GroupSpec = "model", shared=None) -> jax.Array:
  """``[K, T]`` per-task gradient norms per group (square roots of the Gram diagonals)."""
  grams = _grams(task_grads, granularity, shared)
  return jnp.sqrt(jnp.maximum(jnp.diagonal(grams, axis1=-2, axis2=-1), 0))


def norm_ratio(norms: jax.Array) -> jax.Array:
  """Largest over smallest task-gradient norm per group (``inf``-free: 0 when the smallest is 0)."""
  return numerics.safe_div(jnp.max(norms, axis=-1), jnp.min(norms, axis=-1))


def update_alignment(
  task_grads: PyTree, update: PyTree, *, granularity: weighting.GroupSpec = "model", shared=None
) -> jax.Array:
  r"""Cosine between each task gradient and an update, ``[K, T]``: the view after a method's surgery.

  ``cos(g_t, d)`` tells whether the combined direction ``d`` (e.g. the output of ``pcgrad`` before
  the optimizer) still conflicts with task ``t`` (negative) or serves it (positive). Pass the
  *descent direction* ``d`` (the method's output), not the sign-flipped optimizer update.
  """
  task_grads = materialize(task_grads)
  if any(is_sparse(g) for g in rows_lib.flatten(task_grads)[0]):  # <g_t, d> and |d| without densifying
    return _sparse_alignment(task_grads, update, granularity, shared)
  stacked = jax.tree.map(lambda g, u: jnp.concatenate([g, u[None].astype(g.dtype)], axis=0), task_grads, update)
  cos = cosine_similarity(stacked, granularity=granularity, shared=shared)
  return cos[:, :-1, -1]


def _sparse_alignment(task_grads: PyTree, update: PyTree, granularity, shared) -> jax.Array:
  tree_lib.check_task_axis(task_grads)
  leaves = rows_lib.flatten(task_grads)[0]
  ups = jax.tree.leaves(update)
  mask = tree_lib.resolve_shared(shared, task_grads)
  paths = tree_lib.leaf_paths(task_grads)
  idx = [i for i, m in enumerate(mask) if m]
  if not idx:
    raise ValueError("mtjax: the shared= mask selects no leaf; nothing to compare.")
  ids = weighting.group_ids(granularity, [paths[i] for i in idx])
  k = max(ids) + 1
  t = leaves[0].shape[0]
  gram = rows_lib.compute_grams([leaves[i] for i in idx], ids, k)
  acc = gram.dtype  # the dense path's dtype (float64 under x64), not float32
  dots = [jnp.zeros((t,), acc) for _ in range(k)]
  sq = [jnp.zeros((), acc) for _ in range(k)]
  for i, gid in zip(idx, ids):
    if gid < 0:
      continue
    g, u = leaves[i], ups[i]
    u = u.astype(rows_lib.leaf_dtype(g))  # as the dense path, which stacks the update with the rows
    if isinstance(g, SparseRows):
      d = g.dot(u)
    else:
      d = jnp.matmul(
        jnp.reshape(g, (t, -1)).astype(acc), jnp.reshape(u, (-1,)).astype(acc), precision=jax.lax.Precision.HIGHEST
      )
    dots[gid] = dots[gid] + d.astype(acc)
    sq[gid] = sq[gid] + jnp.sum(jnp.square(u.astype(acc)))
  norms_g = jnp.sqrt(jnp.maximum(jnp.diagonal(gram, axis1=-2, axis2=-1), 0))
  norm_u = jnp.sqrt(jnp.stack(sq))[:, None]
  return jnp.clip(numerics.safe_div(jnp.stack(dots), norms_g * norm_u), -1.0, 1.0)  # as cosine_from_gram


def track(
  task_grads: PyTree, update: Optional[PyTree] = None, *, granularity: weighting.GroupSpec = "layer", shared=None
) -> dict:
  """A small dict of similarity statistics for logging inside a jitted step.

  Returns ``{'cosine': [T, T] (whole model), 'cosine_groups': [K, T, T], 'conflict': scalar
  (whole model), 'conflict_groups': [K], 'norms': [T], 'alignment': [T] (only with update)}``.
  All are computed from per-leaf Grams of the given gradients: no extra backward pass. The ``K``
  groups are those of ``granularity`` (see :func:`cosine_similarity`), labelled by :func:`group_names`.
  """
  task_grads = materialize(task_grads)  # once, for every statistic below
  grams = _grams(task_grads, granularity, shared)
  cos_groups = numerics.cosine_from_gram(grams)
  total = jnp.sum(grams, axis=0)
  cos = numerics.cosine_from_gram(total)
  out = {
    "cosine": cos,
    "cosine_groups": cos_groups,
    "conflict": conflict_fraction(cos),
    "conflict_groups": conflict_fraction(cos_groups),
    "norms": jnp.sqrt(jnp.maximum(jnp.diagonal(total), 0)),
  }
  if update is not None:
    out["alignment"] = update_alignment(task_grads, update, granularity="model", shared=shared)[0]
  return out


class SimilarityHistory:
  """Host-side collector of :func:`track` outputs over training steps.

  Example:
    >>> import jax.numpy as jnp, mtjax
    >>> hist = mtjax.analysis.SimilarityHistory()
    >>> g = {'w': jnp.array([[1., 0.], [0., 1.]])}
    >>> hist.append(0, mtjax.analysis.track(g))
    >>> hist.array('conflict').shape
    (1,)
  """

  def __init__(self):
    self.steps: list[int] = []
    self.records: list[dict] = []

  def append(self, step: int, stats: dict) -> None:
    self.steps.append(int(step))
    self.records.append({k: np.asarray(v) for k, v in stats.items()})

  def array(self, key: str) -> np.ndarray:
    """Stacked history of one statistic, ``[num_records, ...]``."""
    return np.stack([r[key] for r in self.records]) if self.records else np.zeros((0,))

  def pair_series(self, i: int, j: int, key: str = "cosine") -> np.ndarray:
    """Cosine of tasks ``i`` and ``j`` over steps (``key='cosine_groups'`` gives ``[steps, K]``)."""
    return self.array(key)[..., i, j]
