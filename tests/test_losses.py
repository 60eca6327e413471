"""Tests for mtjax.losses against float64 NumPy references written here."""

import doctest
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mtjax
from mtjax import losses
from mtjax.losses import _basic


def ref_bce(x, y):
  """Float64 BCE from logits, piecewise so that neither branch overflows (written independently)."""
  out = np.empty(len(x))
  for i, (xi, yi) in enumerate(zip(np.asarray(x, np.float64), np.asarray(y, np.float64))):
    if xi >= 0:
      neg_log_p = math.log1p(math.exp(-xi))  # -log sigmoid(x)
      neg_log_q = xi + math.log1p(math.exp(-xi))  # -log(1 - sigmoid(x))
    else:
      neg_log_p = -xi + math.log1p(math.exp(xi))
      neg_log_q = math.log1p(math.exp(xi))
    out[i] = yi * neg_log_p + (1 - yi) * neg_log_q
  return out


def ref_ranknet(s, y, g=None, m=None):
  num = den = 0.0
  n = len(s)
  for i in range(n):
    for j in range(n):
      if y[i] <= y[j]:
        continue
      if g is not None and g[i] != g[j]:
        continue
      w = 1.0 if m is None else float(m[i]) * float(m[j])
      if w == 0:
        continue
      d = float(s[i]) - float(s[j])
      num += w * (math.log1p(math.exp(-d)) if d >= 0 else -d + math.log1p(math.exp(d)))
      den += w
  return num / den if den else 0.0


def test_doctests():
  result = doctest.testmod(_basic, optionflags=doctest.NORMALIZE_WHITESPACE)
  assert result.attempted > 0 and result.failed == 0


def test_bce_matches_float64_reference_including_extreme_logits():
  rng = np.random.default_rng(0)
  x = np.concatenate([rng.normal(size=40) * 4, [50.0, -50.0, 50.0, -50.0, 0.0, 30.0, -30.0]])
  y = np.concatenate([rng.uniform(size=40), [1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0]])
  want = ref_bce(x, y)
  got32 = np.asarray(losses.bce_with_logits(jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32)))
  assert got32.dtype == np.float32 and np.all(np.isfinite(got32))
  np.testing.assert_allclose(got32, want, rtol=2e-6, atol=0)  # relative accuracy even at 2e-22
  grad32 = jax.grad(lambda z: jnp.sum(losses.bce_with_logits(z, jnp.asarray(y, jnp.float32))))(
    jnp.asarray(x, jnp.float32)
  )
  assert np.all(np.isfinite(np.asarray(grad32)))
  np.testing.assert_allclose(grad32, 1 / (1 + np.exp(-x)) - y, atol=1e-6)
  with jax.enable_x64(True):
    got64 = losses.bce_with_logits(jnp.asarray(x, jnp.float64), jnp.asarray(y, jnp.float64))
    assert got64.dtype == jnp.float64
    np.testing.assert_allclose(np.asarray(got64), want, rtol=1e-13, atol=0)
  # integer / bool labels are accepted
  np.testing.assert_allclose(
    losses.bce_with_logits(jnp.array([1.0, -1.0]), jnp.array([True, False])), ref_bce([1.0, -1.0], [1, 0]), rtol=1e-6
  )


def test_mse_and_masked_mean():
  rng = np.random.default_rng(1)
  p, t = rng.normal(size=(3, 7)), rng.normal(size=(3, 7))
  np.testing.assert_allclose(
    losses.mse(jnp.asarray(p, jnp.float32), jnp.asarray(t, jnp.float32)), (p - t) ** 2, rtol=1e-5
  )
  m = rng.uniform(size=(3, 7)) < 0.5
  m[2] = False
  got = np.asarray(losses.masked_mean(jnp.asarray(p, jnp.float32), jnp.asarray(m), axis=-1))
  for k in range(3):
    vals = [p[k, i] for i in range(7) if m[k, i]]
    assert got[k] == pytest.approx(sum(vals) / len(vals) if vals else 0.0, abs=1e-6)
  w = rng.uniform(size=7)
  assert float(losses.masked_mean(jnp.asarray(p[0]), jnp.asarray(w))) == pytest.approx(
    float(np.sum(w * p[0]) / np.sum(w)), rel=1e-5
  )
  with pytest.raises(ValueError, match="mtjax: masked_mean"):
    losses.masked_mean(jnp.ones((2, 3)), jnp.ones(3))


