"""MoCo against a plain NumPy float64 reference that loops over tasks and steps (the whole trajectory of
updates, tracked gradients and weights), on a multi-leaf pytree; init dtypes, jit with donation, the toy
problem with the paper's default, deferred gradients, errors."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import mtjax

SHAPES = {"bottom": {"kernel": (3, 2), "bias": (2,)}, "tower_0": {"kernel": (2,)}, "tower_1": {"kernel": (2, 2)}}
PATHS = [("bottom", "bias"), ("bottom", "kernel"), ("tower_0", "kernel"), ("tower_1", "kernel")]  # flattening order
TOWERS = mtjax.shared_mask(exclude="tower_")


def _sample(num_tasks, num_steps, seed, scale=1.0):
  rng = np.random.default_rng(seed)
  steps = []
  for _ in range(num_steps):
    grads = {
      name: {leaf: scale * rng.normal(size=(num_tasks,) + shape) for leaf, shape in leaves.items()}
      for name, leaves in SHAPES.items()
    }
    steps.append((grads, rng.uniform(0.1, 3.0, size=num_tasks)))
  return steps


def _params(dtype=np.float64):
  return {name: {leaf: np.zeros(shape, dtype) for leaf, shape in leaves.items()} for name, leaves in SHAPES.items()}


def np_project_simplex(v):
  """Euclidean projection on the simplex by bisection on the threshold (not the sort-based formula)."""
  v = np.asarray(v, np.float64)
  lo, hi = np.min(v) - 1.0, np.max(v)
  for _ in range(200):
    tau = 0.5 * (lo + hi)
    if np.sum(np.maximum(v - tau, 0.0)) > 1.0:
      lo = tau
    else:
      hi = tau
  return np.maximum(v - 0.5 * (lo + hi), 0.0)


def np_moco(
  steps,
  *,
  beta=0.5,
  gamma=0.1,
  rho=0.0,
  beta_decay=0.5,
  gamma_decay=0.5,
  normalization="none",
  simplex="projection",
  shared_names=None,
  task_specific="sum",
):
  """Float64 reference, task by task: y_i <- y_i - beta_k (y_i - h_i); lambda step; d = sum_i lambda_i y_i."""
  num_tasks = steps[0][1].shape[0]
  shared_names = set(SHAPES) if shared_names is None else set(shared_names)
  y = {p: np.zeros((num_tasks,) + SHAPES[p[0]][p[1]]) for p in PATHS}
  lam = np.full(num_tasks, 1.0 / num_tasks)
  history = []
  for k, (grads, losses) in enumerate(steps, start=1):
    beta_k = beta / k**beta_decay
    gamma_k = gamma / k**gamma_decay
    for i in range(num_tasks):
      norm = np.sqrt(sum(np.sum(grads[a][b][i] ** 2) for a, b in PATHS if a in shared_names))
      for a, b in PATHS:
        h = grads[a][b][i]
        if normalization == "loss":
          h = h * losses[i] / norm if norm > 0 else 0.0 * h
        y[(a, b)][i] = y[(a, b)][i] - beta_k * (y[(a, b)][i] - h)
    gram = np.zeros((num_tasks, num_tasks))
    for i in range(num_tasks):
      for j in range(num_tasks):
        gram[i, j] = sum(float(np.sum(y[(a, b)][i] * y[(a, b)][j])) for a, b in PATHS if a in shared_names)
    v = lam - gamma_k * (gram @ lam + rho * lam)
    if simplex == "projection":
      lam = np_project_simplex(v)
    else:
      e = np.exp(v - np.max(v))
      lam = e / e.sum()
    update = {}
    for a, b in PATHS:
      if a in shared_names or task_specific == "weighted":
        val = sum(lam[i] * y[(a, b)][i] for i in range(num_tasks))
      else:
        val = sum(grads[a][b][i] for i in range(num_tasks))
      update.setdefault(a, {})[b] = val
    history.append((update, {p: v.copy() for p, v in y.items()}, lam.copy()))
  return history


VARIANTS = {
  "paper": dict(),
  "loss": dict(normalization="loss"),
  "softmax": dict(simplex="softmax", normalization="loss"),
  "rho-constant": dict(rho=0.3, beta=0.2, gamma=0.05, beta_decay=0.0, gamma_decay=0.0),
  "towers-sum": dict(shared=TOWERS),
  "towers-weighted": dict(shared=TOWERS, task_specific="weighted", rho=0.1),
}


@pytest.mark.parametrize("variant,num_tasks", [(v, 3) for v in VARIANTS] + [("paper", 1)])
def test_matches_numpy_reference_trajectory(variant, num_tasks):
  kwargs = dict(VARIANTS[variant])
  ref_kwargs = {k: v for k, v in kwargs.items() if k != "shared"}
  if "shared" in kwargs:
    ref_kwargs["shared_names"] = ["bottom"]
  steps = _sample(num_tasks, 6, seed=num_tasks)
  expected = np_moco(steps, **ref_kwargs)
  with jax.enable_x64(True):
    tx = mtjax.moco(num_tasks=num_tasks, **kwargs)
    params = _params()
    state = tx.init(params)
    step = jax.jit(tx.update)
    for k, ((grads, losses), (upd, y, lam)) in enumerate(zip(steps, expected)):
      updates, state = step(grads, state, params, task_losses=losses)
      for a, b in PATHS:
        np.testing.assert_allclose(updates[a][b], upd[a][b], rtol=1e-10, atol=1e-12, err_msg=f"{variant} {k} {a}/{b}")
        np.testing.assert_allclose(state.tracked[a][b], y[(a, b)], rtol=1e-10, atol=1e-12)
        assert updates[a][b].dtype == jnp.float64 and state.tracked[a][b].dtype == jnp.float64
      np.testing.assert_allclose(state.weights, lam, rtol=1e-10, atol=1e-12, err_msg=f"{variant} step {k}")
      assert int(state.count) == k + 1
      np.testing.assert_allclose(np.sum(state.weights), 1.0, rtol=1e-12)


def test_init_dtypes_and_shapes():
  params = {"a": jnp.zeros((2, 3), jnp.bfloat16), "b": jnp.zeros((4,), jnp.float32)}
  state = mtjax.moco(num_tasks=3).init(params)
  assert state.tracked["a"].shape == (3, 2, 3) and state.tracked["a"].dtype == jnp.bfloat16
  assert state.tracked["b"].shape == (3, 4) and state.tracked["b"].dtype == jnp.float32
  assert state.weights.dtype == jnp.float32 and state.count.dtype == jnp.int32
  np.testing.assert_allclose(state.weights, np.full(3, 1 / 3))
  with jax.enable_x64(True):
    state = mtjax.moco(num_tasks=2).init({"w": jnp.zeros(3, jnp.float64)})
    assert state.tracked["w"].dtype == jnp.float64 and state.weights.dtype == jnp.float64


def test_bfloat16_gradients_keep_their_dtype():
  params = {"w": jnp.zeros((4,), jnp.bfloat16)}
  grads = {"w": jnp.asarray(np.random.default_rng(0).normal(size=(2, 4)), jnp.bfloat16)}
  tx = mtjax.moco(num_tasks=2)
  updates, state = jax.jit(tx.update)(grads, tx.init(params), params)
  assert updates["w"].dtype == jnp.bfloat16 and state.tracked["w"].dtype == jnp.bfloat16
  assert state.weights.dtype == jnp.float32


def test_jit_with_donated_state():
  params = {"w": jnp.zeros(3), "b": jnp.zeros(2)}
  grads = {"w": jnp.array([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]]), "b": jnp.array([[1.0, 0.0], [0.0, 1.0]])}
  tx = mtjax.moco(num_tasks=2)
  state = tx.init(params)
  leaves = jax.tree.leaves(state)
  assert not any(a is b for i, a in enumerate(leaves) for b in leaves[i + 1 :])
  step = jax.jit(lambda s: tx.update(grads, s, params)[1], donate_argnums=0)
  for _ in range(3):
    state = step(state)
  assert int(state.count) == 3
  assert np.all(np.isfinite(np.asarray(state.tracked["w"])))


def test_deferred_jacobian_gives_the_same_updates(num_tasks=3):
  rng = np.random.default_rng(num_tasks)
  params = {
    "trunk": jnp.asarray(rng.normal(size=(4, 3)), jnp.float32),
    "heads": jnp.asarray(rng.normal(size=(3, num_tasks)), jnp.float32),
  }
  x = jnp.asarray(rng.normal(size=(8, 4)), jnp.float32)
  y = jnp.asarray(rng.normal(size=(8, num_tasks)), jnp.float32)

  def loss_fn(p):
    return jnp.mean((jnp.tanh(x @ p["trunk"]) @ p["heads"] - y) ** 2, axis=0)

  tx = mtjax.moco(num_tasks=num_tasks, normalization="loss", shared=mtjax.shared_mask(exclude="heads"))

  @functools.partial(jax.jit, static_argnums=2)
  def step(p, s, deferred):
    losses, grads = mtjax.task_grads(loss_fn, deferred=deferred)(p)
    return tx.update(grads, s, p, task_losses=losses)

  a = b = tx.init(params)
  for _ in range(2):
    ua, a = step(params, a, False)
    ub, b = step(params, b, True)
    for u, v in zip(jax.tree.leaves((ua, a)), jax.tree.leaves((ub, b))):
      np.testing.assert_allclose(u, v, rtol=1e-5, atol=1e-6)


def _toy_losses(x):
  minima = jnp.array([[1.0, -1.0, 0.5, 1.0], [-1.0, 1.0, -0.5, 0.0]])
  return 0.5 * jnp.sum((x["w"][None, :] - minima) ** 2, axis=1) + 0.5


@pytest.mark.parametrize("kwargs", [dict(), dict(normalization="loss")], ids=["paper", "loss"])
def test_toy_problem_reaches_the_pareto_set(kwargs):
  # Two quadratics: the Pareto set is the segment between the minima.
  tx = optax.chain(mtjax.moco(num_tasks=2, **kwargs), optax.sgd(0.1))
  params = {"w": jnp.array([3.0, 3.0, 2.0, 3.0])}

  @jax.jit
  def train(params):
    def body(carry, _):
      params, state = carry
      losses, grads = _toy_losses(params), jax.jacrev(_toy_losses)(params)
      updates, state = tx.update(grads, state, params, task_losses=losses)
      return (optax.apply_updates(params, updates), state), None

    return jax.lax.scan(body, (params, tx.init(params)), None, length=300)[0]

  params, state = train(params)
  x = np.asarray(params["w"], np.float64)
  a, b = np.array([1.0, -1.0, 0.5, 1.0]), np.array([-1.0, 1.0, -0.5, 0.0])
  lam = np.clip((x - a) @ (b - a) / ((b - a) @ (b - a)), 0, 1)
  assert np.linalg.norm(x - (a + lam * (b - a))) < 0.05, x
  assert np.all(np.isfinite(np.asarray(state[0].weights)))


def test_errors():
  with pytest.raises(ValueError, match="mtjax: moco: num_tasks must be a positive int"):
    mtjax.moco(num_tasks=0)
  with pytest.raises(ValueError, match="mtjax: moco: normalization must be one of"):
    mtjax.moco(num_tasks=2, normalization="l2")
  with pytest.raises(ValueError, match="mtjax: moco: simplex must be one of"):
    mtjax.moco(num_tasks=2, simplex="sparsemax")
  with pytest.raises(ValueError, match="mtjax: moco: beta must be non-negative"):
    mtjax.moco(num_tasks=2, beta=-0.1)
  with pytest.raises(ValueError, match="mtjax: moco: task_specific must be"):
    mtjax.moco(num_tasks=2, task_specific="mean")
  tx = mtjax.moco(num_tasks=2, normalization="loss")
  params = {"w": jnp.zeros(3)}
  grads = {"w": jnp.ones((2, 3))}
  with pytest.raises(ValueError, match="mtjax: moco needs the per-task losses"):
    tx.update(grads, tx.init(params), params)
  with pytest.raises(ValueError, match="mtjax: .*num_tasks=2"):
    tx.update({"w": jnp.ones((3, 3))}, tx.init(params), params, task_losses=jnp.ones(3))
  bad = {"w": jnp.array([[1.0, np.nan, 0.0], [1.0, 1.0, 1.0]])}
  with pytest.raises(Exception, match="mtjax: non-finite task gradients given to moco"):
    jax.block_until_ready(jax.jit(tx.update)(bad, tx.init(params), params, task_losses=jnp.ones(2)))
