"""Per-task gradients: one update's worth of Jacobian rows with a leading task axis."""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp

PyTree = Any
STRATEGIES = ("auto", "loop", "map", "vmap")


def _rows(vjp_fn, num_tasks: int, dtype, strategy: str) -> PyTree:
  """The T Jacobian rows ``vjp_fn(e_t)``, stacked on a leading task axis, by ``strategy``."""
  strat = default_strategy() if strategy == "auto" else strategy
  eye = jnp.eye(num_tasks, dtype=dtype)
  if strat == "loop":
    rows = [vjp_fn(eye[t])[0] for t in range(num_tasks)]
    return jax.tree.map(lambda *xs: jnp.stack(xs), *rows)
  if strat == "map":
    return jax.lax.map(lambda c: vjp_fn(c)[0], eye)
  return jax.vmap(lambda c: vjp_fn(c)[0])(eye)


@jax.tree_util.register_pytree_node_class
class TaskJacobian:
  r"""Per-task gradients not yet computed: the task losses' VJP after the shared forward pass.

  ``mtjax.task_grads(loss_fn, deferred=True)`` returns one in place of the stacked gradients.
  Every mtjax transform accepts it where it accepts task gradients, and pays only for what it
  needs:

  * methods whose weights do not read the gradients (``linear``, ``dwa``, ``uncertainty``,
    ``rlw``) form :math:`\sum_t w_t g_t = J^	op w` with ONE backward pass (two when task-specific
    leaves take the plain sum, ``task_specific="sum"`` with a ``shared=`` mask);
  * every other method calls :meth:`materialize` (the T backward passes of ``strategy``) and gives
    exactly the result it gives on ``task_grads(loss_fn)``.

  It is a pytree (the VJP's residuals are its leaves), so it crosses ``jit`` boundaries. Code
  outside mtjax that expects arrays should call :meth:`materialize`.

  Attributes:
    num_tasks: ``T``.
    strategy: how :meth:`materialize` computes the T rows (``"auto"``, ``"loop"``, ``"map"``, ``"vmap"``).
  """

  def __init__(self, vjp_fn, num_tasks: int, dtype, strategy: str = "auto", param_struct=None):
    self.vjp_fn = vjp_fn
    self.num_tasks = int(num_tasks)
    self.dtype = jnp.dtype(dtype)
    self.strategy = strategy
    # (treedef, ((shape, dtype), ...)) of the differentiated params: static, hashable
    self.param_struct = param_struct

  @classmethod
  def from_vjp(cls, vjp_fn, num_tasks: int, dtype, strategy: str, params) -> "TaskJacobian":
    leaves, treedef = jax.tree.flatten(params)
    struct = (treedef, tuple((tuple(jnp.shape(x)), jnp.result_type(x)) for x in leaves))
    return cls(vjp_fn, num_tasks, dtype, strategy, struct)

  def tree_flatten(self):
    return (self.vjp_fn,), (self.num_tasks, self.dtype, self.strategy, self.param_struct)

  @classmethod
  def tree_unflatten(cls, aux, children):
    return cls(children[0], *aux)

  def weighted_sum(self, weights: jax.Array) -> PyTree:
    r""":math:`\sum_t w_t \nabla L_t = J^\top w`, params-shaped, with one backward pass."""
    weights = jnp.asarray(weights)
    if weights.shape != (self.num_tasks,):
      raise ValueError(f"mtjax: TaskJacobian.weighted_sum needs {self.num_tasks} weights, got shape {weights.shape}.")
    return self.vjp_fn(weights.astype(self.dtype))[0]

  def materialize(self) -> PyTree:
    """The per-task gradients, every leaf ``[T, *param.shape]`` (T backward passes)."""
    return _rows(self.vjp_fn, self.num_tasks, self.dtype, self.strategy)

  def shapes(self) -> PyTree:
    """``jax.ShapeDtypeStruct`` leaves ``[T, *param.shape]``: the materialized structure, no compute."""
    if self.param_struct is None:  # built by hand from a VJP: trace it abstractly
      grad = jax.eval_shape(lambda: self.vjp_fn(jnp.zeros((self.num_tasks,), self.dtype))[0])
      return jax.tree.map(lambda g: jax.ShapeDtypeStruct((self.num_tasks,) + tuple(g.shape), g.dtype), grad)
    treedef, specs = self.param_struct
    return jax.tree.unflatten(treedef, [jax.ShapeDtypeStruct((self.num_tasks,) + shape, dtype)
                                        for shape, dtype in specs])


