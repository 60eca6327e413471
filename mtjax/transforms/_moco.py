"""MoCo: multi-objective gradient correction by gradient tracking (Fernando et al., ICLR 2023)."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mtjax._src import composition
from mtjax._src import numerics
from mtjax._src import rows as rows_lib
from mtjax._src import solvers
from mtjax._src import tree as tree_lib
from mtjax._src import weighting
from mtjax._src.sparse import densify
from mtjax._src.task_grads import materialize

NORMALIZATIONS = ("none", "loss")
SIMPLEX_MAPS = ("projection", "softmax")


class MoCoState(NamedTuple):
  """State of :func:`moco`.

  Attributes:
    count: number of updates so far (int32); step ``k = count + 1`` uses ``beta / k**beta_decay``
      and ``gamma / k**gamma_decay``.
    tracked: the tracked task gradients :math:`Y`, params-shaped leaves with a leading task axis
      ``[T, *param.shape]`` in the params' dtypes (zeros at ``init``): the method's memory cost, T
      copies of the parameters.
    weights: ``[T]`` the task weights :math:`\\lambda` on the simplex (uniform at ``init``), the
      ones used by the last update.
  """

  count: jax.Array
  tracked: Any
  weights: jax.Array


def moco(
  num_tasks: int,
  *,
  beta: jax.typing.ArrayLike = 0.5,
  gamma: jax.typing.ArrayLike = 0.1,
  rho: jax.typing.ArrayLike = 0.0,
  beta_decay: jax.typing.ArrayLike = 0.5,
  gamma_decay: jax.typing.ArrayLike = 0.5,
  normalization: str = "none",
  simplex: str = "projection",
  shared: tree_lib.SharedSpec = None,
  task_specific: str = "sum",
) -> optax.GradientTransformationExtraArgs:
  r"""MoCo: an MGDA-style direction on tracked task gradients, with a single-step weight update.

  Stochastic MGDA is biased: the min-norm weights of the noisy gradients are not those of the
  true ones. MoCo tracks every task's gradient with a moving average :math:`y_i` and takes
  :math:`\lambda` one projected gradient step on the regularized min-norm problem
  :math:`\min_{\lambda \in \Delta} \tfrac12 \|Y^\top\lambda\|^2 + \tfrac\rho2 \|\lambda\|^2` per
  update (no inner solver). At step :math:`k = 1, 2, \dots`, with the task gradients
  :math:`g_i`:

  .. math::
    y_i &\leftarrow y_i - \beta_k (y_i - h_i), \qquad h_i = g_i, \\
    \lambda &\leftarrow \Pi_\Delta\big(\lambda - \gamma_k (Y Y^\top + \rho I)\lambda\big), \\
    d &= Y^\top \lambda = \sum_i \lambda_i y_i,

  with :math:`\beta_k = \beta / k^{\text{beta\_decay}}`, :math:`\gamma_k = \gamma /
  k^{\text{gamma\_decay}}` (``*_decay = 0``: constant steps), :math:`y_i = 0` and
  :math:`\lambda = \mathbf 1/T` at ``init``, and :math:`\Pi_\Delta` the Euclidean projection on
  the simplex. The update is the tracked direction :math:`d`, not a combination of the raw
  gradients: :math:`Y` carries the previous steps' gradients. :math:`Y Y^\top` is the Gram matrix
  of the tracked gradients on the shared leaves, summed leaf by leaf (never concatenated).

  Paper and code variants (the paper by default):

  * ``normalization="loss"``: track :math:`h_i = L_i\, g_i / \|g_i\|` (norm over the shared
    leaves) instead of :math:`g_i`, as LibMTL's MoCo (from the authors' shared code) does; then
    the direction no longer depends on the gradients' scale, only on their directions and the
    losses (needs ``task_losses``). LibMTL divides by :math:`\|g_i\| + 10^{-8}`; here a zero
    gradient gives :math:`h_i = 0`.
  * ``simplex="softmax"``: :math:`\lambda \leftarrow \operatorname{softmax}(\lambda - \gamma_k
    (YY^\top + \rho I)\lambda)` (LibMTL) instead of the projection.
  * The step-size decay :math:`k^{-1/2}` and the defaults ``beta=0.5``, ``gamma=0.1``,
    ``rho=0`` are LibMTL's (from the authors' shared code; the authors' own repository uses the
    same decay form); ``beta_decay = gamma_decay = 0`` gives constant steps. The authors'
    repository takes :math:`\lambda` a step of :math:`2\gamma_k YY^\top\lambda` (the gradient of
    :math:`\|Y^\top\lambda\|^2`, no :math:`\rho`): the same as ``gamma`` doubled.

  Task-specific leaves (``shared=`` mask False) get the plain sum of the task gradients
  (``task_specific="sum"``, the contract) or the tracked direction :math:`\sum_i \lambda_i y_i`
  (``"weighted"``). The tracked gradients are kept for every leaf (state ``[T, *param.shape]``
  per leaf). Cost per step: the T task gradients (MoCo reads every row: with
  ``mtjax.task_grads(..., deferred=True)`` it materializes them), one ``[T, T]`` Gram of
  :math:`Y`, and state of T times the parameters. Sparse embedding rows are densified (``Y`` is
  dense).

  .. warning::
    Must be first in an ``optax.chain``: it consumes per-task gradients (every leaf
    ``[T, *param.shape]``, e.g. from :func:`mtjax.task_grads`) and emits params-shaped updates.
    Do not wrap it in ``optax.MultiSteps``.

  Examples:
    >>> import jax.numpy as jnp, optax, mtjax
    >>> params = {'w': jnp.zeros(3)}
    >>> task_grads = {'w': jnp.array([[-4., 1., 1.], [6., 1., 1.]])}
    >>> tx = optax.chain(mtjax.moco(num_tasks=2), optax.sgd(1.0))
    >>> state = tx.init(params)
    >>> updates, state = tx.update(task_grads, state, params)  # y = 0.5 g, one step on lambda
    >>> [round(x, 4) for x in (-updates['w']).tolist()]
    [-0.125, 0.5, 0.5]
    >>> [round(x, 4) for x in state[0].weights.tolist()]
    [0.625, 0.375]

  Args:
    num_tasks: number of tasks ``T`` (static; shapes the tracked gradients at ``init``).
    beta: tracking step :math:`\beta` (traceable).
    gamma: step :math:`\gamma` of the weights (traceable).
    rho: :math:`\ell_2` regularization :math:`\rho \ge 0` of the weights' problem (traceable).
    beta_decay: :math:`\beta_k = \beta / k^{\text{beta\_decay}}` (traceable; ``0``: constant).
    gamma_decay: :math:`\gamma_k = \gamma / k^{\text{gamma\_decay}}` (traceable; ``0``: constant).
    normalization: ``"none"`` (the paper: track the raw gradients) or ``"loss"`` (LibMTL:
      :math:`L_i g_i / \|g_i\|`; needs ``task_losses``).
    simplex: ``"projection"`` (the paper) or ``"softmax"`` (LibMTL).
    shared: shared-parameter mask (see :func:`mtjax.shared_mask`); the Gram of :math:`Y` and the
      norms of ``normalization="loss"`` come from the shared leaves only.
    task_specific: ``"sum"`` (plain sum of the task gradients on task-specific leaves) or
      ``"weighted"`` (the tracked direction there too).

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with state :class:`MoCoState`.

  References:
    Fernando, Shen, Liu, Chaudhury, Murugesan and Chen, *Mitigating Gradient Bias in
    Multi-objective Learning: A Provably Convergent Approach*, ICLR 2023.
    https://arxiv.org/abs/2210.12624
  """
  method = "moco"
  if not isinstance(num_tasks, (int, np.integer)) or isinstance(num_tasks, bool) or num_tasks < 1:
    raise ValueError(
      f"mtjax: {method}: num_tasks must be a positive int (it shapes the tracked gradients "
      f"[T, *param.shape] at init), got {num_tasks!r}."
    )
  num_tasks = int(num_tasks)
  if normalization not in NORMALIZATIONS:
    raise ValueError(f"mtjax: {method}: normalization must be one of {NORMALIZATIONS}, got {normalization!r}.")
  if simplex not in SIMPLEX_MAPS:
    raise ValueError(f"mtjax: {method}: simplex must be one of {SIMPLEX_MAPS}, got {simplex!r}.")
  if task_specific not in ("sum", "weighted"):
    raise ValueError(f"mtjax: {method}: task_specific must be 'sum' or 'weighted', got {task_specific!r}.")
  for name, value in (
    ("beta", beta),
    ("gamma", gamma),
    ("rho", rho),
    ("beta_decay", beta_decay),
    ("gamma_decay", gamma_decay),
  ):
    concrete = numerics._is_concrete(value)  # pylint: disable=protected-access
    if concrete and not np.all(np.asarray(value, np.float64) >= 0):
      raise ValueError(f"mtjax: {method}: {name} must be non-negative, got {value!r}.")

  def init_fn(params):
    composition.check_not_wrapped("moco")  # optax.MultiSteps / masked / apply_if_finite around it
    dtype = weighting.params_dtype(params)
    tracked = jax.tree.map(lambda p: jnp.zeros((num_tasks,) + jnp.shape(p), jnp.result_type(p)), params)
    return MoCoState(
      count=jnp.zeros((), jnp.int32), tracked=tracked, weights=jnp.full((num_tasks,), 1.0 / num_tasks, dtype)
    )

  def update_fn(updates, state, params=None, *, task_losses=None, **extra_args):
    del extra_args
    updates = densify(materialize(updates))  # MoCo tracks every task's full gradient
    updates = rows_lib.upcast_rows(updates, params)  # mixed precision: the tracked gradients stay float32
    t = tree_lib.check_task_axis(updates, num_tasks, name=f"the task gradients given to {method}")
    tree_lib.check_params_match(updates, params)
    losses, losses_check = weighting.check_task_losses(
      task_losses, t, required=normalization == "loss", method=method, check_finite=True
    )
    mask = tree_lib.resolve_shared(shared, updates, params)
    if not any(mask):
      raise ValueError(f"mtjax: {method}: the shared= mask marks no leaf as shared; nothing to weight.")
    leaves, treedef = rows_lib.flatten(updates)
    tracked = treedef.flatten_up_to(state.tracked)
    acc = numerics.gram_dtype(jnp.result_type(*leaves))
    wdtype = state.weights.dtype

    # Finiteness of the task gradients (one reduction per leaf) and their shared squared norms.
    bad = jnp.any(jnp.stack([jnp.any(~jnp.isfinite(leaf)) for leaf in leaves]))
    grads_check = numerics.condition_check(
      bad,
      f"mtjax: non-finite task gradients given to {method} (NaN/inf in a task gradient). Check the loss "
      "for NaN/inf (log of 0, division by zero, exploding logits).",
    )
    if normalization == "loss":
      sq = sum(jnp.sum(jnp.square(leaf.astype(acc)).reshape(t, -1), axis=1) for leaf, m in zip(leaves, mask) if m)
      scale = numerics.safe_div(losses.astype(acc), jnp.sqrt(sq))  # L_i / |g_i|, 0 for a zero gradient
    else:
      scale = None

    count = optax.safe_increment(state.count)
    k = count.astype(acc)
    beta_k = jnp.asarray(beta, acc) / k ** jnp.asarray(beta_decay, acc)
    gamma_k = jnp.asarray(gamma, acc) / k ** jnp.asarray(gamma_decay, acc)

    def expand(v, leaf):
      return jnp.reshape(v, (-1,) + (1,) * (leaf.ndim - 1))

    new_tracked = []
    for leaf, y in zip(leaves, tracked):
      h = leaf.astype(acc)
      if scale is not None:
        h = h * expand(scale, h)
      y = y.astype(acc)
      new_tracked.append((y - beta_k * (y - h)).astype(jnp.result_type(leaf)))
    gram = sum(numerics.leaf_gram(y).astype(acc) for y, m in zip(new_tracked, mask) if m)
    gram = jnp.where(jnp.isfinite(gram), gram, jnp.zeros_like(gram))  # non-finite rows: the check raises
    lam = state.weights.astype(acc)
    step = lam - gamma_k * (jnp.matmul(gram, lam, precision=numerics.HIGHEST) + jnp.asarray(rho, acc) * lam)
    lam = solvers.project_simplex(step) if simplex == "projection" else jax.nn.softmax(step)
    lam = numerics.enforce(lam, losses_check, grads_check)

    out = []
    for leaf, y, m in zip(leaves, new_tracked, mask):
      if m or task_specific == "weighted":
        out.append(numerics.weighted_task_sum(lam, y))
      else:
        out.append(jnp.sum(leaf, axis=0))  # the plain sum (the contract)
    new_state = MoCoState(count=count, tracked=jax.tree.unflatten(treedef, new_tracked), weights=lam.astype(wdtype))
    return jax.tree.unflatten(treedef, out), new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
