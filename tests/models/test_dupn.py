"""Sequence features (IdSequence) and DUPN (Ni et al., KDD 2018): padding, pooling, table sharing and
the out-of-vocabulary policy of sequences; DUPN against a NumPy float64 forward (masked LSTM,
attention, user representation, towers); padding invariance through outputs and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mtjax
from mtjax import data
from mtjax import models

SPEC = models.FeatureSpec(
  categorical=(models.Categorical("user", 7, 3), models.Categorical("item", 9, 3), models.Categorical("cat", 4, 2)),
  sequences=(
    models.IdSequence("hist_item", 9, 3, max_len=6, table="item"),
    models.IdSequence("hist_cat", 4, 2, max_len=6),
  ),
)


def _batch(seed=0, b=5, length=4):
  rng = np.random.default_rng(seed)
  lengths = rng.integers(0, length + 1, b)
  lengths[0] = length  # one full, and (likely) one empty history
  lengths[1] = 0
  steps = np.arange(length)[None, :] < lengths[:, None]
  return {
    "user": jnp.asarray(rng.integers(0, 7, b)),
    "item": jnp.asarray(rng.integers(0, 9, b)),
    "cat": jnp.asarray(rng.integers(0, 4, b)),
    "hist_item": jnp.asarray(np.where(steps, rng.integers(0, 9, (b, length)), -1)),
    "hist_cat": jnp.asarray(np.where(steps, rng.integers(0, 4, (b, length)), -1)),
  }


def test_sequence_fields_pool_share_tables_and_ignore_padding():
  fe = models.FeatureEmbedding(SPEC)
  x = _batch()
  variables = fe.init(jax.random.key(0), x)
  assert set(variables["params"]) == {"embed_user", "embed_item", "embed_cat", "embed_hist_cat"}  # item shared
  flat, fields = fe.apply(variables, x)
  assert flat.shape == (5, SPEC.output_dim) == (5, 3 + 3 + 2 + 3 + 2)
  table = np.asarray(variables["params"]["embed_item"]["embedding"])
  ids, m = np.asarray(x["hist_item"]), np.asarray(x["hist_item"]) >= 0
  e = np.where(m[..., None], table[np.where(m, ids, 0)], 0.0)
  np.testing.assert_allclose(fields[models.sequence_key("hist_item")], e, rtol=1e-6)
  np.testing.assert_array_equal(fields[models.mask_key("hist_item")], m.astype(np.float32))
  mean = e.sum(1) / np.maximum(m.sum(1, keepdims=True), 1)
  np.testing.assert_allclose(fields["hist_item"], mean, rtol=1e-6, atol=1e-7)
  assert np.all(np.asarray(fields["hist_item"])[1] == 0.0)  # an empty history pools to zero
  # padding gets no gradient; an unknown id (>= vocab) is the reserved row
  g = jax.grad(lambda p: fe.apply({"params": p}, x)[0].sum())(variables["params"])
  used = np.unique(np.concatenate([np.asarray(x["item"]), ids[m]]))
  rows = np.flatnonzero(np.abs(np.asarray(g["embed_item"]["embedding"])).sum(1))
  np.testing.assert_array_equal(rows, used)
  unk = fe.apply(variables, {**x, "hist_item": x["hist_item"].at[0, 0].set(20)})[1][models.sequence_key("hist_item")]
  np.testing.assert_allclose(unk[0, 0], table[9], rtol=1e-6)
  strict = models.FeatureEmbedding(models.FeatureSpec(SPEC.categorical, (), "error", SPEC.sequences))
  with pytest.raises(ValueError, match="feature 'hist_item' has ids >= 9"):
    strict.apply(variables, {**x, "hist_item": x["hist_item"].at[0, 0].set(20)})
  with pytest.raises(ValueError, match="length 7 > max_len 6"):
    fe.apply(variables, {**x, "hist_cat": jnp.zeros((5, 7), jnp.int32)})
  with pytest.raises(ValueError, match="same vocab_size and embed_dim"):
    models.FeatureSpec(SPEC.categorical, sequences=(models.IdSequence("h", 9, 4, table="item"),))
  with pytest.raises(ValueError, match="pooling must be 'mean' or 'sum'"):
    models.IdSequence("h", 9, pooling="max")


def _np_forward(p, x, lstm_dim):
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), p)
  emb = p["input"]["embedding"]
  look = lambda t, ids: np.where((ids >= 0)[..., None], emb[t]["embedding"][np.maximum(ids, 0)], 0.0)  # noqa: E731
  ids_i, ids_c = np.asarray(x["hist_item"]), np.asarray(x["hist_cat"])
  xs = np.concatenate([look("embed_item", ids_i), look("embed_hist_cat", ids_c)], -1)
  mask = (ids_i >= 0).astype(np.float64)
  u = emb["embed_user"]["embedding"][np.asarray(x["user"])]
  b, length, _ = xs.shape
  h = np.zeros((b, lstm_dim))
  c = np.zeros((b, lstm_dim))
  sig = lambda z: 1 / (1 + np.exp(-z))  # noqa: E731
  hs = []
  for t in range(length):
    z = np.concatenate([xs[:, t], h], -1) @ p["lstm_kernel"] + p["lstm_bias"]
    i, f, g, o = np.split(z, 4, -1)
    c_new = sig(f) * c + sig(i) * np.tanh(g)
    h_new = sig(o) * np.tanh(c_new)
    m = mask[:, t : t + 1]
    h, c = m * h_new + (1 - m) * h, m * c_new + (1 - m) * c
    hs.append(h)
  hs = np.stack(hs, 1)
  pre = (
    hs @ p["attention_hidden"]["kernel"] + (u @ p["attention_user"]["kernel"] + p["attention_user"]["bias"])[:, None]
  )
  scores = (np.tanh(pre) @ p["attention_score"]["kernel"])[..., 0]
  att = np.zeros_like(scores)
  for i in range(b):
    v = mask[i] > 0
    if v.any():
      e = np.exp(scores[i, v] - scores[i, v].max())
      att[i, v] = e / e.sum()
  context = np.einsum("bl,blh->bh", att, hs)
  r = np.maximum(np.concatenate([context, u], -1) @ p["representation"]["kernel"] + p["representation"]["bias"], 0)
  q = emb["embed_item"]["embedding"][np.asarray(x["item"])]
  out = [
    (np.concatenate([r, q], -1) @ p[f"tower_{t}"]["Dense_0"]["kernel"] + p[f"tower_{t}"]["Dense_0"]["bias"])[:, 0]
    for t in range(2)
  ]
  return np.stack(out), att


def _model():
  return models.DUPN(
    num_tasks=2,
    features=SPEC,
    behavior_fields=("hist_item", "hist_cat"),
    user_fields=("user",),
    item_fields=("item",),
    lstm=5,
    attention=4,
    representation_dim=6,
    tower=(1,),
  )


def test_dupn_matches_numpy_float64():
  with jax.enable_x64(True):
    model, x = _model(), _batch()
    shapes = jax.eval_shape(model.init, jax.random.key(0), x)["params"]
    rng = np.random.default_rng(1)
    params = jax.tree.map(lambda a: jnp.asarray(rng.normal(0, 0.6, a.shape), jnp.float64), shapes)
    got, aux = model.apply({"params": params}, x)
    want, att = _np_forward(params, x, 5)
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(aux["attention"], att, rtol=1e-10, atol=1e-12)
    assert np.all(np.asarray(aux["attention"])[1] == 0.0)  # the empty history


def test_dupn_padding_changes_nothing():
  model, x = _model(), _batch()
  params = model.init(jax.random.key(0), x)["params"]
  out, _ = model.apply({"params": params}, x)
  pad = {k: (jnp.pad(v, ((0, 0), (0, 2)), constant_values=-1) if k.startswith("hist") else v) for k, v in x.items()}
  np.testing.assert_allclose(model.apply({"params": params}, pad)[0], out, rtol=1e-5, atol=1e-6)
  # a different id behind the padding (negative) changes nothing either
  other = {**x, "hist_cat": jnp.where(x["hist_cat"] < 0, -7, x["hist_cat"])}
  np.testing.assert_array_equal(model.apply({"params": params}, other)[0], out)


def test_dupn_trains_with_pcgrad_through_fit():
  rng = np.random.default_rng(3)
  n, length = 400, 5
  lengths = rng.integers(1, length + 1, n)
  steps = np.arange(length)[None] < lengths[:, None]
  hist = np.where(steps, rng.integers(0, 9, (n, length)), -1)
  item = rng.integers(0, 9, n)
  hist_cat = np.where(steps, rng.integers(0, 4, (n, length)), -1)
  user = rng.integers(0, 7, n)
  # click: the first behaviour's category (read through the LSTM and the attention); like: the user
  labels = np.stack([hist_cat[:, 0] >= 2, user >= 4]).astype(np.float32)
  ds = data.MultiTaskDataset(
    features={
      "user": user.astype(np.int32),
      "item": item.astype(np.int32),
      "cat": rng.integers(0, 4, n).astype(np.int32),
      "hist_item": hist.astype(np.int32),
      "hist_cat": hist_cat.astype(np.int32),
    },
    labels=labels,
    task_names=("click", "like"),
    spec=SPEC,
  )
  model = _model()
  import optax

  res = mtjax.training.fit(
    model, optax.chain(mtjax.pcgrad(num_tasks=2, key=0), optax.adam(0.03)), ds, steps=200, batch_size=64,
    progress=False, track_similarity=False, log_every=5,
  )  # fmt: skip
  curve = np.asarray([h["losses"] for h in res.history])
  first, last = curve[:3].mean(0), curve[-3:].mean(0)
  assert np.all(last < 0.7 * first), (first, last)


def test_dupn_errors():
  x = _batch()
  with pytest.raises(ValueError, match="must name IdSequence fields"):
    models.DUPN(num_tasks=2, features=SPEC, behavior_fields=("item",)).init(jax.random.key(0), x)
  with pytest.raises(ValueError, match="must be non-sequence fields"):
    models.DUPN(num_tasks=2, features=SPEC, behavior_fields=("hist_item",), user_fields=("hist_cat",)).init(
      jax.random.key(0), x
    )
  with pytest.raises(ValueError, match="needs features=FeatureSpec"):
    models.DUPN(num_tasks=2).init(jax.random.key(0), jnp.ones((2, 3)))


def test_sequence_lookups_keep_exact_sparse_rows():
  """The history shares the item table: task_grads' sparse rows (the default) equal the dense per-task
  gradient, padding included (it looks up past the table: no row, no gradient)."""
  from mtjax import losses

  model, x = _model(), _batch(seed=4, b=6)
  params = model.init(jax.random.key(0), x)["params"]
  labels = jnp.asarray(np.random.default_rng(5).random((2, 6)) < 0.5, jnp.float32)
  loss = losses.make_loss_fn(model, "bce", has_aux=False)
  batch = {"x": x, "labels": labels}
  _, sparse = mtjax.task_grads(loss)(params, batch)
  _, dense = mtjax.task_grads(loss, sparse=False)(params, batch)
  table = sparse["input"]["embedding"]["embed_item"]["embedding"]
  assert type(table).__name__ == "SparseRows"
  np.testing.assert_allclose(
    mtjax.densify(table), dense["input"]["embedding"]["embed_item"]["embedding"], rtol=1e-5, atol=1e-7
  )
