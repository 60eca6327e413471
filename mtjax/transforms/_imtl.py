"""IMTL-G: impartial multi-task learning, gradient part (Liu et al., ICLR 2021)."""

from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from mtjax._src import numerics
from mtjax._src import solvers
from mtjax._src import tree as tree_lib
from mtjax._src import weighting


class IMTLState(NamedTuple):
  """State of :func:`imtl`.

  Attributes:
    weights: the coefficients ``[T]`` applied to the task gradients at the last step (empty when
      ``num_tasks`` is not given).
  """

  weights: jax.Array


def imtl_weights(gram: jax.Array) -> jax.Array:
  r"""IMTL-G weights: the minimum-norm solution of :math:`G \alpha = \lambda n`, :math:`\mathbf 1^\top \alpha = 1`.

  ``n`` holds the gradient norms :math:`\sqrt{G_{tt}}`. Solved as the ``(T + 1)``-square linear
  system :math:`\begin{bmatrix} G & -n \\ \mathbf 1^\top & 0 \end{bmatrix}
  \begin{bmatrix} \alpha \\ \lambda \end{bmatrix} = \begin{bmatrix} 0 \\ 1 \end{bmatrix}` by
  pseudo-inverse on the Gram divided by its largest diagonal entry (the weights are scale
  free). For an invertible :math:`G` this is :math:`G^{-1} n / (\mathbf 1^\top G^{-1} n)`.
  """
  scaled, _ = solvers.scale_gram(gram.astype(numerics.gram_dtype(gram.dtype)))
  dtype = scaled.dtype
  t = scaled.shape[0]
  norms = jnp.sqrt(jnp.maximum(jnp.diagonal(scaled), 0.0))
  system = jnp.concatenate([
      jnp.concatenate([scaled, -norms[:, None]], axis=1),
      jnp.concatenate([jnp.ones((t,), dtype), jnp.zeros((1,), dtype)])[None, :],
  ], axis=0)
  rhs = jnp.concatenate([jnp.zeros((t,), dtype), jnp.ones((1,), dtype)])
  return jnp.matmul(jnp.linalg.pinv(system), rhs, precision=numerics.HIGHEST)[:t]


def imtl(
    *,
    num_tasks: Optional[int] = None,
    shared: tree_lib.SharedSpec = None,
    gram_leaves: weighting.GramLeavesSpec = None,
    task_specific: str = "sum",
) -> optax.GradientTransformationExtraArgs:
  r"""IMTL-G: the update whose projections onto every task's unit gradient are equal.

  IMTL-G looks for :math:`d = \sum_t \alpha_t g_t` with :math:`\sum_t \alpha_t = 1` such that
  :math:`d \cdot u_t` is the same for every task, :math:`u_t = g_t / \|g_t\|` (no task is
  favoured, whatever its gradient's scale). With :math:`G = J J^\top` (the Gram of the shared
  parameters) and :math:`n_t = \|g_t\| = \sqrt{G_{tt}}`, :math:`d \cdot u_t = (G\alpha)_t / n_t`,
  so the condition is :math:`G \alpha \propto n`:

  .. math::
    G \alpha = \lambda n, \qquad \mathbf 1^\top \alpha = 1,

  a linear system in :math:`(\alpha, \lambda)`, solved by pseudo-inverse (minimum-norm
  solution). This equals the paper's closed form :math:`\alpha_{2:T} = g_1 U^\top (D
  U^\top)^{-1}`, :math:`\alpha_1 = 1 - \sum_{t \ge 2} \alpha_t` (rows :math:`D_t = g_1 - g_t`,
  :math:`U_t = u_1 - u_t`) and :math:`G^{-1} n / \mathbf 1^\top G^{-1} n` whenever :math:`G` is
  invertible, and extends them to linearly dependent gradients (:math:`T > P`, identical or
  collinear gradients). There the formula :math:`G^+ n / \mathbf 1^\top G^+ n` (a least-squares
  fit, used by some libraries) is not a solution of the equal-projection conditions when
  :math:`n` is outside the range of :math:`G`: for two exactly opposite gradients of different
  norms it gives a large update along them, while the conditions are met (with equal
  projections 0) only by :math:`d = 0`, which is what this transform returns -- so it stops on
  the Pareto set. A zero Gram gives a zero update. Permutation equivariant; scale invariant
  weights (the update is positively homogeneous of degree 1). Only the gradient part of IMTL is
  implemented, not IMTL-L (learned loss scales) or the hybrid IMTL.

  .. warning::
    Must be first in an ``optax.chain``: it consumes per-task gradients (every leaf
    ``[T, *param.shape]``, e.g. from :func:`mtjax.task_grads`) and emits params-shaped updates.
    Do not wrap it in ``optax.MultiSteps``.

  Examples:
    >>> import jax.numpy as jnp, optax, mtjax
    >>> params = {'w': jnp.zeros(3)}
    >>> task_grads = {'w': jnp.array([[-4., 1., 1.], [6., 1., 1.]])}
    >>> tx = optax.chain(mtjax.imtl(num_tasks=2), optax.sgd(1.0))
    >>> state = tx.init(params)
    >>> updates, state = tx.update(task_grads, state, params)
    >>> [round(x, 4) for x in (-updates['w']).tolist()]
    [0.0767, 1.0, 1.0]

  Args:
    num_tasks: number of tasks ``T`` (checked against the gradients; when given, the state
      records the task weights of every step in ``weights``).
    shared: shared-parameter mask (see :func:`mtjax.shared_mask`); the weights come from the
      Gram of the shared leaves only.
    task_specific: ``"sum"`` (plain sum of the task gradients on task-specific leaves) or
      ``"weighted"`` (apply the IMTL-G weights there too).
    gram_leaves: restrict the Gram to these shared leaves (path regex(es) or a callable
      ``paths -> bools``); the weights still apply to every shared leaf. With
      ``mtjax.task_grads(..., deferred=True)`` only their rows are computed and the update is
      one backward pass (the "subset" strategy).

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with state :class:`IMTLState`.

  References:
    Liu, Li, Kuang, Xue, Chen, Yang, Liao and Zhang, *Towards Impartial Multi-task Learning*,
    ICLR 2021. https://openreview.net/forum?id=IMPnRXEWpvr
  """

  def init_state(params):
    return IMTLState(weights=weighting.init_weights(num_tasks, dtype=weighting.params_dtype(params)))

  def weights_fn(inputs, state):
    return imtl_weights(inputs.grams[0]), state  # scale invariant: inputs.gram_log2_scale is not needed

  return weighting.gram_weighting(
      weights_fn, init_state, method="imtl", num_tasks=num_tasks, shared=shared, gram_leaves=gram_leaves,
      task_specific=task_specific, rescale_gram=True)
