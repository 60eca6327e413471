"""MetaBalance: auxiliary-task gradients rescaled towards the target task's gradient magnitude, per parameter."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from mtjax._src import numerics
from mtjax._src import tree as tree_lib
from mtjax._src import weighting

STRATEGIES = ("both", "down", "up")


class MetaBalanceState(NamedTuple):
  """State of :func:`metabalance`.

  Attributes:
    norms: ``[K, T]`` moving averages :math:`m_{k,i}` of the task-gradient norms, one row per
      parameter group ``k`` (each shared parameter tensor by default); zeros at init.
    weights: ``[K, T]`` the task coefficients of the last step (the target's is 1).
  """

  norms: jax.Array
  weights: jax.Array


def metabalance(
  *,
  num_tasks: int,
  target: int = 0,
  relax_factor: float | jax.Array = 0.7,
  beta: float | jax.Array = 0.9,
  strategy: str = "both",
  granularity: weighting.GroupSpec = "leaf",
  shared: tree_lib.SharedSpec = None,
  gram_leaves: weighting.GramLeavesSpec = None,
) -> optax.GradientTransformationExtraArgs:
  r"""MetaBalance: bring every auxiliary task's gradient magnitude closer to the target task's.

  The setting of recommendation with auxiliary tasks: one *target* task whose accuracy matters
  and auxiliary tasks that should help it without dominating the shared parameters. Per shared
  parameter tensor :math:`k` (``granularity="leaf"``, as the paper, which works per parameter),
  with moving averages of the gradient norms (:math:`m = 0` at init)

  .. math::
    m_{k,i} \leftarrow \beta \, m_{k,i} + (1 - \beta) \, \|g_i[k]\|,

  every auxiliary gradient is rescaled, with relax factor :math:`r \in [0, 1]`,

  .. math::
    g_i[k] \leftarrow r \, \frac{m_{k,\mathrm{tar}}}{m_{k,i}} \, g_i[k] + (1 - r) \, g_i[k],
    \qquad d[k] = g_{\mathrm{tar}}[k] + \sum_{i \ne \mathrm{tar}} g_i[k],

  the target's gradient unchanged. :math:`r = 1` gives every auxiliary gradient the target's
  (averaged) magnitude, :math:`r = 0` is the plain sum. The paper's three strategies are
  ``strategy``: ``"both"`` (adapt every auxiliary gradient: the released code's behaviour, and
  the default), ``"down"`` (only those whose :math:`m_{k,i} > m_{k,\mathrm{tar}}`: keep
  auxiliary tasks from dominating) and ``"up"`` (only those whose
  :math:`m_{k,i} < m_{k,\mathrm{tar}}`: strengthen weak ones).

  The norms are the square roots of the Gram diagonal of each group, so it runs on the Gram
  core with ``K`` groups and ``[K, T]`` weights (cheap: the diagonal only matters). A task whose
  norm average is zero (its gradient has been zero so far) gets the factor :math:`1 - r`
  (its gradient is zero anyway), so zero gradients stay finite. Task-specific leaves
  (``shared=`` mask False) get the plain sum of the task gradients (the paper balances the shared
  parameters only).

  .. warning::
    Must be first in an ``optax.chain``: it consumes per-task gradients (every leaf
    ``[T, *param.shape]``, e.g. from :func:`mtjax.task_grads`) and emits params-shaped updates.
    Do not wrap it in ``optax.MultiSteps``.

  Examples:
    >>> import jax.numpy as jnp, optax, mtjax
    >>> params = {'w': jnp.zeros(2)}
    >>> task_grads = {'w': jnp.array([[1., 0.], [0., 4.]])}  # target 0, one auxiliary task 4x larger
    >>> tx = optax.chain(mtjax.metabalance(num_tasks=2, relax_factor=0.5), optax.sgd(1.0))
    >>> state = tx.init(params)
    >>> updates, state = tx.update(task_grads, state, params)
    >>> print(-updates['w'])  # 0.5 * (1/4) * 4 + 0.5 * 4 = 2.5
    [1.  2.5]
    >>> print(state[0].weights)
    [[1.    0.625]]

  Args:
    num_tasks: number of tasks ``T`` (required: it shapes the norm averages in the state).
    target: index of the target task (static int); every other task is auxiliary.
    relax_factor: :math:`r \in [0, 1]` (traceable; the code's default 0.7).
    beta: moving-average rate :math:`\beta \in [0, 1)` of the norms (traceable; 0.9).
    strategy: ``"both"``, ``"down"`` or ``"up"`` (see above).
    granularity: ``"leaf"`` (each parameter tensor, the paper), ``"layer"``, ``"model"`` (one
      norm per task over all shared leaves) or a callable mapping one leaf path to a group name,
      an int id or ``None`` (as :func:`mtjax.analysis.cosine_similarity`'s ``granularity``).
    shared: shared-parameter mask (see :func:`mtjax.shared_mask`).
    gram_leaves: restrict the balancing to these shared leaves (path regex(es) or a callable);
      the other shared leaves then belong to no group and get the plain sum.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with state :class:`MetaBalanceState`.

  References:
    He, Feng, Cheng, Ji, Guo, Caverlee, *MetaBalance: Improving Multi-Task Recommendations via
    Adapting Gradient Magnitudes of Auxiliary Tasks*, The Web Conference (WWW) 2022.
    https://arxiv.org/abs/2203.06801
  """
  if not isinstance(num_tasks, int) or isinstance(num_tasks, bool) or num_tasks < 1:
    raise ValueError(
      f"mtjax: metabalance: num_tasks must be a positive int (it shapes the norm averages in the "
      f"state), got {num_tasks!r}. Pass metabalance(num_tasks=T)."
    )
  if not isinstance(target, int) or isinstance(target, bool) or not 0 <= target < num_tasks:
    raise ValueError(f"mtjax: metabalance: target must be a task index in [0, {num_tasks}), got {target!r}.")
  if strategy not in STRATEGIES:
    raise ValueError(f"mtjax: metabalance: strategy must be one of {STRATEGIES}, got {strategy!r}.")
  if not callable(granularity) and granularity not in weighting.GRANULARITIES:
    raise ValueError(
      f"mtjax: metabalance: unknown granularity {granularity!r}; expected one of "
      f"{weighting.GRANULARITIES} or a callable on the shared leaves' paths."
    )
  if isinstance(relax_factor, (int, float)) and not 0 <= relax_factor <= 1:
    raise ValueError(f"mtjax: metabalance: relax_factor must be in [0, 1], got {relax_factor!r}.")
  if isinstance(beta, (int, float)) and not 0 <= beta < 1:
    raise ValueError(f"mtjax: metabalance: beta must be in [0, 1), got {beta!r}.")

  def init_state(params):
    k = max(weighting.num_groups(granularity, params, shared), 1)
    dtype = weighting.params_dtype(params)
    return MetaBalanceState(norms=jnp.zeros((k, num_tasks), dtype), weights=jnp.ones((k, num_tasks), dtype))

  def weights_fn(inputs, state):
    grams = inputs.grams
    if grams.shape[0] != state.norms.shape[0]:
      raise ValueError(
        f"mtjax: metabalance: the gradients form {grams.shape[0]} parameter groups but the state was initialized "
        f"for {state.norms.shape[0]}; call tx.init on params with the same structure (and the same shared= mask) "
        "as the task gradients."
      )
    dtype = grams.dtype
    diag = jnp.maximum(jnp.diagonal(grams, axis1=-2, axis2=-1), 0)
    # grams = 2^s G (the core's rescaling of an overflowing Gram): true norms = sqrt(diag) 2^(-s/2)
    norms = jnp.sqrt(diag) * jnp.exp2(-0.5 * jnp.asarray(inputs.gram_log2_scale, dtype))
    b = jnp.asarray(beta, dtype)
    m = b * state.norms.astype(dtype) + (1 - b) * norms  # [K, T]
    m_tar = m[:, target : target + 1]
    r = jnp.asarray(relax_factor, dtype)
    w = r * numerics.safe_div(jnp.broadcast_to(m_tar, m.shape), m) + (1 - r)
    if strategy == "down":
      w = jnp.where(m > m_tar, w, 1)
    elif strategy == "up":
      w = jnp.where(m < m_tar, w, 1)
    w = w.at[:, target].set(1)
    weights = w[0] if granularity == "model" else w
    return weights, state._replace(norms=m.astype(state.norms.dtype))

  return weighting.gram_weighting(
    weights_fn,
    init_state,
    method="metabalance",
    num_tasks=num_tasks,
    shared=shared,
    groups=granularity,
    gram_leaves=gram_leaves,
    rescale_gram=True,
  )
