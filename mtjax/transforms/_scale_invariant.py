"""Scale-invariant (log-loss) linear scalarization: minimize the sum of the log task losses."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mtjax._src import numerics
from mtjax._src import tree as tree_lib
from mtjax._src import weighting


class ScaleInvariantState(NamedTuple):
  """State of :func:`scale_invariant`.

  Attributes:
    weights: ``[T]`` the task weights :math:`1 / L_i` used by the last update.
  """

  weights: jax.Array


def positive_losses(losses: jax.Array, method: str, why: str) -> jax.Array:
  """``losses``, checked to be > 0 (a ``ValueError`` eagerly, a runtime error under ``jit``).

  The returned values are made safe (non-positive entries replaced by 1), so nothing downstream
  turns into NaN/inf while the runtime error is raised.
  """
  bad = jnp.any(losses <= 0)
  check = numerics.condition_check(
    bad,
    lambda v: (
      f"mtjax: {method}: task losses must be positive, got {np.asarray(v).tolist()} ({why}); "
      "shift or reformulate non-positive losses (e.g. add a constant)."
    ),
    losses,
  )
  safe = jnp.where(losses > 0, losses, jnp.ones_like(losses))
  return numerics.enforce(safe, check)


def scale_invariant(
  *,
  num_tasks: int,
  shared: tree_lib.SharedSpec = None,
  task_specific: str = "weighted",
) -> optax.GradientTransformationExtraArgs:
  r"""Scale-invariant linear scalarization: the gradient of :math:`\sum_i \log L_i`.

  .. math::
    \mathcal L(\theta) = \sum_i \log L_i(\theta), \qquad
    d = \nabla_\theta \mathcal L = \sum_i \frac{1}{L_i} g_i .

  Rescaling one task's loss by a constant (:math:`L_i \to c L_i`) leaves the update unchanged,
  hence the name ("SI" baseline of Navon et al.). The weights :math:`1 / L_i` need only the loss
  values: with :func:`mtjax.task_grads` ``(..., deferred=True)`` each update is ONE backward pass
  of :math:`\sum_i w_i L_i` and no per-task gradient is ever formed. Task losses must be positive
  (a ``ValueError``, under ``jit`` a runtime error, otherwise; never a NaN/inf).

  By default the weights apply to the task-specific leaves too (``task_specific="weighted"``), so
  the update is the exact gradient of :math:`\mathcal L` with respect to every parameter.

  .. warning::
    Must be first in an ``optax.chain``: it consumes per-task gradients (every leaf
    ``[T, *param.shape]``, e.g. from :func:`mtjax.task_grads`) and emits params-shaped updates.
    Needs ``task_losses=`` in every ``update``. Under ``optax.inject_hyperparams`` pass
    ``static_args=("num_tasks",)``.

  Examples:
    >>> import jax.numpy as jnp, optax, mtjax
    >>> params = {'w': jnp.zeros(2)}
    >>> task_grads = {'w': jnp.array([[1., 0.], [0., 1.]])}
    >>> tx = mtjax.scale_invariant(num_tasks=2)
    >>> updates, state = tx.update(task_grads, tx.init(params), params, task_losses=jnp.array([0.5, 4.]))
    >>> updates['w']  # 1 / L
    Array([2.  , 0.25], dtype=float32)

  Args:
    num_tasks: number of tasks ``T`` (static).
    shared: shared-parameter mask (see :func:`mtjax.shared_mask`).
    task_specific: ``"weighted"`` (default, exact gradient of the objective) or ``"sum"`` (plain
      task gradients on task-specific leaves).

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with state :class:`ScaleInvariantState`.

  References:
    Navon, Shamsian, Achituve, Maron, Kawaguchi, Chechik, Fetaya, *Multi-Task Learning as a
    Bargaining Game*, ICML 2022 (the "SI" baseline). https://arxiv.org/abs/2202.01017
  """
  if not isinstance(num_tasks, int) or isinstance(num_tasks, bool) or num_tasks < 1:
    raise ValueError(
      f"mtjax: scale_invariant: num_tasks must be a positive int, got {num_tasks!r} "
      "(under optax.inject_hyperparams pass static_args=('num_tasks',))."
    )

  def init_state(params):
    return ScaleInvariantState(weights=weighting.init_weights(num_tasks, dtype=weighting.params_dtype(params)))

  def weights_fn(inputs, state):
    dtype = state.weights.dtype
    losses = positive_losses(inputs.task_losses.astype(dtype), "scale_invariant", "the objective is sum_i log L_i")
    return 1.0 / losses, state

  return weighting.gram_weighting(
    weights_fn,
    init_state,
    method="scale_invariant",
    num_tasks=num_tasks,
    shared=shared,
    needs_gram=False,
    requires_task_losses=True,
    task_specific=task_specific,
  )
