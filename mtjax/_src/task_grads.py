"""Per-task gradients: one update's worth of Jacobian rows with a leading task axis.

``task_grads(loss_fn)`` returns the rows as a pytree (``[T, *param.shape]`` leaves, or
:class:`~mtjax._src.sparse.SparseRows` for embedding tables looked up through
:func:`mtjax.embedding_lookup`), or a lazy Jacobian that a transform asks for exactly what it
needs: :class:`TaskJacobian` (``deferred=True``), :class:`RepJacobian` (``strategy="rep"``) and
:class:`SharedJacobian` (``strategy="shared"``).

A lazy Jacobian answers one question for the Gram core, ``gram_and_combiner(layout, need_gram)``:
the ``[K, T, T]`` Gram matrices of the leaves the layout puts in Grams, and a function from the
method's weights to the update leaves.
"""

from __future__ import annotations

import functools
import threading
from typing import Any, Callable, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mtjax._src import rows as rows_lib
from mtjax._src import sparse as sparse_lib
from mtjax._src.sparse import SparseRows

PyTree = Any
STRATEGIES = ("auto", "loop", "map", "vmap", "rep", "shared")
ROW_STRATEGIES = ("auto", "loop", "map", "vmap")
REP_GRAMS = ("sum", "stack")


def _resolve(strategy: str) -> str:
  return default_strategy() if strategy == "auto" else strategy


def _index(tree, t):
  return jax.tree.map(lambda x: x[t], tree)


def map_rows(fn: Callable, cots: PyTree, strategy: str, chunk_size: Optional[int] = None) -> PyTree:
  """``fn(c)`` for every ``c`` along the leading axis of ``cots``, stacked (loop / map / vmap).

  ``chunk_size = c`` computes ``c`` of them at a time (``lax.map`` with ``batch_size=c``: each chunk
  vmapped), bounding the backward pass's temporaries to ``c`` rows.
  """
  strat = _resolve(strategy)
  n = jax.tree.leaves(cots)[0].shape[0]
  if chunk_size is not None and chunk_size < n and strat != "loop":
    return jax.lax.map(fn, cots, batch_size=int(chunk_size))
  if strat == "loop":
    outs = [fn(_index(cots, t)) for t in range(n)]
    return jax.tree.map(lambda *xs: jnp.stack(xs), *outs)
  if strat == "map":
    return jax.lax.map(fn, cots)
  return jax.vmap(fn)(cots)


def _rows(vjp_fn, num_tasks: int, dtype, strategy: str, chunk_size: Optional[int] = None) -> PyTree:
  """The T Jacobian rows ``vjp_fn(e_t)[0]``, stacked on a leading task axis."""
  return map_rows(lambda c: vjp_fn(c)[0], jnp.eye(num_tasks, dtype=dtype), strategy, chunk_size)


# ------------------------------------------------------------------------------------------------
# The plan: how the differentiated inputs ("x": dense leaves, then one tap per sparse lookup) map
# back to the parameters.


class TableInfo(NamedTuple):
  leaf: int
  table_shape: tuple
  taps: tuple  # ((tap index, mode), ...)


class Plan(NamedTuple):
  """Static map from the differentiated inputs ``x = dense leaves + taps`` back to the param leaves."""

  treedef: Any
  leaf_specs: tuple  # ((shape, dtype), ...) per param leaf
  dense: tuple  # param leaf of x[j], j < len(dense)
  tables: tuple  # TableInfo per sparse table

  @property
  def num_x(self) -> int:
    return len(self.dense) + sum(len(t.taps) for t in self.tables)

  def x_of_leaf(self) -> list[list[int]]:
    """For every param leaf, the x indices that carry its gradient."""
    out: list[list[int]] = [[] for _ in self.leaf_specs]
    for j, leaf in enumerate(self.dense):
      out[leaf].append(j)
    base = len(self.dense)
    for t in self.tables:
      out[t.leaf].extend(base + k for k, _ in t.taps)
    return out

  def table_rows(self, t: TableInfo, tap_values: Sequence[jax.Array], ids: Sequence[jax.Array], lead: tuple):
    """Canonical ids ``[N]`` and values ``[*lead, N, *row]`` of one table's lookups."""
    all_ids, all_vals = [], []
    row = t.table_shape[1:]
    for k, mode in t.taps:
      cid, valid = sparse_lib.canonical_ids(ids[k], t.table_shape[0], mode)
      v = jnp.reshape(tap_values[k], lead + (-1,) + row)
      v = v * jnp.reshape(valid, (1,) * len(lead) + valid.shape + (1,) * len(row)).astype(v.dtype)
      all_ids.append(cid)
      all_vals.append(v)
    if len(all_ids) == 1:
      return all_ids[0], all_vals[0]
    return jnp.concatenate(all_ids), jnp.concatenate(all_vals, axis=len(lead))

  def to_update(self, xcot: Sequence[Optional[jax.Array]], ids) -> list:
    """Params-shaped leaves from a cotangent of x (``None`` entries are zeros)."""
    out: list = [None] * len(self.leaf_specs)
    for j, leaf in enumerate(self.dense):
      out[leaf] = xcot[j]
    base = len(self.dense)
    for t in self.tables:
      taps = {k: xcot[base + k] for k, _ in t.taps}
      present = {k: v for k, v in taps.items() if v is not None}
      if present:
        sub = TableInfo(t.leaf, t.table_shape, tuple(tm for tm in t.taps if tm[0] in present))
        cid, vals = self.table_rows(sub, present, ids, ())
        out[t.leaf] = sparse_lib.scatter_rows(cid, vals, t.table_shape)
    for i, (shape, dtype) in enumerate(self.leaf_specs):
      if out[i] is None:
        out[i] = jnp.zeros(shape, dtype)
    return out

  def to_rows(self, xrows: Sequence[Optional[jax.Array]], ids, num_tasks: int, leaves: Optional[set] = None) -> list:
    """Per-task rows per param leaf (``[T, ...]`` or :class:`SparseRows`); ``None`` outside ``leaves``."""
    out: list = [None] * len(self.leaf_specs)
    for j, leaf in enumerate(self.dense):
      if leaves is None or leaf in leaves:
        shape, dtype = self.leaf_specs[leaf]
        out[leaf] = xrows[j] if xrows[j] is not None else jnp.zeros((num_tasks,) + shape, dtype)
    base = len(self.dense)
    for t in self.tables:
      if leaves is not None and t.leaf not in leaves:
        continue
      vals = {}
      for k, _ in t.taps:
        v = xrows[base + k]
        if v is None:
          v = jnp.zeros((num_tasks,) + tuple(ids[k].shape) + t.table_shape[1:], self.leaf_specs[t.leaf][1])
        vals[k] = v
      cid, v = self.table_rows(t, vals, ids, (num_tasks,))
      out[t.leaf] = SparseRows(cid, v, t.table_shape)
    return out

  def unflatten(self, leaves: Sequence[Any]) -> PyTree:
    return jax.tree.unflatten(self.treedef, list(leaves))

  def shapes(self, num_tasks: int) -> PyTree:
    return self.unflatten([jax.ShapeDtypeStruct((num_tasks,) + tuple(s), d) for s, d in self.leaf_specs])


def _add(a, b):
  if a is None:
    return b
  if b is None:
    return a
  return a + b


def _check_weights(weights, num_tasks: int, what: str) -> jax.Array:
  weights = jnp.asarray(weights)
  if weights.shape != (num_tasks,):
    raise ValueError(f"mtjax: {what} needs {num_tasks} weights, got shape {weights.shape}.")
  return weights


# ------------------------------------------------------------------------------------------------
# Lazy Jacobians


