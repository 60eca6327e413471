"""UPGrad: the average of the task gradients projected onto the dual cone (Quinton & Rey, 2024)."""

from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from mtjax._src import numerics
from mtjax._src import solvers
from mtjax._src import tree as tree_lib
from mtjax._src import weighting


class UPGradState(NamedTuple):
  """State of :func:`upgrad`.

  Attributes:
    weights: the coefficients ``[T]`` applied to the task gradients at the last step (empty when
      ``num_tasks`` is not given).
  """

  weights: jax.Array


def dual_cone_matrix(gram: jax.Array, regularization) -> jax.Array:
  r"""The matrix of the dual-cone projection QPs: :math:`G / \operatorname{tr}(G) + \varepsilon I`.

  Dividing by the trace (the squared Frobenius norm of the Jacobian) makes the projection scale
  invariant and the regularization :math:`\varepsilon` relative; a zero Gram stays zero (plus
  :math:`\varepsilon I`).
  """
  trace = jnp.trace(gram)
  normalized = numerics.safe_div(gram, trace)
  eye = jnp.eye(gram.shape[0], dtype=gram.dtype)
  return normalized + jnp.asarray(regularization, gram.dtype) * eye


def project_to_dual_cone(matrix: jax.Array, base: jax.Array, *, max_iters: int, tol) -> jax.Array:
  r"""Coefficients of the projection of :math:`J^\top u` onto :math:`\{x : J x \ge 0\}`.

  The projection is :math:`J^\top (u + v)` with :math:`v = \arg\min_{v \ge 0} \tfrac12 v^\top A v +
  v^\top A u` (its Lagrangian dual), solved by :func:`mtjax._src.solvers.nonneg_qp`. Returns
  :math:`u + v`.
  """
  linear = jnp.matmul(matrix, base, precision=numerics.HIGHEST)
  return base + solvers.nonneg_qp(matrix, linear, max_iters=max_iters, tol=tol).solution


def _validate(regularization, method):
  if isinstance(regularization, (int, float)) and not regularization >= 0:
    raise ValueError(f"mtjax: {method}: regularization must be >= 0, got {regularization!r}.")


