"""Shared-Bottom, OMoE, MMoE, CGC, PLE, STEM: shapes, dropout, NumPy float64 forward references,
and gradient facts that show the routing of each architecture."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mtjax import models

B, D, T = 16, 10, 2  # one batch size, input width, task count everywhere: eager ops compile once per shape
SPEC_A = models.FeatureSpec(
  categorical=(models.Categorical("user", 7, 4), models.Categorical("item", 9, 3)),
  dense=(models.Dense("price"), models.Dense("ctx", 2)),
)
SPEC_B = models.FeatureSpec(categorical=(models.Categorical("query", 5, D),))  # also D wide, no dense field


def _batch(spec, key, n=B):
  out = {}
  for i, f in enumerate(spec.categorical):
    out[f.name] = jax.random.randint(jax.random.fold_in(key, i), (n,), 0, f.vocab_size + 2)  # some OOV ids
  for i, f in enumerate(spec.dense):
    out[f.name] = jax.random.normal(jax.random.fold_in(key, 100 + i), (n,) if f.dim == 1 else (n, f.dim))
  out["label"] = jnp.zeros((n,))  # extra keys are ignored
  return out


def _dense(key, n=B, d=D):
  return jax.random.normal(key, (n, d))


SMALL = {
  "shared_bottom": dict(bottom=(8, 8), tower=(8, 1)),
  "omoe": dict(num_experts=3, expert=(8, 8), tower=(8, 1), gate_dropout=0.3),
  "mmoe": dict(num_experts=3, expert=(8, 8), tower=(8, 1), gate_dropout=0.3),
  "cgc": dict(num_specific_experts=2, num_shared_experts=1, expert=(8, 8), tower=(8, 1), gate_dropout=0.3),
  "ple": dict(num_levels=2, num_specific_experts=2, num_shared_experts=1, expert=(8, 8), tower=(8, 1)),
  "stem": dict(num_specific_experts=2, num_shared_experts=1, expert=(8, 8), tower=(8, 1), dense_projection=D),
}
NAMES = sorted(SMALL)


def _model(name, num_tasks=T, features=None, **overrides):
  return models.get(name, num_tasks=num_tasks, features=features, **{**SMALL[name], **overrides})


def _get(tree, path):
  for p in path.split("/"):
    tree = tree[p]
  return tree


def _norm(tree):
  return float(sum(jnp.sum(jnp.abs(l)) for l in jax.tree_util.tree_leaves(tree)))


def _np(tree):
  return jax.tree.map(lambda a: np.asarray(a, np.float64), tree)


# ---------------------------------------------------------------- NumPy float64 references


def np_mlp(p, x, activate_last):
  n = len(p)
  for i in range(n):
    x = x @ p[f"Dense_{i}"]["kernel"] + p[f"Dense_{i}"]["bias"]
    if i < n - 1 or activate_last:
      x = np.maximum(x, 0.0)
  return x


def np_softmax(z):
  z = z - z.max(-1, keepdims=True)
  e = np.exp(z)
  return e / e.sum(-1, keepdims=True)


def np_gate(p, x):
  return np_softmax(x @ p["logits"]["kernel"])


def np_experts(p, x):  # list impl params -> [E, B, H]
  return np.stack([np_mlp(p[f"expert_{e}"], x, True) for e in range(len(p))])


def np_mix(g, s):
  out = 0.0
  for e in range(s.shape[0]):
    out = out + g[:, e : e + 1] * s[e]
  return out


def np_mmoe(p, x, num_tasks, one_gate):
  s = np_experts(p["experts"], x)
  out = []
  for k in range(num_tasks):
    g = np_gate(p["gate"] if one_gate else p[f"gate_{k}"], x)
    out.append(np_mlp(p[f"tower_{k}"], np_mix(g, s), False)[:, 0])
  return np.stack(out)


def np_ple(p, x, num_tasks, num_levels):
  u, us = [x] * num_tasks, x
  for j in range(num_levels):
    lp = p[f"level_{j}"]
    shared = np_experts(lp["experts_shared"], us)
    spec = [np_experts(lp[f"experts_task_{k}"], u[k]) for k in range(num_tasks)]
    new_u = [np_mix(np_gate(lp[f"gate_task_{k}"], u[k]), np.concatenate([spec[k], shared])) for k in range(num_tasks)]
    if j < num_levels - 1:
      us = np_mix(np_gate(lp["gate_shared"], us), np.concatenate(spec + [shared]))
    u = new_u
  return np.stack([np_mlp(p[f"tower_{k}"], u[k], False)[:, 0] for k in range(num_tasks)])


def np_stem_streams(p, batch, spec, num_tasks):
  parts = [[] for _ in range(num_tasks + 1)]
  for f in spec.categorical:
    ids = np.asarray(batch[f.name])
    ids = np.where((ids < 0) | (ids >= f.vocab_size), f.vocab_size, ids)
    emb = p["input"]["embedding"][f"embed_{f.name}"]["embedding"][ids]
    for s in range(num_tasks + 1):
      parts[s].append(emb[:, s * f.embed_dim : (s + 1) * f.embed_dim])
  for f in spec.dense:
    v = np.asarray(batch[f.name], np.float64).reshape(len(ids), f.dim)
    for s in range(num_tasks + 1):
      parts[s].append(v)
  streams = [np.concatenate(q, axis=1) for q in parts]
  return streams[:num_tasks], streams[num_tasks]


def np_stem(p, u, us, num_tasks, num_levels):
  for j in range(num_levels):
    lp = p[f"level_{j}"]
    shared = np_experts(lp["experts_shared"], us)
    spec = [np_experts(lp[f"experts_task_{k}"], u[k]) for k in range(num_tasks)]
    allx = np.concatenate(spec + [shared])
    new_u = [np_mix(np_gate(lp[f"gate_task_{i}"], np.concatenate([u[i], us], 1)), allx) for i in range(num_tasks)]
    if j < num_levels - 1:
      us = np_mix(np_gate(lp["gate_shared"], us), allx)
    u = new_u
  return np.stack([np_mlp(p[f"tower_{k}"], u[k], False)[:, 0] for k in range(num_tasks)])


# ---------------------------------------------------------------- shapes, dtypes, dropout


@pytest.mark.parametrize("name", NAMES)
def test_shapes_dtypes_dense_and_feature_inputs(name):
  key = jax.random.key(0)
  inputs = [(None, _dense(key)), (SPEC_A, _batch(SPEC_A, key)), (SPEC_B, _batch(SPEC_B, key))]
  for spec, x in inputs:
    model = _model(name, features=spec, dropout=0.2)
    variables = model.init(jax.random.key(1), x)
    for train in (False, True):
      out, aux = model.apply(variables, x, train=train, rngs={"dropout": jax.random.key(2)})
      assert out.shape == (T, B) and out.dtype == jnp.float32, (name, spec, train, out.shape, out.dtype)
      assert bool(jnp.all(jnp.isfinite(out)))
      assert isinstance(aux, dict)
      if "gates" in aux:
        assert aux["gates"].shape[:2] == (T, B)
        np.testing.assert_allclose(aux["gates"].sum(-1), 1.0, rtol=1e-5)
        assert bool(jnp.all(aux["gates"] >= 0))


@pytest.mark.parametrize("name", NAMES)
def test_dropout_only_in_train_with_rng(name):
  x = _batch(SPEC_A, jax.random.key(3))
  model = _model(name, features=SPEC_A, dropout=0.5)
  variables = model.init(jax.random.key(4), x)
  a, _ = model.apply(variables, x, train=True, rngs={"dropout": jax.random.key(5)})
  b, _ = model.apply(variables, x, train=True, rngs={"dropout": jax.random.key(6)})
  assert not np.allclose(a, b)
  e1, _ = model.apply(variables, x, train=False, rngs={"dropout": jax.random.key(5)})
  e2, _ = model.apply(variables, x, train=False, rngs={"dropout": jax.random.key(6)})
  e3, _ = model.apply(variables, x)
  np.testing.assert_array_equal(e1, e2)
  np.testing.assert_array_equal(e1, e3)
  with pytest.raises(Exception, match="dropout"):
    model.apply(variables, x, train=True)  # train mode needs the 'dropout' RNG


def test_towers_must_end_in_one_unit():
  with pytest.raises(ValueError, match="mtjax: tower widths must end in 1"):
    _model("mmoe", tower=(4, 2)).init(jax.random.key(0), _dense(jax.random.key(0)))


# ---------------------------------------------------------------- MMoE / OMoE


@pytest.mark.parametrize("one_gate", [False, True])
def test_mmoe_omoe_match_numpy_reference(one_gate):
  x = _dense(jax.random.key(7))
  model = _model("omoe" if one_gate else "mmoe", expert_impl="list", gate_dropout=0.0)
  variables = model.init(jax.random.key(8), x)
  out, aux = model.apply(variables, x)
  p, xn = _np(variables["params"]), np.asarray(x, np.float64)
  np.testing.assert_allclose(out, np_mmoe(p, xn, T, one_gate), rtol=1e-4, atol=1e-5)
  gates = aux["gates"]
  assert gates.shape == (T, B, 3)
  np.testing.assert_allclose(gates.sum(-1), 1.0, rtol=1e-6)
  for k in range(T):
    np.testing.assert_allclose(gates[k], np_gate(p["gate"] if one_gate else p[f"gate_{k}"], xn), rtol=1e-4)
  if one_gate:
    assert "gate_1" not in p
    np.testing.assert_array_equal(gates[0], gates[T - 1])
  else:
    assert not np.allclose(gates[0], gates[1])  # one gate per task, initialised differently


def test_mmoe_gate_options():
  x = _dense(jax.random.key(9))
  model = _model("mmoe", gate_hidden=(7,), gate_bias=True)
  p = model.init(jax.random.key(10), x)["params"]
  assert p["gate_0"]["hidden"]["Dense_0"]["kernel"].shape == (D, 7)
  assert p["gate_0"]["logits"]["bias"].shape == (3,)
  assert "bias" not in _model("mmoe").init(jax.random.key(10), x)["params"]["gate_0"]["logits"]


def _restack_list_to_vmap(list_experts):
  n = len(list_experts)
  return jax.tree.map(lambda *leaves: jnp.stack(leaves), *[list_experts[f"expert_{e}"] for e in range(n)])


def test_vmap_and_list_experts_compute_the_same_function():
  x = _dense(jax.random.key(11))
  lst = _model("mmoe", expert_impl="list", gate_dropout=0.0)
  vm = _model("mmoe", expert_impl="vmap", gate_dropout=0.0)
  pl = lst.init(jax.random.key(12), x)["params"]
  pv = dict(pl)
  pv["experts"] = {"experts": _restack_list_to_vmap(pl["experts"])}
  vm_shapes = jax.eval_shape(vm.init, jax.random.key(12), x)["params"]
  assert jax.tree.map(jnp.shape, pv) == jax.tree.map(lambda a: a.shape, vm_shapes)
  # same outputs and the same gradients
  value_and_grad = lambda m: jax.jit(jax.value_and_grad(lambda p: m.apply({"params": p}, x)[0].sum()))
  vl, gl = value_and_grad(lst)(pl)
  vv, gv = value_and_grad(vm)(pv)
  np.testing.assert_allclose(vv, vl, rtol=1e-5)
  np.testing.assert_allclose(vm.apply({"params": pv}, x)[0], lst.apply({"params": pl}, x)[0], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(
    gv["experts"]["experts"]["Dense_0"]["kernel"],
    _restack_list_to_vmap(gl["experts"])["Dense_0"]["kernel"],
    rtol=1e-4,
    atol=1e-6,
  )


@pytest.mark.parametrize("impl", ["vmap", "list"])
def test_experts_initialised_independently(impl):
  x = _dense(jax.random.key(13))
  experts = models.Experts(3, (8, 8), impl=impl)
  variables = experts.init(jax.random.key(14), x)
  ep = variables["params"]
  kernels = (
    ep["experts"]["Dense_0"]["kernel"]
    if impl == "vmap"
    else jnp.stack([ep[f"expert_{e}"]["Dense_0"]["kernel"] for e in range(3)])
  )
  outs = experts.apply(variables, x)
  assert outs.shape == (3, B, 8)
  for a in range(3):
    # units inside one expert differ (a constant init would make every column equal)
    assert float(jnp.min(jnp.std(kernels[a], axis=1))) > 0
    for b in range(a + 1, 3):
      assert float(jnp.max(jnp.abs(kernels[a] - kernels[b]))) > 1e-3
      assert float(jnp.max(jnp.abs(outs[a] - outs[b]))) > 1e-3


# ---------------------------------------------------------------- gate dropout


def test_gate_dropout_batch_mode_renormalizes_with_one_mask():
  rng = np.random.default_rng(0)
  w = np_softmax(rng.normal(size=(50, 8))).astype(np.float32)
  out = np.asarray(models.gate_dropout(jnp.asarray(w), 0.4, "batch", jax.random.key(1)))
  dropped = out == 0
  assert dropped.any() and not dropped.all()
  assert (dropped == dropped[:1]).all()  # the same experts in every row
  np.testing.assert_allclose(out.sum(-1), 1.0, rtol=1e-5)
  keep = ~dropped[0]
  ref = w[:, keep] / w[:, keep].sum(-1, keepdims=True)  # renormalized survivors
  np.testing.assert_allclose(out[:, keep], ref, rtol=1e-5)


def test_gate_dropout_sample_mode_rate_and_all_dropped_rows():
  w = jnp.full((4000, 5), 0.2)
  out = np.asarray(models.gate_dropout(w, 0.3, "sample", jax.random.key(2)))
  dropped = out == 0
  assert abs(dropped.mean() - 0.3) < 0.02
  assert len({tuple(r) for r in dropped[:50]}) > 5  # masks differ across samples
  np.testing.assert_allclose(out.sum(-1), 1.0, rtol=1e-5)
  # a row that loses every expert keeps its gate (no 0/0): with p = 0.95 and 3 experts that is
  # 0.95**3 = 86% of the rows (plus 0.01% that lose none); the rest become one-hot or two-hot
  g = np_softmax(np.random.default_rng(1).normal(size=(4000, 3))).astype(np.float32)
  out = np.asarray(models.gate_dropout(jnp.asarray(g), 0.95, "sample", jax.random.key(3)))
  intact = ~(out == 0).any(-1)
  assert abs(intact.mean() - 0.95**3) < 0.03
  np.testing.assert_allclose(out[intact], g[intact], rtol=1e-6)
  np.testing.assert_allclose(out.sum(-1), 1.0, rtol=1e-5)
  with pytest.raises(ValueError, match="mtjax: gate_dropout_mode"):
    models.gate_dropout(w, 0.3, "expert", jax.random.key(2))


@pytest.mark.parametrize("mode", ["batch", "sample"])
def test_mmoe_gate_dropout_train_only(mode):
  x = _dense(jax.random.key(15))
  model = _model("mmoe", gate_dropout=0.5, gate_dropout_mode=mode)
  variables = model.init(jax.random.key(16), x)
  _, a = model.apply(variables, x, train=True, rngs={"dropout": jax.random.key(17)})
  _, b = model.apply(variables, x, train=True, rngs={"dropout": jax.random.key(18)})
  ga, gb = np.asarray(a["gates"]), np.asarray(b["gates"])
  assert (ga == 0).any() and not np.array_equal(ga, gb)
  np.testing.assert_allclose(ga.sum(-1), 1.0, rtol=1e-5)
  if mode == "batch":
    assert ((ga == 0) == (ga[:, :1] == 0)).all()
  _, e1 = model.apply(variables, x, train=False, rngs={"dropout": jax.random.key(17)})
  _, e2 = model.apply(variables, x)
  assert (np.asarray(e1["gates"]) > 0).all()
  np.testing.assert_array_equal(e1["gates"], e2["gates"])
  p = _np(variables["params"])
  np.testing.assert_allclose(e1["gates"][1], np_gate(p["gate_1"], np.asarray(x, np.float64)), rtol=1e-4)


# ---------------------------------------------------------------- CGC / PLE


def _task_grads_fn(model):
  """Jitted ``params -> per-task gradients`` (leading task axis) of ``sum_b outputs[k, b]``."""
  return jax.jit(jax.jacrev(lambda p, x: model.apply({"params": p}, x)[0].sum(axis=1)))


def _task(grads, k):
  return jax.tree.map(lambda a: a[k], grads)


@pytest.mark.parametrize("num_levels", [1, 2])
def test_ple_matches_numpy_reference(num_levels):
  x = _dense(jax.random.key(19))
  model = _model("ple", num_levels=num_levels, num_specific_experts=2, num_shared_experts=1, expert_impl="list")
  variables = model.init(jax.random.key(20), x)
  out, aux = model.apply(variables, x)
  ref = np_ple(_np(variables["params"]), np.asarray(x, np.float64), T, num_levels)
  np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-5)
  assert aux["gates"].shape == (T, B, 2 + 1)
  assert len(aux["level_gates"]) == num_levels and len(aux["shared_gates"]) == num_levels - 1
  for g in aux["shared_gates"]:
    assert g.shape == (B, T * 2 + 1)


def test_cgc_task_loss_never_reaches_other_tasks_specific_parts():
  x = _dense(jax.random.key(21))
  model = _model("cgc")
  variables = model.init(jax.random.key(22), x)
  params = variables["params"]
  assert "gate_shared" not in params["level_0"]
  grads = _task_grads_fn(model)(params, x)
  for k in range(T):
    g = _task(grads, k)
    assert _norm(g["level_0"]["experts_shared"]) > 0
    assert _norm(g["level_0"][f"experts_task_{k}"]) > 0
    assert _norm(g["level_0"][f"gate_task_{k}"]) > 0
    for j in range(T):
      if j != k:
        for part in (f"level_0/experts_task_{j}", f"level_0/gate_task_{j}", f"tower_{j}"):
          assert _norm(_get(g, part)) == 0.0, (k, part)


def test_cgc_rejects_several_levels():
  with pytest.raises(ValueError, match="mtjax: CGC has exactly one level"):
    models.CGC(num_tasks=2, num_levels=2).init(jax.random.key(0), _dense(jax.random.key(0)))


def test_ple_shared_gate_only_in_non_final_levels_and_routing():
  x = _dense(jax.random.key(23))
  model = _model("ple", num_levels=2)  # 2 specific experts per task, 1 shared, experts (8, 8)
  params = model.init(jax.random.key(24), x)["params"]
  assert "gate_shared" in params["level_0"] and "gate_shared" not in params["level_1"]
  assert params["level_0"]["gate_shared"]["logits"]["kernel"].shape == (D, T * 2 + 1)  # mixes ALL experts
  assert params["level_1"]["gate_task_0"]["logits"]["kernel"].shape == (8, 2 + 1)  # own + shared only
  # cut the shared stream where it enters level 1: zeroed shared experts output a constant 0 and
  # pass no gradient back to the shared stream
  cut = {
    **params,
    "level_1": {
      **params["level_1"],
      "experts_shared": jax.tree.map(jnp.zeros_like, params["level_1"]["experts_shared"]),
    },
  }
  grads_fn = _task_grads_fn(model)
  grads, grads_cut = grads_fn(params, x), grads_fn(cut, x)
  for k in range(T):
    g, gc = _task(grads, k), _task(grads_cut, k)
    for j in range(T):
      if j == k:
        continue
      # task j's final-level experts and gate, and the level-0 gate that builds task j's stream,
      # are out of task k's reach
      assert _norm(g["level_1"][f"experts_task_{j}"]) == 0.0
      assert _norm(g["level_1"][f"gate_task_{j}"]) == 0.0
      assert _norm(g["level_0"][f"gate_task_{j}"]) == 0.0
      # task j's level-0 experts reach task k through the shared gate and the shared stream ...
      assert _norm(g["level_0"][f"experts_task_{j}"]) > 0
      # ... and only through it
      assert _norm(gc["level_0"][f"experts_task_{j}"]) == 0.0
    assert _norm(g["level_0"]["gate_shared"]) > 0 and _norm(gc["level_0"]["gate_shared"]) == 0.0
    for lvl in ("level_0", "level_1"):  # task k's own route is intact
      assert _norm(gc[lvl][f"experts_task_{k}"]) > 0 and _norm(gc[lvl][f"gate_task_{k}"]) > 0
    assert _norm(gc["level_0"]["experts_shared"]) > 0  # level-0 shared experts feed task k's level-0 gate


# ---------------------------------------------------------------- STEM


@pytest.mark.parametrize("num_levels", [1, 2])
def test_stem_matches_numpy_reference_and_embedding_split(num_levels):
  batch = _batch(SPEC_A, jax.random.key(25))
  model = _model("stem", features=SPEC_A, num_levels=num_levels, expert_impl="list")
  variables = model.init(jax.random.key(26), batch)
  p = _np(variables["params"])
  assert p["input"]["embedding"]["embed_user"]["embedding"].shape == (8, 4 * (T + 1))  # vocab+1, embed_dim*(T+1)
  out, aux = model.apply(variables, batch)
  u, us = np_stem_streams(p, batch, SPEC_A, T)
  np.testing.assert_allclose(out, np_stem(p, u, us, T, num_levels), rtol=1e-4, atol=1e-5)
  assert aux["gates"].shape == (T, B, T * 2 + 1)  # task gates mix ALL experts


def test_stem_all_forward_task_specific_backward():
  batch = _batch(SPEC_A, jax.random.key(27))
  model = _model("stem", features=SPEC_A)
  variables = model.init(jax.random.key(28), batch)
  params = variables["params"]
  assert "gate_shared" not in params["level_0"]
  apply = jax.jit(lambda p, b: model.apply({"params": p}, b)[0])
  out0 = apply(params, batch)
  grads = _task_grads_fn(model)(params, batch)
  for i in range(T):
    g = _task(grads, i)
    assert _norm(g["level_0"][f"experts_task_{i}"]) > 0
    assert _norm(g["level_0"]["experts_shared"]) > 0
    table = g["input"]["embedding"]["embed_user"]["embedding"]  # [vocab+1, 4 * (T+1)]
    assert _norm(table[:, 4 * i : 4 * (i + 1)]) > 0 and _norm(table[:, 4 * T :]) > 0
    for j in range(T):
      if j == i:
        continue
      # task j's specific experts (and its embedding part) get no gradient from task i ...
      assert _norm(g["level_0"][f"experts_task_{j}"]) == 0.0
      assert _norm(table[:, 4 * j : 4 * (j + 1)]) == 0.0
      # ... although their outputs enter task i's mixture in the forward pass
      bumped = jax.tree.map(lambda a: a, params)
      bumped["level_0"][f"experts_task_{j}"] = jax.tree.map(lambda a: a + 0.5, params["level_0"][f"experts_task_{j}"])
      out1 = apply(bumped, batch)
      assert float(jnp.max(jnp.abs(out1[i] - out0[i]))) > 1e-4


def test_stem_shared_gate_has_no_stop_gradient():
  batch = _batch(SPEC_A, jax.random.key(29))
  model = _model("stem", features=SPEC_A, num_levels=2)
  variables = model.init(jax.random.key(30), batch)
  assert "gate_shared" in variables["params"]["level_0"] and "gate_shared" not in variables["params"]["level_1"]
  grads = _task_grads_fn(model)(variables["params"], batch)
  for i in range(T):
    g = _task(grads, i)
    for j in range(T):
      if j != i:
        assert _norm(g["level_0"][f"experts_task_{j}"]) > 0  # via the shared stream
        assert _norm(g["level_1"][f"experts_task_{j}"]) == 0.0  # AFTB in the last level


def test_stem_dense_input():
  x = _dense(jax.random.key(31))
  with pytest.raises(ValueError, match="mtjax: STEM needs a feature dict"):
    _model("stem", dense_projection=None).init(jax.random.key(0), x)
  variables = _model("stem", dense_projection=7).init(jax.random.key(0), x)
  assert variables["params"]["project_task_1"]["kernel"].shape == (D, 7)
  assert variables["params"]["project_shared"]["kernel"].shape == (D, 7)
  assert "project_task_3" not in variables["params"]


# ---------------------------------------------------------------- training


@pytest.mark.parametrize("name", ["mmoe", "ple", "stem"])  # omoe, cgc, shared_bottom: special cases
def test_adam_on_summed_loss_lowers_every_task_loss(name):
  kx, kw = jax.random.split(jax.random.key(32))
  x = jax.random.normal(kx, (B, D))
  w = jax.random.normal(kw, (T, D))
  y = jnp.tanh(w @ x.T)  # [T, B] regression targets, one per task
  model = _model(name, **({} if name == "shared_bottom" else {"gate_dropout": 0.0}))
  params = model.init(jax.random.key(33), x)["params"]

  def task_losses(p):
    return jnp.mean((model.apply({"params": p}, x)[0] - y) ** 2, axis=1)

  tx = optax.adam(1e-2)

  @jax.jit
  def train(p):
    def step(carry, _):
      p, s = carry
      g = jax.grad(lambda q: task_losses(q).sum())(p)
      u, s = tx.update(g, s, p)
      return (optax.apply_updates(p, u), s), None

    (p, _), _ = jax.lax.scan(step, (p, tx.init(p)), None, length=100)
    return p

  before = task_losses(params)
  after = task_losses(train(params))
  assert bool(jnp.all(after < 0.7 * before)), (name, before, after)


def test_out_of_vocabulary_ids_reserved_row_or_clear_error():
  import dataclasses

  model = models.MMoE(num_tasks=2, num_experts=2, expert=(4,), tower=(1,), features=SPEC_A)
  x = {"user": jnp.array([0, 6, 7, -1]), "item": jnp.array([3, 3, 3, 3]), "price": jnp.ones(4), "ctx": jnp.ones((4, 2))}
  variables = model.init(jax.random.PRNGKey(0), x)
  table = variables["params"]["input"]["embedding"]["embed_user"]["embedding"]
  assert table.shape[0] == 7 + 1  # one reserved row past the vocabulary
  # "reserved" (default): ids 7 and -1 both read the reserved row, valid ids their own.
  emb = models.FeatureEmbedding(SPEC_A)
  ev = {"params": variables["params"]["input"]["embedding"]}
  _, fields = emb.apply(ev, x)
  np.testing.assert_array_equal(fields["user"][2], table[7])
  np.testing.assert_array_equal(fields["user"][3], table[7])
  np.testing.assert_array_equal(fields["user"][1], table[6])
  # "error": eagerly a ValueError, under jit a runtime error with the same message; valid ids pass.
  strict = models.MMoE(
    num_tasks=2, num_experts=2, expert=(4,), tower=(1,), features=dataclasses.replace(SPEC_A, oov="error")
  )
  with pytest.raises(ValueError, match="mtjax: feature 'user' has ids outside \\[0, 7\\)"):
    strict.apply(variables, x)
  with pytest.raises(Exception, match="mtjax: feature 'user' has ids outside \\[0, 7\\)"):
    jax.block_until_ready(jax.jit(strict.apply)(variables, x))
  ok = {**x, "user": jnp.array([0, 1, 2, 6])}
  np.testing.assert_array_equal(jax.jit(strict.apply)(variables, ok)[0], model.apply(variables, ok)[0])
  with pytest.raises(ValueError, match="oov must be 'reserved' or 'error'"):
    models.FeatureSpec(categorical=SPEC_A.categorical, oov="drop")
