"""Aligned-MTL: align the task gradients' principal components (Senushkin et al., CVPR 2023)."""

from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mtjax._src import numerics
from mtjax._src import solvers
from mtjax._src import tree as tree_lib
from mtjax._src import weighting

SCALES = ("min", "median", "rmse")
REDUCTIONS = ("mean", "sum")


class AlignedMTLState(NamedTuple):
  """State of :func:`aligned_mtl`.

  Attributes:
    weights: the coefficients ``[T]`` applied to the task gradients at the last step (empty when
      ``num_tasks`` is not given).
  """

  weights: jax.Array


def balance_matrix(gram: jax.Array, scale: str = "min") -> jax.Array:
  r"""The balance transformation :math:`B = \sigma\, V_r \Lambda_r^{-1/2} V_r^\top` of a Gram matrix.

  :math:`G = V \Lambda V^\top`; the rank-:math:`r` part keeps the eigenvalues above
  :math:`\lambda_{\max} T \epsilon` (as the authors' code); :math:`\sigma^2` is the smallest kept
  eigenvalue (``"min"``), their lower median (``"median"``) or their mean (``"rmse"``). ``B`` is
  invariant to a positive rescaling of ``G`` and zero for a zero Gram.
  """
  scaled, _ = solvers.scale_gram(gram.astype(numerics.gram_dtype(gram.dtype)))
  t = scaled.shape[0]
  eigvals, eigvecs = jnp.linalg.eigh(scaled)
  cutoff = jnp.max(eigvals) * t * np.finfo(scaled.dtype).eps
  kept = eigvals > jnp.maximum(cutoff, 0.0)
  rank = jnp.sum(kept)
  safe = jnp.where(kept, eigvals, 1.0)
  if scale == "min":
    sigma_sq = jnp.min(jnp.where(kept, eigvals, jnp.inf))
  elif scale == "median":  # lower median of the kept eigenvalues
    ascending = jnp.sort(jnp.where(kept, eigvals, jnp.inf))
    sigma_sq = ascending[jnp.maximum(rank - 1, 0) // 2]
  else:  # "rmse"
    sigma_sq = numerics.safe_div(jnp.sum(jnp.where(kept, eigvals, 0.0)), rank.astype(scaled.dtype))
  sigma_sq = jnp.where(rank > 0, sigma_sq, 0.0)
  factors = jnp.where(kept, jnp.sqrt(jnp.where(kept, sigma_sq, 0.0) / safe), 0.0)
  return jnp.matmul(eigvecs * factors[None, :], eigvecs.T, precision=numerics.HIGHEST)


def aligned_mtl(
  *,
  num_tasks: Optional[int] = None,
  scale: str = "min",
  reduction: str = "mean",
  shared: tree_lib.SharedSpec = None,
  gram_leaves: weighting.GramLeavesSpec = None,
  task_specific: str = "sum",
) -> optax.GradientTransformationExtraArgs:
  r"""Aligned-MTL: make the task gradients orthogonal with equal norms, then combine them.

  With the Gram matrix of the shared parameters :math:`G = J J^\top = V \Lambda V^\top` (the
  eigen-decomposition; :math:`J = V \Lambda^{1/2} W^\top` is the SVD of the task Jacobian),
  Aligned-MTL replaces :math:`J` by the aligned Jacobian

  .. math::
    \hat J = B J = \sigma \, V W^\top, \qquad B = \sigma\, V \Lambda^{-1/2} V^\top,

  the closest matrix to :math:`J` (orthogonal Procrustes) whose rows are orthogonal with equal
  singular values :math:`\sigma`: the condition number of the aligned system is 1, so neither
  conflicting directions nor dominating gradient magnitudes remain. The update is
  :math:`d = \hat J^\top \omega = J^\top (B \omega)` with the task weights :math:`\omega = \mathbf
  1 / T` (``reduction="mean"``) or :math:`\mathbf 1` (``"sum"``); the coefficients on the raw
  gradients are :math:`B \omega`. Only the eigenvalues above :math:`\lambda_{\max} T \epsilon`
  are kept (rank-deficient Grams, e.g. :math:`T > P` or identical gradients, use their non-zero
  part, as the authors' code).

  ``scale`` picks :math:`\sigma^2` among the kept eigenvalues: ``"min"`` (the smallest, the
  paper's choice, so no direction is amplified beyond the weakest one), ``"median"`` (their
  lower median) or ``"rmse"`` (their mean, :math:`\sigma` = the root mean square singular value)
  -- the three modes of the authors' released code. The weights are invariant to a positive
  rescaling of all gradients (the update is positively homogeneous of degree 1) and permutation
  equivariant; a zero Gram gives a zero update.

  .. warning::
    Must be first in an ``optax.chain``: it consumes per-task gradients (every leaf
    ``[T, *param.shape]``, e.g. from :func:`mtjax.task_grads`) and emits params-shaped updates.
    Do not wrap it in ``optax.MultiSteps``.

  Examples:
    >>> import jax.numpy as jnp, optax, mtjax
    >>> params = {'w': jnp.zeros(3)}
    >>> task_grads = {'w': jnp.array([[-4., 1., 1.], [6., 1., 1.]])}
    >>> tx = optax.chain(mtjax.aligned_mtl(num_tasks=2), optax.sgd(1.0))
    >>> state = tx.init(params)
    >>> updates, state = tx.update(task_grads, state, params)
    >>> [round(x, 4) for x in (-updates['w']).tolist()]
    [0.2133, 0.9673, 0.9673]

  Args:
    num_tasks: number of tasks ``T`` (checked against the gradients; when given, the state
      records the task weights of every step in ``weights``).
    scale: ``"min"`` (default, the paper), ``"median"`` or ``"rmse"`` (see above).
    reduction: ``"mean"`` (default) or ``"sum"`` of the aligned gradients.
    shared: shared-parameter mask (see :func:`mtjax.shared_mask`); the alignment uses the Gram
      of the shared leaves only.
    task_specific: ``"sum"`` (plain sum of the task gradients on task-specific leaves) or
      ``"weighted"`` (apply the Aligned-MTL coefficients there too).
    gram_leaves: restrict the Gram to these shared leaves (path regex(es) or a callable
      ``paths -> bools``); the weights still apply to every shared leaf. With
      ``mtjax.task_grads(..., deferred=True)`` only their rows are computed and the update is
      one backward pass (the "subset" strategy).

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with state :class:`AlignedMTLState`.

  References:
    Senushkin, Patakin, Kuznetsov and Konushin, *Independent Component Alignment for Multi-Task
    Learning*, CVPR 2023. https://arxiv.org/abs/2305.19000
  """
  if scale not in SCALES:
    raise ValueError(f"mtjax: aligned_mtl: scale must be one of {SCALES}, got {scale!r}.")
  if reduction not in REDUCTIONS:
    raise ValueError(f"mtjax: aligned_mtl: reduction must be one of {REDUCTIONS}, got {reduction!r}.")

  def init_state(params):
    del params
    return AlignedMTLState(weights=weighting.init_weights(num_tasks))

  def weights_fn(inputs, state):
    balance = balance_matrix(inputs.grams[0], scale)
    t = inputs.num_tasks
    omega = jnp.full((t,), 1.0 / t if reduction == "mean" else 1.0, balance.dtype)
    return jnp.matmul(balance, omega, precision=numerics.HIGHEST), state

  return weighting.gram_weighting(
    weights_fn,
    init_state,
    method="aligned_mtl",
    num_tasks=num_tasks,
    shared=shared,
    gram_leaves=gram_leaves,
    task_specific=task_specific,
    rescale_gram=True,
  )
