"""M-ConFIG: ConFIG on per-task momenta, one task's gradient per step (Liu, Chu and Thuerey, ICLR 2025)."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mtjax._src import composition
from mtjax._src import numerics
from mtjax._src import rows as rows_lib
from mtjax._src import tree as tree_lib
from mtjax._src import weighting
from mtjax._src.sparse import SparseRows
from mtjax._src.task_grads import is_lazy
from mtjax.transforms._config import config_weights
from mtjax.transforms._pcgrad import seed_key

SELECTIONS = ("cycle", "random")


class MConFIGState(NamedTuple):
  """State of :func:`m_config`.

  Attributes:
    count: number of updates so far (int32); ``selection="cycle"`` updates task ``count % T``.
    task_counts: ``[T]`` int32, how many gradients each task's momentum has received (its bias
      correction :math:`1 - \\beta^{n_i}`).
    momenta: the per-task first moments :math:`m_i`, params-shaped leaves with a leading task
      axis ``[T, *param.shape]`` in the params' dtypes (zeros at ``init``): T copies of the
      parameters.
    key: PRNG key of ``selection="random"`` (split at every update).
    weights: ``[T]`` ConFIG's coefficients on the bias-corrected momenta at the last step.
    moment_count: int32, steps of the ``adaptive=True`` second moment (0 otherwise).
    nu: ``adaptive=True``: the second moment of the pseudo-gradient, params-shaped; else ``None``.
    prev: ``adaptive=True``: the previous pseudo first moment, params-shaped; else ``None``.
  """

  count: jax.Array
  task_counts: jax.Array
  momenta: Any
  key: jax.Array
  weights: jax.Array
  moment_count: jax.Array
  nu: Any
  prev: Any


def _row(leaf, k: jax.Array, onehot: jax.Array) -> jax.Array:
  """Row ``k`` of one leaf's task gradients (params-shaped)."""
  if isinstance(leaf, SparseRows):
    return leaf.weighted_sum(onehot)
  return jax.lax.dynamic_index_in_dim(leaf, k, axis=0, keepdims=False)


