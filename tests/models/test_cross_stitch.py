"""Cross-Stitch networks (Misra et al., CVPR 2016): a NumPy float64 forward reference, the paper's
initialization, identity units give separate networks, channel-wise units, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtjax import models

B, D = 5, 4


def _x(seed=0):
  return jnp.asarray(np.random.default_rng(seed).normal(size=(B, D)))


def _random_params(model, x, dtype, seed=1):
  shapes = jax.eval_shape(model.init, jax.random.key(0), x)["params"]
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda a: jnp.asarray(rng.normal(0, 0.6, a.shape), dtype), shapes)


def _np_forward(p, x, num_tasks, hidden, tower_len, channel_wise):
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), p)
  cols = [np.asarray(x, np.float64)] * num_tasks
  for l in range(len(hidden)):
    h = np.stack(
      [
        np.maximum(cols[t] @ p[f"column_{t}_dense_{l}"]["kernel"] + p[f"column_{t}_dense_{l}"]["bias"], 0.0)
        for t in range(num_tasks)
      ]
    )  # [T, B, H]
    a = p[f"stitch_{l}"]["alpha"]
    mixed = np.einsum("tsh,sbh->tbh", a, h) if channel_wise else np.einsum("ts,sbh->tbh", a, h)
    cols = list(mixed)
  out = []
  for t in range(num_tasks):
    y = cols[t]
    for i in range(tower_len):
      layer = p[f"tower_{t}"][f"Dense_{i}"]
      y = y @ layer["kernel"] + layer["bias"]
      if i < tower_len - 1:
        y = np.maximum(y, 0.0)
    out.append(y[:, 0])
  return np.stack(out), np.stack(cols)


@pytest.mark.parametrize("channel_wise", [False, True])
def test_forward_matches_numpy_float64_reference(channel_wise):
  with jax.enable_x64(True):
    model = models.CrossStitch(num_tasks=3, hidden=(6, 5), tower=(3, 1), channel_wise=channel_wise)
    x = _x()
    params = _random_params(model, x, jnp.float64)
    got, aux = model.apply({"params": params}, x)
    want, cols = _np_forward(params, x, 3, (6, 5), 2, channel_wise)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(np.asarray(aux["columns"]), cols, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("num_tasks", [1, 2, 4])
def test_the_papers_initialization(num_tasks):
  model = models.CrossStitch(num_tasks=num_tasks, hidden=(3,), tower=(1,), alpha_same=0.9)
  alpha = np.asarray(model.init(jax.random.key(0), _x())["params"]["stitch_0"]["alpha"])
  assert alpha.shape == (num_tasks, num_tasks)
  np.testing.assert_allclose(alpha.sum(axis=1), 1.0, rtol=1e-6)  # rows sum to one
  if num_tasks == 1:
    assert alpha[0, 0] == 1.0
  else:
    np.testing.assert_allclose(np.diag(alpha), 0.9, rtol=1e-6)
    np.testing.assert_allclose(alpha[~np.eye(num_tasks, dtype=bool)], 0.1 / (num_tasks - 1), rtol=1e-6)
  channel = models.CrossStitch(num_tasks=num_tasks, hidden=(3,), tower=(1,), channel_wise=True)
  a3 = np.asarray(channel.init(jax.random.key(0), _x())["params"]["stitch_0"]["alpha"])
  assert a3.shape == (num_tasks, num_tasks, 3) and np.allclose(a3, alpha[:, :, None])


def test_identity_units_are_separate_networks():
  """At alpha = I task t reads only column t: no gradient reaches the other columns, and its output
  is a plain MLP of its own column (the paper's 'separate networks' end of the spectrum)."""
  model = models.CrossStitch(num_tasks=3, hidden=(6, 5), tower=(1,), alpha_same=1.0)
  x = _x()
  params = _random_params(model, x, jnp.float32)
  params = {**params, **{f"stitch_{l}": {"alpha": jnp.eye(3)} for l in range(2)}}
  for t in range(3):
    g = jax.grad(lambda p: jnp.sum(model.apply({"params": p}, x)[0][t]))(params)
    for s in range(3):
      norm = sum(float(jnp.abs(g[f"column_{s}_dense_{l}"]["kernel"]).sum()) for l in range(2))
      assert (norm > 0) == (s == t), (t, s, norm)
    # a separate MLP of column t
    h = x
    for l in range(2):
      layer = params[f"column_{t}_dense_{l}"]
      h = jax.nn.relu(h @ layer["kernel"] + layer["bias"][None])
    head = params[f"tower_{t}"]["Dense_0"]
    y = (h @ head["kernel"] + head["bias"][None])[:, 0]
    np.testing.assert_allclose(model.apply({"params": params}, x)[0][t], y, rtol=1e-5, atol=1e-6)
  # with the initialization (0.9 / 0.05) every task reaches every column
  p0 = model.clone(alpha_same=0.9).init(jax.random.key(0), x)["params"]
  g = jax.grad(lambda p: jnp.sum(model.apply({"params": p}, x)[0][0]))(p0)
  assert float(jnp.abs(g["column_2_dense_0"]["kernel"]).sum()) > 0
  assert float(jnp.abs(g["stitch_1"]["alpha"]).sum()) > 0  # the units learn


def test_feature_input_dropout_and_registry():
  spec = models.FeatureSpec(categorical=(models.Categorical("user", 10, 3),), dense=(models.Dense("d", 2),))
  model = models.get("cross_stitch", num_tasks=2, hidden=(4,), tower=(1,), features=spec, dropout=0.5)
  assert type(model) is models.CrossStitch
  x = {"user": jnp.array([1, 2, 3]), "d": jnp.ones((3, 2))}
  variables = model.init(jax.random.key(0), x)
  a = model.apply(variables, x, train=True, rngs={"dropout": jax.random.key(1)})[0]
  b = model.apply(variables, x, train=True, rngs={"dropout": jax.random.key(2)})[0]
  assert a.shape == (2, 3) and not np.allclose(a, b)
  np.testing.assert_array_equal(model.apply(variables, x)[0], model.apply(variables, x)[0])


@pytest.mark.parametrize(
  "kw, match",
  [
    (dict(num_tasks=0), "num_tasks >= 1"),
    (dict(hidden=()), "at least one hidden layer"),
    (dict(alpha_same=1.5), r"alpha_same must be in \[0, 1\]"),
    (dict(tower=(4,)), "tower widths must end in 1"),
  ],
)
def test_errors(kw, match):
  with pytest.raises(ValueError, match=match):
    models.CrossStitch(**{"num_tasks": 2, **kw}).init(jax.random.key(0), _x())
