"""DeepMCP (Ouyang et al., SIGIR 2019): the three subnets against NumPy float64, and who trains what:
the matching and correlation losses reach the shared embedding but never the prediction MLP."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtjax import losses
from mtjax import models

SPEC = models.FeatureSpec(
  categorical=(models.Categorical("user", 7, 3), models.Categorical("item", 9, 3), models.Categorical("cat", 4, 2)),
  sequences=(models.IdSequence("history", 9, 3, max_len=4, table="item"),),
)


def _batch(seed=0, b=6):
  rng = np.random.default_rng(seed)
  lengths = rng.integers(0, 5, b)
  lengths[0] = 4
  return {
    "user": jnp.asarray(rng.integers(0, 7, b)),
    "item": jnp.asarray(rng.integers(0, 9, b)),
    "cat": jnp.asarray(rng.integers(0, 4, b)),
    "history": jnp.asarray(np.where(np.arange(4)[None] < lengths[:, None], rng.integers(0, 9, (b, 4)), -1)),
  }


def _model(**kw):
  cfg = dict(features=SPEC, item_fields=("item", "cat"), prediction=(5, 1), matching=(4,), correlation_weight=0.3,
             num_negatives=2)  # fmt: skip
  return models.DeepMCP(**{**cfg, **kw})


def _np_mlp(p, h):
  n = len(p)
  for i in range(n):
    h = h @ p[f"Dense_{i}"]["kernel"] + p[f"Dense_{i}"]["bias"]
    if i < n - 1:
      h = np.maximum(h, 0.0)
  return h


def test_matches_numpy_float64():
  with jax.enable_x64(True):
    model, x = _model(), _batch()
    shapes = jax.eval_shape(model.init, jax.random.key(0), x)["params"]
    rng = np.random.default_rng(1)
    params = jax.tree.map(lambda a: jnp.asarray(rng.normal(0, 0.6, a.shape), jnp.float64), shapes)
    out, aux = model.apply({"params": params}, x)
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    emb = p["input"]["embedding"]
    look = lambda t, ids: emb[t]["embedding"][np.asarray(ids)]  # noqa: E731
    hist = np.asarray(x["history"])
    m = hist >= 0
    ctx = np.where(m[..., None], look("embed_item", np.maximum(hist, 0)), 0.0)
    pooled = ctx.sum(1) / np.maximum(m.sum(1, keepdims=True), 1)
    user, item, cat = look("embed_user", x["user"]), look("embed_item", x["item"]), look("embed_cat", x["cat"])
    h = np.concatenate([user, item, cat, pooled], -1)
    np.testing.assert_allclose(out[0], _np_mlp(p["prediction"], h)[:, 0], rtol=1e-12)
    u = _np_mlp(p["matching_user"], user)
    v = _np_mlp(p["matching_item"], np.concatenate([item, cat], -1))
    np.testing.assert_allclose(out[1], np.sum(u * v, -1), rtol=1e-12)
    logsig = lambda z: -np.logaddexp(0.0, -z)  # noqa: E731
    total, pairs = 0.0, 0
    for b in range(6):
      for t in range(4):
        if not m[b, t]:
          continue
        term = logsig(item[b] @ ctx[b, t]) + sum(logsig(-(item[(b - k) % 6] @ ctx[b, t])) for k in (1, 2))
        total, pairs = total - term, pairs + 1
    np.testing.assert_allclose(aux["correlation_loss"], total / pairs, rtol=1e-12)
    np.testing.assert_allclose(aux["regularization"], [0.0, 0.3 * total / pairs], rtol=1e-12)


def test_auxiliary_losses_reach_the_embedding_not_the_prediction_mlp():
  model, x = _model(), _batch(seed=2)
  params = model.init(jax.random.key(0), x)["params"]

  def norm(tree):
    return float(sum(jnp.abs(v).sum() for v in jax.tree.leaves(tree)))

  g_match = jax.grad(lambda p: model.apply({"params": p}, x)[0][1].sum())(params)
  g_corr = jax.grad(lambda p: model.apply({"params": p}, x)[1]["correlation_loss"])(params)
  g_pred = jax.grad(lambda p: model.apply({"params": p}, x)[0][0].sum())(params)
  for g in (g_match, g_corr):
    assert norm(g["prediction"]) == 0.0
    assert norm(g["input"]["embedding"]["embed_item"]) > 0.0
  assert norm(g_match["matching_user"]) > 0 and norm(g_corr["matching_user"]) == 0  # correlation: embeddings only
  assert norm(g_pred["matching_user"]) == 0 and norm(g_pred["prediction"]) > 0
  # through make_loss_fn the correlation loss joins the matching task's loss
  labels = jnp.asarray(np.stack([np.arange(6) % 2] * 2), jnp.float32)
  fn = losses.make_loss_fn(model, "bce", has_aux=False)
  out, aux = model.apply({"params": params}, x)
  np.testing.assert_allclose(
    fn(params, {"x": x, "labels": labels}), losses.per_task_loss(out, labels) + aux["regularization"], rtol=1e-6
  )
  mask = models.partition(model)(params)
  assert not mask["prediction"]["Dense_0"]["kernel"] and not mask["matching_user"]["Dense_0"]["kernel"]
  assert mask["input"]["embedding"]["embed_item"]["embedding"]
  off = _model(correlation_weight=0.0).apply({"params": params}, x)[1]
  assert float(off["correlation_loss"]) == 0.0


def test_errors():
  x = _batch()
  with pytest.raises(ValueError, match="must be an IdSequence sharing the table"):
    _model(context_field="cat").init(jax.random.key(0), x)
  with pytest.raises(ValueError, match="item_field 'cat2' must be a categorical field"):
    _model(item_field="cat2").init(jax.random.key(0), x)
  with pytest.raises(ValueError, match="user_fields"):
    _model(user_fields=()).init(jax.random.key(0), x)
  assert _model(context_field=None).apply(_model(context_field=None).init(jax.random.key(0), x), x)[0].shape == (2, 6)
