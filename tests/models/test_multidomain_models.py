"""PEPNet and STAR: shapes, stop-gradient gates, partitioned normalization, star layers, training."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mtjax.models import _pepnet as pepnet_lib
from mtjax.models import _star as star_lib
from mtjax.models._features import Categorical
from mtjax.models._features import Dense
from mtjax.models._features import FeatureSpec

B, M = 12, 3
SPECS = {
  "categorical": FeatureSpec(
    categorical=(Categorical("domain", M, 4), Categorical("user", 7, 4), Categorical("item", 9, 3))
  ),
  "mixed": FeatureSpec(
    categorical=(
      Categorical("domain", M, 2),
      Categorical("user", 5, 4),
      Categorical("author", 4, 2),
      Categorical("item", 6, 4),
    ),
    dense=(Dense("price"), Dense("stats", 3)),
  ),
}
PRIOR = {"categorical": ("user",), "mixed": ("user", "author")}


def _batch(spec, seed, domains=None, n=B):
  """A feature dict from NumPy (no jax.random: every new shape would cost a compilation)."""
  rng = np.random.default_rng(seed)
  out = {f.name: jnp.asarray(rng.integers(0, f.vocab_size, n), jnp.int32) for f in spec.categorical}
  for f in spec.dense:
    out[f.name] = jnp.asarray(rng.normal(size=(n, f.dim) if f.dim > 1 else (n,)), jnp.float32)
  out["domain"] = jnp.asarray(np.arange(n) % M if domains is None else domains, jnp.int32)
  return out


def _perturbed(tree, pattern, scale, seed=0, add=True):
  """``tree`` with NumPy noise added to (or multiplied into) every leaf whose path contains ``pattern``."""
  rng = np.random.default_rng(seed)

  def f(path, v):
    if pattern not in jax.tree_util.keystr(path):
      return v
    if add:
      return v + jnp.asarray(scale * rng.normal(size=v.shape), v.dtype)
    return v * scale

  return jax.tree_util.tree_map_with_path(f, tree)


def _take(batch, idx):
  return {k: v[idx] for k, v in batch.items()}


def _flat(tree):
  return {jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_leaves_with_path(tree)}


# ---------------------------------------------------------------- PEPNet


def _pepnet(spec_name, **kw):
  return pepnet_lib.PEPNet(
    features=SPECS[spec_name],
    domain_fields=("domain",),
    prior_fields=PRIOR[spec_name],
    num_tasks=2,
    tower=(8, 4, 1),
    **kw,
  )


def _numpy_variables(module, *args, seed=0):
  """Random variables of ``module`` with the shapes of ``module.init``, drawn by NumPy.

  ``jax.eval_shape`` only traces ``init``; random values from NumPy avoid compiling the
  initializers for every parameter shape (most of the run time of these small tests). Domain
  weights and scales are near 1 but differ per domain, so that a sample routed to the wrong
  domain gives a different result.
  """
  rng = np.random.default_rng(seed)
  shapes = jax.eval_shape(lambda: module.init(jax.random.key(0), *args))

  def fill(path, leaf):
    name = jax.tree_util.keystr(path)
    last = str(getattr(path[-1], "key", path[-1]))
    if "batch_stats" in name:
      v = np.zeros(leaf.shape) if last == "mean" else np.ones(leaf.shape)
    elif last in ("kernel", "embedding"):
      v = rng.normal(size=leaf.shape) / np.sqrt(leaf.shape[-2] if last == "kernel" else 4)
    elif last in ("domain_kernel", "scale", "domain_scale"):
      v = 1.0 + 0.3 * rng.normal(size=leaf.shape)
    else:
      v = 0.1 * rng.normal(size=leaf.shape)
    return jnp.asarray(v, leaf.dtype)

  return jax.tree_util.tree_map_with_path(fill, shapes)


@functools.cache
def _init(kind, spec_name, real=False, **kw):
  """A model and its variables for the standard batch: ``model.init`` if ``real``, else NumPy values."""
  model = _pepnet(spec_name, **kw) if kind == "pepnet" else _star_model(spec_name, **kw)
  x = _batch(SPECS[spec_name], 0)
  return model, (model.init(jax.random.key(1), x) if real else _numpy_variables(model, x))


@pytest.mark.parametrize("spec_name,position", [("categorical", "input"), ("mixed", "output")])
def test_pepnet_shapes_and_dtypes(spec_name, position):
  # model.init itself runs for one configuration per model; the others use NumPy values (fast).
  model, variables = _init("pepnet", spec_name, real=spec_name == "categorical", gate_position=position, dropout=0.3)
  x = _batch(SPECS[spec_name], 0)
  out, aux = model.apply(variables, x)
  out_train, _ = model.apply(variables, x, train=True, rngs={"dropout": jax.random.key(2)})
  for o in (out, out_train):
    assert o.shape == (2, B) and o.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(o)))
  assert not np.allclose(out, out_train)
  general_width = 3 if spec_name == "categorical" else 4 + 1 + 3
  assert aux["epnet_gate"].shape == (B, general_width)
  widths = [general_width, 8, 4] if position == "input" else [8, 4]
  assert [g.shape for g in aux["ppnet_gates"]] == [(2, B, w) for w in widths]


def _np_pepnet_towers(params, spec_name, x, aux, position):
  """float64 NumPy forward of PEPNet's towers given the gates: checks E' = delta * E and the gating."""
  spec = SPECS[spec_name]
  special = ("domain",) + PRIOR[spec_name]
  parts = []
  for f in spec.categorical:
    if f.name not in special:
      table = np.asarray(params["input"]["embedding"][f"embed_{f.name}"]["embedding"], np.float64)
      parts.append(table[np.asarray(x[f.name])])
  for f in spec.dense:
    v = np.asarray(x[f.name], np.float64)
    parts.append(v[:, None] if v.ndim == 1 else v)
  e = np.concatenate(parts, axis=-1) * np.asarray(aux["epnet_gate"], np.float64)
  gates = [np.asarray(g, np.float64) for g in aux["ppnet_gates"]]
  outs = []
  for t in range(2):
    h = e
    for l in range(3):
      if position == "input":
        h = gates[l][t] * h
      dense = params[f"tower_{t}_dense_{l}"]
      h = h @ np.asarray(dense["kernel"], np.float64) + np.asarray(dense["bias"], np.float64)
      if l < 2:
        h = np.maximum(h, 0)
        if position == "output":
          h = gates[l][t] * h
    outs.append(h[:, 0])
  return np.stack(outs)


@pytest.mark.parametrize("spec_name,position", [("categorical", "input"), ("mixed", "output")])
def test_pepnet_gating_matches_numpy(spec_name, position):
  model, variables = _init("pepnet", spec_name, gate_position=position, dropout=0.3)
  x = _batch(SPECS[spec_name], 1)
  # Push the gates away from 1 so that a wrong gating place would show.
  params = _perturbed(variables["params"], "gate", 8.0, add=False)
  out, aux = model.apply({"params": params}, x)
  np.testing.assert_allclose(out, _np_pepnet_towers(params, spec_name, x, aux, position), rtol=2e-4, atol=2e-5)


def test_pepnet_gates_lie_in_zero_two():
  model, variables = _init("pepnet", "mixed")
  x = _batch(SPECS["mixed"], 2)
  params = _perturbed(variables["params"], "gate", 60.0, add=False)
  _, aux = model.apply({"params": params}, x)
  gates = jnp.concatenate([aux["epnet_gate"].ravel()] + [g.ravel() for g in aux["ppnet_gates"]])
  assert bool(jnp.all((gates >= 0) & (gates <= 2)))
  assert float(gates.min()) < 0.05 and float(gates.max()) > 1.95  # gamma = 2 is reached, not 1


@pytest.mark.parametrize("stop_gradient", [True, False])
def test_pepnet_gates_give_no_gradient_to_the_embedding(stop_gradient):
  model, variables = _init("pepnet", "mixed")
  model = model.clone(stop_gradient=stop_gradient)  # same parameters either way
  x = _batch(SPECS["mixed"], 3)
  params = variables["params"]

  def gate_sum(p, which):
    _, aux = model.apply({"params": p}, x)
    if which == "epnet":
      return jnp.sum(aux["epnet_gate"])
    return sum(jnp.sum(jnp.sin(g)) for g in aux["ppnet_gates"])

  emb = lambda g, name: np.asarray(g["input"]["embedding"][f"embed_{name}"]["embedding"])
  g_ep = jax.jit(jax.grad(gate_sum), static_argnums=1)(params, "epnet")
  g_pp = jax.jit(jax.grad(gate_sum), static_argnums=1)(params, "ppnet")
  assert np.any(emb(g_ep, "domain") != 0)  # the domain side trains EPNet's gate ...
  assert np.any(emb(g_pp, "user") != 0) and np.any(emb(g_pp, "author") != 0)  # ... the priors PPNet's
  general = [emb(g_ep, "item"), emb(g_pp, "item")]
  if stop_gradient:
    assert all(np.all(v == 0) for v in general)  # no gradient to E through the gates
    assert np.all(emb(g_pp, "domain") == 0)  # E' (through EPNet's gate) is stopped too
    assert all(np.all(np.asarray(v) == 0) for v in jax.tree_util.tree_leaves(g_pp["epnet_gate"]))
  else:
    assert all(np.any(v != 0) for v in general)


# ---------------------------------------------------------------- STAR


def _star_model(spec_name="mixed", **kw):
  cfg = dict(features=SPECS[spec_name], num_domains=M, num_tasks=2, hidden=(8, 4), auxiliary=(4,))
  cfg.update(kw)
  return star_lib.STAR(**cfg)


@pytest.mark.parametrize("spec_name,multi_task", [("categorical", "heads"), ("mixed", "towers")])
def test_star_shapes_and_dtypes(spec_name, multi_task):
  model, variables = _init("star", spec_name, real=spec_name == "categorical", multi_task=multi_task, dropout=0.3)
  x = _batch(SPECS[spec_name], 0)
  out, aux = model.apply(variables, x)
  (out_train, _), updates = model.apply(
    variables, x, train=True, rngs={"dropout": jax.random.key(2)}, mutable=["batch_stats"]
  )
  for o in (out, out_train):
    assert o.shape == (2, B) and o.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(o)))
  np.testing.assert_allclose(out, aux["main_logits"] + aux["auxiliary_logits"], rtol=1e-6)
  assert updates["batch_stats"]["norm"]["mean"].shape == (M, variables["batch_stats"]["norm"]["mean"].shape[1])


def test_star_domain_not_in_spec_uses_own_embedding():
  spec = FeatureSpec(categorical=(Categorical("item", 9, 3),), dense=(Dense("price"),))
  model = star_lib.STAR(features=spec, num_domains=M, hidden=(4,))
  x = _batch(spec, 0)
  variables = _numpy_variables(model, x)
  assert variables["params"]["domain_embedding"]["embedding"].shape == (M, 8)
  g = jax.jit(jax.grad(lambda p: jnp.sum(model.apply({"params": p, "batch_stats": variables["batch_stats"]}, x)[0])))(
    variables["params"]
  )
  assert np.any(np.asarray(g["domain_embedding"]["embedding"]) != 0)  # it feeds the auxiliary network
  with pytest.raises(ValueError, match="domain ids"):
    model.apply(variables, {**x, "domain": jnp.full((B,), M)})


def test_star_dense_is_shared_times_domain_weights():
  layer = star_lib.StarDense(3, num_domains=M)
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(10, 4)), jnp.float32)
  d = jnp.array([2, 0, 1, 1, 2, 0, 0, 2, 1, 0])
  params = _numpy_variables(layer, x, d)["params"]
  params = {
    **params,
    **{k: jnp.asarray(rng.normal(size=params[k].shape), jnp.float32) for k in ("domain_kernel", "domain_bias", "bias")},
  }
  y = layer.apply({"params": params}, x, d)
  p = {k: np.asarray(v, np.float64) for k, v in params.items()}
  xn = np.asarray(x, np.float64)
  ref = np.stack(
    [xn[i] @ (p["kernel"] * p["domain_kernel"][int(d[i])]) + p["bias"] + p["domain_bias"][int(d[i])] for i in range(10)]
  )
  np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-6)


def _np_pn(x, d, p, mean, var, scale_mode, eps=1e-5):
  out = np.empty_like(x)
  for i in range(len(x)):
    di = d[i]
    s = p["scale"] * p["domain_scale"][di] if scale_mode == "multiplicative" else p["scale"] + p["domain_scale"][di]
    out[i] = s * (x[i] - mean[di]) / np.sqrt(var[di] + eps) + p["bias"] + p["domain_bias"][di]
  return out


@pytest.mark.parametrize("scale_mode", ["multiplicative", "additive"])
def test_partitioned_norm_matches_numpy_and_keeps_per_domain_stats(scale_mode):
  pn = star_lib.PartitionedNorm(num_domains=M, momentum=0.8, scale=scale_mode)
  rng = np.random.default_rng(0)
  shifts = np.array([[3.0, -2.0], [-2.0, 2.0], [0.0, 4.0]])
  scales = np.array([0.5, 2.0, 1.0])
  variables = _numpy_variables(pn, jnp.zeros((4, 2)), jnp.zeros((4,), jnp.int32))
  params = {
    k: jnp.asarray(rng.normal(size=v.shape) + (1.0 if "scale" in k else 0.0), jnp.float32)
    for k, v in variables["params"].items()
  }
  p = {k: np.asarray(v, np.float64) for k, v in params.items()}
  # Non-trivial starting statistics, so that a moving average of an absent domain would show.
  stats = {
    "mean": jnp.asarray(rng.normal(size=(M, 2)), jnp.float32),
    "var": jnp.asarray(rng.uniform(0.5, 2.0, size=(M, 2)), jnp.float32),
  }
  ref_mean, ref_var = np.asarray(stats["mean"], np.float64), np.asarray(stats["var"], np.float64)
  for step in range(4):
    d = rng.integers(0, M if step else 2, 12)  # step 0 lacks domain 2: its stats must not move
    x = shifts[d] + scales[d, None] * rng.normal(size=(12, 2))
    y, upd = pn.apply(
      {"params": params, "batch_stats": stats},
      jnp.asarray(x, jnp.float32),
      jnp.asarray(d),
      train=True,
      mutable=["batch_stats"],
    )
    stats = upd["batch_stats"]
    bm, bv = np.zeros((M, 2)), np.ones((M, 2))
    for k in set(d.tolist()):
      bm[k], bv[k] = x[d == k].mean(0), x[d == k].var(0)
      ref_mean[k] = 0.8 * ref_mean[k] + 0.2 * bm[k]
      ref_var[k] = 0.8 * ref_var[k] + 0.2 * bv[k]
    np.testing.assert_allclose(y, _np_pn(x, d, p, bm, bv, scale_mode), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(stats["mean"], ref_mean, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(stats["var"], ref_var, rtol=1e-5, atol=1e-5)
  assert np.min(np.abs(ref_mean[0] - ref_mean[1])) > 1.0  # the domains really have different statistics
  d = np.array([0, 1, 2, 1, 0])
  x = rng.normal(size=(5, 2))
  y_eval = pn.apply({"params": params, "batch_stats": stats}, jnp.asarray(x, jnp.float32), jnp.asarray(d))
  np.testing.assert_allclose(y_eval, _np_pn(x, d, p, ref_mean, ref_var, scale_mode), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("multi_task", ["heads", "towers"])
def test_star_mixed_batch_equals_domain_by_domain(multi_task):
  model, variables = _init("star", "mixed", multi_task=multi_task, dropout=0.3)
  model = model.clone(dropout=0.0)
  x = _batch(SPECS["mixed"], 4, domains=[2, 0, 1, 1, 2, 0, 0, 2, 1, 0, 2, 1])
  # Distinct per-domain parameters, so that a sample run with the wrong domain would differ.
  variables = _perturbed(variables, "domain_", 0.3)
  params, stats0 = variables["params"], variables["batch_stats"]
  dom = np.asarray(x["domain"])

  (mixed_train, _), upd = model.apply(variables, x, train=True, mutable=["batch_stats"])
  stats_seq = stats0
  for k in range(M):
    idx = np.where(dom == k)[0]
    (out_k, _), upd_k = model.apply(
      {"params": params, "batch_stats": stats_seq}, _take(x, idx), train=True, mutable=["batch_stats"]
    )
    stats_seq = upd_k["batch_stats"]
    np.testing.assert_allclose(mixed_train[:, idx], out_k, rtol=1e-5, atol=1e-5)
  for key, v in _flat(upd["batch_stats"]).items():
    np.testing.assert_allclose(v, _flat(stats_seq)[key], rtol=1e-5, atol=1e-6)

  # Eval: per-domain running statistics, per-sample results independent of the batch's composition.
  trained = {"params": params, "batch_stats": upd["batch_stats"]}
  mixed_eval, _ = model.apply(trained, x)
  for k in range(M):
    idx = np.where(dom == k)[0]
    np.testing.assert_allclose(mixed_eval[:, idx], model.apply(trained, _take(x, idx))[0], rtol=1e-5, atol=1e-6)
  # ... and a sample reads only its own domain's statistics.
  bumped = jax.tree_util.tree_map(lambda v: v.at[1].add(1.0), upd["batch_stats"])
  moved, _ = model.apply({"params": params, "batch_stats": bumped}, x)
  changed = np.any(np.abs(np.asarray(moved - mixed_eval)) > 1e-6, axis=0)
  np.testing.assert_array_equal(changed, dom == 1)


# ---------------------------------------------------------------- training


def _domain_data(spec, seed, n=64):
  x = _batch(spec, seed, n=n)
  rng = np.random.default_rng(seed + 100)
  s = np.asarray(x["stats"]) @ rng.normal(size=(3, 2)) + 0.5 * np.asarray(x["price"])[:, None]
  bias = np.array([-0.5, 0.0, 0.8])[np.asarray(x["domain"])]
  labels = np.stack([s[:, 0] + bias > 0, s[:, 0] + s[:, 1] + bias > 0.5]).astype(np.float32)
  return x, jnp.asarray(labels)


@pytest.mark.parametrize("name", ["pepnet", "star"])
def test_adam_lowers_the_loss(name):
  model, variables = _init(name, "mixed", **({} if name == "pepnet" else {"multi_task": "towers", "dropout": 0.3}))
  model = model.clone(dropout=0.0)
  x, labels = _domain_data(SPECS["mixed"], 5)
  params, stats = variables["params"], variables.get("batch_stats", {})
  tx = optax.adam(1e-2)

  def total(p, s):
    bce = lambda lg, y: jnp.mean(y * jax.nn.softplus(-lg) + (1 - y) * jax.nn.softplus(lg))
    if name == "star":
      (out, _), upd = model.apply({"params": p, "batch_stats": s}, x, train=True, mutable=["batch_stats"])
      return bce(out, labels), upd["batch_stats"]
    return bce(model.apply({"params": p}, x)[0], labels), s

  @jax.jit
  def run(p, s):
    def step(carry, _):
      p, s, o = carry
      (_, s), g = jax.value_and_grad(total, has_aux=True)(p, s)
      u, o = tx.update(g, o, p)
      return (optax.apply_updates(p, u), s, o), None

    before = total(p, s)[0]
    (p, s, _), _ = jax.lax.scan(step, (p, s, tx.init(p)), None, length=100)
    return before, total(p, s)[0]

  before, after = (float(v) for v in run(params, stats))
  assert np.isfinite(after) and after < 0.7 * before, (before, after)
