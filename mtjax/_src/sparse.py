"""Marks that let :func:`mtjax.task_grads` see inside a loss: embedding lookups and the shared representation.

Two public functions are identities outside ``mtjax.task_grads`` and hooks inside it:

* :func:`embedding_lookup` ``(table, ids)`` -- ``jnp.take(table, ids, axis=0)``. When ``task_grads``
  traces the loss it records every lookup whose ``table`` is a leaf of the differentiated params
  and that table is used for nothing else; such a table's per-task gradient is then kept as the
  per-sample cotangents of the looked-up rows (:class:`SparseRows`), never as ``[T, V, d]``.
* :func:`representation` ``(z)`` -- marks the shared representation for the ``"rep"`` and
  ``"shared"`` strategies (everything before it is the trunk, everything after it the task heads).

The recorders that give these hooks a meaning live here too; they are pushed on a thread-local
stack only while ``task_grads`` traces the loss.
"""

from __future__ import annotations

import threading
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

PyTree = Any
LOOKUP_MODES = ("fill", "clip")


def _take(table, ids, mode: str):
  if mode == "clip":
    return jnp.take(table, ids, axis=0, mode="clip")
  out = jnp.take(table, ids, axis=0, mode="fill", fill_value=0)
  # jnp.take wraps negative ids in [-V, -1] Python-style (to row V + id) even in "fill" mode; every id
  # outside [0, V) must look up zeros and pass no gradient (as canonical_ids assumes).
  keep = jnp.reshape(ids >= 0, tuple(jnp.shape(ids)) + (1,) * (jnp.ndim(table) - 1))
  return jnp.where(keep, out, jnp.zeros((), out.dtype))


def embedding_lookup(table: jax.Array, ids: jax.Array, *, mode: str = "fill") -> jax.Array:
  r"""``table[ids]``: rows of an embedding table, marked for mtjax's exact sparse per-task gradients.

  Outside :func:`mtjax.task_grads` this is ``jnp.take(table, ids, axis=0)``. Inside it, when
  ``table`` is a parameter leaf (pass the parameter array itself, untransformed) that the loss uses
  only through lookups, task ``t``'s gradient of the table,
  :math:`\sum_b e_{id_b} (\partial L_t / \partial r_b)^\top`, is kept as the per-sample cotangents
  of the looked-up rows (a :class:`SparseRows` leaf): memory and time grow with the batch, not
  with the vocabulary. Every mtjax transform and :mod:`mtjax.analysis` computes the exact same
  Gram matrices and updates from it as from the dense ``[T, V, d]`` gradient (repeated ids are
  summed per id first). A table used in any other way (tied output weights, a regularizer on the
  whole table) is differentiated densely, as before.

  Examples:
    >>> import jax.numpy as jnp, mtjax
    >>> def loss_fn(params, batch):
    ...   r = mtjax.embedding_lookup(params['table'], batch['ids'])   # [B, d]
    ...   pred = r @ params['w']
    ...   return jnp.stack([jnp.mean((pred - batch['y1'])**2), jnp.mean((pred + batch['y2'])**2)])
    >>> params = {'table': jnp.ones((1000, 4)), 'w': jnp.ones(4)}
    >>> batch = {'ids': jnp.array([3, 7, 3]), 'y1': jnp.ones(3), 'y2': jnp.ones(3)}
    >>> losses, grads = mtjax.task_grads(loss_fn)(params, batch)
    >>> type(grads['table']).__name__, grads['table'].shape, grads['table'].values.shape
    ('SparseRows', (2, 1000, 4), (2, 3, 4))

  Args:
    table: ``[V, *row]`` embedding table (a parameter leaf).
    ids: integer ids of any shape ``S``.
    mode: ids outside ``[0, V)``: ``"fill"`` (default) looks up zeros and passes no gradient to the
      table; ``"clip"`` clamps them to the first/last row.

  Returns:
    ``[*S, *row]`` rows.
  """
  if mode not in LOOKUP_MODES:
    raise ValueError(f"mtjax: embedding_lookup mode must be one of {LOOKUP_MODES}, got {mode!r}.")
  ids = jnp.asarray(ids)
  if not jnp.issubdtype(ids.dtype, jnp.integer):
    raise ValueError(f"mtjax: embedding_lookup needs integer ids, got {ids.dtype}.")
  if jnp.ndim(table) < 1:
    raise ValueError("mtjax: embedding_lookup needs a table with at least one axis (rows).")
  rec = _active()
  if rec is None:
    return _take(table, ids, mode)
  return rec.lookup(table, ids, mode)