def test_all_masked_task_gives_zero_loss_and_zero_finite_gradient():
  outputs = jnp.array([[0.5, -1.0, 2.0], [3.0, -50.0, 50.0]])
  labels = jnp.array([[1.0, 0.0, 1.0], [jnp.nan, jnp.inf, 1.0]])  # garbage labels where masked
  mask = jnp.array([[True, True, False], [False, False, False]])
  for spec in ("bce", "mse", "ranknet"):
    f = lambda o: losses.per_task_loss(o, labels, mask, task_losses=spec)
    vals = f(outputs)
    assert float(vals[1]) == 0.0
    jac = np.asarray(jax.jacrev(f)(outputs))  # [T, T, B]
    assert np.all(np.isfinite(jac)), spec
    assert np.all(jac[1] == 0.0), spec
    assert np.all(jac[0, 1] == 0.0) and np.all(jac[:, :, 2] == 0.0), spec  # masked entries: no gradient
  # masked_mean alone
  g = jax.grad(lambda v: losses.masked_mean(v, jnp.zeros(3, bool)))(jnp.array([1.0, 2.0, 3.0]))
  assert np.all(np.asarray(g) == 0.0)
  # and the task_grads row of the empty task is exactly zero
  params = {"w": jnp.ones(2)}

  def loss_fn(p, x):
    o = jnp.stack([x @ p["w"], 2 * x @ p["w"]])
    return losses.per_task_loss(o, jnp.ones((2, 3)), jnp.array([[1, 1, 1], [0, 0, 0]]))

  value, grads = mtjax.task_grads(loss_fn)(params, jnp.ones((3, 2)))
  assert float(value[1]) == 0.0 and np.all(np.asarray(grads["w"][1]) == 0.0)
  assert np.all(np.asarray(grads["w"][0]) != 0.0)


def test_ranknet_matches_double_loop():
  rank = jax.jit(losses.ranknet)  # one compilation per signature, many random draws
  for seed in range(10):
    rng = np.random.default_rng(seed)
    n = 11
    s = rng.normal(size=n) * 3
    y = rng.integers(0, 3, n).astype(np.float64)  # graded, with ties
    g = rng.integers(0, 3, n)
    m = rng.uniform(size=n) < 0.7
    sj, yj = jnp.asarray(s, jnp.float32), jnp.asarray(y, jnp.float32)
    assert float(rank(sj, yj)) == pytest.approx(ref_ranknet(s, y), rel=1e-5, abs=1e-6)
    assert float(rank(sj, yj, jnp.asarray(g))) == pytest.approx(ref_ranknet(s, y, g), rel=1e-5, abs=1e-6)
    assert float(rank(sj, yj, jnp.asarray(g), jnp.asarray(m))) == pytest.approx(
      ref_ranknet(s, y, g, m), rel=1e-5, abs=1e-6
    )
  with jax.enable_x64(True):
    got = losses.ranknet(jnp.asarray(s), jnp.asarray(y), groups=jnp.asarray(g))
    assert got.dtype == jnp.float64
    assert float(got) == pytest.approx(ref_ranknet(s, y, g), rel=1e-12, abs=1e-14)


