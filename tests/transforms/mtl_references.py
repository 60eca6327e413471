"""Helpers shared by the tests of the transforms beyond the required set.

Packing of a ``[T, P]`` Jacobian into a multi-leaf pytree, and small plain-NumPy float64 solvers
that the references use (independent of mtjax's solvers: brute force / coordinate descent).
"""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np

# Three leaves, P = 10 parameters (T = 8 stays below P); RANK_SHAPES has P = 6 (T = 8 > P).
SHAPES = (("a/kernel", (2, 3)), ("a/bias", (3,)), ("b", (1,)))
RANK_SHAPES = (("a/kernel", (2, 2)), ("a/bias", (2,)))
J_ORACLE = np.array([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]])


def num_params(shapes=SHAPES) -> int:
  return sum(int(np.prod(s)) for _, s in shapes)


def pack(jac, shapes=SHAPES, dtype=jnp.float32) -> dict:
  """A per-task gradient pytree (nested dicts) whose flattened rows are ``jac`` ``[T, P]``."""
  jac = np.asarray(jac)
  t = jac.shape[0]
  tree, start = {}, 0
  for path, shape in shapes:
    size = int(np.prod(shape))
    node = tree
    parts = path.split("/")
    for part in parts[:-1]:
      node = node.setdefault(part, {})
    node[parts[-1]] = jnp.asarray(jac[:, start : start + size].reshape((t,) + shape), dtype)
    start += size
  return tree


def unpack(update, shapes=SHAPES) -> np.ndarray:
  """The flat float64 vector of a params-shaped update, in :func:`pack`'s column order."""
  out = []
  for path, _ in shapes:
    node = update
    for part in path.split("/"):
      node = node[part]
    out.append(np.asarray(node, np.float64).ravel())
  return np.concatenate(out)


def params_like(shapes=SHAPES, dtype=jnp.float32) -> dict:
  return jax_tree_map_zero(pack(np.zeros((1, num_params(shapes))), shapes, dtype))


def jax_tree_map_zero(tree):
  return {k: jax_tree_map_zero(v) if isinstance(v, dict) else jnp.zeros(v.shape[1:], v.dtype) for k, v in tree.items()}


def random_jac(rng, num_tasks, common=1.0, num=None):
  """Random task gradients with a shared component (larger ``common``: fewer conflicts)."""
  p = num_params() if num is None else num
  return rng.normal(size=(num_tasks, p)) + common * rng.normal(size=(1, p))


def gram_of(jac) -> np.ndarray:
  """The Gram matrix by an explicit loop over task pairs (float64)."""
  jac = np.asarray(jac, np.float64)
  t = jac.shape[0]
  return np.array([[float(np.dot(jac[i], jac[j])) for j in range(t)] for i in range(t)])


def np_nonneg_qp(matrix, linear):
  """``argmin_{v >= 0} 1/2 v^T A v + q^T v`` by enumerating the free sets (KKT point), float64.

  Returns ``None`` when no KKT point exists (the QP is unbounded below).
  """
  a = np.asarray(matrix, np.float64)
  q = np.asarray(linear, np.float64)
  n = q.shape[0]
  scale = max(1.0, float(np.abs(a).max()), float(np.abs(q).max()))
  best, best_f = None, np.inf
  for size in range(n + 1):
    for free in itertools.combinations(range(n), size):
      idx = list(free)
      v = np.zeros(n)
      if idx:
        sub = a[np.ix_(idx, idx)]
        v[idx] = np.linalg.lstsq(sub, -q[idx], rcond=None)[0]
        if np.linalg.norm(sub @ v[idx] + q[idx]) > 1e-9 * scale:
          continue
      if np.any(v < -1e-12):
        continue
      grad = a @ v + q
      if np.any(grad < -1e-9 * scale):
        continue
      f = 0.5 * v @ a @ v + q @ v
      if f < best_f - 1e-14 * scale:
        best, best_f = np.maximum(v, 0.0), f
  return best


def np_balance(gram, alpha, sweeps=20000, tol=1e-13):
  """Solves ``G w = w^(-1/alpha)``, ``w > 0`` by cyclic coordinate Newton steps (float64).

  Each coordinate equation ``G_ii w_i + s_i = w_i^(-1/alpha)`` (``s_i`` the other terms) has
  one positive root (the left side increases, the right side decreases); it is found by Newton's
  method in ``log w_i``. Sweeps repeat until no weight moves by more than ``tol`` (relative).
  """
  g = np.asarray(gram, np.float64)
  t = g.shape[0]
  w = np.ones(t) / np.sqrt(np.maximum(np.diag(g), 1e-300))
  for _ in range(sweeps):
    moved = 0.0
    for i in range(t):
      s = sum(g[i, j] * w[j] for j in range(t) if j != i)
      y = np.log(w[i])
      for _ in range(100):
        x = np.exp(y)
        f = g[i, i] * x + s - np.exp(-y / alpha)
        df = g[i, i] * x + np.exp(-y / alpha) / alpha
        step = f / df
        y -= np.clip(step, -2.0, 2.0)
        if abs(step) < 1e-15:
          break
      new = np.exp(y)
      moved = max(moved, abs(new - w[i]) / new)
      w[i] = new
    if moved < tol:
      return w
  raise AssertionError("np_balance did not converge")


def backward_counter():
  """``(counted, traces)``: an identity with a custom VJP whose backward rule appends to ``traces``.

  The rule runs once per *traced* backward pass through ``counted`` (``jax.make_jaxpr`` or a
  ``jit`` trace), so ``len(traces)`` counts the backward passes a computation asks for.
  """
  traces = []

  @jax.custom_vjp
  def counted(x):
    return x

  def fwd(x):
    return x, None

  def bwd(_, g):
    traces.append(1)
    return (g,)

  counted.defvjp(fwd, bwd)
  return counted, traces


def np_min_norm_gram(gram, tol=1e-8):
  """``argmin_{w in simplex} w^T G w`` by enumerating supports (KKT on the affine hull), float64."""
  gram = np.asarray(gram, np.float64)
  t = gram.shape[0]
  best_w, best_f = None, np.inf
  for size in range(1, t + 1):
    for idx in map(list, itertools.combinations(range(t), size)):
      kkt = np.block([[gram[np.ix_(idx, idx)], np.ones((size, 1))], [np.ones((1, size)), np.zeros((1, 1))]])
      rhs = np.zeros(size + 1)
      rhs[-1] = 1.0
      sol = np.linalg.lstsq(kkt, rhs, rcond=None)[0]
      if np.linalg.norm(kkt @ sol - rhs) > tol * max(1.0, np.abs(kkt).max()) or np.any(sol[:size] < -1e-12):
        continue
      w = np.zeros(t)
      w[idx] = np.maximum(sol[:size], 0.0)
      w /= w.sum()
      f = float(w @ gram @ w)
      if f < best_f - 1e-15 * max(1.0, gram.max()):
        best_w, best_f = w, f
  return best_w


def np_pcgrad(jac, orders) -> np.ndarray:
  """PCGrad on the rows of ``jac`` [T, P] (NumPy float64, the paper's loop): row ``i`` is projected off
  each row ``j`` of ``orders[i]`` it conflicts with, in that order; the projected rows are summed."""
  jac = np.asarray(jac, np.float64)
  out = np.zeros(jac.shape[1])
  for i in range(jac.shape[0]):
    g = jac[i].copy()
    for j in orders[i]:
      ip, nsq = g @ jac[j], jac[j] @ jac[j]
      if ip < 0 and nsq > 0:
        g = g - ip / nsq * jac[j]
    out += g
  return out
