"""Which parameters are shared by several tasks and which belong to one: declared or measured.

A gradient method compares task gradients on the *shared* parameters. Parameters that only one
task trains (its tower, its gate) contribute nothing but that task's own gradient, so counting
them as shared biases every Gram-based method (GradNorm's "last shared layer" becomes a task's
output layer, cosines are diluted by parameters only one task touches). Built-in models declare
their task-specific parameters (``model.task_specific()``, see :func:`mtjax.models.partition`);
:func:`infer_shared` measures the partition of any loss.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import jax
import numpy as np

from mtjax._src import tree as tree_lib

PyTree = Any


def infer_shared(loss_fn: Callable[..., jax.Array], params: PyTree, *args, **kwargs) -> PyTree:
  """The parameters that more than one task's loss trains, measured from per-task gradients.

  Computes the per-task gradients of ``loss_fn(params, *args, **kwargs) -> [T]`` once (at the
  given ``params``, typically a fresh initialisation, on a sample batch) and marks a leaf shared
  when at least two tasks give it a nonzero gradient, or when no task does (a leaf the sample
  does not reach, e.g. a domain absent from the batch, stays shared: the conservative choice).
  The result is a pytree of Python bools usable as ``shared=`` in every mtjax method.

  A zero gradient at one point is not a proof of independence (a dead ReLU layer has one too);
  use a batch with every task's labels present. Built-in models declare their partition instead
  (:func:`mtjax.models.partition`); the test suite checks each declaration against this function.

  Example:
    >>> import jax.numpy as jnp, mtjax
    >>> def loss_fn(p, x):
    ...   h = x @ p['trunk']
    ...   return jnp.stack([jnp.mean((h @ p['head_0'])**2), jnp.mean((h @ p['head_1'])**2)])
    >>> p = {'trunk': jnp.ones((3, 4)), 'head_0': jnp.ones(4), 'head_1': jnp.ones(4)}
    >>> mtjax.infer_shared(loss_fn, p, jnp.ones((5, 3)))
    {'head_0': False, 'head_1': False, 'trunk': True}

  Args:
    loss_fn: ``(params, *args, **kwargs) -> [T]`` per-task losses.
    params: the parameters.
    *args: the loss's other inputs (a sample batch).
    **kwargs: the loss's keyword inputs.

  Returns:
    A pytree of bools with the structure of ``params``.
  """
  from mtjax._src.task_grads import task_grads  # pylint: disable=import-outside-toplevel

  _, grads = jax.jit(lambda p, a, k: task_grads(lambda p_: loss_fn(p_, *a, **k), strategy="loop")(p))(
    params, args, kwargs
  )
  grads = jax.device_get(grads)

  def decide(g) -> bool:
    values = np.asarray(g.values if tree_lib.is_sparse(g) else g)
    touched = np.any(values.reshape(values.shape[0], -1) != 0, axis=1)
    return int(touched.sum()) != 1

  return jax.tree.map(decide, grads, is_leaf=tree_lib.is_sparse)


def describe(mask: PyTree, params: PyTree) -> dict:
  """A JSON-ready summary of a partition: shared / task-specific layers and parameter counts."""
  flags = tree_lib.resolve_shared(mask, params, params)
  paths = tree_lib.leaf_paths(params)
  sizes = [int(np.size(x)) for x in jax.tree.leaves(params)]
  layer = lambda p: p.rsplit("/", 1)[0] if "/" in p else p
  shared = sorted({layer(p) for p, f in zip(paths, flags) if f})
  specific = sorted({layer(p) for p, f in zip(paths, flags) if not f})
  return {
    "shared_layers": shared,
    "task_specific_layers": specific,
    "shared_params": sum(s for s, f in zip(sizes, flags) if f),
    "task_specific_params": sum(s for s, f in zip(sizes, flags) if not f),
  }


def resolve(spec, model) -> Optional[Callable[[PyTree], PyTree]]:
  """A config's ``shared`` value as a ``shared=`` mask: ``"model"`` (the model's declaration),
  ``"all"`` (every parameter shared: ``None``), or ``{include=..., exclude=...}`` path patterns."""
  from mtjax.models._registry import partition  # pylint: disable=import-outside-toplevel

  if spec is None or spec == "model":
    return partition(model)
  if spec == "all":
    return None
  if isinstance(spec, dict) and set(spec) <= {"include", "exclude"}:
    return tree_lib.shared_mask(include=spec.get("include"), exclude=spec.get("exclude"))
  raise ValueError(f"mtjax: shared must be 'model', 'all' or a table with include/exclude path patterns, got {spec!r}.")
