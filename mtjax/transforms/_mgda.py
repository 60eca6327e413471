"""MGDA: the multiple-gradient descent algorithm (min-norm point of the task gradients)."""

from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from mtjax._src import numerics
from mtjax._src import solvers
from mtjax._src import tree as tree_lib
from mtjax._src import weighting

NORMALIZATIONS = ("none", "l2", "loss", "loss+")
APPLY_TO = ("raw", "normalized")


class MGDAState(NamedTuple):
  """State of :func:`mgda`.

  Attributes:
    weights: the coefficients ``[T]`` applied to the raw task gradients at the last step (empty
      when ``num_tasks`` is not given): the min-norm weights ``w`` with ``apply_to="raw"``,
      ``w_i / n_i`` with ``apply_to="normalized"``.
  """

  weights: jax.Array


def normalized_gram(gram: jax.Array, normalizers: Optional[jax.Array]) -> jax.Array:
  r"""Gram of the normalized gradients :math:`g_i / n_i`, rescaled to a unit largest diagonal.

  Computed as :math:`\cos(g_i, g_j) \, u_i u_j` with :math:`u_i = \|g_i\| / n_i` formed in log
  space and divided by :math:`\max_i u_i`, so tiny normalizers (a loss of ``1e-30``) or huge
  gradients cannot overflow. A task with :math:`n_i = 0` or :math:`g_i = 0` gets a zero row.
  ``normalizers=None`` means :math:`n_i = 1`.
  """
  if normalizers is None:
    return solvers.scale_gram(gram)[0]
  norms = jnp.sqrt(jnp.maximum(jnp.diagonal(gram), 0.0))
  normalizers = normalizers.astype(gram.dtype)
  valid = (norms > 0) & (normalizers > 0)
  log_u = jnp.where(
    valid, jnp.log(jnp.where(valid, norms, 1.0)) - jnp.log(jnp.where(valid, normalizers, 1.0)), -jnp.inf
  )
  top = jnp.max(log_u)
  top = jnp.where(jnp.isfinite(top), top, 0.0)
  u = jnp.where(valid, jnp.exp(jnp.where(valid, log_u - top, 0.0)), 0.0)
  return numerics.cosine_from_gram(gram) * u[:, None] * u[None, :]


