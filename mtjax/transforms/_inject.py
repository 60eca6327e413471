"""``mtjax.inject_hyperparams``: ``optax.inject_hyperparams`` that knows each method's static arguments."""

from __future__ import annotations

import functools
import inspect
import re
from typing import Any, Callable, Iterable, Optional, Union

import jax
import numpy as np
import optax

# Never hyperparameters, whatever their annotation or value: the task count and parameter masks shape
# the computation, and a PRNG key is consumed at init (a callable shared= is a mask, not a schedule).
ALWAYS_STATIC = frozenset({"num_tasks", "shared", "gram_leaves", "key"})
_NUMERIC_ANNOTATION = re.compile(r"\bfloat\b|ArrayLike")


def _annotation_text(annotation) -> Optional[str]:
  if annotation is inspect.Parameter.empty:
    return None
  return annotation if isinstance(annotation, str) else str(annotation)


def _is_float_value(value) -> bool:
  """A float scalar or a floating array (not a bool, int or anything else)."""
  if isinstance(value, bool):
    return False
  if isinstance(value, float):
    return True
  if isinstance(value, (jax.Array, np.ndarray, np.floating)):
    return bool(
      np.issubdtype(np.asarray(value).dtype if not isinstance(value, jax.Array) else value.dtype, np.floating)
    )
  return False


def is_static(name: str, value: Any, annotation: Any) -> bool:
  """Whether the factory argument ``name=value`` is static (rebuilt into every factory call, never traced).

  Rules, in order:

  * ``num_tasks``, ``shared``, ``gram_leaves`` and ``key`` are always static;
  * ``None``, strings and bools are static;
  * an annotated argument is a hyperparameter only if its annotation names ``float`` or ``ArrayLike``
    (``c: ArrayLike``, ``beta: float | jax.Array``); ``int`` arguments (``max_iters``, ``warmup_steps``,
    ``target``), masks, group specs, keys, callables (``meta_loss_fn``) and optax transforms are static;
  * an argument without annotation (e.g. one passed through ``**kwargs``) is a hyperparameter only if its
    value is a float or a floating array: ints and callables are static.

  A hyperparameter's value may be a number, an array or a schedule (a callable); it goes to
  ``state.hyperparams``. (A Python list, e.g. ``linear``'s ``weights``, stays static, as in optax:
  pass an array to make it a hyperparameter.)
  """
  if name in ALWAYS_STATIC or value is None or isinstance(value, (str, bool)):
    return True
  text = _annotation_text(annotation)
  if text is None:
    return not _is_float_value(value)
  return _NUMERIC_ANNOTATION.search(text) is None


def split_arguments(factory: Callable[..., Any], args: tuple, kwargs: dict) -> tuple[dict, set, list]:
  """Binds ``args``/``kwargs`` to ``factory``'s signature.

  Returns ``(arguments, static, parameters)``: every argument by name (defaults applied, ``**kwargs``
  flattened), the names of the static ones (see :func:`is_static`), and keyword-only
  ``inspect.Parameter``s naming them all (the signature optax binds).
  """
  sig = inspect.signature(factory)
  bound = sig.bind(*args, **kwargs)
  bound.apply_defaults()
  arguments, annotations = {}, {}
  for name, value in bound.arguments.items():
    param = sig.parameters[name]
    if param.kind == inspect.Parameter.VAR_KEYWORD:
      for k, v in value.items():
        arguments[k], annotations[k] = v, inspect.Parameter.empty
    elif param.kind == inspect.Parameter.VAR_POSITIONAL:
      if value:
        raise ValueError(
          f"mtjax: inject_hyperparams: {getattr(factory, '__name__', factory)!r} takes *{name}; "
          "pass its arguments by name."
        )
    else:
      arguments[name], annotations[name] = value, param.annotation
  static = {name for name, value in arguments.items() if is_static(name, value, annotations[name])}
  parameters = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY) for name in arguments]
  return arguments, static, parameters


