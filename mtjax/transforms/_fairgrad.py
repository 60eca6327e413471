"""FairGrad: alpha-fair task weights, G w = w^(-1/alpha) (Ban & Ji, ICML 2024)."""

from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from mtjax._src import numerics
from mtjax._src import solvers
from mtjax._src import tree as tree_lib
from mtjax._src import weighting


class FairGradState(NamedTuple):
  """State of :func:`fairgrad`.

  Attributes:
    weights: the coefficients ``[T]`` applied to the task gradients at the last step (empty when
      ``num_tasks`` is not given).
    status: int32 outcome of the last solve: ``0`` solved, ``1`` Pareto-stationary (no solution;
      zero update), ``2`` not converged (only seen with runtime checks off, see :func:`fairgrad`).
  """

  weights: jax.Array
  status: jax.Array


def balance_weights(gram: jax.Array, alpha, *, max_iters: int, tol, gram_log2_scale=0.0) -> solvers.BalanceResult:
  r"""Solves :math:`G w = w^{-1/\alpha}`, :math:`w > 0`, through the cosine form of the equations.

  With :math:`n_i = \|g_i\|`, :math:`C = D^{-1} G D^{-1}` and :math:`v = D w`, the equations read
  :math:`(C v)_i = n_i^{1/\alpha - 1} v_i^{-1/\alpha}`; the coefficients are divided by their
  largest value :math:`\kappa` (then :math:`v = \kappa^{\alpha / (1 + \alpha)} \hat v`), all in
  log space, so mixed gradient scales (``1e-10`` next to ``1e10``) neither overflow nor lose the
  small tasks. Zero gradients are left out (zero weight). Returns the result with ``weights`` =
  :math:`w`.

  ``gram_log2_scale`` ``L``: ``gram`` is :math:`2^L G` (the core's rescaled Gram); the weights of
  :math:`G` are those of :math:`2^L G` times :math:`2^{L \alpha / (1 + \alpha)}` (applied in log space).
  """
  gram = gram.astype(numerics.gram_dtype(gram.dtype))
  dtype = gram.dtype
  diag = jnp.diagonal(gram)
  active = diag > jnp.finfo(dtype).tiny
  log_norm = 0.5 * jnp.log(jnp.where(active, diag, 1.0))
  alpha = jnp.asarray(alpha, dtype)
  log_coef = (1.0 / alpha - 1.0) * log_norm
  log_kappa = jnp.max(jnp.where(active, log_coef, -jnp.inf))
  log_kappa = jnp.where(jnp.isfinite(log_kappa), log_kappa, 0.0)
  coef = jnp.exp(jnp.where(active, log_coef - log_kappa, 0.0))
  result = solvers.balance_newton(numerics.cosine_from_gram(gram), coef, alpha, active, max_iters=max_iters, tol=tol)
  log_scale = alpha / (1.0 + alpha) * (log_kappa + jnp.log(2.0).astype(dtype) * jnp.asarray(gram_log2_scale, dtype))
  log_scale = log_scale - log_norm
  weights = jnp.where(result.weights > 0, result.weights * jnp.exp(jnp.where(active, log_scale, 0.0)), 0.0)
  return result._replace(weights=weights)


def failure_check(result: solvers.BalanceResult, method: str):
  """The runtime check that the balance solver converged (a ``numerics.Check`` or ``None``)."""

  def message(operand):
    decrement, iterations = operand if operand is not None else (float("nan"), -1)
    return (
      f"mtjax: {method}: the weight solver did not converge in {int(iterations)} Newton steps "
      f"(squared Newton decrement {float(decrement):.3g}); the task gradients are probably nearly "
      "Pareto-stationary or too ill-conditioned for the dtype. Raise max_iters or tol, use float64, "
      "or run with mtjax.runtime_checks(False) and read state.status (2 = not converged)."
    )

  return numerics.condition_check(
    result.status == solvers.NOT_CONVERGED, message, (result.decrement, result.iterations)
  )


