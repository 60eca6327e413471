"""Sparse embedding gradients (:class:`mtjax.SparseRows` from :func:`mtjax.embedding_lookup`).

* Every Gram-based and loss-only transform gives the same update (and state) from the sparse rows as
  from the dense ``[T, V, d]`` rows (``task_grads(..., sparse=False)``), in float32 and float64, for
  three ``shared=`` layouts and GradVac's three granularities, on a hand-written loss with two
  lookups of one table (``"fill"`` and ``"clip"``), a ``[B, L]`` sequence with masked mean pooling,
  a FeatureEmbedding (reserved OOV row), a task-specific table, repeated and out-of-range ids.
* ``SparseRows``' methods against NumPy float64, ``mtjax.densify``.
* ``mtjax.analysis`` on sparse rows equals the dense results.
* GradDrop on sparse rows: leak 1 / sign-consistent rows give the plain sum, rows never looked up
  get 0, the per-row draw replayed in NumPy, unbiasedness.
* Built-in models give ``SparseRows`` for their tables; a table also used densely is dense.
* ``mtjax.training.fit`` trains an MMoE with categorical features with PCGrad.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import mtjax
from mtjax._src.sparse import is_sparse
from mtjax.models import Categorical
from mtjax.models import FeatureEmbedding
from mtjax.models import FeatureSpec

# Same numerics, less compile time (as in tests/transforms/test_conformance.py).
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}

V, VS, D, B, L, T = 50, 30, 4, 16, 5, 3
SPEC = FeatureSpec(categorical=(Categorical("u", 20, D),))  # table embed_u: 21 rows, row 20 reserved
RTOL = {"float32": 1e-5, "float64": 1e-10}


def dtype_ctx(dtype: str):
  return jax.enable_x64(dtype == "float64")


def _np_dtype(dtype: str):
  return np.float32 if dtype == "float32" else np.float64


# ----------------------------------------------------------------------------- the hand-written loss


def init_params(rng, dtype):
  n = lambda *s: jnp.asarray(rng.normal(size=s), dtype)
  feat = FeatureEmbedding(SPEC).init(jax.random.key(0), {"u": jnp.zeros((2,), jnp.int32)})["params"]
  feat = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), dtype), feat)
  return {
    "emb_a": {"table": n(V, D)},  # looked up by two fields: f1 ("fill") and f2 ("clip")
    "emb_seq": {"table": n(VS, D)},  # [B, L] sequences, padding id 0, masked mean pooling
    "feat": feat,  # FeatureEmbedding, only task 2 reads it: ids outside [0, 20) go to the reserved row 20
    "trunk": {"kernel": n(3 * D + 2, 8) / 3, "bias": n(8)},
    "head_0": {"kernel": n(8)},
    "head_1": {"kernel": n(8), "bias": n()},
    "head_2": {"kernel": n(8 + D)},
  }


def loss_fn(params, batch):
  a1 = mtjax.embedding_lookup(params["emb_a"]["table"], batch["f1"], mode="fill")
  a2 = mtjax.embedding_lookup(params["emb_a"]["table"], batch["f2"], mode="clip")
  seq = batch["seq"]
  r = mtjax.embedding_lookup(params["emb_seq"]["table"], seq)  # [B, L, D]
  m = (seq != 0).astype(r.dtype)[..., None]
  pooled = jnp.sum(r * m, axis=1) / jnp.maximum(jnp.sum(m, axis=1), 1.0)
  x = jnp.concatenate([a1, a2, pooled, batch["dense"]], axis=-1)
  h = jnp.tanh(x @ params["trunk"]["kernel"] + params["trunk"]["bias"][None])
  o0 = h @ params["head_0"]["kernel"]
  o1 = h @ params["head_1"]["kernel"] + params["head_1"]["bias"]
  u, _ = FeatureEmbedding(SPEC).apply({"params": params["feat"]}, batch)  # [B, D]
  o2 = jnp.concatenate([h, u], axis=-1) @ params["head_2"]["kernel"]
  y = batch["y"]
  return jnp.stack(
    [jnp.mean((o0 - y[0]) ** 2), jnp.mean(jax.nn.softplus(o1) - y[1] * o1), jnp.mean(jnp.abs(o2 - y[2]) ** 1.5)]
  )


def make_batch(rng, dtype):
  f1 = rng.integers(0, 8, size=B)  # few distinct ids: many repeats (also across f1 and f2)
  f1[:4] = [V, V + 7, -1, -V]  # out of range, "fill": zeros, no gradient (negative ones too)
  f2 = rng.integers(0, 8, size=B)
  f2[:2] = [-3, V + 2]  # out of range, "clip": rows 0 and V - 1
  seq = rng.integers(1, 6, size=(B, L))
  seq[:, 3:] *= rng.integers(0, 2, size=(B, 2))  # padding (id 0) at the end of some sequences
  seq[0] = 0  # an all-padding sequence
  uid = rng.integers(0, 5, size=B)
  uid[:3] = [20, 99, -4]  # FeatureEmbedding: all three go to the reserved row 20
  return {
    "f1": jnp.asarray(f1, jnp.int32),
    "f2": jnp.asarray(f2, jnp.int32),
    "seq": jnp.asarray(seq, jnp.int32),
    "u": jnp.asarray(uid, jnp.int32),
    "dense": jnp.asarray(rng.normal(size=(B, 2)), dtype),
    "y": jnp.asarray(rng.uniform(size=(T, B)), dtype),
  }


def _both(params, batch):
  losses, sparse = mtjax.task_grads(loss_fn)(params, batch)
  losses_d, dense = mtjax.task_grads(loss_fn, sparse=False)(params, batch)
  return losses, losses_d, sparse, dense


_both_tg = jax.jit(_both, compiler_options=FAST_COMPILE)

SPARSE_PATHS = ("emb_a/table", "emb_seq/table", "feat/embed_u/embedding")


@functools.cache
def problem(dtype: str):
  """``(params, batch, task losses, sparse grads, dense grads)``; call under ``dtype_ctx(dtype)``."""
  rng = np.random.default_rng(0)
  params = init_params(rng, _np_dtype(dtype))
  batch = make_batch(rng, _np_dtype(dtype))
  losses, losses_d, sparse, dense = _both_tg(params, batch)
  np.testing.assert_array_equal(np.asarray(losses), np.asarray(losses_d))
  return params, batch, losses, sparse, dense


def _paths(tree):
  return [
    jax.tree_util.keystr(p, simple=True, separator="/")
    for p, _ in jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_sparse)[0]
  ]


def assert_trees_close(a, b, rtol, what=""):
  """Leaf by leaf, ``rtol`` relative to each element and ``rtol`` times the leaf's largest entry."""
  assert jax.tree.structure(a) == jax.tree.structure(b), what
  for path, x, y in zip(_paths(a), jax.tree.leaves(a), jax.tree.leaves(b)):
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    scale = float(np.max(np.abs(y))) if y.size else 0.0
    np.testing.assert_allclose(x, y, rtol=rtol, atol=rtol * scale, err_msg=f"{what} {path}")