def upgrad(
  *,
  num_tasks: Optional[int] = None,
  regularization: jax.typing.ArrayLike = 1e-4,
  max_iters: int = 100,
  tol: jax.typing.ArrayLike = 1e-7,
  shared: tree_lib.SharedSpec = None,
  gram_leaves: weighting.GramLeavesSpec = None,
  task_specific: str = "sum",
) -> optax.GradientTransformationExtraArgs:
  r"""UPGrad: average the task gradients, each projected onto the dual cone of all of them.

  The dual cone of the task gradients is :math:`\mathcal C = \{x : g_t \cdot x \ge 0 \; \forall t\}`
  (the directions that conflict with no task). UPGrad projects every task gradient onto it and
  averages:

  .. math::
    d = \frac1T \sum_{i=1}^T \pi_{\mathcal C}(g_i), \qquad
    \pi_{\mathcal C}(g_i) = \arg\min_{x \in \mathcal C} \|x - g_i\|^2 = J^\top (e_i + v_i), \quad
    v_i = \arg\min_{v \ge 0} \tfrac12 v^\top A v + v^\top A e_i,

  the second form being the projection's dual, a small quadratic program on the
  :math:`T \times T` matrix :math:`A`. Here :math:`A = G / \operatorname{tr}(G) + \varepsilon I`
  with :math:`G = J J^\top` the Gram of the shared parameters: the trace normalization makes the
  result scale invariant, and the ridge :math:`\varepsilon` (``regularization``) is the authors'
  implementation's (TorchJD's ``reg_eps``, with which the paper's experiments ran): it is as if
  every gradient had an extra private component of squared norm :math:`\varepsilon
  \operatorname{tr}(G)`, which keeps the QPs strictly convex when gradients are collinear or
  :math:`T > P`. ``regularization=0`` is the exact projection of the paper's definition. The
  task weights are :math:`w = \frac1T \sum_i (e_i + v_i)` and :math:`d = \sum_t w_t g_t`. The
  QPs are solved together (``vmap``) by an exact active-set method
  (:func:`mtjax._src.solvers.nonneg_qp`) on device under ``jit``.

  Properties: :math:`d` conflicts with no task, :math:`g_t \cdot d \ge -\varepsilon
  \operatorname{tr}(G)\, w_t` (exactly :math:`\ge 0` for ``regularization=0``); it is linear under
  positive scaling of the tasks, :math:`d(\operatorname{diag}(s) J) = \frac1T \sum_i s_i
  \pi_{\mathcal C}(g_i)` for :math:`s > 0` (exactly for ``regularization=0``; approximately
  otherwise, while :math:`\varepsilon \operatorname{tr}(G)` is small next to every
  :math:`\|g_i\|^2`); it equals the mean gradient when no two gradients
  conflict; and it is permutation equivariant.

  .. warning::
    Must be first in an ``optax.chain``: it consumes per-task gradients (every leaf
    ``[T, *param.shape]``, e.g. from :func:`mtjax.task_grads`) and emits params-shaped updates.
    Do not wrap it in ``optax.MultiSteps``.

  Examples:
    >>> import jax.numpy as jnp, optax, mtjax
    >>> params = {'w': jnp.zeros(3)}
    >>> task_grads = {'w': jnp.array([[-4., 1., 1.], [6., 1., 1.]])}
    >>> tx = optax.chain(mtjax.upgrad(num_tasks=2), optax.sgd(1.0))
    >>> state = tx.init(params)
    >>> updates, state = tx.update(task_grads, state, params)
    >>> [round(x, 4) for x in (-updates['w']).tolist()]
    [0.2929, 1.9004, 1.9004]

  Args:
    num_tasks: number of tasks ``T`` (checked against the gradients; when given, the state
      records the task weights of every step in ``weights``).
    regularization: the ridge :math:`\varepsilon \ge 0` added to the trace-normalized Gram
      (traceable). Default ``1e-4``, the authors' implementation; ``0`` is the exact projection.
    max_iters: static cap on the active-set steps of each QP (with ``optax.inject_hyperparams``
      list it in ``static_args``).
    tol: tolerance of the QP solver on the (normalized) KKT conditions; traceable.
    shared: shared-parameter mask (see :func:`mtjax.shared_mask`); the projections use the Gram
      of the shared leaves only.
    task_specific: ``"sum"`` (plain sum of the task gradients on task-specific leaves) or
      ``"weighted"`` (apply the UPGrad weights there too).
    gram_leaves: restrict the Gram to these shared leaves (path regex(es) or a callable
      ``paths -> bools``); the weights still apply to every shared leaf. With
      ``mtjax.task_grads(..., deferred=True)`` only their rows are computed and the update is
      one backward pass (the "subset" strategy).

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with state :class:`UPGradState`.

  References:
    Quinton and Rey, *Jacobian Descent for Multi-Objective Optimization*, arXiv:2406.16232, 2024.
    https://arxiv.org/abs/2406.16232
  """
  _validate(regularization, "upgrad")
  max_iters = weighting.static_int(max_iters, "max_iters", "upgrad")

  def init_state(params):
    del params
    return UPGradState(weights=weighting.init_weights(num_tasks))

  def weights_fn(inputs, state):
    matrix = dual_cone_matrix(inputs.grams[0], regularization)
    t = inputs.num_tasks
    eye = jnp.eye(t, dtype=matrix.dtype)
    projected = jax.vmap(lambda e: project_to_dual_cone(matrix, e, max_iters=max_iters, tol=tol))(eye)
    return jnp.mean(projected, axis=0), state

  return weighting.gram_weighting(
    weights_fn,
    init_state,
    method="upgrad",
    num_tasks=num_tasks,
    shared=shared,
    gram_leaves=gram_leaves,
    task_specific=task_specific,
    rescale_gram=True,
  )
