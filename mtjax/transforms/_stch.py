"""STCH: smooth Tchebycheff scalarization (Lin et al., ICML 2024)."""

from __future__ import annotations

from typing import NamedTuple, Optional, Union

import jax
import jax.core
import jax.numpy as jnp
import numpy as np
import optax

from mtjax._src import numerics
from mtjax._src import tree as tree_lib
from mtjax._src import weighting
from mtjax.transforms._scale_invariant import positive_losses

NORMALIZATIONS = ("none", "log_nadir")
WARMUP_WEIGHTINGS = ("mean", "log")


class STCHState(NamedTuple):
  """State of :func:`stch`.

  Attributes:
    count: number of updates so far (int32).
    nadir: ``[T]`` the nadir point: the average task losses over the last ``nadir_steps`` warm-up
      steps (partial sums during the warm-up; zeros without one).
    weights: ``[T]`` the task weights used by the last update.
  """

  count: jax.Array
  nadir: jax.Array
  weights: jax.Array


def stch_objective(
  task_losses: jax.typing.ArrayLike,
  mu,
  preference: Optional[jax.typing.ArrayLike] = None,
  ideal_point: Union[float, jax.typing.ArrayLike] = 0.0,
) -> jax.Array:
  r"""The smooth Tchebycheff scalarization :math:`\mu \log \sum_i \exp(\lambda_i (L_i - z_i) / \mu)`.

  Evaluated with a stable log-sum-exp. :func:`stch` follows its gradient without evaluating it; use
  this helper to log or check it.

  Examples:
    >>> import jax.numpy as jnp, mtjax
    >>> mtjax.stch_objective(jnp.array([1., 1.]), mu=1.0)  # log(2 e)
    Array(1.6931472, dtype=float32)

  Args:
    task_losses: ``[T]`` task losses :math:`L`.
    mu: smoothing parameter :math:`\mu > 0`.
    preference: ``[T]`` preference :math:`\lambda` (``None``: ones).
    ideal_point: scalar or ``[T]`` ideal point :math:`z`.

  Returns:
    The scalar objective.
  """
  task_losses = jnp.asarray(task_losses)
  if task_losses.ndim != 1:
    raise ValueError(f"mtjax: stch_objective: task_losses must have shape [T], got {task_losses.shape}.")
  lam = jnp.ones_like(task_losses) if preference is None else jnp.asarray(preference, task_losses.dtype)
  u = lam * (task_losses - jnp.asarray(ideal_point, task_losses.dtype))
  mu = jnp.asarray(mu, task_losses.dtype)
  return mu * jax.nn.logsumexp(u / mu)