def representation(z: PyTree, *, batch_axis: Optional[int] = 0) -> PyTree:
  r"""Marks ``z`` as the shared representation: the trunk's output that every task head reads.

  An identity everywhere except inside :func:`mtjax.task_grads` with ``strategy="rep"`` or
  ``"shared"``, which split the loss at ``z`` into a trunk (everything that computes ``z``) and
  task heads (everything after it):

  * ``"rep"`` (MGDA-UB, Sener & Koltun 2018): per-task gradients only of ``z``,
    :math:`\partial L_t / \partial z`, through the heads; a method's weights come from their Gram;
    ONE backward pass through the trunk with the cotangent :math:`\sum_t w_t \partial L_t/\partial z`.
  * ``"shared"``: the exact per-task gradients of the trunk's parameters (the T cotangents at
    ``z`` backpropagated through the trunk), the heads' parameters from one backward pass.

  Call it once per loss evaluation, in the model or in the loss function; every mtjax model
  declares its representation already.

  Examples:
    >>> import jax.numpy as jnp, mtjax
    >>> def loss_fn(params, x):
    ...   z = mtjax.representation(jnp.tanh(x @ params['trunk']))     # [B, H]
    ...   return jnp.stack([jnp.mean(z @ params['head0']), jnp.mean(z @ params['head1'])])
    >>> params = {'trunk': jnp.ones((3, 4)), 'head0': jnp.ones(4), 'head1': -jnp.ones(4)}
    >>> jac = mtjax.task_grads(loss_fn, strategy='rep')(params, jnp.ones((2, 3)))[1]
    >>> type(jac).__name__, jac.num_tasks
    ('RepJacobian', 2)

  Args:
    z: an array or pytree of arrays.
    batch_axis: the batch axis of every leaf of ``z`` (``None``: no batch axis); ``"rep"`` sums
      the per-sample gradients over it unless ``rep_gram="stack"``.

  Returns:
    ``z``.
  """
  rec = _active()
  if rec is None:
    return z
  return rec.representation(z, batch_axis)


def task_view(z: PyTree, task: int) -> PyTree:
  r"""Marks the place where task ``task``'s head reads the representation ``z``.

  An identity everywhere. Inside :func:`mtjax.task_grads` with ``strategy="rep"`` or ``"shared"``
  it gives each task its own copy of ``z``, so that ONE backward pass through the heads yields
  every task's :math:`\partial L_t/\partial z` (the cotangent of task ``t``'s copy) instead of T
  backward passes, each through all T heads (:math:`O(T^2)` head work, most of it on zero
  cotangents). Every built-in model reads its representation this way.

  The contract: ``z`` is the value :func:`mtjax.representation` returned, and task ``t``'s loss
  reads it only through ``task_view(z, t)`` (its own copy), never through another task's copy.
  If the heads also read ``z`` directly, ``task_grads`` detects it and falls back to the T
  per-task backward passes (exact, slower). Reading another task's copy is not detectable at
  trace time; :func:`mtjax.check_task_views` compares both ways on a sample batch (the test
  suite runs it on every built-in model).

  Examples:
    >>> import jax.numpy as jnp, mtjax
    >>> def loss_fn(params, x):
    ...   z = mtjax.representation(jnp.tanh(x @ params['trunk']))
    ...   return jnp.stack([jnp.mean(mtjax.task_view(z, t) @ params['heads'][t]) for t in range(2)])
    >>> params = {'trunk': jnp.ones((3, 4)), 'heads': [jnp.ones(4), -jnp.ones(4)]}
    >>> losses, jac = mtjax.task_grads(loss_fn, strategy='rep')(params, jnp.ones((2, 3)))
    >>> jac.z_rows.shape                      # [T, B, H], from one backward through the heads
    (2, 2, 4)

  Args:
    z: the representation (the pytree :func:`mtjax.representation` returned).
    task: the index of the task whose head reads it here (a Python int).

  Returns:
    ``z`` (task ``task``'s copy inside ``task_grads``).
  """
  if isinstance(task, bool) or not isinstance(task, (int, np.integer)):
    raise TypeError(f"mtjax.task_view: task must be a Python int (the task's index), got {task!r}.")
  rec = _active()
  if rec is None:
    return z
  return rec.task_view(z, int(task))


