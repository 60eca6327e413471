"""DSelect-k (Hazimeh et al., NeurIPS 2021): the smooth-step, the gates and the model against NumPy
float64, selection of at most k experts at convergence, the penalties and their path into the loss."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mtjax import losses
from mtjax import models


def np_smooth_step(t, gamma):
  t = np.asarray(t, np.float64)
  poly = -2.0 / gamma**3 * t**3 + 1.5 / gamma * t + 0.5
  return np.where(t <= -gamma / 2, 0.0, np.where(t >= gamma / 2, 1.0, poly))


def np_gate(z, w, n, gamma):
  """z [..., k, m], w [..., k] -> weights [..., n], selectors [..., k, n] (the paper's formulas)."""
  m = z.shape[-1]
  codes = np.array([[int(c) for c in np.binary_repr(j, width=m)] for j in range(n)])  # MSB first
  s = np_smooth_step(z, gamma)[..., None, :]  # [..., k, 1, m]
  sel = np.prod(np.where(codes == 1, s, 1.0 - s), axis=-1)
  soft = np.exp(w - w.max(-1, keepdims=True))
  soft /= soft.sum(-1, keepdims=True)
  return np.einsum("...i,...ij->...j", soft, sel), sel


def test_smooth_step_matches_the_formula_and_is_c1():
  with jax.enable_x64(True):
    for gamma in (0.5, 1.0, 3.0):
      t = np.linspace(-2 * gamma, 2 * gamma, 101)
      np.testing.assert_allclose(models.smooth_step(jnp.asarray(t), gamma), np_smooth_step(t, gamma), atol=1e-15)
      d = jax.vmap(jax.grad(lambda v: models.smooth_step(v, gamma)))(jnp.asarray([-gamma / 2, 0.0, gamma / 2]))
      np.testing.assert_allclose(d, [0.0, 1.5 / gamma, 0.0], atol=1e-12)  # flat at the band's edges


@pytest.mark.parametrize("num_experts,k,per_example", [(4, 2, False), (8, 3, True), (5, 2, False), (6, 2, True)])
def test_gate_matches_numpy_float64(num_experts, k, per_example):
  with jax.enable_x64(True):
    gate = models.DSelectKGate(num_experts, k, gamma=1.5, entropy_reg=0.1, per_example=per_example)
    x = jnp.asarray(np.random.default_rng(0).normal(size=(4, 3)))
    shapes = jax.eval_shape(gate.init, jax.random.key(0), x)["params"]
    rng = np.random.default_rng(1)
    params = jax.tree.map(lambda a: jnp.asarray(rng.normal(0, 0.6, a.shape), jnp.float64), shapes)
    weights, penalty = gate.apply({"params": params}, x)
    p = jax.tree.map(np.asarray, params)
    m = int(np.ceil(np.log2(num_experts)))
    if per_example:
      z = (np.asarray(x) @ p["z"]["kernel"] + p["z"]["bias"]).reshape(4, k, m)
      w = np.asarray(x) @ p["w"]["kernel"] + p["w"]["bias"]
    else:
      z, w = p["z"], p["w"]
    want, sel = np_gate(z, w, num_experts, 1.5)
    np.testing.assert_allclose(weights, np.broadcast_to(want, (4, num_experts)), rtol=1e-12, atol=1e-14)
    entropy = -np.sum(sel * np.log(sel + 1e-6), axis=(-2, -1))
    want_penalty = 0.1 * np.mean(entropy)
    if num_experts != 2**m:  # the reachability term of the paper's code
      want_penalty += np.mean(np.sum(1.0 / (sel.sum(-1) + 1e-6), axis=-1))
    np.testing.assert_allclose(penalty, want_penalty, rtol=1e-12)
    if num_experts == 2**m:
      np.testing.assert_allclose(np.sum(weights, -1), 1.0, rtol=1e-12)


def test_the_papers_initialization():
  gate = models.DSelectKGate(8, 3, gamma=2.0)
  params = gate.init(jax.random.key(0), jnp.ones((2, 3)))["params"]
  assert params["z"].shape == (3, 3) and params["w"].shape == (3,)
  assert float(jnp.max(jnp.abs(params["z"]))) <= 2.0 / 100 and float(jnp.max(jnp.abs(params["w"]))) <= 0.05
  weights, _ = gate.apply({"params": params}, jnp.ones((2, 3)))
  np.testing.assert_allclose(weights, 1.0 / 8, atol=0.02)  # near uniform at the start


def test_binary_selectors_pick_exactly_k_experts():
  """Every z outside the smooth-step band: each selector is one expert, the gate has k non-zeros."""
  gate = models.DSelectKGate(8, 3, gamma=1.0)
  codes = np.array([[0, 0, 1], [1, 0, 1], [1, 1, 0]])  # experts 1, 5, 6
  params = {"z": jnp.asarray(np.where(codes, 0.7, -0.7), jnp.float32), "w": jnp.array([0.1, 0.5, -0.2])}
  weights, _ = gate.apply({"params": params}, jnp.ones((1, 3)))
  assert set(np.flatnonzero(np.asarray(weights[0]))) == {1, 5, 6}
  np.testing.assert_allclose(weights[0, [1, 5, 6]], jax.nn.softmax(params["w"]), rtol=1e-6)
  # two selectors on the same expert: fewer than k non-zeros, never more
  params["z"] = jnp.asarray(np.where(codes[[0, 0, 2]], 0.7, -0.7), jnp.float32)
  weights, _ = gate.apply({"params": params}, jnp.ones((1, 3)))
  assert set(np.flatnonzero(np.asarray(weights[0]))) == {1, 6}


def _train_gate(params, steps=3000):
  n, k = 8, 2
  rng = np.random.default_rng(0)
  experts = jnp.asarray(rng.normal(size=(n, 16)), jnp.float32)
  target = 0.6 * experts[2] + 0.4 * experts[5]
  gate = models.DSelectKGate(n, k, gamma=1.0, entropy_reg=1e-2)
  params = params if params is not None else gate.init(jax.random.key(0), jnp.ones((1, 1)))["params"]
  tx = optax.adam(0.05)

  def loss(p):
    weights, penalty = gate.apply({"params": p}, jnp.ones((1, 1)))
    return jnp.mean((weights[0] @ experts - target) ** 2) + penalty

  def step(carry, _):
    p, s = carry
    value, g = jax.value_and_grad(loss)(p)
    u, s = tx.update(g, s, p)
    return (optax.apply_updates(p, u), s), value

  (final, _), curve = jax.jit(lambda c: jax.lax.scan(step, c, None, length=steps))((params, tx.init(params)))
  weights, _ = gate.apply({"params": final}, jnp.ones((1, 1)))
  return final, np.asarray(weights[0]), np.asarray(curve)


def test_training_converges_to_at_most_k_experts():
  """A static gate trained with the entropy penalty ends with every z outside the smooth-step band,
  so with at most k non-zero weights (the paper's k-sparse convergence). From the paper's
  initialization both selectors follow the same gradient to the target's larger expert (a local
  optimum); started in different halves of the code space they find both of its experts."""
  final, weights, curve = _train_gate(None)
  assert np.all(np.abs(np.asarray(final["z"])) >= 0.5)  # binary: outside (-gamma/2, gamma/2)
  assert 1 <= np.count_nonzero(weights) <= 2 and weights[2] > 0.5
  assert curve[-1] < 0.25 * curve[0]
  apart = {"z": jnp.array([[-0.1, 0.1, -0.1], [0.1, -0.1, 0.1]]), "w": jnp.zeros(2)}  # near codes 010 and 101
  final, weights, curve = _train_gate(apart)
  assert np.all(np.abs(np.asarray(final["z"])) >= 0.5)
  assert set(np.flatnonzero(weights)) == {2, 5}  # exactly k = 2 experts: the target's
  np.testing.assert_allclose(weights[[2, 5]], [0.6, 0.4], atol=1e-3)
  assert curve[-1] < 1e-5


def test_model_forward_matches_numpy_and_adds_its_penalty_to_the_loss():
  with jax.enable_x64(True):
    model = models.DSelectK(num_tasks=2, num_experts=4, k=2, expert=(5,), tower=(1,), entropy_reg=0.3)
    x = jnp.asarray(np.random.default_rng(2).normal(size=(6, 3)))
    shapes = jax.eval_shape(model.init, jax.random.key(0), x)["params"]
    rng = np.random.default_rng(3)
    params = jax.tree.map(lambda a: jnp.asarray(rng.normal(0, 0.6, a.shape), jnp.float64), shapes)
    out, aux = model.apply({"params": params}, x)
    p = jax.tree.map(np.asarray, params)
    ex = np.stack(
      [
        np.maximum(
          np.asarray(x) @ p["experts"][f"expert_{e}"]["Dense_0"]["kernel"]
          + p["experts"][f"expert_{e}"]["Dense_0"]["bias"],
          0,
        )
        for e in range(4)
      ]
    )
    for t in range(2):
      q, sel = np_gate(p[f"gate_{t}"]["z"], p[f"gate_{t}"]["w"], 4, 1.0)
      mixed = np.einsum("e,ebh->bh", q, ex)
      y = mixed @ p[f"tower_{t}"]["Dense_0"]["kernel"][:, 0] + p[f"tower_{t}"]["Dense_0"]["bias"][0]
      np.testing.assert_allclose(out[t], y, rtol=1e-12, atol=1e-12)
      np.testing.assert_allclose(aux["regularization"][t], 0.3 * -np.sum(sel * np.log(sel + 1e-6)), rtol=1e-12)
    labels = jnp.asarray(np.random.default_rng(4).random((2, 6)) < 0.5, jnp.float64)
    batch = {"x": x, "labels": labels}
    plain = losses.per_task_loss(out, labels, None, task_losses="bce")
    np.testing.assert_allclose(
      losses.make_loss_fn(model, "bce", has_aux=False)(params, batch), plain + aux["regularization"]
    )
    np.testing.assert_allclose(
      losses.make_loss_fn(model, "bce", has_aux=False, regularization_key=None)(params, batch), plain
    )


def test_errors():
  x = jnp.ones((2, 3))
  with pytest.raises(ValueError, match="1 <= k <= num_experts"):
    models.DSelectK(num_tasks=2, num_experts=4, k=5).init(jax.random.key(0), x)
  with pytest.raises(ValueError, match="gamma > 0"):
    models.DSelectKGate(4, 2, gamma=0.0).init(jax.random.key(0), x)

  def bad_model(variables, x, train=False):
    return jnp.zeros((2, 2)), {"regularization": jnp.zeros(())}

  with pytest.raises(ValueError, match=r"aux\['regularization'\] has shape \(\); it must hold one penalty per task"):
    losses.make_loss_fn(bad_model, "bce", has_aux=False)({}, {"x": x, "labels": jnp.zeros((2, 2))})