@jax.tree_util.register_pytree_node_class
class TaskJacobian:
  r"""Per-task gradients not yet computed: the task losses' VJP after the shared forward pass.

  ``mtjax.task_grads(loss_fn, deferred=True)`` returns one in place of the stacked gradients.
  Every mtjax transform accepts it where it accepts task gradients, and pays only for what it
  needs:

  * methods whose weights do not read the gradients (``linear``, ``dwa``, ``uncertainty``,
    ``rlw``) form :math:`\sum_t w_t g_t = J^\top w` with ONE backward pass (two when task-specific
    leaves take the plain sum, ``task_specific="sum"`` with a ``shared=`` mask);
  * a method whose Gram covers only some leaves (``gram_leaves=``, GradNorm's last shared layer:
    the "subset" strategy) gets the T rows of those leaves only, then the update from one
    backward pass of :math:`\sum_t w_t L_t`;
  * every other method calls :meth:`materialize` (the T backward passes of ``strategy``) and gives
    exactly the result it gives on ``task_grads(loss_fn)``.

  It is a pytree (the VJP's residuals are its leaves), so it crosses ``jit`` boundaries. Code
  outside mtjax that expects arrays should call :meth:`materialize`.

  Attributes:
    num_tasks: ``T``.
    strategy: how :meth:`materialize` computes the T rows (``"auto"``, ``"loop"``, ``"map"``, ``"vmap"``).
    task_vjps: ``None``, or, when the loss is separable by task (see :func:`mtjax.task_grads`), the T
      linear maps that take 1 to task ``t``'s cotangent of the differentiated inputs by a backward
      pass through task ``t``'s head only; :meth:`materialize` then uses them.
  """

  def __init__(
    self,
    vjp_fn,
    num_tasks: int,
    dtype,
    strategy: str = "auto",
    param_struct=None,
    plan=None,
    ids=(),
    chunk_size=None,
    task_vjps=None,
  ):
    self.vjp_fn = vjp_fn
    # T linear maps 1 -> the x cotangent of L_t alone (see _task_vjps), or None: rows from vjp_fn(e_t)
    self.task_vjps = None if task_vjps is None else tuple(task_vjps)
    self.num_tasks = int(num_tasks)
    self.dtype = jnp.dtype(dtype)
    self.strategy = strategy
    # (treedef, ((shape, dtype), ...)) of the differentiated params: static, hashable
    self.param_struct = param_struct
    self.plan = plan  # None: vjp_fn(c) -> (params-shaped grads,); else vjp_fn(c) -> (dense list, taps list)
    self.ids = tuple(ids)
    self.chunk_size = chunk_size

  @classmethod
  def from_vjp(cls, vjp_fn, num_tasks: int, dtype, strategy: str, params) -> TaskJacobian:
    leaves, treedef = jax.tree.flatten(params)
    struct = (treedef, tuple((tuple(jnp.shape(x)), jnp.result_type(x)) for x in leaves))
    return cls(vjp_fn, num_tasks, dtype, strategy, struct)

  def tree_flatten(self):
    return (self.vjp_fn, self.ids, self.task_vjps), (
      self.num_tasks,
      self.dtype,
      self.strategy,
      self.param_struct,
      self.plan,
      self.chunk_size,
    )

  @classmethod
  def tree_unflatten(cls, aux, children):
    num_tasks, dtype, strategy, struct, plan, chunk = aux
    return cls(children[0], num_tasks, dtype, strategy, struct, plan, children[1], chunk, children[2])

  def _xcot(self, c) -> list:
    out = self.vjp_fn(c)
    if self.plan is None:
      return jax.tree.leaves(out[0])
    return list(out[0]) + list(out[1])

  def _leaves_from_x(self, xs: list) -> list:
    return xs if self.plan is None else self.plan.to_update(xs, self.ids)

  def _treedef(self):
    if self.plan is not None:
      return self.plan.treedef
    return jax.tree.structure(self.shapes())

  def weighted_sum(self, weights: jax.Array) -> PyTree:
    r""":math:`\sum_t w_t \nabla L_t = J^\top w`, params-shaped, with one backward pass."""
    weights = _check_weights(weights, self.num_tasks, "TaskJacobian.weighted_sum")
    leaves = self._leaves_from_x(self._xcot(weights.astype(self.dtype)))
    return jax.tree.unflatten(self._treedef(), leaves)

  def _x_rows(self, select: Optional[Sequence[int]] = None) -> list:
    """Rows of the x entries (all, or only ``select``), ``None`` elsewhere."""
    if self.task_vjps is not None and self.chunk_size is None and _resolve(self.strategy) == "map":
      return self._task_x_rows(select)
    if select is None:
      return list(map_rows(self._xcot, jnp.eye(self.num_tasks, dtype=self.dtype), self.strategy, self.chunk_size))
    sel = list(select)

    def pick(c):
      xs = self._xcot(c)
      return [xs[j] for j in sel]

    got = map_rows(pick, jnp.eye(self.num_tasks, dtype=self.dtype), self.strategy, self.chunk_size)
    out: list = [None] * (self.plan.num_x if self.plan is not None else len(jax.tree.leaves(self.shapes())))
    for j, r in zip(sel, got):
      out[j] = r
    return out

  def _task_x_rows(self, select: Optional[Sequence[int]]) -> list:
    """The rows from the per-task maps: ``lax.map`` over the tasks, ``lax.switch`` to task ``t``'s backward
    pass, which runs through task ``t``'s head only (not through the others' on zero cotangents)."""
    one = jnp.ones((), self.dtype)

    def branch(tr):
      def run():
        xs = list(tr(one)[0])
        return xs if select is None else [xs[j] for j in select]

      return run

    branches = [branch(tr) for tr in self.task_vjps or ()]
    got = jax.lax.map(lambda i: jax.lax.switch(i, branches), jnp.arange(self.num_tasks))
    if select is None:
      return list(got)
    out: list = [None] * (self.plan.num_x if self.plan is not None else len(jax.tree.leaves(self.shapes())))
    for j, r in zip(select, got):
      out[j] = r
    return out

  def materialize(self) -> PyTree:
    """The per-task gradients, every leaf ``[T, *param.shape]`` or :class:`SparseRows` (T backward passes)."""
    xr = self._x_rows()
    if self.plan is None:
      return jax.tree.unflatten(self._treedef(), xr)
    return self.plan.unflatten(self.plan.to_rows(xr, self.ids, self.num_tasks))

  def shapes(self) -> PyTree:
    """``jax.ShapeDtypeStruct`` leaves ``[T, *param.shape]``: the materialized structure, no compute."""
    if self.plan is not None:
      return self.plan.shapes(self.num_tasks)
    if self.param_struct is None:  # built by hand from a VJP: trace it abstractly
      grad = jax.eval_shape(lambda: self.vjp_fn(jnp.zeros((self.num_tasks,), self.dtype))[0])
      return jax.tree.map(lambda g: jax.ShapeDtypeStruct((self.num_tasks,) + tuple(g.shape), g.dtype), grad)
    treedef, specs = self.param_struct
    return jax.tree.unflatten(
      treedef, [jax.ShapeDtypeStruct((self.num_tasks,) + shape, dtype) for shape, dtype in specs]
    )

  def default_mask(self, num_leaves: int) -> list[bool]:
    return [True] * num_leaves

  def gram_and_combiner(self, layout: rows_lib.Layout, need_gram: bool):
    """See the module docstring: the Grams the layout asks for and ``weights -> update leaves``."""
    n = len(layout.mask)
    shared = [i for i in range(n) if layout.mask[i]]
    in_gram = [i for i in range(n) if layout.group[i] >= 0]
    if need_gram and shared and len(in_gram) == len(shared):  # every shared leaf in a Gram: all T rows
      leaves = rows_lib.flatten(self.materialize())[0]
      return rows_lib.rows_gram_and_combiner(leaves, layout, True)
    grams = None
    if need_gram:  # the "subset" strategy: rows of the Gram leaves only
      if self.plan is None:
        select = in_gram
      else:
        x_of = self.plan.x_of_leaf()
        select = sorted(j for i in in_gram for j in x_of[i])
      xr = self._x_rows(select)
      if self.plan is None:
        sub = [xr[i] if i in in_gram else None for i in range(n)]
      else:
        sub = self.plan.to_rows(xr, self.ids, self.num_tasks, leaves=set(in_gram))
      grams = rows_lib.compute_grams(
        [sub[i] for i in in_gram], [layout.group[i] for i in in_gram], max(layout.num_groups, 1)
      )

    def combine(weights):
      if weights.ndim != 1:  # per-group weights: the rows of every leaf are needed after all
        leaves = rows_lib.flatten(self.materialize())[0]
        return [rows_lib.combine_leaf(i, leaf, weights, layout) for i, leaf in enumerate(leaves)]
      out = jax.tree.leaves(self.weighted_sum(weights))
      ts = rows_lib.task_specific_weights(weights, layout)
      if not all(layout.mask) and ts is None:  # task-specific leaves: plain sum, cotangent 1
        plain = jax.tree.leaves(self.weighted_sum(jnp.ones_like(weights)))
        out = [o if m else p for o, p, m in zip(out, plain, layout.mask)]
      return out

    return grams, combine


def _split_x(xs: Sequence[Any], idx: Sequence[int]):
  return [xs[j] for j in idx]


def _merge_x(base: Sequence[Any], idx: Sequence[int], values: Sequence[Any]) -> list:
  out = list(base)
  for j, v in zip(idx, values):
    out[j] = v
  return out


class _TaskVjpsRange(threading.local):
  """The task counts for which the default rows use per-task backward passes (:func:`_task_vjps`): from 3
  (at T = 2 the heads' waste, 4 head passes for 2, is small next to compiling T branches; at T = 3 the
  PCGrad step of the benchmark MMoE took 1.43-1.62x of the summed step against 1.57-1.77x in three runs,
  ``benchmarks/per_task_heads.py``) to 16 (the program holds T copies of the backward pass)."""

  min_tasks = 3
  max_tasks = 16


_TASK_VJPS = _TaskVjpsRange()


def _aval(v) -> tuple:
  """``(shape, dtype)`` of a jaxpr variable."""
  aval = getattr(v, "aval", None)
  return tuple(getattr(aval, "shape", ())), getattr(aval, "dtype", None)


def _split_task_losses(closed, num_tasks: int):
  """The loss's jaxpr with its T task losses as T separate outputs, or ``None``.

  The loss ends in ``stack(l_0, ..., l_{T-1})`` (``jnp.stack`` of per-task scalars); models stack their
  T outputs too and the loss reads ``outputs[t]`` (``squeeze(slice(stack(...)))``). Forwarding every such
  read to the stacked operand makes ``l_t`` depend only on what task ``t`` computes, so a backward pass
  from ``l_t`` alone skips the other tasks' heads (JAX's symbolic zeros). Internal JAX APIs; any
  surprise returns ``None`` (the rows then come from the VJP with cotangents ``e_t``, as before).
  """
  from jax._src import core as jcore  # pylint: disable=import-outside-toplevel
  from jax._src.interpreters import partial_eval as pe  # pylint: disable=import-outside-toplevel

  jaxpr = pe.convert_constvars_jaxpr(closed.jaxpr)
  if closed.effects or len(jaxpr.outvars) != 1:
    return None
  stack_of: dict = {}
  picked: dict = {}
  alias: dict = {}
  eqns = []

  def sub(v):
    return alias.get(v, v) if isinstance(v, jcore.Var) else v

  for e in jaxpr.eqns:
    invars = [sub(v) for v in e.invars]
    name = e.primitive.name
    src = invars[0] if invars and isinstance(invars[0], jcore.Var) else None
    if name == "stack":
      stack_of[e.outvars[0]] = (invars, e.params.get("axis"))
    elif name == "slice" and src in stack_of and e.params.get("strides") is None:
      ops, ax = stack_of[src]
      start, limit, shape = e.params["start_indices"], e.params["limit_indices"], _aval(src)[0]
      whole = all(i == ax or (start[i] == 0 and limit[i] == shape[i]) for i in range(len(shape)))
      if whole and limit[ax] - start[ax] == 1:
        picked[e.outvars[0]] = (ops[start[ax]], ax)
    elif name == "squeeze" and src in picked and tuple(e.params["dimensions"]) == (picked[src][1],):
      op = picked[src][0]
      out = e.outvars[0]
      if isinstance(op, jcore.Var) and _aval(op) == _aval(out):
        alias[out] = op
        continue
    eqns.append(e.replace(invars=invars))
  last = sub(jaxpr.outvars[0])
  if not isinstance(last, jcore.Var) or last not in stack_of:
    return None
  losses, ax = stack_of[last]
  if ax != 0 or len(losses) != num_tasks or any(_aval(v)[0] != () for v in losses):
    return None
  split, _ = pe.dce_jaxpr(jaxpr.replace(eqns=eqns, outvars=list(losses)), [True] * num_tasks, instantiate=True)
  return split


