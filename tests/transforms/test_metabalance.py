"""MetaBalance against a plain NumPy float64 reference that loops over tasks, leaves and steps."""

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
# Flattening order of the shared leaves (jax sorts dict keys).
SHARED_KEYS = [("bottom", "bias"), ("bottom", "kernel"), ("mid", "kernel")]


def _sample(num_tasks, num_steps, seed):
  rng = np.random.default_rng(seed)
  steps = []
  for _ in range(num_steps):
    grads = {
      name: {
        leaf: rng.normal(size=(num_tasks,) + shape) * rng.uniform(0.1, 10.0, size=(num_tasks,) + (1,) * len(shape))
        for leaf, shape in leaves.items()
      }
      for name, leaves in SHAPES.items()
    }
    steps.append(grads)
  return steps


def _numpy_metabalance(steps, *, target, relax, beta, strategy, granularity):
  num_tasks = steps[0]["tower_0"]["kernel"].shape[0]
  groups = [SHARED_KEYS] if granularity == "model" else [[k] for k in SHARED_KEYS]
  m = np.zeros((len(groups), num_tasks))
  history = []
  for grads in steps:
    w = np.ones((len(groups), num_tasks))
    for k, keys in enumerate(groups):
      for i in range(num_tasks):
        norm = np.sqrt(sum(np.sum(grads[a][b][i] ** 2) for a, b in keys))
        m[k, i] = beta * m[k, i] + (1 - beta) * norm
      for i in range(num_tasks):
        if i == target:
          continue
        ratio = m[k, target] / m[k, i] if m[k, i] > 0 else 0.0
        adapt = {"both": True, "down": m[k, i] > m[k, target], "up": m[k, i] < m[k, target]}[strategy]
        if adapt:
          w[k, i] = relax * ratio + (1 - relax)
    updates = {}
    for name, leaves in SHAPES.items():
      for leaf in leaves:
        if name.startswith("tower_"):
          updates[(name, leaf)] = sum(grads[name][leaf][i] for i in range(num_tasks))
          continue
        k = 0 if granularity == "model" else SHARED_KEYS.index((name, leaf))
        updates[(name, leaf)] = sum(w[k, i] * grads[name][leaf][i] for i in range(num_tasks))
    history.append((updates, m.copy(), w.copy()))
  return history


@pytest.mark.parametrize(
  "num_tasks,target,relax,beta,strategy,granularity",
  [
    (1, 0, 0.7, 0.9, "both", "leaf"),
    (3, 0, 0.7, 0.9, "both", "leaf"),
    (4, 2, 0.5, 0.5, "down", "leaf"),
    (3, 1, 1.0, 0.0, "up", "model"),
  ],
)
def test_matches_numpy_reference(num_tasks, target, relax, beta, strategy, granularity):
  steps = _sample(num_tasks, 5, seed=num_tasks + target)
  ref = _numpy_metabalance(steps, target=target, relax=relax, beta=beta, strategy=strategy, granularity=granularity)
  with jax.enable_x64(True):
    tx = mtjax.metabalance(
      num_tasks=num_tasks,
      target=target,
      relax_factor=relax,
      beta=beta,
      strategy=strategy,
      granularity=granularity,
      shared=SHARED,
    )
    params = {name: {leaf: jnp.zeros(s) for leaf, s in leaves.items()} for name, leaves in SHAPES.items()}
    state = tx.init(params)
    update = jax.jit(tx.update)
    for k, (grads, (r_upd, r_m, r_w)) in enumerate(zip(steps, ref)):
      upd, state = update(jax.tree.map(jnp.asarray, grads), state, params)
      for (name, leaf), expected in r_upd.items():
        np.testing.assert_allclose(upd[name][leaf], expected, rtol=1e-10, atol=1e-12, err_msg=f"step {k} {name}")
      np.testing.assert_allclose(state.norms, r_m, rtol=1e-10)
      np.testing.assert_allclose(state.weights, r_w, rtol=1e-10)


def test_relax_zero_is_the_plain_sum_and_one_matches_magnitudes():
  g = {"w": jnp.array([[1.0, 0.0], [0.0, 4.0], [0.0, -0.5]])}
  params = {"w": jnp.zeros(2)}
  tx = mtjax.metabalance(num_tasks=3, relax_factor=0.0)
  upd, _ = tx.update(g, tx.init(params), params)
  np.testing.assert_allclose(upd["w"], [1.0, 3.5], rtol=1e-6)
  tx = mtjax.metabalance(num_tasks=3, relax_factor=1.0)
  upd, _ = tx.update(g, tx.init(params), params)
  np.testing.assert_allclose(upd["w"], [1.0, 0.0], atol=1e-6)  # both auxiliaries scaled to norm 1: +1 and -1


def test_zero_gradients_stay_finite():
  params = {"w": jnp.zeros(2)}
  tx = mtjax.metabalance(num_tasks=3)
  for g in ({"w": jnp.zeros((3, 2))}, {"w": jnp.array([[0.0, 0.0], [1.0, 2.0], [0.0, 0.0]])}):
    upd, state = tx.update(g, tx.init(params), params)
    assert np.all(np.isfinite(upd["w"])) and np.all(np.isfinite(state.weights))


def test_chains_with_inject_hyperparams():
  params = {"a": jnp.zeros(2), "b": jnp.zeros(3)}
  tx = optax.chain(
    optax.inject_hyperparams(mtjax.metabalance, static_args=("num_tasks", "target"))(num_tasks=2, relax_factor=0.3),
    optax.adam(1e-2),
  )
  g = {"a": jnp.ones((2, 2)), "b": jnp.arange(6.0).reshape(2, 3)}
  upd, state = jax.jit(tx.update)(g, tx.init(params), params)
  assert np.all(np.isfinite(upd["a"])) and state[0].inner_state.weights.shape == (2, 2)


def test_bad_input_raises():
  with pytest.raises(ValueError, match="mtjax: metabalance: num_tasks"):
    mtjax.metabalance(num_tasks=None)
  with pytest.raises(ValueError, match="mtjax: metabalance: target"):
    mtjax.metabalance(num_tasks=2, target=2)
  with pytest.raises(ValueError, match="mtjax: metabalance: strategy"):
    mtjax.metabalance(num_tasks=2, strategy="A")
  with pytest.raises(ValueError, match="mtjax: metabalance: relax_factor"):
    mtjax.metabalance(num_tasks=2, relax_factor=1.5)
  with pytest.raises(ValueError, match="mtjax: metabalance: beta"):
    mtjax.metabalance(num_tasks=2, beta=1.0)