def materialize(task_grads: Any) -> PyTree:
  """``task_grads`` itself, or the stacked gradients of a :class:`TaskJacobian`."""
  return task_grads.materialize() if isinstance(task_grads, TaskJacobian) else task_grads


def default_strategy(backend: str | None = None) -> str:
  """The strategy ``"auto"`` resolves to on ``backend`` (default: JAX's default backend).

  On CPU, ``"map"`` (one shared forward, then the T VJPs under ``lax.map``) was the fastest and
  leanest in ``benchmarks/step_time.py`` (MMoE, batch 1024, 2-core CPU): at T = 3 it ran at 0.62x
  the ``F + T*B`` floor (unrolled loop 0.82x, vmap 1.13x), at T = 10 at 1.08x (loop 1.26x, vmap
  2.2x) with a third of the loop's temporary memory. On GPU/TPU the batched ``"vmap"`` form turns
  T backward passes into matrix-matrix ones and is expected to win; this project has not measured
  it on an accelerator yet, so check with the benchmark.
  """
  backend = backend or jax.default_backend()
  return "map" if backend == "cpu" else "vmap"


def _check_losses(losses, where: str):
  if isinstance(losses, (tuple, list, dict)):
    raise ValueError(
        f"mtjax: {where}: loss_fn returned a {type(losses).__name__}, not a [T] vector of task losses. If it "
        "returns (losses, aux), pass has_aux=True; otherwise return jnp.stack([loss_0, loss_1, ...]).")
  shape = jnp.shape(losses)
  if len(shape) != 1:
    raise ValueError(
        f"mtjax: {where}: loss_fn must return a 1-D vector of task losses [T] "
        f"(one scalar per task), got shape {shape}. "
        + ("Return jnp.stack([loss_0, loss_1, ...]) instead of their sum." if len(shape) == 0 else
           "Reduce over the batch (e.g. mean over axis 0) inside loss_fn.")
    )
  if shape[0] < 1:
    raise ValueError(f"mtjax: {where}: loss_fn returned an empty vector of task losses.")
  if not jnp.issubdtype(jnp.result_type(losses), jnp.floating):
    raise ValueError(f"mtjax: {where}: task losses must be floating point, got {jnp.result_type(losses)}.")


def task_grads(
    loss_fn: Callable[..., Any],
    *,
    strategy: str = "auto",
    has_aux: bool = False,
    argnums: int = 0,
    deferred: bool = False,
) -> Callable[..., Any]:
  r"""Transforms ``loss_fn(params, ...) -> [T]`` into a function returning losses and per-task gradients.

  The returned function gives ``(task_losses, task_grads)`` -- or ``((task_losses, aux),
  task_grads)`` with ``has_aux`` -- where every leaf of ``task_grads`` is ``[T, *param.shape]``:
  row ``t`` is :math:`\nabla_\theta L_t(\theta)`. This is the input every mtjax transform expects.

  Strategies (all give the same result):

  * ``"loop"``: one shared forward (``jax.vjp``), then T VJPs with unit cotangents ``e_t``,
    unrolled. Cost ~ ``F + T * B``, the floor for a full per-task Jacobian.
  * ``"map"``: the same T VJPs under ``lax.map``: one compiled backward run T times, a smaller
    program and less temporary memory; the fastest on CPU in our benchmark.
  * ``"vmap"``: ``jax.vmap`` of the VJP over the T cotangents (batched backward; may win on GPU/TPU).
  * ``"auto"``: :func:`default_strategy` for the default backend.

  With ``deferred=True`` the function runs only the shared forward pass and returns a
  :class:`TaskJacobian` instead of the stacked gradients; a transform then computes just what it
  needs: ONE backward pass for the methods whose weights do not read the gradients (``linear``,
  ``dwa``, ``uncertainty``, ``rlw``), the T rows (by ``strategy``) for the others, with the same
  results either way.

  Examples:
    >>> import jax.numpy as jnp, mtjax
    >>> def loss_fn(params, batch):
    ...   pred = batch['x'] @ params['w']
    ...   return jnp.stack([jnp.mean((pred - batch['y1'])**2), jnp.mean((pred - batch['y2'])**2)])
    >>> params = {'w': jnp.zeros(3)}
    >>> batch = {'x': jnp.eye(3), 'y1': jnp.ones(3), 'y2': -jnp.ones(3)}
    >>> losses, grads = mtjax.task_grads(loss_fn)(params, batch)
    >>> losses.shape, grads['w'].shape
    ((2,), (2, 3))

  Args:
    loss_fn: function of ``params`` (argument ``argnums``) and anything else, returning a 1-D
      array of T task losses (or ``(losses, aux)`` with ``has_aux=True``).
    strategy: one of ``"auto"``, ``"loop"``, ``"map"``, ``"vmap"``.
    has_aux: whether ``loss_fn`` returns ``(losses, aux)``.
    argnums: index of the parameters argument.
    deferred: return a :class:`TaskJacobian` (no backward pass yet) instead of the gradients.

  Returns:
    A function with the signature of ``loss_fn`` returning ``(task_losses, task_grads)``.

  Raises:
    ValueError: for an unknown strategy or a ``loss_fn`` that does not return a 1-D vector.
  """
  if strategy not in STRATEGIES:
    raise ValueError(f"mtjax: unknown task_grads strategy {strategy!r}; expected one of {STRATEGIES}.")
  if not isinstance(argnums, int):
    raise ValueError("mtjax: task_grads differentiates one argument; argnums must be an int.")

  @functools.wraps(loss_fn)
  def wrapped(*args, **kwargs):
    strat = default_strategy() if strategy == "auto" else strategy
    params = args[argnums]

    def f(p):
      call_args = list(args)
      call_args[argnums] = p
      return loss_fn(*call_args, **kwargs)

    if has_aux:
      out = jax.eval_shape(f, params)
      if not (isinstance(out, tuple) and len(out) == 2):
        raise ValueError("mtjax: task_grads(has_aux=True): loss_fn must return (task_losses, aux).")
      losses, vjp_fn, aux = jax.vjp(f, params, has_aux=True)
    else:
      losses, vjp_fn = jax.vjp(f, params)
    _check_losses(losses, "task_grads")
    num_tasks = losses.shape[0]
    if deferred:
      grads = TaskJacobian.from_vjp(vjp_fn, num_tasks, losses.dtype, strat, params)
    else:
      grads = _rows(vjp_fn, num_tasks, losses.dtype, strat)
    return ((losses, aux), grads) if has_aux else (losses, grads)

  return wrapped