# The primitives a row-local tail may use (see _row_local_tail): position-wise ones (every operand of the
# output's rank, broadcast along its size-1 axes, or a scalar), and those whose effect on the task axis
# is known from their parameters.
_ELEMENTWISE = frozenset(
  """abs acos acosh add and asin asinh atan atan2 atanh cbrt ceil clamp convert_element_type copy copy_p cos cosh
  div eq erf erf_inv erfc exp exp2 expm1 floor ge gt integer_pow is_finite le lgamma log log1p logistic lt max
  min mul ne neg nextafter not or pow reduce_precision rem round rsqrt select_n sign sin sinh sqrt square
  stop_gradient sub tan tanh xor digamma""".split()
)
_REDUCTIONS = frozenset("reduce_sum reduce_max reduce_min reduce_prod reduce_and reduce_or argmax argmin".split())


def _broadcasts_to(shape: tuple, out_shape: tuple) -> bool:
  """A scalar, or the rank of ``out_shape`` with each axis equal to the output's or 1."""
  return shape == () or (len(shape) == len(out_shape) and all(d in (1, o) for d, o in zip(shape, out_shape)))


def _row_local_axes(jaxpr, in_axes: dict) -> Optional[dict]:
  """Follows a task axis through ``jaxpr``: ``in_axes`` maps some variables to the position of their task
  axis; returns the map extended to every variable computed from them, or ``None`` as soon as an equation
  could mix the rows of different tasks (an unknown primitive, a reduction or a reshape over the task
  axis, a matrix product, ...). Nested ``jit`` / ``custom_jvp`` calls are followed into their jaxprs."""
  from jax._src import core as jcore  # pylint: disable=import-outside-toplevel

  axes = dict(in_axes)
  for e in jaxpr.eqns:
    dep = [(i, v) for i, v in enumerate(e.invars) if isinstance(v, jcore.Var) and v in axes]
    if not dep:
      continue
    if e.effects or (len(e.outvars) != 1 and e.primitive.name not in ("jit", "pjit", "custom_jvp_call")):
      return None
    name = e.primitive.name
    out = e.outvars[0]
    out_shape = _aval(out)[0]
    ax = {axes[v] for _, v in dep}
    if len(ax) != 1:
      return None
    a = ax.pop()
    if name in _ELEMENTWISE:  # operands of the output's rank broadcast only along their size-1 axes
      if not all(_broadcasts_to(_aval(v)[0], out_shape) for v in e.invars if isinstance(v, jcore.Var)):
        return None
      if any(_aval(v)[0] == () or _aval(v)[0][a] != out_shape[a] for _, v in dep):
        return None
      axes[out] = a
    elif name in _REDUCTIONS:
      red = tuple(e.params["axes"])
      if a in red:
        return None
      axes[out] = a - sum(1 for r in red if r < a)
    elif name == "squeeze":
      dims = tuple(d % len(_aval(dep[0][1])[0]) for d in e.params["dimensions"])
      if a in dims:
        return None
      axes[out] = a - sum(1 for d in dims if d < a)
    elif name == "broadcast_in_dim":
      bd = tuple(e.params["broadcast_dimensions"])
      if dep[0][0] != 0 or len(dep) != 1 or _aval(dep[0][1])[0][a] != out_shape[bd[a]]:
        return None
      axes[out] = bd[a]
    elif name == "transpose":
      axes[out] = tuple(e.params["permutation"]).index(a)
    elif name == "reshape":  # row-major: a leading task axis that keeps its size keeps every row whole
      in_shape = _aval(dep[0][1])[0]
      if a != 0 or len(dep) != 1 or not out_shape or out_shape[0] != in_shape[0] or e.params.get("dimensions"):
        return None
      axes[out] = 0
    elif name in ("jit", "pjit", "custom_jvp_call"):
      closed = e.params.get("jaxpr") if name != "custom_jvp_call" else e.params.get("call_jaxpr")
      if closed is None:
        return None
      inner = closed.jaxpr
      inner_in = {iv: axes[v] for iv, v in zip(inner.invars, e.invars) if isinstance(v, jcore.Var) and v in axes}
      inner_axes = _row_local_axes(inner, inner_in)
      if inner_axes is None:
        return None
      for ov, iv in zip(e.outvars, inner.outvars):
        if isinstance(iv, jcore.Var) and iv in inner_axes:
          axes[ov] = inner_axes[iv]
    else:
      return None
  return axes


def _row_local_tail(closed, num_tasks: int) -> Optional[Callable]:
  """For a vectorized loss, ``f(*consts, *x) -> [l_0, ..., l_{T-1}]`` whose ``l_t`` reads the stacked task
  outputs through row ``t`` only, or ``None``.

  The loss stacks the T tasks' outputs (``jnp.stack(outs)``, e.g. a model's ``[T, B]`` logits) and computes
  its ``[T]`` losses from them position-wise along the task axis (element-wise terms, reductions over the
  other axes: ``jnp.mean(bce(logits, y), axis=1)``). Row ``s`` of the stack then has no effect on ``l_t``
  (``s != t``), so ``l_t`` is computed from the stack with rows ``s != t`` behind ``stop_gradient``: the same
  value and the same gradient, and a backward pass from ``l_t`` alone skips the other tasks' outputs."""
  from jax._src import core as jcore  # pylint: disable=import-outside-toplevel
  from jax._src.interpreters import partial_eval as pe  # pylint: disable=import-outside-toplevel

  jaxpr = pe.convert_constvars_jaxpr(closed.jaxpr)
  if closed.effects or len(jaxpr.outvars) != 1 or not isinstance(jaxpr.outvars[0], jcore.Var):
    return None
  last = jaxpr.outvars[0]
  if _aval(last)[0] != (num_tasks,):
    return None
  for k in reversed(range(len(jaxpr.eqns))):
    e = jaxpr.eqns[k]
    if e.primitive.name != "stack" or len(e.invars) != num_tasks:
      continue
    if not all(isinstance(v, jcore.Var) for v in e.invars):
      continue
    stacked, axis = e.outvars[0], e.params.get("axis", 0)
    tail_eqns = jaxpr.eqns[k + 1 :]
    axes = _row_local_axes(jaxpr.replace(eqns=tail_eqns), {stacked: axis})
    if axes is None or axes.get(last) != 0:
      continue
    in_tail = [any(isinstance(v, jcore.Var) and v in axes for v in t.invars) for t in tail_eqns]
    tail = [t for t, x in zip(tail_eqns, in_tail) if x]
    rest = [t for t, x in zip(tail_eqns, in_tail) if not x]
    made = {v for t in tail for v in t.outvars} | {stacked}
    free = list(dict.fromkeys(v for t in tail for v in t.invars if isinstance(v, jcore.Var) and v not in made))
    head = jaxpr.replace(eqns=jaxpr.eqns[:k] + rest, outvars=list(e.invars) + free)
    head, _ = pe.dce_jaxpr(head, [True] * len(head.outvars), instantiate=True)
    tail_jaxpr = jaxpr.replace(invars=[stacked] + free, eqns=tail, outvars=[last])
    tail_jaxpr, _ = pe.dce_jaxpr(tail_jaxpr, [True], instantiate=True)

    return functools.partial(_eval_row_local, head, tail_jaxpr, axis, num_tasks)
  return None


def _eval_row_local(head, tail, axis: int, num_tasks: int, *args) -> list:
  """``[l_0, ..., l_{T-1}]`` of :func:`_row_local_tail`: ``head`` gives the T stacked operands and the tail's
  other inputs once; ``l_t`` is row ``t`` of the tail on the stack with every other row behind ``stop_gradient``."""
  from jax._src import core as jcore  # pylint: disable=import-outside-toplevel

  vals = jcore.eval_jaxpr(head, [], *args)
  outs, others = vals[:num_tasks], vals[num_tasks:]
  losses = []
  for t in range(num_tasks):
    rows = [o if s == t else jax.lax.stop_gradient(o) for s, o in enumerate(outs)]
    losses.append(jcore.eval_jaxpr(tail, [], jnp.stack(rows, axis=axis), *others)[0][t])
  return losses


def _task_vjps(loss_of_x: Callable, x0: list, num_tasks: int):
  r"""T linear maps, map ``t`` taking 1 to :math:`\partial L_t/\partial x` by a backward pass from ``L_t``
  alone (after one shared linearization), or ``None`` when the loss's jaxpr has no separable task losses
  (neither a final stack of per-task losses, :func:`_split_task_losses`, nor a row-local tail after the stack
  of the task outputs, :func:`_row_local_tail`).

  The default rows' VJP with cotangent ``e_t`` runs backward through every task's head (on zeros for
  ``T - 1`` of them: ``O(T^2)`` head passes that XLA cannot skip); these run through task ``t``'s only."""
  from jax._src import core as jcore  # pylint: disable=import-outside-toplevel

  if not all(jnp.issubdtype(jnp.result_type(x), jnp.inexact) for x in x0):
    return None
  try:
    closed = jax.make_jaxpr(loss_of_x)(x0)
    split_jaxpr = _split_task_losses(closed, num_tasks)
    if split_jaxpr is not None:
      split = functools.partial(jcore.eval_jaxpr, split_jaxpr, [])
    else:
      split = _row_local_tail(closed, num_tasks)
      if split is None:
        return None
    consts = list(closed.consts)
    _, jvp = jax.linearize(lambda xs: split(*consts, *xs), x0)
    return tuple(jax.linear_transpose(lambda dx, t=t: jvp(dx)[t], x0) for t in range(num_tasks))
  except Exception:  # pragma: no cover - an internal JAX API moved: the e_t rows (exact, slower)
    return None


class _ViewsSwitch(threading.local):
  off = False


_VIEWS = _ViewsSwitch()


