"""Amortized weights: recompute a Gram-based method's task weights every ``k`` steps, reuse them in between."""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mtjax._src import numerics
from mtjax._src import weighting
from mtjax._src.task_grads import TaskJacobian


class AmortizedState(NamedTuple):
  """State of :func:`amortized`.

  Attributes:
    count: steps taken (int32).
    weights: the task weights in use (``[T]`` or ``[K, T]``; the EMA with ``ema``), for logging.
    inner_state: the wrapped method's state (it changes only on refresh steps).
  """

  count: jax.Array
  weights: jax.Array
  inner_state: Any


def _inner_weights(state) -> Optional[jax.Array]:
  w = getattr(state, "weights", None)
  if w is None or np.size(w) == 0:
    return None
  return w


def amortized(
  method: optax.GradientTransformationExtraArgs,
  every: int = 1,
  *,
  ema: Optional[float] = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Recomputes a Gram-based method's task weights every ``every`` steps and reuses them in between.

  On a refresh step (``count % every == 0``) the wrapped method runs as usual: it reads the
  per-task gradients, solves for its weights :math:`w` and updates its state. On the other steps
  the update is :math:`\sum_t w_t g_t` with the stored weights (the plain sum, or the weighted
  sum, on task-specific leaves, as the method does), which from a deferred Jacobian
  (``mtjax.task_grads(..., deferred=True)``) is ONE backward pass: averaged over ``k`` steps the
  cost is about ``(C_method + (k - 1) C_single) / k``.

  With ``ema = beta`` the weights in use are an exponential moving average of the method's,
  :math:`\bar w \leftarrow \beta \bar w + (1 - \beta) w` at every refresh (the first one takes
  :math:`w`), and the update uses :math:`\bar w`: with ``every=1`` and MGDA this is CR-MOGM
  (Zhou et al., 2022), which smooths the stochastic min-norm weights for convergence.

  ``every=1`` without ``ema`` is exactly the wrapped method. The wrapped method's state advances
  only on refresh steps (GradVac's targets, PCGrad's PRNG key, DWA's loss history).

  .. warning::
    Must be first in an ``optax.chain``, like the method it wraps, which must be a Gram-based
    mtjax method (built on :func:`mtjax.gram_weighting`, e.g. ``pcgrad``, ``mgda``, ``upgrad``)
    built with ``num_tasks`` so that its state records its weights.

  Examples:
    >>> import jax.numpy as jnp, optax, mtjax
    >>> params = {'w': jnp.zeros(3)}
    >>> g = {'w': jnp.array([[-4., 1., 1.], [6., 1., 1.]])}
    >>> tx = optax.chain(mtjax.amortized(mtjax.mgda(num_tasks=2), every=4), optax.sgd(1.0))
    >>> state = tx.init(params)
    >>> for _ in range(2):
    ...   updates, state = tx.update(g, state, params)
    >>> [round(float(w), 4) for w in state[0].weights]  # MGDA's, solved at step 0 and reused at step 1
    [0.6, 0.4]

  Args:
    method: the Gram-based mtjax transform to amortize.
    every: ``k``, steps between weight refreshes (static, ``>= 1``).
    ema: ``beta`` in ``[0, 1)`` for an EMA of the weights, or ``None``.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with state :class:`AmortizedState`.

  References:
    Zhou, Zhang, Jiang, Li, Chen, Chen, *On the Convergence of Stochastic Multi-Objective Gradient
    Manipulation and Beyond*, NeurIPS 2022 (CR-MOGM).
  """
  every = weighting.static_int(every, "every", "amortized")
  if every < 1:
    raise ValueError(f"mtjax: amortized: every must be >= 1, got {every}.")
  if ema is not None:
    if not numerics._is_concrete(ema) or not 0.0 <= float(ema) < 1.0:  # pylint: disable=protected-access
      raise ValueError(f"mtjax: amortized: ema must be a number in [0, 1) or None, got {ema!r}.")
  if not getattr(method.update, weighting.CORE_MARK, False):
    raise ValueError(
      "mtjax: amortized wraps a Gram-based mtjax method (pcgrad, mgda, upgrad, ... built on "
      "mtjax.gram_weighting); GradDrop and plain optax transforms have no task weights to reuse."
    )

  def init_fn(params):
    inner = method.init(params)
    w = _inner_weights(inner)
    if w is None:
      raise ValueError(
        "mtjax: amortized: build the wrapped method with num_tasks=T so that its state records its task weights."
      )
    return AmortizedState(count=jnp.zeros((), jnp.int32), weights=jnp.array(w, jnp.float32), inner_state=inner)

  def update_fn(updates, state, params=None, *, task_losses=None, **extra_args):
    extra_args.pop(weighting.FIXED_WEIGHTS, None)
    dtype = state.weights.dtype

    def fixed(grads, inner_state, w):
      if w.ndim == 2 and w.shape[0] == 1:  # a one-group record (GradVac's [1, T]): the [T] weights it applied
        w = w[0]
      return method.update(
        grads, inner_state, params, task_losses=task_losses, **{weighting.FIXED_WEIGHTS: w}, **extra_args
      )[0]

    def refresh(_):
      grads = updates
      if ema is not None and isinstance(grads, TaskJacobian):  # the rows serve both calls below
        grads = grads.materialize()
      upd, inner = method.update(grads, state.inner_state, params, task_losses=task_losses, **extra_args)
      w = jnp.asarray(_inner_weights(inner), dtype)
      if ema is not None:
        w = jnp.where(state.count == 0, w, ema * state.weights + (1.0 - ema) * w)
        upd = fixed(grads, inner, w)
      return upd, inner, w

    def reuse(_):
      return fixed(updates, state.inner_state, state.weights), state.inner_state, state.weights

    if every == 1:
      upd, inner, w = refresh(None)
    else:
      upd, inner, w = jax.lax.cond(state.count % every == 0, refresh, reuse, None)
    return upd, AmortizedState(count=state.count + 1, weights=w, inner_state=inner)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
