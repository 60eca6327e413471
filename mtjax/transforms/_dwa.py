"""Dynamic Weight Average (DWA): task weights from the rate of change of the epoch losses."""

from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mtjax._src import numerics
from mtjax._src import tree as tree_lib
from mtjax._src import weighting

MODES = ("epoch", "step", "window")


class DWAState(NamedTuple):
  """State of :func:`dwa`.

  Attributes:
    count: number of updates so far (int32); the block (epoch) index is ``count // block``.
    loss_sum: ``[T]`` sum of the task losses seen so far in the current block, each divided by the
      block length (so it is the block's average when the block closes, and never overflows).
    epoch_means: ``[2, T]`` average losses of the last two completed blocks, oldest first:
      ``[Lbar(e-2), Lbar(e-1)]`` for the current block ``e``.
    weights: ``[T]`` the task weights used by the last update.
  """

  count: jax.Array
  loss_sum: jax.Array
  epoch_means: jax.Array
  weights: jax.Array


def dwa_weights(epoch_means: jax.Array, temperature, block_index: jax.Array) -> jax.Array:
  r"""DWA's weights for the current block from the averages of the previous two blocks.

  :math:`\lambda = T \operatorname{softmax}(r / \text{temperature})` with :math:`r_k =
  \bar L_k(e-1) / \bar L_k(e-2)` (:math:`r_k = 1` where :math:`\bar L_k(e-2) = 0`), and
  :math:`\lambda = \mathbf{1}` while ``block_index < 2``. A ratio that overflows the dtype (losses
  jumping by many orders of magnitude) is clipped to the dtype's largest value before the softmax.

  Args:
    epoch_means: ``[2, T]`` ``[Lbar(e-2), Lbar(e-1)]``.
    temperature: the softmax temperature (traceable).
    block_index: the current block (epoch) index ``e`` (traced int).

  Returns:
    ``[T]`` weights in the dtype of ``epoch_means``.
  """
  older, newer = epoch_means[0], epoch_means[1]
  num_tasks = older.shape[0]
  nonzero = older != 0
  rates = jnp.where(nonzero, newer / jnp.where(nonzero, older, 1), 1)
  # A ratio (or ratio / temperature) beyond the dtype's range is clipped to its largest finite value:
  # softmax subtracts the largest logit, so such a task gets (nearly) all the weight, never NaN.
  big = jnp.finfo(rates.dtype).max
  logits = jnp.minimum(rates / jnp.asarray(temperature, rates.dtype), big)
  lam = num_tasks * jax.nn.softmax(logits)
  return jnp.where(block_index >= 2, lam, jnp.ones_like(lam)).astype(epoch_means.dtype)


