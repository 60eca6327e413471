"""The YouTube multitask ranker (Zhao et al., RecSys 2019): a NumPy float64 forward reference, the
structural facts of the shallow tower through gradients, position dropout, serving, errors, and
``position_bias_synthetic``'s ground truth."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import mtjax
from mtjax import data
from mtjax import losses
from mtjax import models

SPEC = models.FeatureSpec(
  categorical=(
    models.Categorical("user", 7, 3),
    models.Categorical("item", 9, 3),
    models.Categorical("position", 5, 2),
    models.Categorical("device", 2, 2),
  ),
  dense=(models.Dense("dense", 2),),
)
BIAS = ("position", "device")
B = 6


def _model(**kw):
  cfg = dict(
    num_tasks=3,
    features=SPEC,
    bias_features=BIAS,
    engagement_tasks=(0, 2),
    num_experts=2,
    expert=(5,),
    tower=(4, 1),
    shallow_tower=(3, 1),
  )
  return models.YouTubeRanker(**{**cfg, **kw})


def _batch(seed=0, n=B):
  rng = np.random.default_rng(seed)
  return {
    "user": jnp.asarray(rng.integers(0, 7, n)),
    "item": jnp.asarray(rng.integers(0, 9, n)),
    "position": jnp.asarray(rng.integers(0, 5, n)),
    "device": jnp.asarray(rng.integers(0, 2, n)),
    "dense": jnp.asarray(rng.normal(size=(n, 2)), jnp.float32),
  }


def _random_params(model, x, dtype=jnp.float32, seed=1):
  shapes = jax.eval_shape(model.init, jax.random.key(0), x)["params"]
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda a: jnp.asarray(rng.normal(0, 0.7, a.shape), dtype), shapes)


def _np_mlp(p, h, *, activate_last):
  n = len(p)
  for i in range(n):
    h = h @ p[f"Dense_{i}"]["kernel"] + p[f"Dense_{i}"]["bias"]
    if i < n - 1 or activate_last:
      h = np.maximum(h, 0.0)
  return h


def _np_forward(params, x, *, engaged, serving):
  """The paper's model in float64 NumPy, from the parameter tree (independent of the Flax code)."""
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)

  main = np.concatenate(
    [
      p["input"]["embedding"]["embed_user"]["embedding"][np.asarray(x["user"])],
      p["input"]["embedding"]["embed_item"]["embedding"][np.asarray(x["item"])],
      np.asarray(x["dense"], np.float64),
    ],
    axis=1,
  )
  experts = np.stack([_np_mlp(p["experts"][f"expert_{e}"], main, activate_last=True) for e in range(2)])
  bias = np.concatenate(
    [
      p["bias_input"]["embed_position"]["embedding"][np.asarray(x["position"])],
      p["bias_input"]["embed_device"]["embedding"][np.asarray(x["device"])],
    ],
    axis=1,
  )
  shift = _np_mlp(p["shallow_tower"], bias, activate_last=False)[:, 0]
  out = []
  for k in range(3):
    logits = main @ p[f"gate_{k}"]["logits"]["kernel"]
    g = np.exp(logits - logits.max(1, keepdims=True))
    g /= g.sum(1, keepdims=True)
    mixed = np.einsum("be,ebh->bh", g, experts)
    y = _np_mlp(p[f"tower_{k}"], mixed, activate_last=False)[:, 0]
    out.append(y + shift if (k in engaged and not serving) else y)
  return np.stack(out), shift


def test_forward_matches_numpy_float64_reference():
  with jax.enable_x64(True):
    model, x = _model(), _batch()
    params = _random_params(model, x, jnp.float64)
    for serving in (False, True):
      got, aux = model.apply({"params": params}, x, serving=serving)
      want, shift = _np_forward(params, x, engaged=(0, 2), serving=serving)
      np.testing.assert_allclose(np.asarray(got), want, rtol=1e-12, atol=1e-12)
      np.testing.assert_allclose(np.asarray(aux["bias_logit"]), 0.0 if serving else shift, rtol=1e-12, atol=1e-12)
      want_main, _ = _np_forward(params, x, engaged=(0, 2), serving=True)
      np.testing.assert_allclose(np.asarray(aux["debiased"]), want_main, rtol=1e-12, atol=1e-12)


def test_shapes_aux_registry_and_serving_without_bias_features():
  model, x = _model(), _batch()
  variables = model.init(jax.random.key(0), x)
  out, aux = model.apply(variables, x)
  assert out.shape == (3, B) and aux["gates"].shape == (3, B, 2) and aux["expert_outputs"].shape == (2, B, 5)
  assert aux["bias_logit"].shape == (B,) and aux["debiased"].shape == (3, B)
  main_only = {k: v for k, v in x.items() if k not in BIAS}
  served, _ = model.apply(variables, main_only, serving=True)  # serving needs no bias feature
  np.testing.assert_allclose(served, aux["debiased"], rtol=1e-6)
  served2, _ = _model(serving=True).apply(variables, main_only)  # the attribute does the same
  np.testing.assert_array_equal(served, served2)
  assert type(models.get("youtube", num_tasks=2, features=SPEC, bias_features=BIAS)) is models.YouTubeRanker


