"""Nash-MTL: the Nash bargaining solution of the tasks (Navon et al., ICML 2022)."""

from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from mtjax._src import numerics
from mtjax._src import tree as tree_lib
from mtjax._src import weighting
from mtjax.transforms._fairgrad import balance_weights
from mtjax.transforms._fairgrad import failure_check

NORMALIZATIONS = ("none", "frobenius")


class NashMTLState(NamedTuple):
  """State of :func:`nash_mtl`.

  Attributes:
    weights: the coefficients ``[T]`` applied to the task gradients at the last step (empty when
      ``num_tasks`` is not given).
    status: int32 outcome of the last solve: ``0`` solved, ``1`` Pareto-stationary (no solution;
      zero update), ``2`` not converged (only seen with runtime checks off, see :func:`nash_mtl`).
  """

  weights: jax.Array
  status: jax.Array


def frobenius_factor(gram: jax.Array) -> jax.Array:
  r""":math:`\sqrt{\|G\|_F}`, computed without overflow (the authors' code solves on :math:`G / \|G\|_F`)."""
  top = jnp.max(jnp.abs(gram))
  safe_top = jnp.where(top > 0, top, 1.0)
  return jnp.sqrt(safe_top * jnp.sqrt(jnp.sum(jnp.square(gram / safe_top))))


