"""Small on-device solvers shared by the Gram-based transforms.

* :func:`min_norm_simplex`: the min-norm point of the convex hull of the task gradients, i.e.
  ``argmin_{w in simplex} w^T G w`` on a ``[T, T]`` Gram matrix (MGDA and friends), by pairwise
  Frank-Wolfe under ``lax.while_loop`` with a static iteration cap and a traceable tolerance.
* :func:`project_simplex`: exact sort-based Euclidean projection onto the scaled simplex
  ``{x >= 0, sum x = total}`` (PE-LTR).
* :func:`scale_gram`: divides a Gram matrix by its largest diagonal entry so that solver
  tolerances are relative (scale-invariant solving for tiny and huge gradients alike).

Everything is jit-safe and works in float32 and float64.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from mtjax._src import numerics


def scale_gram(gram: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Returns ``(gram / s, s)`` with ``s`` the largest diagonal entry (``1`` for a zero Gram).

  The min-norm weights, the PE-LTR weights and the KKT conditions are invariant to a positive
  rescaling of the Gram, so solving on the scaled matrix makes every tolerance relative to the
  largest squared task-gradient norm.
  """
  s = jnp.max(jnp.diagonal(gram, axis1=-2, axis2=-1), axis=-1)
  good = jnp.isfinite(s) & (s > 0)
  s = jnp.where(good, s, jnp.ones_like(s))
  return gram / s, s


class MinNormResult(NamedTuple):
  """Result of :func:`min_norm_simplex`.

  Attributes:
    weights: ``[T]`` point of the simplex.
    gap: pairwise duality gap ``max_{i: w_i > 0} (G w)_i - min_i (G w)_i`` on the scaled Gram
      (``0`` at the optimum; it bounds the Frank-Wolfe gap ``w^T G w - min_i (G w)_i``).
    iterations: number of Frank-Wolfe steps taken.
  """

  weights: jax.Array
  gap: jax.Array
  iterations: jax.Array