def multi_input_task_grads(
    loss_fn: Callable[..., Any],
    *,
    has_aux: bool = False,
) -> Callable[..., Any]:
  r"""Per-task gradients when each task has its own batch (stacked along a leading task axis).

  ``loss_fn(params, task_batch) -> scalar`` is the loss of ONE task on ITS batch. The returned
  function takes ``(params, task_batches)``, where every leaf of ``task_batches`` is
  ``[T, ...]``, and returns ``(task_losses [T], task_grads)`` computed with ``jax.vmap`` of
  ``jax.value_and_grad`` over the task axis (``((losses, aux), grads)`` with ``has_aux``).
  To tell tasks apart inside ``loss_fn``, put a task index in the batch.

  Examples:
    >>> import jax.numpy as jnp, mtjax
    >>> def loss_fn(params, batch):
    ...   return jnp.mean((batch['x'] @ params['w'] - batch['y'])**2)
    >>> batches = {'x': jnp.ones((2, 4, 3)), 'y': jnp.stack([jnp.ones(4), -jnp.ones(4)])}
    >>> losses, grads = mtjax.multi_input_task_grads(loss_fn)({'w': jnp.zeros(3)}, batches)
    >>> losses.shape, grads['w'].shape
    ((2,), (2, 3))
  """

  def wrapped(params, task_batches):
    leaves = jax.tree.leaves(task_batches)
    if not leaves:
      raise ValueError("mtjax: multi_input_task_grads: task_batches is empty.")
    sizes = {jnp.shape(x)[0] if jnp.ndim(x) else None for x in leaves}
    if len(sizes) != 1 or None in sizes:
      raise ValueError(
          "mtjax: multi_input_task_grads: every leaf of task_batches needs the same leading task "
          f"axis, got leading sizes {sorted(map(str, sizes))}."
      )

    def one(batch):
      out = loss_fn(params, batch)
      loss = out[0] if has_aux else out
      if jnp.ndim(loss) != 0:
        raise ValueError(
            "mtjax: multi_input_task_grads: loss_fn must return the scalar loss of one task on its "
            f"batch, got shape {jnp.shape(loss)}."
        )
      return out

    vg = jax.value_and_grad(lambda p, b: loss_fn(p, b), has_aux=has_aux)
    jax.eval_shape(one, jax.tree.map(lambda x: x[0], task_batches))
    out, grads = jax.vmap(vg, in_axes=(None, 0))(params, task_batches)
    return out, grads

  return wrapped
