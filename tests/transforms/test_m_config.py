"""M-ConFIG against a plain NumPy float64 reference that loops over tasks and steps (the whole trajectory of
updates and momenta), on a multi-leaf pytree; one backward pass per step with a deferred Jacobian; init
dtypes, jit with donation, errors."""

import functools
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import mtjax

sys.path.insert(0, os.path.dirname(__file__))
from mtl_references import backward_counter  # pylint: disable=wrong-import-position

SHAPES = {"bottom": {"kernel": (3, 2), "bias": (2,)}, "tower_0": {"kernel": (2,)}, "tower_1": {"kernel": (2, 2)}}
PATHS = [("bottom", "bias"), ("bottom", "kernel"), ("tower_0", "kernel"), ("tower_1", "kernel")]  # flattening order
TOWERS = mtjax.shared_mask(exclude="tower_")


def _sample(num_tasks, num_steps, seed):
  rng = np.random.default_rng(seed)
  return [
    {
      name: {leaf: rng.normal(size=(num_tasks,) + shape) for leaf, shape in leaves.items()}
      for name, leaves in SHAPES.items()
    }
    for _ in range(num_steps)
  ]


def _params(dtype=np.float64):
  return {name: {leaf: np.zeros(shape, dtype) for leaf, shape in leaves.items()} for name, leaves in SHAPES.items()}


def np_config(rows):
  """ConFIG on the rows of ``rows`` [T, P] (least squares on the unit rows; zero rows left out)."""
  t = rows.shape[0]
  unit = np.stack([r / np.linalg.norm(r) if np.linalg.norm(r) > 0 else np.zeros_like(r) for r in rows])
  x = np.linalg.lstsq(unit, np.ones(t), rcond=None)[0]
  if np.linalg.norm(x) < 1e-300:
    return np.zeros(rows.shape[1])
  u = x / np.linalg.norm(x)
  return sum(float(rows[i] @ u) for i in range(t)) * u


def np_m_config(
  steps,
  *,
  beta=0.9,
  selected=None,
  all_tasks=False,
  shared_names=None,
  task_specific="sum",
  adaptive=False,
  beta2=0.999,
  eps=1e-8,
  wait_for_all=False,
):
  """Float64 reference: per-task momenta, one task per step (round robin or ``selected``), ConFIG of m_hat."""
  num_tasks = steps[0][PATHS[0][0]][PATHS[0][1]].shape[0]
  shared_names = set(SHAPES) if shared_names is None else set(shared_names)
  combined = [p for p in PATHS if p[0] in shared_names or task_specific == "weighted"]
  m = {p: np.zeros((num_tasks,) + SHAPES[p[0]][p[1]]) for p in PATHS}
  n = np.zeros(num_tasks, int)
  nu = {p: np.zeros(SHAPES[p[0]][p[1]]) for p in PATHS}
  prev = {p: np.zeros(SHAPES[p[0]][p[1]]) for p in PATHS}
  s = 0
  history = []
  for step, grads in enumerate(steps):
    tasks = range(num_tasks) if all_tasks else [selected[step] if selected is not None else step % num_tasks]
    for i in tasks:
      n[i] += 1
      for p in PATHS:
        m[p][i] = beta * m[p][i] + (1 - beta) * grads[p[0]][p[1]][i]
    m_hat = {
      p: np.stack([m[p][i] / (1 - beta ** n[i]) if n[i] > 0 else 0 * m[p][i] for i in range(num_tasks)]) for p in PATHS
    }
    # ConFIG on the shared leaves' flattened bias-corrected momenta; its coefficients applied per leaf.
    shared_rows = np.concatenate([m_hat[p].reshape(num_tasks, -1) for p in PATHS if p[0] in shared_names], axis=1)
    d_shared = np_config(shared_rows)
    coef = np.linalg.lstsq(shared_rows.T, d_shared, rcond=None)[0] if np.any(shared_rows) else np.zeros(num_tasks)
    ready = bool(np.all(n > 0)) or not wait_for_all
    update = {}
    for p in PATHS:
      if p in combined:
        val = sum(coef[i] * m_hat[p][i] for i in range(num_tasks)) if ready else 0 * nu[p]
      else:
        val = sum(grads[p[0]][p[1]][i] for i in range(num_tasks))
      update[p] = val
    if adaptive and ready:
      s += 1
      for p in combined:
        fake_m = update[p] * (1 - beta**s)
        fake_g = (fake_m - beta * prev[p]) / (1 - beta)
        prev[p] = fake_m
        nu[p] = beta2 * nu[p] + (1 - beta2) * fake_g**2
        update[p] = update[p] / (np.sqrt(nu[p] / (1 - beta2**s)) + eps)
    history.append(
      (
        {a: {b: update[(a, b)] for (a2, b) in PATHS if a2 == a} for a, _ in PATHS},
        {p: v.copy() for p, v in m.items()},
        n.copy(),
      )
    )
  return history


