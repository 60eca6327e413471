"""SDMGrad: stochastic direction-oriented multi-objective gradient descent (Xiao et al., NeurIPS 2023)."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from mtjax._src import composition
from mtjax._src import micro_batches as mb
from mtjax._src import numerics
from mtjax._src import solvers
from mtjax._src import tree as tree_lib
from mtjax._src import weighting
from mtjax.transforms._modo import check_nonneg
from mtjax.transforms._modo import check_num_tasks

NUM_BATCHES = (1, 3)


class SDMGradState(NamedTuple):
  """State of :func:`sdmgrad`.

  Attributes:
    weights: ``[T]`` the inner weights :math:`w` on the simplex after the last update's inner
      iterations (initially :math:`1/T` each); the next update starts its inner iterations from
      them (warm start). The update's task coefficients are :math:`(w + \\lambda/T)/(1 + \\lambda)`.
  """

  weights: jax.Array


def sdmgrad_weights(
  weights: jax.Array, cross_gram: jax.Array, lamda, gamma, momentum, num_inner_steps: int, normalize: bool
) -> jax.Array:
  r"""SDMGrad's inner projected (heavy-ball) gradient iterations on the simplex.

  Minimises :math:`\frac12 \|J^\top w + \lambda g_0\|^2` over :math:`w \in \Delta`
  (:math:`g_0 = J^\top \mathbf 1 / T`) with the stochastic gradient
  :math:`G_{12} (w + \lambda \mathbf 1 / T)`, :math:`G_{12} = J_1 J_2^\top`:

  .. math::
    b_{s+1} = \mu\, b_s + G_{12} (w_s + \tfrac{\lambda}{T} \mathbf 1), \qquad
    w_{s+1} = \Pi_\Delta(w_s - \gamma\, b_{s+1}), \qquad b_0 = 0,

  ``num_inner_steps`` times (``torch.optim.SGD`` with momentum :math:`\mu`, re-created at every
  update). ``normalize`` first divides :math:`G_{12}` by :math:`s^2`,
  :math:`s = \operatorname{mean}_t \sqrt{\max(G_{12,tt}, 0)}` (a zero :math:`s` gives a zero
  matrix, so :math:`w` stays).

  Args:
    weights: ``[T]`` the starting point :math:`w_0` on the simplex.
    cross_gram: ``[T, T]`` :math:`G_{12}` (or the one-batch Gram :math:`J J^\top`).
    lamda, gamma, momentum: :math:`\lambda`, :math:`\gamma`, :math:`\mu` (traceable).
    num_inner_steps: static loop bound.
    normalize: static; divide the Gram by its mean squared gradient norm first.

  Returns:
    ``[T]`` :math:`w` after the iterations, in ``cross_gram``'s dtype.
  """
  dtype = cross_gram.dtype
  gram = cross_gram
  t = gram.shape[0]
  if normalize:
    scale = jnp.mean(jnp.sqrt(jnp.maximum(jnp.diagonal(gram), 0.0)))
    gram = numerics.safe_div(gram, jnp.square(scale))
  lam = jnp.asarray(lamda, dtype)
  step = jnp.asarray(gamma, dtype)
  mu = jnp.asarray(momentum, dtype)
  shift = lam / t

  def body(_, carry):
    w, buf = carry
    buf = mu * buf + mb.matvec(gram, w + shift)
    return solvers.project_simplex(w - step * buf).astype(dtype), buf

  w0 = weights.astype(dtype)
  w, _ = jax.lax.fori_loop(0, num_inner_steps, body, (w0, jnp.zeros_like(w0)))
  return w


def direction_coefficients(w: jax.Array, lamda) -> jax.Array:
  r"""The task coefficients :math:`c = (w + \lambda \mathbf 1 / T) / (1 + \lambda)` of the direction.

  :math:`J^\top c = (J^\top w + \lambda g_0)/(1+\lambda)` with :math:`g_0 = J^\top \mathbf 1 / T`.
  """
  lam = jnp.asarray(lamda, w.dtype)
  return (w + lam / w.shape[0]) / (1.0 + lam)


def sdmgrad(
  *,
  num_tasks: int,
  lamda: jax.typing.ArrayLike = 0.3,
  gamma: jax.typing.ArrayLike = 0.5,
  num_inner_steps: int = 20,
  momentum: jax.typing.ArrayLike = 0.0,
  normalize: bool = True,
  num_batches: int = 3,
  shared: tree_lib.SharedSpec = None,
) -> optax.GradientTransformationExtraArgs:
  r"""SDMGrad: MGDA pulled towards the average gradient, with stochastic weights on independent batches.

  The direction-oriented problem of SDMGrad maximises the worst task's decrease while staying
  close to the average gradient :math:`g_0 = \frac1T \sum_t g_t`; its dual is

  .. math::
    w^\star = \arg\min_{w \in \Delta} \tfrac12 \|J^\top w + \lambda g_0\|^2, \qquad
    d = \frac{J^\top w^\star + \lambda g_0}{1 + \lambda},

  (:math:`\lambda = 0`: MGDA's min-norm point; :math:`\lambda \to \infty`: the average
  gradient). SDMGrad (the paper's Algorithm 1) solves for :math:`w` with ``num_inner_steps``
  projected stochastic gradient steps whose gradient :math:`J_1 (J_2^\top w + \lambda g_{0,2})
  = G_{12}(w + \lambda \mathbf 1/T)` uses the cross Gram :math:`G_{12} = J_1 J_2^\top` of two
  independent micro-batches (unbiased), and takes the direction on a third:
  :math:`d = (J_3^\top w + \lambda g_{0,3})/(1 + \lambda)`. The inner iterations (see
  :func:`sdmgrad_weights`) start from the previous update's :math:`w` (warm start;
  :math:`w = \mathbf 1/T` at first), as in the authors' code; :math:`J_m` is the ``[T, P]``
  Jacobian of the shared parameters on micro-batch ``m`` (leaf by leaf, ``precision=HIGHEST``).

  Step-size rule: the paper's iterations are plain projected gradient steps of size
  :math:`\gamma` (``momentum=0``), whose good value depends on the gradients' scale; the
  authors' code (OptMN-Lab/sdmgrad, and LibMTL's port) first divides the Gram by the squared
  mean gradient norm, :math:`s^2` (``normalize=True``, the default here: the weights then do not
  depend on the gradients' scale), and runs 20 inner steps of SGD with momentum 0.5 and step 10
  (the authors) or 5 (LibMTL). Those steps are far beyond the stable range (the normalised Gram
  has unit mean diagonal): :math:`w` jumps between faces of the simplex and the result changes
  with float rounding (float32 and float64 differ by up to ~0.06 in our tests). The defaults here
  are therefore the paper's plain steps (``momentum=0``) of a stable size, ``gamma=0.5``, on the
  normalised Gram; ``gamma=5.0, momentum=0.5`` reproduces LibMTL. LibMTL adds ``1e-8`` to the
  normaliser and the authors' code uses :math:`\sqrt{G_{tt} + 10^{-4}}`; here a zero Gram gives
  a zero matrix instead (no epsilon).

  Variants (``num_batches``):

  * ``3`` (default, the paper and LibMTL): ``update`` takes per-task gradients with a leading
    micro-batch axis, every leaf ``[3, T, *param.shape]``; micro-batches 0 and 1 give the cross
    Gram, 2 the direction. Produce them with
    ``mtjax.micro_batch_task_grads(mtjax.task_grads(loss_fn), 3)(params, batch)`` (three forward
    passes on a third of the batch and ``3T`` backward rows: about one full per-task Jacobian).
    Task-specific leaves (``shared=`` mask False): the plain task sum of micro-batch 2.
    Deferred / lazy Jacobians and sparse rows are rejected.
  * ``1`` (the authors' official code for the supervised experiments): ONE batch, the plain
    Gram :math:`J J^\top` (biased) and :math:`d` on the same batch. ``update`` then takes the
    ordinary ``[T, *param.shape]`` task gradients of every other mtjax method (through the Gram
    core: lazy Jacobians, sparse rows, task-specific leaves' plain sum).

  ``task_losses`` are optional and only checked. State: ``[T]``.

  .. warning::
    Must be first in an ``optax.chain``: it consumes per-task gradients and emits params-shaped
    updates. Do not wrap it in ``optax.MultiSteps``.

  Examples:
    >>> import jax.numpy as jnp, optax, mtjax
    >>> params = {'w': jnp.zeros(2)}
    >>> g = jnp.array([[1., 0.], [0., 2.]])
    >>> tx = optax.chain(mtjax.sdmgrad(num_tasks=2, lamda=0.0), optax.sgd(1.0))
    >>> state = tx.init(params)
    >>> updates, state = tx.update({'w': jnp.stack([g, g, g])}, state, params)
    >>> [round(x, 3) for x in state[0].weights.tolist()]  # MGDA's min-norm weights (4/5, 1/5)
    [0.8, 0.2]
    >>> [round(x, 3) for x in (-updates['w']).tolist()]
    [0.8, 0.4]

  Args:
    num_tasks: number of tasks ``T`` (static; sizes the state).
    lamda: :math:`\lambda \ge 0`, the pull towards the average gradient (traceable). Default
      ``0.3`` (LibMTL's).
    gamma: inner step size :math:`\gamma \ge 0` (traceable). Default ``0.5`` (see above).
    num_inner_steps: number of inner iterations (static int).
    momentum: inner heavy-ball momentum :math:`\mu \ge 0` (traceable); default ``0``, the paper's
      steps (the authors' code: ``0.5``).
    normalize: divide the Gram by the squared mean gradient norm first (static bool).
    num_batches: ``3`` (micro-batch input, the paper) or ``1`` (one batch, the authors' code).
    shared: shared-parameter mask (see :func:`mtjax.shared_mask`); the Gram covers the shared
      leaves only.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with state :class:`SDMGradState`.

  References:
    Xiao, Ban and Ji, *Direction-oriented Multi-objective Learning: Simple and Provable
    Stochastic Algorithms*, NeurIPS 2023. https://arxiv.org/abs/2305.18409
  """
  method = "sdmgrad"
  t_static = check_num_tasks(num_tasks, method)
  if num_batches not in NUM_BATCHES:
    raise ValueError(
      f"mtjax: {method}: num_batches must be 3 (the paper) or 1 (the authors' one-batch code), got {num_batches!r}."
    )
  if not isinstance(normalize, bool):
    raise ValueError(f"mtjax: {method}: normalize must be a bool, got {normalize!r}.")
  steps = weighting.static_int(num_inner_steps, "num_inner_steps", method)
  for value, name in ((lamda, "lamda"), (gamma, "gamma"), (momentum, "momentum")):
    check_nonneg(value, name, method)

  def init_state(params):
    composition.check_not_wrapped("sdmgrad")  # optax.MultiSteps / masked / apply_if_finite around it
    return SDMGradState(weights=jnp.full((t_static,), 1.0 / t_static, weighting.params_dtype(params)))

  if num_batches == 1:

    def weights_fn(inputs: weighting.WeightingInputs, state: SDMGradState):
      w = sdmgrad_weights(state.weights, inputs.grams[0], lamda, gamma, momentum, steps, normalize)
      return direction_coefficients(w, lamda), SDMGradState(weights=w.astype(state.weights.dtype))

    return weighting.gram_weighting(
      weights_fn,
      init_state,
      method=method,
      num_tasks=t_static,
      shared=shared,
      record_weights=False,
      rescale_gram=normalize,
    )

  def update_fn(updates, state, params=None, *, task_losses=None, **extra_args):
    del extra_args
    inputs = mb.check_inputs(
      updates, params, task_losses, num_batches=num_batches, num_tasks=t_static, shared=shared, method=method
    )
    gram = mb.cross_gram(inputs.leaves, inputs.mask, 0, 1)
    w = sdmgrad_weights(state.weights, gram, lamda, gamma, momentum, steps, normalize)
    w = numerics.enforce(w, *inputs.checks)
    out = mb.combine(inputs.leaves, inputs.mask, direction_coefficients(w, lamda), (2,))
    return jax.tree.unflatten(inputs.treedef, out), SDMGradState(weights=w.astype(state.weights.dtype))

  return optax.GradientTransformationExtraArgs(init_state, update_fn)