def test_loss_setup_gives_sparse_leaves_equal_to_jacrev():
  with dtype_ctx("float64"):
    params, batch, _, g_s, g_d = problem("float64")
    for p, leaf in zip(_paths(g_s), jax.tree.leaves(g_s, is_leaf=is_sparse)):
      assert is_sparse(leaf) == (p in SPARSE_PATHS), p
    assert not any(is_sparse(x) for x in jax.tree.leaves(g_d, is_leaf=is_sparse))
    # emb_a: the two lookups (B each) in one SparseRows; emb_seq: B * L ids.
    assert g_s["emb_a"]["table"].ids.shape == (2 * B,) and g_s["emb_seq"]["table"].ids.shape == (B * L,)
    dense = mtjax.densify(g_s)
    assert_trees_close(dense, g_d, 1e-12, "densify(sparse) vs dense")
    ref = jax.jit(jax.jacrev(loss_fn), compiler_options=FAST_COMPILE)(params, batch)
    assert_trees_close(dense, ref, 1e-12, "sparse vs jax.jacrev")
    # No gradient: emb_seq's padding row 0; f1's out-of-range ids (mode "fill") look up zeros. The
    # clipped ids (f2 = -3, V + 2) reach rows 0 and V - 1; the FeatureEmbedding's reserved row 20 is used.
    np.testing.assert_array_equal(np.asarray(dense["emb_seq"]["table"])[:, 0], 0.0)
    table = np.asarray(dense["emb_a"]["table"])
    assert np.all(table[:, V - 1] != 0) and np.all(table[:, 0] != 0)
    assert np.all(np.asarray(dense["feat"]["embed_u"]["embedding"])[2, 20] != 0)


