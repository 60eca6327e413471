"""RLW: random loss weighting (Lin et al., TMLR 2022)."""

from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from mtjax._src import tree as tree_lib
from mtjax._src import weighting
from mtjax.transforms._pcgrad import seed_key

SUM_TO = ("one", "num_tasks")


class RLWState(NamedTuple):
  """State of :func:`rlw`.

  Attributes:
    key: the PRNG key for the next step's weights.
    weights: the task weights ``[T]`` of the last step (empty when ``num_tasks`` is not given).
  """

  key: jax.Array
  weights: jax.Array


def draw_weights(key: jax.Array, num_tasks: int, sum_to: str = "one") -> tuple[jax.Array, jax.Array]:
  """Splits a state key and draws one step's RLW weights ``softmax(z)``, ``z ~ N(0, I)`` (float32).

  Returns ``(next_key, weights)``; exposed so that tests can replay the draws.
  """
  next_key, sub = jax.random.split(key)
  weights = jax.nn.softmax(jax.random.normal(sub, (num_tasks,), jnp.float32))
  if sum_to == "num_tasks":
    weights = weights * num_tasks
  return next_key, weights


def rlw(
  key: int | jax.Array = 0,
  *,
  num_tasks: Optional[int] = None,
  sum_to: str = "one",
  shared: tree_lib.SharedSpec = None,
  task_specific: str = "weighted",
) -> optax.GradientTransformationExtraArgs:
  r"""RLW: a fresh random weighting of the task losses at every step.

  .. math::
    d = \sum_{t=1}^T \lambda_t \, g_t, \qquad \lambda = \operatorname{softmax}(z), \quad
    z \sim \mathcal N(0, I_T) \text{ drawn afresh at every step},

  i.e. the gradient of the randomly weighted loss :math:`\sum_t \lambda_t L_t` (the paper's
  RLW with the normal distribution, its default). ``sum_to="num_tasks"`` multiplies the weights
  by :math:`T` (so they average to 1, the scale of the plain loss sum). The draws are in float32
  whatever the gradients' dtype (the same key gives the same weights in float32 and float64);
  the key lives in the state and is split at every update (the ``optax.add_noise`` pattern), so
  runs are reproducible and checkpointable. Since RLW weights the losses, the task-specific
  leaves get the weighted sum by default (``task_specific="weighted"``), which makes the update
  exactly the gradient of the weighted loss.

  .. warning::
    Must be first in an ``optax.chain``: it consumes per-task gradients (every leaf
    ``[T, *param.shape]``, e.g. from :func:`mtjax.task_grads`) and emits params-shaped updates.
    Do not wrap it in ``optax.MultiSteps``. Per-task gradients are not needed for RLW itself
    (one backward of the weighted loss gives the same update); the transform runs it through the
    same pipeline as every method.

  Examples:
    >>> import jax.numpy as jnp, optax, mtjax
    >>> params = {'w': jnp.zeros(3)}
    >>> task_grads = {'w': jnp.array([[-4., 1., 1.], [6., 1., 1.]])}
    >>> tx = optax.chain(mtjax.rlw(key=0, num_tasks=2), optax.sgd(1.0))
    >>> state = tx.init(params)
    >>> updates, state = tx.update(task_grads, state, params)
    >>> weights = state[0].weights
    >>> bool(jnp.all(weights > 0)), round(float(weights.sum()), 4)
    (True, 1.0)

  Args:
    key: PRNG seed (int) or key for the weights.
    num_tasks: number of tasks ``T`` (checked against the gradients; when given, the state
      records the weights of every step in ``weights``).
    sum_to: ``"one"`` (default, the paper's softmax) or ``"num_tasks"`` (weights summing to
      :math:`T`).
    shared: shared-parameter mask (see :func:`mtjax.shared_mask`).
    task_specific: ``"weighted"`` (default: the exact gradient of the weighted loss) or ``"sum"``.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with state :class:`RLWState`.

  References:
    Lin, Ye, Xu, Shi and Zhang, *Reasonable Effectiveness of Random Weighting: A Litmus Test for
    Multi-Task Learning*, TMLR 2022. https://arxiv.org/abs/2111.10603
  """
  if sum_to not in SUM_TO:
    raise ValueError(f"mtjax: rlw: sum_to must be one of {SUM_TO}, got {sum_to!r}.")

  def init_state(params):
    del params
    return RLWState(key=seed_key(key), weights=weighting.init_weights(num_tasks))

  def weights_fn(inputs, state):
    next_key, weights = draw_weights(state.key, inputs.num_tasks, sum_to)
    return weights, state._replace(key=next_key)

  return weighting.gram_weighting(
    weights_fn,
    init_state,
    method="rlw",
    num_tasks=num_tasks,
    shared=shared,
    needs_gram=False,
    task_specific=task_specific,
  )