def check_task_views(
  loss_fn: Callable[..., jax.Array], params: PyTree, *args, rtol: float = 1e-5, atol: float = 0.0, **kwargs
) -> float:
  r"""Checks a loss's :func:`mtjax.task_view` marks on a sample: one-pass rows equal per-task VJPs.

  Computes every task's :math:`\partial L_t/\partial z` (stacked, as ``"shared"`` forms them -- from
  the factors of :func:`mtjax.linear_einsum` where the heads use it -- and the default ``"rep"`` Gram of
  their batch sums) twice, from ONE backward through the heads with each task reading its own copy (what
  ``task_grads(strategy="rep")`` does when the loss marks its views) and from T per-task backward
  passes (which need no contract), and raises if they differ: a head that reads another task's
  copy. Use a batch where every task's loss depends on ``z`` (labels of every task present).

  Example:
    >>> import jax.numpy as jnp, mtjax
    >>> def loss_fn(params, x):
    ...   z = mtjax.representation(jnp.tanh(x @ params['trunk']))
    ...   return jnp.stack([jnp.mean(mtjax.task_view(z, t) @ params['heads'][t]) for t in range(2)])
    >>> params = {'trunk': jnp.ones((3, 4)), 'heads': [jnp.ones(4), -jnp.ones(4)]}
    >>> float(mtjax.check_task_views(loss_fn, params, jnp.ones((2, 3)))) < 1e-6
    True

  Args:
    loss_fn: ``(params, *args, **kwargs) -> [T]`` losses that mark a representation and its views.
    params: its parameters.
    *args: its other inputs (a sample batch).
    **kwargs: its keyword inputs.
    rtol, atol: the tolerance of each comparison (``rtol`` relative to that array's largest entry).

  Returns:
    The largest difference relative to the largest entry of its array (rows, Gram).

  Raises:
    ValueError: the loss marks no views, or the two computations differ.
  """

  def rows(off):  # every row of z (copies), and the default "rep" Gram (batch sums)
    _VIEWS.off = off

    def f(p, a, k):
      tg = lambda mode, strategy="rep": task_grads(lambda p_: loss_fn(p_, *a, **k), strategy=strategy, rep_gram=mode)(
        p
      )[1]
      return tg("stack").z_rows, tg("sum").gram(), tg("sum", "shared").z_rows  # "shared": factored when linear

    try:
      got = jax.jit(f)(params, args, kwargs)
    finally:
      _VIEWS.off = False
    return [np.asarray(r, np.float64) for r in jax.tree.leaves(jax.device_get(got))]

  probe = sparse_lib.Probe(jax.tree.leaves(params))
  with sparse_lib.recording(probe):
    jax.eval_shape(lambda p: loss_fn(p, *args, **kwargs), params)
  if not probe.views:
    raise ValueError("mtjax.check_task_views: the loss marks no mtjax.task_view; nothing to check.")
  worst = 0.0
  for a, b in zip(rows(False), rows(True)):  # each array against its own scale (rows and Grams differ)
    big = float(np.max(np.abs(b), initial=0.0))
    diff = float(np.max(np.abs(a - b), initial=0.0))
    if not diff <= atol + rtol * big:
      raise ValueError(
        f"mtjax.check_task_views: the per-task representation gradients from one backward (each task reading "
        f"its own mtjax.task_view) differ from the T per-task backward passes by {diff:.3g} (largest entry "
        f"{big:.3g}): some task's head reads another task's view."
      )
    worst = max(worst, diff / big if big > 0 else 0.0)
  return worst


def _views_usable(probe, num_tasks: int, f_fn, x0, z0) -> bool:
  """Whether the heads read ``z`` only through :func:`mtjax.task_view` (then one backward gives every row)."""
  if not probe.views or _VIEWS.off:
    return False
  bad = sorted(t for t in probe.views if not 0 <= t < num_tasks)
  if bad:
    raise ValueError(f"mtjax.task_view: task index {bad[0]} is out of range for a loss of {num_tasks} tasks.")
  jaxpr = jax.make_jaxpr(lambda xs, z, zs: f_fn(xs, z, zs)[0])(x0, z0, tuple(z0 for _ in range(num_tasks)))
  used = sparse_lib.used_inputs(jaxpr)
  n_x, n_z = len(x0), len(jax.tree.leaves(z0))
  return not any(used[n_x : n_x + n_z])  # z read directly somewhere: T per-task VJPs instead


@jax.tree_util.register_pytree_node_class
class BatchSums:
  """The batch sums of the per-task gradients of ``z`` (``[T, ...]`` leaves, ``z``'s batch axis summed out)."""

  def __init__(self, sums):
    self.sums = sums

  def tree_flatten(self):
    return (self.sums,), None

  @classmethod
  def tree_unflatten(cls, aux, children):
    del aux
    return cls(children[0])


@jax.tree_util.register_pytree_node_class
class LazyCopies:
  """The VJP of the heads at T copies of ``z`` (:func:`mtjax.task_view`), evaluated only when the rows are asked
  for (``"shared"``: a step that needs no Gram, e.g. :func:`mtjax.amortized`'s reuse steps, never runs it)."""

  def __init__(self, views_vjp, num_tasks: int, dtype):
    self.views_vjp = views_vjp
    self.num_tasks = int(num_tasks)
    self.dtype = jnp.dtype(dtype)

  def tree_flatten(self):
    return (self.views_vjp,), (self.num_tasks, self.dtype)

  @classmethod
  def tree_unflatten(cls, aux, children):
    return cls(children[0], *aux)

  def stacked(self) -> PyTree:
    return _stack_copies(self.views_vjp(jnp.ones((self.num_tasks,), self.dtype))[0])


@jax.tree_util.register_pytree_node_class
class FactoredViews:
  r"""``"shared"``'s :math:`\partial L_t/\partial z` as factors, for heads that read their views through
  :func:`mtjax._src.sparse.linear_einsum` (the MMoE mixing): task ``t``'s row of leaf ``k`` is
  :math:`\sum_p` ``einsum(spec_p, coef_{t,p}, dout_{t,p})`` over the products ``p`` that read it. The
  factors are small (``[T, B, E]`` and ``[T, B, H]`` for the mixing); :meth:`row` forms one task's row
  inside the trunk's per-task backward pass, so the ``[T, *z.shape]`` rows (and XLA:CPU's concatenation
  of T copies) are never written. The heads' VJP runs only when the rows are asked for."""

  def __init__(self, vjp_fn, coefs, order, meta, z_def, z_specs, num_tasks: int, dtype):
    self.vjp_fn = vjp_fn  # (copies, us, xh) -> ...: cotangent 1 gives every product's dout
    self.coefs = tuple(coefs)  # one per logged product, in trace order
    self.order = tuple(tuple(o) for o in order)  # order[t][p]: the log index of task t's p-th product
    self.meta = tuple(meta)  # per product position p: (z leaf, transposed spec)
    self.z_def = z_def
    self.z_specs = tuple(z_specs)  # (shape, dtype) per z leaf
    self.num_tasks = int(num_tasks)
    self.dtype = jnp.dtype(dtype)

  def tree_flatten(self):
    return (self.vjp_fn, self.coefs), (self.order, self.meta, self.z_def, self.z_specs, self.num_tasks, self.dtype)

  @classmethod
  def tree_unflatten(cls, aux, children):
    return cls(*children, *aux)

  def factors(self):
    """``(coefs, douts)``: per product position, ``[T, ...]`` stacks (one backward through the heads)."""
    douts = self.vjp_fn(jnp.ones((self.num_tasks,), self.dtype))[1]
    stack = lambda vals, p: jnp.stack([vals[self.order[t][p]] for t in range(self.num_tasks)])
    return (
      [stack(self.coefs, p) for p in range(len(self.meta))],
      [stack(douts, p) for p in range(len(self.meta))],
    )

  def row(self, factor) -> PyTree:
    r"""One task's :math:`\partial L_t/\partial z` from its factors (``factors()`` indexed at ``t``)."""
    coefs, douts = factor
    leaves: list = [None] * len(self.z_specs)
    for (k, spec), c, d in zip(self.meta, coefs, douts):
      r = jnp.einsum(spec, c, d).astype(self.z_specs[k][1])
      leaves[k] = r if leaves[k] is None else leaves[k] + r
    return jax.tree.unflatten(
      self.z_def, [jnp.zeros(*self.z_specs[k]) if v is None else v for k, v in enumerate(leaves)]
    )

  def stacked(self) -> PyTree:
    return jax.vmap(self.row)(self.factors())


def _factored_views(f_head, z, xh0, num_tasks: int, dtype) -> Optional[FactoredViews]:
  """The heads' rows at ``z`` as factors (:class:`FactoredViews`), when every task reads its view only
  through :func:`~mtjax._src.sparse.linear_einsum` products with the same structure; else ``None``.

  ``f_head(xh, copies, view_parts, trace) -> (losses, aux)`` runs the heads with task ``t`` reading
  ``copies[t]``."""
  if _VIEWS.off:
    return None
  z_leaves, z_def = jax.tree.flatten(z)
  copies = tuple(z for _ in range(num_tasks))

  def parts_of(zs):
    return {
      id(leaf): sparse_lib.Factor(t, k, z_leaves[k])
      for t, c in enumerate(zs)
      for k, leaf in enumerate(jax.tree.leaves(c))
    }

  traces: list = []

  def discover(zs, xh):
    traces.append(sparse_lib.FactorTrace())
    return f_head(xh, zs, parts_of(zs), traces[-1])[0]

  jax.make_jaxpr(discover)(copies, xh0)
  log = traces[-1].log
  order = [[i for i, e in enumerate(log) if e[0] == t] for t in range(num_tasks)]
  sig = lambda i: (log[i][1], log[i][2], tuple(jnp.shape(log[i][3])), jnp.result_type(log[i][3]), log[i][4])
  first = [sig(i) for i in order[0]]
  if not first or any([sig(i) for i in o] != first for o in order[1:]):
    return None

  def factored(zs, us, xh):
    trace = sparse_lib.FactorTrace(us)
    losses, aux = f_head(xh, zs, parts_of(zs), trace)
    return losses, (aux, [e[3] for e in trace.log])

  us0 = [jnp.zeros(e[4].shape, e[4].dtype) for e in log]
  used = sparse_lib.used_inputs(jax.make_jaxpr(lambda zs, us, xh: factored(zs, us, xh)[0])(copies, us0, xh0))
  if any(used[: num_tasks * len(z_leaves)]):  # a copy read other than through a product: stacked rows
    return None
  _, vjp_fn, (_, coefs) = jax.vjp(factored, copies, us0, xh0, has_aux=True)
  meta = [(log[i][1], log[i][2]) for i in order[0]]
  z_specs = [(tuple(jnp.shape(a)), jnp.result_type(a)) for a in z_leaves]
  return FactoredViews(vjp_fn, coefs, order, meta, z_def, z_specs, num_tasks, dtype)


