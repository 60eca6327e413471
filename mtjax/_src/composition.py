"""Clear errors for optax wrappers that cannot carry per-task gradients (issue #14).

A method consumes per-task gradients ``[T, *param.shape]`` and emits one params-shaped update, so
it must see the gradients first. Four optax wrappers break that, each in its own way:

* ``optax.MultiSteps`` accumulates into a params-shaped buffer: the method would get a buffer without
  a task axis (a misleading task-axis error), and the accumulator would change shape.
* ``optax.masked`` (and ``optax.multi_transform``, built on it) hands the method only the masked
  leaves and passes the others through unchanged: they keep their task axis ``[T, ...]``.
* ``optax.apply_if_finite`` returns ``zeros_like`` of its *input* on a skipped step: the per-task
  gradients, not a params-shaped update (the ``lax.cond`` branches disagree).
* an optimizer *before* the method (``optax.chain(optax.adam(...), method)``) receives the per-task
  gradients and keeps per-task moments: its state changes shape after one step.

The first three call the method's ``init`` from their own ``init``, so :func:`check_not_wrapped` (run by
every method's ``init``) finds them on the Python call stack, by the qualified name of the optax
function in a file of the ``optax`` package; this costs nothing per step. The fourth is seen in
``update`` (:func:`check_first_in_chain`, run through ``weighting.check_task_losses``): the frame of
``optax.chain``'s update holds the states of the transforms before the method, old and new.
"""

from __future__ import annotations

import os
import sys

import jax
import numpy as np

_OPTAX_DIR = os.sep + "optax" + os.sep
_MAX_DEPTH = 96  # frames searched above the caller

_WRAPPER_ERRORS = {
  "MultiSteps": (
    "mtjax: {method} is inside optax.MultiSteps, which accumulates params-shaped gradients: it cannot hold "
    "the per-task gradients [T, ...] (the method would see its buffer, without a task axis). Accumulate the "
    "per-task gradients before the method with mtjax.accumulate(optax.chain(mtjax.{method}(...), "
    "optax.adam(...)), every_k=k), or put MultiSteps after the method, optax.chain(mtjax.{method}(...), "
    "optax.MultiSteps(optax.adam(...), k)), to accumulate the combined updates instead (another algorithm)."
  ),
  "multi_transform": (
    "mtjax: {method} is inside optax.multi_transform (optax.transforms.partition), which masks every "
    "transform to its labelled leaves: the others would keep their task axis [T, ...]. Put the method first "
    "and multi_transform after it: optax.chain(mtjax.{method}(...), optax.multi_transform(transforms, "
    "labels)); pass shared= to the method to choose the leaves it compares the tasks on."
  ),
  "masked": (
    "mtjax: {method} is inside optax.masked: the leaves outside the mask would keep their task axis [T, ...]. "
    "Pass the mask to the method instead, mtjax.{method}(shared=mask) (the leaves outside it get the sum of "
    "their task gradients), and mask plain optax transforms after the method: optax.chain(mtjax.{method}("
    "shared=mask), optax.masked(optax.add_decayed_weights(1e-4), decay_mask), optax.adam(...))."
  ),
  "apply_if_finite": (
    "mtjax: {method} is inside optax.apply_if_finite, whose skipped step returns zeros shaped like its input, "
    "the per-task gradients [T, ...], not a params-shaped update. Put it after the method: optax.chain("
    "mtjax.{method}(...), optax.apply_if_finite(optax.adam(...), max_consecutive_errors=k)); under jit with "
    "mtjax.set_runtime_checks(False) a NaN/inf task gradient then gives a non-finite update that "
    "apply_if_finite skips (with the checks on, the method raises instead)."
  ),
}

_ALIASES = {"partition": "multi_transform"}  # optax.multi_transform is optax.transforms.partition


def _optax_frames(start):
  """``(qualname, frame)`` of the frames in files of the optax package, innermost first."""
  frame, depth = start, 0
  while frame is not None and depth < _MAX_DEPTH:
    code = frame.f_code
    if _OPTAX_DIR in code.co_filename:
      yield getattr(code, "co_qualname", code.co_name), frame
    frame, depth = frame.f_back, depth + 1


def enclosing_wrapper() -> str | None:
  """The innermost optax wrapper of :data:`_WRAPPER_ERRORS` on the call stack (``None`` if none).

  ``optax.multi_transform`` wraps each of its transforms in ``optax.masked``: a ``masked`` directly inside
  a ``multi_transform`` is reported as the latter.
  """
  found = None
  for qualname, _ in _optax_frames(sys._getframe(1)):  # pylint: disable=protected-access
    head = qualname.split(".", 1)[0]
    head = _ALIASES.get(head, head)
    if head not in _WRAPPER_ERRORS or head == found:
      continue
    if found is None and head == "masked":
      found = head  # the next wrapper outwards tells whether it is multi_transform's
      continue
    return "multi_transform" if head == "multi_transform" else (found or head)
  return found


def check_not_wrapped(method: str) -> None:
  """Raises a ``ValueError`` naming the supported form when a method's ``init`` runs inside ``optax.MultiSteps``,
  ``optax.masked``, ``optax.multi_transform`` or ``optax.apply_if_finite``."""
  wrapper = enclosing_wrapper()
  if wrapper is not None:
    raise ValueError(_WRAPPER_ERRORS[wrapper].format(method=method))


def _leaf_shapes(tree) -> list[tuple]:
  return [tuple(np.shape(x)) for x in jax.tree.leaves(tree)]


def check_first_in_chain(method: str) -> None:
  """Raises a ``ValueError`` when a transform before the method in an ``optax.chain`` changed the shape of its state.

  Called from a method's ``update``: every enclosing ``optax.chain`` update frame lists the states of the
  transforms that ran before the method in ``new_state`` and their previous states in ``state``. A transform
  whose state changes shape received the per-task gradients and keeps per-task state (an optimizer placed
  before the method). Stateless and scalar-state transforms (clipping, scaling by a schedule) pass.
  """
  for qualname, frame in _optax_frames(sys._getframe(1)):  # pylint: disable=protected-access
    if qualname.split(".", 1)[0] != "chain" or not qualname.endswith("update_fn"):
      continue
    local = frame.f_locals
    old, new = local.get("state"), local.get("new_state")
    if not isinstance(old, tuple) or not isinstance(new, list):
      continue
    for before, after in zip(old, new):
      b, a = _leaf_shapes(before), _leaf_shapes(after)
      if b != a:
        changed = next(((x, y) for x, y in zip(b, a) if x != y), (len(b), len(a)))
        raise ValueError(
          f"mtjax: {method} comes after a transform in optax.chain whose optimizer state changes shape after "
          f"one step ({changed[0]} -> {changed[1]}): it received the per-task gradients [T, ...] and keeps "
          f"per-task state (e.g. optax.adam's moments). Put the mtjax method first: optax.chain(mtjax.{method}"
          "(...), optax.adam(...))."
        )
