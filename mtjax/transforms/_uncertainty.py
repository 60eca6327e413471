"""Uncertainty weighting (homoscedastic task uncertainty) with learned log-variances."""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mtjax._src import numerics
from mtjax._src import tree as tree_lib
from mtjax._src import weighting


class UncertaintyState(NamedTuple):
  """State of :func:`uncertainty`.

  Attributes:
    log_vars: the learned log-variances :math:`s = \\log \\sigma^2` ``[T]`` that the *next* update
      will use (already stepped by the inner optimizer).
    inner_opt_state: state of the inner optimizer that steps ``log_vars``.
    weights: ``[T]`` the task weights :math:`\\tfrac12 e^{-s}` used by the last update.
  """

  log_vars: jax.Array
  inner_opt_state: Any
  weights: jax.Array


def uncertainty_objective(task_losses: jax.typing.ArrayLike, log_vars: jax.typing.ArrayLike) -> jax.Array:
  r"""Kendall et al.'s uncertainty-weighted objective :math:`\sum_i \tfrac12 e^{-s_i} L_i + \tfrac12 s_i`.

  :func:`uncertainty` follows the gradient of this objective (with respect to the parameters and
  to :math:`s`) without evaluating it; use this helper to log or check it.

  Examples:
    >>> import jax.numpy as jnp, mtjax
    >>> mtjax.uncertainty_objective(jnp.array([1., 2., 4.]), jnp.zeros(3))
    Array(3.5, dtype=float32)

  Args:
    task_losses: ``[T]`` task losses.
    log_vars: ``[T]`` log-variances :math:`s_i` (e.g. ``state.log_vars``).

  Returns:
    The scalar objective.
  """
  task_losses = jnp.asarray(task_losses)
  log_vars = jnp.asarray(log_vars)
  if task_losses.shape != log_vars.shape or task_losses.ndim != 1:
    raise ValueError(
      f"mtjax: uncertainty_objective: task_losses {task_losses.shape} and log_vars "
      f"{log_vars.shape} must both have shape [T]."
    )
  return jnp.sum(0.5 * jnp.exp(-log_vars) * task_losses + 0.5 * log_vars)


