"""ExcessMTL: task weights by exponentiated gradient on excess-risk estimates (AdaGrad-style diagonal Hessian)."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from mtjax._src import composition
from mtjax._src import numerics
from mtjax._src import rows as rows_lib
from mtjax._src import tree as tree_lib
from mtjax._src import weighting
from mtjax.transforms._db_mtl import check_state_tree
from mtjax.transforms._db_mtl import nonfinite_grads_check
from mtjax.transforms._db_mtl import prepare_leaves
from mtjax.transforms._db_mtl import shared_state_tree

WEIGHT_SUMS = ("simplex", "num_tasks")


class ExcessMTLState(NamedTuple):
  """State of :func:`excess_mtl`.

  Attributes:
    count: steps taken (int32).
    sq_sum: params-shaped tree: on every shared leaf the ``[T, *param.shape]`` accumulated squared
      task gradients :math:`S_i = \\sum_s g_{i,s}^2` (the method's memory: ``T`` copies of the
      shared parameters); on task-specific leaves an empty ``[0]`` placeholder.
    baseline: ``[T]`` the excess-risk estimates of the normalization (the first step's, or the
      running sum over the warm-up steps until their mean is taken).
    weights: ``[T]`` the task weights :math:`\\alpha` applied at the last step.
  """

  count: jax.Array
  sq_sum: Any
  baseline: jax.Array
  weights: jax.Array


def excess_mtl(
  *,
  num_tasks: int,
  step_size: float | jax.Array = 1e-2,
  eps: float | jax.Array = 1e-7,
  warmup_steps: int = 0,
  weight_sum: str = "simplex",
  shared: tree_lib.SharedSpec = None,
  task_specific: str = "weighted",
) -> optax.GradientTransformationExtraArgs:
  r"""ExcessMTL: up-weight the tasks that are furthest from convergence, by estimated excess risk.

  Per task, the squared gradients are accumulated (AdaGrad-style, :math:`S_i = 0` at init) and
  give a diagonal Hessian approximation :math:`H_i = \mathrm{diag}(\sqrt{S_i + \epsilon})`; the
  excess risk of task :math:`i` (its distance to convergence, by a second-order Taylor expansion)
  is estimated on the shared leaves as

  .. math::
    S_i \leftarrow S_i + g_i^2, \qquad
    E_i = g_i^\top H_i^{-1} g_i = \sum_p \frac{g_{i,p}^2}{\sqrt{S_{i,p} + \epsilon}} .

  For comparability across tasks, it is divided by a baseline :math:`E_i^{(0)}`: the first step's
  estimate (``warmup_steps=0``: that step only sets the baseline and leaves the weights
  uniform), or the mean over the first ``warmup_steps`` steps (weights uniform meanwhile; the
  paper's appendix collects these statistics for a few epochs). Then an exponentiated-gradient
  step on the weights,

  .. math::
    \alpha_i \leftarrow \frac{\alpha_i \exp(\eta \, E_i / E_i^{(0)})}{\sum_j \alpha_j \exp(\eta \, E_j / E_j^{(0)})},
    \qquad d = \sum_i \alpha_i \, g_i,

  computed in log space (a softmax), so large excess risks saturate the weights instead of
  overflowing. A task whose baseline is zero (a zero gradient when it was set) gets a ratio of
  0. ``weight_sum``: ``"simplex"`` (the paper: :math:`\sum_i \alpha_i = 1`, starting at
  :math:`1/T`) or ``"num_tasks"`` (the authors' code and LibMTL: weights start at 1 and are
  renormalized to sum to :math:`T`, i.e. :math:`T` times the paper's update). The step size
  :math:`\eta` defaults to the authors' code's ``1e-2``.

  It works on the leaves (the accumulator is per coordinate), not through the Gram core: a
  deferred :class:`~mtjax.TaskJacobian` is materialized (T backward passes) and sparse
  embedding-table rows (:class:`~mtjax.SparseRows`) are densified. Memory: the state holds ``T``
  copies of the shared parameters (``[T, P_shared]``). Task-specific leaves (``shared=`` mask
  False) get the weighted sum (``task_specific="weighted"``, the default: the authors' code
  backpropagates :math:`\sum_i \alpha_i L_i` through every parameter) or the plain sum
  (``"sum"``); they do not enter the excess risk.

  .. warning::
    Must be first in an ``optax.chain``: it consumes per-task gradients (every leaf
    ``[T, *param.shape]``, e.g. from :func:`mtjax.task_grads`) and emits params-shaped updates.
    Do not wrap it in ``optax.MultiSteps``.

  Examples:
    >>> import jax.numpy as jnp, optax, mtjax
    >>> params = {'w': jnp.zeros(2)}
    >>> tx = optax.chain(mtjax.excess_mtl(num_tasks=2, step_size=1.0), optax.sgd(1.0))
    >>> state = tx.init(params)
    >>> g0 = {'w': jnp.array([[1., 0.], [0., 1.]])}
    >>> updates, state = tx.update(g0, state, params)  # step 0: baseline, uniform weights
    >>> print(state[0].weights)
    [0.5 0.5]
    >>> g1 = {'w': jnp.array([[1., 0.], [0., 0.]])}  # task 1 has converged, task 0 has not
    >>> updates, state = tx.update(g1, state, params)
    >>> [round(float(w), 4) for w in state[0].weights]
    [0.6698, 0.3302]

  Args:
    num_tasks: number of tasks ``T`` (required: it shapes the accumulator in the state).
    step_size: :math:`\eta > 0`, the exponentiated-gradient ("robust") step size (traceable).
    eps: :math:`\epsilon` under the square root (traceable; the code's ``1e-7``).
    warmup_steps: steps whose estimates are averaged into the baseline (static int >= 0).
    weight_sum: ``"simplex"`` (paper) or ``"num_tasks"`` (code), see above.
    shared: shared-parameter mask (see :func:`mtjax.shared_mask`).
    task_specific: ``"weighted"`` or ``"sum"`` on task-specific leaves.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with state :class:`ExcessMTLState`.

  References:
    He, Zhou, Zhang, Yun, Xu, Zeng, Chilimbi, Zhao, *Robust Multi-Task Learning with Excess
    Risks*, ICML 2024. https://arxiv.org/abs/2402.02009
  """
  method = "excess_mtl"
  if not isinstance(num_tasks, int) or isinstance(num_tasks, bool) or num_tasks < 1:
    raise ValueError(
      f"mtjax: excess_mtl: num_tasks must be a positive int (it shapes the accumulator in the "
      f"state), got {num_tasks!r}. Pass excess_mtl(num_tasks=T)."
    )
  warmup_steps = weighting.static_int(warmup_steps, "warmup_steps", method)
  if weight_sum not in WEIGHT_SUMS:
    raise ValueError(f"mtjax: excess_mtl: weight_sum must be one of {WEIGHT_SUMS}, got {weight_sum!r}.")
  if task_specific not in ("sum", "weighted"):
    raise ValueError(f"mtjax: excess_mtl: task_specific must be 'sum' or 'weighted', got {task_specific!r}.")
  if isinstance(step_size, (int, float)) and not step_size > 0:
    raise ValueError(f"mtjax: excess_mtl: step_size must be > 0, got {step_size!r}.")
  if isinstance(eps, (int, float)) and not eps >= 0:
    raise ValueError(f"mtjax: excess_mtl: eps must be >= 0, got {eps!r}.")
  total = 1.0 if weight_sum == "simplex" else float(num_tasks)

  def init_fn(params):
    composition.check_not_wrapped("excess_mtl")  # optax.MultiSteps / masked / apply_if_finite around it
    dtype = weighting.params_dtype(params)
    return ExcessMTLState(
      count=jnp.zeros((), jnp.int32),
      sq_sum=shared_state_tree(params, num_tasks, shared),
      baseline=jnp.zeros((num_tasks,), dtype),
      weights=jnp.full((num_tasks,), total / num_tasks, dtype),
    )

  def update_fn(updates, state, params=None, *, task_losses=None, **extra_args):
    del extra_args
    leaves, treedef, mask, t, _, losses_check = prepare_leaves(
      updates, params, num_tasks=num_tasks, shared=shared, method=method, task_losses=task_losses, losses_required=False
    )
    acc_leaves = jax.tree.leaves(state.sq_sum)
    check_state_tree(acc_leaves, leaves, mask, method, "accumulator")
    dtype = state.weights.dtype
    new_acc, risk = [], jnp.zeros((t,), dtype)
    for leaf, a, m in zip(leaves, acc_leaves, mask):
      if not m:
        new_acc.append(a)
        continue
      g = leaf.astype(a.dtype)
      s = a + g * g
      new_acc.append(s)
      h = jnp.sqrt(s + jnp.asarray(eps, s.dtype))
      # g^2 / h as g * (g / h): no overflow of g^2 for huge finite gradients (|g| <= h)
      ratio = numerics.safe_div(g, h)
      risk = risk + jnp.sum(g * ratio, axis=tuple(range(1, g.ndim))).astype(dtype)
    count = state.count
    if warmup_steps == 0:
      is_base = count == 0
      baseline = jnp.where(is_base, risk, state.baseline)
      step = ~is_base
    else:
      summed = state.baseline + jnp.where(count < warmup_steps, risk, 0)
      baseline = jnp.where(count == warmup_steps - 1, summed / warmup_steps, summed)
      baseline = jnp.where(count < warmup_steps, baseline, state.baseline)
      step = count >= warmup_steps
    ratio = numerics.safe_div(risk, baseline)
    w_old = state.weights.astype(dtype)
    logits = jnp.log(jnp.maximum(w_old / total, jnp.finfo(dtype).tiny)) + jnp.asarray(step_size, dtype) * ratio
    w_new = total * jax.nn.softmax(logits)
    weights = jnp.where(step, w_new, w_old)
    out = []
    for leaf, m in zip(leaves, mask):
      if m or task_specific == "weighted":
        out.append(numerics.weighted_task_sum(weights, leaf))
      else:
        out.append(rows_lib.leaf_sum(leaf))
    out = numerics.enforce(out, losses_check, nonfinite_grads_check(leaves, method))
    new_state = ExcessMTLState(
      count=optax.safe_increment(count),
      sq_sum=jax.tree.unflatten(jax.tree.structure(state.sq_sum), new_acc),
      baseline=baseline.astype(state.baseline.dtype),
      weights=weights.astype(dtype),
    )
    return jax.tree_util.tree_unflatten(treedef, out), new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