def stch(
  *,
  num_tasks: int,
  mu: float = 1.0,
  preference: Optional[jax.typing.ArrayLike] = None,
  ideal_point: Union[float, jax.typing.ArrayLike] = 0.0,
  normalization: str = "none",
  warmup_steps: int = 0,
  nadir_steps: Optional[int] = None,
  warmup_weighting: str = "mean",
  shared: tree_lib.SharedSpec = None,
  task_specific: str = "weighted",
) -> optax.GradientTransformationExtraArgs:
  r"""Smooth Tchebycheff scalarization: a softmax weighting that favours the worst-off task.

  The smooth Tchebycheff scalarization of the task losses,

  .. math::
    g_\mu(\theta) = \mu \log \sum_i \exp\Big(\frac{\lambda_i (f_i(\theta) - z_i)}{\mu}\Big), \qquad
    d = \nabla_\theta g_\mu = \sum_i \lambda_i\, p_i\, \nabla f_i, \quad
    p = \operatorname{softmax}\big(\lambda \odot (f - z) / \mu\big),

  is a smooth upper bound of the Tchebycheff scalarization :math:`\max_i \lambda_i (f_i - z_i)`
  (within :math:`\mu \log T`), which it approaches as :math:`\mu \to 0`; for :math:`\mu \to \infty`
  the weights become uniform. :math:`\lambda` is the preference (``preference``, default ones) and
  :math:`z` the ideal point (``ideal_point``, default 0). The softmax is evaluated stably (largest
  logit subtracted), and :math:`\mu` is a traceable hyperparameter.

  * ``normalization="none"`` (default, the paper's scalarization): :math:`f_i = L_i`, weights
    :math:`w_i = \lambda_i p_i` (summing to 1 for the default preference).
  * ``normalization="log_nadir"`` (the authors' multi-task code): :math:`f_i = \log(L_i / n_i)`
    with the nadir point :math:`n` recorded during a warm-up of ``warmup_steps`` updates (the
    average of the task losses over its last ``nadir_steps`` updates, by default all of them; the
    authors average over the last warm-up epoch) and :math:`z = 0`; the weights are
    :math:`w_i = \lambda_i p_i / L_i`. Losses must then be positive. (The authors' code also
    multiplies the scalarized loss by :math:`T`: the same as a :math:`T` times larger step.)

  During the warm-up (``count < warmup_steps``; none by default) the weights are uniform,
  :math:`1/T` (``warmup_weighting="mean"``), or :math:`1 / L_i` (``"log"``: the gradient of
  :math:`\sum_i \log L_i`, what the authors' code uses during its warm-up epochs).

  Loss-only: with :func:`mtjax.task_grads` ``(..., deferred=True)`` each update is ONE backward pass.

  .. warning::
    Must be first in an ``optax.chain``: it consumes per-task gradients (every leaf
    ``[T, *param.shape]``, e.g. from :func:`mtjax.task_grads`) and emits params-shaped updates.
    Needs ``task_losses=`` in every ``update``. Under ``optax.inject_hyperparams`` pass
    ``static_args=("num_tasks", "warmup_steps", "nadir_steps")``.

  Examples:
    >>> import jax.numpy as jnp, optax, mtjax
    >>> params = {'w': jnp.zeros(2)}
    >>> task_grads = {'w': jnp.array([[1., 0.], [0., 1.]])}
    >>> tx = mtjax.stch(num_tasks=2, mu=1.0)
    >>> updates, state = tx.update(task_grads, tx.init(params), params, task_losses=jnp.array([1., 1. + jnp.log(3.)]))
    >>> [round(x, 4) for x in updates['w'].tolist()]  # softmax(L / mu): the larger loss gets 3 times the weight
    [0.25, 0.75]

  Args:
    num_tasks: number of tasks ``T`` (static).
    mu: the smoothing parameter :math:`\mu > 0` (traceable).
    preference: ``[T]`` positive preference :math:`\lambda` (``None``: ones; traceable).
    ideal_point: scalar or ``[T]`` ideal point :math:`z` (traceable; ignored by ``"log_nadir"``).
    normalization: ``"none"`` (default, the paper) or ``"log_nadir"`` (the authors' code).
    warmup_steps: number of warm-up updates (static int).
    nadir_steps: the last ``nadir_steps`` warm-up updates whose losses are averaged into the nadir
      point (static int; ``None``: all of them).
    warmup_weighting: ``"mean"`` (default, weights :math:`1/T`) or ``"log"`` (:math:`1/L_i`).
    shared: shared-parameter mask (see :func:`mtjax.shared_mask`).
    task_specific: ``"weighted"`` (default, the exact gradient of the scalarization) or ``"sum"``.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with state :class:`STCHState`.

  References:
    Lin, Zhang, Wang, Zhang, Liu, Zhang, *Smooth Tchebycheff Scalarization for Multi-Objective
    Optimization*, ICML 2024. https://arxiv.org/abs/2402.19078
  """
  method = "stch"
  if not isinstance(num_tasks, int) or isinstance(num_tasks, bool) or num_tasks < 1:
    raise ValueError(
      f"mtjax: stch: num_tasks must be a positive int, got {num_tasks!r} "
      "(under optax.inject_hyperparams pass static_args=('num_tasks',))."
    )
  if normalization not in NORMALIZATIONS:
    raise ValueError(f"mtjax: stch: normalization must be one of {NORMALIZATIONS}, got {normalization!r}.")
  if warmup_weighting not in WARMUP_WEIGHTINGS:
    raise ValueError(f"mtjax: stch: warmup_weighting must be one of {WARMUP_WEIGHTINGS}, got {warmup_weighting!r}.")
  warmup = weighting.static_int(warmup_steps, "warmup_steps", method)
  nadir_n = warmup if nadir_steps is None else weighting.static_int(nadir_steps, "nadir_steps", method)
  if normalization == "log_nadir" and warmup < 1:
    raise ValueError(
      "mtjax: stch: normalization='log_nadir' needs a warm-up (warmup_steps >= 1) to record the nadir point."
    )
  if nadir_n > warmup or (warmup and nadir_n < 1):
    raise ValueError(f"mtjax: stch: nadir_steps must be between 1 and warmup_steps={warmup}, got {nadir_steps!r}.")
  for name, value in (("preference", preference), ("ideal_point", ideal_point)):
    if (
      value is not None
      and not isinstance(value, jax.core.Tracer)
      and np.ndim(value) == 1
      and np.shape(value) != (num_tasks,)
    ):
      raise ValueError(f"mtjax: stch: {name} must have shape ({num_tasks},), got {np.shape(value)}.")

  def init_state(params):
    dtype = weighting.params_dtype(params)
    return STCHState(
      count=jnp.zeros((), jnp.int32),
      nadir=jnp.zeros((num_tasks,), dtype),
      weights=jnp.full((num_tasks,), 1 / num_tasks, dtype),
    )

  def weights_fn(inputs, state):
    dtype = state.nadir.dtype
    losses = inputs.task_losses.astype(dtype)
    mu_ = jnp.asarray(mu, dtype)
    mu_ = numerics.enforce(
      mu_,
      numerics.condition_check(
        ~(mu_ > 0), lambda v: f"mtjax: stch: mu must be positive, got {np.asarray(v).tolist()}.", mu_
      ),
    )
    lam = (
      jnp.ones((num_tasks,), dtype)
      if preference is None
      else jnp.broadcast_to(jnp.asarray(preference, dtype), (num_tasks,))
    )
    if normalization == "log_nadir" or warmup_weighting == "log":
      positive = positive_losses(losses, method, "the scalarization takes their logarithm")
    if normalization == "log_nadir":
      nadir = jnp.where(state.nadir > 0, state.nadir, jnp.ones_like(state.nadir))
      scores = lam * (jnp.log(positive) - jnp.log(nadir))
      weights = lam * jax.nn.softmax(scores / mu_) / positive
    else:
      scores = lam * (losses - jnp.asarray(ideal_point, dtype))
      weights = lam * jax.nn.softmax(scores / mu_)
    if warmup == 0:
      return weights, STCHState(count=optax.safe_increment(state.count), nadir=state.nadir, weights=state.weights)
    in_warmup = state.count < warmup
    warm = 1.0 / positive if warmup_weighting == "log" else jnp.full((num_tasks,), 1 / num_tasks, dtype)
    weights = jnp.where(in_warmup, warm, weights)
    record = in_warmup & (state.count >= warmup - nadir_n)
    nadir = jnp.where(record, state.nadir + losses / nadir_n, state.nadir)
    return weights, STCHState(count=optax.safe_increment(state.count), nadir=nadir, weights=state.weights)

  return weighting.gram_weighting(
    weights_fn,
    init_state,
    method=method,
    num_tasks=num_tasks,
    shared=shared,
    needs_gram=False,
    requires_task_losses=True,
    task_specific=task_specific,
  )


