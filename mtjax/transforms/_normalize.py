"""Gradient normalization wrapper: any mtjax method on per-task normalized gradients (l2 / loss / loss+)."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mtjax._src import numerics
from mtjax._src import rows as rows_lib
from mtjax._src import tree as tree_lib
from mtjax._src import weighting
from mtjax._src.sparse import SparseRows
from mtjax._src.task_grads import TaskJacobian
from mtjax._src.task_grads import is_lazy

NORMALIZATIONS = ("none", "l2", "loss", "loss+")


class NormalizeState(NamedTuple):
  """State of :func:`normalize`.

  Attributes:
    weights: the wrapped method's recorded weights divided by the normalizers, :math:`w_i / n_i`:
      the coefficients of the *raw* task gradients on the shared leaves (``[T]`` or ``[K, T]``;
      empty when the wrapped method records none).
    inner_state: the wrapped method's state.
  """

  weights: jax.Array
  inner_state: Any


def _scaled_vjp(vjp_fn, scale, c):
  return vjp_fn(c * scale.astype(c.dtype))


def _leaf_sq_norms(leaf, dtype, top) -> jax.Array:
  if isinstance(leaf, SparseRows):
    _, s = leaf.segments()
    x = s.astype(dtype) / top
  else:
    x = jnp.asarray(leaf).astype(dtype) / top
  return jnp.sum(jnp.square(x), axis=tuple(range(1, x.ndim)))


def _scale_leaf(leaf, normalizers):
  def div(x):
    n = jnp.reshape(normalizers, (-1,) + (1,) * (x.ndim - 1))
    acc = numerics.gram_dtype(x.dtype)
    return numerics.safe_div(x.astype(acc), n.astype(acc)).astype(x.dtype)

  if isinstance(leaf, SparseRows):
    return leaf.map_rows(div)
  return div(jnp.asarray(leaf))


def normalize(
  inner: optax.GradientTransformationExtraArgs,
  normalization: str = "l2",
  *,
  shared: tree_lib.SharedSpec = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Runs ``inner`` on per-task normalized gradients :math:`g_i / n_i` (on the shared leaves).

  With normalizers :math:`n_i` as in :func:`mtjax.mgda`'s ``normalization``: ``"none"`` (1),
  ``"l2"`` (:math:`\|g_i\|`, the norm over the shared leaves), ``"loss"`` (:math:`L_i`) or
  ``"loss+"`` (:math:`L_i \|g_i\|`), the shared leaves' rows of every task are divided by
  :math:`n_i` and handed to ``inner``; task-specific leaves (``shared=`` mask False) keep their
  raw gradients, so ``inner``'s own ``task_specific`` handling applies to them unchanged. So

  ``optax.chain(mtjax.normalize(mtjax.upgrad(num_tasks=T)), optax.adam(1e-3))``

  is UPGrad on unit-norm task gradients. Any transform that consumes per-task gradients works as
  ``inner`` (Gram-based methods, GradDrop, DB-MTL, ...); ``task_losses`` and every other extra
  argument pass through to it. A zero normalizer (a zero gradient, or a zero loss) gives that
  task a zero row (scale 0; with ``"l2"`` the row was zero anyway); ``"loss"``/``"loss+"``
  need ``task_losses`` and raise on a negative loss.

  Deferred Jacobians (``mtjax.task_grads(..., deferred=True)``): with ``"loss"`` and no
  ``shared=`` mask the normalization is the cotangent scaling :math:`J^\top \mathrm{diag}(1/L)`,
  so ``inner`` still gets a deferred Jacobian (e.g. a loss-only method stays one backward pass);
  otherwise the norms need the rows, and the Jacobian is materialized (T backward passes).

  ``shared`` is the wrapper's own mask (which leaves define and receive the normalization); pass
  the same mask as to ``inner``.

  Examples:
    >>> import jax.numpy as jnp, optax, mtjax
    >>> params = {'w': jnp.zeros(2)}
    >>> task_grads = {'w': jnp.array([[3., 4.], [0., 0.5]])}
    >>> tx = optax.chain(mtjax.normalize(mtjax.linear(num_tasks=2), "l2"), optax.sgd(1.0))
    >>> state = tx.init(params)
    >>> updates, state = tx.update(task_grads, state, params)
    >>> print(-updates['w'])  # [0.6, 0.8] + [0, 1]
    [0.6 1.8]
    >>> print(state[0].weights)  # coefficients of the raw gradients: 1 / ||g_i||
    [0.2 2. ]

  Args:
    inner: the mtjax transform to run on the normalized gradients.
    normalization: ``"none"``, ``"l2"``, ``"loss"`` or ``"loss+"``.
    shared: shared-parameter mask (see :func:`mtjax.shared_mask`).

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with state :class:`NormalizeState`.

  References:
    Sener and Koltun, *Multi-Task Learning as Multi-Objective Optimization*, NeurIPS 2018
    (the normalizations of its released code). https://arxiv.org/abs/1810.04650
  """
  if normalization not in NORMALIZATIONS:
    raise ValueError(f"mtjax: normalize: normalization must be one of {NORMALIZATIONS}, got {normalization!r}.")
  if not (hasattr(inner, "init") and hasattr(inner, "update")):
    raise ValueError(f"mtjax: normalize wraps an mtjax transform (e.g. mtjax.upgrad(num_tasks=T)), got {inner!r}.")
  uses_losses = normalization in ("loss", "loss+")
  uses_norms = normalization in ("l2", "loss+")

  def init_fn(params):
    inner_state = inner.init(params)
    w = getattr(inner_state, "weights", None)
    w = jnp.zeros((0,), jnp.float32) if w is None else jnp.asarray(w)
    return NormalizeState(weights=jnp.array(w), inner_state=inner_state)

  def update_fn(updates, state, params=None, *, task_losses=None, **extra_args):
    if normalization == "none":
      out, inner_state = inner.update(updates, state.inner_state, params, task_losses=task_losses, **extra_args)
      return out, _record(state, inner_state, None)
    lazy = is_lazy(updates)
    struct = updates.shapes() if lazy else updates
    t = tree_lib.check_task_axis(struct, None, name="the task gradients given to normalize")
    tree_lib.check_params_match(struct, params)
    losses, losses_check = weighting.check_task_losses(
      task_losses, t, required=uses_losses, method=f"normalize(normalization={normalization!r})", check_finite=True
    )
    dtype = weighting.params_dtype(params) if params is not None else jnp.float32
    normalizers = jnp.ones((t,), dtype)
    checks = [losses_check]
    if uses_losses:
      losses = losses.astype(dtype)
      checks.append(
        numerics.condition_check(
          jnp.any(losses < 0),
          f"mtjax: normalize: normalization={normalization!r} divides by the task losses, which must be "
          "non-negative; got a negative loss. Use normalization='l2' for losses that can be negative.",
        )
      )
      normalizers = losses
    if lazy and normalization == "loss" and shared is None and type(updates) is TaskJacobian:
      scale = numerics.safe_div(jnp.ones_like(normalizers), normalizers)
      scale = jnp.where(jnp.isfinite(scale), scale, 0)
      scale = numerics.enforce(scale, *checks)
      grads = TaskJacobian(
        jax.tree_util.Partial(_scaled_vjp, updates.vjp_fn, scale),
        updates.num_tasks,
        updates.dtype,
        updates.strategy,
        updates.param_struct,
        updates.plan,
        updates.ids,
        updates.chunk_size,
      )
      out, inner_state = inner.update(grads, state.inner_state, params, task_losses=task_losses, **extra_args)
      return out, _record(state, inner_state, normalizers)
    if lazy:
      updates = updates.materialize()
    updates = rows_lib.upcast_rows(updates, params)  # mixed precision: normalized rows in float32
    leaves, treedef = rows_lib.flatten(updates)
    mask = tree_lib.resolve_shared(shared, updates, params)
    idx = [i for i, m in enumerate(mask) if m]
    if not idx:
      raise ValueError("mtjax: normalize: the shared= mask marks no leaf as shared; nothing to normalize.")
    if uses_norms:
      vals = [leaves[i].values if isinstance(leaves[i], SparseRows) else jnp.asarray(leaves[i]) for i in idx]
      top = jnp.max(jnp.stack([jnp.max(jnp.abs(v)).astype(dtype) for v in vals]))
      top = jnp.where((top > 0) & jnp.isfinite(top), top, jnp.ones_like(top))
      sq = sum(_leaf_sq_norms(leaves[i], dtype, top) for i in idx)
      norms = jnp.sqrt(sq) * top  # a norm beyond the dtype's range is inf: scale 0 by safe_div's where below
      normalizers = normalizers * norms
    normalizers = numerics.enforce(normalizers, *checks)
    scaled = [_scale_leaf(leaf, normalizers) if m else leaf for leaf, m in zip(leaves, mask)]
    grads = jax.tree_util.tree_unflatten(treedef, scaled)
    out, inner_state = inner.update(grads, state.inner_state, params, task_losses=task_losses, **extra_args)
    return out, _record(state, inner_state, normalizers)

  def _record(state, inner_state, normalizers):
    w = getattr(inner_state, "weights", None)
    if w is None or np.size(w) == 0 or np.size(state.weights) == 0:
      return NormalizeState(weights=state.weights, inner_state=inner_state)
    w = jnp.asarray(w)
    if normalizers is not None:
      w = numerics.safe_div(w, normalizers.astype(w.dtype))
    return NormalizeState(
      weights=jnp.broadcast_to(w, state.weights.shape).astype(state.weights.dtype), inner_state=inner_state
    )

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def normalize_by_name(
  inner: str = "upgrad",
  normalization: str = "l2",
  *,
  num_tasks=None,
  shared=None,
  key=None,
  steps_per_epoch=None,
  **inner_kwargs,
) -> optax.GradientTransformationExtraArgs:
  """:func:`normalize` around a method named in the experiment registry (``mtjax.experiment.METHODS``).

  An experiment config names it as ``{"name": "normalize", "inner": "upgrad", "normalization": "l2",
  ...}``; the other keys go to the inner method, and ``num_tasks`` / ``shared`` / ``key`` /
  ``steps_per_epoch`` reach it when its factory takes them.
  """
  import inspect  # pylint: disable=import-outside-toplevel

  from mtjax.experiment import _registry as reg  # pylint: disable=import-outside-toplevel

  if inner not in reg.METHODS or inner == "normalize":
    raise ValueError(
      f"mtjax: normalize: inner must name a method of the registry, got {inner!r}; known: "
      f"{', '.join(sorted(n for n in reg.METHODS if n != 'normalize'))}."
    )
  factory = reg.METHODS[inner]
  params = inspect.signature(factory).parameters
  passed = dict(num_tasks=num_tasks, shared=shared, key=key, steps_per_epoch=steps_per_epoch)
  for name, value in passed.items():
    if value is not None and name in params and name not in inner_kwargs:
      inner_kwargs[name] = value
  return normalize(factory(**inner_kwargs), normalization, shared=shared)
