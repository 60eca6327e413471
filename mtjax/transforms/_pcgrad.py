"""PCGrad: projecting conflicting gradients (gradient surgery), on the Gram-weighting core."""

from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from mtjax._src import numerics
from mtjax._src import tree as tree_lib
from mtjax._src import weighting


class PCGradState(NamedTuple):
  """State of :func:`pcgrad`.

  Attributes:
    key: the PRNG key for the next step's projection orders.
    weights: the task coefficients ``[T]`` of the last step (empty when ``num_tasks`` is not given).
  """

  key: jax.Array
  weights: jax.Array


def seed_key(key) -> jax.Array:
  """``weighting.canonical_key`` that also accepts an integer array scalar as a seed.

  ``optax.inject_hyperparams`` turns the default ``key=0`` into an ``int32`` array scalar.
  """
  if not isinstance(key, int) and not jnp.issubdtype(jnp.result_type(key), jax.dtypes.prng_key):
    if jnp.ndim(key) == 0 and jnp.issubdtype(jnp.result_type(key), jnp.integer):
      return jax.random.PRNGKey(key)
  return weighting.canonical_key(key)


def projection_orders(key: jax.Array, num_tasks: int) -> tuple[jax.Array, jax.Array]:
  """Splits a state key and draws one step's projection orders.

  Used by :func:`pcgrad` and :func:`mtjax.gradvac` (exposed so that tests can replay them).

  Args:
    key: the key stored in the transform state.
    num_tasks: ``T`` (static).

  Returns:
    ``(next_key, orders)``: ``next_key`` goes back into the state; ``orders`` is an int32
    ``[T, T - 1]`` array whose row ``i`` is a uniformly random ordering of the tasks ``j != i``
    (one independent draw per task ``i``).
  """
  next_key, sub = jax.random.split(key)
  if num_tasks == 1:
    return next_key, jnp.zeros((1, 0), jnp.int32)
  # Row i: argsort of i.i.d. random 32-bit words, a uniform random permutation of {0..T-2}
  # (ties have probability ~2^-32), independent across rows; one sort for all rows.
  bits = jax.random.bits(sub, (num_tasks, num_tasks - 1), jnp.uint32)
  perms = jnp.argsort(bits, axis=1, stable=True).astype(jnp.int32)
  rows = jnp.arange(num_tasks, dtype=jnp.int32)[:, None]
  # A permutation of {0..T-2} mapped onto {0..T-1} \ {i}.
  orders = perms + (perms >= rows).astype(jnp.int32)
  return next_key, orders


def normalized_gram(gram: jax.Array) -> jax.Array:
  """``gram / max(diag(gram))`` (unchanged when all zero): the surgery methods are scale invariant,
  and working at unit scale keeps ``c^T G c`` and its cancellations away from over/underflow."""
  scale = jnp.max(jnp.diagonal(gram, axis1=-2, axis2=-1), axis=-1)[..., None, None]
  return numerics.safe_div(gram, scale)


def pcgrad_coefficients(gram: jax.Array, orders: jax.Array) -> jax.Array:
  """Per-task PCGrad coefficient vectors in Gram form.

  Args:
    gram: ``[T, T]`` Gram matrix of the task gradients.
    orders: ``[T, T - 1]`` projection orders (see :func:`projection_orders`).

  Returns:
    ``[T, T]`` matrix ``C`` whose row ``i`` holds ``c`` with ``g_i' = sum_m c_m g_m``.
  """
  num_tasks = gram.shape[0]
  if num_tasks == 1:  # nothing to project onto
    return jnp.ones((1, 1), gram.dtype)
  gram = normalized_gram(gram)
  diag = jnp.diagonal(gram)

  def one_task(i, order):
    c = jax.nn.one_hot(i, num_tasks, dtype=gram.dtype)

    def body(p, c):
      j = order[p]
      ip = jnp.dot(c, gram[:, j], precision=numerics.HIGHEST)
      gjj = diag[j]
      project = (ip < 0) & (gjj > 0)  # a zero g_j is skipped (no 0/0)
      return c.at[j].add(jnp.where(project, -numerics.safe_div(ip, gjj), jnp.zeros_like(ip)))

    return jax.lax.fori_loop(0, num_tasks - 1, body, c)

  return jax.vmap(one_task)(jnp.arange(num_tasks), orders)


