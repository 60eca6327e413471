"""mtjax.normalize: the wrapped method on gradients pre-normalized in plain NumPy float64."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import mtjax
from mtjax.experiment import _registry as reg

SHAPES = {"bottom": {"kernel": (3, 2), "bias": (2,)}, "tower_0": {"kernel": (2,)}, "tower_1": {"kernel": (2, 2)}}
SHARED = mtjax.shared_mask(exclude="tower_")
NUM_TASKS = 3

INNER = {
  "upgrad": lambda: mtjax.upgrad(num_tasks=NUM_TASKS, shared=SHARED),
  "mgda": lambda: mtjax.mgda(num_tasks=NUM_TASKS, shared=SHARED),
  "config": lambda: mtjax.config(num_tasks=NUM_TASKS, shared=SHARED),
  "pcgrad": lambda: mtjax.pcgrad(key=3, num_tasks=NUM_TASKS, shared=SHARED),
  "dwa": lambda: mtjax.dwa(num_tasks=NUM_TASKS, shared=SHARED, mode="step"),  # needs task_losses
}


def _sample(num_steps, seed):
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(num_steps):
    grads = {
      name: {
        leaf: rng.normal(size=(NUM_TASKS,) + shape) * rng.uniform(0.1, 10.0, size=(NUM_TASKS,) + (1,) * len(shape))
        for leaf, shape in leaves.items()
      }
      for name, leaves in SHAPES.items()
    }
    out.append((grads, rng.uniform(0.2, 3.0, size=NUM_TASKS)))
  return out


def _pre_normalized(grads, losses, normalization):
  """The task rows of the shared leaves divided by n_i, looping over tasks (float64)."""
  norms = np.array(
    [
      np.sqrt(sum(np.sum(np.asarray(grads["bottom"][leaf][i], np.float64) ** 2) for leaf in SHAPES["bottom"]))
      for i in range(NUM_TASKS)
    ]
  )
  n = {"l2": norms, "loss": losses, "loss+": losses * norms}[normalization]
  out = {name: {leaf: np.array(g, np.float64) for leaf, g in leaves.items()} for name, leaves in grads.items()}
  for leaf in SHAPES["bottom"]:
    for i in range(NUM_TASKS):
      out["bottom"][leaf][i] = out["bottom"][leaf][i] / n[i]
  return out, n


def _params():
  return {name: {leaf: jnp.zeros(s) for leaf, s in leaves.items()} for name, leaves in SHAPES.items()}


SLOW = pytest.mark.slow


@pytest.mark.parametrize(
  "inner,normalization",
  [
    ("upgrad", "l2"),
    ("pcgrad", "loss+"),
    ("dwa", "loss"),
    pytest.param("mgda", "loss+", marks=SLOW),
    pytest.param("pcgrad", "l2", marks=SLOW),
    pytest.param("config", "l2", marks=SLOW),
    pytest.param("mgda", "l2", marks=SLOW),
    pytest.param("dwa", "l2", marks=SLOW),
    pytest.param("upgrad", "loss", marks=SLOW),
    pytest.param("upgrad", "loss+", marks=SLOW),
    pytest.param("config", "loss+", marks=SLOW),
    pytest.param("pcgrad", "loss", marks=SLOW),
  ],
)
def test_equals_inner_on_pre_normalized_gradients(inner, normalization):
  steps = _sample(2, seed=len(inner))
  with jax.enable_x64(True):
    params = _params()
    wrapped = mtjax.normalize(INNER[inner](), normalization, shared=SHARED)
    plain = INNER[inner]()
    s_w, s_p = wrapped.init(params), plain.init(params)
    for k, (grads, losses) in enumerate(steps):
      g = jax.tree.map(jnp.asarray, grads)
      upd, s_w = jax.jit(wrapped.update)(g, s_w, params, task_losses=jnp.asarray(losses))
      pre, n = _pre_normalized(grads, losses, normalization)
      ref, s_p = jax.jit(plain.update)(jax.tree.map(jnp.asarray, pre), s_p, params, task_losses=jnp.asarray(losses))
      for a, b in zip(jax.tree.leaves(upd), jax.tree.leaves(ref)):
        np.testing.assert_allclose(a, b, rtol=1e-8, atol=1e-10, err_msg=f"{inner} {normalization} step {k}")
      # the inner state advanced as the plain method's did; `weights` are its weights over n_i
      for a, b in zip(jax.tree.leaves(s_w.inner_state), jax.tree.leaves(s_p)):
        np.testing.assert_allclose(a, b, rtol=1e-8, atol=1e-10)
      # (the inner methods record their weights in float32)
      np.testing.assert_allclose(s_w.weights, np.asarray(s_p.weights, np.float64) / n, rtol=1e-6)


def test_none_is_the_inner_method():
  ((grads, losses),) = _sample(1, seed=0)
  params = _params()
  tx = mtjax.normalize(INNER["pcgrad"](), "none")
  a, _ = jax.jit(tx.update)(grads, tx.init(params), params, task_losses=losses)
  b, _ = jax.jit(INNER["pcgrad"]().update)(grads, INNER["pcgrad"]().init(params), params)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(x, y, rtol=1e-6)


def test_zero_norm_and_zero_loss_stay_finite():
  params = {"w": jnp.zeros(2)}
  g = {"w": jnp.array([[0.0, 0.0], [3.0, 4.0]])}
  for normalization, losses in (("l2", None), ("loss", jnp.array([0.0, 2.0])), ("loss+", jnp.array([0.0, 2.0]))):
    tx = mtjax.normalize(mtjax.pcgrad(num_tasks=2), normalization)
    upd, state = jax.jit(tx.update)(g, tx.init(params), params, task_losses=losses)
    assert np.all(np.isfinite(upd["w"])) and np.all(np.isfinite(state.weights)), normalization
  tx = mtjax.normalize(mtjax.linear(num_tasks=2), "loss")
  upd, state = tx.update(g, tx.init(params), params, task_losses=jnp.array([0.0, 2.0]))
  np.testing.assert_allclose(upd["w"], [1.5, 2.0])  # the zero-loss task is dropped (scale 0)
  np.testing.assert_allclose(state.weights, [0.0, 0.5])


def _loss_fn(params, x):
  h = jnp.tanh(x @ params["w"])
  return jnp.stack([jnp.mean((h - 1.0) ** 2) + 0.1, jnp.mean(h**2) + 0.2])


@pytest.mark.parametrize("normalization", ["l2", "loss"])
def test_deferred_jacobian(normalization):
  params = {"w": jnp.asarray(np.random.default_rng(0).normal(size=(3, 2)), jnp.float32)}
  x = jnp.asarray(np.random.default_rng(1).normal(size=(4, 3)), jnp.float32)
  losses, rows = mtjax.task_grads(_loss_fn)(params, x)
  _, lazy = mtjax.task_grads(_loss_fn, deferred=True)(params, x)
  for inner in (mtjax.linear(num_tasks=2), mtjax.pcgrad(num_tasks=2)):
    tx = mtjax.normalize(inner, normalization)
    a, _ = jax.jit(lambda r, l, tx=tx: tx.update(r, tx.init(params), params, task_losses=l))(rows, losses)
    b, _ = jax.jit(lambda j, l, tx=tx: tx.update(j, tx.init(params), params, task_losses=l))(lazy, losses)
    np.testing.assert_allclose(a["w"], b["w"], rtol=1e-5, atol=1e-7)


def test_loss_normalization_keeps_the_jacobian_deferred():
  seen = []

  def spy_init(params):
    return optax.EmptyState()

  def spy_update(updates, state, params=None, **kw):
    seen.append(type(updates).__name__)
    return updates.weighted_sum(jnp.ones(updates.num_tasks)), state

  params = {"w": jnp.ones((3, 2))}
  x = jnp.ones((4, 3))
  losses, lazy = mtjax.task_grads(_loss_fn, deferred=True)(params, x)
  tx = mtjax.normalize(optax.GradientTransformationExtraArgs(spy_init, spy_update), "loss")
  out, _ = tx.update(lazy, tx.init(params), params, task_losses=losses)
  assert seen == ["TaskJacobian"]
  _, rows = mtjax.task_grads(_loss_fn)(params, x)
  np.testing.assert_allclose(out["w"], rows["w"][0] / losses[0] + rows["w"][1] / losses[1], rtol=1e-5)


def test_chain_and_extra_args_pass_through():
  ((grads, losses),) = _sample(1, seed=5)
  params = _params()
  tx = optax.chain(mtjax.normalize(INNER["dwa"](), "l2", shared=SHARED), optax.adam(1e-3))
  upd, state = jax.jit(lambda g, s, l: tx.update(g, s, params, task_losses=l, foo=1))(grads, tx.init(params), losses)
  assert all(np.all(np.isfinite(u)) for u in jax.tree.leaves(upd))
  with pytest.raises(ValueError, match="mtjax: dwa needs the per-task losses"):
    tx.update(grads, tx.init(params), params)


def test_bad_input_raises():
  with pytest.raises(ValueError, match="mtjax: normalize: normalization"):
    mtjax.normalize(mtjax.upgrad(), "max")
  tx = mtjax.normalize(mtjax.upgrad(num_tasks=2), "loss")
  params = {"w": jnp.zeros(2)}
  g = {"w": jnp.ones((2, 2))}
  with pytest.raises(ValueError, match="mtjax: normalize.* needs the per-task losses"):
    tx.update(g, tx.init(params), params)
  with pytest.raises(ValueError, match="mtjax: normalize: normalization='loss' divides by the task losses"):
    tx.update(g, tx.init(params), params, task_losses=jnp.array([1.0, -1.0]))


def test_registry_entry_builds_the_wrapper():
  tx = reg.METHODS["normalize"](inner="pcgrad", normalization="loss+", num_tasks=2, key=0, steps_per_epoch=10)
  params = {"w": jnp.zeros(2)}
  upd, state = tx.update(
    {"w": jnp.array([[1.0, 0.0], [-1.0, 1.0]])}, tx.init(params), params, task_losses=jnp.array([1.0, 2.0])
  )
  assert isinstance(state, mtjax.NormalizeState) and np.all(np.isfinite(upd["w"]))
  with pytest.raises(ValueError, match="mtjax: normalize: inner must name a method"):
    reg.METHODS["normalize"](inner="nope")