def test_shallow_tower_reaches_only_engagement_logits_and_gets_no_gradient_at_serving():
  model, x = _model(), _batch()
  params = _random_params(model, x)

  def output_grads(k, serving):
    return jax.grad(lambda p: jnp.sum(model.apply({"params": p}, x, serving=serving)[0][k]))(params)

  def norm(tree):
    return float(sum(jnp.sum(jnp.abs(leaf)) for leaf in jax.tree.leaves(tree)))

  for k in range(3):
    g = output_grads(k, serving=False)
    bias_part = norm(g["shallow_tower"]) + norm(g["bias_input"])
    if k in (0, 2):  # engagement: the bias features and the shallow tower reach the logit
      assert bias_part > 1e-3
    else:  # satisfaction: exactly nothing
      assert bias_part == 0.0
    served = output_grads(k, serving=True)
    assert "shallow_tower" not in served or norm(served["shallow_tower"]) == 0.0
    assert norm(served.get("bias_input", {})) == 0.0

  # The bias features change only the engagement logits; the main features change every task.
  out, _ = model.apply({"params": params}, x)
  moved, _ = model.apply({"params": params}, {**x, "position": (x["position"] + 1) % 5})
  diff = np.abs(np.asarray(moved - out)).max(axis=1)
  assert diff[0] > 1e-4 and diff[2] > 1e-4 and diff[1] == 0.0


def test_position_dropout_replaces_about_ten_percent_with_the_missing_row():
  model = _model(position_dropout=0.1)
  n = 4000
  x = _batch(seed=3, n=n)
  params = _random_params(model, x)
  train_bias = model.apply({"params": params}, x, train=True, rngs={"dropout": jax.random.key(7)})[1]["bias_logit"]
  kept = model.apply({"params": params}, x)[1]["bias_logit"]
  missing = model.apply({"params": params}, {**x, "position": jnp.full(n, 5)})[1]["bias_logit"]  # the reserved id
  is_kept = np.isclose(train_bias, kept, rtol=1e-6, atol=1e-7)
  is_missing = np.isclose(train_bias, missing, rtol=1e-6, atol=1e-7)
  assert np.all(is_kept | is_missing)
  dropped = np.mean(is_missing & ~is_kept)
  assert abs(dropped - 0.1) < 4 * np.sqrt(0.1 * 0.9 / n), dropped  # binomial, 4 standard deviations
  # Different keys drop different samples; eval never drops; the device is never dropped.
  other = model.apply({"params": params}, x, train=True, rngs={"dropout": jax.random.key(8)})[1]["bias_logit"]
  assert not np.allclose(other, train_bias)
  with pytest.raises(ValueError, match="pass a 'dropout' RNG"):
    model.apply({"params": params}, x, train=True)
  assert _model(position_dropout=0.0).apply({"params": params}, x, train=True)[0].shape == (3, n)


def test_partition_and_representation():
  model, x = _model(), _batch()
  params = _random_params(model, x)
  mask = models.partition(model)(params)
  assert mask["shallow_tower"]["Dense_0"]["kernel"] and mask["bias_input"]["embed_position"]["embedding"]
  assert not mask["gate_0"]["logits"]["kernel"] and not mask["tower_1"]["Dense_0"]["kernel"]
  one = _model(engagement_tasks=(1,))  # one engagement task alone trains the shallow tower
  mask1 = models.partition(one)(params)
  assert not mask1["shallow_tower"]["Dense_0"]["kernel"] and not mask1["bias_input"]["embed_device"]["embedding"]
  assert mask1["experts"]["expert_0"]["Dense_0"]["kernel"]
  # The measured partition agrees with the declared one.
  labels = jnp.asarray(np.random.default_rng(0).random((3, B)) < 0.5, jnp.float32)
  loss = losses.make_loss_fn(one, "bce", has_aux=False)
  measured = mtjax.infer_shared(loss, params, {"x": x, "labels": labels})
  assert jax.tree.leaves(measured) == jax.tree.leaves(mask1)


@pytest.mark.parametrize("engagement_tasks", [None, (1,)])
def test_fit_trains_with_dropout_and_every_strategy_agrees(engagement_tasks):
  ds = data.position_bias_synthetic(600, num_users=20, num_items=30, seed=0, embed_dim=3)
  model = models.YouTubeRanker(
    num_tasks=2,
    features=ds.spec,
    bias_features=("position", "device"),
    engagement_tasks=engagement_tasks,
    num_experts=2,
    expert=(6,),
    tower=(4, 1),
  )
  x = {k: jnp.asarray(v[:32]) for k, v in ds.features.items()}
  params = _random_params(model, x)
  batch = {"x": x, "labels": jnp.asarray(ds.labels[:, :32])}
  loss = losses.make_loss_fn(model, "bce", has_aux=False, train=True)
  key = jax.random.key(0)
  tx = mtjax.mgda(num_tasks=2, shared=models.partition(model))
  updates = []
  for strategy in ("loop", "shared"):
    _, jac = mtjax.task_grads(loss, strategy=strategy)(params, batch, {"dropout": key})
    updates.append(tx.update(jac, tx.init(params), params)[0])
  for a, b in zip(jax.tree.leaves(updates[0]), jax.tree.leaves(updates[1])):
    np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-6)
  fit = mtjax.training.fit(
    model,
    optax.chain(mtjax.pcgrad(num_tasks=2, key=0), optax.adam(1e-2)),
    ds,
    steps=60,
    batch_size=64,
    progress=False,
    track_similarity=False,
    log_every=10,
  )
  first, last = fit.history[0]["losses"], fit.history[-1]["losses"]
  assert np.all(np.asarray(last) < np.asarray(first))


