"""Pytree helpers: task-axis checks, leaf paths and shared-parameter masks."""

from __future__ import annotations

import re
from typing import Any, Callable, Sequence, Union

import jax
import numpy as np

from mtjax._src.sparse import is_sparse

PyTree = Any
SharedSpec = Union[None, PyTree, Callable[[PyTree], PyTree]]


def path_str(path) -> str:
  """``'/'``-joined name of a key path, e.g. ``'params/expert_0/Dense_0/kernel'``.

  A trailing attribute step ``.value`` is dropped: it is how a Flax NNX ``Variable`` (``nnx.Param``,
  ``VariableState``) leaf of an ``nnx.split`` / ``nnx.state`` state flattens, so an NNX layer's
  kernel is ``'trunk/kernel'`` (as in its ``to_pure_dict()`` and in linen), not ``'trunk/kernel/value'``,
  and ``granularity="layer"`` puts its kernel and bias in one group. A dict key ``'value'`` is kept.

  Example:
    >>> import jax
    >>> from mtjax._src.tree import path_str
    >>> path_str((jax.tree_util.DictKey('trunk'), jax.tree_util.DictKey('kernel'), jax.tree_util.GetAttrKey('value')))
    'trunk/kernel'
    >>> path_str((jax.tree_util.DictKey('stats'), jax.tree_util.DictKey('value')))
    'stats/value'
  """
  path = tuple(path)
  if len(path) > 1 and isinstance(path[-1], jax.tree_util.GetAttrKey) and path[-1].name == "value":
    path = path[:-1]  # an NNX Variable's value
  parts = []
  for k in path:
    if isinstance(k, jax.tree_util.DictKey):
      parts.append(str(k.key))
    elif isinstance(k, jax.tree_util.GetAttrKey):
      parts.append(str(k.name))
    elif isinstance(k, jax.tree_util.SequenceKey):
      parts.append(str(k.idx))
    elif isinstance(k, jax.tree_util.FlattenedIndexKey):
      parts.append(str(k.key))
    else:
      parts.append(str(k))
  return "/".join(parts)


def leaf_paths(tree: PyTree) -> list[str]:
  """Paths of the leaves of ``tree`` in flattening order (a :class:`SparseRows` is one leaf)."""
  return [path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_sparse)[0]]


_UNKNOWN = object()  # check_task_axis(params=...) not given: the caller does not know whether params were passed


def check_task_axis(
  task_grads: PyTree, num_tasks: int | None = None, *, name: str = "task_grads", params: Any = _UNKNOWN
) -> int:
  """Checks that every leaf has the same leading task axis and returns its size ``T``.

  When ``params`` is passed (``None`` included) and neither ``num_tasks`` nor ``params`` is known,
  a tree whose leaves are ALL 1-D with ``T >= 2`` is ambiguous: per-task gradients of scalar
  parameters, or an already-summed ``[P]`` gradient that would be read as ``P`` tasks of scalars.
  That is an error asking for ``num_tasks=`` or ``params``.

  Raises:
    ValueError: naming the offending leaf and the shapes when a leaf has no leading axis,
      leaves disagree, ``num_tasks`` is given and differs, or the tree is ambiguous (above).
  """
  flat = jax.tree_util.tree_flatten_with_path(task_grads, is_leaf=is_sparse)[0]
  if not flat:
    raise ValueError(f"mtjax: {name} is an empty pytree; expected leaves with a leading task axis.")
  found = None
  first_path = None
  for path, leaf in flat:
    shape = np.shape(leaf)
    if len(shape) == 0:
      raise ValueError(
        f"mtjax: leaf '{path_str(path)}' of {name} is a scalar; every leaf needs a leading task "
        "axis [T, *param_shape]. Did you pass the summed gradient instead of mtjax.task_grads(...)?"
      )
    if found is None:
      found, first_path = shape[0], path_str(path)
    elif shape[0] != found:
      raise ValueError(
        f"mtjax: leaves of {name} disagree on the task axis: '{first_path}' has leading size {found} "
        f"but '{path_str(path)}' has shape {shape}. Every leaf must be [T, *param_shape]."
      )
  if (
    num_tasks is None
    and params is None
    and found >= 2
    and all(len(np.shape(leaf)) == 1 and not is_sparse(leaf) for _, leaf in flat)
  ):
    raise ValueError(
      f"mtjax: {name}: every leaf is 1-D (leading size {found}), which is ambiguous: per-task gradients of "
      f"scalar parameters ([T] = [{found}]) or an already-summed [P] gradient read as {found} tasks? Build the "
      "transform with num_tasks=T, or pass params to update (tx.update(task_grads, state, params)); compute "
      "per-task gradients with mtjax.task_grads(...)."
    )
  if num_tasks is not None and found != num_tasks:
    raise ValueError(
      f"mtjax: the transform was built with num_tasks={num_tasks} but {name} has a leading task "
      f"axis of size {found} (leaf '{first_path}'). Build it with num_tasks={found}, or check that "
      "the task axis is the leading one."
    )
  return int(found)


