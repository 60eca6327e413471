"""GradNorm: learned task weights that balance gradient norms, on the Gram-weighting core."""

from __future__ import annotations

import re
from typing import Any, Callable, NamedTuple, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import optax

from mtjax._src import numerics
from mtjax._src import tree as tree_lib
from mtjax._src import weighting

LayerSpec = Union[str, Callable[[Sequence[str]], Sequence[bool]]]
INITIAL_LOSSES = ("first_step", "first_epoch_mean")


class GradNormState(NamedTuple):
  """State of :func:`gradnorm`.

  Attributes:
    weights: the learned task weights ``[T]`` that the *next* update will use (ones at ``init``;
      after step ``t`` they are ``w(t+1)``, i.e. already stepped by the inner optimizer).
    initial_losses: ``L(0)`` ``[T]``, the reference losses of the loss ratios.
    inner_opt_state: state of the inner optimizer that steps ``weights``.
    count: number of updates so far (int32).
  """

  weights: jax.Array
  initial_losses: jax.Array
  inner_opt_state: Any
  count: jax.Array


def _natural_key(path: str):
  """Sort key that compares digit runs as numbers (``Dense_10`` after ``Dense_9``)."""
  return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", path)]


def last_layer_mask(paths: Sequence[str]) -> list[bool]:
  """The leaves of GradNorm's default subset, the last shared layer.

  Rule: among the given (shared) leaf paths, take the last one whose final component is
  ``kernel`` in natural path order (the flattening order of dict-based Flax params, with
  numbers compared as numbers so that ``Dense_10`` comes after ``Dense_9``); the subset is every
  leaf whose parent path equals that kernel's parent (e.g. ``bottom/Dense_2/kernel`` and
  ``bottom/Dense_2/bias``). Without any ``kernel`` leaf, the last leaf in that order and its
  siblings are used.

  Examples:
    >>> from mtjax.transforms._gradnorm import last_layer_mask
    >>> last_layer_mask(['bottom/Dense_10/bias', 'bottom/Dense_10/kernel', 'bottom/Dense_9/kernel'])
    [True, True, False]

  Args:
    paths: ``'/'``-joined leaf paths (see :func:`mtjax.shared_mask`).

  Returns:
    One bool per path.
  """
  paths = list(paths)
  if not paths:
    return []
  kernels = [p for p in paths if p.rsplit("/", 1)[-1] == "kernel"]
  last = max(kernels or paths, key=_natural_key)
  parent = weighting.layer_name(last)
  return [weighting.layer_name(p) == parent for p in paths]


def _subset_groups(layer: LayerSpec, chosen_layers: Optional[list] = None) -> Callable[[Sequence[str]], list[int]]:
  """A ``groups=`` callable: id 0 for the subset leaves, -1 for the other shared leaves. The chosen
  layers' names are written to ``chosen_layers`` (at trace time, for error messages)."""

  def groups(paths):
    paths = list(paths)
    if layer == "all":
      chosen = [True] * len(paths)
    elif layer == "last":
      chosen = last_layer_mask(paths)
    else:
      chosen = [bool(c) for c in layer(paths)]
      if len(chosen) != len(paths):
        raise ValueError(
          f"mtjax: gradnorm: the layer callable returned {len(chosen)} flags for "
          f"{len(paths)} shared leaves; return one bool per path."
        )
    if not any(chosen):
      raise ValueError(
        f"mtjax: gradnorm: the layer selection chose none of the shared leaves "
        f"{paths}; choose at least one (e.g. layer='all')."
      )
    if chosen_layers is not None:
      chosen_layers[:] = sorted({weighting.layer_name(p) for p, c in zip(paths, chosen) if c})
    return [0 if c else -1 for c in chosen]

  return groups


def _subset_norms(subset_gram: jax.Array, gram_log2_scale, dtype) -> jax.Array:
  """``sqrt(G_ii)`` of the true Gram from ``subset_gram = 2**gram_log2_scale * G`` (the core's rescaling)."""
  diag = jnp.maximum(jnp.diagonal(subset_gram), 0)
  log2 = jnp.asarray(gram_log2_scale, diag.dtype)
  norms = jnp.sqrt(diag) * jnp.where(log2 == 0, 1, jnp.exp2(-0.5 * log2))  # log2 = 0 (the usual case): exact
  return norms.astype(dtype)


