"""FAMO: fast adaptive multitask optimization (Liu et al., NeurIPS 2023)."""

from __future__ import annotations

import functools
from typing import Any, NamedTuple, Optional, Union

import jax
import jax.core
import jax.numpy as jnp
import numpy as np
import optax

from mtjax._src import composition
from mtjax._src import numerics
from mtjax._src import tree as tree_lib
from mtjax._src import weighting

FORMS = ("extra_forward", "next_batch")
LOGIT_UPDATES = ("sgd", "adam")
# The extra argument of ``update`` in the paper's form: the previous batch's task losses evaluated at
# the current parameters (after the previous step).
AFTER_ARG = "previous_task_losses_after_step"


class FAMOState(NamedTuple):
  """State of :func:`famo`.

  Attributes:
    count: number of updates so far (int32).
    logits: ``[T]`` the task logits :math:`\\xi` the last update used (already stepped with the loss
      decrease observed up to that update).
    inner_opt_state: state of the inner optimizer that steps the logits.
    previous_losses: ``[T]`` the task losses of the last update (before its step), whose decrease the
      next update measures.
    weights: ``[T]`` the task weights the last update used (they sum to 1).
  """

  count: jax.Array
  logits: jax.Array
  inner_opt_state: Any
  previous_losses: jax.Array
  weights: jax.Array


def famo_weights(logits: jax.Array, shifted_losses: jax.Array) -> jax.Array:
  r"""FAMO's task weights :math:`c\, z_i / \ell_i`.

  Here :math:`z = \operatorname{softmax}(\xi)` and :math:`c^{-1} = \sum_j z_j / \ell_j`.

  Computed as :math:`\operatorname{softmax}(\xi - \log \ell)` (the same numbers, without overflow).
  ``shifted_losses`` (:math:`\ell`) must be positive.
  """
  return jax.nn.softmax(logits - jnp.log(shifted_losses))


def famo_logit_gradient(logits: jax.Array, delta: jax.Array, gamma) -> jax.Array:
  r"""The logits' gradient :math:`J_z(\xi)^\top \delta + \gamma \xi` (:math:`J_z` the softmax Jacobian).

  :math:`\delta_i = \log \ell_i(\theta_t) - \log \ell_i(\theta_{t+1})` is the observed decrease of
  the log losses; :math:`J_z = \operatorname{diag}(z) - z z^\top` is symmetric, so
  :math:`J_z^\top \delta = z \odot (\delta - z^\top \delta)`.
  """
  z = jax.nn.softmax(logits)
  return z * (delta - jnp.dot(z, delta, precision=numerics.HIGHEST)) + gamma * logits


