"""DB-MTL against a plain NumPy float64 reference that loops over tasks and steps."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import mtjax

SHAPES = {
  "bottom": {"kernel": (3, 2), "bias": (2,)},
  "mid": {"kernel": (2,)},
  "tower_0": {"kernel": (2,)},
  "tower_1": {"kernel": (2, 2)},
}
SHARED = mtjax.shared_mask(exclude="tower_")


def _sample(num_tasks, num_steps, seed):
  rng = np.random.default_rng(seed)
  steps = []
  for _ in range(num_steps):
    grads = {
      name: {leaf: rng.normal(size=(num_tasks,) + shape) * rng.uniform(0.1, 10.0) for leaf, shape in leaves.items()}
      for name, leaves in SHAPES.items()
    }
    steps.append((grads, rng.uniform(0.1, 3.0, size=num_tasks)))
  return steps


def _numpy_db_mtl(steps, *, beta, beta_sigma, eps):
  """Float64 reference: h_i <- b_k h_i + (1 - b_k) g_i / (L_i + eps), d = sum_i max_j |h_j| / |h_i| h_i."""
  num_tasks = steps[0][1].shape[0]
  ema = {
    (n, l): np.zeros((num_tasks,) + s)
    for n, leaves in SHAPES.items()
    for l, s in leaves.items()
    if not n.startswith("tower_")
  }
  history = []
  for k, (grads, losses) in enumerate(steps, start=1):
    b = beta / k**beta_sigma
    scale = [1.0 / (losses[i] + eps) for i in range(num_tasks)]
    for key in ema:
      for i in range(num_tasks):
        ema[key][i] = b * ema[key][i] + (1 - b) * scale[i] * grads[key[0]][key[1]][i]
    norms = np.array([np.sqrt(sum(np.sum(ema[key][i] ** 2) for key in ema)) for i in range(num_tasks)])
    alpha = np.array([np.max(norms) / norms[i] if norms[i] > 0 else 0.0 for i in range(num_tasks)])
    updates = {}
    for name, leaves in SHAPES.items():
      for leaf in leaves:
        acc = 0.0
        for i in range(num_tasks):
          if name.startswith("tower_"):
            acc = acc + scale[i] * grads[name][leaf][i]
          else:
            acc = acc + alpha[i] * ema[(name, leaf)][i]
        updates[(name, leaf)] = acc
    history.append((updates, {key: v.copy() for key, v in ema.items()}, alpha, np.array(scale)))
  return history


def _params():
  return {name: {leaf: jnp.zeros(s) for leaf, s in leaves.items()} for name, leaves in SHAPES.items()}


def _run(tx, steps):
  params = _params()
  state = tx.init(params)
  update = jax.jit(tx.update)
  out = []
  for grads, losses in steps:
    upd, state = update(jax.tree.map(jnp.asarray, grads), state, params, task_losses=jnp.asarray(losses))
    out.append((jax.tree.map(np.asarray, upd), state))
  return out


@pytest.mark.parametrize(
  "num_tasks,beta,beta_sigma,eps",
  [
    (1, 0.9, 0.0, 1e-8),
    (3, 0.5, 0.5, 0.0),
    (5, 0.0, 0.0, 1e-8),
    (8, 0.99, 1.0, 0.1),
  ],
)
def test_matches_numpy_reference(num_tasks, beta, beta_sigma, eps):
  steps = _sample(num_tasks, 6, seed=num_tasks)
  ref = _numpy_db_mtl(steps, beta=beta, beta_sigma=beta_sigma, eps=eps)
  with jax.enable_x64(True):
    tx = mtjax.db_mtl(num_tasks=num_tasks, beta=beta, beta_sigma=beta_sigma, eps=eps, shared=SHARED)
    got = _run(tx, steps)
  for k, ((upd, state), (r_upd, r_ema, r_alpha, r_scale)) in enumerate(zip(got, ref)):
    for (name, leaf), expected in r_upd.items():
      np.testing.assert_allclose(upd[name][leaf], expected, rtol=1e-10, atol=1e-12, err_msg=f"step {k} {name}")
    for (name, leaf), expected in r_ema.items():
      np.testing.assert_allclose(state.grads_ema[name][leaf], expected, rtol=1e-10, atol=1e-12)
    for name in ("tower_0", "tower_1"):
      assert state.grads_ema[name]["kernel"].shape == (0,)  # no EMA for task-specific leaves
    np.testing.assert_allclose(state.alpha, r_alpha, rtol=1e-10)
    np.testing.assert_allclose(state.weights, r_scale, rtol=1e-12)
    assert int(state.count) == k + 1


def test_every_task_gets_the_largest_norm():
  with jax.enable_x64(True):
    tx = mtjax.db_mtl(num_tasks=3, beta=0.0, eps=0.0)
    g = {"w": jnp.array([[3.0, 4.0, 0.0], [0.0, 0.1, 0.0], [0.0, 0.0, -2.0]])}
    upd, state = tx.update(g, tx.init({"w": jnp.zeros(3)}), task_losses=jnp.ones(3))
  np.testing.assert_allclose(np.asarray(upd["w"]), [3.0, 4.0 + 5.0, -5.0], rtol=1e-12)
  np.testing.assert_allclose(np.asarray(state.alpha), [1.0, 50.0, 2.5], rtol=1e-12)


def test_zero_gradients_stay_finite():
  tx = mtjax.db_mtl(num_tasks=2)
  params = {"w": jnp.zeros(3)}
  g = {"w": jnp.array([[0.0, 0.0, 0.0], [1.0, -1.0, 2.0]])}
  upd, state = tx.update(g, tx.init(params), params, task_losses=jnp.array([1.0, 2.0]))
  assert np.all(np.isfinite(upd["w"])) and np.all(np.isfinite(state.alpha))
  np.testing.assert_allclose(np.asarray(state.alpha), [0.0, 1.0])
  upd, state = tx.update(jax.tree.map(jnp.zeros_like, g), tx.init(params), params, task_losses=jnp.ones(2))
  np.testing.assert_array_equal(upd["w"], 0.0)


def test_deferred_jacobian_is_materialized():
  def loss_fn(params, x):
    h = jnp.tanh(x @ params["w"])
    return jnp.stack([jnp.mean((h - 1.0) ** 2), jnp.mean(h**2) + 0.1])

  params = {"w": jnp.asarray(np.random.default_rng(0).normal(size=(3, 2)), jnp.float32)}
  x = jnp.asarray(np.random.default_rng(1).normal(size=(4, 3)), jnp.float32)
  losses, rows = mtjax.task_grads(loss_fn)(params, x)
  _, lazy = mtjax.task_grads(loss_fn, deferred=True)(params, x)
  tx = mtjax.db_mtl(num_tasks=2)
  a, _ = tx.update(rows, tx.init(params), params, task_losses=losses)
  b, _ = jax.jit(lambda j: tx.update(j, tx.init(params), params, task_losses=losses))(lazy)
  np.testing.assert_allclose(a["w"], b["w"], rtol=1e-5, atol=1e-7)


def test_chains_with_adam_under_jit_and_inject_hyperparams():
  params = {"w": jnp.zeros(3)}
  tx = optax.chain(
    optax.inject_hyperparams(mtjax.db_mtl, static_args=("num_tasks",))(num_tasks=2, beta=0.5), optax.adam(1e-2)
  )
  state = tx.init(params)
  g = {"w": jnp.array([[1.0, 2.0, 3.0], [-1.0, 0.5, 0.0]])}
  upd, state = jax.jit(tx.update)(g, state, params, task_losses=jnp.array([1.0, 2.0]))
  assert np.all(np.isfinite(upd["w"]))


def test_bad_input_raises():
  with pytest.raises(ValueError, match="mtjax: db_mtl: num_tasks"):
    mtjax.db_mtl(num_tasks=0)
  with pytest.raises(ValueError, match="mtjax: db_mtl: beta"):
    mtjax.db_mtl(num_tasks=2, beta=1.0)
  with pytest.raises(ValueError, match="mtjax: db_mtl: beta_sigma"):
    mtjax.db_mtl(num_tasks=2, beta_sigma=-1.0)
  tx = mtjax.db_mtl(num_tasks=2)
  params = {"w": jnp.zeros(2)}
  g = {"w": jnp.ones((2, 2))}
  with pytest.raises(ValueError, match="mtjax: db_mtl needs the per-task losses"):
    tx.update(g, tx.init(params), params)
  with pytest.raises(ValueError, match=r"mtjax: db_mtl: log\(L_i \+ eps\) needs"):
    tx.update(g, tx.init(params), params, task_losses=jnp.array([1.0, -2.0]))
  with pytest.raises(ValueError, match="mtjax: db_mtl: the state's gradient EMA"):
    tx.update({"w": jnp.ones((2, 3))}, tx.init(params), {"w": jnp.zeros(3)}, task_losses=jnp.ones(2))


def test_sparse_rows_are_densified():
  from mtjax._src.sparse import SparseRows

  rng = np.random.default_rng(3)
  table = SparseRows(jnp.array([1, 3, 1]), jnp.asarray(rng.normal(size=(2, 3, 2)), jnp.float32), (5, 2))
  dense = {"emb": table.todense(), "w": jnp.asarray(rng.normal(size=(2, 3)), jnp.float32)}
  params = {"emb": jnp.zeros((5, 2)), "w": jnp.zeros(3)}
  for tx in (mtjax.db_mtl(num_tasks=2, beta=0.5), mtjax.excess_mtl(num_tasks=2)):
    a, _ = tx.update({"emb": table, "w": dense["w"]}, tx.init(params), params, task_losses=jnp.array([1.0, 2.0]))
    b, _ = tx.update(dense, tx.init(params), params, task_losses=jnp.array([1.0, 2.0]))
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
      np.testing.assert_allclose(x, y, rtol=1e-6)
