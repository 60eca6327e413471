"""Generic multi-task losses (BCE, MSE, RankNet), masked per-task means and ``make_loss_fn``.

Everything here is jit-safe and returns finite values and finite gradients for finite inputs,
including the degenerate batches of multi-task recommendation (a task with no valid sample, a
group with no ordered pair).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from mtjax._src import numerics

PyTree = Any
# A per-task loss: a built-in name or ``fn(outputs [B], labels [B], mask [B]) -> scalar``.
LossSpec = Union[str, Callable[[jax.Array, jax.Array, jax.Array], jax.Array]]
BUILTIN_LOSSES = ("bce", "mse", "ranknet")


def _safe_ratio(num: jax.Array, den: jax.Array) -> jax.Array:
  """``num / den`` where ``den > 0`` and ``0`` elsewhere; zero, finite gradient in the ``0`` case."""
  positive = den > 0
  return jnp.where(positive, num / jnp.where(positive, den, jnp.ones_like(den)), jnp.zeros_like(num))


def bce_with_logits(logits: jax.Array, labels: jax.Array) -> jax.Array:
  r"""Per-sample binary cross-entropy computed from logits (elementwise, no reduction).

  .. math::
    \ell(x, y) = -y \log \sigma(x) - (1 - y) \log(1 - \sigma(x))
               = y\,\mathrm{softplus}(-x) + (1 - y)\,\mathrm{softplus}(x),

  with the stable ``softplus(z) = log(1 + e^z)``. Each term is evaluated without cancellation,
  so the loss keeps its relative accuracy for logits of any size (``x = 50, y = 1`` gives
  ``~2e-22``, not ``0`` or ``inf``) and the gradient is exactly :math:`\sigma(x) - y`.
  Soft labels in ``[0, 1]`` are allowed.

  Examples:
    >>> import jax.numpy as jnp
    >>> from mtjax import losses
    >>> losses.bce_with_logits(jnp.array([0.0, 50.0, -50.0]), jnp.array([1.0, 0.0, 0.0]))
    Array([6.9314718e-01, 5.0000000e+01, 1.9287499e-22], dtype=float32)

  Args:
    logits: predicted logits, any shape.
    labels: targets in ``[0, 1]`` (bool/int/float), same shape as ``logits``.

  Returns:
    The per-sample losses, shape and (floating) dtype of ``logits``.

  Raises:
    ValueError: a label outside ``[0, 1]`` (e.g. ``-1/+1`` labels) or NaN; under ``jit`` it surfaces
      as a runtime error with the same message (one on-device test, see ``mtjax._src.numerics.enforce``).
      :func:`per_task_loss` zeroes the labels of masked samples first, so masked ``-1`` markers are fine there.
  """
  logits = jnp.asarray(logits)
  if not jnp.issubdtype(logits.dtype, jnp.floating):
    logits = logits.astype(jnp.float32)
  labels = jnp.asarray(labels).astype(logits.dtype)
  _check_same_shape(logits, labels, "bce_with_logits", "logits", "labels")
  losses = labels * jax.nn.softplus(-logits) + (1 - labels) * jax.nn.softplus(logits)
  return numerics.enforce(losses, _binary_labels_check(labels, "bce_with_logits"))


def _binary_labels_check(labels: jax.Array, where: str):
  """A check that every label lies in ``[0, 1]`` (NaN fails too); raises at once on concrete labels.

  Under ``jit`` it is one on-device test (``numerics.enforce``); the host is called only when it fails.
  """
  bad = ~((labels >= 0) & (labels <= 1))

  def message(values):
    values = np.asarray(values)
    wrong = values[~((values >= 0) & (values <= 1))] if values is not None and values.ndim else values
    shown = np.unique(wrong)[:5].tolist() if wrong is not None else "?"
    return (
      f"mtjax: {where}: binary labels must lie in [0, 1] (0/1 or soft labels), got values such as {shown}. "
      "Map -1/+1 labels to 0/1 with (y + 1) / 2; mask missing labels instead of marking them with -1."
    )

  return numerics.condition_check(jnp.any(bad), message, labels)


def mse(predictions: jax.Array, targets: jax.Array) -> jax.Array:
  r"""Per-sample squared error :math:`(\hat y - y)^2` (elementwise, no reduction).

  Examples:
    >>> import jax.numpy as jnp
    >>> from mtjax import losses
    >>> losses.mse(jnp.array([1.0, 2.0]), jnp.array([0.0, 4.0]))
    Array([1., 4.], dtype=float32)

  Args:
    predictions: raw predictions, any shape.
    targets: targets, same shape.

  Returns:
    The per-sample squared errors.
  """
  predictions = jnp.asarray(predictions)
  if not jnp.issubdtype(predictions.dtype, jnp.floating):
    predictions = predictions.astype(jnp.float32)
  targets = jnp.asarray(targets).astype(predictions.dtype)
  _check_same_shape(predictions, targets, "mse", "predictions", "targets")
  return jnp.square(predictions - targets)


def masked_mean(values: jax.Array, mask: Optional[jax.Array] = None, axis=None) -> jax.Array:
  r"""Mean of ``values`` over the valid entries of ``mask``; ``0`` when there is none.

  .. math::
    \bar\ell = \frac{\sum_i d_i \ell_i}{\sum_i d_i}, \qquad
    \bar\ell = 0 \text{ when } \sum_i d_i = 0,

  where :math:`d_i` is the mask (bool, or non-negative float weights). This is the per-task loss
  of PLE's joint loss (:math:`d_{ki} = 1` when sample i is in task k's sample space), e.g. CVR
  averaged over clicked samples only.

  Empty mask: when a task has no valid sample in the batch the result is exactly ``0`` and its
  gradient is exactly ``0`` (never NaN, no division by zero), so the task contributes nothing to
  that step. Masked-out entries never leak into the value or the gradient through this function
  (a double ``where``), but a NaN created *upstream* by a masked sample (e.g. ``log(0)`` on a
  garbage label) can still poison the backward pass: compute ``values`` with stable losses such
  as :func:`bce_with_logits`, or sanitize the inputs of masked samples first, as
  :func:`per_task_loss` does for labels.

  Examples:
    >>> import jax.numpy as jnp
    >>> from mtjax import losses
    >>> values = jnp.array([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    >>> mask = jnp.array([[True, False, True], [False, False, False]])
    >>> losses.masked_mean(values, mask, axis=-1)
    Array([2., 0.], dtype=float32)

  Args:
    values: per-sample values.
    mask: bool or float weights with the same shape as ``values``; ``None`` = plain mean.
    axis: axis or axes to reduce (``None``: all).

  Returns:
    ``values`` reduced over ``axis``.
  """
  values = jnp.asarray(values)
  if mask is None:
    return jnp.mean(values, axis=axis)
  mask = jnp.asarray(mask)
  _check_same_shape(values, mask, "masked_mean", "values", "mask")
  weights = mask.astype(values.dtype)
  num = jnp.sum(jnp.where(mask != 0, values * weights, jnp.zeros_like(values)), axis=axis)
  den = jnp.sum(weights, axis=axis)
  return _safe_ratio(num, den)


def ranknet(
  scores: jax.Array,
  labels: jax.Array,
  groups: Optional[jax.Array] = None,
  mask: Optional[jax.Array] = None,
) -> jax.Array:
  r"""RankNet pairwise logistic loss over the in-batch pairs (optionally within groups).

  .. math::
    L = \frac{1}{|P|} \sum_{(i, j) \in P} \log\bigl(1 + e^{-(s_i - s_j)}\bigr), \qquad
    P = \{(i, j) : y_i > y_j,\ g_i = g_j,\ d_i d_j \ne 0\},

  i.e. every ordered pair of the batch whose first element has the larger label (graded labels
  are fine), restricted to the same group ``g`` (user or session id) when ``groups`` is given
  and to valid samples when ``mask`` is given (a float mask weights pair ``(i, j)`` by
  :math:`d_i d_j`). Pairs with equal labels give no signal and are not formed. The softplus is
  evaluated stably. With no pair in the batch the loss is ``0`` with a zero gradient.

  Cost is ``O(B^2)`` time and memory (all pairs of the batch).

  Examples:
    >>> import jax.numpy as jnp
    >>> from mtjax import losses
    >>> scores = jnp.array([2.0, 0.0, 1.0, 0.0])
    >>> labels = jnp.array([1.0, 0.0, 0.0, 1.0])
    >>> # pairs (0, 1) and (3, 2): (softplus(-2) + softplus(1)) / 2
    >>> round(float(losses.ranknet(scores, labels, groups=jnp.array([0, 0, 1, 1]))), 4)
    0.7201

  Args:
    scores: ``[B]`` predicted scores (logits).
    labels: ``[B]`` relevance labels (binary or graded).
    groups: optional ``[B]`` integer group ids; pairs are formed only inside a group.
    mask: optional ``[B]`` bool or float validity weights.

  Returns:
    The scalar loss averaged over the pairs.

  References:
    Burges, Shaked, Renshaw, Lazier, Deeds, Hamilton, Hullender, *Learning to Rank using
    Gradient Descent*, ICML 2005.
  """
  scores = jnp.asarray(scores)
  if not jnp.issubdtype(scores.dtype, jnp.floating):
    scores = scores.astype(jnp.float32)
  labels = jnp.asarray(labels)
  if scores.ndim != 1:
    raise ValueError(f"mtjax: ranknet: scores must be a vector [B], got shape {scores.shape}.")
  _check_same_shape(scores, labels, "ranknet", "scores", "labels")
  pair = labels[:, None] > labels[None, :]
  if groups is not None:
    groups = jnp.asarray(groups)
    _check_same_shape(scores, groups, "ranknet", "scores", "groups")
    pair = pair & (groups[:, None] == groups[None, :])
  weights = pair.astype(scores.dtype)
  if mask is not None:
    mask = jnp.asarray(mask)
    _check_same_shape(scores, mask, "ranknet", "scores", "mask")
    m = mask.astype(scores.dtype)
    weights = weights * (m[:, None] * m[None, :])
  return _pairwise_logistic(scores, weights)


def _pairwise_logistic(scores: jax.Array, weights: jax.Array) -> jax.Array:
  """``sum_ij w_ij softplus(-(s_i - s_j)) / sum_ij w_ij`` (0 with a zero gradient without pairs)."""
  pair_loss = jax.nn.softplus(-(scores[:, None] - scores[None, :]))
  num = jnp.sum(jnp.where(weights != 0, pair_loss * weights, jnp.zeros_like(pair_loss)))
  return _safe_ratio(num, jnp.sum(weights))


def multi_behavior_bpr(
  outputs: jax.Array,
  labels: jax.Array,
  mask: Optional[jax.Array] = None,
  *,
  groups: Optional[jax.Array] = None,
  graded: bool = True,
) -> jax.Array:
  r"""Pairwise (BPR) losses for cascaded behaviours: a stronger behaviour ranks above a weaker one.

  ``labels`` are ``T`` binary behaviours ordered from weak to strong (view, click, cart, buy); a
  sample's *level* is its strongest behaviour, :math:`\ell_i = \max\{t + 1 : y_{ti} = 1\}` (0 for
  none). Task ``t``'s score is trained on the pairs of the same group (user) where the first sample
  has behaviour ``t`` and the second a weaker level,

  .. math::
    L_t = \frac{1}{|P_t|} \sum_{(i, j) \in P_t} \log\bigl(1 + e^{-(s_{ti} - s_{tj})}\bigr), \qquad
    P_t = \{(i, j) : g_i = g_j,\ \ell_i \ge t + 1,\ \ell_i > \ell_j,\ d_{ti} d_{tj} \ne 0\},

  so a sample bought ranks above one only carted on every score up to "buy" (``graded=True``, the
  multi-behaviour order of NMTR); ``graded=False`` keeps only the pairs :math:`y_{ti} = 1, y_{tj} = 0`
  (the plain per-behaviour BPR, Rendle et al. 2009). :math:`-\log\sigma(s_i - s_j)` is BPR's loss;
  ``0`` with a zero gradient for a task without a pair. Use it as
  ``make_loss_fn(model, multi_task_loss=multi_behavior_bpr, group_key="user")`` (the groups are passed
  to a ``multi_task_loss`` that takes ``groups``). ``O(B^2)`` per task, like :func:`ranknet`.

  Examples:
    >>> import jax.numpy as jnp
    >>> from mtjax import losses
    >>> labels = jnp.array([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])   # click, buy: sample 0 bought, 1 clicked
    >>> scores = jnp.zeros((2, 3))
    >>> losses.multi_behavior_bpr(scores, labels).round(4)          # every pair at log 2
    Array([0.6931, 0.6931], dtype=float32)

  Args:
    outputs: ``[T, B]`` scores (logits), one row per behaviour.
    labels: ``[T, B]`` binary behaviours, weak to strong.
    mask: optional ``[T, B]`` (or ``[B]``) validity weights (a float mask weights pair ``(i, j)`` by
      :math:`d_{ti} d_{tj}`).
    groups: optional ``[B]`` group ids (users); pairs only inside a group.
    graded: pairs against every weaker level (True) or only against samples without behaviour ``t``.

  Returns:
    ``[T]`` losses.

  References:
    Rendle, Freudenthaler, Gantner, Schmidt-Thieme, *BPR: Bayesian Personalized Ranking from Implicit
    Feedback*, UAI 2009.
    Gao, He, Gong, Feng, Chua, Jin, Li, *Neural Multi-Task Recommendation from Multi-Behavior Data*
    (NMTR), ICDE 2019.
  """
  outputs = jnp.asarray(outputs)
  if not jnp.issubdtype(outputs.dtype, jnp.floating):
    outputs = outputs.astype(jnp.float32)
  labels = jnp.asarray(labels)
  if outputs.ndim != 2:
    raise ValueError(f"mtjax: multi_behavior_bpr: outputs must be [T, B], got shape {outputs.shape}.")
  _check_same_shape(outputs, labels, "multi_behavior_bpr", "outputs", "labels")
  num_tasks = outputs.shape[0]
  has = labels != 0
  level = jnp.max(jnp.where(has, jnp.arange(1, num_tasks + 1)[:, None], 0), axis=0)  # [B]
  if mask is not None:
    mask = jnp.asarray(mask)
    if mask.shape == outputs.shape[1:]:
      mask = jnp.broadcast_to(mask[None], outputs.shape)
    _check_same_shape(outputs, mask, "multi_behavior_bpr", "outputs", "mask")
  same = jnp.ones((outputs.shape[1],) * 2, bool)
  if groups is not None:
    groups = jnp.asarray(groups)
    if groups.shape != outputs.shape[1:]:
      raise ValueError(f"mtjax: multi_behavior_bpr: groups must be [B] = {outputs.shape[1:]}, got {groups.shape}.")
    same = groups[:, None] == groups[None, :]
  out = []
  for t in range(num_tasks):
    if graded:
      pair = (level[:, None] >= t + 1) & (level[:, None] > level[None, :])
    else:
      pair = has[t][:, None] & ~has[t][None, :]
    weights = (pair & same).astype(outputs.dtype)
    if mask is not None:
      m = mask[t].astype(outputs.dtype)
      weights = weights * (m[:, None] * m[None, :])
    out.append(_pairwise_logistic(outputs[t], weights))
  return jnp.stack(out)


def _check_same_shape(a, b, where: str, a_name: str, b_name: str) -> None:
  if jnp.shape(a) != jnp.shape(b):
    raise ValueError(
      f"mtjax: {where}: {b_name} has shape {jnp.shape(b)} but {a_name} has shape {jnp.shape(a)}; "
      "they must match exactly (no broadcasting)."
    )


def _bce_task(outputs, labels, mask, groups):
  del groups
  return masked_mean(bce_with_logits(outputs, labels), mask)


def _mse_task(outputs, labels, mask, groups):
  del groups
  return masked_mean(mse(outputs, labels), mask)


def _ranknet_task(outputs, labels, mask, groups):
  return ranknet(outputs, labels, groups=groups, mask=mask)


_BUILTIN = {"bce": _bce_task, "mse": _mse_task, "ranknet": _ranknet_task}

_PER_SAMPLE = {_bce_task: bce_with_logits, _mse_task: mse}
WEIGHT_NORMALIZATIONS = ("valid", "weights")


def _checked_weights(weights, outputs, fns, task_losses, normalization) -> jax.Array:
  """``[T, B]`` weights in the outputs' dtype; errors for bad shapes, losses without weights, negative weights."""
  from mtjax._src import numerics  # pylint: disable=import-outside-toplevel

  if normalization not in WEIGHT_NORMALIZATIONS:
    raise ValueError(f"mtjax: weight_normalization must be one of {WEIGHT_NORMALIZATIONS}, got {normalization!r}.")
  specs = [task_losses] * len(fns) if isinstance(task_losses, str) or callable(task_losses) else list(task_losses)
  unweighted = [f"task {t} ({spec!r})" for t, (fn, spec) in enumerate(zip(fns, specs)) if fn not in _PER_SAMPLE]
  if unweighted:
    raise ValueError(
      f"mtjax: sample weights apply to the 'bce' and 'mse' task losses; {', '.join(unweighted)} take none "
      "(a callable loss can read its weights from a closure or the batch)."
    )
  weights = jnp.asarray(weights)
  if weights.shape == outputs.shape[1:]:
    weights = jnp.broadcast_to(weights[None], outputs.shape)
  if weights.shape != outputs.shape:
    raise ValueError(
      f"mtjax: sample weights must be [T, B] = {outputs.shape} or [B] = {outputs.shape[1:]}, got {weights.shape}."
    )
  weights = weights.astype(outputs.dtype)
  check = numerics.condition_check(jnp.any(weights < 0) | ~jnp.all(jnp.isfinite(weights)), _negative_weights)
  return numerics.enforce(weights, check)


def _negative_weights(_) -> str:
  return "mtjax: sample weights must be finite and non-negative (a weight scales a sample's loss)."


def _weighted_task_loss(fn, outputs, labels, mask, weights, normalization) -> jax.Array:
  values = _PER_SAMPLE[fn](outputs, labels)
  valid = mask != 0
  d = mask.astype(values.dtype)
  num = jnp.sum(jnp.where(valid, values * weights * d, jnp.zeros_like(values)))
  den = jnp.sum(d) if normalization == "valid" else jnp.sum(jnp.where(valid, weights * d, jnp.zeros_like(d)))
  return _safe_ratio(num, den)


def _resolve(spec: LossSpec) -> Callable:
  if isinstance(spec, str):
    if spec not in _BUILTIN:
      raise ValueError(
        f"mtjax: unknown task loss {spec!r}; use one of {BUILTIN_LOSSES} or a callable "
        "fn(outputs [B], labels [B], mask [B]) -> scalar."
      )
    return _BUILTIN[spec]
  if callable(spec):
    return lambda outputs, labels, mask, groups: spec(outputs, labels, mask)
  raise ValueError(f"mtjax: a task loss must be a name in {BUILTIN_LOSSES} or a callable, got {spec!r}.")


def _resolve_all(task_losses, num_tasks: int) -> list:
  if isinstance(task_losses, str) or callable(task_losses):
    return [_resolve(task_losses)] * num_tasks
  specs = list(task_losses)
  if len(specs) != num_tasks:
    raise ValueError(
      f"mtjax: {len(specs)} task losses were given ({specs}) but the outputs have {num_tasks} tasks; "
      "give one loss per task, or a single loss for all."
    )
  return [_resolve(s) for s in specs]


def per_task_loss(
  outputs: jax.Array,
  labels: jax.Array,
  mask: Optional[jax.Array] = None,
  *,
  task_losses: Union[LossSpec, Sequence[LossSpec]] = "bce",
  groups: Optional[jax.Array] = None,
  sample_weights: Optional[jax.Array] = None,
  weight_normalization: str = "valid",
) -> jax.Array:
  r"""Vector of masked task losses ``[T]`` from ``[T, B]`` outputs, labels and mask.

  .. math::
    L_t = \mathrm{loss}_t(o_{t,\cdot},\, y_{t,\cdot},\, d_{t,\cdot}), \qquad t = 1..T,

  where for ``"bce"`` and ``"mse"`` :math:`L_t` is the :func:`masked_mean` of the per-sample loss
  over the valid samples of task t (``0`` with zero gradient when task t has none), and for
  ``"ranknet"`` it is :func:`ranknet` over the valid samples (within ``groups``).

  Task loss spec: ``task_losses`` is one spec for every task or a sequence of T specs; a spec is
  ``"bce"`` (outputs are logits), ``"mse"`` (raw predictions), ``"ranknet"`` (scores), or a
  callable ``fn(outputs [B], labels [B], mask [B]) -> scalar`` (``mask`` is always given, all
  ones without a mask; use :func:`masked_mean` inside).

  Labels of masked-out samples are replaced by 0 before the loss, so garbage (even NaN) labels
  there cannot reach the value or the gradient.

  Sample weights (``"bce"`` and ``"mse"``): with non-negative ``sample_weights`` :math:`w` (``[T, B]``,
  or ``[B]`` for every task; e.g. watch time on the positives of a click task, the weighted
  logistic regression of YouTube's ranking models),

  .. math::
    L_t = \frac{\sum_i d_{ti} w_{ti} \ell_{ti}}{\sum_i d_{ti}} \;(\texttt{"valid"}), \qquad
    L_t = \frac{\sum_i d_{ti} w_{ti} \ell_{ti}}{\sum_i d_{ti} w_{ti}} \;(\texttt{"weights"}),

  ``"valid"`` (default; TensorFlow's ``SUM_BY_NONZERO_WEIGHTS`` when weights are positive): the
  weights scale the task's loss, so all weights 1 is the unweighted loss and weights 2 double it;
  ``"weights"``: the weighted mean, invariant to the weights' scale. A negative weight raises
  (eagerly, or through mtjax's runtime checks under ``jit``). ``"ranknet"`` and callable losses
  take no sample weights (a callable reads its own from a closure or the batch).

  Examples:
    >>> import jax.numpy as jnp
    >>> from mtjax import losses
    >>> outputs = jnp.array([[0.0, 0.0], [1.0, 3.0]])
    >>> labels = jnp.array([[1.0, 0.0], [1.0, 2.0]])
    >>> mask = jnp.array([[True, True], [False, True]])
    >>> losses.per_task_loss(outputs, labels, mask, task_losses=("bce", "mse"))
    Array([0.6931472, 1.       ], dtype=float32)

  Args:
    outputs: ``[T, B]`` model outputs (task axis first).
    labels: ``[T, B]`` labels.
    mask: optional ``[T, B]`` bool or float validity weights.
    task_losses: the per-task loss spec (see above).
    groups: optional group ids for ``"ranknet"``, ``[B]`` (shared by all tasks) or ``[T, B]``.
    sample_weights: optional non-negative ``[T, B]`` or ``[B]`` per-sample weights (see above).
    weight_normalization: ``"valid"`` or ``"weights"`` (see above).

  Returns:
    ``[T]`` task losses, ready for :func:`mtjax.task_grads`.
  """
  outputs = jnp.asarray(outputs)
  if outputs.ndim != 2:
    raise ValueError(f"mtjax: per_task_loss: outputs must be [T, B] (task axis first), got shape {outputs.shape}.")
  labels = jnp.asarray(labels)
  _check_same_shape(outputs, labels, "per_task_loss", "outputs", "labels")
  num_tasks = outputs.shape[0]
  fns = _resolve_all(task_losses, num_tasks)
  if mask is None:
    mask = jnp.ones(outputs.shape, dtype=bool)
  else:
    mask = jnp.asarray(mask)
    _check_same_shape(outputs, mask, "per_task_loss", "outputs", "mask")
    labels = jnp.where(mask != 0, labels, jnp.zeros_like(labels))
  if groups is not None:
    groups = jnp.asarray(groups)
    if groups.shape not in (outputs.shape[1:], outputs.shape):
      raise ValueError(f"mtjax: per_task_loss: groups must be [B] or [T, B] = {outputs.shape}, got {groups.shape}.")
  if sample_weights is not None:
    sample_weights = _checked_weights(sample_weights, outputs, fns, task_losses, weight_normalization)
  out = []
  for t, fn in enumerate(fns):
    g = None if groups is None else (groups if groups.ndim == 1 else groups[t])
    if sample_weights is not None:
      loss = _weighted_task_loss(fn, outputs[t], labels[t], mask[t], sample_weights[t], weight_normalization)
      out.append(loss)
      continue
    loss = jnp.asarray(fn(outputs[t], labels[t], mask[t], g))
    if loss.ndim != 0:
      raise ValueError(
        f"mtjax: per_task_loss: the loss of task {t} returned shape {loss.shape}; a task loss must "
        "reduce over the batch to a scalar (use losses.masked_mean)."
      )
    out.append(loss)
  dtype = jnp.result_type(*out)
  return jnp.stack([x.astype(dtype) for x in out])


def _accepts(fn: Callable, name: str) -> bool:
  """Whether ``fn`` takes a keyword ``name`` (or ``**kwargs``)."""
  import inspect  # pylint: disable=import-outside-toplevel

  try:
    params = inspect.signature(fn).parameters
  except (TypeError, ValueError):
    return False
  return name in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def _stack_from_batch(batch: Mapping[str, Any], key, what: str) -> jax.Array:
  """``batch[key]`` as a ``[T, B]`` array: ``key`` is one key (an array or a list of T arrays) or a tuple of keys."""
  if isinstance(key, (tuple, list)):
    missing = [k for k in key if k not in batch]
    if missing:
      raise ValueError(f"mtjax: make_loss_fn: {what} keys {missing} are not in the batch (keys: {list(batch)}).")
    return jnp.stack([jnp.asarray(batch[k]) for k in key])
  if key not in batch:
    raise ValueError(f"mtjax: make_loss_fn: {what} key {key!r} is not in the batch (keys: {list(batch)}).")
  value = batch[key]
  if isinstance(value, Mapping):
    raise ValueError(
      f"mtjax: make_loss_fn: batch[{key!r}] is a dict, whose task order is ambiguous; pass "
      f"{what}_key=tuple of keys in task order, e.g. ('click', 'buy'), with the arrays at the top "
      "level of the batch, or a [T, B] array."
    )
  if isinstance(value, (tuple, list)):
    return jnp.stack([jnp.asarray(v) for v in value])
  return jnp.asarray(value)


def make_loss_fn(
  model: Any,
  task_losses: Union[LossSpec, Sequence[LossSpec]] = "bce",
  *,
  input_key: str = "x",
  label_key: Union[str, Sequence[str]] = "labels",
  mask_key: Union[None, str, Sequence[str]] = None,
  group_key: Optional[str] = None,
  has_aux: bool = True,
  train: bool = False,
  mutable: Sequence[str] = (),
  multi_task_loss: Optional[Callable[..., jax.Array]] = None,
  regularization_key: Optional[str] = "regularization",
  weight_key: Union[None, str, Sequence[str]] = None,
  weight_normalization: str = "valid",
) -> Callable[..., Any]:
  r"""Builds ``loss_fn(params, batch, rngs=None, variables=None) -> [T]`` from a model and task losses.

  The returned function applies the model,
  ``model.apply({'params': params, **variables}, batch[input_key], train=train, rngs=rngs)``,
  which must return ``(outputs [T, B], aux)`` (or a bare ``[T, B]`` array), and then
  :func:`per_task_loss`. It is meant for :func:`mtjax.task_grads`:
  ``mtjax.task_grads(loss_fn, has_aux=True)(params, batch)``.

  Batch layout (a dict):

  * ``batch[input_key]`` (default ``'x'``): the model input, a ``[B, D]`` array or a feature dict.
  * Labels ``[T, B]``: ``batch[label_key]`` (default ``'labels'``) as a ``[T, B]`` array or a list
    of T ``[B]`` arrays; or ``label_key=('click', 'buy')`` to stack top-level ``[B]`` entries in
    task order. Labels are cast to the outputs' dtype.
  * Mask ``[T, B]`` (optional): the same forms under ``mask_key``; without ``mask_key`` every
    sample is valid for every task. A task with no valid sample gets loss 0 and zero gradient.
  * Groups ``[B]`` or ``[T, B]`` (optional, for ``"ranknet"``): ``batch[group_key]``.
  * Sample weights ``[T, B]`` or ``[B]`` (optional): ``batch[weight_key]`` (or a tuple of keys),
    passed to :func:`per_task_loss` with ``weight_normalization``.

  Model state: other variable collections (e.g. ``batch_stats``) are passed explicitly as
  ``variables={'batch_stats': ...}``. To update them in training, set ``mutable=('batch_stats',)``
  (needs ``has_aux=True``); the updated collections are returned in ``aux['updates']`` and the
  caller stores them. Dropout keys go in ``rngs={'dropout': key}``.

  Args:
    model: a flax module (its ``apply`` is used) or an ``apply``-like function.
    task_losses: one per-task loss spec for all tasks or a sequence of T specs: ``"bce"``,
      ``"mse"``, ``"ranknet"``, or ``fn(outputs [B], labels [B], mask [B]) -> scalar``
      (see :func:`per_task_loss`).
    input_key: batch key of the model input.
    label_key: batch key (or tuple of keys in task order) of the labels.
    mask_key: batch key (or tuple of keys) of the ``[T, B]`` validity mask; ``None``: no mask.
    group_key: batch key of the group ids used by ``"ranknet"`` (and passed to a ``multi_task_loss``
      that takes a ``groups`` keyword, such as :func:`multi_behavior_bpr`); ``None``: pairs across
      the batch.
    has_aux: if True, ``loss_fn`` returns ``(losses, aux)`` with ``aux = {'model': model aux,
      'outputs': [T, B] outputs}`` plus ``'updates'`` when ``mutable`` is set.
    train: passed to the model as ``train=`` (static).
    mutable: variable collections the model may update (e.g. ``('batch_stats',)``).
    multi_task_loss: optional ``fn(outputs [T, B], labels [T, B], mask [T, B] or None) -> [T]``
      used instead of ``task_losses`` for losses that combine several outputs (ESMM-style); one that
      takes an ``aux`` keyword gets the model's aux dict (:func:`escm2_loss`), one that takes
      ``groups`` the batch's ``group_key`` entry.
    regularization_key: a key of the model's aux dict holding per-task penalties ``[T]`` (e.g.
      :class:`mtjax.models.DSelectK`'s gate entropy) that are added to the task losses, task ``t``'s
      to task ``t``; ignored when the model's aux has no such key; ``None``: never added.
    weight_key: batch key (or tuple of keys) of non-negative per-sample weights; ``None``: unweighted.
    weight_normalization: ``"valid"`` or ``"weights"`` (see :func:`per_task_loss`).

  Returns:
    ``loss_fn(params, batch, rngs=None, variables=None)`` returning ``[T]`` task losses, or
    ``(losses, aux)`` with ``has_aux``.

  Examples:
    >>> import jax, jax.numpy as jnp, flax.linen as nn, mtjax
    >>> class TwoHeads(nn.Module):
    ...   @nn.compact
    ...   def __call__(self, x, *, train=False):
    ...     return nn.Dense(2)(x).T, {}
    >>> model = TwoHeads()
    >>> batch = {'x': jnp.ones((4, 3)), 'labels': jnp.zeros((2, 4)), 'mask': jnp.ones((2, 4))}
    >>> params = model.init(jax.random.key(0), batch['x'])['params']
    >>> loss_fn = mtjax.losses.make_loss_fn(model, ('bce', 'mse'), mask_key='mask')
    >>> (losses, aux), grads = mtjax.task_grads(loss_fn, has_aux=True)(params, batch)
    >>> losses.shape, grads['Dense_0']['kernel'].shape, aux['outputs'].shape
    ((2,), (2, 3, 2), (2, 4))
  """
  mutable = tuple(mutable)
  if mutable and not has_aux:
    raise ValueError(
      "mtjax: make_loss_fn: mutable collections are returned in aux['updates']; set has_aux=True "
      "(and task_grads(..., has_aux=True)) so the updates are not lost."
    )
  takes_groups = multi_task_loss is not None and _accepts(multi_task_loss, "groups")
  takes_aux = multi_task_loss is not None and _accepts(multi_task_loss, "aux")
  if multi_task_loss is not None and group_key is not None and not takes_groups:
    raise ValueError(
      "mtjax: make_loss_fn: group_key was given but the multi_task_loss takes no `groups` keyword; "
      "group inside it, or drop group_key."
    )
  if multi_task_loss is not None and weight_key is not None:
    raise ValueError(
      "mtjax: make_loss_fn: weight_key applies to the per-task losses; a multi_task_loss takes no sample "
      "weights (weight its samples inside it)."
    )
  if multi_task_loss is None:
    if isinstance(task_losses, str) or callable(task_losses):
      _resolve(task_losses)  # validate names early
    else:
      for spec in task_losses:
        _resolve(spec)
  apply_fn = getattr(model, "apply", model)

  def loss_fn(params, batch, rngs=None, variables=None):
    if not isinstance(batch, Mapping):
      raise ValueError("mtjax: make_loss_fn: batch must be a dict with the model input, labels and mask.")
    if input_key not in batch:
      raise ValueError(f"mtjax: make_loss_fn: input key {input_key!r} is not in the batch (keys: {list(batch)}).")
    all_vars = {"params": params, **(variables or {})}
    kwargs = {"train": train}
    if rngs is not None:
      kwargs["rngs"] = rngs
    if mutable:
      out, updates = apply_fn(all_vars, batch[input_key], mutable=list(mutable), **kwargs)
    else:
      out, updates = apply_fn(all_vars, batch[input_key], **kwargs), None
    if isinstance(out, tuple) and len(out) == 2:
      outputs, model_aux = out
    elif isinstance(out, tuple):
      raise ValueError(
        f"mtjax: make_loss_fn: the model returned a tuple of {len(out)}; expected (outputs [T, B], aux)."
      )
    else:
      outputs, model_aux = out, {}
    outputs = jnp.asarray(outputs)
    if outputs.ndim != 2:
      raise ValueError(
        f"mtjax: make_loss_fn: model outputs must be [T, B] (task axis first), got shape {outputs.shape}."
      )
    labels = _stack_from_batch(batch, label_key, "label").astype(outputs.dtype)
    mask = None if mask_key is None else _stack_from_batch(batch, mask_key, "mask")
    if labels.shape != outputs.shape:
      raise ValueError(
        f"mtjax: make_loss_fn: labels have shape {labels.shape} but the model outputs have shape "
        f"{outputs.shape}; both must be [T, B]."
      )
    if multi_task_loss is not None:
      extra = {}
      if group_key is not None and takes_groups:
        extra["groups"] = _stack_from_batch(batch, group_key, "group")
      if takes_aux:
        extra["aux"] = model_aux if isinstance(model_aux, Mapping) else {}
      losses = jnp.asarray(multi_task_loss(outputs, labels, mask, **extra))
      if losses.shape != (outputs.shape[0],):
        raise ValueError(
          f"mtjax: make_loss_fn: multi_task_loss returned shape {losses.shape}; expected [T] = ({outputs.shape[0]},)."
        )
    else:
      groups = None if group_key is None else _stack_from_batch(batch, group_key, "group")
      weights = None if weight_key is None else _stack_from_batch(batch, weight_key, "weight")
      losses = per_task_loss(
        outputs,
        labels,
        mask,
        task_losses=task_losses,
        groups=groups,
        sample_weights=weights,
        weight_normalization=weight_normalization,
      )
    if regularization_key is not None and isinstance(model_aux, Mapping) and regularization_key in model_aux:
      penalty = jnp.asarray(model_aux[regularization_key])
      if penalty.shape != losses.shape:
        raise ValueError(
          f"mtjax: make_loss_fn: the model's aux[{regularization_key!r}] has shape {penalty.shape}; it must "
          f"hold one penalty per task, shape {losses.shape} (or build the loss with regularization_key=None)."
        )
      losses = losses + penalty.astype(losses.dtype)
    if not has_aux:
      return losses
    aux = {"model": model_aux, "outputs": outputs}
    if mutable:
      aux["updates"] = updates
    return losses, aux

  return loss_fn