# ------------------------------------------------------------------------------------------------
# SparseRows: the per-task gradient of an embedding table


@jax.tree_util.register_pytree_node_class
class SparseRows:
  r"""The per-task gradients ``[T, V, *row]`` of an embedding table, kept as looked-up rows.

  ``ids`` ``[N]`` are the ids the batch looked up (every lookup of the table, flattened; ids that
  pass no gradient are set to ``V``) and ``values`` ``[T, N, *row]`` the per-task cotangents of the
  looked-up rows, so that task ``t``'s gradient is ``sum_n e_{ids[n]} values[t, n]^T``. The same
  id may appear many times. It is a pytree and has ``shape``/``dtype``/``ndim`` like the dense
  array it stands for; :meth:`todense` builds that array.
  """

  def __init__(self, ids: jax.Array, values: jax.Array, table_shape):
    self.ids = ids
    self.values = values
    self.table_shape = tuple(int(s) for s in table_shape)

  def tree_flatten(self):
    return (self.ids, self.values), self.table_shape

  @classmethod
  def tree_unflatten(cls, aux, children):
    return cls(children[0], children[1], aux)

  @property
  def num_tasks(self) -> int:
    return int(self.values.shape[0])

  @property
  def shape(self) -> tuple:
    return (self.values.shape[0],) + self.table_shape

  @property
  def dtype(self):
    return self.values.dtype

  @property
  def ndim(self) -> int:
    return len(self.shape)

  def __repr__(self):
    return f"SparseRows(shape={self.shape}, dtype={self.dtype}, looked_up={self.ids.shape[0]})"

  def segments(self) -> tuple[jax.Array, jax.Array]:
    """``(uids [N], s [T, N, *row])``: per distinct id the summed cotangents (unused slots: id ``V``, zeros)."""
    n = self.ids.shape[0]
    vocab = self.table_shape[0]
    if n == 0:
      return self.ids, self.values
    order = jnp.argsort(self.ids)
    sid = self.ids[order]
    new = jnp.concatenate([jnp.ones((1,), bool), sid[1:] != sid[:-1]])
    seg = jnp.cumsum(new.astype(jnp.int32)) - 1
    uids = jnp.full((n,), vocab, self.ids.dtype).at[seg].set(sid)
    vals = jnp.moveaxis(jnp.take(self.values, order, axis=1), 1, 0)  # [N, T, *row]
    s = jax.ops.segment_sum(vals, seg, num_segments=n, indices_are_sorted=True)
    s = jnp.where(jnp.reshape(uids < vocab, (n,) + (1,) * (s.ndim - 1)), s, 0)
    return uids, jnp.moveaxis(s, 0, 1)

  def gram(self, dtype=None) -> jax.Array:
    """``[T, T]`` Gram matrix of the dense per-task gradients, from the per-id sums."""
    _, s = self.segments()
    flat = jnp.reshape(s, (s.shape[0], -1))
    acc = dtype or jnp.promote_types(flat.dtype, jnp.float32)
    return jnp.matmul(flat, flat.T, precision=jax.lax.Precision.HIGHEST, preferred_element_type=acc).astype(acc)

  def weighted_sum(self, weights: jax.Array, dtype=None) -> jax.Array:
    """``sum_t weights[t] * g_t``: the ``[V, *row]`` update, one scatter of the weighted cotangents
    (in ``dtype``, default the values' dtype)."""
    acc = jnp.promote_types(self.values.dtype, jnp.float32)
    rows = jnp.tensordot(
      jnp.asarray(weights).astype(acc), self.values.astype(acc), axes=1, precision=jax.lax.Precision.HIGHEST
    )
    return scatter_rows(self.ids, rows.astype(dtype or self.values.dtype), self.table_shape)

  def sum(self, dtype=None) -> jax.Array:
    """``sum_t g_t`` (``[V, *row]``, in ``dtype``, default the values' dtype)."""
    values = self.values if dtype is None else self.values.astype(dtype)
    return scatter_rows(self.ids, jnp.sum(values, axis=0), self.table_shape)

  def dot(self, dense: jax.Array) -> jax.Array:
    """``[T]``: ``<g_t, dense>`` for a ``[V, *row]`` array, without densifying."""
    rows = jnp.take(dense, self.ids, axis=0, mode="fill", fill_value=0)  # [N, *row]
    acc = jnp.promote_types(self.values.dtype, jnp.float32)
    v = jnp.reshape(self.values, (self.values.shape[0], -1)).astype(acc)
    return jnp.matmul(v, jnp.reshape(rows, (-1,)).astype(acc), precision=jax.lax.Precision.HIGHEST)

  def todense(self) -> jax.Array:
    """The dense ``[T, V, *row]`` per-task gradients."""
    out = jnp.zeros(self.shape, self.values.dtype)
    return out.at[:, self.ids].add(self.values, mode="drop")

  def map_rows(self, fn) -> SparseRows:
    """A new SparseRows with ``values`` replaced by ``fn(values)`` (same ids)."""
    return SparseRows(self.ids, fn(self.values), self.table_shape)