def _stack_copies(parts) -> PyTree:
  """T pytrees (the cotangents of the views' copies) as one pytree of ``[T, ...]`` leaves."""
  return jax.tree.map(lambda *r: jnp.stack(r), *parts)


def _stacked(z_rows):
  return z_rows.stacked() if isinstance(z_rows, (LazyCopies, FactoredViews)) else z_rows


def _z_gram(z_rows: PyTree, batch_axis: Optional[int], rep_gram: str) -> jax.Array:
  """``[1, T, T]`` Gram of the representation's per-task gradients."""
  total = None
  if isinstance(z_rows, BatchSums):
    rows, batch_axis = z_rows.sums, None
  else:
    rows = _stacked(z_rows)
  for r in jax.tree.leaves(rows):
    if rep_gram == "sum" and batch_axis is not None:
      r = jnp.sum(r, axis=(batch_axis % (r.ndim - 1)) + 1)
    g = rows_lib.leaf_gram(r)
    total = g if total is None else total + g
  return total[None]


class _RepBase:
  """Shared machinery of :class:`RepJacobian` and :class:`SharedJacobian`."""

  num_tasks: int
  plan: Plan

  def _init_common(self, z_rows, trunk_vjp, head_vjp, ids, num_tasks, dtype, plan, idx_z, idx_h, strategy, chunk_size):
    self.z_store = z_rows  # [T, *z.shape] leaves, BatchSums ("rep") or LazyCopies / None ("shared")
    self.trunk_vjp = trunk_vjp
    self.head_vjp = head_vjp
    self.ids = tuple(ids)
    self.num_tasks = int(num_tasks)
    self.dtype = jnp.dtype(dtype)
    self.plan = plan
    self.idx_z = tuple(idx_z)
    self.idx_h = tuple(idx_h)  # inputs of the head VJP
    self.strategy = strategy
    self.chunk_size = chunk_size

  def shapes(self) -> PyTree:
    return self.plan.shapes(self.num_tasks)

  @property
  def z_rows(self) -> PyTree:
    r""":math:`\partial L_t/\partial z` for every task: ``z``'s pytree with ``[T, *leaf.shape]`` leaves.

    When the one-pass ``"rep"`` Gram kept only their batch sums, asking for the rows computes them
    with T backward passes through the heads (under ``jit``, only if used)."""
    if isinstance(self.z_store, BatchSums):
      return map_rows(
        lambda c: self.head_vjp(c)[0], jnp.eye(self.num_tasks, dtype=self.dtype), self.strategy, self.chunk_size
      )
    return _stacked(self.z_store)

  head_sum = None  # the heads' inputs' cotangent for weights 1 when the views' backward gave it already

  def _head_update(self, weights, idx_h, ids, ones: bool = False) -> list:
    """x cotangent of the heads' own inputs for loss weights ``weights`` (one backward pass; none when
    ``ones`` and the one-pass rows of :func:`mtjax.task_view` computed it already)."""
    cot = self.head_sum if (ones and self.head_sum is not None) else self.head_vjp(weights.astype(self.dtype))[1]
    out: list = [None] * self.plan.num_x
    for j, v in zip(idx_h, cot):
      out[j] = v
    return out

  def _full_x_rows(self) -> list:
    """The exact per-task rows of every x entry: trunk rows through z plus the heads' own rows."""
    out: list = [None] * self.plan.num_x
    trunk = map_rows(lambda c: self.trunk_vjp(c)[0], self.z_rows, self.strategy, self.chunk_size)
    for j, r in zip(self.idx_z, trunk):
      out[j] = r
    head = map_rows(
      lambda c: self.head_vjp(c)[1], jnp.eye(self.num_tasks, dtype=self.dtype), self.strategy, self.chunk_size
    )
    for j, r in zip(self.idx_h, head):
      out[j] = _add(out[j], r)
    return out

  def materialize(self) -> PyTree:
    """The exact full per-task gradients (every leaf ``[T, ...]`` or :class:`SparseRows`)."""
    return self.plan.unflatten(self.plan.to_rows(self._full_x_rows(), self.ids, self.num_tasks))

  def weighted_sum(self, weights: jax.Array) -> PyTree:
    r""":math:`J^\top w`, params-shaped: one backward through the heads and one through the trunk."""
    weights = _check_weights(weights, self.num_tasks, f"{type(self).__name__}.weighted_sum")
    zc, xh = self.head_vjp(weights.astype(self.dtype))
    xz = self.trunk_vjp(zc)[0]
    xs: list = [None] * self.plan.num_x
    for j, v in zip(self.idx_z, xz):
      xs[j] = v
    for j, v in zip(self.idx_h, xh):
      xs[j] = _add(xs[j], v)
    return self.plan.unflatten(self.plan.to_update(xs, self.ids))


@jax.tree_util.register_pytree_node_class
class RepJacobian(_RepBase):
  r"""``strategy="rep"``: per-task gradients of the shared representation only (MGDA-UB).

  Holds :math:`\partial L_t/\partial z` for every task (``z_rows``, the per-task VJPs through the
  task heads only) and the trunk's and heads' VJPs. A Gram-based method gets the Gram of these
  representation gradients (summed over the batch axis by default, ``rep_gram="sum"``, as LibMTL's
  ``rep_grad``; every sample's gradient stacked with ``rep_gram="stack"``, Sener & Koltun's
  :math:`Z`), and its weights produce the update with ONE backward pass through the trunk, cotangent
  :math:`\sum_t w_t \partial L_t/\partial z`, while the heads' parameters get the gradient of
  :math:`\sum_t L_t` (of :math:`\sum_t w_t L_t` with ``task_specific="weighted"``).

  The approximation: the weights come from :math:`\partial L_t/\partial z` instead of the parameter
  gradients :math:`(\partial z/\partial\theta)^\top \partial L_t/\partial z`; they coincide when the
  trunk's Jacobian is orthogonal (MGDA-UB's bound). Methods with several Gram groups cannot use it.
  """

  def __init__(
    self,
    z_rows,
    trunk_vjp,
    head_vjp,
    ids,
    num_tasks,
    dtype,
    plan,
    idx_z,
    idx_h,
    batch_axis,
    rep_gram,
    strategy="auto",
    chunk_size=None,
  ):
    self._init_common(z_rows, trunk_vjp, head_vjp, ids, num_tasks, dtype, plan, idx_z, idx_h, strategy, chunk_size)
    self.batch_axis = batch_axis
    self.rep_gram = rep_gram

  def tree_flatten(self):
    return (self.z_store, self.trunk_vjp, self.head_vjp, self.ids, self.head_sum), (
      self.num_tasks,
      self.dtype,
      self.plan,
      self.idx_z,
      self.idx_h,
      self.batch_axis,
      self.rep_gram,
      self.strategy,
      self.chunk_size,
    )

  @classmethod
  def tree_unflatten(cls, aux, children):
    obj = cls(*children[:-1], *aux)
    obj.head_sum = children[-1]
    return obj

  def default_mask(self, num_leaves: int) -> list[bool]:
    return [True] * num_leaves

  def gram(self) -> jax.Array:
    """``[1, T, T]``: the Gram of the representation's per-task gradients."""
    return _z_gram(self.z_store, self.batch_axis, self.rep_gram)

  def similarity_gram(self) -> jax.Array:
    """``[T, T]``: the Gram this Jacobian holds without more backward passes (the representation's)."""
    return self.gram()[0]

  def gram_and_combiner(self, layout: rows_lib.Layout, need_gram: bool):
    if layout.mask_given and not all(layout.mask):
      raise ValueError(
        f"mtjax: {layout.method}: strategy='rep' weights the gradients of the marked representation; the "
        "shared part is the trunk that computes it, so build the method without shared=."
      )
    if layout.num_groups > 1:
      raise ValueError(
        f"mtjax: {layout.method}: strategy='rep' gives one Gram (of the representation's gradients) but the "
        f"method asks for {layout.num_groups} Gram groups; use the whole-model granularity."
      )
    grams = self.gram() if need_gram else None

    def combine(weights):
      w = weights if weights.ndim == 1 else weights[0]
      ts = rows_lib.task_specific_weights(weights, layout)
      head_w = jnp.ones_like(w) if ts is None else ts
      if isinstance(self.z_store, BatchSums):  # no rows kept: one more backward through the heads, cotangent w
        zc = self.head_vjp(w.astype(self.dtype))[0]
      else:
        zc = jax.tree.map(lambda r: jnp.tensordot(w.astype(r.dtype), r, axes=1), self.z_store)
      xs = self._head_update(head_w, self.idx_h, self.ids, ones=ts is None)
      for j, v in zip(self.idx_z, self.trunk_vjp(zc)[0]):
        xs[j] = _add(xs[j], v)
      return self.plan.to_update(xs, self.ids)

    return grams, combine


