"""SNR (Ma et al., AAAI 2019): a NumPy float64 forward reference at evaluation, gates exactly 0 or 1
at evaluation, the hard-concrete sampler against its formula and its law, the L0 penalty's closed
form and its path into the loss, SNR-Aver, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtjax import losses
from mtjax import models

BETA, GAMMA, ZETA = 2 / 3, -0.1, 1.1


def _np_sigmoid(v):
  return 1.0 / (1.0 + np.exp(-v))


def _np_mlp(p, h):
  for i in range(len(p)):
    h = np.maximum(h @ p[f"Dense_{i}"]["kernel"] + p[f"Dense_{i}"]["bias"], 0.0)
  return h


def _random_params(model, x, dtype, seed=1):
  shapes = jax.eval_shape(model.init, jax.random.key(0), x)["params"]
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda a: jnp.asarray(rng.normal(0, 0.7, a.shape), dtype), shapes)


def _np_forward(p, x, sizes, num_tasks, variant, gates):
  """The eval forward in NumPy float64; ``gates(log_alpha)`` gives z."""
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), p)
  u = np.stack([_np_mlp(p[f"level_0_subnet_{i}"], np.asarray(x, np.float64)) for i in range(sizes[0])])

  def route(q, u):
    z = gates(q["log_alpha"])
    if variant == "trans":
      return np.einsum("ij,ibh,ijhk->jbk", z, u, q["kernel"]) + q["bias"][:, None, :], z
    return np.einsum("ij,ibh->jbh", z, u), z

  for l in range(1, len(sizes)):
    v, _ = route(p[f"routing_{l - 1}"], u)
    u = np.stack([_np_mlp(p[f"level_{l}_subnet_{i}"], v[i]) for i in range(sizes[l])])
  v, _ = route(p["routing_tasks"], u)
  out = [
    (v[t] @ p[f"tower_{t}"]["Dense_0"]["kernel"] + p[f"tower_{t}"]["Dense_0"]["bias"])[:, 0] for t in range(num_tasks)
  ]
  return np.stack(out)


@pytest.mark.parametrize("variant", ["trans", "aver"])
@pytest.mark.parametrize("eval_gates", ["binary", "expected"])
def test_eval_forward_matches_numpy_float64(variant, eval_gates):
  with jax.enable_x64(True):
    sizes = (3, 2)
    model = models.SNR(num_tasks=2, num_subnetworks=sizes, subnetwork=(4,), tower=(1,), variant=variant,
                       eval_gates=eval_gates)  # fmt: skip
    x = jnp.asarray(np.random.default_rng(0).normal(size=(5, 3)))
    params = _random_params(model, x, jnp.float64)
    got, aux = model.apply({"params": params}, x)
    if eval_gates == "binary":
      gates = lambda q: (q > 0).astype(np.float64)  # noqa: E731
    else:
      gates = lambda q: np.clip(_np_sigmoid(q) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)  # noqa: E731
    np.testing.assert_allclose(got, _np_forward(params, x, sizes, 2, variant, gates), rtol=1e-12, atol=1e-12)
    if eval_gates == "binary":  # exactly 0 or 1, and the open ones are those with log alpha > 0
      for z, q in zip(aux["gates"], (params["routing_0"]["log_alpha"], params["routing_tasks"]["log_alpha"])):
        assert set(np.unique(np.asarray(z))) <= {0.0, 1.0}
        np.testing.assert_array_equal(np.asarray(z), np.asarray(q) > 0)


def test_l0_penalty_closed_form_and_its_path_into_the_loss():
  with jax.enable_x64(True):
    model = models.SNR(num_tasks=3, num_subnetworks=(2, 2), subnetwork=(4,), tower=(1,), l0_weight=0.01)
    x = jnp.asarray(np.random.default_rng(1).normal(size=(4, 3)))
    params = _random_params(model, x, jnp.float64)
    out, aux = model.apply({"params": params}, x)
    shift = BETA * np.log(-GAMMA / ZETA)
    open_prob = lambda q: _np_sigmoid(np.asarray(q) - shift)  # noqa: E731
    shared = open_prob(params["routing_0"]["log_alpha"]).sum()
    per_task = open_prob(params["routing_tasks"]["log_alpha"]).sum(0)  # column t: the gates into task t
    np.testing.assert_allclose(aux["regularization"], 0.01 * (per_task + shared / 3), rtol=1e-12)
    np.testing.assert_allclose(
      models.hard_concrete_l0(params["routing_0"]["log_alpha"], beta=BETA, gamma=GAMMA, zeta=ZETA), shared
    )
    labels = jnp.asarray(np.random.default_rng(2).random((3, 4)) < 0.5, jnp.float64)
    plain = losses.per_task_loss(out, labels)
    fn = losses.make_loss_fn(model, "bce", has_aux=False)
    np.testing.assert_allclose(fn(params, {"x": x, "labels": labels}), plain + aux["regularization"], rtol=1e-12)
    np.testing.assert_allclose(models.SNR.add_l0(plain, aux), plain + aux["regularization"])
    # the penalty's gradient reaches log alpha (it closes gates)
    g = jax.grad(lambda p: fn(p, {"x": x, "labels": labels}).sum())(params)
    assert float(jnp.abs(g["routing_tasks"]["log_alpha"]).sum()) > 0


def test_hard_concrete_sampler_formula_and_law():
  with jax.enable_x64(True):
    key = jax.random.key(3)
    log_alpha = jnp.asarray(np.linspace(-3, 3, 7))
    z = models.hard_concrete_sample(log_alpha, key, beta=BETA, gamma=GAMMA, zeta=ZETA)
    u = np.asarray(jax.random.uniform(key, (7,), jnp.float64, minval=1e-6, maxval=1 - 1e-6))
    s = _np_sigmoid((np.log(u) - np.log1p(-u) + np.asarray(log_alpha)) / BETA)
    np.testing.assert_allclose(z, np.clip(s * (ZETA - GAMMA) + GAMMA, 0, 1), rtol=1e-12)
    # P(z != 0) = sigmoid(log alpha - beta log(-gamma / zeta)): the law behind the L0 penalty
    keys = jax.random.split(jax.random.key(4), 20000)
    q = jnp.array([-1.0, 0.0, 2.0])
    draws = jax.vmap(lambda k: models.hard_concrete_sample(q, k, beta=BETA, gamma=GAMMA, zeta=ZETA))(keys)
    rate = np.mean(np.asarray(draws) > 0, axis=0)
    want = _np_sigmoid(np.asarray(q) - BETA * np.log(-GAMMA / ZETA))
    np.testing.assert_allclose(rate, want, atol=4 * np.sqrt(0.25 / 20000))
    assert np.mean(np.asarray(draws) == 0) > 0.05 and np.mean(np.asarray(draws) == 1) > 0.05  # exact 0s and 1s


def test_training_samples_gates_and_needs_a_dropout_rng():
  model = models.SNR(num_tasks=2, num_subnetworks=(3,), subnetwork=(4,), tower=(1,))
  x = jnp.ones((4, 3))
  variables = model.init(jax.random.key(0), x)
  _, a1 = model.apply(variables, x, train=True, rngs={"dropout": jax.random.key(1)})
  _, a2 = model.apply(variables, x, train=True, rngs={"dropout": jax.random.key(2)})
  assert not np.allclose(a1["gates"][-1], a2["gates"][-1])  # sampled
  assert np.all((np.asarray(a1["gates"][-1]) >= 0) & (np.asarray(a1["gates"][-1]) <= 1))
  with pytest.raises(ValueError, match="pass a 'dropout' RNG"):
    model.apply(variables, x, train=True)


def test_closed_gates_cut_the_task_off_from_a_subnetwork():
  model = models.SNR(num_tasks=2, num_subnetworks=(3,), subnetwork=(4,), tower=(1,))
  x = jnp.asarray(np.random.default_rng(5).normal(size=(4, 3)), jnp.float32)
  params = model.init(jax.random.key(0), x)["params"]
  la = np.full((3, 2), 3.0, np.float32)
  la[1, 0] = -3.0  # task 0 does not read sub-network 1
  params = {**params, "routing_tasks": {**params["routing_tasks"], "log_alpha": jnp.asarray(la)}}
  g = jax.grad(lambda p: model.apply({"params": p}, x)[0][0].sum())(params)
  assert float(jnp.abs(g["level_0_subnet_1"]["Dense_0"]["kernel"]).sum()) == 0.0
  assert float(jnp.abs(g["level_0_subnet_0"]["Dense_0"]["kernel"]).sum()) > 0.0
  g1 = jax.grad(lambda p: model.apply({"params": p}, x)[0][1].sum())(params)
  assert float(jnp.abs(g1["level_0_subnet_1"]["Dense_0"]["kernel"]).sum()) > 0.0


@pytest.mark.parametrize(
  "kw, match",
  [
    (dict(num_subnetworks=()), "num_subnetworks >= 1 per level"),
    (dict(variant="mean"), "'trans' or 'aver'"),
    (dict(eval_gates="soft"), "'binary' or 'expected'"),
    (dict(subnetwork=()), "at least one layer width"),
  ],
)
def test_errors(kw, match):
  with pytest.raises(ValueError, match=match):
    models.SNR(**{"num_tasks": 2, **kw}).init(jax.random.key(0), jnp.ones((2, 3)))
