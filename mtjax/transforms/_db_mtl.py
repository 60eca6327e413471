"""DB-MTL (Dual-Balancing): log-loss gradients, EMA per task, rescaled to the largest EMA norm."""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

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
from mtjax._src.task_grads import materialize


class DBMTLState(NamedTuple):
  """State of :func:`db_mtl`.

  Attributes:
    count: steps taken (int32).
    grads_ema: params-shaped tree: on every shared leaf the ``[T, *param.shape]`` EMA
      :math:`h_i` of the log-loss task gradients (the method's memory: ``T`` copies of the shared
      parameters); on task-specific leaves an empty ``[0]`` placeholder.
    alpha: ``[T]`` gradient-magnitude factors :math:`\\max_j \\|h_j\\| / \\|h_i\\|` of the last step.
    weights: ``[T]`` loss-balancing factors :math:`1 / (L_i + \\epsilon)` of the last step: the
      coefficients of this step's raw task gradients in the log-loss gradients (what the
      task-specific leaves get).
  """

  count: jax.Array
  grads_ema: Any
  alpha: jax.Array
  weights: jax.Array


def prepare_leaves(
  updates, params, *, num_tasks: Optional[int], shared, method: str, task_losses, losses_required: bool
):
  """Validation shared by the leaf-wise methods (DB-MTL, ExcessMTL).

  Materializes a deferred Jacobian, checks the task axis, params and losses, densifies
  :class:`SparseRows` leaves (their per-coordinate state needs the dense rows).

  Returns ``(leaves, treedef, mask, t, losses, losses_check)``.
  """
  updates = materialize(updates)  # the method keeps per-coordinate state: it needs every row
  updates = rows_lib.upcast_rows(updates, params)  # mixed precision: float32 math and state for bfloat16 rows
  t = tree_lib.check_task_axis(updates, num_tasks, name=f"the task gradients given to {method}")
  tree_lib.check_params_match(updates, params)
  losses, losses_check = weighting.check_task_losses(
    task_losses, t, required=losses_required, method=method, check_finite=True
  )
  mask = tree_lib.resolve_shared(shared, updates, params)
  leaves, treedef = rows_lib.flatten(updates)
  leaves = [leaf.todense() if isinstance(leaf, SparseRows) else jnp.asarray(leaf) for leaf in leaves]
  return leaves, treedef, mask, t, losses, losses_check


def shared_state_tree(params, num_tasks: int, shared, dtype_fn=None):
  """Zeros ``[T, *shape]`` on the shared leaves of ``params``, ``[0]`` placeholders elsewhere."""
  leaves, treedef = jax.tree.flatten(params)
  probe = jax.tree.unflatten(
    treedef, [jax.ShapeDtypeStruct((num_tasks,) + tuple(jnp.shape(p)), jnp.result_type(p)) for p in leaves]
  )
  mask = tree_lib.resolve_shared(shared, probe, params)
  out = []
  for p, m in zip(leaves, mask):
    dtype = numerics.gram_dtype(jnp.result_type(p))
    out.append(jnp.zeros((num_tasks,) + tuple(jnp.shape(p)), dtype) if m else jnp.zeros((0,), dtype))
  return jax.tree.unflatten(treedef, out)


def check_state_tree(state_leaves, leaves, mask, method: str, what: str) -> None:
  """A per-task state tree (from :func:`shared_state_tree`) matches the task gradients and the mask."""
  if len(state_leaves) != len(leaves) or any(
    (e.shape != l.shape) if m else (e.shape != (0,)) for e, l, m in zip(state_leaves, leaves, mask)
  ):
    raise ValueError(
      f"mtjax: {method}: the state's {what} does not match the task gradients; call tx.init on "
      "params with the same structure (and the same shared= mask) as the task gradients."
    )
  if not any(mask):
    raise ValueError(f"mtjax: {method}: the shared= mask marks no leaf as shared; nothing to weight.")


def task_sq_norms(rows, dtype) -> tuple[jax.Array, jax.Array]:
  """``[T]`` squared norms of the task rows summed over ``rows`` (``[T, ...]`` arrays), overflow-safe.

  Returns ``(top, sq)`` with ``norm_i = top * sqrt(sq_i)``: the rows are divided by their largest
  absolute entry before squaring, so that huge finite gradients do not overflow.
  """
  top = jnp.max(jnp.stack([jnp.max(jnp.abs(r)).astype(dtype) for r in rows]))
  safe_top = jnp.where((top > 0) & jnp.isfinite(top), top, jnp.ones_like(top))
  sq = sum(jnp.sum(jnp.square(r.astype(dtype) / safe_top), axis=tuple(range(1, r.ndim))) for r in rows)
  return safe_top, sq