VARIANTS = {
  "paper": dict(),
  "all": dict(all_tasks=True),
  "towers-sum": dict(shared=TOWERS),
  "towers-weighted-beta0.5": dict(shared=TOWERS, task_specific="weighted", beta=0.5),
  "adaptive-wait": dict(adaptive=True, wait_for_all=True, shared=TOWERS),
}


def _check_trajectory(tx, steps, expected, what, kwargs):
  params = _params()
  state = tx.init(params)
  step = jax.jit(tx.update)
  for k, (grads, (upd, m, n)) in enumerate(zip(steps, expected)):
    updates, state = step(grads, state, params)
    for a, b in PATHS:
      np.testing.assert_allclose(updates[a][b], upd[a][b], rtol=1e-9, atol=1e-11, err_msg=f"{what} {k} {a}/{b}")
      np.testing.assert_allclose(state.momenta[a][b], m[(a, b)], rtol=1e-12, atol=1e-14)
      assert updates[a][b].dtype == jnp.float64 and state.momenta[a][b].dtype == jnp.float64
    np.testing.assert_array_equal(state.task_counts, n)
    if not kwargs.get("adaptive"):  # the recorded coefficients act on the bias-corrected momenta
      beta = kwargs.get("beta", 0.9)
      corr = np.where(n > 0, 1 / (1 - beta ** np.maximum(n, 1)), 0.0)
      w = np.asarray(state.weights)
      np.testing.assert_allclose(
        updates["bottom"]["kernel"],
        sum(w[i] * corr[i] * m[("bottom", "kernel")][i] for i in range(len(n))),
        rtol=1e-9,
        atol=1e-11,
      )
  return state


@pytest.mark.parametrize("variant,num_tasks", [(v, 3) for v in VARIANTS] + [("paper", 1)])
def test_matches_numpy_reference_trajectory(variant, num_tasks):
  kwargs = dict(VARIANTS[variant])
  ref_kwargs = {k: v for k, v in kwargs.items() if k != "shared"}
  if "shared" in kwargs:
    ref_kwargs["shared_names"] = ["bottom"]
  steps = _sample(num_tasks, 7, seed=num_tasks)
  with jax.enable_x64(True):
    _check_trajectory(
      mtjax.m_config(num_tasks=num_tasks, **kwargs), steps, np_m_config(steps, **ref_kwargs), variant, kwargs
    )


def test_random_selection_replays_its_key():
  num_tasks, key = 3, 5
  steps = _sample(num_tasks, 6, seed=7)
  keys, selected = jax.random.PRNGKey(key), []
  for _ in steps:
    keys, sub = jax.random.split(keys)
    selected.append(int(jax.random.randint(sub, (), 0, num_tasks, jnp.int32)))
  assert len(set(selected)) > 1
  with jax.enable_x64(True):
    tx = mtjax.m_config(num_tasks=num_tasks, selection="random", key=key)
    _check_trajectory(tx, steps, np_m_config(steps, selected=selected), "random", {})


