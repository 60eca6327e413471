"""PE-LTR: Pareto-efficient task weights with priority lower bounds (Lin et al., RecSys 2019)."""

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

# Rounding slack when checking sum(lower_bounds) <= 1 (e.g. 0.7 + 0.2 + 0.1 in float32).
_SUM_SLACK = 1e-6


class ParetoLTRState(NamedTuple):
  """State of :func:`pareto_ltr`.

  Attributes:
    weights: the task weights ``[T]`` of the last step (empty when ``num_tasks`` is not given).
  """

  weights: jax.Array


def _messages(num: int) -> tuple[str, str]:
  negative = "mtjax: pareto_ltr: lower_bounds must be non-negative (they are minimum task weights c_i >= 0)."
  too_big = (
    "mtjax: pareto_ltr: lower_bounds sum to more than 1, so no weights on the simplex "
    f"satisfy w_i >= c_i; make the {num} bounds sum to at most 1."
  )
  return negative, too_big


def _scaled_problem(gram: jax.Array, lower_bounds) -> tuple[jax.Array, jax.Array, jax.Array]:
  """``(G / max diag, c, 1 - sum c)`` in the Gram's dtype (the weights are scale invariant)."""
  gram, _ = solvers.scale_gram(gram)
  c = jnp.asarray(lower_bounds).astype(gram.dtype)
  return gram, c, 1.0 - jnp.sum(c)


def pareto_ltr_weights(gram: jax.Array, lower_bounds: jax.Array) -> jax.Array:
  r"""The two-step PE-LTR weights from a Gram matrix and lower bounds (no validation).

  Step 1 solves the equality-constrained relaxation with :math:`w = c + \hat w` by
  :math:`\hat w, \lambda = \operatorname{pinv}\Big(\begin{bmatrix} G & \mathbf 1 \\
  \mathbf 1^\top & 0 \end{bmatrix}\Big) \begin{bmatrix} -G c \\ 1 - \sum_i c_i \end{bmatrix}`;
  step 2 projects :math:`\hat w` onto :math:`\{x \ge 0, \sum_i x_i = 1 - \sum_i c_i\}` and
  returns :math:`c + x`. ``G`` is first divided by its largest diagonal entry (the weights are
  scale invariant), which keeps the pseudo-inverse's cutoff relative.

  Args:
    gram: ``[T, T]`` Gram matrix.
    lower_bounds: ``[T]`` non-negative bounds summing to at most 1.

  Returns:
    ``[T]`` weights, ``>= lower_bounds`` and summing to 1.
  """
  gram, c, free = _scaled_problem(gram, lower_bounds)
  dtype = gram.dtype
  t = gram.shape[0]
  ones = jnp.ones((t,), dtype)
  kkt = jnp.concatenate(
    [
      jnp.concatenate([gram, ones[:, None]], axis=1),
      jnp.concatenate([ones, jnp.zeros((1,), dtype)])[None, :],
    ],
    axis=0,
  )
  rhs = jnp.concatenate([-jnp.matmul(gram, c, precision=numerics.HIGHEST), free[None]])
  solution = jnp.matmul(jnp.linalg.pinv(kkt), rhs, precision=numerics.HIGHEST)
  w_hat = solution[:t]
  x = solvers.project_simplex(w_hat, jnp.maximum(free, 0.0))
  return c + x


SOLVERS = ("paper", "exact")


def pareto_ltr_exact_weights(
  gram: jax.Array, lower_bounds: jax.Array, *, max_iters: int = 250, tol: jax.typing.ArrayLike = 1e-8
) -> jax.Array:
  r"""The exact PE-LTR weights: :math:`\min \|\sum_i w_i g_i\|^2` over :math:`w \ge c, \sum_i w_i = 1`.

  With :math:`s = 1 - \sum_i c_i`, every feasible :math:`w` is :math:`w = c + s y = M y` for a
  point :math:`y` of the simplex, where :math:`M = c \mathbf 1^\top + s I` (because
  :math:`\mathbf 1^\top y = 1`). The problem is therefore the min-norm problem of MGDA on the
  Gram :math:`M^\top G M` of the shifted gradients :math:`g'_j = s g_j + \sum_i c_i g_i`, solved
  by :func:`mtjax._src.solvers.min_norm_simplex` (pairwise Frank-Wolfe with corrective steps).
  With ``c = 0`` these are MGDA's weights; with :math:`\sum_i c_i = 1` they are ``c``.

  Args:
    gram: ``[T, T]`` Gram matrix.
    lower_bounds: ``[T]`` non-negative bounds summing to at most 1 (not validated here).
    max_iters: static cap on the solver's steps.
    tol: tolerance on the solver's pairwise gap, relative to the largest diagonal of the shifted
      Gram (traceable).

  Returns:
    ``[T]`` weights, ``>= lower_bounds`` and summing to 1.
  """
  gram, c, free = _scaled_problem(gram, lower_bounds)
  dtype = gram.dtype
  t = gram.shape[0]
  free = jnp.maximum(free, 0.0)
  m = c[:, None] * jnp.ones((1, t), dtype) + free * jnp.eye(t, dtype=dtype)
  shifted = jnp.matmul(m.T, jnp.matmul(gram, m, precision=numerics.HIGHEST), precision=numerics.HIGHEST)
  shifted = 0.5 * (shifted + shifted.T)
  y = solvers.min_norm_simplex(shifted, max_iters=max_iters, tol=tol).weights
  return c + free * y


