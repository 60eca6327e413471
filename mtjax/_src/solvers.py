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
import numpy as np

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

  The affine minimizer ``y`` solves ``[[G_S, 1], [1^T, 0]] [y; lam] = [0; 1]``; ``w`` moves to ``y``
  or, if ``y`` leaves the simplex, to the boundary point on the segment (Wolfe's minor cycle), which
  drops a vertex. The system is solved twice: by LU (accurate when the support's points are
  affinely independent, e.g. ``P + 1`` of them in ``R^P``: the pseudo-inverse's cutoff
  ``10 (T + 1) eps`` drops a genuine small singular value there in float32, and the solver then
  crawled for hundreds of plain Frank-Wolfe steps) and by pseudo-inverse (a singular ``G_S``, e.g.
  more support points than dimensions); the move with the lower objective is kept, and only when it
  does not increase the objective (guards against rounding on ill-conditioned supports).
  """
  t = w.shape[0]
  support = w > 0
  both = support[:, None] & support[None, :]
  eye = jnp.eye(t, dtype=gram.dtype)
  top = jnp.where(both, gram, jnp.zeros_like(gram)) + jnp.where(support, 0.0, 1.0)[:, None] * eye
  ones = jnp.where(support, 1.0, 0.0).astype(gram.dtype)
  kkt = jnp.concatenate(
    [
      jnp.concatenate([top, ones[:, None]], axis=1),
      jnp.concatenate([ones, jnp.zeros((1,), gram.dtype)])[None, :],
    ],
    axis=0,
  )
  rhs = jnp.concatenate([jnp.zeros((t,), gram.dtype), jnp.ones((1,), gram.dtype)])

  def objective(v):
    return jnp.dot(v, jnp.matmul(gram, v, precision=numerics.HIGHEST), precision=numerics.HIGHEST)

  def move(y):
    y = jnp.where(support, y[:t], 0.0)
    # Largest step theta in [0, 1] keeping w + theta (y - w) >= 0.
    shrinking = support & (y < w)
    ratios = jnp.where(shrinking, numerics.safe_div(w, w - y), jnp.inf)
    blocking = jnp.argmin(ratios)
    theta = jnp.clip(jnp.min(ratios), 0.0, 1.0)
    moved = jnp.maximum(w + theta * (y - w), 0.0)
    moved = jnp.where((jnp.arange(t) == blocking) & (theta < 1.0), 0.0, moved)
    moved_sum = jnp.sum(moved)
    moved = jnp.where(moved_sum > 0, moved / jnp.where(moved_sum > 0, moved_sum, 1.0), w)
    finite = jnp.all(jnp.isfinite(moved))
    moved = jnp.where(finite, moved, w)
    return moved, jnp.where(finite, objective(moved), jnp.inf)

  by_lu, lu_objective = move(jnp.linalg.solve(kkt, rhs))
  by_pinv, pinv_objective = move(jnp.matmul(jnp.linalg.pinv(kkt), rhs, precision=numerics.HIGHEST))
  moved = jnp.where(lu_objective <= pinv_objective, by_lu, by_pinv)
  ok = jnp.minimum(lu_objective, pinv_objective) <= objective(w)
  return jnp.where(ok, moved, w)


def min_norm_simplex(
  gram: jax.Array,
  *,
  max_iters: int = 250,
  tol: jax.typing.ArrayLike = 1e-6,
  scale: bool = True,
  corrective: bool = True,
) -> MinNormResult:
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


def _masked_pinv(matrix: jax.Array, mask: jax.Array) -> jax.Array:
  """Pseudo-inverse of ``matrix[mask][:, mask]``, embedded with zeros outside the mask."""
  both = mask[:, None] & mask[None, :]
  return jnp.linalg.pinv(jnp.where(both, matrix, jnp.zeros_like(matrix)))


class NonnegQPResult(NamedTuple):
  r"""Result of :func:`nonneg_qp`.

  Attributes:
    solution: ``[T]`` minimizer ``v >= 0``.
    residual: natural KKT residual ``max_i |min(v_i, (A v + q)_i)|`` (``0`` at the solution).
    iterations: number of active-set steps taken.
  """

  solution: jax.Array
  residual: jax.Array
  iterations: jax.Array


def nonneg_qp(
  matrix: jax.Array, linear: jax.Array, *, max_iters: int = 100, tol: jax.typing.ArrayLike = 1e-6
) -> NonnegQPResult:
  r"""Convex quadratic program over the non-negative orthant, by a primal active-set method.

  .. math::
    v^\star = \arg\min_{v \ge 0} \; \tfrac12 v^\top A v + q^\top v,

  for a symmetric positive semi-definite ``[T, T]`` matrix :math:`A` (e.g. a task Gram matrix).
  Lawson-Hanson's active-set method generalized from least squares to a quadratic: starting at
  :math:`v = 0` with no free variable, the variable whose gradient :math:`(Av + q)_j` is most
  negative is freed, the equality-constrained problem on the free set :math:`P` is solved
  exactly (:math:`A_{PP} z_P = -q_P`, by pseudo-inverse, so a singular :math:`A_{PP}` is fine),
  and :math:`v` moves to :math:`z` -- or, if :math:`z` leaves the orthant, as far towards it as
  :math:`v \ge 0` allows, freeing nothing and dropping the blocking variables. It stops when
  every fixed variable has :math:`(Av + q)_j \ge -\text{tol} \max_i A_{ii}` or after
  ``max_iters`` steps (in exact arithmetic it terminates after finitely many steps; the cap
  guards against rounding cycles). Everything runs on device under ``jit`` (one
  ``lax.while_loop``; vmappable).

  Used by :func:`mtjax.upgrad` and :func:`mtjax.dualproj`: projecting :math:`J^\top u` onto the
  dual cone :math:`\{x : J x \ge 0\}` is :math:`J^\top (u + v^\star)` with :math:`A = J J^\top`
  and :math:`q = A u`.

  Examples:
    >>> import jax.numpy as jnp
    >>> from mtjax._src import solvers
    >>> gram = jnp.array([[18., -22.], [-22., 38.]])
    >>> result = solvers.nonneg_qp(gram, gram[:, 0])  # project g_1 onto {x: J x >= 0}
    >>> [round(x, 4) for x in result.solution.tolist()]
    [0.0, 0.5789]

  Args:
    matrix: ``[T, T]`` symmetric positive semi-definite matrix :math:`A`.
    linear: ``[T]`` linear term :math:`q`.
    max_iters: static cap on the active-set steps.
    tol: tolerance on the negative part of the gradient, relative to :math:`\max_i A_{ii}`
      (traceable).

  Returns:
    A :class:`NonnegQPResult`.

  References:
    Lawson and Hanson, *Solving Least Squares Problems*, Prentice-Hall, 1974, chapter 23.
  """
  if not isinstance(max_iters, int) or isinstance(max_iters, bool) or max_iters < 0:
    raise ValueError(f"mtjax: max_iters must be a static non-negative Python int, got {max_iters!r}.")
  matrix = jnp.asarray(matrix)
  dtype = numerics.gram_dtype(jnp.result_type(matrix, linear))
  matrix = matrix.astype(dtype)
  linear = jnp.asarray(linear).astype(dtype)
  n = linear.shape[0]
  tol = jnp.asarray(tol, dtype) * jnp.maximum(jnp.max(jnp.diagonal(matrix)), jnp.finfo(dtype).tiny)
  eye = jnp.arange(n)

  def gradient(v):
    return jnp.matmul(matrix, v, precision=numerics.HIGHEST) + linear

  def cond(carry):
    it, _, _, _, done = carry
    return (it < max_iters) & ~done

  def body(carry):
    it, v, free, need_free, _ = carry
    violation = jnp.where(free, jnp.inf, gradient(v))
    j = jnp.argmin(violation)
    optimal = need_free & (violation[j] >= -tol)
    free_now = jnp.where(need_free, free | (eye == j), free)
    z = -jnp.matmul(_masked_pinv(matrix, free_now), jnp.where(free_now, linear, 0.0), precision=numerics.HIGHEST)
    z = jnp.where(free_now, z, 0.0)
    feasible = jnp.all(jnp.where(free_now, z > 0, True))
    # Move towards z as far as v >= 0 allows and drop the blocking variable(s).
    blocking = free_now & (z <= 0)
    ratios = jnp.where(blocking, numerics.safe_div(v, v - z), jnp.inf)
    k = jnp.argmin(ratios)
    step = jnp.clip(ratios[k], 0.0, 1.0)
    moved = jnp.maximum(v + step * (z - v), 0.0)
    dropped = free_now & ((moved <= 0) | (eye == k))
    moved = jnp.where(dropped, 0.0, moved)
    v_next = jnp.where(feasible, z, moved)
    free_next = jnp.where(feasible, free_now, free_now & ~dropped)
    keep = optimal
    return (
      it + 1,
      jnp.where(keep, v, v_next),
      jnp.where(keep, free, free_next),
      jnp.where(keep, need_free, feasible),
      optimal,
    )

  init = (
    jnp.asarray(0, jnp.int32),
    jnp.zeros((n,), dtype),
    jnp.zeros((n,), bool),
    jnp.asarray(True),
    jnp.asarray(False),
  )
  it, v, _, _, _ = jax.lax.while_loop(cond, body, init)
  residual = jnp.max(jnp.abs(jnp.minimum(v, gradient(v))))
  return NonnegQPResult(solution=v, residual=residual, iterations=it)


class CAGradDualResult(NamedTuple):
  r"""Result of :func:`cagrad_dual`.

  Attributes:
    weights: ``[T]`` minimizer ``w`` of the dual on the simplex.
    norm: :math:`\|g_w\| = \sqrt{w^\top G w}` on the Gram divided by its largest diagonal entry
      (``0`` when ``g_w`` is at its rounding floor, see :func:`cagrad_dual`).
    mean_norm: :math:`\|g_0\|` on that scaled Gram (``0`` at its rounding floor).
    gap: Frank-Wolfe duality gap at ``w`` on that scaled Gram, relative to
      :math:`(\|g_0\| + r) \max(\sum_i w_i \|g_i\|, \|g_j\|)` (``j`` the best vertex; a bound on the
      partial derivatives involved), ``0`` at the optimum.
    iterations: number of active-set steps taken.
  """

  weights: jax.Array
  norm: jax.Array
  mean_norm: jax.Array
  gap: jax.Array
  iterations: jax.Array


# ||g_w||^2 <= ZERO_FLOOR * T * eps * (sum_i |w_i| ||g_i||)^2 is treated as g_w = 0 (rounding noise of w^T G w).
ZERO_FLOOR = 100.0


def _zero_floor(dtype, t):
  return jnp.asarray(ZERO_FLOOR * t * np.finfo(dtype).eps, dtype)


def cagrad_dual(
  gram: jax.Array, c: jax.typing.ArrayLike, *, max_iters: int = 100, tol: jax.typing.ArrayLike = 1e-6
) -> CAGradDualResult:
  r"""The dual problem of CAGrad on the simplex, by an exact active-set method.

  With :math:`b = \mathbf 1 / T` (so :math:`g_0 = J^\top b` is the average gradient),
  :math:`a = G b` and :math:`r = c \|g_0\| = c \sqrt{b^\top G b}`, it solves

  .. math::
    w^\star = \arg\min_{w \in \Delta_T} F(w), \qquad F(w) = a^\top w + r \sqrt{w^\top G w}
    = g_0 \cdot g_w + c \|g_0\| \|g_w\|, \qquad g_w = J^\top w.

  Method (Wolfe's active-set scheme for the min-norm point, carried over to :math:`F`): on a
  support :math:`S` the minimizer of :math:`F` on the affine hull :math:`\{w_S : \mathbf 1^\top w =
  1\}` has a closed form. With :math:`K = \begin{bmatrix} G_S & \mathbf 1 \\ \mathbf 1^\top & 0
  \end{bmatrix}`, :math:`(x_0, \cdot) = K^+ (0, 1)` (the affine min-norm point,
  :math:`n_0^2 = x_0^\top G x_0`) and :math:`(p, \cdot) = K^+ (-a_S, 0)` (:math:`q = p^\top G p`),
  stationarity :math:`a + r G w / \|g_w\| = \nu \mathbf 1` gives :math:`w = x_0 + \tau p` with
  :math:`\|g_w\|^2 = n_0^2 + \tau^2 q` and :math:`\tau = \|g_w\| / r`, i.e.
  :math:`\|g_w\| = n_0 / \sqrt{1 - q / r^2}` when :math:`q < r^2` (otherwise :math:`F` decreases
  without bound along :math:`p`). Starting from the best vertex, each step either moves to that
  minimizer when it lies in the simplex and then adds the vertex with the smallest
  :math:`\partial F / \partial w_i` (stopping when the Frank-Wolfe gap
  :math:`\nabla F \cdot w - \partial_j F` (:math:`j = \arg\min_i \partial_i F`) is at most
  :math:`(\text{tol} + 10 T \epsilon) (\|g_0\| + r) \max(\sum_i w_i \|g_i\|, \|g_j\|)`, a bound on
  the partial derivatives involved), or moves towards it (along
  :math:`p` when unbounded) until a weight reaches zero and drops that vertex. Every step lowers
  :math:`F`, so the method terminates; ``max_iters`` caps it under rounding. The Gram is first
  divided by its largest diagonal entry, which makes ``tol`` relative.

  Rounding floors are *relative to the combination*, never to the largest task: a combination
  :math:`x` has :math:`g_x = 0` when :math:`x^\top G x \le 100\, T \epsilon\, (\sum_i |x_i|
  \|g_i\|)^2` (the rounding noise of :math:`x^\top G x` when the gradients cancel), so a task whose
  gradient is tiny next to another's is still a non-zero vertex (a floor relative to the largest
  diagonal entry made every task below about :math:`0.3\%` of the largest norm in float32 a
  "zero" gradient and returned a wrong direction). The same floor on :math:`b^\top G b` sets
  :math:`r = 0` when the average gradient is rounding noise.

  At a point with :math:`g_w = 0`, :math:`F` is not differentiable; its optimality is certified
  with the subgradient :math:`(1 - \min(c, 1))\, a` (i.e. :math:`u = -\min(1, 1/c)\, g_0 / \|g_0\|`
  in :math:`\partial \|\cdot\|(0)`), exact for :math:`c \ge 1`; :func:`cagrad_weights` then
  chooses the primal point (see :func:`mtjax.cagrad`).

  Examples:
    >>> import jax.numpy as jnp
    >>> from mtjax._src.solvers import cagrad_dual
    >>> gram = jnp.array([[18., -22.], [-22., 38.]])   # rows [-4, 1, 1] and [6, 1, 1]
    >>> [round(x, 4) for x in cagrad_dual(gram, 0.5).weights.tolist()]
    [1.0, 0.0]

  Args:
    gram: ``[T, T]`` symmetric positive semi-definite Gram matrix.
    c: the CAGrad radius :math:`c \ge 0` (traceable).
    max_iters: static cap on the active-set steps.
    tol: tolerance on the Frank-Wolfe gap (traceable).

  Returns:
    A :class:`CAGradDualResult`.

  References:
    Liu, Liu, Jin, Stone and Liu, *Conflict-Averse Gradient Descent for Multi-task Learning*,
    NeurIPS 2021. Wolfe, *Finding the Nearest Point in a Polytope*, Mathematical Programming, 1976.
  """
  if not isinstance(max_iters, int) or isinstance(max_iters, bool) or max_iters < 0:
    raise ValueError(f"mtjax: max_iters must be a static non-negative Python int, got {max_iters!r}.")
  gram = jnp.asarray(gram)
  dtype = numerics.gram_dtype(gram.dtype)
  gram, _ = scale_gram(gram.astype(dtype))
  t = gram.shape[0]
  c = jnp.asarray(c, dtype)
  tol = jnp.asarray(tol, dtype)
  eye = jnp.arange(t)
  b = jnp.full((t,), 1.0 / t, dtype)
  norms = jnp.sqrt(jnp.maximum(jnp.diagonal(gram), 0.0))
  floor = _zero_floor(dtype, t)

  def mv(x):
    return jnp.matmul(gram, x, precision=numerics.HIGHEST)

  def norm_sq(x):
    return jnp.maximum(jnp.dot(x, mv(x), precision=numerics.HIGHEST), 0.0)

  def is_zero(x, sq):
    return sq <= floor * jnp.square(jnp.dot(jnp.abs(x), norms, precision=numerics.HIGHEST))

  a = mv(b)
  mean_sq = norm_sq(b)
  mean_norm = jnp.where(is_zero(b, mean_sq), 0.0, jnp.sqrt(mean_sq))
  radius = c * mean_norm
  certificate = (1.0 - jnp.minimum(c, 1.0)) * a  # subgradient of F at a point with g_w = 0

  def objective(x):
    return jnp.dot(a, x, precision=numerics.HIGHEST) + radius * jnp.sqrt(norm_sq(x))

  def grad(x):
    sq = norm_sq(x)
    positive = ~is_zero(x, sq)
    norm = jnp.sqrt(jnp.where(positive, sq, 1.0))
    return jnp.where(positive, a + radius * mv(x) / norm, certificate)

  def affine_min(support):
    # The KKT system, equilibrated: x = D y with D = diag(1 / |g_i|) (so G_S becomes the cosine matrix)
    # and the constraint row scaled to a unit vector; the pseudo-inverse's cutoff is then relative to
    # angles, not to the largest task (a plain pinv cut off every task below ~0.1% of the largest in float32).
    inv = jnp.where(support & (norms > 0), 1.0 / jnp.where(norms > 0, norms, 1.0), jnp.where(support, 1.0, 0.0))
    m = inv / jnp.maximum(jnp.sqrt(jnp.sum(jnp.square(inv))), jnp.finfo(dtype).tiny)
    beta = m[jnp.argmax(inv)] / jnp.maximum(jnp.max(inv), jnp.finfo(dtype).tiny)  # |constraint| scale
    cos = inv[:, None] * gram * inv[None, :]
    kkt = jnp.concatenate(
      [
        jnp.concatenate([jnp.where(support[:, None] & support[None, :], cos, 0.0), m[:, None]], axis=1),
        jnp.concatenate([m, jnp.zeros((1,), dtype)])[None, :],
      ],
      axis=0,
    )
    rhs = jnp.stack(
      [
        jnp.concatenate([jnp.zeros((t,), dtype), jnp.full((1,), beta, dtype)]),
        jnp.concatenate([-jnp.where(support, inv * a, 0.0), jnp.zeros((1,), dtype)]),
      ],
      axis=1,
    )
    sol = inv[:, None] * jnp.matmul(jnp.linalg.pinv(kkt), rhs, precision=numerics.HIGHEST)[:t]
    x0 = jnp.where(support, sol[:, 0], 0.0)
    p = jnp.where(support, sol[:, 1], 0.0)
    n0_sq, q = norm_sq(x0), norm_sq(p)
    r_sq = radius * radius
    bounded = q < r_sq * (1.0 - 1e-6)
    shrink = jnp.where(bounded, 1.0 - q / jnp.where(bounded, r_sq, 1.0), 1.0)
    tau = jnp.where(bounded & (radius > 0), jnp.sqrt(n0_sq / shrink) / jnp.where(radius > 0, radius, 1.0), 0.0)
    return x0 + tau * p, bounded, p

  rounding = jnp.asarray(10.0 * t * np.finfo(dtype).eps, dtype)

  def gap_of(x):
    # The gap, relative to the magnitude of the partial derivatives involved (|d_i F| <= (|g_0| + r) |g_i|):
    # relative to the support and the best vertex, not to the largest task, so that tiny tasks are solved too.
    g = grad(x)
    best = jnp.argmin(g)
    gap = jnp.dot(g, x, precision=numerics.HIGHEST) - g[best]
    size = jnp.maximum(jnp.dot(x, norms, precision=numerics.HIGHEST), norms[best])
    scale = (mean_norm + radius) * size
    return gap / jnp.maximum(scale, jnp.finfo(dtype).tiny), best

  def cond(carry):
    it, _, _, done = carry
    return (it < max_iters) & ~done

  def body(carry):
    it, w, support, _ = carry
    y, bounded, p = affine_min(support)
    feasible = bounded & jnp.all(jnp.where(support, y >= 0, True))
    # Feasible: move to the affine minimizer, then stop or add the best vertex.
    y_pos = jnp.maximum(jnp.where(support, y, 0.0), 0.0)
    y_pos = y_pos / jnp.maximum(jnp.sum(y_pos), jnp.finfo(dtype).tiny)
    f_w = objective(w)
    slack = 1e-6 * jnp.abs(f_w) + rounding * (mean_norm + radius) * jnp.maximum(
      jnp.dot(w, norms, precision=numerics.HIGHEST), jnp.dot(y_pos, norms, precision=numerics.HIGHEST)
    )
    y_ok = jnp.all(jnp.isfinite(y_pos)) & (objective(y_pos) <= f_w + slack)
    w_feas = jnp.where(y_ok, y_pos, w)
    gap, best = gap_of(w_feas)
    optimal = gap <= tol + rounding
    support_feas = support | ((eye == best) & ~optimal)
    # Infeasible (or unbounded): move towards y (along p) until a weight hits zero; drop it.
    direction = jnp.where(bounded, y - w, p)
    blocking = support & (direction < 0)
    ratios = jnp.where(blocking, numerics.safe_div(w, -direction), jnp.inf)
    k = jnp.argmin(ratios)
    step = jnp.where(bounded, jnp.minimum(ratios[k], 1.0), ratios[k])
    step = jnp.where(jnp.isfinite(step), step, 0.0)
    moved = jnp.maximum(w + step * direction, 0.0)
    dropped = (eye == k) & jnp.isfinite(ratios[k])
    moved = jnp.where(dropped, 0.0, moved)
    moved = moved / jnp.maximum(jnp.sum(moved), jnp.finfo(dtype).tiny)
    w_next = jnp.where(feasible, w_feas, moved)
    support_next = jnp.where(feasible, support_feas, support & ~dropped & (moved > 0))
    done = feasible & optimal
    return it + 1, w_next, support_next, done

  vertex_values = a + radius * norms
  start = jnp.argmin(vertex_values)
  w0 = (eye == start).astype(dtype)
  done0 = radius <= 0  # c = 0 or g_0 = 0: F = a.w is not used (d = g_0)
  it, w, _, _ = jax.lax.while_loop(cond, body, (jnp.asarray(0, jnp.int32), w0, eye == start, done0))
  sq = norm_sq(w)
  norm = jnp.where(is_zero(w, sq), 0.0, jnp.sqrt(sq))
  gap, _ = gap_of(w)
  return CAGradDualResult(weights=w, norm=norm, mean_norm=mean_norm, gap=gap, iterations=it)


POLISH_STEPS = 2  # full Newton steps after balance_newton's stop (kept only if they help)

# Status codes of :func:`balance_newton`.
SOLVED, STATIONARY, NOT_CONVERGED = 0, 1, 2


class BalanceResult(NamedTuple):
  r"""Result of :func:`balance_newton`.

  Attributes:
    weights: ``[T]`` solution ``v > 0`` on the active tasks; zeros on inactive tasks, and zeros
      everywhere when ``status == STATIONARY``.
    status: int32 ``SOLVED`` (0), ``STATIONARY`` (1: no solution exists, see
      :func:`balance_newton`) or ``NOT_CONVERGED`` (2: the cap was reached).
    decrement: squared Newton decrement :math:`\lambda^2` at the last iterate.
    iterations: number of Newton steps taken.
  """

  weights: jax.Array
  status: jax.Array
  decrement: jax.Array
  iterations: jax.Array


def balance_newton(
  cosines: jax.Array,
  coef: jax.Array,
  alpha: jax.typing.ArrayLike,
  active: jax.Array,
  *,
  max_iters: int = 100,
  tol: jax.typing.ArrayLike = 1e-10,
) -> BalanceResult:
  r"""Solves the balance equations :math:`(C v)_i = c_i\, v_i^{-1/\alpha}`, :math:`v > 0`.

  This is Nash-MTL's :math:`v \odot C v = \mathbf 1` (:math:`\alpha = 1`, :math:`c = \mathbf 1`)
  and FairGrad's :math:`G w = w^{-1/\alpha}` written on the cosine matrix :math:`C` of the task
  gradients (see :func:`mtjax.fairgrad` for the change of variables). The equations are the
  stationarity conditions of the strictly convex potential

  .. math::
    \Phi(v) = \tfrac12 v^\top C v - \sum_i c_i\, \phi_\alpha(v_i), \qquad
    \phi_\alpha(v) = \frac{v^{1 - 1/\alpha} - 1}{1 - 1/\alpha} \quad (\log v \text{ for } \alpha = 1),

  which is minimized by Newton's method with a fraction-to-boundary rule (no weight shrinks by
  more than 95% in a step) and a vectorized Armijo backtracking line search, on device under
  ``jit`` with a static iteration cap. The start is the solution for orthogonal gradients,
  :math:`v_i = c_i^{\alpha / (1 + \alpha)}`.

  Outcomes (``status``):

  * ``SOLVED``: the squared Newton decrement :math:`\lambda^2 = \nabla\Phi^\top H^{-1}
    \nabla\Phi` is at most ``tol`` plus its rounding floor (the decrement of the worst-case
    rounding error of :math:`\nabla \Phi`), followed by up to two full Newton steps, each kept
    only if it lowers the equations' relative residual (that floor, measured in the equations, can
    be :math:`\sqrt{\mathrm{cond}(H)}` times their actual rounding). The equations then hold to a
    relative error of about :math:`\sqrt{\texttt{tol}}` (measured: ``tol = 1e-10`` gives
    :math:`\max_i |w_i^{1/\alpha} (G w)_i - 1| \approx 10^{-5}` in float64 and in float32 on
    well-conditioned cosines, at most ``2.6e-4`` in float32 over 1,000 random 8 x 8 Jacobians;
    ``tol = 1e-20`` gives ``~1e-10`` in float64, while float32 stops at its rounding floor).
  * ``STATIONARY``: :math:`\Phi` is unbounded below (or its infimum is not attained) exactly when
    some :math:`u \ge 0`, :math:`u \ne 0` has :math:`C u = 0`, i.e. when :math:`0` is in the convex
    hull of the (normalized) active task gradients -- the point is Pareto-stationary and no
    direction improves every task, so no solution exists. Newton's iterates then grow along
    :math:`u` geometrically; the certificate :math:`u^\top C u \le 100\, T \epsilon` with
    :math:`u = v / \sum_i v_i` detects it. ``weights`` are zero.
  * ``NOT_CONVERGED``: neither after ``max_iters`` steps (``weights`` is the last iterate).

  Inactive tasks (``active`` false, e.g. zero gradients) are left out of the equations and get
  a zero weight.

  Examples:
    >>> import jax.numpy as jnp
    >>> from mtjax._src import solvers
    >>> cosines = jnp.array([[1.0, -0.5], [-0.5, 1.0]])
    >>> result = solvers.balance_newton(cosines, jnp.ones(2), 1.0, jnp.array([True, True]))
    >>> [round(x, 4) for x in result.weights.tolist()], int(result.status)  # v (1 - 0.5) v = 1
    ([1.4142, 1.4142], 0)

  Args:
    cosines: ``[T, T]`` cosine matrix :math:`C` (unit diagonal on the active tasks).
    coef: ``[T]`` positive coefficients :math:`c` (at most 1 keeps the start well scaled).
    alpha: :math:`\alpha > 0` (traceable).
    active: ``[T]`` bools: the tasks in the equations.
    max_iters: static cap on the Newton steps.
    tol: tolerance on :math:`\lambda^2` (traceable).

  Returns:
    A :class:`BalanceResult`.

  References:
    Navon, Shamsian, Achituve, Maron, Kawaguchi, Chechik and Fetaya, *Multi-Task Learning as a
    Bargaining Game*, ICML 2022. Ban and Ji, *Fair Resource Allocation in Multi-Task Learning*,
    ICML 2024. Boyd and Vandenberghe, *Convex Optimization*, 2004, sections 9.5 and 11.
  """
  if not isinstance(max_iters, int) or isinstance(max_iters, bool) or max_iters < 0:
    raise ValueError(f"mtjax: max_iters must be a static non-negative Python int, got {max_iters!r}.")
  cosines = jnp.asarray(cosines)
  dtype = numerics.gram_dtype(cosines.dtype)
  t = cosines.shape[0]
  eps = np.finfo(dtype).eps
  active = jnp.asarray(active, bool)
  both = active[:, None] & active[None, :]
  cos = jnp.where(both, cosines.astype(dtype), 0.0)
  coef = jnp.where(active, jnp.asarray(coef).astype(dtype), 1.0)
  alpha = jnp.asarray(alpha, dtype)
  inv_alpha = 1.0 / alpha
  beta = 1.0 - inv_alpha
  safe_beta = jnp.where(beta == 0, 1.0, beta)
  tol = jnp.asarray(tol, dtype)
  stationary_tol = jnp.asarray(100.0 * t * eps, dtype)
  steps = jnp.asarray(0.5, dtype) ** jnp.arange(20, dtype=dtype)  # backtracking candidates

  def mv(x):
    return jnp.matmul(x, cos, precision=numerics.HIGHEST)  # works on [T] and [K, T]

  def potential(v):  # v: [K, T], positive on the active tasks
    act, c = active[None, :], coef[None, :]
    log_v = jnp.log(jnp.where(act, v, 1.0))
    phi = jnp.where(beta == 0, log_v, jnp.expm1(beta * log_v) / safe_beta)
    quad = 0.5 * jnp.sum(v * mv(v), axis=-1)
    return quad - jnp.sum(jnp.where(act, c * phi, -0.5 * jnp.square(v - 1.0)), axis=-1)

  def newton(v):
    log_v = jnp.log(jnp.where(active, v, 1.0))
    power = coef * jnp.exp(-inv_alpha * log_v)  # c_i v_i^(-1/alpha)
    cv = mv(v)
    grad = jnp.where(active, cv - power, v - 1.0)
    hess = cos + jnp.diag(jnp.where(active, inv_alpha * power / jnp.where(active, v, 1.0), 1.0))
    # Worst-case rounding of the gradient: its decrement is the floor lambda^2 can reach.
    err = jnp.where(active, 4.0 * t * eps * (jnp.matmul(jnp.abs(v), jnp.abs(cos)) + power), 0.0)
    sol = jnp.linalg.solve(hess, jnp.stack([-grad, err], axis=1))
    delta = sol[:, 0]
    decrement = -jnp.dot(grad, delta, precision=numerics.HIGHEST)
    floor = jnp.dot(err, sol[:, 1], precision=numerics.HIGHEST)
    return grad, delta, decrement, floor

  def classify(v, decrement, floor):
    u = jnp.where(active, v, 0.0)
    u = u / jnp.maximum(jnp.sum(u), jnp.finfo(dtype).tiny)
    stationary = jnp.dot(u, mv(u), precision=numerics.HIGHEST) <= stationary_tol
    solved = ~stationary & (decrement <= tol + 4.0 * floor)
    return jnp.where(stationary, STATIONARY, jnp.where(solved, SOLVED, NOT_CONVERGED)).astype(jnp.int32)

  def cond(carry):
    it, _, status, _, _, _ = carry
    return (it < max_iters) & (status == NOT_CONVERGED)

  def body(carry):
    it, v, _, decrement_now, grad, delta = carry
    shrinking = active & (delta < 0)
    to_boundary = jnp.min(jnp.where(shrinking, 0.95 * v / jnp.where(shrinking, -delta, 1.0), jnp.inf))
    t_max = jnp.minimum(1.0, to_boundary)
    candidates = v[None, :] + (t_max * steps)[:, None] * delta[None, :]
    slope = jnp.dot(grad, delta, precision=numerics.HIGHEST)
    armijo = potential(candidates) <= potential(v[None, :]) + 1e-4 * t_max * steps * slope
    first = jnp.where(jnp.any(armijo), jnp.argmax(armijo), steps.shape[0] - 1)  # largest Armijo step
    # Close to the solution the potential's decrease (~lambda^2 / 2) drowns in its rounding, so
    # Armijo cannot be tested: take the (quadratically convergent) full step there.
    first = jnp.where(decrement_now <= 1e-2, 0, first)
    v_next = jnp.where(active, jnp.maximum(candidates[first], jnp.finfo(dtype).tiny), 1.0)
    grad, delta, decrement, floor = newton(v_next)
    return it + 1, v_next, classify(v_next, decrement, floor), decrement, grad, delta

  def relative_residual(v, grad):  # max_i |(C v)_i / (c_i v_i^(-1/alpha)) - 1|
    power = coef * jnp.exp(-inv_alpha * jnp.log(jnp.where(active, v, 1.0)))
    return jnp.max(jnp.where(active, jnp.abs(grad) / power, 0.0))

  def polish(carry, _):
    # The stop at 4x the worst-case rounding floor of lambda^2 can come early: measured in the
    # equations, that floor is up to sqrt(cond(H)) times their actual rounding, and float32 stopped
    # at relative residuals up to 8.5e-3 where two full steps reach 2.6e-4. Full Newton steps
    # (fraction to the boundary), each kept only if it lowers the equations' relative residual.
    v, grad, delta, resid = carry
    shrinking = active & (delta < 0)
    to_boundary = jnp.min(jnp.where(shrinking, 0.95 * v / jnp.where(shrinking, -delta, 1.0), jnp.inf))
    v_next = jnp.where(active, jnp.maximum(v + jnp.minimum(1.0, to_boundary) * delta, jnp.finfo(dtype).tiny), 1.0)
    grad_next, delta_next, _, _ = newton(v_next)
    resid_next = relative_residual(v_next, grad_next)
    better = jnp.all(jnp.isfinite(v_next)) & (resid_next < resid)
    keep = lambda a, b: jnp.where(better, a, b)
    return (keep(v_next, v), keep(grad_next, grad), keep(delta_next, delta), keep(resid_next, resid)), None

  v0 = jnp.where(active, jnp.exp(alpha / (1.0 + alpha) * jnp.log(coef)), 1.0)
  grad0, delta0, decrement0, floor0 = newton(v0)
  it, v, status, decrement, grad, delta = jax.lax.while_loop(
    cond, body, (jnp.asarray(0, jnp.int32), v0, classify(v0, decrement0, floor0), decrement0, grad0, delta0)
  )
  (polished, _, _, _), _ = jax.lax.scan(polish, (v, grad, delta, relative_residual(v, grad)), None, length=POLISH_STEPS)
  v = jnp.where(status == SOLVED, polished, v)
  v = jnp.where(active & (status != STATIONARY), v, 0.0)
  return BalanceResult(weights=v, status=status, decrement=decrement, iterations=it)
