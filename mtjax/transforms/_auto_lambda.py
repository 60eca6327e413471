"""Auto-Lambda: task weights meta-learned by a one-step look-ahead on a validation batch."""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mtjax._src import composition
from mtjax._src import numerics
from mtjax._src import rows as rows_lib
from mtjax._src import tree as tree_lib
from mtjax._src import weighting
from mtjax._src.task_grads import is_lazy

ORDERS = ("meta_first", "update_first")


class AutoLambdaState(NamedTuple):
  """State of :func:`auto_lambda`.

  Attributes:
    lambdas: ``[T]`` the learned task weights :math:`\\lambda` after the last meta step.
    inner_opt_state: state of the optimizer that steps :math:`\\lambda`.
    weights: ``[T]`` the task weights the last update used (``lambdas`` itself with the default
      ``order="meta_first"``, the weights before the meta step with ``"update_first"``).
    meta_loss: the meta loss :math:`L_{val}(\\theta')` at the last look-ahead (float scalar; for logging).
  """

  lambdas: jax.Array
  inner_opt_state: Any
  weights: jax.Array
  meta_loss: jax.Array


def _check_primary(primary_tasks, num_tasks: int) -> Optional[tuple]:
  if primary_tasks is None:
    return None
  try:
    idx = tuple(int(i) for i in primary_tasks)
    ok = all(int(i) == i and not isinstance(i, bool) for i in primary_tasks)
  except TypeError:
    ok, idx = False, ()
  if not ok or not idx or len(set(idx)) != len(idx) or any(i < 0 or i >= num_tasks for i in idx):
    raise ValueError(
      f"mtjax: auto_lambda: primary_tasks must be a non-empty sequence of distinct task indices in "
      f"[0, {num_tasks}), got {primary_tasks!r}."
    )
  return idx