def mgda(
  *,
  num_tasks: Optional[int] = None,
  normalization: str = "none",
  apply_to: str = "raw",
  max_iters: int = 250,
  tol: jax.typing.ArrayLike = 1e-6,
  shared: tree_lib.SharedSpec = None,
  gram_leaves: weighting.GramLeavesSpec = None,
  task_specific: str = "sum",
) -> optax.GradientTransformationExtraArgs:
  r"""MGDA: descend along the min-norm element of the convex hull of the task gradients.

  With normalizers :math:`n_i` the task weights are

  .. math::
    w^\star = \arg\min_{w \in \Delta_T} \Big\| \sum_{i=1}^T w_i \, \frac{g_i}{n_i} \Big\|^2,
    \qquad \Delta_T = \{ w \ge 0, \; \textstyle\sum_i w_i = 1 \},

  solved on the :math:`T \times T` Gram matrix :math:`G_{ij} / (n_i n_j)` of the shared
  parameters by pairwise Frank-Wolfe with corrective steps
  (:func:`mtjax._src.solvers.min_norm_simplex`), on device under ``jit`` with a static iteration
  cap ``max_iters`` and a tolerance ``tol`` relative to the largest squared normalized gradient
  norm. With ``normalization="none"``, :math:`d = \sum_i w^\star_i g_i` satisfies
  :math:`g_t \cdot d \ge \|d\|^2 - \text{tol} \cdot \max_i \|g_i\|^2` for every task :math:`t`:
  no task's loss increases to first order, and :math:`d = 0` exactly when the point is Pareto
  stationary.

  ``normalization`` picks :math:`n_i`: ``"none"`` (1, the paper's algorithm), ``"l2"``
  (:math:`\|g_i\|`), ``"loss"`` (:math:`L_i`) or ``"loss+"`` (:math:`L_i \|g_i\|`), the options
  of the authors' released code. ``"loss"``/``"loss+"`` need ``task_losses`` and positive losses
  (a negative loss raises; a zero normalizer makes that task's normalized gradient zero).
  ``apply_to`` sets the coefficients applied to the *raw* gradients:
  ``"raw"`` (default) uses :math:`w_i` (the authors' code rescales the raw losses by
  :math:`w_i`), ``"normalized"`` uses :math:`w_i / n_i`, i.e. :math:`d = \sum_i w_i g_i / n_i`.
  The two coincide for ``normalization="none"``. The default (``"none"``, ``"raw"``)
  reproduces the paper. The non-conflict guarantee above holds for the gradients the weights
  were solved for: with a normalization it holds for :math:`g_i / n_i` and
  ``apply_to="normalized"``; ``apply_to="raw"`` with a normalization gives no such guarantee.
  MGDA-UB (the paper's upper bound) is this transform applied to the per-task gradients of a
  shared representation :math:`z` (:math:`\partial L_t / \partial z` as the task gradients),
  followed by one backward pass of :math:`\sum_t w_t L_t` through the shared trunk.

  .. warning::
    Must be first in an ``optax.chain``: it consumes per-task gradients (every leaf
    ``[T, *param.shape]``, e.g. from :func:`mtjax.task_grads`) and emits params-shaped updates.
    Do not wrap it in ``optax.MultiSteps``.

  Examples:
    >>> import jax.numpy as jnp, optax, mtjax
    >>> params = {'w': jnp.zeros(3)}
    >>> task_grads = {'w': jnp.array([[-4., 1., 1.], [6., 1., 1.]])}
    >>> tx = optax.chain(mtjax.mgda(num_tasks=2), optax.sgd(1.0))
    >>> state = tx.init(params)
    >>> updates, state = tx.update(task_grads, state, params)
    >>> [round(x, 4) + 0.0 for x in (-updates['w']).tolist()]  # the min-norm direction
    [0.0, 1.0, 1.0]
    >>> [round(x, 4) for x in state[0].weights.tolist()]
    [0.6, 0.4]

  Args:
    num_tasks: number of tasks ``T`` (checked against the gradients; when given, the state
      records the applied weights of every step in ``weights``).
    normalization: ``"none"``, ``"l2"``, ``"loss"`` or ``"loss+"`` (see above).
    apply_to: ``"raw"`` or ``"normalized"`` (see above).
    max_iters: static cap on the solver's Frank-Wolfe steps (with
      ``optax.inject_hyperparams`` list it in ``static_args``).
    tol: solver tolerance on the (relative) duality gap; traceable.
    shared: shared-parameter mask (see :func:`mtjax.shared_mask`); the weights come from the
      Gram of the shared leaves only.
    task_specific: ``"sum"`` (plain sum of the task gradients on task-specific leaves) or
      ``"weighted"`` (apply the MGDA coefficients there too).
    gram_leaves: restrict the Gram to these shared leaves (path regex(es) or a callable
      ``paths -> bools``); the weights still apply to every shared leaf. With
      ``mtjax.task_grads(..., deferred=True)`` only their rows are computed and the update is
      one backward pass (the "subset" strategy).

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with state :class:`MGDAState`.

  References:
    Sener and Koltun, *Multi-Task Learning as Multi-Objective Optimization*, NeurIPS 2018.
    https://arxiv.org/abs/1810.04650

    Desideri, *Multiple-gradient descent algorithm (MGDA) for multiobjective optimization*,
    Comptes Rendus Mathematique, 2012.
  """
  if normalization not in NORMALIZATIONS:
    raise ValueError(f"mtjax: mgda: normalization must be one of {NORMALIZATIONS}, got {normalization!r}.")
  if apply_to not in APPLY_TO:
    raise ValueError(f"mtjax: mgda: apply_to must be one of {APPLY_TO}, got {apply_to!r}.")
  max_iters = weighting.static_int(max_iters, "max_iters", "mgda")
  uses_losses = normalization in ("loss", "loss+")

  def init_state(params):
    del params
    return MGDAState(weights=weighting.init_weights(num_tasks))

  def weights_fn(inputs, state):
    gram = inputs.grams[0]
    normalizers = None
    if normalization != "none":
      norms = jnp.sqrt(jnp.maximum(jnp.diagonal(gram), 0.0))
      if uses_losses:
        losses = inputs.task_losses.astype(gram.dtype)
        losses = numerics.enforce(
          losses,
          numerics.condition_check(
            jnp.any(losses < 0),
            f"mtjax: mgda: normalization={normalization!r} divides by the task losses, which must be "
            "non-negative; got a negative loss. Use normalization='l2' or 'none' for losses that "
            "can be negative.",
          ),
        )
        normalizers = losses if normalization == "loss" else losses * norms
      else:
        normalizers = norms
    result = solvers.min_norm_simplex(normalized_gram(gram, normalizers), max_iters=max_iters, tol=tol, scale=False)
    weights = result.weights
    if apply_to == "normalized" and normalizers is not None:
      weights = numerics.safe_div(weights, normalizers)
      if normalization != "loss":  # the norms come from 2^L G (the core's rescaling): undo 2^(L/2)
        weights = weights * jnp.exp2(0.5 * jnp.asarray(inputs.gram_log2_scale, weights.dtype))
    return weights, state

  return weighting.gram_weighting(
    weights_fn,
    init_state,
    method="mgda",
    num_tasks=num_tasks,
    shared=shared,
    gram_leaves=gram_leaves,
    requires_task_losses=uses_losses,
    task_specific=task_specific,
    rescale_gram=True,
  )
