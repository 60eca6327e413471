"""MoDo: multi-objective gradient with double sampling (Chen et al., NeurIPS 2023)."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mtjax._src import composition
from mtjax._src import micro_batches as mb
from mtjax._src import numerics
from mtjax._src import solvers
from mtjax._src import tree as tree_lib
from mtjax._src import weighting

NUM_BATCHES = (2, 3)


class MoDoState(NamedTuple):
  """State of :func:`modo`.

  Attributes:
    weights: ``[T]`` the task weights :math:`\\lambda` on the simplex used by the last update
      (initially :math:`1/T` each); the next step starts its update from them.
  """

  weights: jax.Array


def check_nonneg(value, name: str, method: str) -> None:
  if numerics._is_concrete(value):  # pylint: disable=protected-access
    arr = np.asarray(value, np.float64)
    if arr.shape != () or not np.isfinite(arr) or arr < 0:
      raise ValueError(f"mtjax: {method}: {name} must be a finite non-negative scalar, got {value!r}.")


def check_num_tasks(num_tasks, method: str) -> int:
  if isinstance(num_tasks, bool) or not isinstance(num_tasks, (int, np.integer)) or num_tasks < 1:
    raise ValueError(f"mtjax: {method}: num_tasks must be a positive int (it sizes the state), got {num_tasks!r}.")
  return int(num_tasks)


def modo_step(weights: jax.Array, cross_gram: jax.Array, gamma, rho) -> jax.Array:
  r"""One MoDo step of the weights: :math:`\Pi_\Delta(\lambda - \gamma (G_{12} \lambda + \rho \lambda))`.

  Args:
    weights: ``[T]`` :math:`\lambda` on the simplex.
    cross_gram: ``[T, T]`` :math:`G_{12} = J_1 J_2^\top` of two independent micro-batches.
    gamma: the step size :math:`\gamma` (traceable).
    rho: the regularisation :math:`\rho` (traceable).

  Returns:
    ``[T]`` the new weights, in ``cross_gram``'s dtype.
  """
  dtype = cross_gram.dtype
  lam = weights.astype(dtype)
  grad = mb.matvec(cross_gram, lam) + jnp.asarray(rho, dtype) * lam
  return solvers.project_simplex(lam - jnp.asarray(gamma, dtype) * grad).astype(dtype)


def modo(
  *,
  num_tasks: int,
  gamma: jax.typing.ArrayLike = 1e-3,
  rho: jax.typing.ArrayLike = 0.1,
  num_batches: int = 3,
  shared: tree_lib.SharedSpec = None,
) -> optax.GradientTransformationExtraArgs:
  r"""MoDo: stochastic MGDA with the weights stepped on a cross Gram of independent batches.

  MGDA's weights solve :math:`\min_{\lambda \in \Delta} \frac12 \|J^\top \lambda\|^2`; with
  stochastic gradients the plug-in Gram :math:`J J^\top` of one batch is a biased estimate of
  :math:`\mathbb E[J] \mathbb E[J]^\top`. MoDo ("double sampling") instead takes ONE projected
  gradient step per update on :math:`\frac12 \|J^\top \lambda\|^2 + \frac\rho2 \|\lambda\|^2`,
  with the unbiased cross product of two independent micro-batches, and moves the parameters
  along the third:

  .. math::
    \lambda_{k+1} = \Pi_\Delta\big(\lambda_k - \gamma\,(J_1 J_2^\top \lambda_k
      + \rho\, \lambda_k)\big), \qquad d = J_3^\top \lambda_{k+1},

  (the paper's Algorithm 1) with :math:`J_m` the ``[T, P]`` Jacobian of the shared parameters on
  micro-batch ``m``, :math:`\Pi_\Delta` the Euclidean projection onto the simplex and
  :math:`\lambda_0 = \mathbf 1 / T`. The update is the params-shaped :math:`d` (for
  ``optax.sgd``, :math:`\theta \leftarrow \theta - \alpha d`). The cross Gram is computed leaf
  by leaf (``precision=HIGHEST``), never concatenating the parameters.

  Variants (``num_batches``):

  * ``3`` (default, the paper): micro-batches 0 and 1 for the weights, 2 for the direction.
  * ``2`` (the authors' code, heshandevaka/Trade-Off-MOL): the same weight step on micro-batches
    0 and 1, and the direction from both, :math:`d = \frac12 (J_1 + J_2)^\top \lambda_{k+1}`
    (the code applies the SUM; the factor 1/2 keeps the scale of the paper's variant: double
    the learning rate to reproduce it).

  Task-specific leaves (``shared=`` mask False): the plain sum over tasks of the gradients of the
  direction's micro-batch (batch 2; the mean over batches 0 and 1 with ``num_batches=2``). LibMTL's
  port averages them over all three micro-batches instead.

  Input and cost: ``update`` takes per-task gradients with a leading micro-batch axis, every leaf
  ``[num_batches, T, *param.shape]``: ``mtjax.micro_batch_task_grads(mtjax.task_grads(loss_fn),
  num_batches)(params, batch)`` splits the batch into independent parts (``num_batches`` forward
  passes on ``batch / num_batches`` samples and ``num_batches * T`` backward rows per step, about
  one full per-task Jacobian of the batch); ``task_losses`` (optional, ``[T]`` or
  ``[num_batches, T]``) are only checked. A ``[T, T]`` cross Gram and ``[T]`` state. Deferred /
  lazy Jacobians and sparse rows are rejected (build the gradients with ``sparse=False``).

  .. warning::
    Must be first in an ``optax.chain``: it consumes micro-batch per-task gradients and emits
    params-shaped updates. Do not wrap it in ``optax.MultiSteps``. The training loop must feed it
    ``[num_batches, T, ...]`` gradients; the plain ``[T, ...]`` input of the other methods is a
    ``ValueError``.

  Examples:
    >>> import jax.numpy as jnp, optax, mtjax
    >>> params = {'w': jnp.zeros(2)}
    >>> g = jnp.array([[1., 0.], [0., 2.]])  # [T, P] on every micro-batch here
    >>> tx = optax.chain(mtjax.modo(num_tasks=2, gamma=0.1, rho=0.0), optax.sgd(1.0))
    >>> state = tx.init(params)
    >>> updates, state = tx.update({'w': jnp.stack([g, g, g])}, state, params)
    >>> [round(x, 4) for x in state[0].weights.tolist()]  # the larger gradient loses weight
    [0.575, 0.425]
    >>> [round(x, 4) for x in (-updates['w']).tolist()]
    [0.575, 0.85]

  Args:
    num_tasks: number of tasks ``T`` (static; sizes the state).
    gamma: step size :math:`\gamma \ge 0` of the weights (traceable). Default ``1e-3``, LibMTL's.
    rho: regularisation :math:`\rho \ge 0` of the weight subproblem (traceable). Default ``0.1``.
    num_batches: ``3`` (the paper) or ``2`` (the authors' code), see above (static).
    shared: shared-parameter mask (see :func:`mtjax.shared_mask`); the cross Gram covers the
      shared leaves only.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with state :class:`MoDoState`.

  References:
    Chen, Fu, Xu and Lin, *Three-Way Trade-Off in Multi-Objective Learning: Optimization,
    Generalization and Conflict-Avoidance*, NeurIPS 2023. https://arxiv.org/abs/2305.20057
  """
  method = "modo"
  t_static = check_num_tasks(num_tasks, method)
  if num_batches not in NUM_BATCHES:
    raise ValueError(
      f"mtjax: {method}: num_batches must be 3 (the paper) or 2 (the authors' code), got {num_batches!r}."
    )
  check_nonneg(gamma, "gamma", method)
  check_nonneg(rho, "rho", method)
  direction = (2,) if num_batches == 3 else (0, 1)

  def init_fn(params):
    composition.check_not_wrapped("modo")  # optax.MultiSteps / masked / apply_if_finite around it
    dtype = weighting.params_dtype(params)
    return MoDoState(weights=jnp.full((t_static,), 1.0 / t_static, dtype))

  def update_fn(updates, state, params=None, *, task_losses=None, **extra_args):
    del extra_args
    inputs = mb.check_inputs(
      updates, params, task_losses, num_batches=num_batches, num_tasks=t_static, shared=shared, method=method
    )
    gram = mb.cross_gram(inputs.leaves, inputs.mask, 0, 1)
    lam = modo_step(state.weights, gram, gamma, rho)
    lam = numerics.enforce(lam, *inputs.checks)
    out = mb.combine(inputs.leaves, inputs.mask, lam, direction)
    return jax.tree.unflatten(inputs.treedef, out), MoDoState(weights=lam.astype(state.weights.dtype))

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