def test_ranknet_degenerate_and_extreme():
  # no pair at all (all labels equal / every group single-class): 0 with zero gradient
  for y, g in ((jnp.ones(4), None), (jnp.array([1.0, 1.0, 0.0, 0.0]), jnp.array([0, 0, 1, 1]))):
    v, grad = jax.value_and_grad(lambda sc: losses.ranknet(sc, y, groups=g))(jnp.arange(4.0))
    assert float(v) == 0.0 and np.all(np.asarray(grad) == 0.0)
  # huge score gaps stay finite and accurate
  s = jnp.array([-100.0, 100.0])
  y = jnp.array([1.0, 0.0])
  v, grad = jax.value_and_grad(lambda sc: losses.ranknet(sc, y))(s)
  assert float(v) == pytest.approx(200.0) and np.all(np.isfinite(np.asarray(grad)))
  assert float(losses.ranknet(-s, y)) < 1e-30
  assert jax.jit(losses.ranknet)(s, y) == pytest.approx(200.0)


def test_per_task_loss_mixed_specs_against_loop():
  rng = np.random.default_rng(3)
  t, b = 4, 9
  o = rng.normal(size=(t, b)) * 2
  y = np.stack([rng.integers(0, 2, b), rng.normal(size=b), rng.integers(0, 3, b), rng.integers(0, 2, b)]).astype(
    np.float64
  )
  m = rng.uniform(size=(t, b)) < 0.7
  g = rng.integers(0, 2, b)
  l1 = lambda out, lab, mask: losses.masked_mean(jnp.abs(out - lab), mask)
  got = losses.per_task_loss(
    jnp.asarray(o, jnp.float32),
    jnp.asarray(y, jnp.float32),
    jnp.asarray(m),
    task_losses=("bce", "mse", "ranknet", l1),
    groups=jnp.asarray(g),
  )
  assert got.shape == (t,)
  idx = [[i for i in range(b) if m[k, i]] for k in range(t)]
  want = [
    np.mean(ref_bce(o[0, idx[0]], y[0, idx[0]])),
    np.mean((o[1, idx[1]] - y[1, idx[1]]) ** 2),
    ref_ranknet(o[2], y[2], g, m[2]),
    np.mean(np.abs(o[3, idx[3]] - y[3, idx[3]])),
  ]
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5)
  # single spec for all tasks; no mask == mean over all samples
  got = losses.per_task_loss(jnp.asarray(o[:2], jnp.float32), jnp.asarray((y[:2] > 0), jnp.float32))
  np.testing.assert_allclose(got, [np.mean(ref_bce(o[k], y[k] > 0)) for k in range(2)], rtol=1e-5)
  with pytest.raises(ValueError, match="2 task losses were given"):
    losses.per_task_loss(jnp.zeros((3, 2)), jnp.zeros((3, 2)), task_losses=("bce", "mse"))
  with pytest.raises(ValueError, match="unknown task loss 'hinge'"):
    losses.per_task_loss(jnp.zeros((1, 2)), jnp.zeros((1, 2)), task_losses="hinge")
  with pytest.raises(ValueError, match="outputs must be \\[T, B\\]"):
    losses.per_task_loss(jnp.zeros(3), jnp.zeros(3))


class TinyModel(nn.Module):
  """Shared Dense bottom, one Dense logit per task; returns ([T, B], aux)."""

  num_tasks: int = 2
  batch_norm: bool = False

  @nn.compact
  def __call__(self, x, *, train=False):
    h = nn.Dense(4)(x)
    if self.batch_norm:
      h = nn.BatchNorm(use_running_average=not train)(h)
    h = nn.relu(h)
    outs = [nn.Dense(1, name=f"tower_{t}")(h)[:, 0] for t in range(self.num_tasks)]
    return jnp.stack(outs), {"hidden_mean": jnp.mean(h)}


def _batch(rng, b=6, t=2):
  return {
    "x": jnp.asarray(rng.normal(size=(b, 3)), jnp.float32),
    "labels": jnp.asarray(rng.integers(0, 2, (t, b)), jnp.float32),
    "mask": jnp.asarray(np.array([[1, 1, 1, 1, 1, 1], [1, 0, 1, 0, 0, 0]][:t])[:, :b], bool),
  }