def _rate_powers(task_losses: jax.Array, initial_losses: jax.Array, alpha, dtype) -> jax.Array:
  r""":math:`r_i^\alpha` with :math:`r_i = \tilde L_i / \operatorname{mean}_j \tilde L_j`, overflow-safe.

  Computed directly (bitwise as before) when every intermediate is finite; otherwise (loss ratios
  beyond the dtype's range, e.g. ``1e36 / 1e-3`` in float32) in log space, where :math:`r_i \le T`
  always holds, so :math:`r_i^\alpha` is finite.
  """
  task_losses = task_losses.astype(dtype)
  initial_losses = initial_losses.astype(dtype)
  alpha = jnp.asarray(alpha, dtype)
  positive = initial_losses > 0
  ratio = jnp.where(positive, task_losses / jnp.where(positive, initial_losses, 1), 1).astype(dtype)
  direct = jnp.power(numerics.safe_div(ratio, jnp.mean(ratio)), alpha)
  # Log space: log ratio_i = log L_i - log L_i(0) (-inf for a zero loss), r_i = exp(lr_i - logmeanexp(lr)).
  log_ratio = jnp.where(
    positive, jnp.log(jnp.where(task_losses > 0, task_losses, 1)) - jnp.log(jnp.where(positive, initial_losses, 1)), 0
  )
  zero = positive & (task_losses <= 0)
  log_ratio = jnp.where(zero, -jnp.inf, log_ratio)
  log_mean = jax.nn.logsumexp(log_ratio) - jnp.log(jnp.asarray(ratio.shape[0], dtype))
  all_zero = jnp.all(zero)
  log_rates = jnp.where(zero | all_zero, 0, log_ratio - jnp.where(all_zero, 0, log_mean))
  safe = jnp.where(zero | all_zero, jnp.power(jnp.zeros((), dtype), alpha), jnp.exp(alpha * log_rates))
  return jnp.where(jnp.all(jnp.isfinite(direct)), direct, safe)


def gradnorm_weight_gradient(
  weights: jax.Array,
  subset_gram: jax.Array,
  task_losses: jax.Array,
  initial_losses: jax.Array,
  alpha,
  gram_log2_scale=0.0,
) -> jax.Array:
  r"""The gradient of GradNorm's loss :math:`L_\text{grad}` with respect to the task weights.

  With :math:`n_i = \sqrt{G_{ii}}` (norm of task :math:`i`'s gradient on the chosen subset),
  :math:`G_i = w_i n_i`, :math:`\tilde L_i = L_i / L_i(0)`, :math:`r_i = \tilde L_i /
  \operatorname{mean}_j \tilde L_j` and the constant target :math:`c_i = \overline{G} r_i^\alpha`,
  :math:`L_\text{grad} = \sum_i |G_i - c_i|` has :math:`\partial L_\text{grad} / \partial w_i =
  \operatorname{sign}(G_i - c_i)\, n_i` (``sign(0) = 0``). A task with :math:`L_i(0) = 0` gets
  :math:`\tilde L_i = 1`; when every :math:`\tilde L_i = 0`, :math:`r = 0`. Loss ratios beyond the
  dtype's range (losses jumping by many orders of magnitude) are handled in log space.

  Args:
    weights: ``[T]`` current task weights (positive).
    subset_gram: ``[T, T]`` Gram matrix of the task gradients on the chosen subset.
    task_losses: ``[T]`` losses of this step (nonnegative).
    initial_losses: ``[T]`` reference losses ``L(0)``.
    alpha: the restoring-force strength (traceable).
    gram_log2_scale: ``subset_gram`` is ``2**gram_log2_scale`` times the Gram (the core's rescaling
      of a Gram that would overflow; ``0`` otherwise).

  Returns:
    ``[T]`` gradient, in the dtype of ``weights``.
  """
  dtype = weights.dtype
  norms = _subset_norms(subset_gram, gram_log2_scale, dtype)
  gnorms = weights * norms
  target = jax.lax.stop_gradient(jnp.mean(gnorms) * _rate_powers(task_losses, initial_losses, alpha, dtype))
  return jnp.sign(gnorms - target) * norms


