"""``mtjax.accumulate``: per-task gradient accumulation over micro-steps (``optax.MultiSteps`` for mtjax)."""

from __future__ import annotations

from typing import Any, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mtjax._src import numerics
from mtjax._src import tree as tree_lib
from mtjax._src.sparse import is_sparse
from mtjax._src.task_grads import is_lazy

PyTree = Any


class AccumulateState(NamedTuple):
  """State of :func:`accumulate` (fixed shapes: it can be checkpointed and carried through ``lax.scan``).

  Attributes:
    mini_step: int32 scalar, the micro-steps accumulated since the last inner update (``0 .. every_k - 1``).
    gradient_step: int32 scalar, the number of inner updates emitted so far.
    task_grads: the running mean of this cycle's per-task gradients, every leaf ``[T, *param.shape]``.
    task_losses: the running mean of this cycle's per-task losses ``[T]`` (zeros when none are passed).
    inner_state: the wrapped transform's state (it changes on the emitting micro-steps only).
  """

  mini_step: jax.Array
  gradient_step: jax.Array
  task_grads: PyTree
  task_losses: jax.Array
  inner_state: Any


def _find_num_tasks(state) -> Optional[int]:
  """``T`` from the first non-empty ``weights`` record (``[T]`` or ``[K, T]``) of a method state in ``state``."""
  stack = [state]
  while stack:
    s = stack.pop(0)
    w = getattr(s, "weights", None)
    if w is not None and hasattr(w, "shape") and np.ndim(w) >= 1 and np.shape(w)[-1] > 0:
      return int(np.shape(w)[-1])
    if isinstance(s, (tuple, list)):
      stack.extend(s)
    elif isinstance(s, dict):
      stack.extend(s.values())
  return None


def _accumulator_dtype(p, dtype):
  if dtype is not None:
    return jnp.dtype(dtype)
  p_dtype = jnp.result_type(p)
  return jnp.promote_types(p_dtype, jnp.float32) if jnp.issubdtype(p_dtype, jnp.floating) else jnp.dtype(jnp.float32)