def nash_mtl(
  *,
  num_tasks: Optional[int] = None,
  normalization: str = "none",
  max_iters: int = 100,
  tol: jax.typing.ArrayLike = 1e-10,
  shared: tree_lib.SharedSpec = None,
  gram_leaves: weighting.GramLeavesSpec = None,
  task_specific: str = "sum",
) -> optax.GradientTransformationExtraArgs:
  r"""Nash-MTL: the tasks bargain over the update; the Nash bargaining solution wins.

  Each task's utility is its first-order improvement :math:`g_i \cdot d`; the Nash bargaining
  solution maximizes :math:`\sum_i \log(g_i \cdot d)` over a ball. It is :math:`d = \sum_t w_t g_t`
  with :math:`w > 0` solving

  .. math::
    w_i \, (G w)_i = 1 \quad \text{for every task } i \qquad (G^\top G \alpha = 1/\alpha
    \text{ in the paper's notation}),

  with :math:`G = J J^\top` the Gram of the shared parameters (then :math:`g_i \cdot d = 1 / w_i >
  0`: every task improves, and :math:`\|d\|^2 = w^\top G w = T`). The update is invariant to a
  positive rescaling of any task's gradient (:math:`w_i g_i` does not change).

  Solver (a deviation from the paper): the paper and the authors' code solve a sequence of
  convex approximations (CCP) with cvxpy on the host, keep the previous weights when the solver
  fails, and can skip steps (``update_weights_every``). Here the equations are the stationarity
  conditions of the strictly convex potential :math:`\tfrac12 v^\top C v - \sum_i \log v_i` on
  the cosine matrix :math:`C` (with :math:`v_i = \|g_i\| w_i`), minimized by a damped Newton
  method on device under ``jit`` (:func:`mtjax._src.solvers.balance_newton`, shared with
  :func:`mtjax.fairgrad`, static cap ``max_iters``, tolerance ``tol`` on the squared Newton
  decrement), every step.

  ``normalization`` sets the update's scale: ``"none"`` (default, the paper's equations: the
  update has norm :math:`\sqrt T` whatever the gradients' scale, like a normalized gradient;
  use a decaying learning rate or an adaptive optimizer) or ``"frobenius"`` (the authors' code,
  which solves on :math:`G / \|G\|_F`: the weights are multiplied by :math:`\sqrt{\|G\|_F}` and
  the update scales like the gradients). The authors' code also clips the update's norm
  (``max_norm``); chain ``optax.clip_by_global_norm`` for that.

  No silent fallback:

  * When :math:`0` is in the convex hull of the task gradients (a Pareto-stationary point: no
    direction improves every task, e.g. exactly opposite gradients, or all zero) the bargaining
    problem has no solution; the transform returns a zero update and records
    ``state.status = 1``. Zero task gradients are left out of the bargaining (zero weight).
  * If the solver reaches ``max_iters`` without converging, the update raises a ``ValueError``
    (eagerly), or under ``jit`` a runtime error carrying the same message, through the runtime
    checks (:func:`mtjax.set_runtime_checks`). With runtime checks switched off the last Newton
    iterate is used and ``state.status = 2`` records the failure: check it.

  .. warning::
    Must be first in an ``optax.chain``: it consumes per-task gradients (every leaf
    ``[T, *param.shape]``, e.g. from :func:`mtjax.task_grads`) and emits params-shaped updates.
    Do not wrap it in ``optax.MultiSteps``.

  Examples:
    >>> import jax.numpy as jnp, optax, mtjax
    >>> params = {'w': jnp.zeros(3)}
    >>> task_grads = {'w': jnp.array([[-4., 1., 1.], [6., 1., 1.]])}
    >>> tx = optax.chain(mtjax.nash_mtl(num_tasks=2), optax.sgd(1.0))
    >>> state = tx.init(params)
    >>> updates, state = tx.update(task_grads, state, params)
    >>> [round(x, 4) for x in (-updates['w']).tolist()]
    [0.0766, 0.9985, 0.9985]
    >>> [round(x, 3) for x in state[0].weights.tolist()]  # w_i (G w)_i = 1
    [0.591, 0.407]

  Args:
    num_tasks: number of tasks ``T`` (checked against the gradients; when given, the state
      records the task weights of every step in ``weights``).
    normalization: ``"none"`` (default, the paper) or ``"frobenius"`` (the authors' code).
    max_iters: static cap on the Newton steps (with ``optax.inject_hyperparams`` list it in
      ``static_args``).
    tol: tolerance on the squared Newton decrement (the solver also accepts the dtype's rounding
      floor); traceable. The equations hold to about
      :math:`\sqrt{\texttt{tol}}` relative: the default ``1e-10`` gives ``~1e-5`` (measured, float32
      and float64); pass ``tol=1e-20`` in float64 for ``~1e-10`` (float32 stops at ``~1e-5``, its
      rounding floor).
    shared: shared-parameter mask (see :func:`mtjax.shared_mask`); the weights come from the
      Gram of the shared leaves only.
    task_specific: ``"sum"`` (plain sum of the task gradients on task-specific leaves) or
      ``"weighted"`` (apply the Nash-MTL weights there too).
    gram_leaves: restrict the Gram to these shared leaves (path regex(es) or a callable
      ``paths -> bools``); the weights still apply to every shared leaf. With
      ``mtjax.task_grads(..., deferred=True)`` only their rows are computed and the update is
      one backward pass (the "subset" strategy).

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with state :class:`NashMTLState`.

  References:
    Navon, Shamsian, Achituve, Maron, Kawaguchi, Chechik and Fetaya, *Multi-Task Learning as a
    Bargaining Game*, ICML 2022. https://arxiv.org/abs/2202.01017
  """
  if normalization not in NORMALIZATIONS:
    raise ValueError(f"mtjax: nash_mtl: normalization must be one of {NORMALIZATIONS}, got {normalization!r}.")
  max_iters = weighting.static_int(max_iters, "max_iters", "nash_mtl")

  def init_state(params):
    return NashMTLState(
      weights=weighting.init_weights(num_tasks, dtype=weighting.params_dtype(params)), status=jnp.zeros((), jnp.int32)
    )

  def weights_fn(inputs, state):
    gram = inputs.grams[0].astype(numerics.gram_dtype(inputs.grams.dtype))
    if normalization == "frobenius":  # w(G) sqrt(|G|_F) is invariant to a common scale of G
      result = balance_weights(gram, 1.0, max_iters=max_iters, tol=tol)
      weights = result.weights * frobenius_factor(gram)
    else:
      result = balance_weights(gram, 1.0, max_iters=max_iters, tol=tol, gram_log2_scale=inputs.gram_log2_scale)
      weights = result.weights
    weights = numerics.enforce(weights, failure_check(result, "nash_mtl"))
    return weights, state._replace(status=result.status)

  return weighting.gram_weighting(
    weights_fn,
    init_state,
    method="nash_mtl",
    num_tasks=num_tasks,
    shared=shared,
    gram_leaves=gram_leaves,
    task_specific=task_specific,
    rescale_gram=True,
  )