def check_params_match(task_grads: PyTree, params: PyTree | None) -> None:
  """When params are given, checks that leaf shapes equal the task-gradient leaves minus the task axis."""
  if params is None:
    return
  g_flat, g_def = jax.tree_util.tree_flatten_with_path(task_grads, is_leaf=is_sparse)
  p_flat, p_def = jax.tree_util.tree_flatten_with_path(params)
  if g_def != p_def:
    raise ValueError(
      "mtjax: task_grads and params have different tree structures; task_grads must be the "
      "per-task gradients of these params (every leaf [T, *param.shape])."
    )
  for (path, g), (_, p) in zip(g_flat, p_flat):
    if tuple(np.shape(g)[1:]) != tuple(np.shape(p)):
      raise ValueError(
        f"mtjax: leaf '{path_str(path)}': task gradient shape {np.shape(g)} does not match param "
        f"shape {np.shape(p)} with a leading task axis; is the task axis the leading one?"
      )


def shared_mask(
  include: str | Sequence[str] | None = None,
  exclude: str | Sequence[str] | None = None,
) -> Callable[[PyTree], PyTree]:
  """Builds a ``shared=`` mask from parameter-path regular expressions.

  A leaf is shared when its ``'/'``-joined path matches one of ``include`` (default: every leaf)
  and none of ``exclude``. Matching uses ``re.search``.

  Example:
    >>> import mtjax, jax.numpy as jnp
    >>> params = {'bottom': {'kernel': jnp.ones(2)}, 'tower_0': {'kernel': jnp.ones(2)}}
    >>> mtjax.shared_mask(exclude=r'tower_|gate_')(params)
    {'bottom': {'kernel': True}, 'tower_0': {'kernel': False}}

  Args:
    include: pattern(s) a shared leaf's path must match (``None``: all leaves).
    exclude: pattern(s) that make a leaf task-specific.

  Returns:
    A callable ``params -> pytree of bools`` usable as ``shared=`` in every mtjax transform.
  """
  inc = [include] if isinstance(include, str) else list(include or [])
  exc = [exclude] if isinstance(exclude, str) else list(exclude or [])
  inc_re = [re.compile(p) for p in inc]
  exc_re = [re.compile(p) for p in exc]

  def mask_fn(params: PyTree) -> PyTree:
    def decide(path, _):
      s = path_str(path)
      ok = (not inc_re) or any(r.search(s) for r in inc_re)
      return bool(ok and not any(r.search(s) for r in exc_re))

    return jax.tree_util.tree_map_with_path(decide, params)

  return mask_fn


def resolve_shared(shared: SharedSpec, task_grads: PyTree, params: PyTree | None = None) -> list[bool]:
  """Turns a ``shared=`` spec into one static bool per leaf of ``task_grads`` (flattening order)."""
  num_leaves = len(jax.tree_util.tree_leaves(task_grads, is_leaf=is_sparse))
  if shared is None:
    return [True] * num_leaves
  if callable(shared):
    # The callable sees a params-shaped tree; without params, use the per-task slice shapes.
    target = (
      params
      if params is not None
      else jax.tree.map(lambda g: jax.ShapeDtypeStruct(np.shape(g)[1:], g.dtype), task_grads, is_leaf=is_sparse)
    )
    mask = shared(target)
  else:
    mask = shared
  g_def = jax.tree_util.tree_structure(task_grads, is_leaf=is_sparse)
  try:
    flat_mask = g_def.flatten_up_to(mask)
  except (ValueError, TypeError) as e:
    raise ValueError(
      "mtjax: the shared= mask must be a pytree of bools with the structure of params "
      f"(or a callable returning one): {e}"
    ) from None
  out = []
  for m in flat_mask:
    if isinstance(m, (bool, np.bool_)):
      out.append(bool(m))
    else:
      raise ValueError(
        f"mtjax: shared= mask leaves must be Python bools (static), got {type(m).__name__}. "
        "Use mtjax.shared_mask(...) to build one from parameter paths."
      )
  return out


def with_task_axis_check(tx, num_tasks: int | None, method: str, expected: int | None = None, expected_what: str = ""):
  """Wraps a transform so that its update first runs :func:`check_task_axis` with ``params``.

  ``expected`` (with ``expected_what``, e.g. ``"weights has 2 entries"``) is a task count that
  comes from an argument other than ``num_tasks``; a mismatch names that argument.
  """
  import optax  # pylint: disable=import-outside-toplevel

  from mtjax._src.task_grads import is_lazy  # pylint: disable=import-outside-toplevel

  def update_fn(updates, state, params=None, **extra_args):
    struct = updates.shapes() if is_lazy(updates) else updates
    t = check_task_axis(struct, num_tasks, name=f"the task gradients given to {method}", params=params)
    if expected is not None and t != expected:
      raise ValueError(f"mtjax: {method}: {expected_what} but the task gradients have {t} tasks.")
    return tx.update(updates, state, params, **extra_args)

  update_fn.__dict__.update(getattr(tx.update, "__dict__", {}))  # keep marks (e.g. the Gram core's, for amortized)
  return optax.GradientTransformationExtraArgs(tx.init, update_fn)