@pytest.mark.parametrize(
  "kw, match",
  [
    (dict(bias_features=("pos",), position_feature=None), r"field\(s\) \['pos'\] are not in the feature spec"),
    (dict(bias_features=()), "needs bias_features"),
    (dict(position_feature="user"), "must be one of bias_features"),
    (dict(engagement_tasks=(3,)), r"engagement_tasks must be distinct task indices in \[0, 3\)"),
    (dict(engagement_tasks=(0, 0)), "distinct"),
    (dict(position_dropout=1.0), r"position_dropout must be in \[0, 1\)"),
    (dict(shallow_tower=(4,)), "shallow_tower must be widths ending in 1"),
    (dict(features=None), "needs features=FeatureSpec"),
    (
      dict(bias_features=("user", "item", "position", "device", "dense")),
      "the main model has no input",
    ),
  ],
)
def test_bad_configurations_raise(kw, match):
  with pytest.raises(ValueError, match=match):
    _model(**kw).init(jax.random.key(0), _batch())


def test_bad_batches_raise():
  model, x = _model(), _batch()
  variables = model.init(jax.random.key(0), x)
  with pytest.raises(ValueError, match=r"lacks bias feature\(s\) \['device'\].*serving=True"):
    model.apply(variables, {k: v for k, v in x.items() if k != "device"})
  strict = _model(features=models.FeatureSpec(SPEC.categorical, SPEC.dense, oov="error"))
  with pytest.raises(ValueError, match="feature 'position' has ids outside"):
    strict.apply(variables, {**x, "position": x["position"].at[0].set(9)})
  # reserved (the default): an unknown position is the missing one
  a = model.apply(variables, {**x, "position": x["position"].at[0].set(9)})[1]["bias_logit"]
  b = model.apply(variables, {**x, "position": x["position"].at[0].set(5)})[1]["bias_logit"]
  assert float(a[0]) == float(b[0])


def test_position_bias_synthetic_ground_truth():
  ds = data.position_bias_synthetic(20000, seed=1)
  f, e = ds.features, ds.extras
  assert abs(ds.labels[0].mean() - 0.2) < 0.015 and abs(ds.labels[1].mean() - 0.3) < 0.015
  md = ds.metadata
  b_click = md["intercepts"][0]
  slope = md["position_bias"] * (1.0 + md["device_effect"] * f["device"])  # two devices
  logit_unbiased = np.log(e["unbiased_ctr"]) - np.log1p(-e["unbiased_ctr"])
  logit_logged = np.log(e["true_ctr"]) - np.log1p(-e["true_ctr"])
  # The logged click logit is the unbiased one minus the position slope of the device (the formula).
  np.testing.assert_allclose(logit_unbiased - logit_logged, slope * f["position"], atol=2e-4)
  np.testing.assert_allclose(logit_unbiased, b_click + md["signal"] * e["relevance"], atol=2e-4)
  # The earlier ranker put promoted items higher (position 0 at the top), unrelated to relevance.
  assert np.corrcoef(e["promotion"], f["position"])[0, 1] < -0.5
  assert abs(np.corrcoef(e["promotion"], e["relevance"])[0, 1]) < 0.05
  # Clicks fall with the position; satisfaction does not depend on it.
  ctr = [ds.labels[0][f["position"] == p].mean() for p in range(8)]
  assert all(a > b for a, b in zip(ctr, ctr[1:]))
  sat_logit = np.log(e["true_satisfaction"]) - np.log1p(-e["true_satisfaction"])
  assert abs(np.corrcoef(sat_logit - md["signal"] * 0.6 * e["relevance"], f["position"])[0, 1]) < 0.05
  # The counterfactual clicks follow the unbiased CTR.
  assert abs(e["unbiased_click"].mean() - e["unbiased_ctr"].mean()) < 0.01
  same = data.position_bias_synthetic(20000, seed=1)
  assert all(np.array_equal(f[k], same.features[k]) for k in f)
  with pytest.raises(ValueError, match="click_rate"):
    data.position_bias_synthetic(10, click_rate=1.5)
  with pytest.raises(ValueError, match=">= 0"):
    data.position_bias_synthetic(10, promotion=-1.0)
