"""GradDrop: gradient sign dropout (Chen et al., NeurIPS 2020), coordinate-wise on the leaves."""

from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mtjax._src import composition
from mtjax._src import numerics
from mtjax._src import rows as rows_lib
from mtjax._src import tree as tree_lib
from mtjax._src import weighting
from mtjax._src.sparse import SparseRows
from mtjax._src.sparse import scatter_rows
from mtjax._src.task_grads import materialize
from mtjax.transforms._pcgrad import seed_key


class GradDropState(NamedTuple):
  """State of :func:`graddrop`.

  Attributes:
    key: the PRNG key for the next step's uniform draws.
    weights: ``[T]`` the fraction of each task's squared gradient norm (on the shared leaves) that
      the last step kept, :math:`\\sum m_t g_t^2 / \\sum g_t^2` (empty when ``num_tasks`` is not
      given). GradDrop has no task weights; this is its per-task summary for logging.
  """

  key: jax.Array
  weights: jax.Array


def graddrop_leaf(task_leaf: jax.Array, uniform: jax.Array, leak: jax.Array) -> tuple[jax.Array, jax.Array]:
  """GradDrop on one leaf ``[T, *shape]`` with uniforms ``[*shape]`` and leak ``[T]``.

  Returns ``(update [*shape] in the leaf's dtype, masked task gradients [T, *shape] in the
  accumulation dtype)``.
  """
  acc = numerics.gram_dtype(task_leaf.dtype)
  g = task_leaf.astype(acc)
  purity = 0.5 * (1.0 + numerics.safe_div(jnp.sum(g, axis=0), jnp.sum(jnp.abs(g), axis=0)))
  keep_positive = (uniform < purity.astype(jnp.float32))[None]
  kept_sign = jnp.where(keep_positive, g > 0, g < 0)
  leak = jnp.reshape(leak.astype(acc), (-1,) + (1,) * (g.ndim - 1))
  masked = (leak + (1.0 - leak) * kept_sign.astype(acc)) * g
  return jnp.sum(masked, axis=0).astype(task_leaf.dtype), masked


def _graddrop_sparse(leaf: SparseRows, key: jax.Array, leak: jax.Array):
  """GradDrop on a sparse table: on the per-id summed task gradients, one uniform draw per looked-up row.

  Returns ``(update [V, *row], masked [T, N, *row], g [T, N, *row])`` with ``g`` the per-id sums in
  the accumulation dtype (padding slots: zeros, so they add nothing to the kept/total statistics).
  """
  uids, s = leaf.segments()  # [N], [T, N, *row]; unused slots have id V and zeros
  row_shape = tuple(leaf.table_shape[1:])
  uniform = jax.vmap(lambda u: jax.random.uniform(jax.random.fold_in(key, u), row_shape, jnp.float32))(uids)
  rows, masked = graddrop_leaf(s, uniform, leak)  # [N, *row]
  update = scatter_rows(uids, rows, leaf.table_shape)  # id V (padding) is dropped
  return update, masked, s.astype(masked.dtype)


