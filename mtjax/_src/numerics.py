"""Numerics shared by every transform: safe norms, task Gram matrices, runtime checks."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mtjax._src import config

HIGHEST = jax.lax.Precision.HIGHEST


def safe_norm(x: jax.Array, axis=None, keepdims: bool = False, min_norm: float = 0.0) -> jax.Array:
  """Euclidean norm with a finite derivative at zero (double ``where``, as optax.safe_norm)."""
  sq = jnp.sum(jnp.square(x), axis=axis, keepdims=True)
  positive = sq > 0
  safe_sq = jnp.where(positive, sq, jnp.ones_like(sq))
  norm = jnp.where(positive, jnp.sqrt(safe_sq), jnp.zeros_like(sq))
  norm = jnp.maximum(norm, min_norm)
  if not keepdims:
    norm = jnp.squeeze(norm, axis=axis) if axis is not None else jnp.reshape(norm, ())
  return norm


def safe_div(num: jax.Array, den: jax.Array) -> jax.Array:
  """``num / den`` where ``den != 0`` and ``0`` elsewhere, with finite gradients."""
  nonzero = den != 0
  return jnp.where(nonzero, num / jnp.where(nonzero, den, jnp.ones_like(den)), jnp.zeros_like(num))


def cosine_from_gram(gram: jax.Array) -> jax.Array:
  """Cosine-similarity matrix from a Gram matrix; zero-norm rows give 0, never NaN."""
  diag = jnp.diagonal(gram, axis1=-2, axis2=-1)
  norms = jnp.sqrt(jnp.maximum(diag, 0))
  den = norms[..., :, None] * norms[..., None, :]
  return jnp.clip(safe_div(gram, den), -1.0, 1.0)


def gram_dtype(dtype) -> Any:
  """Accumulation dtype for Gram products: at least float32."""
  return jnp.promote_types(dtype, jnp.float32)


def leaf_gram(task_leaf: jax.Array) -> jax.Array:
  """``[T, T]`` Gram matrix of one leaf with a leading task axis (no concatenation)."""
  num_tasks = task_leaf.shape[0]
  flat = jnp.reshape(task_leaf, (num_tasks, -1))
  acc = gram_dtype(flat.dtype)
  return jnp.matmul(flat, flat.T, precision=HIGHEST, preferred_element_type=acc).astype(acc)


def weighted_task_sum(weights: jax.Array, task_leaf: jax.Array) -> jax.Array:
  """``sum_t weights[t] * task_leaf[t]`` for one leaf, returned in the leaf's dtype."""
  acc = gram_dtype(task_leaf.dtype)
  out = jnp.tensordot(weights.astype(acc), task_leaf.astype(acc), axes=1, precision=HIGHEST)
  return out.astype(task_leaf.dtype)


def _is_concrete(x) -> bool:
  try:
    np.asarray(x)
    return True
  except Exception:  # tracers cannot be converted
    return False


def _raise_nonfinite(values, *, what: str):
  values = np.asarray(values)
  raise ValueError(
      f"mtjax: non-finite {what} detected ({values.tolist()}). Check the loss for NaN/inf "
      "(log of 0, division by zero, exploding logits) before the gradient method sees it."
  )


def check_finite(x: jax.Array, what: str) -> None:
  """Raises a clear error when ``x`` holds NaN or inf.

  Outside ``jit`` this is a plain ``ValueError``. Under ``jit`` the check stays on device and only
  calls back to the host in the failing branch (no per-step host sync); the ``ValueError`` then
  surfaces wrapped in a ``JaxRuntimeError`` whose message contains the same text.
  """
  if _is_concrete(x):
    arr = np.asarray(x)
    if not np.all(np.isfinite(arr)):
      _raise_nonfinite(arr, what=what)
    return
  if not config.runtime_checks_enabled():
    return

  def fail(v):
    if not np.all(np.isfinite(np.asarray(v))):  # re-check: under vmap the cond is a select, both branches run
      _raise_nonfinite(v, what=what)

  jax.lax.cond(
      jnp.any(~jnp.isfinite(x)),
      lambda v: jax.debug.callback(fail, v),
      lambda v: None,
      x,
  )


def check_condition(bad: jax.Array, message: str) -> None:
  """Raises ``ValueError(message)`` when the boolean scalar ``bad`` is true (jit-safe, see check_finite)."""
  if _is_concrete(bad):
    if bool(np.asarray(bad)):
      raise ValueError(message)
    return
  if not config.runtime_checks_enabled():
    return

  def fail(b):
    if np.any(np.asarray(b)):  # re-check: under vmap the cond is a select, both branches run
      raise ValueError(message)

  jax.lax.cond(bad, lambda b: jax.debug.callback(fail, b), lambda b: None, bad)