@jax.tree_util.register_pytree_node_class
class SharedJacobian(_RepBase):
  r"""``strategy="shared"``: the exact per-task gradients of the trunk's parameters only.

  TorchJD's ``mtl_backward(losses, features=z)``: the T cotangents :math:`\partial L_t/\partial z`
  (per-task VJPs through the heads, with respect to ``z`` only) are backpropagated through the trunk
  (batched by ``strategy``), giving the rows of every parameter that ``z`` depends on (its "shared"
  parameters; a parameter that the heads also read directly, such as an embedding table feeding
  both the experts and the gates, gets that path's per-task rows added, so its rows are exact). The
  heads' own parameters get the gradient of :math:`\sum_t L_t` from ONE backward pass (of
  :math:`\sum_t w_t L_t` with ``task_specific="weighted"``). A method then computes exactly what it
  computes on the full rows with ``shared=`` the trunk's parameters, without T backward passes
  through the heads' parameter gradients.
  """

  def __init__(
    self,
    z_rows,
    n_over,
    trunk_vjp,
    head_vjp,
    ids,
    num_tasks,
    dtype,
    plan,
    idx_z,
    idx_h,
    idx_rows,
    idx_pure_head,
    rows_leaves,
    row_specs,
    strategy="auto",
    chunk_size=None,
  ):
    # z_rows: LazyCopies (the views' one backward), or None (computed with the rows, by T head VJPs).
    self._init_common(z_rows, trunk_vjp, head_vjp, ids, num_tasks, dtype, plan, idx_z, idx_h, strategy, chunk_size)
    self.n_over = int(n_over)  # the first n_over entries of idx_h: inputs the trunk and the heads both read
    self.idx_rows = tuple(idx_rows)
    self.idx_pure_head = tuple(idx_pure_head)
    self.rows_leaves = tuple(rows_leaves)  # param leaves with rows (the trunk's)
    self.row_specs = tuple(row_specs)  # (shape, dtype) of each idx_rows entry

  def tree_flatten(self):
    return (self.z_store, self.trunk_vjp, self.head_vjp, self.ids, self.head_sum), (
      self.n_over,
      self.num_tasks,
      self.dtype,
      self.plan,
      self.idx_z,
      self.idx_h,
      self.idx_rows,
      self.idx_pure_head,
      self.rows_leaves,
      self.row_specs,
      self.strategy,
      self.chunk_size,
    )

  @classmethod
  def tree_unflatten(cls, aux, children):
    z_store, trunk_vjp, head_vjp, ids, head_sum = children
    obj = cls(z_store, aux[0], trunk_vjp, head_vjp, ids, *aux[1:])
    obj.head_sum = head_sum
    return obj

  @property
  def z_rows(self) -> PyTree:
    r""":math:`\partial L_t/\partial z` for every task (``[T, *leaf.shape]`` leaves)."""
    if self.z_store is None:
      return self._z_and_overlap_rows()[0]
    return _stacked(self.z_store)

  def _z_and_overlap_rows(self, with_z: bool = True):
    """The rows of z and of the overlapping inputs' head path (one map of head VJPs when both are needed)."""
    eye = jnp.eye(self.num_tasks, dtype=self.dtype)
    n = self.n_over
    if self.z_store is None:
      return map_rows(lambda c: (self.head_vjp(c)[0], self.head_vjp(c)[1][:n]), eye, self.strategy, self.chunk_size)
    over = map_rows(lambda c: self.head_vjp(c)[1][:n], eye, self.strategy, self.chunk_size) if n else []
    return (_stacked(self.z_store) if with_z else None), over

  @property
  def x_rows(self) -> list:
    """The exact per-task rows of the trunk's inputs ``idx_rows`` (T backward passes through the trunk)."""
    if isinstance(self.z_store, FactoredViews):  # each task's row formed inside its trunk backward pass
      fv = self.z_store
      over_rows = self._z_and_overlap_rows(with_z=False)[1]
      trunk_rows = map_rows(lambda f: self.trunk_vjp(fv.row(f))[0], fv.factors(), self.strategy, self.chunk_size)
    else:
      z_rows, over_rows = self._z_and_overlap_rows()
      trunk_rows = map_rows(lambda c: self.trunk_vjp(c)[0], z_rows, self.strategy, self.chunk_size)
    by_x = dict(zip(self.idx_z, trunk_rows))
    for j, r in zip(self.idx_h[: self.n_over], over_rows):
      by_x[j] = _add(by_x.get(j), r)
    return [
      by_x[j] if j in by_x else jnp.zeros((self.num_tasks,) + tuple(shape), dtype)
      for j, (shape, dtype) in zip(self.idx_rows, self.row_specs)
    ]

  def default_mask(self, num_leaves: int) -> list[bool]:
    rows = set(self.rows_leaves)
    return [i in rows for i in range(num_leaves)]

  def similarity_gram(self) -> jax.Array:
    """``[T, T]``: the Gram of the trunk parameters' rows."""
    leaves = [x for x in self._row_leaves() if x is not None]
    return rows_lib.compute_grams(leaves, [0] * len(leaves), 1)[0]

  def _row_leaves(self) -> list:
    xr: list = [None] * self.plan.num_x
    for j, r in zip(self.idx_rows, self.x_rows):
      xr[j] = r
    return self.plan.to_rows(xr, self.ids, self.num_tasks, leaves=set(self.rows_leaves))

  def _weighted_update(self, w, head_w, ones: bool) -> list:
    r"""Params-shaped update with weights ``w`` on the trunk's leaves and ``head_w`` on the heads' own:
    :math:`J^\top w` by one backward through the heads and one through the trunk, no rows."""
    zc, xh = self.head_vjp(w.astype(self.dtype))
    xs: list = [None] * self.plan.num_x
    for j, v in zip(self.idx_z, self.trunk_vjp(zc)[0]):
      xs[j] = v
    for j, v in zip(self.idx_h[: self.n_over], xh[: self.n_over]):
      xs[j] = _add(xs[j], v)
    if self.idx_pure_head:
      head = self._head_update(head_w, self.idx_h, self.ids, ones=ones)
      for j in self.idx_pure_head:
        xs[j] = head[j]
    return self.plan.to_update(xs, self.ids)

  def gram_and_combiner(self, layout: rows_lib.Layout, need_gram: bool):
    rows = set(self.rows_leaves)
    for i, m in enumerate(layout.mask):
      if m and i not in rows:
        raise ValueError(
          f"mtjax: {layout.method}: leaf '{layout.paths[i]}' is marked shared but the representation does not "
          "depend on it; with strategy='shared' only the trunk's parameters can be shared (leave shared= "
          "unset to share exactly those)."
        )
    if not need_gram and layout.num_groups <= 1 and all(layout.mask[i] for i in rows):
      # No Gram needed (amortized reuse steps, loss-only weightings): J^T w without the T trunk rows.
      def combine_weighted(weights):
        w = weights if weights.ndim == 1 else weights[0]
        ts = rows_lib.task_specific_weights(weights, layout)
        head_w = jnp.ones((self.num_tasks,), self.dtype) if ts is None else ts
        return self._weighted_update(w, head_w, ones=ts is None)

      return None, combine_weighted

    leaves = self._row_leaves()
    grams = None
    if need_gram:
      idx = [i for i in range(len(leaves)) if layout.group[i] >= 0]
      if not idx:
        raise ValueError(f"mtjax: {layout.method}: no trunk parameter is in a Gram.")
      grams = rows_lib.compute_grams(
        [leaves[i] for i in idx], [layout.group[i] for i in idx], max(layout.num_groups, 1)
      )

    def combine(weights):
      ts = rows_lib.task_specific_weights(weights, layout)
      head_w = jnp.ones((self.num_tasks,), self.dtype) if ts is None else ts
      out: list = [None] * len(leaves)
      for i, leaf in enumerate(leaves):
        if leaf is not None:
          out[i] = rows_lib.combine_leaf(i, leaf, weights, layout)
      pure = set(self.idx_pure_head)
      if pure:
        xs = self._head_update(head_w, self.idx_h, self.ids, ones=ts is None)
        xs = [v if j in pure else None for j, v in enumerate(xs)]
        head = self.plan.to_update(xs, self.ids)
        out = [o if o is not None else h for o, h in zip(out, head)]
      return [o if o is not None else jnp.zeros(s, d) for o, (s, d) in zip(out, self.plan.leaf_specs)]

    return grams, combine


LAZY_JACOBIANS = (TaskJacobian, RepJacobian, SharedJacobian)


def is_lazy(x) -> bool:
  return isinstance(x, LAZY_JACOBIANS)