def test_make_loss_fn_with_task_grads():
  rng = np.random.default_rng(0)
  model = TinyModel()
  batch = _batch(rng)
  params = model.init(jax.random.key(0), batch["x"])["params"]
  loss_fn = losses.make_loss_fn(model, ("bce", "bce"), mask_key="mask")
  task_losses, aux = loss_fn(params, batch)
  assert task_losses.shape == (2,) and aux["outputs"].shape == (2, 6) and "hidden_mean" in aux["model"]
  # reference: the model's logits, BCE in float64 with the mask applied by hand
  logits = np.asarray(model.apply({"params": params}, batch["x"])[0], np.float64)
  lab, msk = np.asarray(batch["labels"]), np.asarray(batch["mask"])
  want = [np.mean(ref_bce(logits[k][msk[k]], lab[k][msk[k]])) for k in range(2)]
  np.testing.assert_allclose(np.asarray(task_losses), want, rtol=1e-5)
  # task_grads rows equal the gradients of each task loss alone
  (vals, _), grads = jax.jit(mtjax.task_grads(loss_fn, has_aux=True))(params, batch)
  np.testing.assert_allclose(vals, task_losses, rtol=1e-6)
  for k in range(2):
    gk = jax.grad(lambda p: loss_fn(p, batch)[0][k])(params)
    for a, b in zip(jax.tree.leaves(gk), jax.tree.leaves(jax.tree.map(lambda x: x[k], grads))):
      np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-7)
  # task-specific tower of task 1 gets no gradient from task 0
  assert np.all(np.asarray(grads["tower_1"]["kernel"][0]) == 0.0)
  # has_aux=False, labels as a tuple of top-level keys, no mask
  batch2 = {"x": batch["x"], "click": batch["labels"][0], "buy": batch["labels"][1]}
  loss_fn2 = losses.make_loss_fn(model, "bce", label_key=("click", "buy"), has_aux=False)
  vals2, grads2 = mtjax.task_grads(loss_fn2)(params, batch2)
  np.testing.assert_allclose(vals2, [np.mean(ref_bce(logits[k], lab[k])) for k in range(2)], rtol=1e-5)
  assert grads2["Dense_0"]["kernel"].shape == (2, 3, 4)


def test_make_loss_fn_ranknet_groups_and_multi_task_loss():
  rng = np.random.default_rng(1)
  model = TinyModel()
  batch = _batch(rng)
  batch["user"] = jnp.array([0, 0, 0, 1, 1, 1])
  params = model.init(jax.random.key(1), batch["x"])["params"]
  out = np.asarray(model.apply({"params": params}, batch["x"])[0], np.float64)
  lab = np.asarray(batch["labels"])
  f = losses.make_loss_fn(model, ("ranknet", "mse"), group_key="user", has_aux=False)
  np.testing.assert_allclose(
    f(params, batch),
    [ref_ranknet(out[0], lab[0], np.asarray(batch["user"])), np.mean((out[1] - lab[1]) ** 2)],
    rtol=1e-5,
  )
  joint = lambda o, y, m: jnp.stack([jnp.mean(o[0] * y[1]), jnp.mean(o[1])])
  f = losses.make_loss_fn(model, multi_task_loss=joint, has_aux=False)
  np.testing.assert_allclose(f(params, batch), [np.mean(out[0] * lab[1]), np.mean(out[1])], rtol=1e-5, atol=1e-7)