def pcgrad(
  key: int | jax.Array = 0,
  *,
  num_tasks: Optional[int] = None,
  shared: tree_lib.SharedSpec = None,
  gram_leaves: weighting.GramLeavesSpec = None,
  reduction: str = "sum",
  task_specific: str = "sum",
) -> optax.GradientTransformationExtraArgs:
  r"""PCGrad ("gradient surgery"): project away conflicting components of the task gradients.

  For every task :math:`i`, starting from :math:`g_i' = g_i`, for :math:`j \ne i` in a random
  order (drawn afresh for every :math:`i` and every step):

  .. math::
    \text{if } \langle g_i', g_j \rangle < 0: \quad
    g_i' \leftarrow g_i' - \frac{\langle g_i', g_j \rangle}{\|g_j\|^2} \, g_j,

  always projecting onto the *original* :math:`g_j`; a zero :math:`g_j` is skipped. The update
  is :math:`d = \sum_i g_i'` (or the mean with ``reduction="mean"``).

  Every :math:`g_i'` is a linear combination :math:`\sum_m c_m g_m` of the original gradients,
  so the surgery runs on the :math:`T \times T` Gram matrix :math:`G = J J^\top` of the shared
  parameters: :math:`c = e_i`, and for each :math:`j`, :math:`p = c^\top G_{:, j}`; if
  :math:`p < 0` and :math:`G_{jj} > 0` then :math:`c_j \mathrel{-}= p / G_{jj}`. The task
  weights are :math:`w = \sum_i c^{(i)}` and :math:`d = \sum_t w_t g_t`. Everything stays on
  device under ``jit``; the PRNG key lives in the state and is split at every update.

  .. warning::
    Must be first in an ``optax.chain``: it consumes per-task gradients (every leaf
    ``[T, *param.shape]``, e.g. from :func:`mtjax.task_grads`) and emits params-shaped updates.
    Do not wrap it in ``optax.MultiSteps``.

  Examples:
    >>> import jax.numpy as jnp, optax, mtjax
    >>> params = {'w': jnp.zeros(3)}
    >>> task_grads = {'w': jnp.array([[-4., 1., 1.], [6., 1., 1.]])}
    >>> tx = optax.chain(mtjax.pcgrad(key=0, num_tasks=2), optax.sgd(1.0))
    >>> state = tx.init(params)
    >>> updates, state = tx.update(task_grads, state, params)
    >>> print(jnp.round(-updates['w'], 4))  # the surgery's update direction
    [0.5848 3.8012 3.8012]
    >>> print(jnp.round(state[0].weights, 4))
    [2.2222 1.5789]

  Args:
    key: PRNG seed (int) or key for the random projection orders.
    num_tasks: number of tasks ``T`` (checked against the gradients; when given, the state
      records the task weights of every step in ``weights``).
    shared: shared-parameter mask (see :func:`mtjax.shared_mask`); the surgery uses the Gram of
      the shared leaves only.
    reduction: ``"sum"`` (the paper) or ``"mean"`` of the projected gradients.
    task_specific: ``"sum"`` (plain sum of the task gradients on task-specific leaves) or
      ``"weighted"`` (apply the PCGrad task weights there too).
    gram_leaves: restrict the Gram to these shared leaves (path regex(es) or a callable
      ``paths -> bools``); the weights still apply to every shared leaf. With
      ``mtjax.task_grads(..., deferred=True)`` only their rows are computed and the update is
      one backward pass (the "subset" strategy).

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with state :class:`PCGradState`.

  References:
    Yu, Kumar, Gupta, Levine, Hausman, Finn, *Gradient Surgery for Multi-Task Learning*,
    NeurIPS 2020. https://arxiv.org/abs/2001.06782
  """
  if reduction not in ("sum", "mean"):
    raise ValueError(f"mtjax: pcgrad: reduction must be 'sum' or 'mean', got {reduction!r}.")

  def init_state(params):
    del params
    return PCGradState(key=seed_key(key), weights=weighting.init_weights(num_tasks))

  def weights_fn(inputs, state):
    t = inputs.num_tasks
    next_key, orders = projection_orders(state.key, t)
    coeffs = pcgrad_coefficients(inputs.grams[0], orders)
    weights = jnp.sum(coeffs, axis=0)
    if reduction == "mean":
      weights = weights / t
    return weights, state._replace(key=next_key)

  return tree_lib.with_task_axis_check(
    weighting.gram_weighting(
      weights_fn,
      init_state,
      method="pcgrad",
      num_tasks=num_tasks,
      shared=shared,
      gram_leaves=gram_leaves,
      task_specific=task_specific,
      rescale_gram=True,
    ),
    num_tasks,
    "pcgrad",
  )