def dwa(
  *,
  num_tasks: int,
  temperature: float = 2.0,
  steps_per_epoch: Optional[int] = None,
  mode: str = "epoch",
  window: Optional[int] = None,
  shared: tree_lib.SharedSpec = None,
  task_specific: str = "weighted",
) -> optax.GradientTransformationExtraArgs:
  r"""Dynamic Weight Average: weight each task by how slowly its loss has been falling.

  .. math::
    \lambda_k(e) = T \,\frac{\exp(r_k(e-1) / \tau)}{\sum_j \exp(r_j(e-1) / \tau)}, \qquad
    r_k(e-1) = \frac{\bar L_k(e-1)}{\bar L_k(e-2)}, \qquad d = \sum_k \lambda_k g_k,

  where :math:`\bar L_k(e)` is task :math:`k`'s average training loss over epoch :math:`e`
  (accumulated in the state from the ``task_losses`` of every update) and :math:`\tau` the
  temperature. :math:`\lambda = \mathbf{1}` during the first two epochs. A zero
  :math:`\bar L_k(e-2)` gives :math:`r_k = 1` (no information about the rate). Epoch boundaries
  come from the step counter in the state (an epoch is ``steps_per_epoch`` consecutive
  updates); everything stays on device. Task losses must be nonnegative (a ``ValueError``, under
  ``jit`` a runtime error, otherwise): for negative losses the ratio does not measure descent.
  Ratios beyond the dtype's range are clipped (the task gets nearly all the weight), never NaN.

  Variants (``mode``): ``"epoch"`` (the paper), ``"window"`` (epochs replaced by consecutive
  blocks of ``window`` updates, so the weights change every ``window`` steps) and ``"step"``
  (blocks of one update: :math:`r_k = L_k(t-1) / L_k(t-2)`).

  .. warning::
    Must be first in an ``optax.chain``: it consumes per-task gradients (every leaf
    ``[T, *param.shape]``, e.g. from :func:`mtjax.task_grads`) and emits params-shaped updates.
    Needs ``task_losses=`` in every ``update``. Do not wrap it in ``optax.MultiSteps``.
    Under ``optax.inject_hyperparams`` pass
    ``static_args=("num_tasks", "steps_per_epoch", "window")``, plus ``"shared"`` when it is a
    callable (optax would take it for a schedule).

  Examples:
    >>> import jax.numpy as jnp, optax, mtjax
    >>> params = {'w': jnp.zeros(2)}
    >>> task_grads = {'w': jnp.array([[1., 0.], [0., 1.]])}
    >>> tx = mtjax.dwa(num_tasks=2, steps_per_epoch=1)
    >>> state = tx.init(params)
    >>> for losses in ([1., 1.], [1., 0.5], [1., 0.5]):
    ...   updates, state = tx.update(task_grads, state, params, task_losses=jnp.array(losses))
    >>> jnp.round(updates['w'], 4)  # epoch 2: r = [1, 0.5], lambda = 2 softmax(r / 2)
    Array([1.1244, 0.8756], dtype=float32)

  Args:
    num_tasks: number of tasks ``T`` (static).
    temperature: the softmax temperature :math:`\tau` (traceable; 2 in the paper).
    steps_per_epoch: updates per epoch (required for ``mode="epoch"``).
    mode: ``"epoch"``, ``"window"`` or ``"step"`` (see above).
    window: block length for ``mode="window"``.
    shared: shared-parameter mask (see :func:`mtjax.shared_mask`).
    task_specific: ``"weighted"`` (default: task-specific leaves are scaled by :math:`\lambda` too,
      so the update is the exact gradient of :math:`\sum_k \lambda_k L_k` as in the paper) or
      ``"sum"``.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with state :class:`DWAState`.

  References:
    Liu, Johns, Davison, *End-to-End Multi-Task Learning with Attention*, CVPR 2019.
    https://arxiv.org/abs/1803.10704
  """
  if not isinstance(num_tasks, int) or isinstance(num_tasks, bool) or num_tasks < 1:
    raise ValueError(
      f"mtjax: dwa: num_tasks must be a positive int, got {num_tasks!r} (under "
      "optax.inject_hyperparams pass static_args=('num_tasks', 'steps_per_epoch', 'window'))."
    )
  if mode not in MODES:
    raise ValueError(f"mtjax: dwa: mode must be one of {MODES}, got {mode!r}.")
  if mode == "epoch":
    if not isinstance(steps_per_epoch, int) or steps_per_epoch < 1:
      raise ValueError(
        "mtjax: dwa: mode='epoch' needs steps_per_epoch, a positive int (got "
        f"{steps_per_epoch!r}); or use mode='step' / mode='window'."
      )
    block = steps_per_epoch
  elif mode == "window":
    if not isinstance(window, int) or window < 1:
      raise ValueError(f"mtjax: dwa: mode='window' needs window, a positive int (got {window!r}).")
    block = window
  else:
    block = 1

  def init_state(params):
    dtype = numerics.gram_dtype(jnp.result_type(*jax.tree.leaves(params)))
    return DWAState(
      count=jnp.zeros((), jnp.int32),
      loss_sum=jnp.zeros((num_tasks,), dtype),
      epoch_means=jnp.ones((2, num_tasks), dtype),
      weights=jnp.ones((num_tasks,), dtype),
    )

  def weights_fn(inputs, state):
    dtype = state.loss_sum.dtype
    losses = inputs.task_losses.astype(dtype)
    losses = numerics.enforce(
      losses,
      numerics.condition_check(
        jnp.any(losses < 0),
        lambda v: (
          f"mtjax: dwa: task losses must be nonnegative, got {np.asarray(v).tolist()} (DWA weights a task "
          "by the ratio of its recent average losses, which only measures the rate of descent for "
          "positive losses); shift or reformulate negative losses."
        ),
        losses,
      ),
    )
    count = state.count
    weights = dwa_weights(state.epoch_means, temperature, count // block)
    loss_sum = state.loss_sum + losses / block  # divided first: a sum of finite losses cannot overflow
    block_done = (count % block) == block - 1
    closed = jnp.stack([state.epoch_means[1], loss_sum])
    epoch_means = jnp.where(block_done, closed, state.epoch_means)
    loss_sum = jnp.where(block_done, jnp.zeros_like(loss_sum), loss_sum)
    new_state = DWAState(
      count=optax.safe_increment(count), loss_sum=loss_sum, epoch_means=epoch_means, weights=state.weights
    )
    return weights, new_state

  return weighting.gram_weighting(
    weights_fn,
    init_state,
    method="dwa",
    num_tasks=num_tasks,
    shared=shared,
    needs_gram=False,
    requires_task_losses=True,
    task_specific=task_specific,
  )