def test_make_loss_fn_batch_stats_and_errors():
  rng = np.random.default_rng(2)
  model = TinyModel(batch_norm=True)
  batch = _batch(rng)
  variables = model.init(jax.random.key(2), batch["x"])
  params, state = variables["params"], {"batch_stats": variables["batch_stats"]}
  train_fn = losses.make_loss_fn(model, "bce", train=True, mutable=("batch_stats",))
  (vals, aux), grads = mtjax.task_grads(train_fn, has_aux=True)(params, batch, None, state)
  assert vals.shape == (2,)
  new_mean = aux["updates"]["batch_stats"]["BatchNorm_0"]["mean"]
  assert not np.allclose(np.asarray(new_mean), np.asarray(state["batch_stats"]["BatchNorm_0"]["mean"]))
  # eval uses the stored statistics passed explicitly
  eval_fn = losses.make_loss_fn(model, "bce", has_aux=False)
  new_state = aux["updates"]
  got = eval_fn(params, batch, variables=new_state)
  logits = np.asarray(model.apply({"params": params, **new_state}, batch["x"])[0], np.float64)
  np.testing.assert_allclose(
    got, [np.mean(ref_bce(logits[k], np.asarray(batch["labels"])[k])) for k in range(2)], rtol=1e-5
  )
  with pytest.raises(ValueError, match="has_aux=True"):
    losses.make_loss_fn(model, mutable=("batch_stats",), has_aux=False)
  with pytest.raises(ValueError, match="unknown task loss"):
    losses.make_loss_fn(model, ("bce", "focal"))
  f = losses.make_loss_fn(TinyModel(), "bce")
  p = TinyModel().init(jax.random.key(0), batch["x"])["params"]
  with pytest.raises(ValueError, match="label key 'y' is not in the batch"):
    losses.make_loss_fn(TinyModel(), label_key="y")(p, batch)
  with pytest.raises(ValueError, match="labels have shape \\(3, 6\\)"):
    f(p, {**batch, "labels": jnp.zeros((3, 6))})
  with pytest.raises(ValueError, match="task order is ambiguous"):
    f(p, {**batch, "labels": {"a": jnp.zeros(6), "b": jnp.zeros(6)}})


# ------------------------------------------------------------------ sample weights


def _np_weighted(outputs, labels, mask, weights, kinds, normalization):
  out = []
  for t, kind in enumerate(kinds):
    o, y = np.asarray(outputs[t], np.float64), np.asarray(labels[t], np.float64)
    d, w = np.asarray(mask[t], np.float64), np.asarray(weights[t], np.float64)
    y = np.where(d != 0, y, 0.0)
    ell = np.logaddexp(0.0, o) - y * o if kind == "bce" else (o - y) ** 2
    den = d.sum() if normalization == "valid" else (d * w).sum()
    out.append(0.0 if den == 0 else (d * w * ell).sum() / den)
  return np.array(out)


@pytest.mark.parametrize("normalization", ["valid", "weights"])
def test_sample_weights_match_numpy_float64(normalization):
  with jax.enable_x64(True):
    rng = np.random.default_rng(0)
    outputs = rng.normal(size=(3, 9))
    labels = np.stack([rng.random(9) < 0.5, rng.random(9) < 0.3, rng.normal(size=9)]).astype(np.float64)
    mask = rng.random((3, 9)) < 0.7
    mask[2] = False  # a task without a valid sample: 0, zero gradient
    weights = rng.uniform(0.0, 5.0, size=(3, 9))
    weights[0, :3] = 0.0
    kinds = ("bce", "bce", "mse")
    got = losses.per_task_loss(
      jnp.asarray(outputs),
      jnp.asarray(labels),
      jnp.asarray(mask),
      task_losses=kinds,
      sample_weights=jnp.asarray(weights),
      weight_normalization=normalization,
    )
    np.testing.assert_allclose(got, _np_weighted(outputs, labels, mask, weights, kinds, normalization), rtol=1e-12)
    # the gradient: d L_t / d o_ti = d_i w_i dl/do / den
    g = jax.grad(
      lambda o: losses.per_task_loss(
        o,
        jnp.asarray(labels),
        jnp.asarray(mask),
        task_losses=kinds,
        sample_weights=jnp.asarray(weights),
        weight_normalization=normalization,
      )[0]
    )(jnp.asarray(outputs))
    sig = 1.0 / (1.0 + np.exp(-outputs[0]))
    den = mask[0].sum() if normalization == "valid" else (mask[0] * weights[0]).sum()
    np.testing.assert_allclose(g[0], mask[0] * weights[0] * (sig - labels[0]) / den, rtol=1e-10, atol=1e-15)
    # a task without a valid sample: loss 0 and a zero gradient
    g2 = jax.grad(
      lambda o: losses.per_task_loss(
        o,
        jnp.asarray(labels),
        jnp.asarray(mask),
        task_losses=kinds,
        sample_weights=jnp.asarray(weights),
        weight_normalization=normalization,
      )[2]
    )(jnp.asarray(outputs))
    assert float(got[2]) == 0.0 and np.all(np.asarray(g2) == 0.0)


