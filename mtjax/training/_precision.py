"""Mixed precision (issue #14): float32 master parameters, bfloat16 forward and backward passes.

The jmp-style policy researchers expect: ``param_dtype`` float32 (the stored parameters, the
optimizer's moments, the gradient method's state and the checkpoints), ``compute_dtype`` bfloat16
(the model's forward and backward passes), ``output_dtype`` float32 (the model outputs, hence the
losses and metrics). The per-task gradients are taken with respect to the bfloat16 copy of the
parameters, so the rows ``[T, ...]`` a method receives are bfloat16 (half the memory of the
float32 rows; the same values as casting float32 params inside the loss, whose cotangents are
bfloat16 before the cast). The method computes its Gram, solver and state in float32 and returns a
float32 update for the float32 master parameters (``mtjax._src.rows.update_dtypes``).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

# config / fit spellings -> the compute dtype's name
NAMES = {"fp32": "float32", "float32": "float32", "f32": "float32", "bf16": "bfloat16", "bfloat16": "bfloat16"}


@dataclasses.dataclass(frozen=True)
class Precision:
  """A mixed-precision policy (as ``jmp.Policy``): the dtypes of the stored parameters, of the
  forward / backward computation and of the model outputs (losses, metrics).

  ``Precision()`` is full float32 (the default: the step is exactly the one without a policy);
  ``Precision.from_name("bf16")`` computes in bfloat16 with float32 master parameters.
  """

  param_dtype: Any = jnp.float32
  compute_dtype: Any = jnp.float32
  output_dtype: Any = jnp.float32

  @property
  def mixed(self) -> bool:
    """Whether the computation dtype differs from the parameters' (casts are inserted)."""
    return jnp.dtype(self.compute_dtype) != jnp.dtype(self.param_dtype)

  @property
  def name(self) -> str:
    """``"fp32"`` or ``"bf16"`` (the compute dtype's short name; any other dtype: its name)."""
    d = jnp.dtype(self.compute_dtype).name
    return {"float32": "fp32", "bfloat16": "bf16"}.get(d, d)

  @classmethod
  def from_name(cls, value) -> Precision:
    """A policy from ``"fp32"``/``"float32"``, ``"bf16"``/``"bfloat16"``, a dtype, ``None`` (float32) or a
    :class:`Precision` (returned as is). Anything else raises a ``ValueError`` naming the choices."""
    if value is None:
      return cls()
    if isinstance(value, Precision):
      return value
    if isinstance(value, str):
      if value.lower() not in NAMES:
        raise ValueError(
          f"mtjax: unknown precision {value!r}; expected one of 'fp32' (default), 'bf16' "
          "(float32 parameters, bfloat16 compute) or their dtype names 'float32', 'bfloat16'."
        )
      value = NAMES[value.lower()]
    try:
      dtype = jnp.dtype(value)
    except TypeError as e:
      raise ValueError(
        f"mtjax: unknown precision {value!r}; expected 'fp32', 'bf16', a float dtype or a mtjax.training.Precision."
      ) from e
    if dtype.name not in ("float32", "bfloat16", "float16"):
      raise ValueError(
        f"mtjax: precision {dtype.name} is not supported; the compute dtype must be float32, "
        "bfloat16 or float16 (the parameters stay float32)."
      )
    return cls(compute_dtype=dtype)

  def cast_to_compute(self, tree):
    """The floating leaves of ``tree`` in the compute dtype (integer ids, keys untouched)."""
    return _cast_floats(tree, self.compute_dtype)

  def cast_to_output(self, tree):
    """The floating leaves of ``tree`` in the output dtype (float32)."""
    return _cast_floats(tree, self.output_dtype)

  def wrap_apply(self, model) -> Callable:
    """An ``apply``-like function of ``model`` (see :func:`mtjax.losses.make_loss_fn`) that runs the
    model in the compute dtype: the params and the floating inputs are cast to it, the outputs (and
    the floating values of the model's aux) back to float32. The other collections (e.g.
    ``batch_stats``) are left in their float32 and their updates cast back to their dtypes."""
    apply_fn = getattr(model, "apply", model)

    def apply(variables, x, *args, **kwargs):
      variables = dict(variables)
      variables["params"] = self.cast_to_compute(variables["params"])
      out = apply_fn(variables, self.cast_to_compute(x), *args, **kwargs)
      if kwargs.get("mutable"):
        out, updates = out
        return self.cast_to_output(out), _like(updates, variables)
      return self.cast_to_output(out)

    return apply


def _is_float(x) -> bool:
  return hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.floating)


def _cast_floats(tree, dtype):
  return jax.tree.map(lambda x: x.astype(dtype) if _is_float(x) and x.dtype != dtype else x, tree)


def _like(updates, variables):
  """``updates`` (a dict of collections) with each floating leaf in the dtype of the variable it
  replaces (a mismatched structure: unchanged)."""
  out = {}
  for name, coll in updates.items():
    old = variables.get(name)
    if old is not None and jax.tree.structure(old) == jax.tree.structure(coll):
      coll = jax.tree.map(lambda n, o: n.astype(o.dtype) if _is_float(n) and _is_float(o) else n, coll, old)
    out[name] = coll
  return out


def describe(policy: Precision) -> str:
  """One line for logs: ``"bf16 (float32 parameters, bfloat16 compute)"`` or ``"fp32"``."""
  if not policy.mixed:
    return policy.name
  return (
    f"{policy.name} ({np.dtype(policy.param_dtype).name} parameters, "
    f"{jnp.dtype(policy.compute_dtype).name} compute, {jnp.dtype(policy.output_dtype).name} losses)"
  )