def test_fill_mode_negative_ids_look_up_zeros():
  """``mode="fill"``: every id outside [0, V) looks up zeros, negative ones too (jnp.take wraps them)."""
  table = jnp.arange(12.0).reshape(6, 2)
  ids = jnp.array([-1, -6, -7, 6, 2])
  out = mtjax.embedding_lookup(table, ids)
  np.testing.assert_array_equal(np.asarray(out), [[0, 0], [0, 0], [0, 0], [0, 0], [4, 5]])
  grad = jax.grad(lambda t: jnp.sum(mtjax.embedding_lookup(t, ids)))(table)
  np.testing.assert_array_equal(np.asarray(grad)[:, 0], [0, 0, 1, 0, 0, 0])
  clip = mtjax.embedding_lookup(table, ids, mode="clip")
  np.testing.assert_array_equal(np.asarray(clip)[:, 0], [0, 0, 0, 10, 4])


# ----------------------------------------------------------------------------- every method: sparse == dense

MASKS = {
  "all": None,
  "heads": mtjax.shared_mask(exclude="head"),  # dense task-specific heads, every table shared
  "table": mtjax.shared_mask(exclude=("head", "feat")),  # + the table only task 2 reads: task-specific
}
_emb_or_trunk = lambda paths: [("emb" in p) or ("trunk" in p) for p in paths]

# name -> factory(shared) -> transform (fixed keys for the random ones); task_losses go to every method.
METHODS = {
  "pcgrad": lambda s: mtjax.pcgrad(key=0, num_tasks=T, shared=s),
  "gradvac-model": lambda s: mtjax.gradvac(key=1, num_tasks=T, beta=0.5, granularity="model", shared=s),
  "gradvac-layer": lambda s: mtjax.gradvac(key=2, num_tasks=T, beta=0.5, granularity="layer", shared=s),
  "gradvac-leaf": lambda s: mtjax.gradvac(key=3, num_tasks=T, beta=0.5, granularity="leaf", shared=s),
  "mgda": lambda s: mtjax.mgda(num_tasks=T, normalization="l2", shared=s),
  "pareto_ltr": lambda s: mtjax.pareto_ltr(np.array([0.1, 0.2, 0.3]), num_tasks=T, shared=s),
  "cagrad": lambda s: mtjax.cagrad(0.4, num_tasks=T, shared=s),
  "imtl": lambda s: mtjax.imtl(num_tasks=T, shared=s),
  "aligned_mtl": lambda s: mtjax.aligned_mtl(num_tasks=T, shared=s),
  "upgrad": lambda s: mtjax.upgrad(num_tasks=T, shared=s),
  "dualproj": lambda s: mtjax.dualproj(num_tasks=T, shared=s),
  "config": lambda s: mtjax.config(num_tasks=T, shared=s),
  "fairgrad": lambda s: mtjax.fairgrad(1.0, num_tasks=T, shared=s),
  "nash_mtl": lambda s: mtjax.nash_mtl(num_tasks=T, shared=s),
  # The Gram of the tables and the trunk (the default "last" layer would leave the tables out).
  "gradnorm": lambda s: mtjax.gradnorm(num_tasks=T, layer=_emb_or_trunk, shared=s),
  "linear": lambda s: mtjax.linear(np.array([0.5, 1.0, 2.0]), num_tasks=T, shared=s),
  "dwa": lambda s: mtjax.dwa(num_tasks=T, mode="step", shared=s),
  "uncertainty": lambda s: mtjax.uncertainty(num_tasks=T, learning_rate=0.1, shared=s),
  "rlw": lambda s: mtjax.rlw(key=5, num_tasks=T, shared=s),
}


# Every method sees every mask and both dtypes, in a Latin-square design that keeps the compilations
# few: float64 (the strict 1e-10 check) under two masks, float32 under the third. The mask handling
# is the same core code for every method (rows.compute_grams / combine_leaf).
MASKS_OF_DTYPE = {"float32": ("heads",), "float64": ("all", "table")}


@functools.cache
def method_step(name: str, dtype: str):
  """One jitted function: the method's first update under the dtype's masks, from the sparse and the dense rows."""
  txs = {k: METHODS[name](MASKS[k]) for k in MASKS_OF_DTYPE[dtype]}

  def run(params, losses, sparse, dense):
    out = {}
    for k, tx in txs.items():
      for rep, g in (("sparse", sparse), ("dense", dense)):
        out[f"{k}/{rep}"] = tx.update(g, tx.init(params), params, task_losses=losses)
    return out

  return jax.jit(run, compiler_options=FAST_COMPILE)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("name", list(METHODS))