def inject_hyperparams(
  factory: Callable[..., optax.GradientTransformation],
  static_args: Union[str, Iterable[str]] = (),
  hyperparam_dtype: Optional[Any] = None,
) -> Callable[..., optax.GradientTransformationExtraArgs]:
  r"""``optax.inject_hyperparams`` for mtjax methods: the static arguments are derived, not listed.

  ``optax.inject_hyperparams`` turns every numeric argument into a traced hyperparameter and every callable
  into a schedule, so ``optax.inject_hyperparams(mtjax.cagrad)(c=0.4, num_tasks=3)`` fails (a traced
  ``num_tasks`` or ``max_iters``), and a callable ``shared=`` mask would be taken for a schedule. This wrapper
  reads the factory's signature and keeps static what is not a numeric hyperparameter (see
  :func:`is_static`: ``num_tasks``, ``shared``, ``gram_leaves``, ``key``, ``int`` arguments such as
  ``max_iters``, strings, bools, callables that are not float hyperparameters, optax transforms); the float
  hyperparameters (``c``, ``tol``, ``beta``, ``temperature``, ...) land in ``state.hyperparams``, where they
  can be changed between steps, and accept schedules. The update equals the plain factory's.

  Examples:
    >>> import jax, jax.numpy as jnp, optax, mtjax
    >>> params = {'w': jnp.zeros(3)}
    >>> task_grads = {'w': jnp.array([[-4., 1., 1.], [6., 1., 1.]])}
    >>> tx = mtjax.inject_hyperparams(mtjax.cagrad)(c=0.5, num_tasks=2)
    >>> state = tx.init(params)
    >>> sorted(state.hyperparams)  # the numeric hyperparameters; max_iters, num_tasks, ... stay static
    ['c', 'tol']
    >>> updates, state = jax.jit(tx.update)(task_grads, state, params)
    >>> [round(x, 4) for x in updates['w'].tolist()]  # = mtjax.cagrad(c=0.5, num_tasks=2)'s update
    [0.1835, 1.2041, 1.2041]
    >>> state.hyperparams['c'] = jnp.asarray(0.0)  # c = 0: the mean gradient
    >>> updates, state = jax.jit(tx.update)(task_grads, state, params)
    >>> [round(x, 4) for x in updates['w'].tolist()]
    [1.0, 1.0, 1.0]
    >>> anneal = optax.linear_schedule(2.0, 1.0, transition_steps=10)  # a schedule for DWA's temperature
    >>> tx = mtjax.inject_hyperparams(mtjax.dwa)(num_tasks=2, steps_per_epoch=5, temperature=anneal)
    >>> state = tx.init(params)
    >>> for _ in range(4):
    ...   _, state = tx.update(task_grads, state, params, task_losses=jnp.array([1.0, 2.0]))
    >>> round(float(state.hyperparams['temperature']), 4)  # the 4th step used the schedule's value at count 3
    1.7

  Args:
    factory: an mtjax method factory (``mtjax.cagrad``, ``mtjax.mgda``, ...) or any optax factory.
    static_args: more argument names to keep static (added to the derived ones).
    hyperparam_dtype: as in ``optax.inject_hyperparams`` (default: the params' dtype).

  Returns:
    A callable with the factory's arguments (numbers or schedules for the hyperparameters) that returns an
    ``optax.GradientTransformationExtraArgs`` with state ``optax.InjectStatefulHyperparamsState``.
  """
  extra_static = {static_args} if isinstance(static_args, str) else set(static_args)

  @functools.wraps(factory)
  def wrapped(*args, **kwargs) -> optax.GradientTransformationExtraArgs:
    arguments, static, parameters = split_arguments(factory, args, kwargs)
    unknown = extra_static - set(arguments)
    if unknown:
      raise ValueError(
        f"mtjax: inject_hyperparams: static_args {sorted(unknown)} are not arguments of "
        f"{getattr(factory, '__name__', factory)!r} (it takes {sorted(arguments)})."
      )

    def bound_factory(**kw):
      return factory(**kw)

    bound_factory.__signature__ = inspect.Signature(parameters)  # what optax binds: every argument by name
    bound_factory.__name__ = getattr(factory, "__name__", "factory")
    return optax.inject_hyperparams(
      bound_factory, static_args=tuple(sorted(static | extra_static)), hyperparam_dtype=hyperparam_dtype
    )(**arguments)

  return wrapped
