"""Per-task gradients: one update's worth of Jacobian rows with a leading task axis."""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp

PyTree = Any
STRATEGIES = ("auto", "loop", "map", "vmap")


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
    eye = jnp.eye(num_tasks, dtype=losses.dtype)

    if strat == "loop":
      rows = [vjp_fn(eye[t])[0] for t in range(num_tasks)]
      grads = jax.tree.map(lambda *xs: jnp.stack(xs), *rows)
    elif strat == "map":
      grads = jax.lax.map(lambda c: vjp_fn(c)[0], eye)
    else:  # vmap
      grads = jax.vmap(lambda c: vjp_fn(c)[0])(eye)
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