def materialize(task_grads: Any) -> PyTree:
  """``task_grads`` itself, or the stacked gradients of a lazy Jacobian."""
  return task_grads.materialize() if is_lazy(task_grads) else task_grads


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
      "returns (losses, aux), pass has_aux=True; otherwise return jnp.stack([loss_0, loss_1, ...])."
    )
  shape = jnp.shape(losses)
  if len(shape) != 1:
    raise ValueError(
      f"mtjax: {where}: loss_fn must return a 1-D vector of task losses [T] "
      f"(one scalar per task), got shape {shape}. "
      + (
        "Return jnp.stack([loss_0, loss_1, ...]) instead of their sum."
        if len(shape) == 0
        else "Reduce over the batch (e.g. mean over axis 0) inside loss_fn."
      )
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
  deferred: bool = False,
  sparse: bool = True,
  chunk_size: Optional[int] = None,
  rep_gram: str = "sum",
) -> Callable[..., Any]:
  r"""Transforms ``loss_fn(params, ...) -> [T]`` into a function returning losses and per-task gradients.

  The returned function gives ``(task_losses, task_grads)`` -- or ``((task_losses, aux),
  task_grads)`` with ``has_aux`` -- where every leaf of ``task_grads`` is ``[T, *param.shape]``:
  row ``t`` is :math:`\nabla_\theta L_t(\theta)`. This is the input every mtjax transform expects.

  Strategies for the full rows (all give the same result):

  * ``"loop"``: one shared forward (``jax.vjp``), then T VJPs with unit cotangents ``e_t``,
    unrolled. Cost ~ ``F + T * B``, the floor for a full per-task Jacobian.
  * ``"map"``: the same T VJPs under ``lax.map``: one compiled backward run T times, a smaller
    program and less temporary memory; the fastest on CPU in our benchmark.
  * ``"vmap"``: ``jax.vmap`` of the VJP over the T cotangents (batched backward; may win on GPU/TPU).
  * ``"auto"``: :func:`default_strategy` for the default backend.

  ``chunk_size=c`` computes ``c`` rows at a time (vmapped within a chunk, chunks in sequence), for
  many tasks: the backward temporaries hold ``c`` rows, the output all T.

  A VJP with cotangent ``e_t`` runs backward through every task's head (on zeros for the others).
  When the loss is separable by task, the ``"map"`` rows (for 3 <= T <= 16, without ``chunk_size``)
  instead run each task's backward pass from its own loss, through its own head only: the same rows,
  without the ``O(T^2)`` head work. Separable means either of:

  * the loss returns ``jnp.stack([loss_0, ..., loss_{T-1}])`` and reads stacked model outputs by
    index, as :func:`mtjax.losses.make_loss_fn` does;
  * the loss computes its ``[T]`` losses from the stacked outputs at once, position-wise along the
    task axis (element-wise terms, reductions over the other axes, transposes, broadcasts, terms
    that every task shares), e.g. ``jnp.mean(sigmoid_binary_cross_entropy(logits, y), axis=1)`` on
    ``[T, B]`` logits. Anything that mixes tasks' rows (a softmax or a matrix product over the task
    axis, a reversed task order, a mean over all logits) keeps the ``e_t`` rows.

  Strategies that split the loss at the representation marked with :func:`mtjax.representation`
  (every mtjax model marks one) return a lazy Jacobian instead of rows:

  * ``"rep"`` (:class:`RepJacobian`, MGDA-UB): per-task gradients of the representation ``z``
    only, weights from their Gram, ONE backward through the trunk. An approximation
    (``rep_gram="sum"`` sums the per-sample gradients over the batch axis, ``"stack"`` keeps them).
  * ``"shared"`` (:class:`SharedJacobian`): the exact per-task gradients of the trunk's
    parameters, the heads' parameters from one backward pass.

  Embedding tables looked up through :func:`mtjax.embedding_lookup` (every mtjax model does)
  and used for nothing else get :class:`~mtjax._src.sparse.SparseRows` leaves: the per-sample
  cotangents of the looked-up rows, exact, never ``[T, V, d]`` (``sparse=False``: dense rows).

  With ``deferred=True`` the function runs only the shared forward pass and returns a
  :class:`TaskJacobian` instead of the stacked gradients; a transform then computes just what it
  needs: ONE backward pass for the methods whose weights do not read the gradients (``linear``,
  ``dwa``, ``uncertainty``, ``rlw``), the rows of the Gram's leaves and one backward pass for a
  method given ``gram_leaves=`` (the "subset" strategy), the T rows (by ``strategy``) for the
  others, with the same results either way.

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
    strategy: one of ``"auto"``, ``"loop"``, ``"map"``, ``"vmap"``, ``"rep"``, ``"shared"``.
    has_aux: whether ``loss_fn`` returns ``(losses, aux)``.
    argnums: index of the parameters argument.
    deferred: return a :class:`TaskJacobian` (no backward pass yet) instead of the gradients.
    sparse: keep the per-task gradients of embedding tables as looked-up rows.
    chunk_size: compute at most this many task rows at a time (``None``: all at once).
    rep_gram: ``"sum"`` or ``"stack"``, the representation Gram of ``strategy="rep"``.

  Returns:
    A function with the signature of ``loss_fn`` returning ``(task_losses, task_grads)``.
    For the gradients of several independent micro-batches (``[M, T, *param.shape]``, for
    :func:`mtjax.modo` / :func:`mtjax.sdmgrad`) wrap it in :func:`mtjax.micro_batch_task_grads`.

  Raises:
    ValueError: for an unknown strategy or a ``loss_fn`` that does not return a 1-D vector.
  """
  if strategy not in STRATEGIES:
    raise ValueError(f"mtjax: unknown task_grads strategy {strategy!r}; expected one of {STRATEGIES}.")
  if not isinstance(argnums, int):
    raise ValueError("mtjax: task_grads differentiates one argument; argnums must be an int.")
  if rep_gram not in REP_GRAMS:
    raise ValueError(f"mtjax: task_grads: rep_gram must be one of {REP_GRAMS}, got {rep_gram!r}.")
  if chunk_size is not None and (not isinstance(chunk_size, (int, np.integer)) or chunk_size < 1):
    raise ValueError(f"mtjax: task_grads: chunk_size must be a positive int or None, got {chunk_size!r}.")
  split = strategy in ("rep", "shared")
  row_strategy = "auto" if split else strategy

  @functools.wraps(loss_fn)
  def wrapped(*args, **kwargs):
    strat = _resolve(row_strategy)
    params = args[argnums]
    leaves, treedef = jax.tree.flatten(params)
    specs = tuple((tuple(jnp.shape(x)), jnp.result_type(x)) for x in leaves)

    def call(p_leaves, rec):
      call_args = list(args)
      call_args[argnums] = jax.tree.unflatten(treedef, list(p_leaves))
      with sparse_lib.recording(rec):
        out = loss_fn(*call_args, **kwargs)
      if has_aux and not (isinstance(out, tuple) and len(out) == 2):
        raise ValueError("mtjax: task_grads(has_aux=True): loss_fn must return (task_losses, aux).")
      return out if has_aux else (out, None)

    if not (sparse or split):  # nothing to look for: the plain VJP
      losses, vjp_fn, aux = jax.vjp(lambda p: call(jax.tree.leaves(p), None), params, has_aux=True)
      _check_losses(losses, "task_grads")
      num_tasks = losses.shape[0]
      if deferred:
        grads = TaskJacobian.from_vjp(vjp_fn, num_tasks, losses.dtype, strat, params)
        grads.chunk_size = chunk_size
      else:
        grads = _rows(vjp_fn, num_tasks, losses.dtype, strat, chunk_size)
      return ((losses, aux), grads) if has_aux else (losses, grads)

    # 1. Discovery: which lookups read which param leaves, and is the table used for anything else?
    probes = []

    def probe_fn(ls):
      pr = sparse_lib.Probe(ls)
      probes.append(pr)
      return call(ls, pr)

    closed, (out_shape, _) = jax.make_jaxpr(probe_fn, return_shape=True)(leaves)
    probe = probes[-1]
    _check_losses(out_shape, "task_grads")  # a ShapeDtypeStruct, or the tuple a has_aux-less loss returned
    used = sparse_lib.used_inputs(closed)
    sparse_leaves = set()
    if sparse:
      looked = {lk.leaf for lk in probe.lookups if lk.leaf is not None}
      sparse_leaves = {i for i in looked if not used[i] and len(specs[i][0]) >= 1}
    taps_info, tap_of_lookup, tables = [], [], {}
    for lk in probe.lookups:
      if lk.leaf in sparse_leaves:
        k = len(taps_info)
        taps_info.append(jax.ShapeDtypeStruct(lk.ids_shape + lk.table_shape[1:], lk.dtype))
        tap_of_lookup.append(k)
        tables.setdefault(lk.leaf, []).append((k, lk.mode))
      else:
        tap_of_lookup.append(None)
    dense_idx = tuple(i for i in range(len(leaves)) if i not in sparse_leaves)
    plan = Plan(treedef, specs, dense_idx, tuple(TableInfo(i, specs[i][0], tuple(tables[i])) for i in sorted(tables)))
    num_dense = len(dense_idx)
    taps0 = [jnp.zeros(s.shape, s.dtype) for s in taps_info]
    x0 = [leaves[i] for i in dense_idx] + taps0

    def full_leaves(xs):
      ls = list(leaves)
      for j, i in enumerate(dense_idx):
        ls[i] = xs[j]
      return ls

    def run(xs, mode, z_in=None, z_views=None, view_parts=None, factor_trace=None):
      rec = sparse_lib.Tapper(
        probe.lookups, tap_of_lookup, xs[num_dense:], mode, z_in, z_views, view_parts, factor_trace
      )
      return call(full_leaves(xs), rec), rec

    if not split:

      def g(dense_xs, taps):
        (losses, aux), rec = run(list(dense_xs) + list(taps), "full")
        return losses, (aux, tuple(rec.ids[k] for k in range(len(taps_info))))

      losses, vjp_fn, (aux, ids) = jax.vjp(g, x0[:num_dense], x0[num_dense:], has_aux=True)
      num_tasks = losses.shape[0]
      task_vjps = None
      if strat == "map" and chunk_size is None and _TASK_VJPS.min_tasks <= num_tasks <= _TASK_VJPS.max_tasks:
        task_vjps = _task_vjps(lambda xs: g(xs[:num_dense], xs[num_dense:])[0], list(x0), num_tasks)
      jac = TaskJacobian(vjp_fn, num_tasks, losses.dtype, strat, (treedef, specs), plan, ids, chunk_size, task_vjps)
      grads = jac if deferred else jac.materialize()
      return ((losses, aux), grads) if has_aux else (losses, grads)

    # 2. Split at the representation: trunk Z(x) -> z, heads F(x, z) -> losses.
    if probe.rep is None:
      raise ValueError(
        f"mtjax: task_grads(strategy={strategy!r}) needs the shared representation marked with "
        "mtjax.representation(z) in the model or loss_fn; none was marked."
      )

    def z_fn(xs):
      try:
        run(list(xs), "trunk")
      except sparse_lib.RepReached as e:
        return e.z
      raise ValueError("mtjax: task_grads: the representation was not reached.")  # pragma: no cover

    def f_fn(xs, z, z_views=None, view_parts=None, factor_trace=None):
      (losses, aux), rec = run(list(xs), "head", z, z_views, view_parts, factor_trace)
      return losses, (aux, tuple(rec.ids.get(k) for k in range(len(taps_info))))

    z_struct = probe.rep.struct
    z0 = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), z_struct)
    used_z = sparse_lib.used_inputs(jax.make_jaxpr(z_fn)(x0))
    used_f = sparse_lib.used_inputs(jax.make_jaxpr(lambda xs, z: f_fn(xs, z)[0])(x0, z0))[: len(x0)]
    idx_z = [j for j in range(len(x0)) if used_z[j]]

    z, trunk_vjp = jax.vjp(lambda xz: z_fn(_merge_x(x0, idx_z, xz)), _split_x(x0, idx_z))
    if strategy == "rep":
      idx_h = [j for j in range(len(x0)) if used_f[j]]
    else:
      x_of = plan.x_of_leaf()
      rows_leaves = sorted({i for i in range(len(leaves)) if any(used_z[j] for j in x_of[i])})
      x_rows_set = sorted({j for i in rows_leaves for j in x_of[i]})
      overlap = [j for j in x_rows_set if used_f[j]]
      pure = [j for j in range(len(x0)) if used_f[j] and j not in set(x_rows_set)]
      idx_h = overlap + pure
    num_tasks = out_shape.shape[0]
    views = _views_usable(probe, num_tasks, f_fn, x0, z0)
    batch_ax = probe.rep.batch_axis
    # The heads' VJP at z: sum_t c_t dL_t/dz and the heads' own inputs' cotangent, one backward per call.
    losses, head_vjp, (aux, ids) = jax.vjp(
      lambda zz, xh: f_fn(_merge_x(x0, idx_h, xh), zz), z, _split_x(x0, idx_h), has_aux=True
    )
    head_sum = None
    ones = jnp.ones((num_tasks,), losses.dtype)
    if views and strategy == "rep" and rep_gram == "sum" and batch_ax is not None:
      # Task t reads z + delta_t (delta_t: z without its batch axis, broadcast over it): the cotangent of
      # delta_t IS the batch sum of dL_t/dz, from ONE backward that never writes a [T, *z.shape] array.
      def f_delta(ds, xh):
        vs = tuple(jax.tree.map(lambda a, d: a + jnp.expand_dims(d, batch_ax % a.ndim), z, dt) for dt in ds)
        parts = {  # a head linear in its view may read z and delta_t apart (sparse.linear_view)
          id(v): (a, d, batch_ax % a.ndim)
          for view, dt in zip(vs, ds)
          for v, a, d in zip(jax.tree.leaves(view), jax.tree.leaves(z), jax.tree.leaves(dt))
        }
        return f_fn(_merge_x(x0, idx_h, xh), z, vs, parts)

      deltas = tuple(
        jax.tree.map(lambda a: jnp.zeros(np.delete(np.shape(a), batch_ax % a.ndim), a.dtype), z)
        for _ in range(num_tasks)
      )
      _, delta_vjp, _ = jax.vjp(f_delta, deltas, _split_x(x0, idx_h), has_aux=True)
      sums, head_sum = delta_vjp(ones)
      z_store = BatchSums(jax.tree.map(lambda *r: jnp.stack(r), *sums))
    elif views:  # task t reads its own copy of z: every dL_t/dz from ONE backward through the heads
      # T separate copies (not one [T, ...] array: indexing it would transpose to T zero-padded sums).
      copies = tuple(z for _ in range(num_tasks))
      _, views_vjp, _ = jax.vjp(
        lambda zs, xh: f_fn(_merge_x(x0, idx_h, xh), z, zs), copies, _split_x(x0, idx_h), has_aux=True
      )
      if strategy == "rep":  # rep_gram="stack" (or no batch axis): every row is needed
        parts, head_sum = views_vjp(ones)  # the rows of z AND the heads' gradient of sum_t L_t
        z_store = _stack_copies(parts)
      else:  # the rows' factors when the heads read their views linearly, else the copies' cotangents
        z_store = _factored_views(
          lambda xh, zs, parts, trace: f_fn(_merge_x(x0, idx_h, xh), z, zs, parts, trace),
          z,
          _split_x(x0, idx_h),
          num_tasks,
          jnp.result_type(losses),
        ) or LazyCopies(views_vjp, num_tasks, jnp.result_type(losses))
    eye = jnp.eye(num_tasks, dtype=losses.dtype)
    if strategy == "rep":
      z_rows = z_store if views else map_rows(lambda c: head_vjp(c)[0], eye, strat, chunk_size)
      jac = RepJacobian(
        z_rows,
        trunk_vjp,
        head_vjp,
        ids,
        num_tasks,
        losses.dtype,
        plan,
        idx_z,
        idx_h,
        probe.rep.batch_axis,
        rep_gram,
        strat,
        chunk_size,
      )
      jac.head_sum = head_sum
    else:
      row_specs = [(tuple(jnp.shape(x0[j])), jnp.dtype(jnp.result_type(x0[j]))) for j in x_rows_set]
      jac = SharedJacobian(
        z_store if views else None,
        len(overlap),
        trunk_vjp,
        head_vjp,
        ids,
        num_tasks,
        losses.dtype,
        plan,
        idx_z,
        idx_h,
        x_rows_set,
        pure,
        rows_leaves,
        row_specs,
        strat,
        chunk_size,
      )
      jac.head_sum = head_sum
    return ((losses, aux), jac) if has_aux else (losses, jac)

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
  To tell tasks apart inside ``loss_fn``, put a task index in the batch. For independent
  micro-batches, ``mtjax.micro_batch_task_grads(multi_input_task_grads(loss_fn), M, axis=1)``.

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