def gradnorm(
  *,
  num_tasks: int,
  alpha: float = 1.5,
  learning_rate: float = 0.025,
  weight_optimizer: Optional[optax.GradientTransformation] = None,
  layer: LayerSpec = "last",
  initial_loss: str = "first_step",
  steps_per_epoch: Optional[int] = None,
  min_weight: float = 1e-6,
  shared: tree_lib.SharedSpec = None,
  task_specific: str = "sum",
) -> optax.GradientTransformationExtraArgs:
  r"""GradNorm: learn task weights so that the tasks train at similar rates.

  Task weights :math:`w` (initially :math:`\mathbf{1}`) scale the task gradients,
  :math:`d = \sum_i w_i g_i`. On a chosen subset :math:`W` of the shared parameters (the paper's
  last shared layer) let :math:`G_i = \|w_i \nabla_W L_i\|`, :math:`\overline{G} =
  \operatorname{mean}_i G_i`, :math:`\tilde L_i = L_i / L_i(0)` and :math:`r_i = \tilde L_i /
  \operatorname{mean}_j \tilde L_j` (the relative inverse training rate). GradNorm minimizes

  .. math::
    L_\text{grad}(w) = \sum_i \bigl| G_i - \overline{G}\, r_i^\alpha \bigr|,

  with the target :math:`\overline{G} r_i^\alpha` held constant, by one step of an inner
  optimizer per update on :math:`\partial L_\text{grad} / \partial w_i =
  \operatorname{sign}(G_i - \overline{G} r_i^\alpha)\, \|\nabla_W L_i\|` (analytic, see
  :func:`gradnorm_weight_gradient`). After the step the weights are clipped to at least
  ``min_weight`` (so they stay positive) and rescaled so that :math:`\sum_i w_i = T`.

  The update of a step uses the weights *of that step* (before the inner step); the stepped
  weights are stored in ``state.weights`` for the next step. :math:`G_i = w_i \sqrt{G_{ii}}` is
  read from the Gram matrix of the subset only (one Gram group), so the subset's per-task
  gradients are all that the weights need.

  ``layer="last"`` picks the last shared layer by the rule of :func:`last_layer_mask` (last
  ``kernel`` leaf in natural path order, plus its siblings); pass ``shared=`` so that task towers
  are not taken for the last *shared* layer, or pass a callable ``paths -> [bool]`` that receives
  the shared leaf paths and flags the subset.

  .. warning::
    Must be first in an ``optax.chain``: it consumes per-task gradients (every leaf
    ``[T, *param.shape]``, e.g. from :func:`mtjax.task_grads`) and emits params-shaped updates.
    Needs ``task_losses=`` in every ``update``. Do not wrap it in ``optax.MultiSteps``.
    Under ``optax.inject_hyperparams`` pass ``static_args=("num_tasks", "steps_per_epoch")``, plus
    ``"shared"`` and ``"layer"`` when they are callables (optax would take them for schedules).

  Examples:
    >>> import jax.numpy as jnp, optax, mtjax
    >>> params = {'w': jnp.zeros(2)}
    >>> task_grads = {'w': jnp.array([[1., 0.], [0., 3.]])}
    >>> tx = mtjax.gradnorm(num_tasks=2, learning_rate=0.2, layer='all')
    >>> state = tx.init(params)
    >>> updates, state = tx.update(task_grads, state, params, task_losses=jnp.array([1., 1.]))
    >>> updates['w']  # this step uses w = [1, 1]
    Array([1., 3.], dtype=float32)
    >>> jnp.round(state.weights, 4)  # task 1's larger gradient norm lowers its weight for the next step
    Array([1.5, 0.5], dtype=float32)

  Args:
    num_tasks: number of tasks ``T`` (static).
    alpha: strength of the restoring force :math:`\alpha` (traceable; 1.5 in the paper).
    learning_rate: step size of the default inner optimizer ``optax.sgd`` (plain gradient descent
      on :math:`w`, as in the paper; traceable). Ignored when ``weight_optimizer`` is given.
    weight_optimizer: inner optax optimizer that steps ``w`` (e.g. ``optax.adam(0.025)``, which
      makes the step size independent of the gradient scale).
    layer: the subset :math:`W`: ``"last"`` (default, last shared layer), ``"all"`` (every shared
      leaf) or a callable ``paths -> [bool]`` over the shared leaf paths.
    initial_loss: ``"first_step"`` (:math:`L(0)` = the losses of the first update) or
      ``"first_epoch_mean"`` (the mean over the first ``steps_per_epoch`` updates; during the first
      epoch the running mean so far is used).
    steps_per_epoch: required for ``initial_loss="first_epoch_mean"``.
    min_weight: lower clip of the weights before the renormalization (traceable).
    shared: shared-parameter mask (see :func:`mtjax.shared_mask`).
    task_specific: ``"sum"`` (default: task-specific leaves get their plain task gradient) or
      ``"weighted"`` (scale them by :math:`w` too, i.e. backpropagate :math:`\sum_i w_i L_i` through
      the task heads as the paper's implementation does).

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with state :class:`GradNormState`.

  References:
    Chen, Badrinarayanan, Lee, Rabinovich, *GradNorm: Gradient Normalization for Adaptive Loss
    Balancing in Deep Multitask Networks*, ICML 2018. https://arxiv.org/abs/1711.02257
  """
  if not isinstance(num_tasks, int) or isinstance(num_tasks, bool) or num_tasks < 1:
    raise ValueError(
      f"mtjax: gradnorm: num_tasks must be a positive int, got {num_tasks!r} (under "
      "optax.inject_hyperparams pass static_args=('num_tasks', 'steps_per_epoch'))."
    )
  if initial_loss not in INITIAL_LOSSES:
    raise ValueError(f"mtjax: gradnorm: initial_loss must be one of {INITIAL_LOSSES}, got {initial_loss!r}.")
  if initial_loss == "first_epoch_mean":
    if not isinstance(steps_per_epoch, int) or steps_per_epoch < 1:
      raise ValueError(
        "mtjax: gradnorm: initial_loss='first_epoch_mean' needs steps_per_epoch, a "
        f"positive int (got {steps_per_epoch!r})."
      )
    init_steps = steps_per_epoch
  else:
    init_steps = 1
  if not callable(layer) and layer not in ("last", "all"):
    raise ValueError(f"mtjax: gradnorm: layer must be 'last', 'all' or a callable paths -> [bool], got {layer!r}.")
  optimizer = weight_optimizer if weight_optimizer is not None else optax.sgd(learning_rate)
  chosen_layers: list = []  # filled at trace time by the groups callable

  def init_state(params):
    dtype = numerics.gram_dtype(jnp.result_type(*jax.tree.leaves(params)))
    weights = jnp.ones((num_tasks,), dtype)
    return GradNormState(
      weights=weights,
      initial_losses=jnp.ones((num_tasks,), dtype),
      inner_opt_state=optimizer.init(weights),
      count=jnp.zeros((), jnp.int32),
    )

  def weights_fn(inputs, state):
    weights = state.weights
    dtype = weights.dtype
    losses = inputs.task_losses.astype(dtype)
    losses = numerics.enforce(
      losses,
      numerics.condition_check(
        jnp.any(losses < 0),
        "mtjax: gradnorm: task losses must be nonnegative (GradNorm divides by L(0) and raises loss "
        "ratios to the power alpha); shift or reformulate negative losses.",
      ),
    )
    # L(0): the running mean over the first `init_steps` updates, then frozen.
    count = state.count
    in_init = count < init_steps
    # The first loss is stored as is (not 1 + (L - 1) / 1, which rounds 1e-8 to 0 in float32); the later
    # means m + (L - m) / (n + 1) stay within [min, max] of the losses, so they cannot overflow.
    running = state.initial_losses + (losses - state.initial_losses) / (count.astype(dtype) + 1)
    running = jnp.where(count == 0, losses, running)
    initial_losses = jnp.where(in_init, running, state.initial_losses)

    gram = inputs.grams[0]
    if num_tasks > 1:  # a subset only one task trains (a tower taken for the last shared layer): no balance
      trained = jnp.sum(jnp.diagonal(gram) > 0)
      gram = numerics.enforce(
        gram,
        numerics.condition_check(
          (count == 0) & (trained == 1),
          f"mtjax: gradnorm: the layer {', '.join(chosen_layers) or '?'} receives a gradient from only one task "
          "at the first step, so GradNorm cannot balance the tasks on it (its default layer='last' is the "
          "last *shared* layer: pass shared=, e.g. mtjax.models.partition(model) or "
          "mtjax.shared_mask(exclude='tower_'), or choose the layer with layer=).",
        ),
      )
    grad = gradnorm_weight_gradient(weights, gram, losses, initial_losses, alpha, inputs.gram_log2_scale)
    updates, inner_opt_state = optimizer.update(grad, state.inner_opt_state, weights)
    stepped = optax.apply_updates(weights, updates)
    stepped = jnp.maximum(stepped, jnp.asarray(min_weight, dtype))
    total = jnp.sum(stepped)
    top = jnp.max(stepped)
    relative = stepped / jnp.where(top > 0, top, 1)  # only used when the plain sum overflows
    stepped = jnp.where(
      jnp.isfinite(total), num_tasks * stepped / total, num_tasks * relative / jnp.sum(relative)
    ).astype(dtype)
    new_state = GradNormState(
      weights=stepped, initial_losses=initial_losses, inner_opt_state=inner_opt_state, count=optax.safe_increment(count)
    )
    return weights, new_state

  return weighting.gram_weighting(
    weights_fn,
    init_state,
    method="gradnorm",
    num_tasks=num_tasks,
    shared=shared,
    groups=_subset_groups(layer, chosen_layers),
    needs_gram=True,
    requires_task_losses=True,
    task_specific=task_specific,
    record_weights=False,
    rescale_gram=True,
  )
