"""CAGrad: conflict-averse gradient descent (Liu et al., NeurIPS 2021), on the Gram-weighting core."""

from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from mtjax._src import numerics
from mtjax._src import solvers
from mtjax._src import tree as tree_lib
from mtjax._src import weighting

RESCALES = ("none", "1/(1+c^2)", "1/(1+c)")


class CAGradState(NamedTuple):
  """State of :func:`cagrad`.

  Attributes:
    weights: the coefficients ``[T]`` applied to the task gradients at the last step (empty when
      ``num_tasks`` is not given).
  """

  weights: jax.Array


CONFLICT_ROUND = 64.0  # rounding units of G w below which c >= 1 returns d = 0 (see cagrad_weights)


def cagrad_weights(
  gram: jax.Array, c, rescale: str = "none", *, max_iters: int = 100, tol: jax.typing.ArrayLike = 1e-6
) -> jax.Array:
  r"""The CAGrad coefficients :math:`b + \frac{r}{\|g_{w^\star}\|} w^\star` (times the rescale factor).

  See :func:`cagrad` (and :func:`mtjax._src.solvers.cagrad_dual` for the rounding floors). ``gram`` is ``[T, T]``;
  the result is ``[T]``. Special cases: :math:`r = 0` (``c = 0`` or :math:`g_0` at its rounding
  floor) gives :math:`b` (``0`` when :math:`c \ge 1` and :math:`g_0` conflicts, see below);
  :math:`g_{w^\star} = 0` gives ``0`` for :math:`c \ge 1` and otherwise :math:`b + v` with
  :math:`J^\top v` the projection of :math:`-g_0` ... see :func:`cagrad`. For
  :math:`c \ge 1` a result whose non-conflict :math:`J d \ge 0` is not certified beyond the Gram's
  rounding (64 units of :math:`|G| |w|`; only near a Pareto-stationary point, where the
  coefficients are large) is replaced by ``0``, which conflicts with no task and is then optimal to
  that precision.
  """
  t = gram.shape[0]
  result = solvers.cagrad_dual(gram, c, max_iters=max_iters, tol=tol)
  scaled, _ = solvers.scale_gram(gram.astype(numerics.gram_dtype(gram.dtype)))
  dtype = scaled.dtype
  c = jnp.asarray(c, dtype)
  b = jnp.full((t,), 1.0 / t, dtype)
  radius = c * result.mean_norm
  # g_w = 0 (only possible at a Pareto-stationary point): every d in the ball with J d >= 0 is optimal.
  # c >= 1: d = 0. c < 1: the one closest to g_0, g_0 + J^T v with v = argmin_{v >= 0} |g_0 + J^T v|^2.
  proj = solvers.nonneg_qp(scaled, jnp.matmul(scaled, b, precision=numerics.HIGHEST), max_iters=max_iters).solution
  dist = jnp.sqrt(jnp.maximum(jnp.dot(proj, jnp.matmul(scaled, proj, precision=numerics.HIGHEST)), 0.0))
  proj = proj * jnp.minimum(1.0, numerics.safe_div(radius, dist))  # stays in the ball under rounding
  at_zero = jnp.where(c >= 1.0, -b, proj)
  correction = jnp.where(result.norm > 0, numerics.safe_div(radius, result.norm) * result.weights, at_zero)
  weights = jnp.where(radius > 0, b + correction, b)
  # c >= 1: d = 0 is in the ball and conflicts with no task, so the optimum never conflicts. Near a
  # Pareto-stationary point (|g_w*| small: the coefficients r / |g_w*| are large) the Gram's rounding,
  # amplified by them, can make d conflict with a task by far more than one rounding unit (seen by the
  # fuzz in float32 on rank-deficient J). Where J d >= 0 is not certified beyond that rounding
  # (CONFLICT_ROUND eps |G| |coefficients| per task), d = 0, certified and then optimal to that precision.
  jd = jnp.matmul(scaled, weights, precision=numerics.HIGHEST)
  rounding = (
    CONFLICT_ROUND * jnp.finfo(dtype).eps * jnp.matmul(jnp.abs(scaled), jnp.abs(weights), precision=numerics.HIGHEST)
  )
  uncertified = jnp.min(jd - rounding) < 0
  # (This covers g_0 at its rounding floor too, r = 0: b is then ~0 but may conflict; c >= 1 gives 0.)
  weights = jnp.where((c >= 1.0) & uncertified, jnp.zeros_like(weights), weights)
  if rescale == "1/(1+c^2)":
    weights = weights / (1.0 + c * c)
  elif rescale == "1/(1+c)":
    weights = weights / (1.0 + c)
  return weights


