"""ExcessMTL against a plain NumPy float64 reference that loops over tasks and steps."""

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
    steps.append(
      {
        name: {
          leaf: rng.normal(size=(num_tasks,) + shape) * rng.uniform(0.1, 3.0, size=(num_tasks,) + (1,) * len(shape))
          for leaf, shape in leaves.items()
        }
        for name, leaves in SHAPES.items()
      }
    )
  return steps


def _numpy_excess_mtl(steps, *, step_size, eps, warmup, weight_sum, task_specific):
  """Float64 reference in the authors' code's form (weights multiplied by exp, then renormalized)."""
  num_tasks = steps[0]["tower_0"]["kernel"].shape[0]
  total = 1.0 if weight_sum == "simplex" else float(num_tasks)
  keys = [(n, l) for n, leaves in SHAPES.items() for l in leaves if not n.startswith("tower_")]
  acc = {k: np.zeros((num_tasks,) + SHAPES[k[0]][k[1]]) for k in keys}
  w = np.full(num_tasks, total / num_tasks)
  baseline = np.zeros(num_tasks)
  history = []
  for step, grads in enumerate(steps):
    risk = np.zeros(num_tasks)
    for i in range(num_tasks):
      for k in keys:
        g = grads[k[0]][k[1]][i]
        acc[k][i] = acc[k][i] + g**2
        risk[i] += np.sum(g * g / np.sqrt(acc[k][i] + eps))
    update = False
    if warmup == 0:
      if step == 0:
        baseline = risk.copy()
      else:
        update = True
    elif step < warmup:
      baseline = baseline + risk
      if step == warmup - 1:
        baseline = baseline / warmup
    else:
      update = True
    if update:
      r = np.array([risk[i] / baseline[i] if baseline[i] != 0 else 0.0 for i in range(num_tasks)])
      w = w * np.exp(step_size * r)
      w = w / np.sum(w) * total
    updates = {}
    for name, leaves in SHAPES.items():
      for leaf in leaves:
        weighted = not name.startswith("tower_") or task_specific == "weighted"
        updates[(name, leaf)] = sum((w[i] if weighted else 1.0) * grads[name][leaf][i] for i in range(num_tasks))
    history.append((updates, w.copy(), {k: v.copy() for k, v in acc.items()}))
  return history


@pytest.mark.parametrize(
  "num_tasks,step_size,eps,warmup,weight_sum,task_specific",
  [
    (1, 0.5, 1e-7, 0, "simplex", "weighted"),
    (3, 0.5, 1e-7, 0, "simplex", "weighted"),
    (2, 0.01, 0.0, 0, "num_tasks", "sum"),
    (5, 2.0, 1e-7, 2, "num_tasks", "weighted"),
  ],
)
def test_matches_numpy_reference(num_tasks, step_size, eps, warmup, weight_sum, task_specific):
  steps = _sample(num_tasks, 6, seed=num_tasks)
  ref = _numpy_excess_mtl(
    steps, step_size=step_size, eps=eps, warmup=warmup, weight_sum=weight_sum, task_specific=task_specific
  )
  with jax.enable_x64(True):
    tx = mtjax.excess_mtl(
      num_tasks=num_tasks,
      step_size=step_size,
      eps=eps,
      warmup_steps=warmup,
      weight_sum=weight_sum,
      task_specific=task_specific,
      shared=SHARED,
    )
    params = {name: {leaf: jnp.zeros(s) for leaf, s in leaves.items()} for name, leaves in SHAPES.items()}
    state = tx.init(params)
    update = jax.jit(tx.update)
    for k, (grads, (r_upd, r_w, r_acc)) in enumerate(zip(steps, ref)):
      upd, state = update(jax.tree.map(jnp.asarray, grads), state, params)
      for (name, leaf), expected in r_upd.items():
        np.testing.assert_allclose(upd[name][leaf], expected, rtol=1e-10, atol=1e-12, err_msg=f"step {k} {name}")
      np.testing.assert_allclose(state.weights, r_w, rtol=1e-10)
      for (name, leaf), expected in r_acc.items():
        np.testing.assert_allclose(state.sq_sum[name][leaf], expected, rtol=1e-12)


def test_unconverged_task_gains_weight():
  params = {"w": jnp.zeros(2)}
  tx = mtjax.excess_mtl(num_tasks=2, step_size=1.0)
  state = tx.init(params)
  _, state = tx.update({"w": jnp.eye(2)}, state, params)
  for _ in range(3):
    _, state = tx.update({"w": jnp.array([[1.0, 0.0], [0.0, 0.01]])}, state, params)
  w = np.asarray(state.weights)
  assert w[0] > w[1] and abs(w.sum() - 1.0) < 1e-6


def test_zero_gradients_stay_finite():
  params = {"w": jnp.zeros(2)}
  tx = mtjax.excess_mtl(num_tasks=2)
  state = tx.init(params)
  for g in ({"w": jnp.zeros((2, 2))}, {"w": jnp.array([[1.0, 2.0], [0.0, 0.0]])}, {"w": jnp.ones((2, 2))}):
    upd, state = tx.update(g, state, params)
    assert np.all(np.isfinite(upd["w"])) and np.all(np.isfinite(state.weights))


def test_large_risks_saturate_instead_of_overflowing():
  params = {"w": jnp.zeros(1)}
  tx = mtjax.excess_mtl(num_tasks=2, step_size=1e6)
  state = tx.init(params)
  _, state = tx.update({"w": jnp.array([[1e-3], [1.0]])}, state, params)
  upd, state = tx.update({"w": jnp.array([[1e3], [1.0]])}, state, params)
  assert np.all(np.isfinite(upd["w"]))
  np.testing.assert_allclose(state.weights, [1.0, 0.0], atol=1e-6)


def test_chains_with_inject_hyperparams():
  params = {"a": jnp.zeros(2)}
  tx = optax.chain(
    optax.inject_hyperparams(mtjax.excess_mtl, static_args=("num_tasks", "warmup_steps"))(num_tasks=2, step_size=0.1),
    optax.adam(1e-2),
  )
  upd, _ = jax.jit(tx.update)({"a": jnp.ones((2, 2))}, tx.init(params), params)
  assert np.all(np.isfinite(upd["a"]))


def test_bad_input_raises():
  with pytest.raises(ValueError, match="mtjax: excess_mtl: num_tasks"):
    mtjax.excess_mtl(num_tasks=0)
  with pytest.raises(ValueError, match="mtjax: excess_mtl: step_size"):
    mtjax.excess_mtl(num_tasks=2, step_size=0.0)
  with pytest.raises(ValueError, match="mtjax: excess_mtl: weight_sum"):
    mtjax.excess_mtl(num_tasks=2, weight_sum="one")
  with pytest.raises(ValueError, match="mtjax: excess_mtl: warmup_steps"):
    mtjax.excess_mtl(num_tasks=2, warmup_steps=-1)
