"""DWA against a plain NumPy float64 reference that loops over tasks, steps and epochs."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import mtjax

SHAPES = {"bottom": {"kernel": (3, 2), "bias": (2,)}, "tower_0": {"kernel": (2,)}, "tower_1": {"kernel": (2, 2)}}


def _sample(num_tasks, num_steps, seed):
  rng = np.random.default_rng(seed)
  steps = []
  for _ in range(num_steps):
    grads = {
      name: {leaf: rng.normal(size=(num_tasks,) + shape) for leaf, shape in leaves.items()}
      for name, leaves in SHAPES.items()
    }
    steps.append((grads, rng.uniform(0.1, 3.0, size=num_tasks)))
  return steps


def _numpy_dwa(steps, *, block, temperature, task_specific):
  """Float64 reference: epoch (block) averages, lambda = T softmax(r / temp) from epoch 2 on."""
  num_tasks = steps[0][1].shape[0]
  means = []  # completed block averages, in order
  current = []
  history = []
  for t, (grads, losses) in enumerate(steps):
    epoch = t // block
    if epoch < 2:
      lam = np.ones(num_tasks)
    else:
      prev, prev2 = means[epoch - 1], means[epoch - 2]
      r = np.array([prev[k] / prev2[k] if prev2[k] != 0 else 1.0 for k in range(num_tasks)])
      e = np.array([np.exp(r[k] / temperature) for k in range(num_tasks)])
      lam = num_tasks * e / np.sum(e)
    updates = {}
    for name, leaves in grads.items():
      for leaf, g in leaves.items():
        acc = np.zeros(g.shape[1:])
        for i in range(num_tasks):
          w = lam[i] if (name == "bottom" or task_specific == "weighted") else 1.0
          acc = acc + w * g[i]
        updates[(name, leaf)] = acc
    history.append((updates, lam))
    current.append(losses)
    if len(current) == block:
      means.append(np.mean(np.stack(current), axis=0))
      current = []
  return history


def _run(tx, steps, jit=True):
  params = {name: {leaf: jnp.zeros(s) for leaf, s in leaves.items()} for name, leaves in SHAPES.items()}
  state = tx.init(params)
  update = jax.jit(tx.update) if jit else tx.update
  out = []
  for grads, losses in steps:
    upd, state = update(jax.tree.map(jnp.asarray, grads), state, params, task_losses=jnp.asarray(losses))
    out.append((jax.tree.map(np.asarray, upd), state))
  return out


@pytest.mark.parametrize(
  "num_tasks,mode,block,temperature,task_specific",
  [
    (1, "epoch", 2, 2.0, "weighted"),
    (2, "epoch", 3, 2.0, "weighted"),
    (3, "step", 1, 1.0, "sum"),
    (5, "window", 2, 0.5, "weighted"),
    (8, "epoch", 2, 2.0, "sum"),
  ],
)
def test_matches_numpy_reference(num_tasks, mode, block, temperature, task_specific):
  steps = _sample(num_tasks, 5 * block + 1, seed=num_tasks)
  ref = _numpy_dwa(steps, block=block, temperature=temperature, task_specific=task_specific)
  kwargs = {"steps_per_epoch": block} if mode == "epoch" else ({"window": block} if mode == "window" else {})
  with jax.enable_x64(True):
    tx = mtjax.dwa(
      num_tasks=num_tasks,
      temperature=temperature,
      mode=mode,
      shared=mtjax.shared_mask(exclude="tower_"),
      task_specific=task_specific,
      **kwargs,
    )
    got = _run(tx, steps)
  for t, ((upd, lam), (flat, state)) in enumerate(zip(ref, got)):
    if t < 2 * block:  # exactly one during the first two epochs
      np.testing.assert_array_equal(state.weights, np.ones(num_tasks))
    else:
      np.testing.assert_allclose(state.weights, lam, rtol=1e-12)
      np.testing.assert_allclose(np.sum(np.asarray(state.weights)), num_tasks, rtol=1e-12)
    for (name, leaf), value in upd.items():
      np.testing.assert_allclose(flat[name][leaf], value, rtol=1e-10, atol=1e-12, err_msg=f"step {t} {name}/{leaf}")
  if num_tasks > 1:  # the schedule really produced non-uniform weights
    assert not np.allclose(ref[-1][1], 1.0)


def test_epoch_boundaries_and_state():
  # Epochs of 2 steps; losses constant per epoch so the means are known in closed form.
  losses = [[4.0, 1.0]] * 2 + [[2.0, 1.0]] * 2 + [[1.0, 1.0]] * 2 + [[1.0, 2.0]] * 2
  tx = mtjax.dwa(num_tasks=2, steps_per_epoch=2)
  params = {"k": jnp.zeros(2)}
  state = tx.init(params)
  update = jax.jit(tx.update)
  seen = []
  for loss in losses:
    _, state = update({"k": jnp.eye(2)}, state, params, task_losses=jnp.array(loss))
    seen.append(np.asarray(state.weights))

  def lam(r):
    e = np.exp(np.asarray(r) / 2.0)
    return 2 * e / e.sum()

  np.testing.assert_array_equal(np.stack(seen[:4]), np.ones((4, 2)))
  np.testing.assert_allclose(seen[4], lam([2 / 4, 1 / 1]), rtol=1e-6)  # epoch 2 uses epochs 1 / 0
  np.testing.assert_allclose(seen[5], seen[4])
  np.testing.assert_allclose(seen[6], lam([1 / 2, 1 / 1]), rtol=1e-6)  # epoch 3 uses epochs 2 / 1
  np.testing.assert_allclose(state.epoch_means, [[1.0, 1.0], [1.0, 2.0]])
  np.testing.assert_array_equal(state.loss_sum, [0.0, 0.0])
  assert int(state.count) == 8


def test_zero_epoch_loss_is_guarded():
  tx = mtjax.dwa(num_tasks=2, mode="step")
  params = {"k": jnp.zeros(2)}
  state = tx.init(params)
  for loss in ([0.0, 1.0], [0.0, 2.0], [0.0, 3.0], [1.0, 3.0]):
    upd, state = tx.update({"k": jnp.eye(2)}, state, params, task_losses=jnp.array(loss))
    assert np.all(np.isfinite(np.asarray(upd["k"])))
  # The last step uses the two steps before it: r = [0/0 -> 1, 3/2].
  e = np.exp(np.array([1.0, 3.0 / 2.0]) / 2.0)
  np.testing.assert_allclose(state.weights, 2 * e / e.sum(), rtol=1e-6)


def test_inject_hyperparams_temperature_is_traced():
  factory = optax.inject_hyperparams(mtjax.dwa, static_args=("num_tasks", "steps_per_epoch", "window"))
  tx = factory(num_tasks=2, temperature=2.0, mode="step")
  plain = mtjax.dwa(num_tasks=2, temperature=2.0, mode="step")
  params = {"k": jnp.zeros(2)}
  s_inj, s_plain = tx.init(params), plain.init(params)
  update = jax.jit(tx.update)
  for loss in ([1.0, 1.0], [2.0, 1.0], [1.0, 1.0]):
    u_inj, s_inj = update({"k": jnp.eye(2)}, s_inj, params, task_losses=jnp.array(loss))
    u_plain, s_plain = plain.update({"k": jnp.eye(2)}, s_plain, params, task_losses=jnp.array(loss))
    np.testing.assert_allclose(u_inj["k"], u_plain["k"], rtol=1e-6)
  hot = s_inj._replace(hyperparams={**s_inj.hyperparams, "temperature": jnp.asarray(0.25)})
  u_hot, _ = update({"k": jnp.eye(2)}, hot, params, task_losses=jnp.array([1.0, 1.0]))
  u_def, _ = update({"k": jnp.eye(2)}, s_inj, params, task_losses=jnp.array([1.0, 1.0]))
  # r = [1/2, 1]: the task whose loss fell more gets less weight, more so at a low temperature.
  assert float(u_hot["k"][0]) < float(u_def["k"][0]) < 1.0


def test_errors():
  params = {"k": jnp.zeros(2)}
  tx = mtjax.dwa(num_tasks=2, mode="step")
  state = tx.init(params)
  with pytest.raises(ValueError, match="needs the per-task losses"):
    tx.update({"k": jnp.eye(2)}, state, params)
  with pytest.raises(ValueError, match="non-finite task losses"):
    tx.update({"k": jnp.eye(2)}, state, params, task_losses=jnp.array([jnp.nan, 1.0]))
  with pytest.raises(Exception, match="non-finite task losses"):
    jax.block_until_ready(jax.jit(tx.update)({"k": jnp.eye(2)}, state, params, task_losses=jnp.array([1.0, jnp.inf])))
  with pytest.raises(ValueError, match="steps_per_epoch"):
    mtjax.dwa(num_tasks=2)
  with pytest.raises(ValueError, match="window"):
    mtjax.dwa(num_tasks=2, mode="window")
  with pytest.raises(ValueError, match="mode"):
    mtjax.dwa(num_tasks=2, mode="batch")
  with pytest.raises(ValueError, match="num_tasks"):
    mtjax.dwa(num_tasks=2.0, mode="step")


def test_chain_and_float32():
  params = {"k": jnp.zeros(2, jnp.float32)}
  tx = optax.chain(mtjax.dwa(num_tasks=2, steps_per_epoch=1), optax.sgd(1.0))
  upd, state = tx.update(
    {"k": jnp.eye(2, dtype=jnp.float32)}, tx.init(params), params, task_losses=jnp.array([1.0, 1.0])
  )
  assert upd["k"].dtype == jnp.float32 and state[0].weights.dtype == jnp.float32
  np.testing.assert_array_equal(upd["k"], [-1.0, -1.0])