def test_method_update_sparse_equals_dense(name, dtype):
  with dtype_ctx(dtype):
    params, _, losses, sparse, dense = problem(dtype)
    out = method_step(name, dtype)(params, losses, sparse, dense)
    for k in MASKS_OF_DTYPE[dtype]:
      (u_s, state_s), (u_d, state_d) = out[f"{k}/sparse"], out[f"{k}/dense"]
      assert jax.tree.structure(u_s) == jax.tree.structure(params)
      for leaf, p in zip(jax.tree.leaves(u_s), jax.tree.leaves(params)):
        assert leaf.shape == p.shape and leaf.dtype == p.dtype
      assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(u_d))
      assert_trees_close(u_s, u_d, RTOL[dtype], f"{name} mask={k} update")
      assert_trees_close(state_s, state_d, RTOL[dtype], f"{name} mask={k} state")


# ----------------------------------------------------------------------------- SparseRows vs NumPy


def _rows_case(dtype=np.float32, row=(3,), n_ids=None, seed=0):
  rng = np.random.default_rng(seed)
  vocab, t = 7, 3
  ids = (
    np.array([4, 1, 4, vocab, 0, 1, 4, vocab, 6], np.int32)
    if n_ids is None
    else rng.integers(0, vocab + 1, size=n_ids).astype(np.int32)
  )
  values = rng.normal(size=(t, len(ids)) + row).astype(dtype)
  values[:, ids == vocab] = 0.0  # the sentinel carries zeros, as task_grads produces
  return mtjax.SparseRows(jnp.asarray(ids), jnp.asarray(values), (vocab,) + row), ids, values.astype(np.float64), vocab


def _np_dense(ids, values, vocab):
  t = values.shape[0]
  out = np.zeros((t, vocab) + values.shape[2:])
  for n, i in enumerate(ids):
    if i < vocab:
      out[:, i] += values[:, n]
  return out


