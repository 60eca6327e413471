"""IMTL: impartial multi-task learning -- IMTL-G, IMTL-L and the hybrid (Liu et al., ICLR 2021)."""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

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


class IMTLLossState(NamedTuple):
  r"""State of :func:`imtl` with ``mode="loss"`` or ``mode="hybrid"``.

  Attributes:
    loss_scales: the learned loss scales :math:`s` ``[T]`` that the *next* update will use (already
      stepped by the inner optimizer).
    inner_opt_state: state of the inner optimizer that steps ``loss_scales``.
    weights: ``[T]`` the task weights of the shared leaves used by the last update
      (:math:`e^{s}` for IMTL-L, :math:`\alpha \odot e^{s}` for the hybrid).
  """

  loss_scales: jax.Array
  inner_opt_state: Any
  weights: jax.Array


MODES = ("gradient", "loss", "hybrid")


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
  system = jnp.concatenate(
    [
      jnp.concatenate([scaled, -norms[:, None]], axis=1),
      jnp.concatenate([jnp.ones((t,), dtype), jnp.zeros((1,), dtype)])[None, :],
    ],
    axis=0,
  )
  rhs = jnp.concatenate([jnp.zeros((t,), dtype), jnp.ones((1,), dtype)])
  return jnp.matmul(jnp.linalg.pinv(system), rhs, precision=numerics.HIGHEST)[:t]


