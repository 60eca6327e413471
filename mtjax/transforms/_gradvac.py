"""GradVac (Gradient Vaccine): align task gradients to EMA cosine targets, on the Gram-weighting core."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mtjax._src import numerics
from mtjax._src import tree as tree_lib
from mtjax._src import weighting
from mtjax.transforms._pcgrad import normalized_gram
from mtjax.transforms._pcgrad import projection_orders
from mtjax.transforms._pcgrad import seed_key


class GradVacState(NamedTuple):
  """State of :func:`gradvac`.

  Attributes:
    key: the PRNG key for the next step's orders.
    targets: ``[K, T, T]`` EMA cosine targets :math:`\\hat\\phi_{ij}` per parameter group ``k``
      (row ``i``: the targets task ``i`` is vaccinated towards); zeros at init.
    weights: ``[K, T]`` task coefficients of the last step, one row per group.
  """

  key: jax.Array
  targets: jax.Array
  weights: jax.Array


def gradvac_coefficients(gram: jax.Array, targets: jax.Array, orders: jax.Array, beta) -> tuple:
  """GradVac on one group's Gram matrix.

  Args:
    gram: ``[T, T]`` Gram matrix of the group.
    targets: ``[T, T]`` EMA targets of the group.
    orders: ``[T, T - 1]`` orders (see :func:`mtjax.transforms._pcgrad.projection_orders`).
    beta: EMA rate (traceable).

  Returns:
    ``(coeffs, new_targets)``: ``coeffs[i]`` holds ``c`` with ``g_i' = sum_m c_m g_m``.
  """
  num_tasks = gram.shape[0]
  dtype = gram.dtype
  if num_tasks == 1:  # no pair to align
    return jnp.ones((1, 1), dtype), targets.astype(dtype)
  gram = normalized_gram(gram)
  diag = jnp.diagonal(gram)
  beta = jnp.asarray(beta, dtype)
  # Lower bound on sqrt(1 - phi_hat^2): keeps the step finite when a target approaches +-1.
  min_sin = jnp.asarray(np.sqrt(np.finfo(dtype).eps), dtype)
  zero = jnp.zeros((), dtype)

  def one_task(i, order, target_row):
    c = jax.nn.one_hot(i, num_tasks, dtype=dtype)

    def body(p, carry):
      c, row = carry
      j = order[p]
      gc = jnp.matmul(gram, c, precision=numerics.HIGHEST)
      ip = gc[j]
      sq_i = jnp.maximum(jnp.dot(c, gc, precision=numerics.HIGHEST), zero)
      sq_j = diag[j]
      valid = (sq_i > 0) & (sq_j > 0)  # cosine defined: neither g_i' nor g_j is zero
      norm_i = jnp.sqrt(jnp.where(sq_i > 0, sq_i, 1))
      norm_j = jnp.sqrt(jnp.where(sq_j > 0, sq_j, 1))
      phi = jnp.clip(ip / (norm_i * norm_j), -1, 1)
      phi_hat = jnp.clip(row[j], -1, 1)
      sin_phi = jnp.sqrt(jnp.maximum(1 - phi * phi, zero))
      sin_hat = jnp.maximum(jnp.sqrt(jnp.maximum(1 - phi_hat * phi_hat, zero)), min_sin)
      step = norm_i * (phi_hat * sin_phi - phi * sin_hat) / (norm_j * sin_hat)
      c = c.at[j].add(jnp.where(valid & (phi < phi_hat), step, zero))
      row = row.at[j].set(jnp.where(valid, (1 - beta) * row[j] + beta * phi, row[j]))
      return c, row

    return jax.lax.fori_loop(0, num_tasks - 1, body, (c, target_row.astype(dtype)))

  return jax.vmap(one_task)(jnp.arange(num_tasks), orders, targets)


def gradvac(
  key: int | jax.Array = 0,
  *,
  num_tasks: int,
  beta: float | jax.Array = 0.5,
  granularity: weighting.GroupSpec = "model",
  shared: tree_lib.SharedSpec = None,
  gram_leaves: weighting.GramLeavesSpec = None,
  reduction: str = "sum",
  task_specific: str = "sum",
) -> optax.GradientTransformationExtraArgs:
  r"""GradVac ("Gradient Vaccine"): pull task-gradient cosines up to adaptive EMA targets.

  Per parameter group :math:`k` (the whole model, each layer or each tensor, see
  ``granularity``), for every task :math:`i`, starting from :math:`g_i' = g_i`, for
  :math:`j \ne i` in a random order (drawn afresh for every :math:`i` and step, shared by all
  groups), with :math:`\phi = \cos(g_i'[k], g_j[k])` and target :math:`\hat\phi = \hat\phi_{ijk}`:

  .. math::
    \text{if } \phi < \hat\phi: \quad g_i'[k] \leftarrow g_i'[k] + g_j[k] \,
    \frac{\|g_i'[k]\| \left(\hat\phi \sqrt{1-\phi^2} - \phi \sqrt{1-\hat\phi^2}\right)}
         {\|g_j[k]\| \sqrt{1-\hat\phi^2}},
    \qquad
    \hat\phi_{ijk} \leftarrow (1-\beta)\,\hat\phi_{ijk} + \beta\,\phi,

  where the EMA uses the pre-adjustment :math:`\phi`. The update is :math:`d = \sum_i g_i'`
  (or the mean). The adjusted :math:`g_i'[k]` has cosine exactly :math:`\hat\phi` with
  :math:`g_j[k]`. With :math:`\hat\phi = 0` (the initial state) the step is PCGrad's projection,
  so the first step equals :func:`mtjax.pcgrad` with the same key.

  Each :math:`g_i'[k]` is a linear combination :math:`\sum_m c_m g_m[k]`, so the method runs on
  the per-group Gram matrices :math:`G_k`: :math:`\|g_i'\|^2 = c^\top G_k c`,
  :math:`\langle g_i', g_j\rangle = (G_k c)_j`, :math:`\|g_j\|^2 = (G_k)_{jj}`, and the group's
  task weights are :math:`\sum_i c^{(i)}`.

  Decisions (the paper leaves them open):

  * Targets are per *ordered* pair: ``targets[k, i, j]`` is read and updated only while
    adjusting task ``i`` against ``j``. Because :math:`\phi` is measured on the already adjusted
    :math:`g_i'`, ``targets[k, i, j]`` and ``targets[k, j, i]`` may differ (they are close in
    practice).
  * When :math:`g_i'[k]` or :math:`g_j[k]` is zero the cosine is undefined: no adjustment and
    the target is left unchanged.
  * :math:`\sqrt{1-\hat\phi^2}` is bounded below by :math:`\sqrt{\epsilon}` of the dtype, and
    cosines are clipped to :math:`[-1, 1]`, so the step stays finite as a target nears 1.

  .. warning::
    Must be first in an ``optax.chain``: it consumes per-task gradients (every leaf
    ``[T, *param.shape]``, e.g. from :func:`mtjax.task_grads`) and emits params-shaped updates.
    Do not wrap it in ``optax.MultiSteps``.

  Examples:
    >>> import jax.numpy as jnp, optax, mtjax
    >>> params = {'w': jnp.zeros(3)}
    >>> task_grads = {'w': jnp.array([[-4., 1., 1.], [6., 1., 1.]])}
    >>> tx = optax.chain(mtjax.gradvac(key=0, num_tasks=2, beta=0.5), optax.sgd(1.0))
    >>> state = tx.init(params)
    >>> updates, state = tx.update(task_grads, state, params)
    >>> print(jnp.round(-updates['w'], 4))  # first step: the PCGrad direction
    [0.5848 3.8012 3.8012]
    >>> print(jnp.round(state[0].targets[0], 4))  # 0.5 * cos(g_1, g_2) off the diagonal
    [[ 0.     -0.4206]
     [-0.4206  0.    ]]

  Args:
    key: PRNG seed (int) or key for the random task orders.
    num_tasks: number of tasks ``T`` (required: it shapes the targets in the state).
    beta: EMA rate of the targets in ``[0, 1]`` (traceable; the paper uses values down to 1e-2).
    granularity: ``"model"`` (one group), ``"layer"`` (leaves sharing a parent path, e.g. a Dense
      kernel and bias), ``"leaf"`` (each parameter tensor), or a callable mapping one shared
      leaf's path (``'trunk/Dense_0/kernel'``) to a group name, an int id or ``None`` (left out);
      the older form, a callable on the list of paths returning one int id per path, still works.
    shared: shared-parameter mask (see :func:`mtjax.shared_mask`).
    reduction: ``"sum"`` (the paper) or ``"mean"`` of the adjusted gradients.
    task_specific: ``"sum"`` (plain sum of the task gradients on task-specific leaves) or
      ``"weighted"`` (needs ``granularity="model"``).
    gram_leaves: restrict the Gram to these shared leaves (path regex(es) or a callable
      ``paths -> bools``); the weights still apply to every shared leaf. With
      ``mtjax.task_grads(..., deferred=True)`` only their rows are computed and the update is
      one backward pass (the "subset" strategy).

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with state :class:`GradVacState`.

  References:
    Wang, Tsvetkov, Firat, Cao, *Gradient Vaccine: Investigating and Improving Multi-task
    Optimization in Massively Multilingual Models*, ICLR 2021. https://arxiv.org/abs/2010.05874

    Yu, Kumar, Gupta, Levine, Hausman, Finn, *Gradient Surgery for Multi-Task Learning*,
    NeurIPS 2020. https://arxiv.org/abs/2001.06782
  """
  if not isinstance(num_tasks, int) or isinstance(num_tasks, bool) or num_tasks < 1:
    raise ValueError(
      f"mtjax: gradvac: num_tasks must be a positive int (it shapes the EMA targets in the state), "
      f"got {num_tasks!r}. Pass gradvac(num_tasks=T)."
    )
  if reduction not in ("sum", "mean"):
    raise ValueError(f"mtjax: gradvac: reduction must be 'sum' or 'mean', got {reduction!r}.")
  if not callable(granularity) and granularity not in weighting.GRANULARITIES:
    raise ValueError(
      f"mtjax: gradvac: unknown granularity {granularity!r}; expected one of "
      f"{weighting.GRANULARITIES} or a callable on the shared leaves' paths."
    )
  if isinstance(beta, (int, float)) and not 0 <= beta <= 1:
    raise ValueError(f"mtjax: gradvac: beta must be in [0, 1], got {beta!r}.")

  def init_state(params):
    k = weighting.num_groups(granularity, params, shared)
    leaves = jax.tree_util.tree_leaves(params)
    dtype = numerics.gram_dtype(jnp.result_type(*leaves)) if leaves else jnp.float32
    return GradVacState(
      key=seed_key(key),
      targets=jnp.zeros((k, num_tasks, num_tasks), dtype),
      weights=weighting.init_weights(num_tasks, k),
    )

  def weights_fn(inputs, state):
    t = inputs.num_tasks
    grams = inputs.grams
    if grams.shape[0] != state.targets.shape[0]:
      raise ValueError(
        f"mtjax: gradvac: the gradients form {grams.shape[0]} parameter groups but the state was "
        f"initialized for {state.targets.shape[0]}; call tx.init on params with the same structure "
        "(and the same shared= mask) as the task gradients."
      )
    next_key, orders = projection_orders(state.key, t)
    coeffs, targets = jax.vmap(gradvac_coefficients, in_axes=(0, 0, None, None))(grams, state.targets, orders, beta)
    weights = jnp.sum(coeffs, axis=1)  # [K, T]
    if reduction == "mean":
      weights = weights / t
    if granularity == "model":
      weights = weights[0]  # one group: [T] weights (also allows task_specific="weighted")
    return weights, state._replace(key=next_key, targets=targets.astype(state.targets.dtype))

  return weighting.gram_weighting(
    weights_fn,
    init_state,
    method="gradvac",
    num_tasks=num_tasks,
    shared=shared,
    gram_leaves=gram_leaves,
    groups=granularity,
    task_specific=task_specific,
    rescale_gram=True,
  )
