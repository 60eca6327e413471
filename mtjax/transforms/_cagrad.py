"""CAGrad: conflict-averse gradient descent (Liu et al., NeurIPS 2021), on the Gram-weighting core."""

from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mtjax._src import numerics
from mtjax._src import solvers
from mtjax._src import tree as tree_lib
from mtjax._src import weighting

RESCALES = ("none", "1/(1+c^2)", "1/(1+c)")


class CAGradState(NamedTuple):
  """State of :func:`cagrad`.

  Attributes:
    weights: the coefficients ``[T]`` applied to the task gradients at the last step (empty when
      ``num_tasks`` is not given).
  """

  weights: jax.Array


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


def cagrad_dual(gram: jax.Array, c: jax.typing.ArrayLike, *, max_iters: int = 100,
                tol: jax.typing.ArrayLike = 1e-6) -> CAGradDualResult:
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
    >>> from mtjax.transforms._cagrad import cagrad_dual
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
  gram, _ = solvers.scale_gram(gram.astype(dtype))
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
    kkt = jnp.concatenate([
        jnp.concatenate([jnp.where(support[:, None] & support[None, :], cos, 0.0), m[:, None]], axis=1),
        jnp.concatenate([m, jnp.zeros((1,), dtype)])[None, :],
    ], axis=0)
    rhs = jnp.stack([jnp.concatenate([jnp.zeros((t,), dtype), jnp.full((1,), beta, dtype)]),
                     jnp.concatenate([-jnp.where(support, inv * a, 0.0), jnp.zeros((1,), dtype)])], axis=1)
    sol = inv[:, None] * jnp.matmul(jnp.linalg.pinv(kkt), rhs, precision=numerics.HIGHEST)[:t]
    x0 = jnp.where(support, sol[:, 0], 0.0)
    p = jnp.where(support, sol[:, 1], 0.0)
    n0_sq, q = norm_sq(x0), norm_sq(p)
    r_sq = radius * radius
    bounded = q < r_sq * (1.0 - 1e-6)
    shrink = jnp.where(bounded, 1.0 - q / jnp.where(bounded, r_sq, 1.0), 1.0)
    tau = jnp.where(bounded & (radius > 0),
                    jnp.sqrt(n0_sq / shrink) / jnp.where(radius > 0, radius, 1.0), 0.0)
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
        jnp.dot(w, norms, precision=numerics.HIGHEST), jnp.dot(y_pos, norms, precision=numerics.HIGHEST))
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


def cagrad_weights(gram: jax.Array, c, rescale: str = "none", *, max_iters: int = 100, tol=1e-6) -> jax.Array:
  r"""The CAGrad coefficients :math:`b + \frac{r}{\|g_{w^\star}\|} w^\star` (times the rescale factor).

  See :func:`cagrad` (and :func:`cagrad_dual` for the rounding floors). ``gram`` is ``[T, T]``;
  the result is ``[T]``. Special cases: :math:`r = 0` (``c = 0`` or :math:`g_0` at its rounding
  floor) gives :math:`b`; :math:`g_{w^\star} = 0` gives ``0`` for :math:`c \ge 1` and otherwise
  :math:`b + v` with :math:`J^\top v` the projection of :math:`-g_0` ... see :func:`cagrad`.
  """
  t = gram.shape[0]
  result = cagrad_dual(gram, c, max_iters=max_iters, tol=tol)
  scaled, _ = solvers.scale_gram(gram.astype(numerics.gram_dtype(gram.dtype)))
  dtype = scaled.dtype
  c = jnp.asarray(c, dtype)
  b = jnp.full((t,), 1.0 / t, dtype)
  radius = c * result.mean_norm
  # g_w = 0 (only possible at a Pareto-stationary point): every d in the ball with J d >= 0 is optimal.
  # c >= 1: d = 0. c < 1: the one closest to g_0, g_0 + J^T v with v = argmin_{v >= 0} |g_0 + J^T v|^2.
  proj = solvers.nonneg_qp(scaled, jnp.matmul(scaled, b, precision=numerics.HIGHEST), max_iters=max_iters).solution
  dist = jnp.sqrt(jnp.maximum(jnp.dot(proj, jnp.matmul(scaled, proj, precision=numerics.HIGHEST)), 0.0))
  proj = proj * jnp.minimum(1.0, numerics.safe_div(radius, dist))  # stays in the ball under rounding
  at_zero = jnp.where(c >= 1.0, -b, proj)
  correction = jnp.where(result.norm > 0, numerics.safe_div(radius, result.norm) * result.weights, at_zero)
  weights = jnp.where(radius > 0, b + correction, b)
  if rescale == "1/(1+c^2)":
    weights = weights / (1.0 + c * c)
  elif rescale == "1/(1+c)":
    weights = weights / (1.0 + c)
  return weights


