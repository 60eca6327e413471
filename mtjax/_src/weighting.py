"""The Gram-weighting core on which most mtjax transforms are a weights function.

A method supplies ``weights_fn(inputs, state) -> (weights, new_state)`` where ``inputs`` is a
:class:`WeightingInputs`:

* ``inputs.grams`` is a ``[K, T, T]`` stack of task Gram matrices ``G_k = J_k J_k^T``, one per parameter
  group ``k`` of the *shared* leaves (``K = 1`` for a whole-model Gram), accumulated leaf by leaf
  with one small ``matmul`` per leaf -- parameters are never concatenated into one vector;
  ``None`` when the method declared ``needs_gram=False``.
* ``inputs.task_losses`` is the ``[T]`` loss vector (or ``None``), ``inputs.num_tasks`` is ``T``;
* ``weights`` is ``[T]`` (one coefficient per task for every shared leaf) or ``[K, T]`` (one
  coefficient vector per group).

The core then forms ``update_leaf = sum_t w_t * g_t`` per shared leaf, and the plain task sum (or
the weighted sum, ``task_specific="weighted"``) for task-specific leaves. Everything stays on
device under ``jit``. The core also validates the task axis, ``num_tasks``, ``task_losses`` and
finiteness (NaN/inf gradients show up on the Gram diagonal for free; the leaves outside every Gram
get one ``isfinite`` reduction each).

Degenerate Grams (see :func:`guard_grams`): a Gram that is not finite never reaches the weights
function (it gets zeros, and the runtime check raises), so no solver or LAPACK call (pinv, eigh)
ever runs on NaN/inf. A Gram that overflows although the gradients are finite, or underflows
(largest diagonal below ``sqrt(tiny)``), is recomputed, for the methods built with
``rescale_gram=True`` (every built-in Gram method), on the rows times a common power of two
``2^-e`` (exact in floating point), and ``inputs.gram_log2_scale`` (``-2e``; ``0`` otherwise) tells
the weights function that ``inputs.grams = 2^gram_log2_scale * G``; a method without it raises a
``ValueError`` saying that the Gram overflows.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mtjax._src import composition
from mtjax._src import numerics
from mtjax._src import rows as rows_lib
from mtjax._src import tree as tree_lib
from mtjax._src.sparse import SparseRows
from mtjax._src.task_grads import is_lazy

PyTree = Any
# A str, or a callable on ONE leaf path -> group name / int id / None (left out); the older form, a
# callable on the list of paths -> one int id per path, is still accepted (see group_ids).
GroupSpec = Union[None, str, Callable[[str], Union[str, int, None]], Callable[[Sequence[str]], Sequence[int]]]


class WeightingInputs(NamedTuple):
  """What a weights function sees at each step."""

  grams: Optional[jax.Array]  # [K, T, T] Gram matrices of the shared leaves, or None
  task_losses: Optional[jax.Array]  # [T] or None
  num_tasks: int  # static T
  # grams = 2**gram_log2_scale * (the true Gram): nonzero only for a method built with rescale_gram=True
  # whose Gram would overflow (see guard_grams); a scalar in the Gram's dtype (traced under jit).
  gram_log2_scale: Any = 0.0


WeightsFn = Callable[[WeightingInputs, Any], tuple]

GRANULARITIES = ("model", "layer", "leaf")


def layer_name(path: str) -> str:
  """The layer a leaf belongs to: its path without the last component (``Dense_0/kernel`` -> ``Dense_0``)."""
  return path.rsplit("/", 1)[0] if "/" in path else path


def group_ids(groups: GroupSpec, paths: Sequence[str]) -> list[int]:
  """Static group index per shared leaf; ``-1`` leaves a leaf out of every Gram.

  Args:
    groups: ``None`` or ``"model"`` (one group), ``"layer"`` (leaves sharing a parent path, e.g. a
      Dense layer's kernel and bias), ``"leaf"`` (one group per parameter tensor), or a callable on
      one leaf path (see :func:`group_labels`).
    paths: the ``'/'``-joined paths of the shared leaves.
  """
  return group_labels(groups, paths)[0]


def group_labels(groups: GroupSpec, paths: Sequence[str]) -> tuple[list[int], list[str]]:
  """Group index per shared leaf (``-1``: left out) and one label per group.

  A callable ``groups`` maps ONE leaf path (``'trunk/Dense_0/kernel'``) to a group name (``str``;
  groups are numbered in order of first appearance and labelled with the name), an ``int`` id
  (labelled ``group_<id>``), or ``None`` (the leaf is left out of every group). The older form, a
  callable on the list of all paths returning one ``int`` id per path (``-1``: left out), is still
  accepted: a callable is first called with the list, and its result is used as ids when it is a
  sequence of ints; otherwise it is called once per path.

  Example:
    >>> from mtjax._src import weighting
    >>> paths = ['trunk/Dense_0/kernel', 'trunk/Dense_1/kernel', 'head/kernel']
    >>> weighting.group_labels(lambda p: p.split('/')[0], paths)
    ([0, 0, 1], ['trunk', 'head'])
    >>> weighting.group_labels(lambda p: None if p.startswith('head') else p.split('/')[1], paths)
    ([0, 1, -1], ['Dense_0', 'Dense_1'])
    >>> weighting.group_labels(lambda ps: [0 if 'trunk' in p else -1 for p in ps], paths)  # list form
    ([0, 0, -1], ['group_0'])
  """
  paths = list(paths)
  if groups is None or groups == "model":
    return [0] * len(paths), ["model"]
  if groups == "leaf":
    return list(range(len(paths))), paths
  if groups == "layer":
    names: dict[str, int] = {}
    return [names.setdefault(layer_name(p), len(names)) for p in paths], list(names)
  if callable(groups):
    return _callable_groups(groups, paths)
  raise ValueError(f"mtjax: unknown granularity {groups!r}; expected one of {GRANULARITIES} or a callable.")


def _int_ids(out) -> Optional[list[int]]:
  """``out`` as a list of ints when it is a sequence of ints (the list form's result), else ``None``."""
  if isinstance(out, np.ndarray) and out.dtype.kind in "biu" and out.ndim == 1:
    return [int(i) for i in out]
  if isinstance(out, (list, tuple)) and all(isinstance(i, (int, np.integer)) for i in out):
    return [int(i) for i in out]
  return None


def _numbered_labels(ids: list[int]) -> list[str]:
  return [f"group_{i}" for i in range(max(ids, default=-1) + 1)]


def _callable_groups(fn, paths: list[str]) -> tuple[list[int], list[str]]:
  list_error = None
  try:
    ids = _int_ids(fn(list(paths)))  # the list form: paths -> ids
  except Exception as e:  # pylint: disable=broad-exception-caught  # e.g. a per-leaf fn doing str ops on a list
    ids, list_error = None, e
  if ids is not None:
    if len(ids) != len(paths):
      raise ValueError(f"mtjax: groups callable returned {len(ids)} ids for {len(paths)} shared leaves.")
    return ids, _numbered_labels(ids)
  try:
    keys = [fn(p) for p in paths]  # the per-leaf form: path -> name / id / None
  except Exception:
    if list_error is not None and not isinstance(list_error, (TypeError, AttributeError)):
      raise list_error from None  # a list-form callable's own error (e.g. a ValueError it raises)
    raise
  bad = [(p, k) for p, k in zip(paths, keys) if k is not None and not isinstance(k, (str, int, np.integer))]
  if bad or (any(isinstance(k, str) for k in keys) and any(isinstance(k, (int, np.integer)) for k in keys)):
    if list_error is not None and not isinstance(list_error, (TypeError, AttributeError)):
      raise list_error
    got = f"{type(bad[0][1]).__name__} for '{bad[0][0]}'" if bad else "both names and int ids"
    raise ValueError(
      "mtjax: a granularity (groups) callable maps one leaf path, e.g. 'trunk/Dense_0/kernel', to a group "
      f"name (str), an int id, or None to leave the leaf out (or, the older form, maps the list of all paths "
      f"to one int id per path); it returned {got}."
    )
  if any(isinstance(k, str) for k in keys):
    names: dict[str, int] = {}
    return [-1 if k is None else names.setdefault(k, len(names)) for k in keys], list(names)
  ids = [-1 if k is None else int(k) for k in keys]
  return ids, _numbered_labels(ids)


GramLeavesSpec = Union[None, str, Sequence[str], Callable[[Sequence[str]], Sequence[bool]]]


def gram_leaf_flags(gram_leaves: GramLeavesSpec, paths: Sequence[str], method: str = "mtjax") -> list[bool]:
  """Which shared leaves enter the Gram: all (``None``), path regexes (``re.search``) or a callable."""
  if gram_leaves is None:
    return [True] * len(paths)
  if callable(gram_leaves):
    flags = [bool(f) for f in gram_leaves(list(paths))]
    if len(flags) != len(paths):
      raise ValueError(
        f"mtjax: {method}: gram_leaves callable returned {len(flags)} flags for {len(paths)} shared leaves."
      )
  else:
    import re  # pylint: disable=import-outside-toplevel

    pats = [gram_leaves] if isinstance(gram_leaves, str) else list(gram_leaves)
    regs = [re.compile(p) for p in pats]
    flags = [any(r.search(p) for r in regs) for p in paths]
  if paths and not any(flags):
    raise ValueError(
      f"mtjax: {method}: gram_leaves={gram_leaves!r} selects none of the shared leaves "
      f"{list(paths)[:8]}{' ...' if len(paths) > 8 else ''}."
    )
  return flags


def num_groups(groups: GroupSpec, params: PyTree, shared: tree_lib.SharedSpec) -> int:
  """Number of Gram groups ``K`` for ``params`` (used by ``init`` to shape per-group state)."""
  probe = jax.tree.map(lambda p: jax.ShapeDtypeStruct((1,) + jnp.shape(p), jnp.result_type(p)), params)
  mask = tree_lib.resolve_shared(shared, probe, params)
  paths = [p for p, m in zip(tree_lib.leaf_paths(params), mask) if m]
  ids = group_ids(groups, paths)
  return max(ids) + 1 if ids and max(ids) >= 0 else 0


def check_task_losses(task_losses, num_tasks: int, *, required: bool, method: str, check_finite: bool):
  """Validates ``task_losses`` (shape ``[T]``; finite when concrete).

  Returns ``(task_losses or None, pending)``: ``pending`` is the device-side finiteness
  :class:`~mtjax._src.numerics.Check` for traced losses (``None`` otherwise), for the caller to
  :func:`~mtjax._src.numerics.enforce` on something the update depends on.
  """
  composition.check_first_in_chain(method)  # every method's update calls this: no optimizer before it
  if task_losses is None:
    if required:
      raise ValueError(
        f"mtjax: {method} needs the per-task losses: call tx.update(task_grads, state, params, "
        "task_losses=losses) with losses of shape [T] (mtjax.task_grads returns them)."
      )
    return None, None
  task_losses = jnp.asarray(task_losses)
  if task_losses.shape != (num_tasks,):
    raise ValueError(
      f"mtjax: {method}: task_losses must have shape ({num_tasks},) (one loss per task), got {task_losses.shape}."
    )
  pending = numerics.finite_check(task_losses, f"task losses passed to {method}") if check_finite else None
  return task_losses, pending


def compute_grams(shared_leaves: Sequence[Any], ids: Sequence[int], k: int) -> jax.Array:
  """``[K, T, T]`` Gram stack: per-leaf Grams (dense or :class:`SparseRows`) summed into their groups."""
  return rows_lib.compute_grams(shared_leaves, ids, k)


def _row_values(leaf) -> jax.Array:
  """The stored task-gradient entries of one leaf (a dense array, or a :class:`SparseRows`' values)."""
  return leaf.values if isinstance(leaf, SparseRows) else jnp.asarray(leaf)


def _pow2(k: jax.Array, dtype) -> jax.Array:
  """``2**k`` exactly (``jnp.exp2`` is not exact) for an integer ``k`` with ``|k| <= 126``, in ``dtype``."""
  dtype = jnp.dtype(dtype)
  if dtype == jnp.float64:
    bits = (k.astype(jnp.int64) + 1023) << 52
    return jax.lax.bitcast_convert_type(bits, jnp.float64)
  bits = (k.astype(jnp.int32) + 127) << 23
  return jax.lax.bitcast_convert_type(bits, jnp.float32).astype(dtype)


def _scale_rows(leaf, e: jax.Array, dtype):
  """``leaf * 2**-e`` in ``dtype`` (two exact power-of-two factors, so no step leaves the normal range)."""
  h1 = -(e // 2)
  h2 = -e - h1

  def mul(x):
    return x.astype(dtype) * _pow2(h1, dtype) * _pow2(h2, dtype)

  if isinstance(leaf, SparseRows):
    return SparseRows(leaf.ids, mul(leaf.values), leaf.table_shape)
  return mul(leaf)


def guard_grams(
  grams: jax.Array, leaves: Optional[Sequence[Any]], layout: rows_lib.Layout, *, rescale: bool, check_finite: bool
):
  """Makes the Gram stack safe for the weights function.

  * If ``grams`` is not finite (overflow) or, with ``rescale``, its largest diagonal is below
    ``sqrt(tiny)`` of the dtype (underflow: the smaller products are subnormal or zero), and the
    rows (``leaves``, ``None`` for a lazy Jacobian) are known, the largest absolute entry of each
    Gram leaf is measured (only then: a ``lax.cond``); with ``rescale`` the Gram is recomputed on
    the rows times ``2**-e``, ``2**(e-1) <= max |entry| < 2**e``, which is finite and in the normal
    range for finite rows.
  * A Gram that is still not finite is replaced by zeros, so that no solver or LAPACK routine runs
    on NaN/inf (those can hang under ``jit``); the returned check raises instead, saying whether the
    gradients hold NaN/inf or the Gram of finite gradients overflows.

  Returns ``(grams, gram_log2_scale, check)``: ``grams = 2**gram_log2_scale * G``.
  """
  dtype = grams.dtype
  method = layout.method
  idx = [i for i, g in enumerate(layout.group) if g >= 0] if leaves is not None else []
  zero = jnp.zeros((), dtype)
  ntops = max(len(idx), 1)

  def keep(_):
    return grams, zero, jnp.zeros((ntops,), dtype)

  def fallback(_):
    if not idx:  # rows unknown (lazy Jacobian): NaN marks "could not tell"
      return grams, zero, jnp.full((ntops,), jnp.nan, dtype)
    tops = jnp.stack([jnp.max(jnp.abs(_row_values(leaves[i]))).astype(dtype) for i in idx])
    if not rescale:
      return grams, zero, tops
    top = jnp.max(jnp.where(jnp.isfinite(tops), tops, 0))
    _, e = jnp.frexp(jnp.where(top > 0, top, 1).astype(dtype))
    e = jnp.where(top > 0, e, 0).astype(jnp.int32)  # all-zero rows: scale by 1
    scaled = [_scale_rows(leaf, e, dtype) if layout.group[i] >= 0 else leaf for i, leaf in enumerate(leaves)]
    new = rows_lib.compute_grams(scaled, layout.group, max(layout.num_groups, 1)).astype(dtype)
    return new, (-2 * e).astype(dtype), tops

  # Rescale (and measure) when the Gram is not finite, or when its largest diagonal is below
  # sqrt(tiny): then the products g_i * g_j of the smaller entries are subnormal or zero (float32
  # gradient entries below ~1e-10 * scale), and the weights would come from rounding noise.
  diag = jnp.diagonal(grams, axis1=-2, axis2=-1)
  underflow = jnp.max(jnp.where(jnp.isfinite(diag), diag, 0)) < np.sqrt(np.finfo(dtype).tiny)
  if not rescale:
    underflow = jnp.zeros((), bool)  # nothing to do on underflow without a rescale
  grams, log2_scale, tops = jax.lax.cond(jnp.all(jnp.isfinite(grams)) & ~underflow, keep, fallback, None)
  finite = jnp.all(jnp.isfinite(grams))
  safe = jnp.where(finite, grams, jnp.zeros_like(grams))
  if not check_finite:
    return safe, log2_scale, None
  dtype_name = jnp.dtype(dtype).name

  def message(operand):
    diag, tops = operand if operand is not None else (None, None)
    tops = np.asarray(tops) if tops is not None else np.full((1,), np.nan)
    if leaves is not None and np.all(np.isfinite(tops)):
      return (
        f"mtjax: {method}: the task gradients' Gram overflows {dtype_name} (gradient entries up to "
        f"~{float(np.max(tops)):.3g}, so squared norms beyond {float(jnp.finfo(dtype).max):.3g}); the "
        "gradients themselves are finite. Scale the losses down, clip the gradients before this transform, "
        "or use float64 (jax.config.update('jax_enable_x64', True))."
      )
    text = numerics._nonfinite_message(f"task gradients given to {method}", diag)  # pylint: disable=protected-access
    if leaves is None:
      text += f" (If the gradients are finite, their Gram overflows {dtype_name}: scale the losses down.)"
    return text

  check = numerics.condition_check(~finite, message, (jnp.diagonal(grams, axis1=-2, axis2=-1), tops))
  return safe, log2_scale, check


def leaves_finite_check(values: Sequence[Any], idx: Sequence[int], layout: rows_lib.Layout, what: str):
  """One ``isfinite`` reduction per leaf ``idx`` of ``values`` (rows or update leaves), as one check naming them."""
  if not idx:
    return None
  paths = [layout.paths[i] for i in idx]
  flags = jnp.stack([jnp.logical_not(jnp.all(jnp.isfinite(_row_values(values[i])))) for i in idx])

  def message(operand):
    bad = np.asarray(operand).reshape(-1, len(paths)).any(axis=0) if operand is not None else [True] * len(paths)
    names = [p for p, b in zip(paths, bad) if b]
    return (
      f"mtjax: non-finite task gradients given to {layout.method} detected in the leaves {names} ({what}). "
      "Check the loss for NaN/inf (log of 0, division by zero, exploding logits) before the gradient method "
      "sees it."
    )

  return numerics.condition_check(jnp.any(flags), message, flags)


# Extra argument of ``update`` through which a wrapper (mtjax.amortized) hands the core fixed task
# weights: the weights function is skipped, the state is returned unchanged.
FIXED_WEIGHTS = "mtjax_fixed_weights"
# Attribute set on the update function of every transform built here (mtjax.amortized checks it).
CORE_MARK = "mtjax_gram_core"


def gram_weighting(
  weights_fn: WeightsFn,
  init_state_fn: Callable[[PyTree], Any],
  *,
  method: str,
  num_tasks: Optional[int] = None,
  shared: tree_lib.SharedSpec = None,
  groups: GroupSpec = None,
  needs_gram: bool = True,
  requires_task_losses: bool = False,
  task_specific: str = "sum",
  check_finite: bool = True,
  record_weights: bool = True,
  gram_leaves: GramLeavesSpec = None,
  rescale_gram: bool = False,
) -> optax.GradientTransformationExtraArgs:
  """Builds a multi-task transform from a weights function (see the module docstring).

  Args:
    weights_fn: ``(inputs: WeightingInputs, state) -> (weights, new_state)``.
    init_state_fn: ``params -> state`` (a NamedTuple). If the state has a ``weights`` field of
      nonzero size, the core stores the weights used at each step there (for logging).
    method: name used in error messages.
    num_tasks: expected size of the task axis (``None``: inferred, not checked).
    shared: which leaves are shared (pytree of bools, callable ``params -> mask`` or ``None`` = all).
    groups: Gram grouping of the shared leaves (see :func:`group_ids`).
    needs_gram: whether ``weights_fn`` reads the Gram (``False`` skips computing it).
    requires_task_losses: raise a ``ValueError`` when ``task_losses`` is not passed.
    task_specific: ``"sum"`` (plain sum of task gradients on task-specific leaves, the default of
      the contract) or ``"weighted"`` (apply the task weights there too; needs ``[T]`` weights).
    check_finite: check the Gram diagonal and losses for NaN/inf (one on-device test per update;
      the host is called only when it fails, see ``numerics.enforce``).
    record_weights: store the weights used at each step in the state's ``weights`` field (set
      ``False`` when ``weights_fn`` keeps its own learned weights there, e.g. GradNorm).
    gram_leaves: restrict the Gram to these shared leaves (path regex(es), or a callable
      ``paths -> bools``); the weights still apply to every shared leaf. With a deferred
      :class:`~mtjax.TaskJacobian` only these leaves' rows are computed, and the update is one
      backward pass of ``sum_t w_t L_t`` (the "subset" strategy).
    rescale_gram: ``weights_fn`` handles ``inputs.gram_log2_scale`` (or its weights are invariant to a
      common positive scale of the Gram): a Gram that overflows although the rows are finite is then
      recomputed on rows times a power of two (see :func:`guard_grams`) instead of raising.
  """
  if task_specific not in ("sum", "weighted"):
    raise ValueError(f"mtjax: {method}: task_specific must be 'sum' or 'weighted', got {task_specific!r}.")
  if num_tasks is not None and (not isinstance(num_tasks, int) or num_tasks < 1):
    raise ValueError(f"mtjax: {method}: num_tasks must be a positive int, got {num_tasks!r}.")
  if groups is not None and not callable(groups) and groups not in GRANULARITIES:
    raise ValueError(f"mtjax: {method}: unknown granularity {groups!r}; expected one of {GRANULARITIES}.")

  def init_fn(params):
    composition.check_not_wrapped(method)  # optax.MultiSteps / masked / apply_if_finite around the method
    return init_state_fn(params)

  def update_fn(updates, state, params=None, *, task_losses=None, **extra_args):
    fixed = extra_args.pop(FIXED_WEIGHTS, None)
    del extra_args
    lazy = updates if is_lazy(updates) else None
    struct = lazy.shapes() if lazy is not None else updates
    t = tree_lib.check_task_axis(struct, num_tasks, name=f"the task gradients given to {method}")
    tree_lib.check_params_match(struct, params)
    losses, losses_check = check_task_losses(
      task_losses, t, required=requires_task_losses and fixed is None, method=method, check_finite=check_finite
    )
    flat_with_path, treedef = rows_lib.flatten_with_path(struct)
    leaves = [leaf for _, leaf in flat_with_path]
    paths = [tree_lib.path_str(p) for p, _ in flat_with_path]
    if shared is None:
      mask = lazy.default_mask(len(leaves)) if lazy is not None else [True] * len(leaves)
    else:
      mask = tree_lib.resolve_shared(shared, struct, params)
    shared_idx = [i for i, m in enumerate(mask) if m]

    group = [-1] * len(leaves)
    k = 1
    if shared_idx:
      shared_paths = [paths[i] for i in shared_idx]
      ids = group_ids(groups, shared_paths)
      flags = gram_leaf_flags(gram_leaves, shared_paths, method)
      ids = [i if f else -1 for i, f in zip(ids, flags)]
      for i, gid in zip(shared_idx, ids):
        group[i] = gid
      k = max(ids) + 1 if max(ids) >= 0 else 1
    elif needs_gram and fixed is None:
      raise ValueError(f"mtjax: {method}: the shared= mask marks no leaf as shared; nothing to weight.")
    # Mixed precision: bfloat16 rows of float32 params give a float32 update (the Gram is float32 anyway).
    out_dtypes = rows_lib.update_dtypes(leaves, params)
    layout = rows_lib.Layout(
      tuple(mask), tuple(group), k, task_specific, tuple(paths), method, shared is not None, out_dtypes
    )
    need = needs_gram and fixed is None and bool(shared_idx)
    if lazy is not None:
      grams, combine = lazy.gram_and_combiner(layout, need)
      rows = None
    else:
      grams, combine = rows_lib.rows_gram_and_combiner(leaves, layout, need)
      rows = leaves
    grams_check = leaf_check = None
    log2_scale = 0.0
    outside = [i for i in range(len(leaves)) if group[i] < 0]  # leaves in no Gram (task-specific ones too)
    if grams is not None:
      grams, log2_scale, grams_check = guard_grams(grams, rows, layout, rescale=rescale_gram, check_finite=check_finite)
      if check_finite and rows is not None:
        leaf_check = leaves_finite_check(rows, outside, layout, "outside the Gram")

    if fixed is not None:  # weights handed in by a wrapper (amortized): no solve, state unchanged
      weights, new_state = jnp.asarray(fixed), state
    else:
      weights, new_state = weights_fn(WeightingInputs(grams, losses, t, log2_scale), state)
      weights = jnp.asarray(weights)
    if grams is not None:  # one on-device test of all; every update leaf depends on the weights
      weights = numerics.enforce(weights, losses_check, grams_check, leaf_check)
      losses_check = None

    out = combine(weights)
    if out_dtypes and lazy is not None:  # lazy Jacobians combine by a backward pass in the rows' dtype
      out = [o.astype(d) if o.dtype != d else o for o, d in zip(out, out_dtypes)]

    if grams is not None and rows is None and check_finite:  # lazy rows: check the leaves outside the Gram
      out = numerics.enforce(out, leaves_finite_check(out, outside, layout, "NaN/inf in their update"))
    if grams is None:  # no Gram diagonal to look at: check the update itself
      update_check = weights_check = None
      if check_finite:
        bad = jnp.logical_not(jnp.all(jnp.stack([jnp.all(jnp.isfinite(o)) for o in out])))
        update_check = numerics.condition_check(
          bad,
          f"mtjax: non-finite task gradients given to {method} (NaN/inf in the update). Check "
          "the loss for NaN/inf (log of 0, division by zero, exploding logits); with finite gradients, the "
          "weighted sum of the task gradients overflowed.",
        )
        weights_check = numerics.condition_check(
          jnp.logical_not(jnp.all(jnp.isfinite(weights))),
          lambda w: f"mtjax: {method}: the task weights are not finite ({np.asarray(w).tolist()}).",
          weights,
        )
      out = numerics.enforce(out, losses_check, weights_check, update_check)
    if fixed is None and record_weights and hasattr(new_state, "weights") and jnp.size(new_state.weights) > 0:
      new_state = new_state._replace(
        weights=jnp.broadcast_to(weights, new_state.weights.shape).astype(new_state.weights.dtype)
      )
    return jax.tree_util.tree_unflatten(treedef, out), new_state

  setattr(update_fn, CORE_MARK, True)
  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def static_int(value, name: str, method: str) -> int:
  """A hyperparameter that shapes a loop (an iteration cap) as a static non-negative Python int.

  Raises a ``ValueError`` naming ``optax.inject_hyperparams``' ``static_args`` when ``value`` is
  traced.
  """
  try:
    out = int(np.asarray(value))
  except Exception:  # a tracer: e.g. optax.inject_hyperparams without static_args
    raise ValueError(
      f"mtjax: {method}: {name} must be a static Python int (it sets a solver's loop bound); "
      f"with optax.inject_hyperparams pass static_args=('{name}',)."
    ) from None
  if out < 0 or out != np.asarray(value):
    raise ValueError(f"mtjax: {method}: {name} must be a non-negative int, got {value!r}.")
  return out


def init_weights(num_tasks: Optional[int], num_groups_: int = 0, dtype=jnp.float32) -> jax.Array:
  """Initial ``weights`` record: ``[T]`` (or ``[K, T]``) ones, or an empty array if T is unknown.

  ``dtype``: e.g. :func:`params_dtype` of the params, so that the record follows float64 gradients.
  """
  if num_tasks is None:
    return jnp.zeros((0,), dtype)
  if num_groups_:
    return jnp.ones((num_groups_, num_tasks), dtype)
  return jnp.ones((num_tasks,), dtype)


def params_dtype(params: PyTree):
  """The Gram dtype of ``params`` (at least float32; float64 for float64 params).

  Without params (``init(None)``): the default float dtype (float64 under ``jax_enable_x64``).
  """
  leaves = [x for x in jax.tree.leaves(params) if hasattr(x, "dtype") or isinstance(x, (float, int))]
  if not leaves:
    return jnp.dtype(jax.dtypes.canonicalize_dtype(jnp.float64))
  return numerics.gram_dtype(jnp.result_type(*leaves))


def canonical_key(key) -> jax.Array:
  """A typed-agnostic raw PRNG key from an int seed or an existing key."""
  if isinstance(key, int):
    return jax.random.PRNGKey(key)
  key = jnp.asarray(key) if not jnp.issubdtype(jnp.result_type(key), jax.dtypes.prng_key) else key
  return key