def scatter_rows(ids: jax.Array, rows: jax.Array, table_shape) -> jax.Array:
  """``zeros(table_shape).at[ids].add(rows)``, dropping ids outside the table."""
  return jnp.zeros(tuple(table_shape), rows.dtype).at[ids].add(rows, mode="drop")


def is_sparse(x) -> bool:
  return isinstance(x, SparseRows)


def densify(task_grads: PyTree) -> PyTree:
  """``task_grads`` with every :class:`SparseRows` leaf replaced by its dense ``[T, V, *row]`` array."""
  return jax.tree.map(lambda g: g.todense() if isinstance(g, SparseRows) else g, task_grads, is_leaf=is_sparse)


def canonical_ids(ids: jax.Array, vocab: int, mode: str) -> tuple[jax.Array, jax.Array]:
  """Flattened ids with the lookup's out-of-range rule applied, and a validity mask (``[N]`` each)."""
  flat = jnp.reshape(ids, (-1,)).astype(jnp.int32)
  if mode == "clip":
    return jnp.clip(flat, 0, vocab - 1), jnp.ones(flat.shape, bool)
  valid = (flat >= 0) & (flat < vocab)
  return jnp.where(valid, flat, vocab), valid


# ------------------------------------------------------------------------------------------------
# Recorders (active only while task_grads traces the loss)

_LOCAL = threading.local()


def _stack() -> list:
  if not hasattr(_LOCAL, "stack"):
    _LOCAL.stack = []
  return _LOCAL.stack


def _active():
  s = _stack()
  return s[-1] if s else None


class recording:  # pylint: disable=invalid-name
  """Context manager: makes ``rec`` receive the lookups and the representation while tracing."""

  def __init__(self, rec):
    self.rec = rec

  def __enter__(self):
    _stack().append(self.rec)
    return self.rec

  def __exit__(self, *exc):
    _stack().pop()
    return False


class LookupInfo(NamedTuple):
  leaf: Optional[int]  # index of the table among the param leaves (None: not a param leaf)
  ids_shape: tuple
  table_shape: tuple
  dtype: Any
  mode: str
  before_rep: bool  # looked up before the representation was marked (part of the trunk)


class RepInfo(NamedTuple):
  struct: PyTree  # ShapeDtypeStructs of z
  batch_axis: Optional[int]