def stch_as_trained_by_the_authors(
  *,
  num_tasks: int,
  steps_per_epoch: int,
  mu: float = 1.0,
  preference: Optional[jax.typing.ArrayLike] = None,
  warmup_steps: Optional[int] = None,
  nadir_steps: Optional[int] = None,
  warmup_weighting: str = "log",
  shared: tree_lib.SharedSpec = None,
  task_specific: str = "weighted",
) -> optax.GradientTransformationExtraArgs:
  """:func:`stch` set up as the authors train multi-task models (the ``"stch"`` of ``mtjax compare``).

  The scalarization of the raw losses (:func:`stch`'s default) lets the task with the largest loss
  *scale* take all the weight: on tasks whose losses differ by orders of magnitude (a cross-entropy
  and a squared error) it trains that task alone. The authors' multi-task code scalarizes
  :math:`\\log(L_i / n_i)` instead, with the nadir point :math:`n` recorded during a warm-up of one
  epoch in which the weights are :math:`1/L_i`: ``normalization="log_nadir"``,
  ``warmup_weighting="log"`` and ``warmup_steps = steps_per_epoch`` (unless given).
  """
  return stch(
    num_tasks=num_tasks,
    mu=mu,
    preference=preference,
    normalization="log_nadir",
    warmup_steps=steps_per_epoch if warmup_steps is None else warmup_steps,
    nadir_steps=nadir_steps,
    warmup_weighting=warmup_weighting,
    shared=shared,
    task_specific=task_specific,
  )
