"""Linear scalarization (fixed task weights): the baseline every table compares to."""

from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mtjax._src import tree as tree_lib
from mtjax._src import weighting


class LinearState(NamedTuple):
  """State of :func:`linear`: ``weights`` records the task weights of the last step."""

  weights: jax.Array


def linear(
  weights: Optional[jax.typing.ArrayLike] = None,
  *,
  num_tasks: Optional[int] = None,
  shared: tree_lib.SharedSpec = None,
  task_specific: str = "weighted",
) -> optax.GradientTransformationExtraArgs:
  r"""Linear scalarization: a fixed weighted sum of the task gradients.

  .. math::
    d = \sum_{t=1}^T w_t \, g_t, \qquad w = \mathbf{1} \text{ by default},

  which is the gradient of :math:`\sum_t w_t L_t`. Per-task gradients are not needed for this
  (one backward of the summed loss gives the same update, see ``benchmarks/step_time.py``); the
  transform exists so that linear scalarization runs through the same pipeline as every method.

  Must be first in an ``optax.chain``: it consumes per-task gradients ``[T, *param.shape]`` and
  emits params-shaped updates. Do not wrap it in ``optax.MultiSteps``.

  Examples:
    >>> import jax.numpy as jnp, optax, mtjax
    >>> params = {'w': jnp.zeros(3)}
    >>> task_grads = {'w': jnp.array([[1., 0., 0.], [0., 2., 0.]])}
    >>> tx = optax.chain(mtjax.linear([1.0, 0.5]), optax.sgd(1.0))
    >>> updates, _ = tx.update(task_grads, tx.init(params), params)
    >>> updates['w']
    Array([-1., -1., -0.], dtype=float32)

  Args:
    weights: ``[T]`` task weights (traceable; ``None`` = all ones).
    num_tasks: number of tasks (checked against the gradients; inferred from ``weights``).
    shared: shared-parameter mask (see :func:`mtjax.shared_mask`).
    task_specific: ``"weighted"`` (default: the exact gradient of the weighted loss sum) or
      ``"sum"``.

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  References:
    Caruana, *Multitask Learning*, Machine Learning 28, 1997.
  """
  given_num_tasks = num_tasks
  expected = None
  if weights is not None:
    shape = np.shape(weights)
    if len(shape) != 1:
      raise ValueError(f"mtjax: linear: weights must be a 1-D vector [T], got shape {shape}.")
    expected = int(shape[0])
    if num_tasks is not None and num_tasks != expected:
      raise ValueError(f"mtjax: linear: weights has {expected} entries but num_tasks={num_tasks}.")
    num_tasks = expected

  def init_state(params):
    del params
    return LinearState(weights=weighting.init_weights(num_tasks))

  def weights_fn(inputs, state):
    if weights is None:
      return jnp.ones((inputs.num_tasks,), jnp.float32), state
    w = jnp.asarray(weights)
    if w.shape != (inputs.num_tasks,):
      raise ValueError(f"mtjax: linear: weights have shape {w.shape} but there are {inputs.num_tasks} tasks.")
    return w, state

  tx = weighting.gram_weighting(
    weights_fn,
    init_state,
    method="linear",
    num_tasks=num_tasks,
    shared=shared,
    needs_gram=False,
    task_specific=task_specific,
  )
  return tree_lib.with_task_axis_check(tx, given_num_tasks, "linear", expected, f"weights has {expected} entries")