# ----------------------------------------------------------------------------- one backward pass per step

_counted, BACKWARD_TRACES = backward_counter()
T = 3


def _problem(seed=0):
  rng = np.random.default_rng(seed)
  params = {
    "trunk": {"kernel": jnp.asarray(rng.normal(size=(5, 4)) * 0.5, jnp.float32), "bias": jnp.zeros(4, jnp.float32)},
    "tower": jnp.asarray(rng.normal(size=(4, T)) * 0.5, jnp.float32),
  }
  batch = {
    "x": jnp.asarray(rng.normal(size=(16, 5)), jnp.float32),
    "y": jnp.asarray(rng.normal(size=(16, T)), jnp.float32),
  }
  return params, batch


def _loss_fn(params, batch):
  h = _counted(jnp.tanh(batch["x"] @ params["trunk"]["kernel"] + params["trunk"]["bias"][None, :]))
  return jnp.mean((h @ params["tower"] - batch["y"]) ** 2, axis=0)


@functools.cache
def _steps(masked, all_tasks=False):
  kw = {"shared": mtjax.shared_mask(exclude="tower")} if masked else {}
  tx = optax.chain(mtjax.m_config(num_tasks=T, all_tasks=all_tasks, **kw), optax.sgd(0.1))

  def step(params, state, batch, deferred):
    losses, grads = mtjax.task_grads(_loss_fn, strategy="loop", deferred=deferred)(params, batch)
    updates, state = tx.update(grads, state, params, task_losses=losses)
    return optax.apply_updates(params, updates), state

  return tx, step


@pytest.mark.parametrize("masked,passes", [(False, 1), (True, 2)], ids=["all-shared", "towers-task-specific"])
def test_deferred_jacobian_costs_one_backward_pass(masked, passes):
  tx, step = _steps(masked)
  params, batch = _problem()
  state = tx.init(params)
  for deferred, expected in ((True, passes), (False, T)):
    del BACKWARD_TRACES[:]
    jax.make_jaxpr(functools.partial(step, deferred=deferred))(params, state, batch)
    assert len(BACKWARD_TRACES) == expected, (masked, deferred, len(BACKWARD_TRACES))
  del BACKWARD_TRACES[:]
  tx_all, step_all = _steps(masked, all_tasks=True)
  jax.make_jaxpr(functools.partial(step_all, deferred=True))(params, tx_all.init(params), batch)
  assert len(BACKWARD_TRACES) == T  # every momentum takes its gradient: the T rows


def test_deferred_jacobian_gives_the_same_updates():
  tx, step = _steps(True)  # J^T e_k on the shared leaves, J^T 1 on the towers
  dense, deferred = jax.jit(functools.partial(step, deferred=False)), jax.jit(functools.partial(step, deferred=True))
  params, _ = _problem()
  a = b = (params, tx.init(params))
  for seed in range(4):  # more than T steps: every task selected, the momenta combined
    _, batch = _problem(seed)
    a = dense(*a, batch)
    b = deferred(*b, batch)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=2e-5, atol=1e-6)


# ----------------------------------------------------------------------------- state, jit, errors


def test_init_dtypes_and_shapes():
  params = {"a": jnp.zeros((2, 3), jnp.bfloat16), "b": jnp.zeros((4,), jnp.float32)}
  state = mtjax.m_config(num_tasks=3, adaptive=True).init(params)
  assert state.momenta["a"].shape == (3, 2, 3) and state.momenta["a"].dtype == jnp.bfloat16
  assert state.momenta["b"].shape == (3, 4) and state.momenta["b"].dtype == jnp.float32
  assert state.nu["a"].shape == (2, 3) and state.nu["a"].dtype == jnp.bfloat16
  assert state.task_counts.dtype == jnp.int32 and state.weights.dtype == jnp.float32
  assert mtjax.m_config(num_tasks=3).init(params).nu is None
  with jax.enable_x64(True):
    state = mtjax.m_config(num_tasks=2).init({"w": jnp.zeros(3, jnp.float64)})
    assert state.momenta["w"].dtype == jnp.float64 and state.weights.dtype == jnp.float64