@pytest.mark.parametrize("row", [(3,), (2, 2), ()])
def test_sparse_rows_methods_match_numpy(row):
  sr, ids, values, vocab = _rows_case(row=row)
  dense = _np_dense(ids, values, vocab)
  flat = dense.reshape(dense.shape[0], -1)
  assert sr.shape == dense.shape and sr.ndim == dense.ndim and sr.num_tasks == 3
  np.testing.assert_allclose(np.asarray(sr.todense()), dense, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(np.asarray(sr.gram()), flat @ flat.T, rtol=1e-5, atol=1e-5)
  w = np.array([0.3, -1.2, 2.0])
  np.testing.assert_allclose(
    np.asarray(sr.weighted_sum(jnp.asarray(w, jnp.float32))), np.tensordot(w, dense, 1), rtol=1e-5, atol=1e-5
  )
  np.testing.assert_allclose(np.asarray(sr.sum()), dense.sum(0), rtol=1e-5, atol=1e-5)
  other = np.random.default_rng(1).normal(size=(vocab,) + row)
  np.testing.assert_allclose(
    np.asarray(sr.dot(jnp.asarray(other, jnp.float32))), flat @ other.ravel(), rtol=1e-5, atol=1e-5
  )
  # segments: distinct ids in increasing order, then the sentinel; per-id sums; zeros in unused slots.
  uids, s = map(np.asarray, sr.segments())
  distinct = sorted(set(ids.tolist()) - {vocab})
  assert uids.shape == ids.shape and s.shape == values.shape
  np.testing.assert_array_equal(uids[: len(distinct)], distinct)
  np.testing.assert_array_equal(uids[len(distinct) :], vocab)
  np.testing.assert_allclose(s[:, : len(distinct)], dense[:, distinct], rtol=1e-6, atol=1e-6)
  np.testing.assert_array_equal(s[:, len(distinct) :], 0.0)
  # map_rows keeps the ids.
  np.testing.assert_allclose(np.asarray(sr.map_rows(lambda v: 2 * v).todense()), 2 * dense, rtol=1e-6, atol=1e-6)


def test_sparse_rows_float64_jit_and_edge_cases():
  with jax.enable_x64(True):
    sr, ids, values, vocab = _rows_case(np.float64, n_ids=40, seed=3)
    dense = _np_dense(ids, values, vocab)
    flat = dense.reshape(3, -1)
    w = np.array([0.3, -1.2, 2.0])
    gram, ws, dot = jax.jit(lambda s: (s.gram(), s.weighted_sum(jnp.asarray(w)), s.dot(jnp.ones((vocab, 3)))))(sr)
    assert gram.dtype == ws.dtype == dot.dtype == jnp.float64
    np.testing.assert_allclose(np.asarray(gram), flat @ flat.T, rtol=1e-13)
    np.testing.assert_allclose(np.asarray(ws), np.tensordot(w, dense, 1), rtol=1e-13, atol=1e-14)
    np.testing.assert_allclose(np.asarray(dot), flat.sum(1), rtol=1e-13)
  # Only the sentinel: zero everything.
  only = mtjax.SparseRows(jnp.array([5, 5]), jnp.zeros((2, 2, 3)), (5, 3))
  np.testing.assert_array_equal(np.asarray(only.gram()), 0.0)
  np.testing.assert_array_equal(np.asarray(only.sum()), np.zeros((5, 3)))
  # No lookups at all (N = 0).
  empty = mtjax.SparseRows(jnp.zeros((0,), jnp.int32), jnp.zeros((2, 0, 3)), (5, 3))
  np.testing.assert_array_equal(np.asarray(empty.gram()), np.zeros((2, 2)))
  np.testing.assert_array_equal(np.asarray(empty.weighted_sum(jnp.ones(2))), np.zeros((5, 3)))
  np.testing.assert_array_equal(np.asarray(empty.todense()), np.zeros((2, 5, 3)))


def test_densify_mixed_tree_and_pytree():
  sr, ids, values, vocab = _rows_case()
  tree = {"table": sr, "w": jnp.ones((3, 2)), "nested": [sr]}
  out = mtjax.densify(tree)
  np.testing.assert_allclose(np.asarray(out["table"]), _np_dense(ids, values, vocab), rtol=1e-6, atol=1e-6)
  np.testing.assert_array_equal(np.asarray(out["w"]), np.ones((3, 2)))
  assert isinstance(out["nested"][0], jax.Array) and out["nested"][0].shape == sr.shape
  # A SparseRows is a pytree: it crosses jit and tree_map keeps the table shape.
  doubled = jax.jit(lambda s: jax.tree.map(lambda x: x * 2 if x.dtype != jnp.int32 else x, s))(sr)
  assert isinstance(doubled, mtjax.SparseRows) and doubled.table_shape == sr.table_shape
  np.testing.assert_allclose(np.asarray(doubled.todense()), 2 * _np_dense(ids, values, vocab), rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------- analysis


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_analysis_sparse_equals_dense(dtype):
  an = mtjax.analysis
  with dtype_ctx(dtype):
    _, _, _, g_s, g_d = problem(dtype)
    update = jax.tree.map(lambda x: jnp.sum(x, 0), g_d)
    update["emb_a"]["table"] = update["emb_a"]["table"] + 0.1  # also rows the batch never looked up

    def stats(g):
      return {
        "track": an.track(g, update),  # granularity "layer", alignment with the update
        "track_heads": an.track(g, update, granularity="leaf", shared=MASKS["heads"]),
        "cos_leaf": an.cosine_similarity(g, granularity="leaf"),
        "norms_model": an.gradient_norms(g),
        "norms_leaf": an.gradient_norms(g, granularity="leaf"),
        "align_model": an.update_alignment(g, update),
        "align_leaf": an.update_alignment(g, update, granularity="leaf", shared=MASKS["table"]),
      }

    s, d = jax.jit(lambda a, b: (stats(a), stats(b)), compiler_options=FAST_COMPILE)(g_s, g_d)
    assert jax.tree.structure(s) == jax.tree.structure(d)
    for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(s)[0], jax.tree.leaves(d)):
      assert x.dtype == y.dtype, (path, x.dtype, y.dtype)
      np.testing.assert_allclose(
        np.asarray(x, np.float64),
        np.asarray(y, np.float64),
        rtol=RTOL[dtype],
        atol=RTOL[dtype],
        err_msg=jax.tree_util.keystr(path),
      )
    assert an.group_names(g_s, granularity="leaf") == an.group_names(g_d, granularity="leaf")
    assert s["cos_leaf"].shape == (len(jax.tree.leaves(update)), T, T)


# ----------------------------------------------------------------------------- GradDrop


def _np_graddrop_sparse(sr: mtjax.SparseRows, sub_i, leak):
  """NumPy float64 reference: per distinct id the summed task gradients, one uniform row per id."""
  ids, values = np.asarray(sr.ids), np.asarray(sr.values, np.float64)
  vocab = sr.table_shape[0]
  t = values.shape[0]
  leak = np.broadcast_to(np.asarray(leak, np.float64), (t,))
  out = np.zeros(sr.table_shape)
  kept, total = np.zeros(t), np.zeros(t)
  for uid in sorted(set(ids.tolist()) - {vocab}):
    g = values[:, ids == uid].sum(1).reshape(t, -1)  # [T, row]
    u = np.asarray(jax.random.uniform(jax.random.fold_in(sub_i, uid), sr.table_shape[1:], jnp.float32)).ravel()
    row = np.zeros(g.shape[1])
    for k in range(g.shape[1]):
      col = g[:, k]
      absolute = np.abs(col).sum()
      purity = 0.5 * (1.0 + (col.sum() / absolute if absolute > 0 else 0.0))
      keep_pos = u[k] < np.float32(purity)
      for i in range(t):
        m = leak[i] + (1 - leak[i]) * float(col[i] > 0 if keep_pos else col[i] < 0)
        row[k] += m * col[i]
        kept[i] += m * col[i] ** 2
        total[i] += col[i] ** 2
    out[uid] = row.reshape(sr.table_shape[1:])
  return out, kept, total


def test_graddrop_sparse_replays_numpy_draw():
  with jax.enable_x64(True):
    sr, _, _, _ = _rows_case(np.float64, row=(3,), seed=7)
    dense_w = jnp.asarray(np.random.default_rng(2).normal(size=(3, 4)))  # a dense leaf next to it
    grads = {"a_table": sr, "b_w": dense_w}
    # leak traced: one compilation for both values.
    update_fn = jax.jit(lambda leak, g, st: mtjax.graddrop(num_tasks=3, leak=leak).update(g, st))
    for leak in (0.0, (0.2, 0.0, 0.7)):
      state = mtjax.graddrop(key=11, num_tasks=3).init(None)
      for _ in range(2):  # the key is split at every update
        _, sub = jax.random.split(state.key)
        update, state = update_fn(jnp.broadcast_to(jnp.asarray(leak, jnp.float64), (3,)), grads, state)
        ref, kept, total = _np_graddrop_sparse(sr, jax.random.fold_in(sub, 0), leak)
        np.testing.assert_allclose(np.asarray(update["a_table"]), ref, rtol=1e-12, atol=1e-14)
        # The dense leaf (index 1) draws as before: fold_in(sub, 1), one uniform per coordinate.
        u = np.asarray(jax.random.uniform(jax.random.fold_in(sub, 1), (4,), jnp.float32))
        w = np.asarray(dense_w)
        purity = 0.5 * (1 + w.sum(0) / np.abs(w).sum(0))
        lk = np.broadcast_to(np.asarray(leak), (3,))[:, None]
        mask = lk + (1 - lk) * np.where(u < purity.astype(np.float32), w > 0, w < 0)
        np.testing.assert_allclose(np.asarray(update["b_w"]), (mask * w).sum(0), rtol=1e-12)
        np.testing.assert_allclose(
          np.asarray(state.weights), (kept + (mask * w * w).sum(1)) / (total + (w * w).sum(1)), rtol=1e-6
        )  # the state keeps float32


@functools.cache
def _graddrop_fn():
  """GradDrop (leak traced) under two masks, on the sparse and the dense rows: one compilation."""

  def run(leak, params, sparse, dense):
    out = {}
    for k in ("all", "table"):  # the "table" mask: the FeatureEmbedding table is task-specific
      tx = mtjax.graddrop(key=3, num_tasks=T, leak=leak, shared=MASKS[k])
      out[k] = tx.update(sparse, tx.init(params), params), tx.update(dense, tx.init(params), params)
    return out

  return jax.jit(run, compiler_options=FAST_COMPILE)


def test_graddrop_sparse_on_task_grads():
  params, _, _, g_s, g_d = problem("float32")
  plain = jax.tree.map(lambda x: np.asarray(x).sum(0), g_d)
  # leak = 1: the plain sum, on every layout; the whole gradient kept.
  for k, ((u_s, st_s), _) in _graddrop_fn()(jnp.float32(1.0), params, g_s, g_d).items():
    assert_trees_close(u_s, plain, 1e-5, f"leak=1 mask={k}")
    np.testing.assert_allclose(np.asarray(st_s.weights), 1.0, rtol=1e-6)
  # leak = 0: dense leaves draw exactly as on the dense rows; tables draw per looked-up row.
  dense_g = mtjax.densify(g_s)
  for k, ((u_s, st_s), (u_d, _)) in _graddrop_fn()(jnp.float32(0.0), params, g_s, g_d).items():
    shared_tables = [p for p in SPARSE_PATHS if not (k == "table" and p.startswith("feat"))]
    for path, x, y in zip(_paths(u_s), jax.tree.leaves(u_s), jax.tree.leaves(u_d)):
      if path not in shared_tables:  # dense leaves, and the task-specific table (plain sum)
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-6, atol=1e-7, err_msg=f"{k} {path}")
    for path in shared_tables:
      got = np.asarray(_get(u_s, path))
      g = np.asarray(_get(dense_g, path), np.float64)
      # Rows nobody looked up (or whose lookups passed no gradient) get exactly zero.
      unused = np.all(g == 0, axis=(0, 2))
      assert unused.any(), path
      np.testing.assert_array_equal(got[unused], 0.0)
      # Every coordinate keeps the positive or the negative task components; not all the same sign.
      pos, neg = np.where(g > 0, g, 0).sum(0), np.where(g < 0, g, 0).sum(0)
      is_pos = np.isclose(got, pos, rtol=1e-5, atol=1e-7)
      is_neg = np.isclose(got, neg, rtol=1e-5, atol=1e-7)
      assert np.all(is_pos | is_neg), path
      if not path.startswith("feat"):  # (only task 2 reads the FeatureEmbedding table: no conflicts there)
        conflict = (pos != 0) & (neg != 0)
        assert conflict.sum() > 4 and 0 < np.sum(is_pos[conflict]) < conflict.sum(), path
    assert np.all((np.asarray(st_s.weights) > 0) & (np.asarray(st_s.weights) < 1))