def test_sample_weights_conventions_and_errors():
  rng = np.random.default_rng(1)
  outputs = jnp.asarray(rng.normal(size=(2, 6)), jnp.float32)
  labels = jnp.asarray(rng.random((2, 6)) < 0.5, jnp.float32)
  plain = losses.per_task_loss(outputs, labels)
  ones = losses.per_task_loss(outputs, labels, sample_weights=jnp.ones(6))  # [B]: every task
  np.testing.assert_allclose(ones, plain, rtol=1e-6)
  w = jnp.asarray(rng.uniform(0.5, 2.0, size=(2, 6)), jnp.float32)
  valid = losses.per_task_loss(outputs, labels, sample_weights=w)
  np.testing.assert_allclose(losses.per_task_loss(outputs, labels, sample_weights=3 * w), 3 * valid, rtol=1e-6)
  mean = losses.per_task_loss(outputs, labels, sample_weights=w, weight_normalization="weights")
  np.testing.assert_allclose(
    losses.per_task_loss(outputs, labels, sample_weights=3 * w, weight_normalization="weights"), mean, rtol=1e-6
  )
  with pytest.raises(ValueError, match="finite and non-negative"):
    losses.per_task_loss(outputs, labels, sample_weights=w.at[0, 1].set(-1.0))
  with pytest.raises(jax.errors.JaxRuntimeError, match="finite and non-negative"):  # under jit: runtime checks
    jax.block_until_ready(
      jax.jit(lambda ww: losses.per_task_loss(outputs, labels, sample_weights=ww))(w.at[1, 2].set(jnp.nan))
    )
  with pytest.raises(ValueError, match=r"must be \[T, B\] = \(2, 6\) or \[B\] = \(6,\)"):
    losses.per_task_loss(outputs, labels, sample_weights=jnp.ones(5))
  with pytest.raises(ValueError, match=r"task 1 \('ranknet'\) take none"):
    losses.per_task_loss(outputs, labels, task_losses=("bce", "ranknet"), sample_weights=w)
  with pytest.raises(ValueError, match="weight_normalization must be one of"):
    losses.per_task_loss(outputs, labels, sample_weights=w, weight_normalization="sum")


def test_make_loss_fn_reads_sample_weights_from_the_batch():
  class Lin(nn.Module):
    @nn.compact
    def __call__(self, x, *, train=False):
      return nn.Dense(2)(x).T, {}

  model = Lin()
  rng = np.random.default_rng(2)
  x = jnp.asarray(rng.normal(size=(6, 3)), jnp.float32)
  batch = {
    "x": x,
    "labels": jnp.asarray(rng.random((2, 6)) < 0.5, jnp.float32),
    "watch": jnp.asarray(rng.uniform(0, 4, 6), jnp.float32),
  }
  params = model.init(jax.random.key(0), x)["params"]
  fn = losses.make_loss_fn(model, "bce", has_aux=False, weight_key="watch", weight_normalization="weights")
  outputs = model.apply({"params": params}, x)[0]
  want = losses.per_task_loss(outputs, batch["labels"], sample_weights=batch["watch"], weight_normalization="weights")
  np.testing.assert_allclose(fn(params, batch), want, rtol=1e-6)
  _, grads = mtjax.task_grads(fn)(params, batch)
  assert grads["Dense_0"]["kernel"].shape == (2, 3, 2)
  with pytest.raises(ValueError, match="weight key 'missing' is not in the batch"):
    losses.make_loss_fn(model, "bce", has_aux=False, weight_key="missing")(params, batch)
  with pytest.raises(ValueError, match="a multi_task_loss takes no sample weights"):
    losses.make_loss_fn(model, multi_task_loss=losses.esmm_loss, weight_key="watch")