def famo(
  *,
  num_tasks: int,
  learning_rate: float = 0.025,
  gamma: float = 1e-3,
  min_losses: Union[float, jax.typing.ArrayLike] = 0.0,
  eps: float = 1e-8,
  post_step_losses: str = "extra_forward",
  logit_update: str = "sgd",
  logit_optimizer: Optional[optax.GradientTransformation] = None,
  shared: tree_lib.SharedSpec = None,
  task_specific: str = "weighted",
) -> optax.GradientTransformationExtraArgs:
  r"""FAMO: decrease every task's log loss at the same rate, from the loss values only.

  With task logits :math:`\xi` (initially 0), :math:`z = \operatorname{softmax}(\xi)` and the
  shifted losses :math:`\ell_i = L_i - \ell^{\min}_i + \epsilon` (``min_losses``, ``eps``), the
  update is the gradient of :math:`c \sum_i z_i \log \ell_i` with :math:`c` held constant:

  .. math::
    d = \sum_i \frac{c\, z_i}{\ell_i}\, g_i, \qquad c = \Big(\sum_j \frac{z_j}{\ell_j}\Big)^{-1}

  (weights that sum to 1). After the step the logits follow the observed decrease of the log
  losses, :math:`\delta_i = \log \ell_i(\theta_t) - \log \ell_i(\theta_{t+1})`:

  .. math::
    \xi_{t+1} = \xi_t - \beta \big(J_z(\xi_t)^\top \delta + \gamma\, \xi_t\big),

  :math:`J_z` the softmax Jacobian: a task whose log loss fell less than the others gets more
  weight. :math:`\beta` is ``learning_rate`` and :math:`\gamma` ``gamma``.

  The logit step of update :math:`t` needs the losses *after* step :math:`t`, which only the next
  call can see, so each call first steps the logits with the previous call's decrease and then
  forms its weights (the same sequence of logits and weights as the paper's loop):

  * ``post_step_losses="extra_forward"`` (the paper's Algorithm 1 and the authors' code): pass
    ``previous_task_losses_after_step=`` -- the previous batch's task losses evaluated at the
    *current* parameters -- to every ``update``, e.g. ``tx.update(grads, state, params,
    task_losses=l_t, previous_task_losses_after_step=loss_fn(params, previous_batch))``. Cost: ONE
    extra forward pass per step (no backward). The first update has no previous step and ignores
    the value (pass e.g. ``task_losses``).
  * ``post_step_losses="next_batch"`` (as LibMTL): the current batch's losses stand in for the
    post-step losses of the previous batch, :math:`\delta = \log \ell(\theta_t; B_t) - \log
    \ell(\theta_{t+1}; B_{t+1})`. No extra cost, and ``update`` needs only ``task_losses`` (what
    :func:`mtjax.training.fit` and the experiment runner pass); the decrease then mixes the
    progress of the step with the difference between two batches.

  The logits are stepped by plain gradient descent (``logit_update="sgd"``, the paper's
  Algorithm 1) or, as in the authors' code, by Adam with the weight decay :math:`\gamma` added to
  the gradient (``logit_update="adam"``, PyTorch's ``Adam(lr=beta, weight_decay=gamma)``); any
  other ``logit_optimizer`` may be given (then ``learning_rate`` is ignored; :math:`\gamma` still
  enters the gradient). Loss-only: with :func:`mtjax.task_grads` ``(..., deferred=True)`` each
  update is ONE backward pass, state :math:`O(T)`. The authors also clip the gradient norm of the
  shared parameters (``max_norm=1``); chain ``optax.clip_by_global_norm`` for that.

  .. warning::
    Must be first in an ``optax.chain``: it consumes per-task gradients (every leaf
    ``[T, *param.shape]``, e.g. from :func:`mtjax.task_grads`) and emits params-shaped updates.
    Needs ``task_losses=`` in every ``update`` (and ``previous_task_losses_after_step=`` in the
    default form). The shifted losses must be positive (:math:`L_i > \ell^{\min}_i - \epsilon`; a
    ``ValueError``, under ``jit`` a runtime error, otherwise). Under ``optax.inject_hyperparams``
    pass ``static_args=("num_tasks",)``.

  Examples:
    >>> import jax.numpy as jnp, optax, mtjax
    >>> params = {'w': jnp.zeros(2)}
    >>> task_grads = {'w': jnp.array([[1., 0.], [0., 1.]])}
    >>> tx = mtjax.famo(num_tasks=2, post_step_losses="next_batch", eps=0.0)
    >>> state = tx.init(params)
    >>> updates, state = tx.update(task_grads, state, params, task_losses=jnp.array([1., 3.]))
    >>> [round(x, 4) for x in updates['w'].tolist()]  # z = (1/2, 1/2): weights proportional to 1 / L
    [0.75, 0.25]
    >>> _, state = tx.update(task_grads, state, params, task_losses=jnp.array([0.5, 3.]))
    >>> [round(x, 5) for x in state.logits.tolist()]  # task 0's log loss fell by log 2, task 1's did not
    [-0.00433, 0.00433]

  Args:
    num_tasks: number of tasks ``T`` (static).
    learning_rate: :math:`\beta`, the logits' step size (traceable; 0.025 in the paper and the code).
    gamma: :math:`\gamma`, the logits' weight decay (traceable). 1e-3 as in the paper's appendix
      algorithm and LibMTL; the authors' example file uses 0.01 and some of their experiment scripts
      1e-5.
    min_losses: :math:`\ell^{\min}` scalar or ``[T]`` lower bounds of the losses subtracted before the
      logarithm (traceable; 0 by default, as the authors' code).
    eps: :math:`\epsilon` added to the shifted losses (1e-8 as the authors' code; traceable).
    post_step_losses: ``"extra_forward"`` (default, the paper) or ``"next_batch"`` (see above).
    logit_update: ``"sgd"`` (default, the paper's Algorithm 1) or ``"adam"`` (the authors' code).
    logit_optimizer: an optax optimizer for the logits that replaces ``logit_update``.
    shared: shared-parameter mask (see :func:`mtjax.shared_mask`).
    task_specific: ``"weighted"`` (default: the update is the gradient of the scalarized loss for
      every parameter, as in the authors' code) or ``"sum"``.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with state :class:`FAMOState`.

  References:
    Liu, Liu, Jin, Stone, Liu, *FAMO: Fast Adaptive Multitask Optimization*, NeurIPS 2023.
    https://arxiv.org/abs/2306.03792
  """
  if not isinstance(num_tasks, int) or isinstance(num_tasks, bool) or num_tasks < 1:
    raise ValueError(
      f"mtjax: famo: num_tasks must be a positive int, got {num_tasks!r} "
      "(under optax.inject_hyperparams pass static_args=('num_tasks',))."
    )
  if post_step_losses not in FORMS:
    raise ValueError(f"mtjax: famo: post_step_losses must be one of {FORMS}, got {post_step_losses!r}.")
  if logit_optimizer is None and logit_update not in LOGIT_UPDATES:
    raise ValueError(f"mtjax: famo: logit_update must be one of {LOGIT_UPDATES}, got {logit_update!r}.")
  if logit_optimizer is not None:
    optimizer = logit_optimizer
  elif logit_update == "adam":
    optimizer = optax.adam(learning_rate)
  else:
    optimizer = optax.sgd(learning_rate)
  if not isinstance(min_losses, jax.core.Tracer) and np.ndim(min_losses) not in (0, 1):
    raise ValueError(
      f"mtjax: famo: min_losses must be a scalar or have shape ({num_tasks},), got shape {np.shape(min_losses)}."
    )
  if np.ndim(min_losses) == 1 and np.shape(min_losses) != (num_tasks,):
    raise ValueError(
      f"mtjax: famo: min_losses must be a scalar or have shape ({num_tasks},), got shape {np.shape(min_losses)}."
    )

  def init_state(params):
    composition.check_not_wrapped("famo")  # optax.MultiSteps / masked / apply_if_finite around it
    dtype = weighting.params_dtype(params)
    logits = jnp.zeros((num_tasks,), dtype)
    return FAMOState(
      count=jnp.zeros((), jnp.int32),
      logits=logits,
      inner_opt_state=optimizer.init(logits),
      previous_losses=jnp.ones((num_tasks,), dtype),
      weights=jnp.full((num_tasks,), 1 / num_tasks, dtype),
    )

  def shift(losses, what):
    shifted = losses - jnp.asarray(min_losses, losses.dtype) + jnp.asarray(eps, losses.dtype)
    check = numerics.condition_check(
      jnp.any(shifted <= 0),
      lambda v: (
        f"mtjax: famo: {what} minus min_losses plus eps must be positive (FAMO takes their "
        f"logarithm), got {np.asarray(v).tolist()}; lower min_losses or shift the losses."
      ),
      shifted,
    )
    return numerics.enforce(jnp.where(shifted > 0, shifted, jnp.ones_like(shifted)), check)

  def weights_fn(inputs, state, after):
    logits = state.logits
    dtype = logits.dtype
    losses = inputs.task_losses.astype(dtype)
    current = shift(losses, "the task losses")
    if after is None:  # next-batch form: this batch's losses stand in for the previous batch's after the step
      post = current
    else:
      post = shift(after.astype(dtype), AFTER_ARG)
    delta = jnp.log(shift(state.previous_losses, "the task losses")) - jnp.log(post)
    grad = famo_logit_gradient(logits, delta, jnp.asarray(gamma, dtype))
    updates, inner = optimizer.update(grad, state.inner_opt_state, logits)
    stepped = optax.apply_updates(logits, updates).astype(dtype)
    has_previous = state.count > 0  # the first update has no previous step to learn from
    logits = jnp.where(has_previous, stepped, logits)
    inner = jax.tree.map(lambda new, old: jnp.where(has_previous, new, old), inner, state.inner_opt_state)
    weights = famo_weights(logits, current)
    return weights, FAMOState(
      count=optax.safe_increment(state.count),
      logits=logits,
      inner_opt_state=inner,
      previous_losses=losses,
      weights=state.weights,
    )

  def update_fn(updates, state, params=None, *, task_losses=None, **extra_args):
    after = extra_args.pop(AFTER_ARG, None)
    fixed = weighting.FIXED_WEIGHTS in extra_args
    if post_step_losses == "extra_forward" and after is None and not fixed:
      raise ValueError(
        f"mtjax: famo: the paper's form (post_step_losses='extra_forward') needs {AFTER_ARG}= in every "
        "update: the previous batch's task losses evaluated at the current parameters (one extra forward "
        "pass; at the first update, whose value is ignored, pass task_losses). Use "
        "famo(..., post_step_losses='next_batch') to let the next batch's losses stand in for them."
      )
    if post_step_losses == "next_batch" and after is not None:
      raise ValueError(
        f"mtjax: famo: {AFTER_ARG}= was given, but post_step_losses='next_batch' does not use "
        "it; build famo(..., post_step_losses='extra_forward') to use it."
      )
    if after is not None:
      after = jnp.asarray(after)
      if after.shape != (num_tasks,):
        raise ValueError(
          f"mtjax: famo: {AFTER_ARG} must have shape ({num_tasks},) (one loss per task), got {after.shape}."
        )
      after = numerics.enforce(after, numerics.finite_check(after, f"task losses passed to famo as {AFTER_ARG}"))
    core = weighting.gram_weighting(
      functools.partial(weights_fn, after=after),
      init_state,
      method="famo",
      num_tasks=num_tasks,
      shared=shared,
      needs_gram=False,
      requires_task_losses=True,
      task_specific=task_specific,
    )
    return core.update(updates, state, params, task_losses=task_losses, **extra_args)

  setattr(update_fn, weighting.CORE_MARK, True)
  return optax.GradientTransformationExtraArgs(init_state, update_fn)


# The form the experiment runner and mtjax.training.fit can drive: their update passes only task_losses.
next_batch_famo = functools.partial(famo, post_step_losses="next_batch")