def _get(tree, path):
  for k in path.split("/"):
    tree = tree[k]
  return tree


def test_graddrop_sparse_sign_consistent_rows_are_kept():
  rng = np.random.default_rng(4)
  vocab, t = 9, 3
  ids = np.array([2, 5, 2, 7, vocab, 5, 0], np.int32)
  sign = np.where(rng.uniform(size=(vocab + 1, 4)) < 0.5, -1.0, 1.0)  # per (id, coordinate)
  values = (np.abs(rng.normal(size=(t, len(ids), 4))) * sign[ids][None]).astype(np.float32)
  values[:, ids == vocab] = 0.0
  sr = mtjax.SparseRows(jnp.asarray(ids), jnp.asarray(values), (vocab, 4))
  tx = mtjax.graddrop()
  update_fn = jax.jit(tx.update)
  for key in range(4):
    update, _ = update_fn({"t": sr}, mtjax.graddrop(key=key).init(None))  # same compiled update
    np.testing.assert_allclose(np.asarray(update["t"]), np.asarray(sr.sum()), rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(update["t"])[[1, 3, 4, 6, 8]], 0.0)


def test_graddrop_sparse_is_unbiased():
  sr, ids, values, vocab = _rows_case(seed=5)
  tx = mtjax.graddrop(num_tasks=3)

  def one(key):
    return tx.update({"t": sr}, mtjax.transforms._graddrop.GradDropState(key, jnp.zeros((3,))))[0]["t"]

  mean = jnp.mean(jax.jit(jax.vmap(one))(jax.random.split(jax.random.PRNGKey(0), 4000)), axis=0)
  target = _np_dense(ids, values, vocab).sum(0)
  np.testing.assert_allclose(np.asarray(mean), target, atol=0.1 * np.abs(values).sum(0).max())