def nonfinite_grads_check(leaves, method: str):
  bad = jnp.any(jnp.stack([jnp.logical_not(jnp.all(jnp.isfinite(leaf))) for leaf in leaves]))
  return numerics.condition_check(
    bad,
    f"mtjax: non-finite task gradients given to {method} (NaN/inf in a task gradient). Check the loss "
    "for NaN/inf (log of 0, division by zero, exploding logits).",
  )


def db_mtl(
  *,
  num_tasks: int,
  beta: float | jax.Array = 0.9,
  beta_sigma: float | jax.Array = 0.0,
  eps: float | jax.Array = 1e-8,
  shared: tree_lib.SharedSpec = None,
) -> optax.GradientTransformationExtraArgs:
  r"""DB-MTL (Dual-Balancing MTL): log-transformed losses, then every task's gradient EMA scaled to the largest.

  Loss-scale balancing: each task contributes the gradient of :math:`\log(L_i + \epsilon)`,
  i.e. :math:`g_i / (L_i + \epsilon)`. Gradient-magnitude balancing: at step :math:`k` (from 1)
  an exponential moving average of those gradients is kept per task,

  .. math::
    h_i \leftarrow \beta_k \, h_i + (1 - \beta_k) \, \frac{g_i}{L_i + \epsilon},
    \qquad \beta_k = \beta / k^{\sigma}, \qquad h_i^{(0)} = 0,

  and the update on the shared parameters rescales every task's EMA to the largest norm among
  them,

  .. math::
    d = \sum_i \alpha_i \, h_i, \qquad \alpha_i = \frac{\max_j \|h_j\|}{\|h_i\|},

  with norms over the shared leaves only. Task-specific leaves (``shared=`` mask False) get the
  plain sum of the log-loss gradients :math:`\sum_i g_i / (L_i + \epsilon)` (no EMA, no
  rescaling), as in the authors' code, where each head receives the gradient of its own
  :math:`\log L_i`.

  Paper and code: the EMA form, :math:`\beta_k = \beta / k^\sigma` (``beta_sigma``), the
  :math:`\epsilon = 10^{-8}` inside the log and the defaults ``beta=0.9``, ``beta_sigma=0`` are
  those of the authors' code (LibMTL's ``DB_MTL``). The code divides by :math:`\|h_i\| + 10^{-8}`;
  here :math:`\alpha_i = \max_j \|h_j\| / \|h_i\|` exactly, and a task whose EMA is zero gets
  :math:`\alpha_i = 0` (its :math:`h_i` is zero anyway), so zero gradients stay finite.

  It works on the leaves (the EMA is per coordinate), not through the Gram core: a deferred
  :class:`~mtjax.TaskJacobian` is materialized (T backward passes), and sparse embedding-table
  rows (:class:`~mtjax.SparseRows`) are densified. Memory: the state holds ``T`` copies of the
  shared parameters (``[T, P_shared]``). Needs ``task_losses`` (positive: a loss at or below
  :math:`-\epsilon` makes the log undefined).

  .. warning::
    Must be first in an ``optax.chain``: it consumes per-task gradients (every leaf
    ``[T, *param.shape]``, e.g. from :func:`mtjax.task_grads`) and emits params-shaped updates.
    Do not wrap it in ``optax.MultiSteps``.

  Examples:
    >>> import jax.numpy as jnp, optax, mtjax
    >>> params = {'w': jnp.zeros(2)}
    >>> task_grads = {'w': jnp.array([[2., 0.], [0., 1.]])}
    >>> tx = optax.chain(mtjax.db_mtl(num_tasks=2, beta=0.0), optax.sgd(1.0))
    >>> state = tx.init(params)
    >>> updates, state = tx.update(task_grads, state, params, task_losses=jnp.array([1., 4.]))
    >>> print(-updates['w'])  # log-loss gradients [2, 0] and [0, 0.25], both scaled to norm 2
    [2. 2.]
    >>> print(state[0].alpha)
    [1. 8.]

  Args:
    num_tasks: number of tasks ``T`` (required: it shapes the EMA in the state).
    beta: EMA rate :math:`\beta \in [0, 1)` (traceable).
    beta_sigma: decay exponent :math:`\sigma \ge 0` of :math:`\beta_k = \beta / k^\sigma`
      (traceable; 0: a constant rate).
    eps: :math:`\epsilon` inside :math:`\log(L_i + \epsilon)` (traceable; 0 for the plain log).
    shared: shared-parameter mask (see :func:`mtjax.shared_mask`).

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with state :class:`DBMTLState`.

  References:
    Lin, Jiang, Ye, Zhang, Chen, Chen, Liu, Tsang, Kwok, *Dual-Balancing for Multi-Task
    Learning*, Neural Networks, 2025 (arXiv 2023). https://arxiv.org/abs/2308.12029
  """
  method = "db_mtl"
  if not isinstance(num_tasks, int) or isinstance(num_tasks, bool) or num_tasks < 1:
    raise ValueError(
      f"mtjax: db_mtl: num_tasks must be a positive int (it shapes the gradient EMA in the state), "
      f"got {num_tasks!r}. Pass db_mtl(num_tasks=T)."
    )
  if isinstance(beta, (int, float)) and not 0 <= beta < 1:
    raise ValueError(f"mtjax: db_mtl: beta must be in [0, 1), got {beta!r}.")
  if isinstance(beta_sigma, (int, float)) and beta_sigma < 0:
    raise ValueError(f"mtjax: db_mtl: beta_sigma must be >= 0, got {beta_sigma!r}.")
  if isinstance(eps, (int, float)) and eps < 0:
    raise ValueError(f"mtjax: db_mtl: eps must be >= 0, got {eps!r}.")

  def init_fn(params):
    composition.check_not_wrapped("db_mtl")  # optax.MultiSteps / masked / apply_if_finite around it
    dtype = weighting.params_dtype(params)
    return DBMTLState(
      count=jnp.zeros((), jnp.int32),
      grads_ema=shared_state_tree(params, num_tasks, shared),
      alpha=jnp.ones((num_tasks,), dtype),
      weights=jnp.ones((num_tasks,), dtype),
    )

  def update_fn(updates, state, params=None, *, task_losses=None, **extra_args):
    del extra_args
    leaves, treedef, mask, t, losses, losses_check = prepare_leaves(
      updates, params, num_tasks=num_tasks, shared=shared, method=method, task_losses=task_losses, losses_required=True
    )
    ema_leaves = jax.tree.leaves(state.grads_ema)
    check_state_tree(ema_leaves, leaves, mask, method, "gradient EMA")
    dtype = state.alpha.dtype
    shifted = losses.astype(dtype) + jnp.asarray(eps, dtype)
    losses_ok = numerics.condition_check(
      jnp.any(shifted <= 0),
      lambda v: f"mtjax: db_mtl: log(L_i + eps) needs L_i + eps > 0, got {np.asarray(v).tolist()}.",
      shifted,
    )
    scale = numerics.safe_div(jnp.ones_like(shifted), shifted)  # 1 / (L_i + eps)
    count = optax.safe_increment(state.count)
    b = jnp.asarray(beta, dtype) / jnp.power(count.astype(dtype), jnp.asarray(beta_sigma, dtype))

    def per_task(x, s):
      return x * jnp.reshape(s, (-1,) + (1,) * (x.ndim - 1))

    new_ema, out_ts = [], {}
    for i, (leaf, ema, m) in enumerate(zip(leaves, ema_leaves, mask)):
      acc = numerics.gram_dtype(leaf.dtype)
      g_log = per_task(leaf.astype(acc), scale.astype(acc))
      if m:
        new_ema.append((b.astype(acc) * ema.astype(acc) + (1 - b.astype(acc)) * g_log).astype(ema.dtype))
      else:
        new_ema.append(ema)
        out_ts[i] = jnp.sum(g_log, axis=0).astype(leaf.dtype)
    shared_rows = [e for e, m in zip(new_ema, mask) if m]
    _, sq = task_sq_norms(shared_rows, dtype)
    norms = jnp.sqrt(sq)  # the true norms over their common factor `top`, which cancels in alpha
    alpha = numerics.safe_div(jnp.max(norms), norms)
    out = []
    for i, (leaf, ema, m) in enumerate(zip(leaves, new_ema, mask)):
      if m:
        acc = ema.dtype
        out.append(jnp.tensordot(alpha.astype(acc), ema, axes=1, precision=numerics.HIGHEST).astype(leaf.dtype))
      else:
        out.append(out_ts[i])
    out = numerics.enforce(out, losses_check, losses_ok, nonfinite_grads_check(leaves, method))
    new_state = DBMTLState(
      count=count,
      grads_ema=jax.tree.unflatten(jax.tree.structure(state.grads_ema), new_ema),
      alpha=alpha.astype(state.alpha.dtype),
      weights=scale.astype(state.weights.dtype),
    )
    return jax.tree_util.tree_unflatten(treedef, out), new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