def graddrop(
  key: int | jax.Array = 0,
  *,
  num_tasks: Optional[int] = None,
  leak: jax.typing.ArrayLike = 0.0,
  shared: tree_lib.SharedSpec = None,
) -> optax.GradientTransformationExtraArgs:
  r"""GradDrop: per coordinate, keep only the task gradients of one randomly chosen sign.

  For every coordinate of every shared parameter, with the task gradients :math:`g_{t}` at that
  coordinate, the positive sign purity and a fresh uniform draw

  .. math::
    P = \frac12 \Big(1 + \frac{\sum_t g_t}{\sum_t |g_t|}\Big), \qquad U \sim \mathcal U[0, 1),

  GradDrop keeps the positive components when :math:`U < P` and the negative ones otherwise:
  :math:`m_t = [U < P][g_t > 0] + [U \ge P][g_t < 0]`, and with leak :math:`\ell_t \in [0, 1]`,
  :math:`m_t \leftarrow \ell_t + (1 - \ell_t) m_t`. The update is :math:`d = \sum_t m_t g_t`
  (coordinate-wise). A coordinate where all tasks agree keeps everything (:math:`P \in \{0, 1\}`);
  :math:`\sum_t |g_t| = 0` gives :math:`P = 1/2` (nothing to keep). The tie :math:`U = P` (measure
  zero) goes to the negative side, so an all-negative coordinate is always kept.

  It works on the leaves directly (not a weighting of the Gram matrix), leaf by leaf; the
  uniforms are drawn in float32 from the key in the state, split at every update (the
  ``optax.add_noise`` pattern), one draw per coordinate. Task-specific leaves (``shared=`` mask
  False) get the plain sum of their task gradients -- which is also what GradDrop gives there,
  since only one task has a non-zero gradient on them.

  Sparse embedding tables (a :class:`~mtjax.SparseRows` leaf, from :func:`mtjax.embedding_lookup`):
  GradDrop runs on the per-id sums of the task gradients of the rows the batch looked up (the
  dense gradient's non-zero rows) and scatters the result into the ``[V, *row]`` update; rows
  never looked up get a zero update, as on the dense gradient (every task gradient is 0 there).
  Their uniforms are drawn per looked-up row, ``uniform(fold_in(fold_in(sub, i), id), row_shape)``
  (``i`` the leaf index), so the draw differs from the one on the dense ``[T, V, *row]`` gradient
  (``task_grads(..., sparse=False)``) but has the same distribution: i.i.d. uniforms per
  coordinate, and the same update in distribution.

  Decisions: the paper applies GradDrop to the gradients with respect to a shared activation
  layer, after summing them over the batch; here it is applied to the per-task gradients of the
  shared parameters, coordinate-wise (as common reimplementations do). To apply it at an
  activation, pass the per-task gradients of that activation (e.g. with ``mtjax.task_grads`` on a
  function of it) and backpropagate the result. The paper's optional multiplication of the
  purity by the sign of the layer's inputs is not implemented. ``leak`` (per task or one value)
  lets a task's gradient through unmasked: ``1`` for a task that must never be dropped (the
  paper's transfer-learning setting), default ``0`` (plain GradDrop).

  .. warning::
    Must be first in an ``optax.chain``: it consumes per-task gradients (every leaf
    ``[T, *param.shape]``, e.g. from :func:`mtjax.task_grads`) and emits params-shaped updates.
    Do not wrap it in ``optax.MultiSteps``.

  Examples:
    >>> import jax.numpy as jnp, optax, mtjax
    >>> params = {'w': jnp.zeros(3)}
    >>> task_grads = {'w': jnp.array([[1., 2., -1.], [3., -2., -1.]])}
    >>> tx = optax.chain(mtjax.graddrop(key=0, num_tasks=2), optax.sgd(1.0))
    >>> state = tx.init(params)
    >>> updates, state = tx.update(task_grads, state, params)
    >>> d = -updates['w']  # agreeing coordinates 0 and 2 are kept whole; coordinate 1 keeps one sign
    >>> float(d[0]), float(d[2]), float(d[1]) in (2.0, -2.0)
    (4.0, -2.0, True)

  Args:
    key: PRNG seed (int) or key for the uniform draws.
    num_tasks: number of tasks ``T`` (checked against the gradients; when given, the state
      records the kept fraction of every task's gradient in ``weights``).
    leak: leak :math:`\ell \in [0, 1]`, a scalar or one value per task ``[T]`` (traceable).
    shared: shared-parameter mask (see :func:`mtjax.shared_mask`).

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with state :class:`GradDropState`.

  References:
    Chen, Ngiam, Huang, Luong, Kretzschmar, Chai and Anguelov, *Just Pick a Sign: Optimizing Deep
    Multitask Models with Gradient Sign Dropout*, NeurIPS 2020. https://arxiv.org/abs/2010.06808
  """
  leak_shape = np.shape(leak)
  if len(leak_shape) > 1 or (len(leak_shape) == 1 and num_tasks is not None and leak_shape[0] != num_tasks):
    raise ValueError(f"mtjax: graddrop: leak must be a scalar or one value per task [T], got shape {leak_shape}.")
  if numerics._is_concrete(leak):  # pylint: disable=protected-access
    values = np.asarray(leak, np.float64)
    if not np.all((values >= 0) & (values <= 1)):
      raise ValueError(f"mtjax: graddrop: leak must be in [0, 1], got {values.tolist()}.")

  def init_fn(params):
    composition.check_not_wrapped("graddrop")  # optax.MultiSteps / masked / apply_if_finite around it
    del params
    return GradDropState(key=seed_key(key), weights=weighting.init_weights(num_tasks))

  def update_fn(updates, state, params=None, *, task_losses=None, **extra_args):
    del extra_args
    method = "graddrop"
    updates = materialize(updates)  # a deferred TaskJacobian: GradDrop masks the per-task rows
    updates = rows_lib.upcast_rows(updates, params)  # mixed precision: bfloat16 rows, float32 params
    t = tree_lib.check_task_axis(updates, num_tasks, name=f"the task gradients given to {method}")
    tree_lib.check_params_match(updates, params)
    _, losses_check = weighting.check_task_losses(task_losses, t, required=False, method=method, check_finite=True)
    leak_t = jnp.asarray(leak)
    if leak_t.ndim == 1 and leak_t.shape[0] != t:
      raise ValueError(f"mtjax: graddrop: leak has {leak_t.shape[0]} values but there are {t} tasks.")
    leak_t = jnp.broadcast_to(leak_t, (t,))
    mask = tree_lib.resolve_shared(shared, updates, params)
    leaves, treedef = rows_lib.flatten(updates)  # a SparseRows stays one leaf
    next_key, sub = jax.random.split(state.key)

    out, bad = [], []
    kept, total = None, None
    for i, leaf in enumerate(leaves):
      if not mask[i]:
        out.append(rows_lib.leaf_sum(leaf))
        bad.append(jnp.any(~jnp.isfinite(out[-1])))
        continue
      if isinstance(leaf, SparseRows):
        update, masked, g = _graddrop_sparse(leaf, jax.random.fold_in(sub, i), leak_t)
      else:
        uniform = jax.random.uniform(jax.random.fold_in(sub, i), leaf.shape[1:], jnp.float32)
        update, masked = graddrop_leaf(leaf, uniform, leak_t)
        g = leaf.astype(masked.dtype)
      out.append(update)
      bad.append(jnp.any(~jnp.isfinite(jnp.sum(jnp.abs(g), axis=0))))
      axes = tuple(range(1, g.ndim))
      k, s = jnp.sum(masked * g, axis=axes), jnp.sum(g * g, axis=axes)
      kept, total = (k, s) if kept is None else (kept + k, total + s)

    grads_check = numerics.condition_check(
      jnp.any(jnp.stack(bad)),
      f"mtjax: non-finite task gradients given to {method} (NaN/inf in a task gradient). Check the loss "
      "for NaN/inf (log of 0, division by zero, exploding logits).",
    )
    out = numerics.enforce(out, losses_check, grads_check)
    new_state = state._replace(key=next_key)
    if jnp.size(state.weights) > 0 and kept is not None:
      new_state = new_state._replace(weights=numerics.safe_div(kept, total).astype(state.weights.dtype))
    return jax.tree_util.tree_unflatten(treedef, out), new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
