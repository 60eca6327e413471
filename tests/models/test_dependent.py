"""DBMTL and NMTR: NumPy float64 forward references and the direction of their dependencies,
checked through gradients (a later target reads the earlier ones, never the reverse)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtjax import models


def _random_params(model, x, dtype, seed=1):
  shapes = jax.eval_shape(model.init, jax.random.key(0), x)["params"]
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda a: jnp.asarray(rng.normal(0, 0.6, a.shape), dtype), shapes)


def _np_mlp(p, h, activate_last=True):
  n = len(p)
  for i in range(n):
    h = h @ p[f"Dense_{i}"]["kernel"] + p[f"Dense_{i}"]["bias"]
    if i < n - 1 or activate_last:
      h = np.maximum(h, 0.0)
  return h


def _norm(tree):
  return float(sum(jnp.abs(v).sum() for v in jax.tree.leaves(tree)))


@pytest.mark.parametrize("deps", [None, ((), (0,), (0,)), ((), (), (1,))])
def test_dbmtl_forward_matches_numpy_float64(deps):
  with jax.enable_x64(True):
    model = models.DBMTL(num_tasks=3, bottom=(6,), tower=(5,), relation=(4,), dependencies=deps)
    x = jnp.asarray(np.random.default_rng(0).normal(size=(4, 3)))
    params = _random_params(model, x, jnp.float64)
    got, _ = model.apply({"params": params}, x)
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    h = _np_mlp(p["bottom"], np.asarray(x, np.float64))
    d = deps if deps is not None else ((), (0,), (0, 1))
    rel, want = [], []
    for t in range(3):
      a = _np_mlp(p[f"tower_{t}"], h)
      r = _np_mlp(p[f"relation_{t}"], np.concatenate([a] + [rel[k] for k in d[t]], -1))
      rel.append(r)
      want.append(r @ p[f"output_{t}"]["kernel"][:, 0] + p[f"output_{t}"]["bias"][0])
    np.testing.assert_allclose(got, np.stack(want), rtol=1e-12, atol=1e-12)


def test_dbmtl_dependencies_through_gradients_and_partition():
  model = models.DBMTL(num_tasks=3, bottom=(6,), tower=(5,), relation=(4,))
  x = jnp.asarray(np.random.default_rng(1).normal(size=(5, 3)), jnp.float32)
  params = model.init(jax.random.key(0), x)["params"]
  g0 = jax.grad(lambda p: model.apply({"params": p}, x)[0][0].sum())(params)
  g2 = jax.grad(lambda p: model.apply({"params": p}, x)[0][2].sum())(params)
  assert _norm(g0["tower_1"]) == 0 and _norm(g0["relation_2"]) == 0  # an earlier target reads no later one
  assert _norm(g2["tower_0"]) > 0 and _norm(g2["relation_1"]) > 0  # the last reads every earlier one
  mask = models.partition(model)(params)
  assert not mask["tower_2"]["Dense_0"]["kernel"] and not mask["output_0"]["kernel"]
  assert mask["tower_0"]["Dense_0"]["kernel"] and mask["relation_1"]["Dense_0"]["kernel"]
  stopped = models.DBMTL(num_tasks=3, bottom=(6,), tower=(5,), relation=(4,), stop_gradient=True)
  g2s = jax.grad(lambda p: stopped.apply({"params": p}, x)[0][2].sum())(params)
  assert _norm(g2s["tower_0"]) == 0 and _norm(g2s["bottom"]) > 0
  np.testing.assert_allclose(stopped.apply({"params": params}, x)[0], model.apply({"params": params}, x)[0])
  with pytest.raises(ValueError, match="only on distinct earlier tasks"):
    models.DBMTL(num_tasks=2, dependencies=((1,), ())).init(jax.random.key(0), x)
  with pytest.raises(ValueError, match="one entry per task"):
    models.DBMTL(num_tasks=2, dependencies=((),)).init(jax.random.key(0), x)


SPEC = models.FeatureSpec(
  categorical=(models.Categorical("user", 9, 4), models.Categorical("item", 11, 4), models.Categorical("cat", 3, 2))
)


@pytest.mark.parametrize("interaction", ["gmf", "mlp"])
def test_nmtr_cascade_matches_numpy_float64(interaction):
  with jax.enable_x64(True):
    model = models.NMTR(num_tasks=3, features=SPEC, user_fields=("user",), item_fields=("item", "cat")
                        if interaction == "mlp" else ("item",), interaction=interaction, mlp=(5, 1))  # fmt: skip
    rng = np.random.default_rng(2)
    x = {"user": jnp.asarray(rng.integers(0, 9, 6)), "item": jnp.asarray(rng.integers(0, 11, 6)),
         "cat": jnp.asarray(rng.integers(0, 3, 6))}  # fmt: skip
    params = _random_params(model, x, jnp.float64)
    got, aux = model.apply({"params": params}, x)
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    emb = lambda n: p["input"]["embedding"][f"embed_{n}"]["embedding"][np.asarray(x[n])]  # noqa: E731
    pu = emb("user")
    qi = np.concatenate([emb("item"), emb("cat")], -1) if interaction == "mlp" else emb("item")
    if interaction == "gmf":
      g = np.stack(
        [(pu * qi) @ p[f"interaction_{k}"]["kernel"][:, 0] + p[f"interaction_{k}"]["bias"][0] for k in range(3)]
      )
    else:
      g = np.stack(
        [_np_mlp(p[f"interaction_{k}"], np.concatenate([pu, qi], -1), activate_last=False)[:, 0] for k in range(3)]
      )
    np.testing.assert_allclose(aux["interactions"], g, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(got, np.cumsum(g, 0), rtol=1e-12, atol=1e-12)  # y_t = sum_{k <= t} g_k


def test_nmtr_later_behaviours_build_on_earlier_ones_only():
  model = models.NMTR(num_tasks=3, features=SPEC)
  x = {"user": jnp.array([1, 2, 3]), "item": jnp.array([4, 5, 6]), "cat": jnp.array([0, 1, 2])}
  params = model.init(jax.random.key(0), x)["params"]
  g0 = jax.grad(lambda p: model.apply({"params": p}, x)[0][0].sum())(params)
  g2 = jax.grad(lambda p: model.apply({"params": p}, x)[0][2].sum())(params)
  assert _norm(g0["interaction_1"]) == 0 and _norm(g0["interaction_2"]) == 0
  assert all(_norm(g2[f"interaction_{k}"]) > 0 for k in range(3))
  mask = models.partition(model)(params)
  assert not mask["interaction_2"]["kernel"] and mask["interaction_0"]["kernel"]
  with pytest.raises(ValueError, match="must be non-empty fields of the spec"):
    models.NMTR(num_tasks=2, features=SPEC, user_fields=("uid",)).init(jax.random.key(0), x)
  with pytest.raises(ValueError, match="equal user and item widths"):
    models.NMTR(num_tasks=2, features=SPEC, item_fields=("item", "cat")).init(jax.random.key(0), x)
  with pytest.raises(ValueError, match="needs features=FeatureSpec"):
    models.NMTR(num_tasks=2).init(jax.random.key(0), jnp.ones((2, 3)))