def cagrad(
  c: jax.typing.ArrayLike = 0.4,
  *,
  num_tasks: Optional[int] = None,
  rescale: str = "none",
  max_iters: int = 100,
  tol: jax.typing.ArrayLike = 1e-6,
  shared: tree_lib.SharedSpec = None,
  gram_leaves: weighting.GramLeavesSpec = None,
  task_specific: str = "sum",
) -> optax.GradientTransformationExtraArgs:
  r"""CAGrad: the best worst-task improvement in a ball around the average gradient.

  With the average gradient :math:`g_0 = \frac1T \sum_i g_i`, CAGrad's direction solves

  .. math::
    d^\star = \arg\max_{d} \min_i \; g_i \cdot d \quad \text{s.t.} \quad \|d - g_0\| \le c \|g_0\|,

  (maximize the worst task's first-order improvement while staying close to the average
  gradient). Its dual is a problem over the simplex: with :math:`g_w = \sum_i w_i g_i` and
  :math:`r = c \|g_0\|`,

  .. math::
    w^\star = \arg\min_{w \in \Delta_T} \; g_w \cdot g_0 + r \|g_w\|, \qquad
    d^\star = g_0 + \frac{r}{\|g_{w^\star}\|} \, g_{w^\star},

  which only needs the Gram matrix :math:`G = J J^\top` of the shared parameters
  (:math:`g_w \cdot g_0 = w^\top G \mathbf 1 / T`, :math:`\|g_w\|^2 = w^\top G w`). It is solved
  exactly on device under ``jit`` by an active-set method with closed-form steps on each support
  (:func:`mtjax._src.solvers.cagrad_dual`, static iteration cap ``max_iters``, tolerance ``tol``
  on the relative Frank-Wolfe gap); the paper and the authors' code use SciPy's SLSQP on the
  host. The task weights are :math:`\frac1T + \frac{r}{\|g_{w^\star}\|} w^\star_t` (times the
  rescale factor), so :math:`d = \sum_t w_t g_t`.

  ``rescale`` divides the update: ``"none"`` (the paper's Algorithm 1), ``"1/(1+c^2)"`` or
  ``"1/(1+c)"`` (the options of the authors' released code, ``rescale=1`` and ``2`` there, which
  keep the step length comparable to plain gradient descent as :math:`c` grows).

  Properties: :math:`c = 0` gives the average gradient; with :math:`c \ge 1` the ball contains
  :math:`0`, so :math:`g_i \cdot d^\star \ge 0` for every task (no conflict, like MGDA); the
  result is permutation equivariant and positively homogeneous of degree 1. At a point where
  :math:`g_{w^\star} = 0` (only possible when :math:`0` is in the convex hull of the gradients)
  the formula is undefined; the transform returns the primal optimum
  :math:`d = (1 - \min(c, 1))\, g_0` there (:math:`d = 0` for :math:`c \ge 1`).

  .. warning::
    Must be first in an ``optax.chain``: it consumes per-task gradients (every leaf
    ``[T, *param.shape]``, e.g. from :func:`mtjax.task_grads`) and emits params-shaped updates.
    Do not wrap it in ``optax.MultiSteps``.

  Examples:
    >>> import jax.numpy as jnp, optax, mtjax
    >>> params = {'w': jnp.zeros(3)}
    >>> task_grads = {'w': jnp.array([[-4., 1., 1.], [6., 1., 1.]])}
    >>> tx = optax.chain(mtjax.cagrad(c=0.5, num_tasks=2), optax.sgd(1.0))
    >>> state = tx.init(params)
    >>> updates, state = tx.update(task_grads, state, params)
    >>> [round(x, 4) for x in (-updates['w']).tolist()]
    [0.1835, 1.2041, 1.2041]

  Args:
    c: radius of the ball relative to :math:`\|g_0\|`, :math:`c \ge 0` (traceable; the paper
      uses 0.4 on its image benchmarks and 0.5 / 0.9 elsewhere).
    num_tasks: number of tasks ``T`` (checked against the gradients; when given, the state
      records the task weights of every step in ``weights``).
    rescale: ``"none"`` (default, the paper), ``"1/(1+c^2)"`` or ``"1/(1+c)"``.
    max_iters: static cap on the solver's active-set steps (with ``optax.inject_hyperparams`` list
      it in ``static_args``).
    tol: solver tolerance on the relative Frank-Wolfe gap; traceable.
    shared: shared-parameter mask (see :func:`mtjax.shared_mask`); the weights come from the
      Gram of the shared leaves only.
    task_specific: ``"sum"`` (plain sum of the task gradients on task-specific leaves) or
      ``"weighted"`` (apply the CAGrad weights there too).
    gram_leaves: restrict the Gram to these shared leaves (path regex(es) or a callable
      ``paths -> bools``); the weights still apply to every shared leaf. With
      ``mtjax.task_grads(..., deferred=True)`` only their rows are computed and the update is
      one backward pass (the "subset" strategy).

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with state :class:`CAGradState`.

  References:
    Liu, Liu, Jin, Stone and Liu, *Conflict-Averse Gradient Descent for Multi-task Learning*,
    NeurIPS 2021. https://arxiv.org/abs/2110.14048
  """
  if rescale not in RESCALES:
    raise ValueError(f"mtjax: cagrad: rescale must be one of {RESCALES}, got {rescale!r}.")
  if isinstance(c, (int, float)) and not c >= 0:
    raise ValueError(f"mtjax: cagrad: c must be >= 0, got {c!r}.")
  max_iters = weighting.static_int(max_iters, "max_iters", "cagrad")

  def init_state(params):
    del params
    return CAGradState(weights=weighting.init_weights(num_tasks))

  def weights_fn(inputs, state):
    radius = jnp.asarray(c)
    if not numerics._is_concrete(radius):  # pylint: disable=protected-access
      radius = numerics.enforce(
        radius,
        numerics.condition_check(
          ~(radius >= 0), "mtjax: cagrad: c must be >= 0 (the radius of the ball around the mean gradient)."
        ),
      )
    return cagrad_weights(inputs.grams[0], radius, rescale, max_iters=max_iters, tol=tol), state

  return tree_lib.with_task_axis_check(
    weighting.gram_weighting(
      weights_fn,
      init_state,
      method="cagrad",
      num_tasks=num_tasks,
      shared=shared,
      gram_leaves=gram_leaves,
      task_specific=task_specific,
      rescale_gram=True,
    ),
    num_tasks,
    "cagrad",
  )