# ----------------------------------------------------------------------------- built-in models


def _mmoe_setup():
  spec = FeatureSpec(
    categorical=(Categorical("user", 30, 4), Categorical("item", 40, 3)), dense=(mtjax.models.Dense("age"),)
  )
  model = mtjax.models.MMoE(num_tasks=2, num_experts=2, expert=(8,), tower=(4, 1), features=spec)
  rng = np.random.default_rng(0)
  user = rng.integers(0, 6, size=24)
  user[:2] = [30, -2]  # out of vocabulary: the reserved row
  x = {
    "user": jnp.asarray(user, jnp.int32),
    "item": jnp.asarray(rng.integers(0, 40, size=24), jnp.int32),
    "age": jnp.asarray(rng.normal(size=24), jnp.float32),
  }
  batch = {"x": x, "labels": jnp.asarray(rng.integers(0, 2, size=(2, 24)), jnp.float32)}
  params = model.init(jax.random.key(1), x)["params"]
  return model, params, batch


def test_builtin_model_tables_are_sparse():
  model, params, batch = _mmoe_setup()
  loss = mtjax.losses.make_loss_fn(model, "bce", has_aux=True)

  def both(p, b):
    return (mtjax.task_grads(loss, has_aux=True)(p, b), mtjax.task_grads(loss, has_aux=True, sparse=False)(p, b))

  ((losses, _), g), ((losses_d, _), g_d) = jax.jit(both, compiler_options=FAST_COMPILE)(params, batch)
  np.testing.assert_allclose(np.asarray(losses), np.asarray(losses_d), rtol=1e-6)
  paths = _paths(g)
  tables = [p for p in paths if "/embed_" in p or p.startswith("embed_")]
  assert len(tables) == 2, paths
  for path, leaf in zip(paths, jax.tree.leaves(g, is_leaf=is_sparse)):
    assert is_sparse(leaf) == (path in tables), path
    assert leaf.shape[0] == 2
  assert not any(is_sparse(x) for x in jax.tree.leaves(g_d, is_leaf=is_sparse))
  assert_trees_close(mtjax.densify(g), g_d, 1e-5, "MMoE sparse vs dense")
  # The reserved row (user id 30) got the two out-of-vocabulary lookups.
  user = next(p for p in tables if "user" in p)
  assert np.any(np.asarray(_get(mtjax.densify(g), user))[:, 30] != 0)