class Probe:
  """Discovery trace: records lookups (tables found by identity among ``leaves``) and the representation.

  Matched lookups return zeros, so a table that the traced program still reads is one the loss
  uses in some other way (and is then differentiated densely).
  """

  def __init__(self, leaves):
    self.leaves = list(leaves)
    self.lookups: list[LookupInfo] = []
    self.rep: Optional[RepInfo] = None
    self.rep_value = None  # the leaves representation() returned (to recognise them in task_view)
    self.views: set[int] = set()

  def lookup(self, table, ids, mode):
    idx = next((i for i, leaf in enumerate(self.leaves) if leaf is table), None)
    self.lookups.append(
      LookupInfo(idx, tuple(ids.shape), tuple(jnp.shape(table)), jnp.result_type(table), mode, self.rep is None)
    )
    if idx is None:
      return _take(table, ids, mode)
    return jnp.zeros(tuple(ids.shape) + tuple(jnp.shape(table))[1:], jnp.result_type(table))

  def representation(self, z, batch_axis):
    if self.rep is not None:
      raise ValueError(
        "mtjax.representation was called more than once in one loss evaluation; mark one "
        "representation (a pytree of arrays is fine)."
      )
    struct = jax.tree.map(lambda a: jax.ShapeDtypeStruct(jnp.shape(a), jnp.result_type(a)), z)
    if batch_axis is not None:
      for a in jax.tree.leaves(struct):
        if not -len(a.shape) <= batch_axis < len(a.shape):
          raise ValueError(
            f"mtjax.representation: batch_axis={batch_axis} is out of range for a leaf of shape {a.shape}."
          )
    self.rep = RepInfo(struct, batch_axis)
    self.rep_value = jax.tree.leaves(z)
    return z

  def task_view(self, z, task):
    _check_view_of_rep(z, self.rep_value)
    self.views.add(task)
    return z


def linear_view(x) -> Optional[tuple]:
  """``(z, delta, batch_axis)`` when ``x`` is a task's view ``z + delta`` in ``task_grads``' batch-sum trace.

  In the ``"rep"`` strategy's batch-sum trace (``rep_gram="sum"``) task ``t`` reads ``z + delta_t``,
  ``delta_t`` broadcast along ``batch_axis``; the cotangent of ``delta_t`` is the batch sum of
  ``dL_t/dz``. A head that is linear in its view can compute ``f(z) + f(delta_t)`` instead of
  ``f(z + delta_t)`` -- the same value (``delta_t`` is zero) -- so that the batch sum is one small
  product rather than a per-sample ``[*z.shape]`` cotangent reduced afterwards (the MMoE mixing,
  :func:`mtjax.models._experts.mix`). ``None`` everywhere else.
  """
  rec = _active()
  parts = getattr(rec, "view_parts", None) if rec is not None else None
  part = parts.get(id(x)) if parts else None
  return None if isinstance(part, Factor) else part


class Factor(NamedTuple):
  """A task's view leaf in ``task_grads``' factored ``"shared"`` trace (see :func:`linear_einsum`)."""

  task: int
  leaf: int  # index of the representation's leaf
  z: Any  # that leaf of ``z``


class FactorTrace:
  """The log of the factored ``"shared"`` trace: one entry per :func:`linear_einsum` of a view.

  Each entry is ``(task, leaf, transposed spec, coefficient, output struct)``; with ``us`` (zero inputs
  shaped like the outputs) every logged product gets its ``u`` added, whose cotangent is the head's
  cotangent at that product's output.
  """

  def __init__(self, us=None):
    self.us = us
    self.log: list = []


def _einsum_parts(spec: str) -> Optional[tuple]:
  """``(a, b, c)`` of an explicit two-operand ``"a,b->c"`` spec without ellipsis; ``None`` otherwise."""
  spec = spec.replace(" ", "")
  if "." in spec or spec.count("->") != 1:
    return None
  ins, out = spec.split("->")
  if ins.count(",") != 1:
    return None
  a, b = ins.split(",")
  if len(set(b)) != len(b):
    return None
  return a, b, out