@pytest.mark.parametrize("kwargs", [dict(), dict(adaptive=True, selection="random")], ids=["default", "adaptive"])
def test_jit_with_donated_state(kwargs):
  params = {"w": jnp.zeros(3), "b": jnp.zeros(2)}
  grads = {"w": jnp.array([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]]), "b": jnp.array([[1.0, 0.0], [0.0, 1.0]])}
  tx = mtjax.m_config(num_tasks=2, **kwargs)
  state = tx.init(params)
  leaves = jax.tree.leaves(state)
  assert not any(a is b for i, a in enumerate(leaves) for b in leaves[i + 1 :])
  step = jax.jit(lambda s: tx.update(grads, s, params)[1], donate_argnums=0)
  for _ in range(3):
    state = step(state)
  assert int(state.count) == 3 and int(np.sum(state.task_counts)) == 3
  assert np.all(np.isfinite(np.asarray(state.momenta["w"])))


def test_adaptive_toy_problem_with_sgd():
  # The paper's optimizer (adaptive=True, chained with plain SGD) on two quadratics: near the Pareto set.
  minima = jnp.array([[1.0, -1.0, 0.5, 1.0], [-1.0, 1.0, -0.5, 0.0]])

  def losses_fn(p):
    return 0.5 * jnp.sum((p["w"][None, :] - minima) ** 2, axis=1) + 0.5

  tx = optax.chain(mtjax.m_config(num_tasks=2, adaptive=True), optax.sgd(optax.linear_schedule(0.05, 0.001, 400)))

  @jax.jit
  def train(params):
    def body(carry, _):
      params, state = carry
      updates, state = tx.update(jax.jacrev(losses_fn)(params), state, params)
      return (optax.apply_updates(params, updates), state), None

    return jax.lax.scan(body, (params, tx.init(params)), None, length=400)[0][0]

  x = np.asarray(train({"w": jnp.array([3.0, 3.0, 2.0, 3.0])})["w"], np.float64)
  a, b = np.asarray(minima[0], np.float64), np.asarray(minima[1], np.float64)
  lam = np.clip((x - a) @ (b - a) / ((b - a) @ (b - a)), 0, 1)
  assert np.linalg.norm(x - (a + lam * (b - a))) < 0.1, x


def test_errors():
  with pytest.raises(ValueError, match="mtjax: m_config: num_tasks must be a positive int"):
    mtjax.m_config(num_tasks=None)
  with pytest.raises(ValueError, match="mtjax: m_config: selection must be one of"):
    mtjax.m_config(num_tasks=2, selection="shuffle")
  with pytest.raises(ValueError, match=r"mtjax: m_config: beta must be in \[0, 1\)"):
    mtjax.m_config(num_tasks=2, beta=1.0)
  with pytest.raises(ValueError, match="mtjax: m_config: task_specific must be"):
    mtjax.m_config(num_tasks=2, task_specific="mean")
  tx = mtjax.m_config(num_tasks=2)
  params = {"w": jnp.zeros(3)}
  with pytest.raises(ValueError, match="mtjax: .*num_tasks=2"):
    tx.update({"w": jnp.ones((3, 3))}, tx.init(params), params)
  # A NaN in a row the step does not read (task 1 at step 0) still raises: the rows are all given.
  bad = {"w": jnp.array([[1.0, 1.0, 0.0], [1.0, np.nan, 1.0]])}
  with pytest.raises(Exception, match="mtjax: non-finite task gradients given to m_config"):
    jax.block_until_ready(jax.jit(tx.update)(bad, tx.init(params), params))