def cagrad(
    c: jax.typing.ArrayLike = 0.4,
    *,
    num_tasks: Optional[int] = None,
    rescale: str = "none",
    max_iters: int = 100,
    tol: jax.typing.ArrayLike = 1e-6,
    shared: tree_lib.SharedSpec = None,
    gram_leaves: weighting.GramLeavesSpec = None,
    task_specific: str = "sum",
) -> optax.GradientTransformationExtraArgs:
  r"""CAGrad: the best worst-task improvement in a ball around the average gradient.

  With the average gradient :math:`g_0 = \frac1T \sum_i g_i`, CAGrad's direction solves

  .. math::
    d^\star = \arg\max_{d} \min_i \; g_i \cdot d \quad \text{s.t.} \quad \|d - g_0\| \le c \|g_0\|,

  (maximize the worst task's first-order improvement while staying close to the average
  gradient). Its dual is a problem over the simplex: with :math:`g_w = \sum_i w_i g_i` and
  :math:`r = c \|g_0\|`,

  .. math::
    w^\star = \arg\min_{w \in \Delta_T} \; g_w \cdot g_0 + r \|g_w\|, \qquad
    d^\star = g_0 + \frac{r}{\|g_{w^\star}\|} \, g_{w^\star},

  which only needs the Gram matrix :math:`G = J J^\top` of the shared parameters
  (:math:`g_w \cdot g_0 = w^\top G \mathbf 1 / T`, :math:`\|g_w\|^2 = w^\top G w`). It is solved
  exactly on device under ``jit`` by an active-set method with closed-form steps on each support
  (:func:`mtjax._src.solvers.cagrad_dual`, static iteration cap ``max_iters``, tolerance ``tol``
  on the relative Frank-Wolfe gap); the paper and the authors' code use SciPy's SLSQP on the
  host. The task weights are :math:`\frac1T + \frac{r}{\|g_{w^\star}\|} w^\star_t` (times the
  rescale factor), so :math:`d = \sum_t w_t g_t`.

  ``rescale`` divides the update: ``"none"`` (the paper's Algorithm 1), ``"1/(1+c^2)"`` or
  ``"1/(1+c)"`` (the options of the authors' released code, ``rescale=1`` and ``2`` there, which
  keep the step length comparable to plain gradient descent as :math:`c` grows).

  Properties: :math:`c = 0` gives the average gradient; with :math:`c \ge 1` the ball contains
  :math:`0`, so :math:`g_i \cdot d^\star \ge 0` for every task (no conflict, like MGDA); the
  result is permutation equivariant and positively homogeneous of degree 1. At a point where
  :math:`g_{w^\star} = 0` (only possible when :math:`0` is in the convex hull of the gradients)
  the formula is undefined; the transform returns the primal optimum
  :math:`d = (1 - \min(c, 1))\, g_0` there (:math:`d = 0` for :math:`c \ge 1`).

  .. warning::
    Must be first in an ``optax.chain``: it consumes per-task gradients (every leaf
    ``[T, *param.shape]``, e.g. from :func:`mtjax.task_grads`) and emits params-shaped updates.
    Do not wrap it in ``optax.MultiSteps``.

  Examples:
    >>> import jax.numpy as jnp, optax, mtjax
    >>> params = {'w': jnp.zeros(3)}
    >>> task_grads = {'w': jnp.array([[-4., 1., 1.], [6., 1., 1.]])}
    >>> tx = optax.chain(mtjax.cagrad(c=0.5, num_tasks=2), optax.sgd(1.0))
    >>> state = tx.init(params)
    >>> updates, state = tx.update(task_grads, state, params)
    >>> [round(x, 4) for x in (-updates['w']).tolist()]
    [0.1835, 1.2041, 1.2041]

  Args:
    c: radius of the ball relative to :math:`\|g_0\|`, :math:`c \ge 0` (traceable; the paper
      uses 0.4 on its image benchmarks and 0.5 / 0.9 elsewhere).
    num_tasks: number of tasks ``T`` (checked against the gradients; when given, the state
      records the task weights of every step in ``weights``).
    rescale: ``"none"`` (default, the paper), ``"1/(1+c^2)"`` or ``"1/(1+c)"``.
    max_iters: static cap on the solver's active-set steps (with ``optax.inject_hyperparams`` list
      it in ``static_args``).
    tol: solver tolerance on the relative Frank-Wolfe gap; traceable.
    shared: shared-parameter mask (see :func:`mtjax.shared_mask`); the weights come from the
      Gram of the shared leaves only.
    task_specific: ``"sum"`` (plain sum of the task gradients on task-specific leaves) or
      ``"weighted"`` (apply the CAGrad weights there too).
    gram_leaves: restrict the Gram to these shared leaves (path regex(es) or a callable
      ``paths -> bools``); the weights still apply to every shared leaf. With
      ``mtjax.task_grads(..., deferred=True)`` only their rows are computed and the update is
      one backward pass (the "subset" strategy).

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with state :class:`CAGradState`.

  References:
    Liu, Liu, Jin, Stone and Liu, *Conflict-Averse Gradient Descent for Multi-task Learning*,
    NeurIPS 2021. https://arxiv.org/abs/2110.14048
  """
  if rescale not in RESCALES:
    raise ValueError(f"mtjax: cagrad: rescale must be one of {RESCALES}, got {rescale!r}.")
  if isinstance(c, (int, float)) and not c >= 0:
    raise ValueError(f"mtjax: cagrad: c must be >= 0, got {c!r}.")
  max_iters = weighting.static_int(max_iters, "max_iters", "cagrad")

  def init_state(params):
    del params
    return CAGradState(weights=weighting.init_weights(num_tasks))

  def weights_fn(inputs, state):
    radius = jnp.asarray(c)
    if not numerics._is_concrete(radius):  # pylint: disable=protected-access
      radius = numerics.enforce(radius, numerics.condition_check(
          ~(radius >= 0), "mtjax: cagrad: c must be >= 0 (the radius of the ball around the mean gradient)."))
    return cagrad_weights(inputs.grams[0], radius, rescale, max_iters=max_iters, tol=tol), state

  return tree_lib.with_task_axis_check(weighting.gram_weighting(
      weights_fn, init_state, method="cagrad", num_tasks=num_tasks, shared=shared, gram_leaves=gram_leaves,
      task_specific=task_specific), num_tasks, "cagrad")