def test_table_also_used_densely_is_dense():
  rng = np.random.default_rng(0)
  params = {
    "table": jnp.asarray(rng.normal(size=(V, D)), jnp.float32),
    "w": jnp.asarray(rng.normal(size=D), jnp.float32),
    "other": jnp.asarray(rng.normal(size=(V, D)), jnp.float32),
  }
  batch = {"ids": jnp.asarray([3, 7, 3, V + 1, 0], jnp.int32), "y": jnp.asarray(rng.normal(size=5), jnp.float32)}

  def loss(p, b):
    r = mtjax.embedding_lookup(p["table"], b["ids"]) @ p["w"]
    s = mtjax.embedding_lookup(p["other"], b["ids"]) @ p["w"]
    return jnp.stack([jnp.mean((r + s - b["y"]) ** 2), jnp.mean(r * s) + 0.01 * jnp.sum(p["table"] ** 2)])

  (_, g), ref = jax.jit(
    lambda p, b: (mtjax.task_grads(loss)(p, b), jax.jacrev(loss)(p, b)), compiler_options=FAST_COMPILE
  )(params, batch)
  assert isinstance(g["table"], jax.Array) and g["table"].shape == (2, V, D)
  assert is_sparse(g["other"])
  assert_trees_close(mtjax.densify(g), ref, 1e-5, "table used densely")


def test_fit_mmoe_with_categorical_features_and_pcgrad():
  ds = mtjax.data.conflicting_tasks(num_samples=512, seed=0)
  assert ds.spec.categorical
  model = mtjax.models.MMoE(num_tasks=3, num_experts=2, expert=(8,), tower=(4, 1), features=ds.spec)
  tx = optax.chain(mtjax.pcgrad(key=0, num_tasks=3), optax.adam(3e-2))
  res = mtjax.training.fit(model, tx, ds, steps=20, batch_size=128, log_every=1, progress=False)
  losses = np.array([r["losses"] for r in res.history])
  assert losses.shape == (20, 3) and np.all(np.isfinite(losses))
  assert losses[-5:].mean() < losses[:5].mean(), losses
  # The tables moved (their sparse gradients reached the optimizer).
  init = mtjax.training.init_state(model, tx, ds.batch(np.arange(128))["x"], seed=0)
  moved = [
    p
    for p, a, b in zip(_paths(res.state.params), jax.tree.leaves(res.state.params), jax.tree.leaves(init.params))
    if "embed_" in p and not np.allclose(a, b)
  ]
  assert len(moved) == len(ds.spec.categorical), moved