def _pairwise_gap(gw: jax.Array, w: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """``(gap, toward, away)``: the Frank-Wolfe vertex, the away vertex of the support and their gap."""
  toward = jnp.argmin(gw)
  away = jnp.argmax(jnp.where(w > 0, gw, -jnp.inf))
  return gw[away] - gw[toward], toward, away


def _corrective_step(gram: jax.Array, w: jax.Array) -> jax.Array:
  """Moves ``w`` toward the minimizer of ``w^T G w`` on the affine hull of its support.

  The affine minimizer ``y`` solves ``[[G_S, 1], [1^T, 0]] [y; lam] = [0; 1]`` (pseudo-inverse, so a
  singular ``G_S`` is fine); ``w`` moves to ``y`` or, if ``y`` leaves the simplex, to the boundary
  point on the segment (Wolfe's minor cycle), which drops a vertex. The move is kept only when it
  does not increase the objective (guards against rounding on ill-conditioned supports).
  """
  t = w.shape[0]
  support = w > 0
  both = support[:, None] & support[None, :]
  eye = jnp.eye(t, dtype=gram.dtype)
  top = jnp.where(both, gram, jnp.zeros_like(gram)) + jnp.where(support, 0.0, 1.0)[:, None] * eye
  ones = jnp.where(support, 1.0, 0.0).astype(gram.dtype)
  kkt = jnp.concatenate([
      jnp.concatenate([top, ones[:, None]], axis=1),
      jnp.concatenate([ones, jnp.zeros((1,), gram.dtype)])[None, :],
  ], axis=0)
  rhs = jnp.concatenate([jnp.zeros((t,), gram.dtype), jnp.ones((1,), gram.dtype)])
  y = jnp.matmul(jnp.linalg.pinv(kkt), rhs, precision=numerics.HIGHEST)[:t]
  y = jnp.where(support, y, 0.0)
  # Largest step theta in [0, 1] keeping w + theta (y - w) >= 0.
  shrinking = support & (y < w)
  ratios = jnp.where(shrinking, numerics.safe_div(w, w - y), jnp.inf)
  blocking = jnp.argmin(ratios)
  theta = jnp.clip(jnp.min(ratios), 0.0, 1.0)
  moved = jnp.maximum(w + theta * (y - w), 0.0)
  moved = jnp.where((jnp.arange(t) == blocking) & (theta < 1.0), 0.0, moved)
  moved_sum = jnp.sum(moved)
  moved = jnp.where(moved_sum > 0, moved / jnp.where(moved_sum > 0, moved_sum, 1.0), w)

  def objective(v):
    return jnp.dot(v, jnp.matmul(gram, v, precision=numerics.HIGHEST), precision=numerics.HIGHEST)

  ok = jnp.all(jnp.isfinite(moved)) & (objective(moved) <= objective(w))
  return jnp.where(ok, moved, w)


def min_norm_simplex(gram: jax.Array, *, max_iters: int = 250, tol: float = 1e-6,
                     scale: bool = True, corrective: bool = True) -> MinNormResult:
  r"""Min-norm point of the convex hull of the task gradients, from their Gram matrix.

  Solves

  .. math::
    w^\star = \arg\min_{w \in \Delta_T} \; w^\top G w = \Big\| \sum_i w_i g_i \Big\|^2, \qquad
    \Delta_T = \{ w \ge 0, \; \textstyle\sum_i w_i = 1 \},

  by pairwise (away-to-toward) Frank-Wolfe with exact line search, started at the uniform
  weights: at each step mass moves from the worst vertex of the support
  :math:`a = \arg\max_{w_i > 0} (Gw)_i` to the best vertex :math:`s = \arg\min_i (Gw)_i`, with the
  closed-form step :math:`\gamma = \min\big(w_a, ((Gw)_a - (Gw)_s) / (G_{ss} + G_{aa} -
  2 G_{sa})\big)` (the paper's two-vector solver applied to the pair). Each step is followed by
  a corrective step (Wolfe's minor cycle): ``w`` moves toward the minimizer of :math:`w^\top G w`
  on the affine hull of its support (a small pseudo-inverse solve), as far as the simplex allows,
  and only if that lowers the objective. Once the optimal support is found this lands on the
  solution, so a handful of steps usually suffice (plain Frank-Wolfe needs hundreds for the
  same accuracy). It stops when the pairwise gap
  :math:`\max_{w_i > 0} (Gw)_i - \min_i (Gw)_i` is at most ``tol`` or after ``max_iters`` steps.
  At the returned point :math:`(Gw)_t \ge w^\top G w - \text{tol}` for every task ``t``, i.e.
  :math:`g_t \cdot d \ge \|d\|^2 - \text{tol}` with :math:`d = \sum_i w_i g_i` (relative to the
  largest :math:`\|g_i\|^2` when ``scale=True``): no task is hurt to first order.

  Examples:
    >>> import jax.numpy as jnp
    >>> from mtjax._src import solvers
    >>> gram = jnp.array([[18., -22.], [-22., 38.]])   # rows [-4, 1, 1] and [6, 1, 1]
    >>> result = solvers.min_norm_simplex(gram)
    >>> [round(x, 4) for x in result.weights.tolist()]
    [0.6, 0.4]

  Args:
    gram: ``[T, T]`` symmetric positive semi-definite Gram matrix.
    max_iters: static cap on the number of Frank-Wolfe steps.
    tol: stopping tolerance on the pairwise gap (traceable).
    scale: divide ``gram`` by its largest diagonal entry first (:func:`scale_gram`), making ``tol``
      relative.
    corrective: take the corrective affine-hull step after every Frank-Wolfe step (``False``:
      plain pairwise Frank-Wolfe).

  Returns:
    A :class:`MinNormResult` (``weights``, ``gap``, ``iterations``).

  References:
    Sener and Koltun, *Multi-Task Learning as Multi-Objective Optimization*, NeurIPS 2018.
    Lacoste-Julien and Jaggi, *On the Global Linear Convergence of Frank-Wolfe Optimization
    Variants*, NeurIPS 2015. Wolfe, *Finding the Nearest Point in a Polytope*, Mathematical
    Programming, 1976.
  """
  if not isinstance(max_iters, int) or isinstance(max_iters, bool) or max_iters < 0:
    raise ValueError(f"mtjax: max_iters must be a static non-negative Python int, got {max_iters!r}.")
  gram = jnp.asarray(gram)
  if gram.ndim != 2 or gram.shape[0] != gram.shape[1]:
    raise ValueError(f"mtjax: min_norm_simplex needs a square [T, T] Gram matrix, got shape {gram.shape}.")
  dtype = numerics.gram_dtype(gram.dtype)
  gram = gram.astype(dtype)
  if scale:
    gram, _ = scale_gram(gram)
  num_tasks = gram.shape[0]
  tol = jnp.asarray(tol, dtype)
  diag = jnp.diagonal(gram)

  def matvec(w):
    return jnp.matmul(gram, w, precision=numerics.HIGHEST)

  def cond(carry):
    it, _, gap = carry
    return (it < max_iters) & (gap > tol)

  def body(carry):
    it, w, _ = carry
    gw = matvec(w)
    _, toward, away = _pairwise_gap(gw, w)
    slope = gw[away] - gw[toward]  # >= 0: decrease rate of the objective along e_s - e_a (halved)
    curvature = diag[toward] + diag[away] - 2.0 * gram[toward, away]
    w_away = w[away]
    step = jnp.where(curvature > 0, jnp.minimum(numerics.safe_div(slope, curvature), w_away), w_away)
    step = jnp.where(toward == away, jnp.zeros_like(step), step)
    w = w.at[toward].add(step)
    w = w.at[away].set(jnp.where(step == w_away, jnp.zeros_like(w_away), w_away - step))
    w = jnp.maximum(w, 0.0)
    if corrective:
      w = _corrective_step(gram, w)
    gap, _, _ = _pairwise_gap(matvec(w), w)
    return it + 1, w, gap

  w0 = jnp.full((num_tasks,), 1.0 / num_tasks, dtype)
  gap0, _, _ = _pairwise_gap(matvec(w0), w0)
  it, w, gap = jax.lax.while_loop(cond, body, (jnp.asarray(0, jnp.int32), w0, gap0))
  w = w / jnp.sum(w)  # undo rounding drift of the mass transfers
  return MinNormResult(weights=w, gap=gap, iterations=it)


def project_simplex(v: jax.Array, total: jax.typing.ArrayLike = 1.0) -> jax.Array:
  r"""Exact Euclidean projection onto the scaled simplex :math:`\{x \ge 0, \sum_i x_i = s\}`.

  .. math::
    \Pi(v) = \max(v - \tau, 0), \qquad \tau = \frac{\sum_{k \le \rho} u_k - s}{\rho}, \qquad
    \rho = \max\Big\{k : u_k - \frac{\sum_{j \le k} u_j - s}{k} > 0\Big\},

  with :math:`u` the entries of :math:`v` sorted in decreasing order (sort-based algorithm,
  :math:`O(T \log T)`, no iterations). ``total = 0`` gives the zero vector.

  Examples:
    >>> import jax.numpy as jnp
    >>> from mtjax._src import solvers
    >>> solvers.project_simplex(jnp.array([-0.1, 0.3]), 0.2)
    Array([0. , 0.2], dtype=float32)

  Args:
    v: ``[T]`` vector.
    total: ``s >= 0``, the sum of the result (traceable).

  Returns:
    ``[T]`` projection of ``v``, in ``v``'s (floating) dtype.

  References:
    Held, Wolfe and Crowder, *Validation of Subgradient Optimization*, Mathematical Programming,
    1974. Duchi, Shalev-Shwartz, Singer and Chandra, *Efficient Projections onto the l1-Ball for
    Learning in High Dimensions*, ICML 2008.
  """
  v = jnp.asarray(v)
  if v.ndim != 1:
    raise ValueError(f"mtjax: project_simplex needs a 1-D vector, got shape {v.shape}.")
  dtype = jnp.promote_types(v.dtype, jnp.float32)
  v = v.astype(dtype)
  total = jnp.asarray(total, dtype)
  n = v.shape[0]
  u = jnp.sort(v)[::-1]
  css = jnp.cumsum(u)
  k = jnp.arange(1, n + 1, dtype=dtype)
  positive = u - (css - total) / k > 0
  rho = jnp.maximum(jnp.max(jnp.where(positive, jnp.arange(1, n + 1), 0)), 1)
  tau = (css[rho - 1] - total) / rho.astype(dtype)
  return jnp.maximum(v - tau, 0.0)