def fairgrad(
  alpha: jax.typing.ArrayLike = 1.0,
  *,
  num_tasks: Optional[int] = None,
  max_iters: int = 100,
  tol: jax.typing.ArrayLike = 1e-10,
  shared: tree_lib.SharedSpec = None,
  gram_leaves: weighting.GramLeavesSpec = None,
  task_specific: str = "sum",
) -> optax.GradientTransformationExtraArgs:
  r"""FairGrad: task weights from :math:`\alpha`-fair utility maximization, :math:`G w = w^{-1/\alpha}`.

  FairGrad treats the first-order improvement :math:`u_i = g_i \cdot d` of each task as its
  utility and picks the update :math:`d = \sum_t w_t g_t` that maximizes the
  :math:`\alpha`-fair welfare :math:`\sum_i u_i^{1-\alpha} / (1 - \alpha)` (:math:`\sum_i \log
  u_i` for :math:`\alpha = 1`) over a ball. Its optimality condition is

  .. math::
    G w = w^{-1/\alpha} \quad (\text{elementwise}), \qquad w > 0,

  with :math:`G = J J^\top` the Gram of the shared parameters. :math:`\alpha = 1` is
  proportional fairness and coincides with :func:`mtjax.nash_mtl`; :math:`\alpha \to \infty`
  approaches max-min fairness (MGDA-like); :math:`\alpha \to 0` the plain sum. The equations
  are the stationarity conditions of a strictly convex potential, minimized by a damped Newton
  method on device under ``jit`` (:func:`mtjax._src.solvers.balance_newton`, static cap
  ``max_iters``, tolerance ``tol`` on the squared Newton decrement); the authors' code uses
  SciPy's ``least_squares`` on the host. The weights are exact solutions, with no normalization:
  the update is positively homogeneous of degree :math:`(1-\alpha)/(1+\alpha)` in the gradients
  (:math:`\|d\|^2 = \sum_t w_t^{1 - 1/\alpha}`; degree 0 and :math:`\|d\| = \sqrt T` for
  :math:`\alpha = 1`, like a normalized gradient), so use a decaying learning rate or an
  adaptive optimizer after it.

  No silent fallback:

  * When :math:`0` is in the convex hull of the task gradients (a Pareto-stationary point: no
    direction improves every task, e.g. two exactly opposite gradients, or all zero), the
    equations have no solution; the transform returns a zero update and records
    ``state.status = 1``. Zero task gradients are left out of the equations (zero weight).
  * If the solver reaches ``max_iters`` without converging, the update raises a ``ValueError``
    (eagerly), or under ``jit`` a runtime error carrying the same message, through the
    runtime checks (:func:`mtjax.set_runtime_checks`). With runtime checks switched off the last
    Newton iterate is used and ``state.status = 2`` records the failure: check it.

  .. warning::
    Must be first in an ``optax.chain``: it consumes per-task gradients (every leaf
    ``[T, *param.shape]``, e.g. from :func:`mtjax.task_grads`) and emits params-shaped updates.
    Do not wrap it in ``optax.MultiSteps``.

  Examples:
    >>> import jax.numpy as jnp, optax, mtjax
    >>> params = {'w': jnp.zeros(3)}
    >>> task_grads = {'w': jnp.array([[-4., 1., 1.], [6., 1., 1.]])}
    >>> tx = optax.chain(mtjax.fairgrad(alpha=1.0, num_tasks=2), optax.sgd(1.0))
    >>> state = tx.init(params)
    >>> updates, state = tx.update(task_grads, state, params)
    >>> [round(x, 4) for x in (-updates['w']).tolist()]
    [0.0766, 0.9985, 0.9985]
    >>> int(state[0].status)
    0

  Args:
    alpha: the fairness parameter :math:`\alpha > 0` (traceable; ``1`` = proportional fairness,
      the same weights as Nash-MTL; the paper tunes it per benchmark).
    num_tasks: number of tasks ``T`` (checked against the gradients; when given, the state
      records the task weights of every step in ``weights``).
    max_iters: static cap on the Newton steps (with ``optax.inject_hyperparams`` list it in
      ``static_args``).
    tol: tolerance on the squared Newton decrement (relative to the potential; the solver also
      accepts the dtype's rounding floor); traceable. The equations hold to about
      :math:`\sqrt{\texttt{tol}}` relative: the default ``1e-10`` gives ``~1e-5`` (measured, float32
      and float64); pass ``tol=1e-20`` in float64 for ``~1e-10`` (float32 stops at ``~1e-5``, its
      rounding floor).
    shared: shared-parameter mask (see :func:`mtjax.shared_mask`); the weights come from the
      Gram of the shared leaves only.
    task_specific: ``"sum"`` (plain sum of the task gradients on task-specific leaves) or
      ``"weighted"`` (apply the FairGrad weights there too).
    gram_leaves: restrict the Gram to these shared leaves (path regex(es) or a callable
      ``paths -> bools``); the weights still apply to every shared leaf. With
      ``mtjax.task_grads(..., deferred=True)`` only their rows are computed and the update is
      one backward pass (the "subset" strategy).

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with state :class:`FairGradState`.

  References:
    Ban and Ji, *Fair Resource Allocation in Multi-Task Learning*, ICML 2024.
    https://arxiv.org/abs/2402.15638
  """
  if isinstance(alpha, (int, float)) and not alpha > 0:
    raise ValueError(f"mtjax: fairgrad: alpha must be > 0, got {alpha!r}.")
  max_iters = weighting.static_int(max_iters, "max_iters", "fairgrad")

  def init_state(params):
    return FairGradState(
      weights=weighting.init_weights(num_tasks, dtype=weighting.params_dtype(params)), status=jnp.zeros((), jnp.int32)
    )

  def weights_fn(inputs, state):
    a = jnp.asarray(alpha)
    alpha_check = None
    if not numerics._is_concrete(a):  # pylint: disable=protected-access
      alpha_check = numerics.condition_check(~(a > 0), "mtjax: fairgrad: alpha must be > 0.")
    result = balance_weights(inputs.grams[0], a, max_iters=max_iters, tol=tol, gram_log2_scale=inputs.gram_log2_scale)
    weights = numerics.enforce(result.weights, alpha_check, failure_check(result, "fairgrad"))
    return weights, state._replace(status=result.status)

  return weighting.gram_weighting(
    weights_fn,
    init_state,
    method="fairgrad",
    num_tasks=num_tasks,
    shared=shared,
    gram_leaves=gram_leaves,
    task_specific=task_specific,
    rescale_gram=True,
  )
