"""AdaTT (Li et al., KDD 2023): a NumPy float64 forward reference, AdaTT-sp, fixed native weights, the
gates' shapes, and who reaches what through the fusion."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtjax import models


def _random_params(model, x, dtype, seed=1):
  shapes = jax.eval_shape(model.init, jax.random.key(0), x)["params"]
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda a: jnp.asarray(rng.normal(0, 0.6, a.shape), dtype), shapes)


def _np_mlp(p, h):
  for i in range(len(p)):
    h = np.maximum(h @ p[f"Dense_{i}"]["kernel"] + p[f"Dense_{i}"]["bias"], 0.0)
  return h


def _softmax(z):
  z = z - z.max(-1, keepdims=True)
  e = np.exp(z)
  return e / e.sum(-1, keepdims=True)


def _np_forward(p, x, num_tasks, levels, m, s, learn_native):
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), p)
  x = np.asarray(x, np.float64)
  inputs, shared_in = [x] * num_tasks, x
  for l in range(levels):
    task = [[_np_mlp(p[f"level_{l}_task_{t}_expert_{i}"], inputs[t]) for i in range(m)] for t in range(num_tasks)]
    shared = [_np_mlp(p[f"level_{l}_shared_expert_{i}"], shared_in) for i in range(s)]
    every = np.stack([e for row in task for e in row] + shared)
    outs = []
    for t in range(num_tasks):
      g = _softmax(inputs[t] @ p[f"level_{l}_gate_{t}"]["logits"]["kernel"])
      v = p[f"level_{l}_native_{t}"] if learn_native else np.ones(m)
      outs.append(np.einsum("i,ibh->bh", v, np.stack(task[t])) + np.einsum("be,ebh->bh", g, every))
    if l < levels - 1 and s > 0:
      shared_in = np.einsum("be,ebh->bh", _softmax(shared_in @ p[f"level_{l}_gate_shared"]["logits"]["kernel"]), every)
    inputs = outs
  return np.stack(
    [
      (inputs[t] @ p[f"tower_{t}"]["Dense_0"]["kernel"] + p[f"tower_{t}"]["Dense_0"]["bias"])[:, 0]
      for t in range(num_tasks)
    ]
  )


@pytest.mark.parametrize(
  "levels,m,s,learn_native", [(2, 2, 1, True), (3, 1, 0, True), (1, 2, 2, False), (2, 1, 2, True)]
)
def test_forward_matches_numpy_float64(levels, m, s, learn_native):
  with jax.enable_x64(True):
    model = models.AdaTT(num_tasks=3, num_levels=levels, experts_per_task=m, num_shared_experts=s, expert=(5,),
                         tower=(1,), learn_native=learn_native)  # fmt: skip
    x = jnp.asarray(np.random.default_rng(0).normal(size=(4, 3)))
    params = _random_params(model, x, jnp.float64)
    got, aux = model.apply({"params": params}, x)
    np.testing.assert_allclose(got, _np_forward(params, x, 3, levels, m, s, learn_native), rtol=1e-12, atol=1e-12)
    assert len(aux["gates"]) == levels and aux["gates"][0].shape == (3, 4, 3 * m + s)
    np.testing.assert_allclose(np.sum(aux["gates"][-1], -1), 1.0, rtol=1e-12)
    assert ("level_0_native_0" in params) == learn_native
    assert ("level_0_gate_shared" in params) == (s > 0 and levels > 1)


def test_every_task_reaches_every_expert_and_the_last_gates_are_task_specific():
  model = models.AdaTT(num_tasks=2, num_levels=2, experts_per_task=1, num_shared_experts=1, expert=(4,), tower=(1,))
  x = jnp.asarray(np.random.default_rng(1).normal(size=(6, 3)), jnp.float32)
  params = model.init(jax.random.key(0), x)["params"]

  def norm(tree):
    return float(sum(jnp.abs(v).sum() for v in jax.tree.leaves(tree)))

  g0 = jax.grad(lambda p: model.apply({"params": p}, x)[0][0].sum())(params)
  assert norm(g0["level_0_task_1_expert_0"]) > 0 and norm(g0["level_1_task_1_expert_0"]) > 0  # fusion across tasks
  assert norm(g0["level_1_gate_1"]) == 0 and norm(g0["level_1_native_1"]) == 0 and norm(g0["tower_1"]) == 0
  assert norm(g0["level_0_gate_1"]) > 0  # a lower gate of task 1 feeds experts that task 0 reads
  mask = models.partition(model)(params)
  assert not mask["level_1_gate_0"]["logits"]["kernel"] and not mask["level_1_native_0"]
  assert mask["level_0_gate_0"]["logits"]["kernel"] and mask["level_1_task_0_expert_0"]["Dense_0"]["kernel"]


def test_errors():
  x = jnp.ones((2, 3))
  with pytest.raises(ValueError, match="experts_per_task >= 1"):
    models.AdaTT(num_tasks=2, experts_per_task=0).init(jax.random.key(0), x)
  with pytest.raises(ValueError, match="at least one layer width"):
    models.AdaTT(num_tasks=2, expert=()).init(jax.random.key(0), x)