def linear_einsum(spec: str, coef: jax.Array, view: jax.Array) -> jax.Array:
  r"""``jnp.einsum(spec, coef, view)`` for a task head that reads its view of ``z`` linearly.

  ``view`` is a leaf of :func:`task_view` ``(z, t)`` and ``spec`` an explicit ``"a,b->c"``
  (``coef`` first). Outside :func:`mtjax.task_grads` it is ``jnp.einsum``. Inside it, two traces
  use that the product is linear in the view, with the same values and gradients:

  * ``strategy="rep"`` (batch sums): the view is ``z + delta_t``; the product is computed as
    ``einsum(coef, z) + einsum(coef, delta_t)``, so ``delta_t``'s cotangent (the batch sum of
    :math:`\partial L_t/\partial z`) is one small product, not a per-sample cotangent summed afterwards;
  * ``strategy="shared"``: task ``t``'s row :math:`\partial L_t/\partial z` is kept as the factors
    ``(coef_t, dout_t)`` (``dout_t``: the head's cotangent at the product) and formed, as
    ``einsum("a,c->b", coef_t, dout_t)``, inside the trunk's per-task backward pass: the ``T`` rows
    ``[T, *z.shape]`` are never written (the MMoE mixing, :func:`mtjax.models._experts.mix`).

  For the second form a head must read its view only through such products (else ``task_grads``
  falls back to the stacked rows: exact either way), and every task's head must make the same
  products (same specs and shapes). On the benchmark MMoE at T = 10 this took ``"shared"`` PCGrad
  from 4.6x to 3.6x of the summed-loss step (``benchmarks/torch_reference.py``).

  Examples:
    >>> import jax.numpy as jnp, mtjax
    >>> def loss_fn(params, x):
    ...   z = mtjax.representation(jnp.tanh(x @ params['trunk']))             # [B, H]
    ...   heads = params['heads']
    ...   preds = [mtjax.linear_einsum('h,bh->b', heads[t], mtjax.task_view(z, t)) for t in range(2)]
    ...   return jnp.stack([jnp.mean((p - 1.0) ** 2) for p in preds])
    >>> params = {'trunk': jnp.ones((3, 4)), 'heads': [jnp.ones(4), -jnp.ones(4)]}
    >>> losses, jac = mtjax.task_grads(loss_fn, strategy='shared')(params, jnp.ones((2, 3)))
    >>> jac.z_rows.shape                      # formed from the factors (heads[t], dL_t/dpred_t)
    (2, 2, 4)

  Args:
    spec: an explicit two-operand einsum spec ``"a,b->c"`` (no ellipsis), ``coef`` first.
    coef: the coefficient (anything but the view: gate weights, a head's kernel).
    view: a leaf of ``mtjax.task_view(z, t)``.

  Returns:
    ``jnp.einsum(spec, coef, view)``.
  """
  rec = _active()
  parts = getattr(rec, "view_parts", None)
  part = parts.get(id(view)) if parts else None
  abc = _einsum_parts(spec) if part is not None else None
  if rec is None or part is None or abc is None:
    return jnp.einsum(spec, coef, view)
  a, b, c = abc
  if isinstance(part, Factor):
    if not set(b) <= set(a) | set(c):  # an index summed over the view alone: no factored row
      return jnp.einsum(spec, coef, view)
    out = jnp.einsum(spec, coef, part.z)
    trace = rec.factor_trace
    i = len(trace.log)
    trace.log.append((part.task, part.leaf, f"{a},{c}->{b}", coef, jax.ShapeDtypeStruct(out.shape, out.dtype)))
    return out if trace.us is None else out + trace.us[i]
  z, delta, axis = part  # the rep batch-sum trace: view = z + delta_t, delta_t without the batch axis
  letter = b[axis] if len(b) == jnp.ndim(z) else None
  if letter is None or letter not in a + c:  # the batch index summed over the view alone
    return jnp.einsum(spec, coef, view)
  if letter in a:
    term = jnp.einsum(f"{a},{b.replace(letter, '')}->{c}", coef, delta)
  else:  # delta_t's term is constant along the batch: broadcast it
    term = jnp.einsum(f"{a},{b.replace(letter, '')}->{c.replace(letter, '')}", coef, delta)
    term = jnp.expand_dims(term, c.index(letter))
  return jnp.einsum(spec, coef, z) + term


