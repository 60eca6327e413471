"""DualProj: the mean gradient projected onto the dual cone of the task gradients (Quinton & Rey, 2024)."""

from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from mtjax._src import tree as tree_lib
from mtjax._src import weighting
from mtjax.transforms._upgrad import _validate
from mtjax.transforms._upgrad import dual_cone_matrix
from mtjax.transforms._upgrad import project_to_dual_cone


class DualProjState(NamedTuple):
  """State of :func:`dualproj`.

  Attributes:
    weights: the coefficients ``[T]`` applied to the task gradients at the last step (empty when
      ``num_tasks`` is not given).
  """

  weights: jax.Array


def dualproj(
  *,
  num_tasks: Optional[int] = None,
  regularization: jax.typing.ArrayLike = 1e-4,
  max_iters: int = 100,
  tol: jax.typing.ArrayLike = 1e-7,
  shared: tree_lib.SharedSpec = None,
  gram_leaves: weighting.GramLeavesSpec = None,
  task_specific: str = "sum",
) -> optax.GradientTransformationExtraArgs:
  r"""DualProj: project the mean task gradient onto the dual cone of the task gradients.

  With the dual cone :math:`\mathcal C = \{x : g_t \cdot x \ge 0 \; \forall t\}` and the mean
  gradient :math:`\bar g = J^\top u`, :math:`u = \mathbf 1 / T`:

  .. math::
    d = \pi_{\mathcal C}(\bar g) = \arg\min_{x \in \mathcal C} \|x - \bar g\|^2 = J^\top (u + v),
    \qquad v = \arg\min_{v \ge 0} \tfrac12 v^\top A v + v^\top A u,

  a small quadratic program on :math:`A = G / \operatorname{tr}(G) + \varepsilon I`, solved by an
  exact active-set method (:func:`mtjax._src.solvers.nonneg_qp`) on device under ``jit``. As in
  :func:`mtjax.upgrad`, the trace normalization makes it scale invariant and the ridge
  :math:`\varepsilon` (``regularization``, default ``1e-4``) is the authors' implementation's
  (TorchJD's ``reg_eps``); ``regularization=0`` is the exact projection of the paper's
  definition. The task weights are :math:`w = u + v`.

  Properties: :math:`g_t \cdot d \ge -\varepsilon \operatorname{tr}(G)\, w_t` (no conflict;
  exactly :math:`\ge 0` for ``regularization=0``); :math:`d = \bar g` when the mean gradient
  conflicts with no task; permutation equivariant; positively homogeneous of degree 1. Unlike
  :func:`mtjax.upgrad` it is not linear under per-task scaling (the mean weights the tasks by
  their gradients' norms).

  .. warning::
    Must be first in an ``optax.chain``: it consumes per-task gradients (every leaf
    ``[T, *param.shape]``, e.g. from :func:`mtjax.task_grads`) and emits params-shaped updates.
    Do not wrap it in ``optax.MultiSteps``.

  Examples:
    >>> import jax.numpy as jnp, optax, mtjax
    >>> params = {'w': jnp.zeros(3)}
    >>> task_grads = {'w': jnp.array([[-4., 1., 1.], [6., 1., 1.]])}
    >>> tx = optax.chain(mtjax.dualproj(num_tasks=2), optax.sgd(1.0))
    >>> state = tx.init(params)
    >>> updates, state = tx.update(task_grads, state, params)
    >>> [round(x, 4) for x in (-updates['w']).tolist()]
    [0.5563, 1.1109, 1.1109]

  Args:
    num_tasks: number of tasks ``T`` (checked against the gradients; when given, the state
      records the task weights of every step in ``weights``).
    regularization: the ridge :math:`\varepsilon \ge 0` added to the trace-normalized Gram
      (traceable). Default ``1e-4``, the authors' implementation; ``0`` is the exact projection.
    max_iters: static cap on the active-set steps of the QP (with ``optax.inject_hyperparams``
      list it in ``static_args``).
    tol: tolerance of the QP solver on the (normalized) KKT conditions; traceable.
    shared: shared-parameter mask (see :func:`mtjax.shared_mask`); the projection uses the Gram
      of the shared leaves only.
    task_specific: ``"sum"`` (plain sum of the task gradients on task-specific leaves) or
      ``"weighted"`` (apply the DualProj weights there too).
    gram_leaves: restrict the Gram to these shared leaves (path regex(es) or a callable
      ``paths -> bools``); the weights still apply to every shared leaf. With
      ``mtjax.task_grads(..., deferred=True)`` only their rows are computed and the update is
      one backward pass (the "subset" strategy).

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with state :class:`DualProjState`.

  References:
    Quinton and Rey, *Jacobian Descent for Multi-Objective Optimization*, arXiv:2406.16232, 2024.
    https://arxiv.org/abs/2406.16232
  """
  _validate(regularization, "dualproj")
  max_iters = weighting.static_int(max_iters, "max_iters", "dualproj")

  def init_state(params):
    del params
    return DualProjState(weights=weighting.init_weights(num_tasks))

  def weights_fn(inputs, state):
    matrix = dual_cone_matrix(inputs.grams[0], regularization)
    t = inputs.num_tasks
    base = jnp.full((t,), 1.0 / t, matrix.dtype)
    return project_to_dual_cone(matrix, base, max_iters=max_iters, tol=tol), state

  return weighting.gram_weighting(
    weights_fn,
    init_state,
    method="dualproj",
    num_tasks=num_tasks,
    shared=shared,
    gram_leaves=gram_leaves,
    task_specific=task_specific,
    rescale_gram=True,
  )