def micro_batch_task_grads(
  grad_fn: Callable[..., Any],
  num_micro_batches: int,
  *,
  batch_argnums: int | Sequence[int] = 1,
  axis: int = 0,
) -> Callable[..., Any]:
  r"""Per-task gradients on ``M`` independent micro-batches: leaves ``[M, T, *param.shape]``.

  Wraps a per-task gradient function -- ``mtjax.task_grads(loss_fn)`` or
  ``mtjax.multi_input_task_grads(loss_fn)`` (with its options) -- so that it splits its batch
  argument(s) along ``axis`` into ``M`` equal consecutive parts and runs once per part. Every
  leaf of the returned task gradients gets a leading micro-batch axis, ``[M, T, *param.shape]``,
  and so do the losses (``[M, T]``) and ``aux``: row ``m`` is exactly what ``grad_fn`` gives on
  part ``m``. This is the input of the methods that need several INDEPENDENT stochastic
  estimates of the Jacobian per step (:func:`mtjax.modo`, :func:`mtjax.sdmgrad`); the parts
  are independent when the batch's samples are (shuffle the data).

  Cost: ``M`` forward passes on ``batch / M`` samples and ``M * T`` backward rows, i.e. about
  the FLOPs of ONE full per-task Jacobian of the whole batch (``F + T * B``), with the peak
  memory of one part. The parts run one after the other (a Python loop: ``M`` is small).

  Examples:
    >>> import jax.numpy as jnp, mtjax
    >>> def loss_fn(params, batch):
    ...   pred = batch['x'] @ params['w']
    ...   return jnp.stack([jnp.mean((pred - batch['y1'])**2), jnp.mean((pred - batch['y2'])**2)])
    >>> params = {'w': jnp.zeros(3)}
    >>> batch = {'x': jnp.ones((6, 3)), 'y1': jnp.ones(6), 'y2': -jnp.ones(6)}
    >>> losses, grads = mtjax.micro_batch_task_grads(mtjax.task_grads(loss_fn), 3)(params, batch)
    >>> losses.shape, grads['w'].shape
    ((3, 2), (3, 2, 3))

    With :func:`mtjax.multi_input_task_grads` the batches are ``[T, B, ...]``: split ``axis=1``.

  Args:
    grad_fn: a function returning ``(task_losses, task_grads)`` (or ``((task_losses, aux),
      task_grads)``) with stacked ``[T, ...]`` rows; not a deferred / lazy Jacobian
      (``deferred=True``, ``strategy="rep"`` / ``"shared"``) and not sparse rows (build it with
      ``sparse=False`` when the model looks up embeddings).
    num_micro_batches: ``M >= 1`` (static).
    batch_argnums: the positional argument(s) of ``grad_fn`` to split (default ``1``, the batch
      after ``params``); every array leaf of them is split, the other arguments are passed whole.
    axis: the batch axis of those leaves (``0``; ``1`` for the ``[T, B, ...]`` task batches of
      :func:`mtjax.multi_input_task_grads`).

  Returns:
    A function with the signature of ``grad_fn`` returning its outputs with a leading ``M`` axis.

  Raises:
    ValueError: ``M`` is not a positive int, a batch leaf has no axis ``axis`` or a size there
      that ``M`` does not divide, or ``grad_fn`` returns a lazy Jacobian or sparse rows.
  """
  if (
    isinstance(num_micro_batches, bool) or not isinstance(num_micro_batches, (int, np.integer)) or num_micro_batches < 1
  ):
    raise ValueError(
      f"mtjax: micro_batch_task_grads: num_micro_batches must be a positive int, got {num_micro_batches!r}."
    )
  m_count = int(num_micro_batches)
  argnums = (batch_argnums,) if isinstance(batch_argnums, (int, np.integer)) else tuple(batch_argnums)
  if not argnums or not all(isinstance(i, (int, np.integer)) for i in argnums):
    raise ValueError(f"mtjax: micro_batch_task_grads: batch_argnums must be an int or ints, got {batch_argnums!r}.")
  axis = int(axis)

  def split(tree, m, where):
    def one(path, x):
      shape = jnp.shape(x)
      if len(shape) <= axis:
        raise ValueError(
          f"mtjax: micro_batch_task_grads: leaf '{jax.tree_util.keystr(path)}' of {where} has shape {shape}, "
          f"no batch axis {axis} to split into {m_count} micro-batches."
        )
      n = shape[axis]
      if n % m_count:
        raise ValueError(
          f"mtjax: micro_batch_task_grads: leaf '{jax.tree_util.keystr(path)}' of {where} has batch size {n} "
          f"(shape {shape}, axis {axis}), not divisible into {m_count} equal micro-batches; use a batch size "
          f"that is a multiple of {m_count}."
        )
      size = n // m_count
      return jax.lax.slice_in_dim(jnp.asarray(x), m * size, (m + 1) * size, axis=axis)

    return jax.tree_util.tree_map_with_path(one, tree)

  @functools.wraps(grad_fn)
  def wrapped(*args, **kwargs):
    for i in argnums:
      if not -len(args) <= i < len(args):
        raise ValueError(
          f"mtjax: micro_batch_task_grads: batch_argnums={batch_argnums!r} but only {len(args)} positional "
          "arguments were given."
        )
    outs = []
    for m in range(m_count):
      call_args = list(args)
      for i in argnums:
        call_args[i] = split(args[i], m, f"argument {i}")
      out = grad_fn(*call_args, **kwargs)
      if not (isinstance(out, tuple) and len(out) == 2):
        raise ValueError("mtjax: micro_batch_task_grads: grad_fn must return (task_losses, task_grads).")
      if is_lazy(out[1]):
        raise ValueError(
          "mtjax: micro_batch_task_grads: grad_fn returned a lazy Jacobian (task_grads(deferred=True) or "
          "strategy='rep'/'shared'); micro-batch methods need the stacked per-task rows: use task_grads(loss_fn) "
          "with a row strategy ('auto', 'loop', 'map', 'vmap') and deferred=False."
        )
      if any(isinstance(x, SparseRows) for x in jax.tree.leaves(out[1], is_leaf=sparse_lib.is_sparse)):
        raise ValueError(
          "mtjax: micro_batch_task_grads: grad_fn returned sparse embedding rows (SparseRows); build it with "
          "mtjax.task_grads(loss_fn, sparse=False) to get dense [T, *param.shape] rows."
        )
      outs.append(out)
    return jax.tree.map(lambda *xs: jnp.stack(xs), *outs)

  return wrapped