# ------------------------------------------------------------------ multi-behaviour BPR


def _np_multi_behavior_bpr(s, y, mask, groups, graded):
  t_count, b = y.shape
  level = np.array([max([t + 1 for t in range(t_count) if y[t, i]] or [0]) for i in range(b)])
  out = []
  for t in range(t_count):
    num = den = 0.0
    for i in range(b):
      for j in range(b):
        if groups[i] != groups[j]:
          continue
        ok = (level[i] >= t + 1 and level[i] > level[j]) if graded else (y[t, i] == 1 and y[t, j] == 0)
        if not ok:
          continue
        w = mask[t, i] * mask[t, j]
        num += w * np.logaddexp(0.0, -(s[t, i] - s[t, j]))
        den += w
    out.append(num / den if den > 0 else 0.0)
  return np.array(out)


@pytest.mark.parametrize("graded", [True, False])
def test_multi_behavior_bpr_matches_a_double_loop(graded):
  with jax.enable_x64(True):
    rng = np.random.default_rng(0)
    b = 14
    click = rng.random(b) < 0.6
    cart = click & (rng.random(b) < 0.5)
    buy = cart & (rng.random(b) < 0.5)
    y = np.stack([click, cart, buy]).astype(np.float64)
    s = rng.normal(size=(3, b))
    groups = rng.integers(0, 3, b)
    mask = (rng.random((3, b)) < 0.9).astype(np.float64)
    got = losses.multi_behavior_bpr(
      jnp.asarray(s), jnp.asarray(y), jnp.asarray(mask), groups=jnp.asarray(groups), graded=graded
    )
    np.testing.assert_allclose(got, _np_multi_behavior_bpr(s, y, mask, groups, graded), rtol=1e-12)
    # a stronger behaviour ranks above a weaker one: raising a buyer's purchase score lowers the buy loss
    g = jax.grad(lambda o: losses.multi_behavior_bpr(o, jnp.asarray(y), groups=jnp.asarray(groups), graded=graded)[2])(
      jnp.asarray(s)
    )
    assert np.all(np.asarray(g[2])[buy] <= 0) and np.all(np.asarray(g[:2]) == 0)


def test_multi_behavior_bpr_through_make_loss_fn_and_errors():
  class Lin(nn.Module):
    @nn.compact
    def __call__(self, x, *, train=False):
      return nn.Dense(2)(x).T, {}

  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.normal(size=(8, 3)), jnp.float32)
  click = rng.random(8) < 0.6
  y = jnp.asarray(np.stack([click, click & (rng.random(8) < 0.5)]), jnp.float32)
  batch = {"x": x, "labels": y, "user": jnp.asarray(rng.integers(0, 2, 8))}
  model = Lin()
  params = model.init(jax.random.key(0), x)["params"]
  fn = losses.make_loss_fn(model, multi_task_loss=losses.multi_behavior_bpr, group_key="user", has_aux=False)
  out = model.apply({"params": params}, x)[0]
  np.testing.assert_allclose(fn(params, batch), losses.multi_behavior_bpr(out, y, groups=batch["user"]), rtol=1e-6)
  assert not np.allclose(fn(params, batch), losses.multi_behavior_bpr(out, y))  # the groups were used
  with pytest.raises(ValueError, match="takes no `groups` keyword"):
    losses.make_loss_fn(model, multi_task_loss=losses.esmm_loss, group_key="user")
  with pytest.raises(ValueError, match=r"groups must be \[B\]"):
    losses.multi_behavior_bpr(out, y, groups=jnp.zeros(3))
  # no pair at all: 0 and a zero gradient
  none = jnp.zeros((2, 8))
  assert np.all(np.asarray(losses.multi_behavior_bpr(out, none)) == 0.0)