def accumulate(
  inner: optax.GradientTransformation,
  every_k: int,
  *,
  num_tasks: Optional[int] = None,
  pass_through: Sequence[str] = (),
  accumulator_dtype: Optional[Any] = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Averages per-task gradients (and losses) over ``every_k`` micro-steps, then runs ``inner`` once on the mean.

  ``optax.MultiSteps`` for multi-task methods: ``optax.MultiSteps`` keeps a params-shaped accumulator, so
  it cannot wrap a method (which consumes ``[T, ...]`` gradients), and after the method it would average
  the *combined* updates -- a different algorithm, since the methods are not linear in the gradients
  (PCGrad of a mean is not the mean of PCGrads). ``accumulate`` keeps the running mean of the per-task
  gradients ``[T, *param.shape]`` and of ``task_losses`` ``[T]``; on every ``every_k``-th micro-step it
  calls ``inner`` (typically ``optax.chain(method, optimizer)``) on these means and returns its update;
  on the others it returns zeros and leaves ``inner``'s state untouched. ``k`` micro-steps with
  gradients ``J_1 .. J_k`` and losses ``L_1 .. L_k`` therefore make exactly one step of ``inner`` on
  :math:`\bar J = \frac1k \sum_i J_i` and :math:`\bar L = \frac1k \sum_i L_i` (a stateful method, e.g.
  GradVac's targets or DWA's loss history, sees one step per cycle). Jit-compatible; the state has fixed
  shapes; the branch is a ``lax.cond`` under ``jit`` and a Python ``if`` otherwise.

  Extra arguments: ``task_losses`` (shape ``[T]``) are averaged; pass them at every micro-step or at none.
  Any other extra argument of ``update`` (Auto-Lambda's ``validation_batch``, FAMO's
  ``previous_task_losses_after_step``, an optax ``value``) must be listed in ``pass_through``: it is handed
  to ``inner`` at the emitting micro-step (its value there; ignored on the others). An unlisted one raises.
  Deferred Jacobians (``mtjax.TaskJacobian``, ``RepJacobian``, ``SharedJacobian``: a linear map of one batch)
  and sparse rows (``mtjax.SparseRows``) cannot be averaged into a fixed-shape buffer and raise, naming the
  dense form to pass instead.

  Examples:
    >>> import jax, jax.numpy as jnp, optax, mtjax
    >>> params = {'w': jnp.zeros(3)}
    >>> tx = mtjax.accumulate(optax.chain(mtjax.pcgrad(num_tasks=2), optax.sgd(1.0)), every_k=2)
    >>> state = tx.init(params)
    >>> step = jax.jit(tx.update)
    >>> updates, state = step({'w': jnp.array([[-8., 2., 0.], [6., 0., 2.]])}, state, params)
    >>> print(updates['w'], int(state.mini_step))  # micro-step 1 of 2: nothing yet
    [0. 0. 0.] 1
    >>> updates, state = step({'w': jnp.array([[0., 0., 2.], [6., 2., 0.]])}, state, params)
    >>> print(jnp.round(-updates['w'], 4))  # PCGrad of the mean gradients [[-4, 1, 1], [6, 1, 1]]
    [0.5848 3.8012 3.8012]
    >>> int(state.gradient_step), int(state.mini_step)
    (1, 0)

  Args:
    inner: the transform to run on the mean gradients, e.g. ``optax.chain(mtjax.pcgrad(...),
      optax.adam(...))`` (the method first, as always).
    every_k: micro-steps per inner step (a static ``int >= 1``).
    num_tasks: ``T``, to size the accumulator at ``init``; by default read from the method's state (its
      ``weights`` record), so build the method with ``num_tasks=T`` or pass it here.
    pass_through: names of extra ``update`` arguments handed to ``inner`` at the emitting micro-step.
    accumulator_dtype: dtype of the running means (default: each parameter's dtype, at least float32).

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with state :class:`AccumulateState`.
  """
  if isinstance(every_k, bool) or not isinstance(every_k, (int, np.integer)) or every_k < 1:
    raise ValueError(f"mtjax: accumulate: every_k must be a static int >= 1, got {every_k!r}.")
  every_k = int(every_k)
  if num_tasks is not None and (isinstance(num_tasks, bool) or not isinstance(num_tasks, int) or num_tasks < 1):
    raise ValueError(f"mtjax: accumulate: num_tasks must be a positive int, got {num_tasks!r}.")
  if isinstance(pass_through, str):
    pass_through = (pass_through,)
  pass_through = tuple(pass_through)
  inner = optax.with_extra_args_support(inner)

  def init_fn(params):
    inner_state = inner.init(params)
    t = num_tasks if num_tasks is not None else _find_num_tasks(inner_state)
    if t is None:
      raise ValueError(
        "mtjax: accumulate needs the number of tasks at init to size its [T, *param.shape] accumulator: "
        "build the method with num_tasks=T (mtjax.pcgrad(num_tasks=T)) or pass mtjax.accumulate(..., num_tasks=T)."
      )
    grads = jax.tree.map(
      lambda p: jnp.zeros((t,) + tuple(np.shape(p)), _accumulator_dtype(p, accumulator_dtype)), params
    )
    leaves = jax.tree.leaves(grads)
    loss_dtype = jnp.result_type(*leaves) if leaves else jnp.float32
    return AccumulateState(
      mini_step=jnp.zeros((), jnp.int32),
      gradient_step=jnp.zeros((), jnp.int32),
      task_grads=grads,
      task_losses=jnp.zeros((t,), loss_dtype),
      inner_state=inner_state,
    )

  def check_inputs(updates, state, task_losses, extra_args):
    if is_lazy(updates):
      raise ValueError(
        "mtjax: accumulate: got a deferred Jacobian (mtjax.TaskJacobian from task_grads(..., deferred=True), or "
        "strategy='rep'/'shared'): a linear map of one batch, which cannot be averaged over micro-steps. Pass the "
        "stacked per-task gradients, every leaf [T, *param.shape]: mtjax.task_grads(loss_fn)(params, batch) "
        "(deferred=False), or jac.materialize()."
      )
    flat = jax.tree_util.tree_flatten_with_path(updates, is_leaf=is_sparse)[0]
    for path, leaf in flat:
      if is_sparse(leaf):
        raise ValueError(
          f"mtjax: accumulate: leaf '{tree_lib.path_str(path)}' holds sparse embedding rows (mtjax.SparseRows), "
          "whose touched rows differ between micro-steps: they cannot be averaged into a fixed-shape buffer. "
          "Pass dense per-task gradients: mtjax.task_grads(loss_fn, sparse=False), or mtjax.densify(task_grads) "
          "(the accumulator then holds [T, vocab, dim] per table)."
        )
    unknown = sorted(set(extra_args) - set(pass_through))
    if unknown:
      raise ValueError(
        f"mtjax: accumulate: cannot accumulate the extra argument(s) {unknown}: only task_losses ([T]) are "
        f"averaged over the micro-steps. To hand the emitting micro-step's value to the inner transform, build "
        f"it with mtjax.accumulate(inner, every_k, pass_through={tuple(unknown)!r})."
      )
    acc_def = jax.tree.structure(state.task_grads)
    upd_def = jax.tree.structure(updates)
    if acc_def != upd_def:
      raise ValueError(
        "mtjax: accumulate: the task gradients' tree structure differs from the params' (the accumulator's): "
        "pass the per-task gradients of these params, every leaf [T, *param.shape] (mtjax.task_grads)."
      )
    for (path, g), a in zip(flat, jax.tree.leaves(state.task_grads)):
      if tuple(np.shape(g)) != tuple(np.shape(a)):
        raise ValueError(
          f"mtjax: accumulate: leaf '{tree_lib.path_str(path)}' of the task gradients has shape "
          f"{tuple(np.shape(g))}, but the accumulator holds [T, *param.shape] = {tuple(np.shape(a))}. Pass "
          "per-task gradients with a leading task axis (mtjax.task_grads); micro-batch gradients [M, T, ...] "
          "(MoDo, SDMGrad) are not accumulated."
        )
    if task_losses is not None and tuple(np.shape(task_losses)) != tuple(np.shape(state.task_losses)):
      raise ValueError(
        f"mtjax: accumulate: task_losses must have shape {tuple(np.shape(state.task_losses))} (one loss per "
        f"task), got {tuple(np.shape(task_losses))}."
      )

  def update_fn(updates, state, params=None, *, task_losses=None, **extra_args):
    check_inputs(updates, state, task_losses, extra_args)
    n = state.mini_step
    # Running mean (as optax.MultiSteps): acc + (g - acc) / (n + 1), in the accumulator's dtype.
    grads = jax.tree.map(
      lambda acc, g: acc + (jnp.asarray(g).astype(acc.dtype) - acc) / (n + 1).astype(acc.dtype),
      state.task_grads,
      updates,
    )
    losses = state.task_losses
    if task_losses is not None:
      losses = losses + (jnp.asarray(task_losses).astype(losses.dtype) - losses) / (n + 1).astype(losses.dtype)
    emit = n == every_k - 1

    passed = {k: extra_args[k] for k in pass_through if k in extra_args}

    def run_inner(grads, losses, inner_state, params):
      mean = jax.tree.map(lambda a, g: a.astype(jnp.result_type(g)), grads, updates)
      kwargs = dict(passed)
      if task_losses is not None:
        kwargs["task_losses"] = losses.astype(jnp.result_type(task_losses))
      return inner.update(mean, inner_state, params, **kwargs)

    def skip(grads, losses, inner_state, params):
      shapes, _ = jax.eval_shape(run_inner, grads, losses, inner_state, params)
      return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes), inner_state

    operands = (grads, losses, state.inner_state, params)
    if not numerics._is_concrete(emit):  # pylint: disable=protected-access  # under jit: one lax.cond
      out, inner_state = jax.lax.cond(emit, run_inner, skip, *operands)
    else:  # eagerly: only the branch taken runs
      out, inner_state = (run_inner if bool(emit) else skip)(*operands)
    keep = jnp.logical_not(emit)
    new_state = AccumulateState(
      mini_step=jnp.where(emit, 0, n + 1).astype(jnp.int32),
      gradient_step=(state.gradient_step + emit.astype(jnp.int32)).astype(jnp.int32),
      task_grads=jax.tree.map(lambda a: jnp.where(keep, a, jnp.zeros_like(a)), grads),
      task_losses=jnp.where(keep, losses, jnp.zeros_like(losses)),
      inner_state=inner_state,
    )
    return out, new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
