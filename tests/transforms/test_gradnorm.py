"""GradNorm against a plain NumPy float64 reference that loops over tasks and steps."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import mtjax
from mtjax.transforms._gradnorm import last_layer_mask

# Dense_10 comes before Dense_2 in flattening order: the "last" rule must still pick Dense_10.
SHAPES = {
  "bottom": {
    "Dense_0": {"kernel": (3, 4), "bias": (4,)},
    "Dense_10": {"kernel": (4, 2), "bias": (2,)},
    "Dense_2": {"kernel": (4, 4), "bias": (4,)},
  },
  "tower_0": {"kernel": (2,)},
  "tower_1": {"kernel": (2, 3)},
}
LAST = ("bottom/Dense_10/kernel", "bottom/Dense_10/bias")


def _flat_shapes():
  out = {}
  for path, shape in jax.tree_util.tree_flatten_with_path(SHAPES, is_leaf=lambda s: isinstance(s, tuple))[0]:
    out["/".join(str(k.key) for k in path)] = shape
  return out


def _to_tree(flat):
  tree = {}
  for path, value in flat.items():
    node = tree
    parts = path.split("/")
    for p in parts[:-1]:
      node = node.setdefault(p, {})
    node[parts[-1]] = value
  return tree


def _sample(num_tasks, num_steps, seed):
  """Per step: a dict path -> [T, *shape] float64 gradients and positive losses [T]."""
  rng = np.random.default_rng(seed)
  steps = []
  for _ in range(num_steps):
    grads = {
      p: rng.normal(size=(num_tasks,) + s) * rng.uniform(0.2, 3.0, size=(num_tasks,) + (1,) * len(s))
      for p, s in _flat_shapes().items()
    }
    steps.append((grads, rng.uniform(0.2, 2.0, size=num_tasks)))
  return steps


def _numpy_gradnorm(steps, *, alpha, lr, subset, shared, task_specific, init_steps=1, min_weight=1e-6):
  """Float64 reference: loops over steps and tasks, inner plain SGD, clip, renormalize."""
  num_tasks = steps[0][1].shape[0]
  w = np.ones(num_tasks)
  l0 = np.zeros(num_tasks)
  history = []
  for t, (grads, losses) in enumerate(steps):
    if t < init_steps:  # running mean of the first init_steps losses
      l0 = np.mean(np.stack([s[1] for s in steps[: t + 1]]), axis=0)
    norms = np.zeros(num_tasks)
    for i in range(num_tasks):
      norms[i] = np.sqrt(sum(np.sum(grads[p][i] ** 2) for p in subset))
    gnorm = np.array([w[i] * norms[i] for i in range(num_tasks)])
    ratio = np.array([losses[i] / l0[i] for i in range(num_tasks)])
    rates = ratio / np.mean(ratio)
    target = np.mean(gnorm) * rates**alpha
    grad = np.array([np.sign(gnorm[i] - target[i]) * norms[i] for i in range(num_tasks)])
    updates = {}
    for p, g in grads.items():
      acc = np.zeros(g.shape[1:])
      for i in range(num_tasks):
        scale = w[i] if (p in shared or task_specific == "weighted") else 1.0
        acc = acc + scale * g[i]
      updates[p] = acc
    used = w.copy()
    w = np.maximum(w - lr * grad, min_weight)
    w = num_tasks * w / np.sum(w)
    history.append((updates, used, w.copy()))
  return history


def _run(tx, steps, jit=True):
  params = _to_tree({p: jnp.zeros(g.shape[1:], jnp.float64) for p, g in steps[0][0].items()})
  state = tx.init(params)
  update = jax.jit(tx.update) if jit else tx.update
  out = []
  for grads, losses in steps:
    upd, state = update(
      _to_tree({p: jnp.asarray(g) for p, g in grads.items()}), state, params, task_losses=jnp.asarray(losses)
    )
    flat = {
      "/".join(str(k.key) for k in path): np.asarray(v) for path, v in jax.tree_util.tree_flatten_with_path(upd)[0]
    }
    out.append((flat, state))
  return out


SHARED = tuple(p for p in _flat_shapes() if p.startswith("bottom/"))
MASK = mtjax.shared_mask(exclude=r"tower_")


@pytest.mark.parametrize(
  "num_tasks,layer,task_specific,alpha,lr",
  [
    (1, "last", "sum", 1.5, 0.025),
    (2, "last", "sum", 1.5, 0.05),
    (3, "all", "weighted", 0.5, 0.1),
    (5, "last", "weighted", 1.5, 0.05),
    (8, "all", "sum", 2.0, 0.02),
    (4, "last", "sum", 1.5, 3.0),  # huge step: the min_weight clip and renormalization are active
  ],
)
def test_matches_numpy_reference_over_steps(num_tasks, layer, task_specific, alpha, lr):
  steps = _sample(num_tasks, 5, seed=num_tasks)
  subset = LAST if layer == "last" else SHARED
  ref = _numpy_gradnorm(steps, alpha=alpha, lr=lr, subset=subset, shared=SHARED, task_specific=task_specific)
  with jax.enable_x64(True):
    tx = mtjax.gradnorm(
      num_tasks=num_tasks,
      alpha=alpha,
      weight_optimizer=optax.sgd(lr),
      layer=layer,
      shared=MASK,
      task_specific=task_specific,
    )
    got = _run(tx, steps)
  for (upd, _used, new_w), (flat, state) in zip(ref, got):
    for p in upd:
      np.testing.assert_allclose(flat[p], upd[p], rtol=1e-10, atol=1e-12, err_msg=p)
    np.testing.assert_allclose(state.weights, new_w, rtol=1e-10, atol=1e-12)
    assert state.weights.dtype == jnp.float64
    np.testing.assert_allclose(np.sum(np.asarray(state.weights)), num_tasks, rtol=1e-12)
    assert np.all(np.asarray(state.weights) > 0)
  if lr == 3.0:  # the clip did fire somewhere (otherwise this case tests nothing new)
    assert any(np.min(w) < 1e-3 for _, _, w in ref)
  assert int(got[-1][1].count) == 5


def test_first_epoch_mean_and_default_learning_rate():
  steps = _sample(3, 6, seed=11)
  ref = _numpy_gradnorm(steps, alpha=1.5, lr=0.025, subset=LAST, shared=SHARED, task_specific="sum", init_steps=3)
  with jax.enable_x64(True):
    tx = mtjax.gradnorm(num_tasks=3, initial_loss="first_epoch_mean", steps_per_epoch=3, shared=MASK)
    got = _run(tx, steps)
  for (_, _, new_w), (_, state) in zip(ref, got):
    np.testing.assert_allclose(state.weights, new_w, rtol=1e-10)
  l0 = np.mean(np.stack([s[1] for s in steps[:3]]), axis=0)
  np.testing.assert_allclose(got[-1][1].initial_losses, l0, rtol=1e-12)


def test_last_layer_rule():
  assert last_layer_mask(
    ["a/Dense_0/kernel", "a/Dense_0/bias", "a/Dense_10/bias", "a/Dense_10/kernel", "a/Dense_9/kernel"]
  ) == [False, False, True, True, False]
  # Without a kernel: the last leaf (natural order) and its siblings.
  assert last_layer_mask(["emb/table", "norm/scale", "norm/bias"]) == [False, True, True]
  # The transform sees only the shared leaves: with towers task-specific, the last shared layer.
  seen = []

  def layer(paths):
    seen.append(list(paths))
    return [p.startswith("bottom/Dense_2/") for p in paths]

  steps = _sample(2, 2, seed=3)
  ref = _numpy_gradnorm(
    steps,
    alpha=1.5,
    lr=0.1,
    subset=("bottom/Dense_2/kernel", "bottom/Dense_2/bias"),
    shared=SHARED,
    task_specific="sum",
  )
  with jax.enable_x64(True):
    got = _run(mtjax.gradnorm(num_tasks=2, learning_rate=0.1, layer=layer, shared=MASK), steps)
  assert sorted(seen[0]) == sorted(SHARED)
  for (_, _, new_w), (_, state) in zip(ref, got):
    np.testing.assert_allclose(state.weights, new_w, rtol=1e-10)


def test_renormalization_and_positivity_under_opposite_pressure():
  # One task has a zero gradient on the subset: its weight is pushed up, the other's down.
  params = {"k": jnp.zeros(3)}
  g = {"k": jnp.array([[0.0, 0.0, 0.0], [5.0, 0.0, 0.0], [0.0, 1e-3, 0.0]])}
  tx = mtjax.gradnorm(num_tasks=3, learning_rate=10.0, layer="all")
  state = tx.init(params)
  update = jax.jit(tx.update)
  for _ in range(5):
    upd, state = update(g, state, params, task_losses=jnp.array([1.0, 2.0, 0.5]))
    assert np.all(np.isfinite(np.asarray(upd["k"])))
    np.testing.assert_allclose(np.sum(np.asarray(state.weights)), 3.0, rtol=1e-6)
    assert np.all(np.asarray(state.weights) > 0)


def test_inject_hyperparams_matches_plain():
  steps = _sample(3, 3, seed=5)
  plain = mtjax.gradnorm(num_tasks=3, alpha=1.2, learning_rate=0.05, shared=MASK)
  injected = optax.inject_hyperparams(mtjax.gradnorm, static_args=("num_tasks", "steps_per_epoch", "shared"))(
    num_tasks=3, alpha=1.2, learning_rate=0.05, shared=MASK
  )
  with jax.enable_x64(True):
    a = _run(plain, steps)
    b = _run(injected, steps)
  for (fa, sa), (fb, sb) in zip(a, b):
    for p in fa:
      np.testing.assert_allclose(fa[p], fb[p], rtol=1e-6)
    np.testing.assert_allclose(sa.weights, sb.inner_state.weights, rtol=1e-6)
  # The hyperparameters are traced: G = [1.1, 1], r = [1.2, 0.8] at the second step; alpha = 1
  # gives signs (-, +) and moves the weights apart, alpha = 0 gives (+, -); the step scales with lr.
  tx = optax.inject_hyperparams(mtjax.gradnorm, static_args=("num_tasks",))(
    num_tasks=2, alpha=1.0, learning_rate=0.1, layer="all"
  )
  params = {"k": jnp.zeros(2)}
  update = jax.jit(tx.update)
  _, state = update({"k": jnp.eye(2)}, tx.init(params), params, task_losses=jnp.array([1.0, 1.0]))
  new = []
  for name, value in (("alpha", 1.0), ("alpha", 0.0), ("learning_rate", 0.2)):
    s = state._replace(hyperparams={**state.hyperparams, name: jnp.asarray(value)})
    _, s = update({"k": jnp.diag(jnp.array([1.1, 1.0]))}, s, params, task_losses=jnp.array([1.2, 0.8]))
    new.append(np.asarray(s.inner_state.weights))
  assert new[0][0] > 1 > new[0][1] and new[1][0] < 1 < new[1][1]
  assert new[2][0] > new[0][0]


def test_errors():
  params = {"k": jnp.zeros(2)}
  g = {"k": jnp.ones((2, 2))}
  tx = mtjax.gradnorm(num_tasks=2, layer="all")
  state = tx.init(params)
  with pytest.raises(ValueError, match="needs the per-task losses"):
    tx.update(g, state, params)
  with pytest.raises(ValueError, match="non-finite task losses"):
    tx.update(g, state, params, task_losses=jnp.array([1.0, jnp.nan]))
  with pytest.raises(Exception, match="non-finite task losses"):
    jax.block_until_ready(jax.jit(tx.update)(g, state, params, task_losses=jnp.array([jnp.nan, 1.0])))
  with pytest.raises(ValueError, match="nonnegative"):
    tx.update(g, state, params, task_losses=jnp.array([1.0, -1.0]))
  with pytest.raises(ValueError, match="steps_per_epoch"):
    mtjax.gradnorm(num_tasks=2, initial_loss="first_epoch_mean")
  with pytest.raises(ValueError, match="initial_loss"):
    mtjax.gradnorm(num_tasks=2, initial_loss="mean")
  with pytest.raises(ValueError, match="layer"):
    mtjax.gradnorm(num_tasks=2, layer="first")
  with pytest.raises(ValueError, match="num_tasks"):
    mtjax.gradnorm(num_tasks=0)
  none = mtjax.gradnorm(num_tasks=2, layer=lambda paths: [False] * len(paths))
  with pytest.raises(ValueError, match="chose none"):
    none.update(g, none.init(params), params, task_losses=jnp.ones(2))
  with pytest.raises(ValueError, match="num_tasks=2"):
    tx.update({"k": jnp.ones((3, 2))}, state, params, task_losses=jnp.ones(3))


def test_zero_initial_loss_and_zero_gradients_stay_finite():
  params = {"k": jnp.zeros(2)}
  tx = mtjax.gradnorm(num_tasks=2, layer="all")
  state = tx.init(params)
  for losses in ([0.0, 1.0], [0.0, 0.0], [0.5, 1.0]):
    upd, state = tx.update({"k": jnp.zeros((2, 2))}, state, params, task_losses=jnp.array(losses))
    assert np.all(np.isfinite(np.asarray(upd["k"])))
    assert np.all(np.isfinite(np.asarray(state.weights)))
    np.testing.assert_allclose(np.sum(np.asarray(state.weights)), 2.0, rtol=1e-6)


def test_chain_with_sgd_and_float32_dtype():
  params = {"k": jnp.zeros(3, jnp.float32)}
  g = {"k": jnp.array([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0]], jnp.float32)}
  tx = optax.chain(mtjax.gradnorm(num_tasks=2, layer="all"), optax.sgd(1.0))
  upd, state = tx.update(g, tx.init(params), params, task_losses=jnp.array([1.0, 1.0]))
  assert upd["k"].dtype == jnp.float32
  np.testing.assert_allclose(upd["k"], [-1.0, -2.0, 0.0])
  assert state[0].weights.dtype == jnp.float32