def auto_lambda(
  meta_loss_fn: Callable[[Any, Any], jax.Array],
  *,
  num_tasks: int,
  virtual_lr: float,
  primary_tasks: Optional[Sequence[int]] = None,
  weight_init: float = 0.1,
  weight_lr: float = 1e-4,
  weight_optimizer: Optional[optax.GradientTransformation] = None,
  virtual_weight_decay: float = 0.0,
  order: str = "meta_first",
  nonnegative: bool = False,
) -> optax.GradientTransformationExtraArgs:
  r"""Auto-Lambda: task weights learned by differentiating a validation loss through a virtual step.

  With task gradients :math:`g_i = \nabla_\theta L_i(\theta)` on the training batch and the
  current weights :math:`\lambda`, the *virtual step*

  .. math::
    \theta'(\lambda) = \theta - \alpha \Big(\sum_i \lambda_i g_i + \omega\, \theta\Big)

  looks one SGD step ahead (:math:`\alpha` = ``virtual_lr``, :math:`\omega` =
  ``virtual_weight_decay``, 0 by default), and the weights descend the meta loss, the loss of the
  *primary* tasks :math:`P` on a validation batch at :math:`\theta'`:

  .. math::
    L_{val}(\lambda) = \sum_{j \in P} L^{val}_j(\theta'(\lambda)), \qquad
    \frac{\partial L_{val}}{\partial \lambda_i} = -\alpha\, g_i \cdot \nabla_\theta L_{val}(\theta'),
    \qquad \lambda \leftarrow \mathrm{opt}\big(\lambda, \nabla_\lambda L_{val}\big).

  :math:`P` is every task by default (multi-task learning: every task is primary) or the
  ``primary_tasks`` subset (auxiliary learning: the other tasks are trained only as far as they
  help the primary ones). The update emitted is :math:`d = \sum_i \lambda_i g_i` with the weights
  *after* this step's meta update (``order="meta_first"``, the paper's and the code's order:
  :math:`\lambda` is updated first, then :math:`\theta` with the new :math:`\lambda`), on every
  leaf -- the exact gradient of :math:`\sum_i \lambda_i L_i`, so a task head gets
  :math:`\lambda_i g_i`. ``order="update_first"`` weighs the update with the weights before the
  meta step instead. Weights are unconstrained (as in the paper and code; they may become
  negative); ``nonnegative=True`` (an mtjax option) clips them at 0 after each meta step.

  Exact hypergradient: :math:`\theta'` is *linear* in :math:`\lambda`, so ``jax.grad`` through the
  unrolled step gives :math:`-\alpha\, J\, \nabla L_{val}(\theta')` exactly, with no Hessian. The
  authors' code computes the same quantity as a second-order term
  :math:`\nabla_\lambda \nabla_\theta \sum_i \lambda_i L_i \cdot v` by a finite difference (DARTS-style),
  which is an approximation of this product; here none is needed.

  Cost per step: one forward and one backward pass of ``meta_loss_fn`` on the validation batch
  (at :math:`\theta'`), plus the virtual step and two weighted sums of the task gradients
  (:math:`O(TP)`). Given a deferred :class:`~mtjax.TaskJacobian` (``task_grads(..., deferred=True)``)
  it never forms the ``T`` rows: :math:`\sum_i \lambda_i g_i = J^\top \lambda` is one backward pass
  of the training losses, differentiating it in :math:`\lambda` (the product
  :math:`J \nabla L_{val}`) is one forward-mode (JVP) pass, and the update is one more backward
  pass -- so two backward + one JVP of the training loss and one forward+backward of the meta
  loss, independent of ``T``.

  API: ``meta_loss_fn(params, validation_batch)`` returns the ``[T]`` task losses on the
  validation batch (summed over ``primary_tasks``), or directly the scalar meta loss (then
  ``primary_tasks`` must be ``None``). The validation batch is an extra argument of every
  ``update``: ``tx.update(task_grads, state, params, validation_batch=batch)`` (any pytree of
  arrays; jit-friendly: a new batch each step does not retrace). ``task_losses`` is accepted and
  checked but not needed. ``mtjax.training.fit(validation_ds=...)`` passes one for you.

  Differences from the authors' code (as options or notes): the code starts the weights at 0.1
  (the default here) and steps them with Adam at learning rate 1e-4 (the default inner
  optimizer here; ``weight_optimizer=optax.sgd(beta)`` is the plain gradient step
  :math:`\lambda \leftarrow \lambda - \beta \nabla_\lambda L_{val}` as written in the paper); its
  virtual step uses the training optimizer's learning rate (pass it as ``virtual_lr``, under
  ``optax.inject_hyperparams`` a schedule's current value), its weight decay (``virtual_weight_decay``)
  and its momentum buffer (not reproduced: the buffer lives in the optimizer after this transform;
  it shifts the point :math:`\theta'` but not the form of the hypergradient). Its validation batch
  is a second, independently shuffled batch of the *training* set.

  .. warning::
    Must be first in an ``optax.chain``: it consumes per-task gradients (every leaf
    ``[T, *param.shape]``, e.g. from :func:`mtjax.task_grads`) and emits params-shaped updates.
    Needs ``params`` and ``validation_batch=`` in every ``update``. Do not wrap it in
    ``optax.MultiSteps`` or :func:`mtjax.amortized`. Under ``optax.inject_hyperparams`` pass
    ``static_args=("num_tasks", "meta_loss_fn", "primary_tasks", "order", "nonnegative")``.

  Examples:
    >>> import jax.numpy as jnp, optax, mtjax
    >>> def meta_loss_fn(params, batch):  # two quadratic validation losses
    ...   return 0.5 * jnp.sum((params['w'][None, :] - batch) ** 2, axis=1)
    >>> params = {'w': jnp.zeros(2)}
    >>> task_grads = {'w': jnp.array([[-1., 0.], [0., 2.]])}
    >>> tx = mtjax.auto_lambda(meta_loss_fn, num_tasks=2, virtual_lr=1.0, primary_tasks=[0],
    ...                        weight_init=1.0, weight_optimizer=optax.sgd(0.5))
    >>> state = tx.init(params)
    >>> updates, state = tx.update(task_grads, state, params, validation_batch=jnp.eye(2))
    >>> # theta' = -(g_0 + g_1) = (1, -2); grad of L_0 there: (0, -2); dL/dlambda_i = -g_i . (0, -2) = (0, 4)
    >>> state.lambdas  # the auxiliary task 1 moves w[1] away from task 0's target: its weight drops
    Array([ 1., -1.], dtype=float32)
    >>> updates['w']  # the update uses the new weights: 1 * g_0 - 1 * g_1
    Array([-1., -2.], dtype=float32)

  Args:
    meta_loss_fn: ``(params, validation_batch) -> [T]`` validation task losses (or a scalar meta
      loss), differentiable in ``params`` (static).
    num_tasks: number of tasks ``T`` (static).
    virtual_lr: :math:`\alpha`, the step size of the virtual SGD step (traceable): the learning
      rate of the training optimizer, as in the paper and code.
    primary_tasks: indices of the tasks whose validation losses form the meta loss (``None``: all
      tasks, multi-task learning; a subset: auxiliary learning). Static.
    weight_init: initial :math:`\lambda_i` (0.1 in the authors' code).
    weight_lr: step size of the default inner optimizer ``optax.adam`` (traceable; 1e-4 as in the
      authors' dense-prediction code). Ignored when ``weight_optimizer`` is given.
    weight_optimizer: inner optax optimizer that steps :math:`\lambda` (e.g. ``optax.sgd(beta)``).
    virtual_weight_decay: :math:`\omega`, weight decay included in the virtual step (the code's
      variant; 0 by default, traceable).
    order: ``"meta_first"`` (default: meta step, then the update with the new weights) or
      ``"update_first"`` (the update uses the weights before the meta step).
    nonnegative: clip :math:`\lambda` at 0 after every meta step (not in the paper; default False).

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with state :class:`AutoLambdaState`.

  References:
    Liu, James, Davison, Johns, *Auto-Lambda: Disentangling Dynamic Task Relationships*,
    Transactions on Machine Learning Research (TMLR), 2022. https://arxiv.org/abs/2202.03091
  """
  method = "auto_lambda"
  if not callable(meta_loss_fn):
    raise ValueError(
      f"mtjax: {method}: meta_loss_fn must be a callable (params, validation_batch) -> [T] "
      f"losses, got {meta_loss_fn!r}."
    )
  if not isinstance(num_tasks, int) or isinstance(num_tasks, bool) or num_tasks < 1:
    raise ValueError(
      f"mtjax: {method}: num_tasks must be a positive int, got {num_tasks!r} "
      "(under optax.inject_hyperparams pass static_args=('num_tasks', ...))."
    )
  if order not in ORDERS:
    raise ValueError(f"mtjax: {method}: order must be one of {ORDERS}, got {order!r}.")
  primary = _check_primary(primary_tasks, num_tasks)
  for name, value in (("virtual_lr", virtual_lr), ("virtual_weight_decay", virtual_weight_decay)):
    if numerics._is_concrete(value):  # pylint: disable=protected-access
      v = np.asarray(value, np.float64)
      if v.shape != () or not np.isfinite(v) or v < 0:
        raise ValueError(f"mtjax: {method}: {name} must be a finite nonnegative scalar, got {value!r}.")
  optimizer = weight_optimizer if weight_optimizer is not None else optax.adam(weight_lr)

  def init_fn(params):
    composition.check_not_wrapped("auto_lambda")  # optax.MultiSteps / masked / apply_if_finite around it
    dtype = numerics.gram_dtype(jnp.result_type(*jax.tree.leaves(params)))
    lambdas = jnp.full((num_tasks,), weight_init, dtype)
    return AutoLambdaState(
      lambdas=lambdas, inner_opt_state=optimizer.init(lambdas), weights=lambdas, meta_loss=jnp.zeros((), dtype)
    )

  def update_fn(updates, state, params=None, *, task_losses=None, validation_batch=None, **extra_args):
    del extra_args
    if params is None:
      raise ValueError(
        f"mtjax: {method} needs the parameters (the virtual step theta' = theta - alpha sum_i "
        "lambda_i g_i starts from them): call tx.update(task_grads, state, params, "
        "validation_batch=batch)."
      )
    if validation_batch is None:
      raise ValueError(
        f"mtjax: {method} needs a validation batch for its meta loss: call "
        "tx.update(task_grads, state, params, validation_batch=batch) (meta_loss_fn(params, batch) "
        "is evaluated at the virtual step); mtjax.training.fit passes one with validation_ds=."
      )
    lazy = updates if is_lazy(updates) else None
    if lazy is None:  # mixed precision: bfloat16 rows of float32 params give a float32 update
      updates = rows_lib.upcast_rows(updates, params)
    struct = lazy.shapes() if lazy is not None else updates
    t = tree_lib.check_task_axis(struct, num_tasks, name=f"the task gradients given to {method}")
    tree_lib.check_params_match(struct, params)
    _, losses_check = weighting.check_task_losses(task_losses, t, required=False, method=method, check_finite=True)
    lambdas = state.lambdas
    dtype = lambdas.dtype
    if lazy is None:
      leaves, treedef = rows_lib.flatten(updates)  # a SparseRows stays one leaf

      def combine(w):
        return jax.tree_util.tree_unflatten(treedef, [rows_lib.leaf_weighted_sum(w, leaf) for leaf in leaves])
    else:

      def combine(w):
        return lazy.weighted_sum(w)

    def meta_loss(w):
      d = combine(w)
      shifted = jax.tree.map(
        lambda p, u: (p.astype(dtype) - virtual_lr * (u.astype(dtype) + virtual_weight_decay * p.astype(dtype))).astype(
          jnp.result_type(p)
        ),
        params,
        d,
      )
      out = jnp.asarray(meta_loss_fn(shifted, validation_batch))
      if out.shape == ():
        if primary is not None:
          raise ValueError(
            f"mtjax: {method}: meta_loss_fn returned a scalar, so primary_tasks={primary} cannot "
            "select tasks; return the [T] validation losses."
          )
        return out.astype(dtype), out.astype(dtype)
      if out.shape != (t,):
        raise ValueError(
          f"mtjax: {method}: meta_loss_fn must return the [T] = ({t},) validation task losses or a "
          f"scalar, got shape {out.shape}."
        )
      selected = out if primary is None else out[jnp.asarray(primary)]
      total = jnp.sum(selected.astype(dtype))
      return total, total

    (_, value), grad = jax.value_and_grad(meta_loss, has_aux=True)(lambdas)
    grad = grad.astype(dtype)
    step, inner_opt_state = optimizer.update(grad, state.inner_opt_state, lambdas)
    new_lambdas = optax.apply_updates(lambdas, step).astype(dtype)
    if nonnegative:
      new_lambdas = jnp.maximum(new_lambdas, 0)
    used = new_lambdas if order == "meta_first" else lambdas
    out = combine(used)

    out_leaves = jax.tree.leaves(out)
    update_check = numerics.condition_check(
      jnp.logical_not(jnp.all(jnp.stack([jnp.all(jnp.isfinite(o)) for o in out_leaves]))),
      f"mtjax: non-finite task gradients given to {method} (NaN/inf in the update). Check the loss for NaN/inf "
      "(log of 0, division by zero, exploding logits); with finite gradients, the weighted sum overflowed.",
    )
    meta_check = numerics.condition_check(
      jnp.logical_not(jnp.isfinite(value) & jnp.all(jnp.isfinite(grad))),
      lambda v: (
        f"mtjax: {method}: the meta loss at the virtual step or its gradient in the task weights is not "
        f"finite (meta loss {np.asarray(v[0]).tolist()}, gradient {np.asarray(v[1]).tolist()}); lower "
        "virtual_lr, or check meta_loss_fn and the validation batch for NaN/inf."
      ),
      (value, grad),
    )
    out = numerics.enforce(out, losses_check, meta_check, update_check)
    new_state = AutoLambdaState(
      lambdas=new_lambdas, inner_opt_state=inner_opt_state, weights=used, meta_loss=value.astype(state.meta_loss.dtype)
    )
    return out, new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