def imtl(
  *,
  num_tasks: Optional[int] = None,
  shared: tree_lib.SharedSpec = None,
  gram_leaves: weighting.GramLeavesSpec = None,
  task_specific: Optional[str] = None,
  mode: str = "gradient",
  init_loss_scale: float = 0.0,
  learning_rate: float = 1e-3,
  loss_scale_optimizer: Optional[optax.GradientTransformation] = None,
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
  weights (the update is positively homogeneous of degree 1).

  ``mode`` selects the part of IMTL:

  * ``"gradient"`` (default): IMTL-G as above (state :class:`IMTLState`).
  * ``"loss"``: IMTL-L. Each task has a learnable loss scale :math:`s_i` (initially
    ``init_loss_scale``) and the scaled loss :math:`e^{s_i} L_i - s_i`; the update is the gradient
    of their sum, :math:`d = \sum_i e^{s_i} g_i`, computed with the current :math:`s`, then
    :math:`s` takes one step of an inner optimizer (``loss_scale_optimizer``, default
    ``optax.adam(learning_rate)``) on the analytic gradient :math:`e^{s_i} L_i - 1` (fixed point
    :math:`e^{s_i} L_i = 1`: every scaled loss is driven to 1). Loss-only: with
    :func:`mtjax.task_grads` ``(..., deferred=True)`` each update is ONE backward pass.
  * ``"hybrid"``: IMTL (IMTL-L + IMTL-G, what LibMTL calls IMTL). IMTL-G is applied to the gradients
    of the scaled losses, :math:`e^{s_i} g_i`, i.e. to the Gram :math:`\operatorname{diag}(e^s) G
    \operatorname{diag}(e^s)`; the shared leaves get :math:`\sum_i \alpha_i e^{s_i} g_i` and
    :math:`s` is stepped as in ``"loss"``. Needs the Gram (one backward pass per task).

  For ``"loss"`` and ``"hybrid"`` ``num_tasks`` is required, the state is :class:`IMTLLossState`,
  ``task_losses=`` must be passed to every ``update`` and the losses must be positive (a
  ``ValueError``, under ``jit`` a runtime error, otherwise: with :math:`L_i \le 0` the scale
  :math:`s_i` has no fixed point and grows without bound). Task-specific leaves: in the paper and
  LibMTL a task's own parameters receive the gradient of its scaled loss, :math:`e^{s_i} g_i`.
  ``task_specific`` defaults to ``"weighted"`` for these modes: for ``"loss"`` that is exactly the
  paper's :math:`e^{s_i} g_i`; for ``"hybrid"`` the task-specific leaves then get the shared
  weights :math:`\alpha_i e^{s_i} g_i` (the paper's :math:`e^{s_i} g_i` times :math:`\alpha_i`;
  the Gram core applies one weight vector to all weighted leaves), or the plain sum with ``"sum"``.

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
    >>> loss_tx = mtjax.imtl(num_tasks=2, mode="loss", loss_scale_optimizer=optax.sgd(0.1))  # IMTL-L
    >>> updates, loss_state = loss_tx.update(task_grads, loss_tx.init(params), params, task_losses=jnp.array([1., 3.]))
    >>> updates['w'].tolist()  # e^0 = 1 for both tasks: the plain sum at the first step
    [2.0, 2.0, 2.0]
    >>> [round(x, 4) for x in loss_state.loss_scales.tolist()]  # s - 0.1 (e^s L - 1)
    [0.0, -0.2]

  Args:
    num_tasks: number of tasks ``T`` (checked against the gradients; when given, the state
      records the task weights of every step in ``weights``).
    shared: shared-parameter mask (see :func:`mtjax.shared_mask`); the weights come from the
      Gram of the shared leaves only.
    task_specific: ``"sum"`` (plain sum of the task gradients on task-specific leaves) or
      ``"weighted"`` (apply the weights there too). ``None`` (default): ``"sum"`` for
      ``mode="gradient"``, ``"weighted"`` for ``"loss"`` and ``"hybrid"``.
    gram_leaves: restrict the Gram to these shared leaves (path regex(es) or a callable
      ``paths -> bools``); the weights still apply to every shared leaf. With
      ``mtjax.task_grads(..., deferred=True)`` only their rows are computed and the update is
      one backward pass (the "subset" strategy).
    mode: ``"gradient"`` (IMTL-G, default), ``"loss"`` (IMTL-L) or ``"hybrid"`` (IMTL).
    init_loss_scale: initial :math:`s_i` (modes ``"loss"``/``"hybrid"``; 0 as in the paper).
    learning_rate: step size of the default inner optimizer ``optax.adam`` of :math:`s` (traceable;
      modes ``"loss"``/``"hybrid"``). Ignored when ``loss_scale_optimizer`` is given.
    loss_scale_optimizer: inner optax optimizer that steps :math:`s` (e.g. ``optax.sgd(0.01)``).

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with state :class:`IMTLState` (``mode="gradient"``)
    or :class:`IMTLLossState`.

  References:
    Liu, Li, Kuang, Xue, Chen, Yang, Liao and Zhang, *Towards Impartial Multi-task Learning*,
    ICLR 2021. https://openreview.net/forum?id=IMPnRXEWpvr
  """

  if mode not in MODES:
    raise ValueError(f"mtjax: imtl: mode must be one of {MODES}, got {mode!r}.")
  if mode == "gradient":

    def init_state(params):
      return IMTLState(weights=weighting.init_weights(num_tasks, dtype=weighting.params_dtype(params)))

    def weights_fn(inputs, state):
      return imtl_weights(inputs.grams[0]), state  # scale invariant: inputs.gram_log2_scale is not needed

    return weighting.gram_weighting(
      weights_fn,
      init_state,
      method="imtl",
      num_tasks=num_tasks,
      shared=shared,
      gram_leaves=gram_leaves,
      task_specific="sum" if task_specific is None else task_specific,
      rescale_gram=True,
    )

  if not isinstance(num_tasks, int) or isinstance(num_tasks, bool) or num_tasks < 1:
    raise ValueError(
      f"mtjax: imtl: mode={mode!r} needs num_tasks, a positive int, got {num_tasks!r} "
      "(under optax.inject_hyperparams pass static_args=('num_tasks',))."
    )
  if mode == "loss" and gram_leaves is not None:
    raise ValueError("mtjax: imtl: gram_leaves has no effect with mode='loss' (IMTL-L computes no Gram).")
  optimizer = loss_scale_optimizer if loss_scale_optimizer is not None else optax.adam(learning_rate)
  from mtjax.transforms._scale_invariant import positive_losses  # pylint: disable=import-outside-toplevel

  def init_loss_state(params):
    dtype = weighting.params_dtype(params)
    scales = jnp.full((num_tasks,), init_loss_scale, dtype)
    return IMTLLossState(
      loss_scales=scales, inner_opt_state=optimizer.init(scales), weights=jnp.ones((num_tasks,), dtype)
    )

  def loss_weights_fn(inputs, state):
    scales = state.loss_scales
    dtype = scales.dtype
    losses = positive_losses(
      inputs.task_losses.astype(dtype),
      "imtl",
      f"mode={mode!r}: the scale step e^s L - 1 has its fixed point at s = -log L",
    )
    factors = jnp.exp(scales)
    if mode == "hybrid":
      gram = inputs.grams[0].astype(dtype)
      weights = imtl_weights(factors[:, None] * gram * factors[None, :]).astype(dtype) * factors
    else:
      weights = factors
    grad = factors * losses - 1
    updates, inner_opt_state = optimizer.update(grad, state.inner_opt_state, scales)
    new_scales = optax.apply_updates(scales, updates).astype(dtype)
    return weights, IMTLLossState(loss_scales=new_scales, inner_opt_state=inner_opt_state, weights=state.weights)

  return weighting.gram_weighting(
    loss_weights_fn,
    init_loss_state,
    method="imtl",
    num_tasks=num_tasks,
    shared=shared,
    gram_leaves=gram_leaves if mode == "hybrid" else None,
    needs_gram=mode == "hybrid",
    requires_task_losses=True,
    task_specific="weighted" if task_specific is None else task_specific,
    rescale_gram=True,
  )
