"""MoDo against a plain NumPy float64 reference (the whole lambda trajectory), and the conformance checks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mtjax
from tests.transforms import micro_batch_checks as checks

SHAPES = {"bottom": {"kernel": (3, 2), "bias": (2,)}, "tower_0": {"kernel": (2,)}, "tower_1": {"kernel": (2, 2)}}
SHARED = {"bottom": {"kernel": True, "bias": True}, "tower_0": {"kernel": False}, "tower_1": {"kernel": False}}


def np_project_simplex(v):
  """Euclidean projection onto the probability simplex by bisection on the threshold (independent of solvers.py)."""
  lo, hi = np.min(v) - 1.0, np.max(v)
  for _ in range(200):
    tau = 0.5 * (lo + hi)
    if np.sum(np.maximum(v - tau, 0.0)) > 1.0:
      lo = tau
    else:
      hi = tau
  return np.maximum(v - 0.5 * (lo + hi), 0.0)


def sample(m, t, steps, seed):
  rng = np.random.default_rng(seed)
  return [
    {n: {k: rng.normal(size=(m, t) + s) for k, s in leaves.items()} for n, leaves in SHAPES.items()}
    for _ in range(steps)
  ]


def np_modo(seq, *, gamma, rho, num_batches):
  """Loops over tasks and leaves: lambda <- Proj(lambda - gamma (G12 lambda + rho lambda)), d = J3^T lambda."""
  t = next(iter(seq[0]["bottom"].values())).shape[1]
  lam = np.full(t, 1.0 / t)
  out = []
  for grads in seq:
    g12 = np.zeros((t, t))
    for i in range(t):
      for j in range(t):
        g12[i, j] = sum(np.sum(grads["bottom"][k][0, i] * grads["bottom"][k][1, j]) for k in SHAPES["bottom"])
    lam = np_project_simplex(lam - gamma * (g12 @ lam + rho * lam))
    batches = [2] if num_batches == 3 else [0, 1]
    update = {}
    for n, leaves in grads.items():
      for k, g in leaves.items():
        acc = np.zeros(g.shape[2:])
        for b in batches:
          for i in range(t):
            acc = acc + (lam[i] if SHARED[n][k] else 1.0) * g[b, i]
        update[(n, k)] = acc / len(batches)
    out.append((update, lam.copy()))
  return out


@pytest.mark.parametrize("num_batches,gamma,rho,t", [(3, 0.05, 0.1, 3), (2, 0.2, 0.0, 4), (3, 1e-3, 0.1, 2)])
def test_matches_numpy_reference(num_batches, gamma, rho, t):
  with jax.enable_x64(True):
    seq = sample(num_batches, t, 5, seed=t)
    ref = np_modo(seq, gamma=gamma, rho=rho, num_batches=num_batches)
    tx = mtjax.modo(num_tasks=t, gamma=gamma, rho=rho, num_batches=num_batches, shared=SHARED)
    params = jax.tree.map(lambda s: jnp.zeros(s), SHAPES, is_leaf=lambda x: isinstance(x, tuple))
    state = tx.init(params)
    step = jax.jit(tx.update)
    for k, (grads, (r_update, r_lam)) in enumerate(zip(seq, ref)):
      update, state = step(grads, state, params)
      np.testing.assert_allclose(np.asarray(state.weights), r_lam, rtol=1e-10, atol=1e-12, err_msg=f"step {k}")
      for (n, leaf), r in r_update.items():
        np.testing.assert_allclose(np.asarray(update[n][leaf]), r, rtol=1e-10, atol=1e-12, err_msg=f"{k} {n}")
    assert not np.allclose(ref[-1][1], np.full(t, 1.0 / t))  # the weights did move


@pytest.mark.slow  # compiles task_grads and jacrev (~10 s)
def test_end_to_end_with_micro_batch_task_grads():
  """From a loss: micro_batch_task_grads splits the batch, MoDo uses batches 0/1 for lambda and 2 for d."""
  with jax.enable_x64(True):
    rng = np.random.default_rng(0)
    params = {"w": jnp.asarray(rng.normal(size=(3,))), "heads": jnp.asarray(rng.normal(size=(2,)))}
    batch = {"x": jnp.asarray(rng.normal(size=(6, 3))), "y": jnp.asarray(rng.normal(size=(6, 2)))}

    def loss_fn(p, b):
      z = jnp.tanh(b["x"] @ p["w"])
      return jnp.mean((z[:, None] * p["heads"][None] - b["y"]) ** 2, axis=0)

    losses, grads = jax.jit(mtjax.micro_batch_task_grads(mtjax.task_grads(loss_fn), 3))(params, batch)
    assert losses.shape == (3, 2) and grads["w"].shape == (3, 2, 3)
    tx = mtjax.modo(num_tasks=2, gamma=0.5, rho=0.1, shared={"w": True, "heads": False})
    d, state = tx.update(grads, tx.init(params), params, task_losses=losses)
    jacs = jax.jit(
      lambda p, b: [jax.jacrev(loss_fn)(p, jax.tree.map(lambda x: x[2 * m : 2 * m + 2], b))["w"] for m in range(3)]
    )(params, batch)
    jac = [np.asarray(x) for x in jacs]
    lam = np_project_simplex(np.full(2, 0.5) - 0.5 * (jac[0] @ jac[1].T @ np.full(2, 0.5) + 0.05))
    np.testing.assert_allclose(np.asarray(state.weights), lam, rtol=1e-10)
    np.testing.assert_allclose(np.asarray(d["w"]), jac[2].T @ lam, rtol=1e-10)


FACTORY = mtjax.modo


def test_chain_extra_args_no_retrace():
  checks.check_chain_extra_args_no_retrace(FACTORY, 3)


def test_inject_hyperparams():
  checks.check_inject_hyperparams(FACTORY, 3, dict(gamma=0.1, rho=0.2), static=("num_tasks", "num_batches"))


def test_float32_and_float64():
  checks.check_float32_float64(lambda **kw: FACTORY(gamma=0.01, **kw), 3)


def test_edge_gradients():
  # lambda's step depends on the gradients' scale (gamma is not scale free): no homogeneity check.
  checks.check_edge_gradients(FACTORY, 3, degree_one=False)
  checks.check_edge_gradients(lambda **kw: FACTORY(gamma=0.0, **kw), 3, degree_one=True)


def test_one_and_many_tasks():
  checks.check_task_counts(FACTORY, 3)
  checks.check_task_counts(lambda **kw: FACTORY(num_batches=2, **kw), 2)


@pytest.mark.parametrize("num_batches", [3, 2])
def test_toy_convergence(num_batches):
  checks.check_toy_convergence(lambda **kw: FACTORY(gamma=0.1, num_batches=num_batches, **kw), num_batches)


def test_bad_input():
  checks.check_bad_input(FACTORY, 3, "modo")
  checks.check_bad_input(lambda **kw: FACTORY(**{"num_batches": 2, **kw}), 2, "modo")
  with pytest.raises(ValueError, match="mtjax: modo: rho"):
    FACTORY(num_tasks=2, rho=float("nan"))


def test_nonfinite_inputs_raise():
  checks.check_nonfinite(FACTORY, 3, "modo")


def test_state_contract():
  checks.check_state_contract(FACTORY, 3, mtjax.MoDoState)