def uncertainty(
  *,
  num_tasks: int,
  init_log_var: float = 0.0,
  learning_rate: float = 1e-3,
  log_var_optimizer: Optional[optax.GradientTransformation] = None,
  shared: tree_lib.SharedSpec = None,
  task_specific: str = "weighted",
) -> optax.GradientTransformationExtraArgs:
  r"""Uncertainty weighting: learned per-task log-variances weigh the task losses.

  Each task has a learnable :math:`s_i = \log \sigma_i^2` and the objective is

  .. math::
    \mathcal{L}(\theta, s) = \sum_i \tfrac12 e^{-s_i} L_i(\theta) + \tfrac12 s_i .

  The update is its gradient in :math:`\theta`, :math:`d = \sum_i \tfrac12 e^{-s_i} g_i`, computed
  with the current :math:`s`; then :math:`s` takes one step of an inner optimizer on the analytic
  gradient :math:`\partial \mathcal{L} / \partial s_i = \tfrac12 (1 - e^{-s_i} L_i)` (whose fixed
  point is :math:`s_i = \log L_i`). ``state.log_vars`` holds the stepped :math:`s` for the next
  update and ``state.weights`` the weights :math:`\tfrac12 e^{-s}` this update used. See
  :func:`uncertainty_objective` for the objective itself. Task losses must be nonnegative (a
  ``ValueError``, under ``jit`` a runtime error, otherwise): with :math:`L_i < 0` there is no fixed
  point and :math:`s_i \to -\infty`, so the weights would grow without bound.

  By default the weights apply to the task-specific leaves too (``task_specific="weighted"``), so
  the update is the *exact* gradient of :math:`\mathcal{L}` with respect to every parameter (a
  task head only receives its own task's gradient, scaled by :math:`\tfrac12 e^{-s_i}`).

  .. warning::
    Must be first in an ``optax.chain``: it consumes per-task gradients (every leaf
    ``[T, *param.shape]``, e.g. from :func:`mtjax.task_grads`) and emits params-shaped updates.
    Needs ``task_losses=`` in every ``update``. Do not wrap it in ``optax.MultiSteps``.
    Under ``optax.inject_hyperparams`` pass ``static_args=("num_tasks",)``, plus ``"shared"`` when it
    is a callable (optax would take it for a schedule).

  Examples:
    >>> import jax.numpy as jnp, optax, mtjax
    >>> params = {'w': jnp.zeros(2)}
    >>> task_grads = {'w': jnp.array([[1., 0.], [0., 1.]])}
    >>> tx = mtjax.uncertainty(num_tasks=2, log_var_optimizer=optax.sgd(0.1))
    >>> state = tx.init(params)
    >>> updates, state = tx.update(task_grads, state, params, task_losses=jnp.array([1., 3.]))
    >>> updates['w']  # 0.5 exp(-0) = 0.5 for both tasks
    Array([0.5, 0.5], dtype=float32)
    >>> state.log_vars  # s - 0.1 * 0.5 (1 - L)
    Array([0. , 0.1], dtype=float32)

  Args:
    num_tasks: number of tasks ``T`` (static).
    init_log_var: initial :math:`s_i` (0 in the paper; some public implementations, e.g.
      LibMTL, start at -0.5).
    learning_rate: step size of the default inner optimizer ``optax.adam`` (traceable). The
      paper learns :math:`s` jointly with the network, so the default 1e-3 is the usual Adam step
      of the network; raise it for short runs. Ignored when ``log_var_optimizer`` is given.
    log_var_optimizer: inner optax optimizer that steps :math:`s` (e.g. ``optax.sgd(0.01)``).
    shared: shared-parameter mask (see :func:`mtjax.shared_mask`).
    task_specific: ``"weighted"`` (default, exact gradient of the objective) or ``"sum"`` (plain
      task gradients on task-specific leaves).

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with state :class:`UncertaintyState`.

  References:
    Kendall, Gal, Cipolla, *Multi-Task Learning Using Uncertainty to Weigh Losses for Scene
    Geometry and Semantics*, CVPR 2018. https://arxiv.org/abs/1705.07115
  """
  if not isinstance(num_tasks, int) or isinstance(num_tasks, bool) or num_tasks < 1:
    raise ValueError(
      f"mtjax: uncertainty: num_tasks must be a positive int, got {num_tasks!r} "
      "(under optax.inject_hyperparams pass static_args=('num_tasks',))."
    )
  optimizer = log_var_optimizer if log_var_optimizer is not None else optax.adam(learning_rate)

  def init_state(params):
    dtype = numerics.gram_dtype(jnp.result_type(*jax.tree.leaves(params)))
    log_vars = jnp.full((num_tasks,), init_log_var, dtype)
    return UncertaintyState(
      log_vars=log_vars, inner_opt_state=optimizer.init(log_vars), weights=jnp.ones((num_tasks,), dtype)
    )

  def weights_fn(inputs, state):
    log_vars = state.log_vars
    dtype = log_vars.dtype
    losses = inputs.task_losses.astype(dtype)
    losses = numerics.enforce(
      losses,
      numerics.condition_check(
        jnp.any(losses < 0),
        lambda v: (
          f"mtjax: uncertainty: task losses must be nonnegative, got {np.asarray(v).tolist()} (the "
          "log-variance step 1/2 (1 - exp(-s) L) has its fixed point at s = log L; with L < 0 it has "
          "none and the weights grow without bound); shift or reformulate negative losses."
        ),
        losses,
      ),
    )
    precision = jnp.exp(-log_vars)
    weights = 0.5 * precision
    grad = 0.5 * (1 - precision * losses)
    updates, inner_opt_state = optimizer.update(grad, state.inner_opt_state, log_vars)
    new_log_vars = optax.apply_updates(log_vars, updates).astype(dtype)
    return weights, UncertaintyState(log_vars=new_log_vars, inner_opt_state=inner_opt_state, weights=state.weights)

  return weighting.gram_weighting(
    weights_fn,
    init_state,
    method="uncertainty",
    num_tasks=num_tasks,
    shared=shared,
    needs_gram=False,
    requires_task_losses=True,
    task_specific=task_specific,
  )