def pareto_ltr(
  lower_bounds: jax.typing.ArrayLike,
  *,
  num_tasks: Optional[int] = None,
  shared: tree_lib.SharedSpec = None,
  gram_leaves: weighting.GramLeavesSpec = None,
  task_specific: str = "sum",
  solver: str = "paper",
  max_iters: int = 250,
  tol: jax.typing.ArrayLike = 1e-8,
) -> optax.GradientTransformationExtraArgs:
  r"""PE-LTR: Pareto-efficient task weights with per-task lower bounds (priorities).

  The weights solve (with ``solver="exact"``; approximately, in two steps as in the paper, with
  the default ``solver="paper"``)

  .. math::
    \min_w \Big\| \sum_{i=1}^T w_i g_i \Big\|^2 \quad \text{s.t.} \quad \sum_i w_i = 1, \quad
    w_i \ge c_i,

  with priority lower bounds :math:`c_i \ge 0`, :math:`\sum_i c_i \le 1`. Writing
  :math:`w = c + \hat w` and :math:`G = J J^\top` (the Gram of the shared parameters):

  1. drop :math:`\hat w \ge 0` and solve the KKT system of the equality-constrained problem,
     :math:`\begin{bmatrix} G & \mathbf 1 \\ \mathbf 1^\top & 0 \end{bmatrix}
     \begin{bmatrix} \hat w \\ \lambda \end{bmatrix} =
     \begin{bmatrix} -G c \\ 1 - \sum_i c_i \end{bmatrix}`, by pseudo-inverse (least squares,
     so a singular :math:`G` -- identical, opposite, zero or fewer-than-``T``-dimensional
     gradients -- is fine);
  2. project :math:`\hat w` exactly onto :math:`\{x \ge 0, \sum_i x_i = 1 - \sum_i c_i\}`
     (sort-based projection) and return :math:`w = c + x`.

  The result always satisfies :math:`w \ge c` and :math:`\sum_i w_i = 1`; with
  :math:`\sum_i c_i = 1` it is :math:`w = c`. It is the exact constrained minimizer when the
  relaxed solution of step 1 is feasible, and for ``T = 2``; otherwise step 2 is the paper's
  heuristic, which can differ from the exact quadratic program: for ``T > 2`` it can return a
  direction that conflicts with a task where the exact solution does not (for example
  ``J = [[0.3201, 0.9170], [0.5642, -0.5622], [-0.2903, 0.9939]]`` with ``c = 0``: the paper's
  steps give ``min_t g_t . d = -0.131``, the exact solve -- MGDA's point -- conflicts with none).

  ``solver="exact"`` solves the constrained quadratic program itself
  (:func:`pareto_ltr_exact_weights`: MGDA's min-norm solver on the Gram of the shifted gradients
  :math:`s g_j + \sum_i c_i g_i`, :math:`s = 1 - \sum_i c_i`). The default stays ``"paper"`` so
  that ``pareto_ltr`` reproduces the published algorithm (the baseline other papers compare
  against); choose ``"exact"`` when the weights should be the true constrained Pareto point.
  Lower bounds themselves can force a direction that increases a task's loss to first order,
  whichever solver is used.

  .. warning::
    Must be first in an ``optax.chain``: it consumes per-task gradients (every leaf
    ``[T, *param.shape]``, e.g. from :func:`mtjax.task_grads`) and emits params-shaped updates.
    Do not wrap it in ``optax.MultiSteps``.

  Examples:
    >>> import jax.numpy as jnp, optax, mtjax
    >>> params = {'w': jnp.zeros(3)}
    >>> task_grads = {'w': jnp.array([[-4., 1., 1.], [6., 1., 1.]])}
    >>> tx = optax.chain(mtjax.pareto_ltr([0.7, 0.1]), optax.sgd(1.0))
    >>> state = tx.init(params)
    >>> updates, state = tx.update(task_grads, state, params)
    >>> [round(x, 4) for x in state[0].weights.tolist()]
    [0.7, 0.3]
    >>> [round(x, 4) for x in (-updates['w']).tolist()]
    [-1.0, 1.0, 1.0]

  Args:
    lower_bounds: ``[T]`` priority lower bounds :math:`c` (traceable, e.g. under
      ``optax.inject_hyperparams``); non-negative and summing to at most 1 (a ``ValueError`` at
      construction for concrete bounds, a jit-safe runtime check for traced ones). ``[0] * T``
      gives the unconstrained Pareto-efficient weights.
    num_tasks: number of tasks ``T`` (default: ``len(lower_bounds)``); the state records the
      weights of every step.
    shared: shared-parameter mask (see :func:`mtjax.shared_mask`); the weights come from the
      Gram of the shared leaves only.
    task_specific: ``"sum"`` (plain sum of the task gradients on task-specific leaves) or
      ``"weighted"`` (apply the PE-LTR weights there too).
    gram_leaves: restrict the Gram to these shared leaves (path regex(es) or a callable
      ``paths -> bools``); the weights still apply to every shared leaf. With
      ``mtjax.task_grads(..., deferred=True)`` only their rows are computed and the update is
      one backward pass (the "subset" strategy).
    solver: ``"paper"`` (the paper's two steps, default) or ``"exact"`` (the constrained
      quadratic program; see above). Static under ``optax.inject_hyperparams``.
    max_iters: static cap on the exact solver's steps (``solver="exact"`` only; with
      ``optax.inject_hyperparams`` list it in ``static_args``).
    tol: the exact solver's tolerance on its pairwise gap, relative to the largest squared norm
      of the shifted gradients (``solver="exact"`` only; traceable).

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with state :class:`ParetoLTRState`.

  References:
    Lin, Chen, Liu, Li, Zhang, Yang, Ou, Jiang, *A Pareto-Efficient Algorithm for Multiple
    Objective Optimization in E-Commerce Recommendation*, RecSys 2019.
    https://doi.org/10.1145/3298689.3346998
  """
  if solver not in SOLVERS:
    raise ValueError(f"mtjax: pareto_ltr: solver must be one of {SOLVERS}, got {solver!r}.")
  if solver == "exact":  # "paper" has no loop: max_iters may then be anything (e.g. traced by inject_hyperparams)
    max_iters = weighting.static_int(max_iters, "max_iters", "pareto_ltr")
  shape = np.shape(lower_bounds)
  if len(shape) != 1 or shape[0] < 1:
    raise ValueError(
      f"mtjax: pareto_ltr: lower_bounds must be a 1-D vector [T] (one bound per task), got shape {shape}."
    )
  if num_tasks is None:
    num_tasks = int(shape[0])
  elif shape[0] != num_tasks:
    raise ValueError(
      f"mtjax: pareto_ltr: lower_bounds has {shape[0]} entries but num_tasks={num_tasks}; give one bound per task."
    )
  negative_msg, too_big_msg = _messages(num_tasks)
  concrete = numerics._is_concrete(lower_bounds)  # pylint: disable=protected-access
  if concrete:
    bounds = np.asarray(lower_bounds, np.float64)
    if not np.all(np.isfinite(bounds)) or np.any(bounds < 0):
      raise ValueError(negative_msg + f" Got {bounds.tolist()}.")
    if bounds.sum() > 1.0 + _SUM_SLACK:
      raise ValueError(too_big_msg + f" Got {bounds.tolist()} (sum {bounds.sum():.6g}).")

  def init_state(params):
    return ParetoLTRState(weights=weighting.init_weights(num_tasks, dtype=weighting.params_dtype(params)))

  def weights_fn(inputs, state):
    gram = inputs.grams[0]
    c = jnp.asarray(lower_bounds)
    if not concrete:
      c = numerics.enforce(
        c,
        numerics.condition_check(jnp.any(~(c >= 0)), negative_msg),
        numerics.condition_check(jnp.sum(c) > 1.0 + _SUM_SLACK, too_big_msg),
      )
    if solver == "exact":
      return pareto_ltr_exact_weights(gram, c, max_iters=max_iters, tol=tol), state
    return pareto_ltr_weights(gram, c), state  # scale invariant: inputs.gram_log2_scale is not needed

  return weighting.gram_weighting(
    weights_fn,
    init_state,
    method="pareto_ltr",
    num_tasks=num_tasks,
    shared=shared,
    gram_leaves=gram_leaves,
    task_specific=task_specific,
    rescale_gram=True,
  )