def _check_view_of_rep(z, rep_leaves):
  leaves = jax.tree.leaves(z)
  if rep_leaves is None or len(leaves) != len(rep_leaves) or any(a is not b for a, b in zip(leaves, rep_leaves)):
    raise ValueError(
      "mtjax.task_view takes the value mtjax.representation returned (the whole pytree, unchanged), "
      + ("but no representation was marked before it." if rep_leaves is None else "but got another value.")
    )


class RepReached(Exception):
  """Raised by a trunk-only recorder at the representation to stop the trace there."""

  def __init__(self, z):
    super().__init__("mtjax: representation reached")
    self.z = z


class Tapper:
  """Real trace: lookups of sparse tables get a zero ``tap`` added (its cotangent is the rows' cotangent).

  ``mode``: ``"full"`` (the representation passes through), ``"trunk"`` (stop at the
  representation, :class:`RepReached`), ``"head"`` (the representation is replaced by ``z_in``;
  with ``z_views``, a tuple of T copies of ``z``, :func:`task_view` ``(z, t)`` gives copy ``t``).
  """

  def __init__(
    self, lookups, tap_of_lookup, taps, mode: str = "full", z_in=None, z_views=None, view_parts=None, factor_trace=None
  ):
    self.lookups = lookups
    # id(view leaf) -> (z leaf, delta leaf, batch axis) or a Factor: see linear_view and linear_einsum
    self.view_parts = view_parts or {}
    self.factor_trace = factor_trace
    self.tap_of_lookup = tap_of_lookup  # lookup index -> tap index (None: plain lookup)
    self.taps = taps
    self.mode = mode
    self.z_in = z_in
    self.z_views = z_views
    self.rep_value = None
    self.count = 0
    self.ids: dict[int, jax.Array] = {}
    self.seen_rep = False

  def lookup(self, table, ids, mode):
    j = self.count
    self.count += 1
    if (
      j >= len(self.lookups)
      or tuple(ids.shape) != self.lookups[j].ids_shape
      or tuple(jnp.shape(table)) != self.lookups[j].table_shape
    ):
      raise ValueError(
        "mtjax: task_grads: the loss made different embedding lookups in two traces of the same call "
        "(lookup order or shapes changed). loss_fn must be a pure function of its arguments."
      )
    out = _take(table, ids, mode)
    k = self.tap_of_lookup[j]
    if k is None:
      return out
    self.ids[k] = ids
    return out + self.taps[k]

  def representation(self, z, batch_axis):
    del batch_axis
    self.seen_rep = True
    if self.mode == "trunk":
      raise RepReached(z)
    if self.mode == "head":
      z = self.z_in
    self.rep_value = jax.tree.leaves(z)
    return z

  def task_view(self, z, task):
    _check_view_of_rep(z, self.rep_value)
    if self.mode != "head" or self.z_views is None:
      return z
    return self.z_views[task]


def used_inputs(closed_jaxpr) -> list[bool]:
  """Which inputs of a traced program its outputs depend on (after dead-code elimination)."""
  jaxpr = closed_jaxpr.jaxpr
  try:
    from jax._src.interpreters import partial_eval as pe  # pylint: disable=import-outside-toplevel

    _, used = pe.dce_jaxpr(jaxpr, [True] * len(jaxpr.outvars))
    return [bool(u) for u in used]
  except Exception:  # pragma: no cover - internal API moved: conservative scan of the equations
    seen = set()
    for eqn in jaxpr.eqns:
      seen.update(id(v) for v in eqn.invars)
    seen.update(id(v) for v in jaxpr.outvars)
    return [id(v) in seen for v in jaxpr.invars]


def zeros_like_struct(struct):
  return jnp.zeros(struct.shape, struct.dtype)


def np_shape(x) -> tuple:
  return tuple(np.shape(x))
