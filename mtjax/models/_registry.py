"""A name -> model-class registry, so configs and the command line can pick architectures by name."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Dict, List, Optional, Type, TypeVar

import flax.linen as nn

_MODELS: Dict[str, Type[nn.Module]] = {}
_ModelClass = TypeVar("_ModelClass", bound=Type[nn.Module])  # register() returns the class itself
_RESERVED_FIELDS = ("parent", "name")


def register(name: str) -> Callable[[_ModelClass], _ModelClass]:
  """Class decorator that registers a model under ``name`` (for :func:`get`).

  Registering a different class under a taken name raises; re-registering the same class
  (a module reload) is allowed.

  Examples:
    >>> import flax.linen as nn
    >>> from mtjax import models
    >>> @models.register("my_linear")
    ... class MyLinear(nn.Module):
    ...   num_tasks: int = 2
    ...   @nn.compact
    ...   def __call__(self, x, *, train=False):
    ...     return nn.Dense(self.num_tasks)(x).T, {}
    >>> "my_linear" in models.available()
    True

  Args:
    name: the registry key (lowercase by convention, e.g. ``"mmoe"``).

  Returns:
    A decorator that returns the class unchanged.
  """
  if not isinstance(name, str) or not name:
    raise ValueError(f"mtjax: register() needs a non-empty string name, got {name!r}.")

  def decorator(cls: _ModelClass) -> _ModelClass:
    known = _MODELS.get(name)
    if known is not None and (known.__module__, known.__qualname__) != (cls.__module__, cls.__qualname__):
      raise ValueError(
        f"mtjax: model name {name!r} is already registered to "
        f"{known.__module__}.{known.__qualname__}; choose another name."
      )
    _MODELS[name] = cls
    return cls

  return decorator


def available() -> List[str]:
  """The registered model names, sorted.

  Examples:
    >>> from mtjax import models
    >>> {"mmoe", "ple", "shared_bottom"} <= set(models.available())
    True
  """
  return sorted(_MODELS)


def get(name: str, **config: Any) -> nn.Module:
  """Builds the model registered as ``name`` with the given configuration.

  Every key of ``config`` must be a field of the model's dataclass; an unknown name, an
  unknown key or a missing required field raises a ``ValueError`` that lists the valid choices.

  Examples:
    >>> from mtjax import models
    >>> model = models.get("mmoe", num_tasks=2, num_experts=4, expert=(8,), tower=(4, 1))
    >>> type(model).__name__, model.num_experts
    ('MMoE', 4)

  Args:
    name: a name from :func:`available`.
    **config: the model's attributes.

  Returns:
    An (unbound) Flax module.
  """
  if name not in _MODELS:
    raise ValueError(f"mtjax: unknown model {name!r}; known models: {', '.join(available())}.")
  cls = _MODELS[name]
  fields = {f.name: f for f in dataclasses.fields(cls) if f.name != "parent"}
  unknown = sorted(k for k in config if k not in fields or k == "parent")
  if unknown:
    valid = sorted(k for k in fields if k not in _RESERVED_FIELDS)
    raise ValueError(f"mtjax: model {name!r} has no option(s) {unknown}; its options are: {', '.join(valid)}.")
  missing = sorted(
    k
    for k, f in fields.items()
    if k not in _RESERVED_FIELDS
    and k not in config
    and f.default is dataclasses.MISSING
    and f.default_factory is dataclasses.MISSING
  )
  if missing:
    raise ValueError(f"mtjax: model {name!r} needs option(s) {missing}.")
  return cls(**config)


def partition(model: nn.Module) -> Optional[Callable[[Any], Any]]:
  """The ``shared=`` mask a model declares: every parameter except its task-specific ones.

  A model declares the parameters that one task alone trains with a method
  ``task_specific(self) -> tuple of regular expressions`` over ``'/'``-joined parameter paths
  (every built-in model does: e.g. MMoE's towers and gates). ``fit``, ``run`` and ``compare``
  pass this mask to the gradient method, so a Gram compares tasks only where they compete.
  Returns ``None`` (every parameter shared) for a model that declares nothing; measure such a
  model's partition with :func:`mtjax.infer_shared`.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> from mtjax import models
    >>> model = models.MMoE(num_tasks=2, num_experts=2, expert=(4,), tower=(2, 1))
    >>> params = model.init(jax.random.PRNGKey(0), jnp.ones((3, 5)))['params']
    >>> mask = models.partition(model)(params)
    >>> mask['experts']['expert_0']['Dense_0']['kernel'], mask['gate_0']['logits']['kernel']
    (True, False)

  Args:
    model: a Flax module.

  Returns:
    A callable ``params -> pytree of bools`` (see :func:`mtjax.shared_mask`), or ``None``.
  """
  from mtjax._src.tree import shared_mask  # pylint: disable=import-outside-toplevel

  declared = getattr(model, "task_specific", None)
  if declared is None:
    return None
  patterns = tuple(declared())
  return shared_mask(exclude=list(patterns))