def m_config(
  num_tasks: int,
  *,
  beta: jax.typing.ArrayLike = 0.9,
  selection: str = "cycle",
  all_tasks: bool = False,
  key: int | jax.Array = 0,
  adaptive: bool = False,
  beta2: jax.typing.ArrayLike = 0.999,
  eps: jax.typing.ArrayLike = 1e-8,
  wait_for_all: bool = False,
  shared: tree_lib.SharedSpec = None,
  task_specific: str = "sum",
) -> optax.GradientTransformationExtraArgs:
  r"""M-ConFIG: ConFIG applied to per-task momenta, updating ONE task's momentum per step.

  Each task :math:`i` keeps an Adam-style first moment :math:`m_i` of its own gradients. At each
  step one task :math:`k` is selected (round robin, ``k = count mod T``, by default), only its
  gradient :math:`g_k` is used, and the update is :func:`mtjax.config`'s combination of the
  bias-corrected momenta:

  .. math::
    m_k &\leftarrow \beta\, m_k + (1 - \beta)\, g_k, \qquad n_k \leftarrow n_k + 1, \\
    \hat m_i &= m_i / (1 - \beta^{n_i}) \quad (\hat m_i = 0 \text{ while } n_i = 0), \\
    d &= \operatorname{ConFIG}(\hat m_1, \dots, \hat m_T) = \sum_i w_i \hat m_i,

  with ConFIG's coefficients :math:`w` from the Gram matrix of :math:`\hat m` on the shared leaves
  (summed leaf by leaf, :func:`mtjax.transforms._config.config_weights`). A task not yet seen has
  a zero momentum, which ConFIG leaves out (the first step is :math:`d = g_k`). The point of
  the method is its cost: ONE backward pass per step. Given a deferred Jacobian
  (``mtjax.task_grads(..., deferred=True)``) only :math:`g_k = J^\top e_k` is computed (one
  backward pass; a second one, :math:`J^\top\mathbf 1`, only when task-specific leaves take the
  plain sum); given stacked gradients it reads row :math:`k`. The momenta are the memory cost:
  state ``[T, *param.shape]`` per leaf.

  Options and the reference code (the paper's Algorithm, M-ConFIG, by default except where noted):

  * ``selection="random"``: a uniformly random task per step (from ``key``) instead of the
    round robin of the paper and its code.
  * ``all_tasks=True``: every momentum takes its task's gradient at every step (T rows: the
    stacked gradients, or T backward passes of a deferred Jacobian): ConFIG on momenta, no
    cycling; deterministic and permutation equivariant.
  * ``adaptive=True``: the paper's M-ConFIG optimizer also rescales the direction by an
    Adam-style second moment of a pseudo-gradient (the reference code's
    ``PseudoMomentumOperator``): with :math:`s` counting these steps,
    :math:`\tilde m = d\,(1 - \beta^s)`, :math:`\tilde g = (\tilde m - \beta \tilde m_{prev})/(1 -
    \beta)`, :math:`\nu \leftarrow \beta_2 \nu + (1 - \beta_2)\tilde g^2`, and the output is
    :math:`d / (\sqrt{\nu / (1 - \beta_2^s)} + \epsilon)`, element-wise; chain it with
    ``optax.sgd`` (the authors advise against Adam on top). Off by default: an mtjax transform
    emits a direction for any optax optimizer, and the default ``optax.chain(m_config, adam)``
    keeps Adam's scaling in the optimizer.
  * ``wait_for_all=True``: as the reference code, the update is zero until every task has been
    seen once (the first T - 1 steps of the round robin), and the adaptive steps start then.

  Task-specific leaves (``shared=`` mask False) get the plain sum of the current task gradients
  (``task_specific="sum"``, the contract) or ConFIG's combination of their momenta
  (``"weighted"``).

  .. warning::
    Must be first in an ``optax.chain``: it consumes per-task gradients (every leaf
    ``[T, *param.shape]``, e.g. from :func:`mtjax.task_grads`) and emits params-shaped updates.
    Do not wrap it in ``optax.MultiSteps``.

  Examples:
    >>> import jax.numpy as jnp, optax, mtjax
    >>> params = {'w': jnp.zeros(3)}
    >>> task_grads = {'w': jnp.array([[-4., 1., 1.], [6., 1., 1.]])}
    >>> tx = optax.chain(mtjax.m_config(num_tasks=2), optax.sgd(1.0))
    >>> state = tx.init(params)
    >>> updates, state = tx.update(task_grads, state, params)  # step 1: task 0 only, d = g_0
    >>> [round(x, 4) for x in (-updates['w']).tolist()]
    [-4.0, 1.0, 1.0]
    >>> updates, state = tx.update(task_grads, state, params)  # step 2: ConFIG of both momenta
    >>> [round(x, 4) for x in (-updates['w']).tolist()]
    [0.1588, 2.0706, 2.0706]

  Args:
    num_tasks: number of tasks ``T`` (static; shapes the momenta at ``init``).
    beta: first-moment decay :math:`\beta \in [0, 1)` (traceable).
    selection: ``"cycle"`` (round robin, the paper) or ``"random"``.
    all_tasks: update every task's momentum at every step (static).
    key: PRNG seed (int) or key of ``selection="random"``.
    adaptive: the paper's pseudo-gradient second moment (static; see above).
    beta2: second-moment decay of ``adaptive=True`` (traceable).
    eps: :math:`\epsilon` of ``adaptive=True`` (traceable).
    wait_for_all: zero updates until every task has been seen (the reference code; static).
    shared: shared-parameter mask (see :func:`mtjax.shared_mask`); ConFIG's Gram comes from the
      shared leaves only.
    task_specific: ``"sum"`` (plain sum of the task gradients on task-specific leaves) or
      ``"weighted"`` (ConFIG's combination of the momenta there too).

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with state :class:`MConFIGState`.

  References:
    Liu, Chu and Thuerey, *ConFIG: Towards Conflict-free Training of Physics Informed Neural
    Networks*, ICLR 2025. https://arxiv.org/abs/2408.11104
  """
  method = "m_config"
  if not isinstance(num_tasks, (int, np.integer)) or isinstance(num_tasks, bool) or num_tasks < 1:
    raise ValueError(
      f"mtjax: {method}: num_tasks must be a positive int (it shapes the momenta "
      f"[T, *param.shape] at init), got {num_tasks!r}."
    )
  num_tasks = int(num_tasks)
  if selection not in SELECTIONS:
    raise ValueError(f"mtjax: {method}: selection must be one of {SELECTIONS}, got {selection!r}.")
  if task_specific not in ("sum", "weighted"):
    raise ValueError(f"mtjax: {method}: task_specific must be 'sum' or 'weighted', got {task_specific!r}.")
  for name, value in (("beta", beta), ("beta2", beta2)):
    if numerics._is_concrete(value):  # pylint: disable=protected-access
      v = np.asarray(value, np.float64)
      if not np.all((v >= 0) & (v < 1)):
        raise ValueError(f"mtjax: {method}: {name} must be in [0, 1), got {value!r}.")
  if numerics._is_concrete(eps) and not np.all(np.asarray(eps, np.float64) >= 0):  # pylint: disable=protected-access
    raise ValueError(f"mtjax: {method}: eps must be non-negative, got {eps!r}.")

  def init_fn(params):
    composition.check_not_wrapped("m_config")  # optax.MultiSteps / masked / apply_if_finite around it
    dtype = weighting.params_dtype(params)
    zeros_like = lambda p: jnp.zeros(jnp.shape(p), jnp.result_type(p))  # noqa: E731
    return MConFIGState(
      count=jnp.zeros((), jnp.int32),
      task_counts=jnp.zeros((num_tasks,), jnp.int32),
      momenta=jax.tree.map(lambda p: jnp.zeros((num_tasks,) + jnp.shape(p), jnp.result_type(p)), params),
      key=seed_key(key),
      weights=jnp.zeros((num_tasks,), dtype),
      moment_count=jnp.zeros((), jnp.int32),
      nu=jax.tree.map(zeros_like, params) if adaptive else None,
      prev=jax.tree.map(zeros_like, params) if adaptive else None,
    )

  def update_fn(updates, state, params=None, *, task_losses=None, **extra_args):
    del extra_args
    lazy = updates if is_lazy(updates) else None
    if lazy is not None and all_tasks:
      updates, lazy = lazy.materialize(), None  # every row is needed
    if lazy is None:  # mixed precision: bfloat16 rows of float32 params, float32 momenta and update
      updates = rows_lib.upcast_rows(updates, params)
    struct = lazy.shapes() if lazy is not None else updates
    t = tree_lib.check_task_axis(struct, num_tasks, name=f"the task gradients given to {method}")
    tree_lib.check_params_match(struct, params)
    _, losses_check = weighting.check_task_losses(task_losses, t, required=False, method=method, check_finite=True)
    flat_struct, treedef = rows_lib.flatten(struct)
    n = len(flat_struct)
    if shared is None:
      mask = lazy.default_mask(n) if lazy is not None else [True] * n
    else:
      mask = tree_lib.resolve_shared(shared, struct, params)
    if not any(mask):
      raise ValueError(f"mtjax: {method}: the shared= mask marks no leaf as shared; nothing to weight.")
    momenta = treedef.flatten_up_to(state.momenta)
    acc = numerics.gram_dtype(jnp.result_type(*[rows_lib.leaf_dtype(x) for x in flat_struct]))
    b = jnp.asarray(beta, acc)
    need_sum = task_specific == "sum" and not all(mask)

    # The gradients this step uses: all rows, or task k's (one backward pass of a deferred Jacobian).
    next_key, sub = jax.random.split(state.key)
    if all_tasks:
      leaves = flat_struct
      selected = jnp.ones((t,), bool)
      rows = plain = None
    else:
      if selection == "cycle":
        k = (state.count % t).astype(jnp.int32)
      else:
        k = jax.random.randint(sub, (), 0, t, jnp.int32)
      onehot = jax.nn.one_hot(k, t, dtype=acc)
      selected = onehot > 0
      if lazy is not None:
        rows = jax.tree.leaves(lazy.weighted_sum(onehot.astype(lazy.dtype)))
        plain = jax.tree.leaves(lazy.weighted_sum(jnp.ones((t,), lazy.dtype))) if need_sum else None
      else:
        rows = [_row(leaf, k, onehot) for leaf in flat_struct]
        plain = None
      leaves = None

    # Finiteness (one reduction per leaf): of every row when they are materialized (even those this step does
    # not read), else of the rows computed.
    seen = list(flat_struct) if lazy is None else list(rows) + (list(plain) if plain is not None else [])
    bad = jnp.any(jnp.stack([jnp.any(~jnp.isfinite(x.values if isinstance(x, SparseRows) else x)) for x in seen]))
    grads_check = numerics.condition_check(
      bad,
      f"mtjax: non-finite task gradients given to {method} (NaN/inf in a task gradient). Check the loss "
      "for NaN/inf (log of 0, division by zero, exploding logits).",
    )

    new_momenta = []
    for i, m in enumerate(momenta):
      m_acc = m.astype(acc)
      if all_tasks:
        leaf = leaves[i]
        g = leaf.todense() if isinstance(leaf, SparseRows) else leaf
        new = b * m_acc + (1 - b) * g.astype(acc)
      else:
        g = rows[i].astype(acc)
        sel = jnp.reshape(selected, (-1,) + (1,) * (m.ndim - 1))
        new = jnp.where(sel, b * m_acc + (1 - b) * g[None], m_acc)
      new_momenta.append(new.astype(m.dtype))
    task_counts = state.task_counts + selected.astype(jnp.int32)
    # Bias correction 1 / (1 - beta^n_i) (0 for a task never seen), applied through the Gram and the weights.
    corr = numerics.safe_div(jnp.ones((t,), acc), 1 - b ** task_counts.astype(acc))
    corr = jnp.where(task_counts > 0, corr, 0)
    gram = sum(numerics.leaf_gram(m).astype(acc) for m, s in zip(new_momenta, mask) if s)
    gram = corr[:, None] * gram * corr[None, :]
    gram = jnp.where(jnp.isfinite(gram), gram, jnp.zeros_like(gram))  # non-finite rows: the check raises
    w = config_weights(gram).astype(acc)
    ready = jnp.all(task_counts > 0) if wait_for_all else jnp.ones((), bool)
    w = jnp.where(ready, w, 0)
    w = numerics.enforce(w, losses_check, grads_check)
    coef = w * corr  # d = sum_i w_i m_hat_i = sum_i (w_i corr_i) m_i

    out = []
    for i, (m, s) in enumerate(zip(new_momenta, mask)):
      dtype = rows_lib.leaf_dtype(flat_struct[i])
      if s or task_specific == "weighted":
        out.append(numerics.weighted_task_sum(coef, m).astype(dtype))
      elif leaves is not None:
        out.append(rows_lib.leaf_sum(leaves[i]).astype(dtype))
      elif plain is not None:
        out.append(plain[i].astype(dtype))
      else:
        out.append(rows_lib.leaf_sum(flat_struct[i]).astype(dtype))

    moment_count = state.moment_count
    nu, prev = state.nu, state.prev
    if adaptive:
      moment_count = jnp.where(ready, optax.safe_increment(moment_count), moment_count)
      s_ = moment_count.astype(acc)
      b2 = jnp.asarray(beta2, acc)
      nu_l, prev_l = treedef.flatten_up_to(state.nu), treedef.flatten_up_to(state.prev)
      new_nu, new_prev = [], []
      for i, s in enumerate(mask):
        if not (s or task_specific == "weighted"):  # the plain sum is left as it is
          new_nu.append(nu_l[i])
          new_prev.append(prev_l[i])
          continue
        d = out[i].astype(acc)
        fake_m = d * (1 - b**s_)
        fake_g = numerics.safe_div(fake_m - b * prev_l[i].astype(acc), 1 - b)
        v = b2 * nu_l[i].astype(acc) + (1 - b2) * jnp.square(fake_g)
        v_hat = numerics.safe_div(v, 1 - b2**s_)
        scaled = d / (jnp.sqrt(v_hat) + jnp.asarray(eps, acc))
        new_nu.append(jnp.where(ready, v, nu_l[i].astype(acc)).astype(nu_l[i].dtype))
        new_prev.append(jnp.where(ready, fake_m, prev_l[i].astype(acc)).astype(prev_l[i].dtype))
        out[i] = jnp.where(ready, scaled, 0).astype(out[i].dtype)
      nu, prev = jax.tree.unflatten(treedef, new_nu), jax.tree.unflatten(treedef, new_prev)

    new_state = MConFIGState(
      count=optax.safe_increment(state.count),
      task_counts=task_counts,
      momenta=jax.tree.unflatten(treedef, new_momenta),
      key=next_key if selection == "random" else state.key,
      weights=w.astype(state.weights.dtype),
      moment_count=moment_count,
      nu=nu,
      prev=prev,
    )
    return jax.tree.unflatten(treedef, out), new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
