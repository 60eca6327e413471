"""ESMM, ESM^2 and AITM: shapes, gradient structure, log-space losses vs float64 NumPy references."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import mtjax
from mtjax import losses as losses_lib
from mtjax.losses import _funnel
from mtjax.models import _aitm
from mtjax.models import _esmm
from mtjax.models._features import Categorical
from mtjax.models._features import Dense
from mtjax.models._features import FeatureSpec

B = 6
SPECS = {
  "categorical": FeatureSpec(categorical=(Categorical("user", 7, 4), Categorical("item", 9, 3))),
  "mixed": FeatureSpec(categorical=(Categorical("user", 5, 4),), dense=(Dense("price"), Dense("stats", 3))),
}


def _batch(spec, key):
  keys = jax.random.split(key, len(spec.names))
  out = {}
  for k, f in zip(keys, spec.categorical):
    out[f.name] = jax.random.randint(k, (B,), 0, f.vocab_size + 2)  # includes out-of-vocabulary ids
  for k, f in zip(keys[len(spec.categorical) :], spec.dense):
    out[f.name] = jax.random.normal(k, (B, f.dim) if f.dim > 1 else (B,))
  return out


def _sigmoid(x):
  return 1.0 / (1.0 + np.exp(-x))


def _bce_np(y, p):
  return -(y * np.log(p) + (1 - y) * np.log(1 - p))


MODELS = {
  "esmm": (lambda spec: _esmm.ESMM(tower=(8, 1), features=spec, dropout=0.2), 2),
  "esm2": (lambda spec: _esmm.ESM2(tower=(8, 1), features=spec, bottom=(8,), dropout=0.2), 3),
  "aitm": (
    lambda spec: _aitm.AITM(num_tasks=3, tower=(8, 4), transfer=(4,), head=(4, 1), features=spec, dropout=0.2),
    3,
  ),
}


@pytest.mark.parametrize(
  "name,spec_name", [(n, s) for n in sorted(MODELS) for s in ("categorical", "mixed")] + [("esmm", "dense")]
)
def test_shapes_and_dtypes(name, spec_name):
  make, num_out = MODELS[name]
  if spec_name == "dense":
    model, x = make(None), jax.random.normal(jax.random.key(1), (B, 5))
  else:
    model, x = make(SPECS[spec_name]), _batch(SPECS[spec_name], jax.random.key(1))
  variables = model.init(jax.random.key(0), x)
  eval_out, eval_aux = model.apply(variables, x)
  train_out, _ = model.apply(variables, x, train=True, rngs={"dropout": jax.random.key(2)})
  for out in (eval_out, train_out):
    assert out.shape == (num_out, B) and out.dtype == jnp.float32
    assert bool(jnp.all(jnp.isfinite(out)))
  assert not np.allclose(eval_out, train_out)  # dropout is active in training only
  np.testing.assert_array_equal(eval_out, model.apply(variables, x)[0])
  if name == "esmm":
    assert {k: v.shape for k, v in eval_aux.items()} == {
      **{k: (B,) for k in ("log_p_ctr", "log_p_cvr", "log_p_ctcvr")},
      "task_log_probs": (2, B),
    }
    # Evaluation scores the supervised events: pCTR and pCTCVR.
    np.testing.assert_array_equal(
      eval_aux["task_log_probs"], np.stack([eval_aux["log_p_ctr"], eval_aux["log_p_ctcvr"]])
    )
  elif name == "esm2":
    assert eval_aux["head_logits"].shape == (4, B)
  else:
    assert eval_aux["attention"].shape == (2, B, 2)


def test_esmm_cvr_tower_trained_only_through_ctcvr():
  model = _esmm.ESMM(tower=(8, 1))
  x = jax.random.normal(jax.random.key(0), (16, 5))
  click = (jnp.arange(16) % 2).astype(jnp.float32)
  conv = (jnp.arange(16) % 4 == 1).astype(jnp.float32)
  labels = jnp.stack([click, conv])
  params = model.init(jax.random.key(1), x)["params"]

  def task_loss(p, t):
    return _funnel.esmm_loss(model.apply({"params": p}, x)[0], labels)[t]

  g_ctr = jax.grad(task_loss)(params, 0)
  g_ctcvr = jax.grad(task_loss)(params, 1)
  leaves = lambda g, tower: jax.tree_util.tree_leaves(g[tower])
  assert all(np.all(np.asarray(v) == 0) for v in leaves(g_ctr, "tower_cvr"))  # CTR loss: no CVR gradient
  assert any(np.any(np.asarray(v) != 0) for v in leaves(g_ctr, "tower_ctr"))
  assert all(np.linalg.norm(np.asarray(v)) > 0 for v in leaves(g_ctcvr, "tower_cvr"))
  assert any(np.any(np.asarray(v) != 0) for v in leaves(g_ctcvr, "tower_ctr"))

  # The gradient w.r.t. the CVR logit is exactly the CTCVR term's (float64 NumPy): no pCVR loss.
  logits = model.apply({"params": params}, x)[0]
  g_logits = jax.grad(lambda lg: jnp.sum(_funnel.esmm_loss(lg, labels)))(logits)
  a, b = np.asarray(logits, np.float64)
  y = np.asarray(click * conv, np.float64)
  sa, sb = _sigmoid(a), _sigmoid(b)
  ref = -(y * (1 - sb) - (1 - y) * sa * sb * (1 - sb) / (1 - sa * sb)) / len(y)
  np.testing.assert_allclose(g_logits[1], ref, rtol=1e-5, atol=1e-7)
  # Conversion labels of unclicked impressions never enter the loss.
  flipped = jnp.stack([click, jnp.where(click == 0, 1.0 - conv, conv)])
  np.testing.assert_array_equal(_funnel.esmm_loss(logits, labels), _funnel.esmm_loss(logits, flipped))


def _esm2_probs_np(heads):
  y1, y2, y3, y4 = (_sigmoid(h) for h in np.asarray(heads, np.float64))
  cvr = (1 - y2) * y4 + y2 * y3
  return {"ctr": y1, "ctavr": y1 * y2, "cvr": cvr, "ctcvr": y1 * cvr}


def test_esmm_and_esm2_losses_match_float64_reference():
  rng = np.random.default_rng(0)
  with jax.enable_x64(True):
    logits = rng.normal(size=(2, 40)) * 3
    labels = np.stack([rng.integers(0, 2, 40), rng.integers(0, 2, 40)]).astype(np.float64)
    mask = rng.integers(0, 2, (2, 40)).astype(np.float64)
    got = _funnel.esmm_loss(jnp.asarray(logits), jnp.asarray(labels), jnp.asarray(mask))
    pctr, pcvr = _sigmoid(logits[0]), _sigmoid(logits[1])
    y = labels[0] * labels[1]
    ref = [
      np.sum(mask[0] * _bce_np(labels[0], pctr)) / mask[0].sum(),
      np.sum(mask[1] * _bce_np(y, pctr * pcvr)) / mask[1].sum(),
    ]
    np.testing.assert_allclose(got, ref, rtol=1e-12)

    heads = rng.normal(size=(4, 40)) * 3
    labels3 = rng.integers(0, 2, (3, 40)).astype(np.float64)
    weights = (0.5, 1.0, 2.0)
    got = _funnel.esm2_loss(_funnel.esm2_composite_logits(jnp.asarray(heads)), jnp.asarray(labels3), weights=weights)
    p = _esm2_probs_np(heads)
    c = labels3[0]
    ref = [
      weights[0] * np.mean(_bce_np(c, p["ctr"])),
      weights[1] * np.mean(_bce_np(c * labels3[1], p["ctavr"])),
      weights[2] * np.mean(_bce_np(c * labels3[2], p["ctcvr"])),
    ]
    np.testing.assert_allclose(got, ref, rtol=1e-10)


def test_esm2_composite_probabilities_equal_formulas():
  model = _esmm.ESM2(tower=(8, 1))
  x = jax.random.normal(jax.random.key(0), (B, 5)) * 3
  outputs, aux = model.apply(model.init(jax.random.key(1), x), x)
  p = _esm2_probs_np(aux["head_logits"])
  for k in ("ctr", "ctavr", "cvr", "ctcvr"):
    np.testing.assert_allclose(np.exp(np.asarray(aux[f"log_p_{k}"], np.float64)), p[k], rtol=1e-5)
  for row, k in enumerate(("ctr", "ctavr", "ctcvr")):
    np.testing.assert_allclose(_sigmoid(np.asarray(outputs[row], np.float64)), p[k], rtol=1e-5)


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_losses_finite_and_accurate_for_extreme_logits(sign):
  # float32 logits of +-50: sigmoid(50) rounds to 1, so log(1 - p) must not be formed from p.
  labels2 = jnp.array([[1.0, 0.0, 1.0, 0.0], [1.0, 0.0, 0.0, 1.0]])
  logits2 = jnp.full((2, 4), 50.0 * sign)
  loss, grad = jax.value_and_grad(lambda lg: jnp.sum(_funnel.esmm_loss(lg, labels2)))(logits2)
  assert bool(jnp.isfinite(loss)) and bool(jnp.all(jnp.isfinite(grad)))
  per = _funnel.esmm_loss(logits2, labels2)
  if sign > 0:  # CTCVR label 0 on 3 of 4 samples: -log(1 - s(50)^2) = 50 - log(2) + O(e^-50)
    np.testing.assert_allclose(per[1], 0.75 * (50 - np.log(2.0)), rtol=1e-5)
  else:  # CTCVR label 1 on 1 sample: -log(s(-50)^2) = 100
    np.testing.assert_allclose(per[1], 0.25 * 100.0, rtol=1e-5)
  heads = jnp.full((4, 4), 50.0 * sign).at[1].set(-50.0 * sign)
  labels3 = jnp.array([[1.0, 0.0, 1.0, 0.0], [1.0, 0.0, 0.0, 1.0], [0.0, 1.0, 1.0, 0.0]])
  f = lambda h: jnp.sum(_funnel.esm2_loss(_funnel.esm2_composite_logits(h), labels3))
  loss, grad = jax.value_and_grad(f)(heads)
  assert bool(jnp.isfinite(loss)) and bool(jnp.all(jnp.isfinite(grad)))
  lp = _funnel.esm2_log_probs(heads)
  assert all(bool(jnp.all(jnp.isfinite(v))) for v in lp.values())


def test_aitm_attention_matches_numpy_and_sums_to_one():
  att = _aitm.AITAttention(dim=3)
  p, q = jax.random.normal(jax.random.key(0), (2, 5, 4))
  (z, w), variables = att.init_with_output(jax.random.key(1), p, q)
  prm = jax.tree_util.tree_map(lambda v: np.asarray(v, np.float64), variables["params"])
  lin = lambda name, u: u @ prm[name]["kernel"] + prm[name]["bias"]
  z_ref, w_ref = [], []
  for i in range(5):
    cands = [np.asarray(p[i], np.float64), np.asarray(q[i], np.float64)]
    s = np.array([lin("key", u) @ lin("query", u) / np.sqrt(3) for u in cands])
    wi = np.exp(s - s.max()) / np.exp(s - s.max()).sum()
    w_ref.append(wi)
    z_ref.append(sum(wi[j] * lin("value", cands[j]) for j in range(2)))
  np.testing.assert_allclose(w, np.array(w_ref), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(z, np.array(z_ref), rtol=1e-5, atol=1e-6)

  model = _aitm.AITM(num_tasks=3, tower=(8, 4))
  x = jax.random.normal(jax.random.key(2), (B, 5))
  _, aux = model.apply(model.init(jax.random.key(3), x), x)
  np.testing.assert_allclose(aux["attention"].sum(-1), np.ones((2, B)), rtol=1e-6)
  assert bool(jnp.all((aux["attention"] > 0) & (aux["attention"] < 1)))


def test_aitm_loss_and_calibrator_match_numpy():
  rng = np.random.default_rng(1)
  logits = rng.normal(size=(3, 30)).astype(np.float32) * 2
  labels = rng.integers(0, 2, (3, 30)).astype(np.float32)
  probs = _sigmoid(logits.astype(np.float64))
  calib = [0.0] + [0.6 * np.mean(np.maximum(probs[t] - probs[t - 1], 0)) for t in (1, 2)]
  np.testing.assert_allclose(_funnel.aitm_calibrator(jnp.asarray(logits)), calib, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(
    _funnel.aitm_calibrator(jnp.asarray(logits), alpha=1.0), np.array(calib) / 0.6, rtol=1e-5, atol=1e-7
  )
  bce = [np.mean(_bce_np(labels[t], probs[t])) for t in range(3)]
  np.testing.assert_allclose(
    _funnel.aitm_loss(jnp.asarray(logits), jnp.asarray(labels)), np.array(bce) + np.array(calib), rtol=1e-5
  )


@pytest.mark.parametrize("stop", [False, True])
def test_aitm_transfer_gradient_option(stop):
  model = _aitm.AITM(num_tasks=2, tower=(8, 4), stop_transfer_gradient=stop)
  x = jax.random.normal(jax.random.key(0), (B, 5))
  params = model.init(jax.random.key(1), x)["params"]
  g = jax.grad(lambda p: jnp.sum(model.apply({"params": p}, x)[0][1]))(params)
  norm = sum(float(jnp.sum(jnp.square(v))) for v in jax.tree_util.tree_leaves(g["tower_0"]))
  assert (norm == 0.0) == stop  # task 2 reaches task 1's tower only through the transfer


def _funnel_data(key, n=64, d=6):
  kx, kw = jax.random.split(key)
  x = jax.random.normal(kx, (n, d))
  w = jax.random.normal(kw, (4, d))
  s = x @ w.T
  click = (s[:, 0] > 0).astype(jnp.float32)
  act = click * (s[:, 1] > 0).astype(jnp.float32)
  buy = act * (s[:, 2] > -0.5).astype(jnp.float32)
  return x, click, act, buy


TRAIN_CASES = {
  "esmm": (_esmm.ESMM(tower=(16, 1)), lambda c, a, b: jnp.stack([c, b]), _funnel.esmm_loss),
  "esm2": (
    _esmm.ESM2(tower=(16, 1)),
    lambda c, a, b: jnp.stack([c, a, b]),
    functools.partial(_funnel.esm2_loss, weights=(1.0, 0.5, 1.0)),
  ),
  "aitm": (_aitm.AITM(num_tasks=3, tower=(16, 8)), lambda c, a, b: jnp.stack([c, a, b]), _funnel.aitm_loss),
}


@pytest.mark.parametrize("name", sorted(TRAIN_CASES))
def test_adam_lowers_the_loss(name):
  model, make_labels, loss = TRAIN_CASES[name]
  x, click, act, buy = _funnel_data(jax.random.key(0))
  labels = make_labels(click, act, buy)
  params = model.init(jax.random.key(1), x)["params"]
  tx = optax.adam(1e-2)

  def total(p):
    return jnp.sum(loss(model.apply({"params": p}, x)[0], labels))

  @jax.jit
  def run(p):
    def step(carry, _):
      p, s = carry
      g = jax.grad(total)(p)
      u, s = tx.update(g, s, p)
      return (optax.apply_updates(p, u), s), None

    (p, _), _ = jax.lax.scan(step, (p, tx.init(p)), None, length=100)
    return p

  before, after = float(total(params)), float(total(run(params)))
  assert np.isfinite(after) and after < 0.7 * before, (before, after)


def test_esmm_per_task_gradients_through_make_loss_fn():
  model = _esmm.ESMM(tower=(8, 1))
  rng = np.random.default_rng(0)
  batch = {
    "x": jnp.asarray(rng.normal(size=(16, 5)), jnp.float32),
    "click": jnp.asarray(rng.integers(0, 2, 16), jnp.float32),
    "buy": jnp.asarray(rng.integers(0, 2, 16), jnp.float32),
  }
  params = model.init(jax.random.key(1), batch["x"])["params"]
  loss_fn = losses_lib.make_loss_fn(model, label_key=("click", "buy"), multi_task_loss=_funnel.esmm_loss)
  (task_losses, _), grads = mtjax.task_grads(loss_fn, has_aux=True)(params, batch)
  np.testing.assert_allclose(
    task_losses,
    _funnel.esmm_loss(model.apply({"params": params}, batch["x"])[0], jnp.stack([batch["click"], batch["buy"]])),
    rtol=1e-6,
  )
  cvr = jax.tree_util.tree_leaves(grads["tower_cvr"])
  assert all(np.all(np.asarray(g[0]) == 0) for g in cvr)  # row 0 (CTR task) leaves the CVR tower alone
  assert all(np.any(np.asarray(g[1]) != 0) for g in cvr)


# ------------------------------------------------------------------ ESCM² (counterfactual CVR risk)


def _np_escm2(logits, labels, imputed, mode, lam_c, lam_g, valid, max_weight=None):
  a, b = np.asarray(logits[0], np.float64), np.asarray(logits[1], np.float64)
  c, v = np.asarray(labels[0], np.float64), np.asarray(labels[1], np.float64)
  sig = lambda z: 1.0 / (1.0 + np.exp(-z))  # noqa: E731
  p_ctr, p_cvr = sig(a), sig(b)
  bce = lambda y, p: -(y * np.log(p) + (1 - y) * np.log1p(-p))  # noqa: E731
  mean = lambda x: np.sum(x * valid) / np.sum(valid)  # noqa: E731
  ctr = mean(bce(c, p_ctr))
  ctcvr = mean(bce(c * v, p_ctr * p_cvr))
  e = bce(v, p_cvr)
  w = 1.0 / np.maximum(p_ctr, 1e-6)
  if max_weight is not None:
    w = np.minimum(w, max_weight)
  if mode == "ips":
    risk = mean(c * w * e)
  else:
    risk = mean(imputed + c * w * (e - imputed)) + mean(c * w * (e - imputed) ** 2)
  return np.array([ctr, lam_c * risk + lam_g * ctcvr])


@pytest.mark.parametrize("mode,max_weight", [("ips", None), ("dr", None), ("ips", 3.0), ("dr", 4.0)])
def test_escm2_loss_matches_numpy_float64(mode, max_weight):
  with jax.enable_x64(True):
    rng = np.random.default_rng(0)
    n = 40
    logits = rng.normal(0, 1.5, size=(2, n))
    click = rng.random(n) < 0.4
    labels = np.stack([click, click & (rng.random(n) < 0.5)]).astype(np.float64)
    imputed = rng.uniform(0.1, 1.0, n)
    mask = np.ones((2, n))
    mask[:, :3] = 0.0  # padding
    got = losses_lib.escm2_loss(
      jnp.asarray(logits), jnp.asarray(labels), jnp.asarray(mask), aux={"imputation": jnp.asarray(imputed)},
      mode=mode, counterfactual_weight=0.7, global_weight=0.3, max_weight=max_weight,
    )  # fmt: skip
    want = _np_escm2(logits, labels, imputed, mode, 0.7, 0.3, mask[0], max_weight)
    np.testing.assert_allclose(got, want, rtol=1e-10)
    # The propensity is a constant: with lambda_g = 0 the counterfactual risk gives the CTR logit no gradient.
    g = jax.grad(
      lambda lg: losses_lib.escm2_loss(
        lg, jnp.asarray(labels), aux={"imputation": jnp.asarray(imputed)}, mode=mode, global_weight=0.0
      )[1]
    )(jnp.asarray(logits))
    assert np.all(np.asarray(g[0]) == 0.0) and np.any(np.asarray(g[1]) != 0.0)


def test_escm2_model_loss_and_errors():
  model = mtjax.models.ESCM2(tower=(6, 1), counterfactual="dr", counterfactual_weight=0.2, global_weight=0.9)
  x = jnp.asarray(np.random.default_rng(1).normal(size=(8, 4)), jnp.float32)
  params = model.init(jax.random.key(0), x)["params"]
  assert "tower_imputation" in params
  labels = jnp.asarray(np.stack([np.arange(8) % 2, np.arange(8) % 4 == 0]), jnp.float32)
  fn = losses_lib.make_loss_fn(model, multi_task_loss=model.loss(), has_aux=False)
  out, aux = model.apply({"params": params}, x)
  want = losses_lib.escm2_loss(out, labels, aux=aux, mode="dr", counterfactual_weight=0.2, global_weight=0.9)
  np.testing.assert_allclose(fn(params, {"x": x, "labels": labels}), want, rtol=1e-6)
  assert float(jnp.min(aux["imputation"])) >= 0.0
  mask = mtjax.models.partition(model)(params)
  assert not mask["tower_imputation"]["Dense_0"]["kernel"] and mask["tower_ctr"]["Dense_0"]["kernel"]
  assert "tower_imputation" not in mtjax.models.ESCM2(tower=(6, 1)).init(jax.random.key(0), x)["params"]  # IPS
  with pytest.raises(ValueError, match=r"needs the imputed errors aux\['imputation'\]"):
    losses_lib.escm2_loss(out, labels, mode="dr")
  with pytest.raises(ValueError, match="mode must be 'ips' or 'dr'"):
    losses_lib.escm2_loss(out, labels, mode="snips")
  with pytest.raises(ValueError, match="counterfactual must be 'ips' or 'dr'"):
    mtjax.models.ESCM2(counterfactual="x").init(jax.random.key(0), x)
