"""ConFIG: conflict-free gradient combination (Liu, Chu and Thuerey, ICLR 2025)."""

from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from mtjax._src import numerics
from mtjax._src import tree as tree_lib
from mtjax._src import weighting


class ConFIGState(NamedTuple):
  """State of :func:`config`.

  Attributes:
    weights: the coefficients ``[T]`` applied to the task gradients at the last step (empty when
      ``num_tasks`` is not given).
  """

  weights: jax.Array


def config_weights(gram: jax.Array) -> jax.Array:
  r"""ConFIG's coefficients on the raw gradients, from their Gram matrix (see :func:`config`)."""
  gram = gram.astype(numerics.gram_dtype(gram.dtype))
  norms = jnp.sqrt(jnp.maximum(jnp.diagonal(gram), 0.0))
  cosines = numerics.cosine_from_gram(gram)
  t = gram.shape[0]
  a = jnp.matmul(
    jnp.linalg.pinv(cosines, hermitian=True), jnp.ones((t,), gram.dtype), precision=numerics.HIGHEST
  )  # x = J_n^T a solves J_n x = 1 (min norm)
  c_a = jnp.matmul(cosines, a, precision=numerics.HIGHEST)
  sq_norm = jnp.dot(a, c_a, precision=numerics.HIGHEST)  # ||x||^2
  length = jnp.dot(norms, c_a, precision=numerics.HIGHEST)  # sum_i g_i . x
  return numerics.safe_div(length, sq_norm) * numerics.safe_div(a, norms)


def config(
  *,
  num_tasks: Optional[int] = None,
  shared: tree_lib.SharedSpec = None,
  gram_leaves: weighting.GramLeavesSpec = None,
  task_specific: str = "sum",
) -> optax.GradientTransformationExtraArgs:
  r"""ConFIG: the direction with equal cosine to every task gradient, scaled by their projections.

  With the unit task gradients :math:`u_i = g_i / \|g_i\|` stacked as the rows of :math:`J_n`,
  ConFIG's direction is the minimum-norm :math:`x` with :math:`u_i \cdot x = 1` for all :math:`i`
  (every task gets the same positive cosine with it), and its length is the sum of the task
  gradients' projections on it:

  .. math::
    g_u = \frac{x}{\|x\|}, \quad x = J_n^+ \mathbf 1, \qquad
    d = \Big(\sum_{i=1}^T g_i \cdot g_u\Big)\, g_u.

  It is a weighting of the Gram matrix :math:`G = J J^\top` of the shared parameters: with the
  cosine matrix :math:`C = D^{-1} G D^{-1}` (:math:`D = \operatorname{diag}(\|g_i\|)`),
  :math:`J_n^+ = J_n^\top C^+` gives :math:`x = J_n^\top a`, :math:`a = C^+ \mathbf 1`, so
  :math:`\|x\|^2 = a^\top C a`, :math:`\sum_i g_i \cdot x = \|g\|^\top C a` and

  .. math::
    d = \sum_t w_t g_t, \qquad w_t = \frac{\|g\|^\top C a}{a^\top C a}\, \frac{a_t}{\|g_t\|}.

  The pseudo-inverse handles linearly dependent gradients (:math:`T > P`, identical gradients:
  the least-squares direction); a zero task gradient is left out (its row of :math:`J_n` is
  zero); when :math:`\mathbf 1` is orthogonal to the range of :math:`C` (e.g. two exactly
  opposite gradients) :math:`x = 0` and the update is zero. Whenever :math:`x \ne 0` exists with
  :math:`J_n x = \mathbf 1`, :math:`g_i \cdot d > 0` for every task with a positive length (no
  conflict). The direction is invariant to positive per-task scaling and the length is linear
  in it, so :math:`d(\operatorname{diag}(s) J)` is linear in :math:`s > 0`; permutation
  equivariant. This is the single-step ConFIG of the paper (not the momentum variant M-ConFIG).

  .. warning::
    Must be first in an ``optax.chain``: it consumes per-task gradients (every leaf
    ``[T, *param.shape]``, e.g. from :func:`mtjax.task_grads`) and emits params-shaped updates.
    Do not wrap it in ``optax.MultiSteps``.

  Examples:
    >>> import jax.numpy as jnp, optax, mtjax
    >>> params = {'w': jnp.zeros(3)}
    >>> task_grads = {'w': jnp.array([[-4., 1., 1.], [6., 1., 1.]])}
    >>> tx = optax.chain(mtjax.config(num_tasks=2), optax.sgd(1.0))
    >>> state = tx.init(params)
    >>> updates, state = tx.update(task_grads, state, params)
    >>> [round(x, 4) for x in (-updates['w']).tolist()]
    [0.1588, 2.0706, 2.0706]

  Args:
    num_tasks: number of tasks ``T`` (checked against the gradients; when given, the state
      records the task weights of every step in ``weights``).
    shared: shared-parameter mask (see :func:`mtjax.shared_mask`); the weights come from the
      Gram of the shared leaves only.
    task_specific: ``"sum"`` (plain sum of the task gradients on task-specific leaves) or
      ``"weighted"`` (apply the ConFIG coefficients there too).
    gram_leaves: restrict the Gram to these shared leaves (path regex(es) or a callable
      ``paths -> bools``); the weights still apply to every shared leaf. With
      ``mtjax.task_grads(..., deferred=True)`` only their rows are computed and the update is
      one backward pass (the "subset" strategy).

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with state :class:`ConFIGState`.

  References:
    Liu, Chu and Thuerey, *ConFIG: Towards Conflict-free Training of Physics Informed Neural
    Networks*, ICLR 2025. https://arxiv.org/abs/2408.11104
  """

  def init_state(params):
    del params
    return ConFIGState(weights=weighting.init_weights(num_tasks))

  def weights_fn(inputs, state):
    return config_weights(inputs.grams[0]), state

  return weighting.gram_weighting(
    weights_fn,
    init_state,
    method="config",
    num_tasks=num_tasks,
    shared=shared,
    gram_leaves=gram_leaves,
    task_specific=task_specific,
    rescale_gram=True,
  )
