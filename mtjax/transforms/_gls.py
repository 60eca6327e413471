"""Geometric loss strategy (GLS): minimize the geometric mean of the task losses."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from mtjax._src import tree as tree_lib
from mtjax._src import weighting
from mtjax.transforms._scale_invariant import positive_losses


class GLSState(NamedTuple):
  """State of :func:`gls`.

  Attributes:
    weights: ``[T]`` the task weights :math:`\\mathrm{GM} / (T L_i)` used by the last update.
  """

  weights: jax.Array


def gls_weights(task_losses: jax.Array) -> jax.Array:
  r"""GLS weights :math:`w_i = \mathrm{GM} / (T L_i)`, :math:`\mathrm{GM} = (\prod_j L_j)^{1/T}`.

  Computed in log space, :math:`w_i = \exp(\overline{\log L} - \log L_i) / T`, so no product of
  the losses over- or underflows. ``task_losses`` must be positive.
  """
  logs = jnp.log(task_losses)
  return jnp.exp(jnp.mean(logs) - logs) / task_losses.shape[0]


def gls(
  *,
  num_tasks: int,
  shared: tree_lib.SharedSpec = None,
  task_specific: str = "weighted",
) -> optax.GradientTransformationExtraArgs:
  r"""Geometric loss strategy: the gradient of the geometric mean of the task losses.

  .. math::
    \mathcal L(\theta) = \Big(\prod_{i=1}^T L_i(\theta)\Big)^{1/T}, \qquad
    d = \nabla_\theta \mathcal L = \sum_i \frac{\mathcal L}{T L_i} g_i .

  The weights :math:`w_i = \mathrm{GM} / (T L_i)` are computed in log space
  (:math:`\exp(\tfrac1T \sum_j \log L_j - \log L_i) / T`), so they neither overflow nor underflow
  for many tasks or extreme losses. The direction is that of :func:`mtjax.scale_invariant`
  (:math:`\nabla \log \mathcal L = \tfrac1T \sum_i \nabla \log L_i`), scaled by
  :math:`\mathrm{GM} / T`: the step shrinks as the losses do. Loss-only: with
  :func:`mtjax.task_grads` ``(..., deferred=True)`` each update is ONE backward pass. Task losses
  must be positive (a ``ValueError``, under ``jit`` a runtime error, otherwise; never NaN/inf).

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
    >>> tx = mtjax.gls(num_tasks=2)
    >>> updates, state = tx.update(task_grads, tx.init(params), params, task_losses=jnp.array([1., 4.]))
    >>> updates['w']  # GM = 2: [2 / (2 * 1), 2 / (2 * 4)]
    Array([1.  , 0.25], dtype=float32)

  Args:
    num_tasks: number of tasks ``T`` (static).
    shared: shared-parameter mask (see :func:`mtjax.shared_mask`).
    task_specific: ``"weighted"`` (default, exact gradient of the objective) or ``"sum"`` (plain
      task gradients on task-specific leaves).

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with state :class:`GLSState`.

  References:
    Chennupati, Sistu, Yogamani, Rawashdeh, *MultiNet++: Multi-Stream Feature Aggregation and
    Geometric Loss Strategy for Multi-Task Learning*, CVPR Workshops 2019.
    https://arxiv.org/abs/1904.08492
  """
  if not isinstance(num_tasks, int) or isinstance(num_tasks, bool) or num_tasks < 1:
    raise ValueError(
      f"mtjax: gls: num_tasks must be a positive int, got {num_tasks!r} "
      "(under optax.inject_hyperparams pass static_args=('num_tasks',))."
    )

  def init_state(params):
    return GLSState(weights=weighting.init_weights(num_tasks, dtype=weighting.params_dtype(params)))

  def weights_fn(inputs, state):
    dtype = state.weights.dtype
    losses = positive_losses(
      inputs.task_losses.astype(dtype), "gls", "the objective is the geometric mean (prod_i L_i)^(1/T)"
    )
    return gls_weights(losses), state

  return weighting.gram_weighting(
    weights_fn,
    init_state,
    method="gls",
    num_tasks=num_tasks,
    shared=shared,
    needs_gram=False,
    requires_task_losses=True,
    task_specific=task_specific,
  )
