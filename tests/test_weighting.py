"""The Gram-weighting core: Grams per group, shared masks, validation and finiteness checks."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import mtjax
from mtjax._src import numerics
from mtjax._src import weighting


def _tree(num_tasks, seed=0, scale=1.0):
  rng = np.random.default_rng(seed)
  shapes = {
    "trunk": {"Dense_0": {"kernel": (4, 3), "bias": (3,)}, "Dense_1": {"kernel": (3, 2)}},
    "tower_0": {"kernel": (2,)},
    "tower_1": {"kernel": (2, 2)},
  }
  return jax.tree.map(
    lambda s: jnp.asarray(scale * rng.normal(size=(num_tasks,) + s), jnp.float32),
    shapes,
    is_leaf=lambda s: isinstance(s, tuple),
  )


def _recording_transform(groups=None, shared=None, weights=None, task_specific="sum"):
  """A transform whose weights_fn records the Grams it saw (through the state)."""

  class State(tuple):
    pass

  def init(params):
    del params
    return {"grams": jnp.zeros((0,))}

  def weights_fn(inputs, state):
    del state
    w = jnp.ones((inputs.num_tasks,)) if weights is None else weights
    return w, {"grams": inputs.grams}

  return weighting.gram_weighting(
    weights_fn, init, method="recorder", groups=groups, shared=shared, task_specific=task_specific
  )


def _np_gram(leaves):
  flat = np.concatenate([np.asarray(l, np.float64).reshape(l.shape[0], -1) for l in leaves], axis=1)
  return flat @ flat.T


@pytest.mark.parametrize("groups", [None, "model", "layer", "leaf"])
def test_grams_per_group_match_numpy(groups):
  g = _tree(3, seed=1)
  params = jax.tree.map(lambda x: x[0], g)
  mask = mtjax.shared_mask(exclude=r"tower_")
  tx = _recording_transform(groups=groups, shared=mask)
  _, state = jax.jit(tx.update)(g, tx.init(params), params)
  trunk = g["trunk"]
  if groups in (None, "model"):
    expected = [_np_gram(jax.tree.leaves(trunk))]
  elif groups == "layer":
    expected = [_np_gram(jax.tree.leaves(trunk["Dense_0"])), _np_gram(jax.tree.leaves(trunk["Dense_1"]))]
  else:
    expected = [_np_gram([l]) for l in jax.tree.leaves(trunk)]
  np.testing.assert_allclose(state["grams"], np.stack(expected), rtol=1e-5, atol=1e-5)
  assert weighting.num_groups(groups, params, mask) == len(expected)


def test_update_is_weighted_sum_and_task_specific_sum():
  g = _tree(3, seed=2)
  params = jax.tree.map(lambda x: x[0], g)
  w = jnp.array([0.5, 2.0, -1.0])
  tx = _recording_transform(shared=mtjax.shared_mask(exclude=r"tower_"), weights=w)
  upd, _ = tx.update(g, tx.init(params), params)
  np.testing.assert_allclose(
    upd["trunk"]["Dense_0"]["kernel"],
    np.tensordot(np.asarray(w), np.asarray(g["trunk"]["Dense_0"]["kernel"]), 1),
    rtol=1e-6,
  )
  # Task-specific leaves get exactly the plain sum of their task gradients.
  np.testing.assert_array_equal(upd["tower_0"]["kernel"], np.asarray(g["tower_0"]["kernel"]).sum(0))
  tx_w = _recording_transform(shared=mtjax.shared_mask(exclude=r"tower_"), weights=w, task_specific="weighted")
  upd_w, _ = tx_w.update(g, tx_w.init(params), params)
  np.testing.assert_allclose(
    upd_w["tower_1"]["kernel"], np.tensordot(np.asarray(w), np.asarray(g["tower_1"]["kernel"]), 1), rtol=1e-6
  )


def test_shared_mask_helper_and_explicit_masks():
  params = {"bottom": {"kernel": 1.0}, "tower_0": {"kernel": 1.0}, "gate_1": {"kernel": 1.0}}
  assert mtjax.shared_mask(exclude=r"tower_|gate_")(params) == {
    "bottom": {"kernel": True},
    "tower_0": {"kernel": False},
    "gate_1": {"kernel": False},
  }
  assert mtjax.shared_mask(include="bottom")(params)["gate_1"]["kernel"] is False
  g = _tree(2)
  bad_mask = {"trunk": True}
  tx = _recording_transform(shared=bad_mask)
  with pytest.raises(ValueError, match="shared= mask"):
    tx.update(g, tx.init(None))
  non_bool = jax.tree.map(lambda _: 1, jax.tree.map(lambda x: x[0], g))
  tx = _recording_transform(shared=non_bool)
  with pytest.raises(ValueError, match="Python bools"):
    tx.update(g, tx.init(None))
  all_false = jax.tree.map(lambda _: False, jax.tree.map(lambda x: x[0], g))
  tx = _recording_transform(shared=all_false)
  with pytest.raises(ValueError, match="no leaf as shared"):
    tx.update(g, tx.init(None))


def test_task_axis_errors():
  tx = mtjax.linear(num_tasks=3)
  params = {"a": jnp.zeros(4), "b": jnp.zeros((2, 2))}
  state = tx.init(params)
  with pytest.raises(ValueError, match="num_tasks=3"):
    tx.update({"a": jnp.zeros((2, 4)), "b": jnp.zeros((2, 2, 2))}, state, params)
  with pytest.raises(ValueError, match="disagree on the task axis.*'b'"):
    tx.update({"a": jnp.zeros((3, 4)), "b": jnp.zeros((2, 2, 2))}, state)
  with pytest.raises(ValueError, match="scalar"):
    tx.update({"a": jnp.zeros(()), "b": jnp.zeros((3, 2, 2))}, state)
  with pytest.raises(ValueError, match="does not match param shape"):
    # A summed gradient whose first axis happens to be 3 is caught through params.
    tx.update({"a": jnp.zeros((3, 4)), "b": jnp.zeros((3, 2))}, state, {"a": jnp.zeros(4), "b": jnp.zeros((3, 2))})


def test_task_losses_validation_and_nonfinite():
  g = _tree(3)
  tx = _recording_transform()
  state = tx.init(None)
  with pytest.raises(ValueError, match=r"shape \(3,\)"):
    tx.update(g, state, task_losses=jnp.ones(2))
  with pytest.raises(ValueError, match="non-finite task losses"):
    tx.update(g, state, task_losses=jnp.array([1.0, jnp.nan, 2.0]))
  with pytest.raises(Exception, match="non-finite task losses"):
    jax.block_until_ready(jax.jit(tx.update)(g, state, task_losses=jnp.array([1.0, jnp.inf, 2.0])))
  bad = jax.tree.map(lambda x: x.at[0].set(jnp.nan), g)
  with pytest.raises(Exception, match="non-finite task gradients"):
    jax.block_until_ready(jax.jit(tx.update)(bad, state))
  # Finite inputs pass under jit, and the check does not force recompilation.
  out, _ = jax.jit(tx.update)(g, state, task_losses=jnp.ones(3))
  assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(out))


def test_safe_numerics_zero():
  x = jnp.zeros(3)
  assert float(numerics.safe_norm(x)) == 0.0
  grad = jax.grad(lambda v: numerics.safe_norm(v))(x)
  assert bool(jnp.all(jnp.isfinite(grad)))
  cos = numerics.cosine_from_gram(jnp.array([[0.0, 0.0], [0.0, 4.0]]))
  np.testing.assert_array_equal(cos, [[0.0, 0.0], [0.0, 1.0]])


def test_linear_against_numpy_and_sum():
  g = _tree(4, seed=5)
  params = jax.tree.map(lambda x: x[0], g)
  w = np.array([1.0, 0.5, 2.0, 0.0])
  tx = optax.chain(mtjax.linear(w), optax.sgd(1.0))
  upd, state = tx.update(g, tx.init(params), params)
  for u, leaf in zip(jax.tree.leaves(upd), jax.tree.leaves(g)):
    np.testing.assert_allclose(u, -np.tensordot(w, np.asarray(leaf, np.float64), 1), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(state[0].weights, w)
  with pytest.raises(ValueError, match="1-D"):
    mtjax.linear([[1.0]])
  with pytest.raises(ValueError, match="linear: weights has 2 entries but the task gradients have 4 tasks"):
    mtjax.linear([1.0, 1.0]).update(g, mtjax.linear([1.0, 1.0]).init(params))


@pytest.mark.parametrize(
  "factory",
  [
    lambda: mtjax.linear(num_tasks=3),
    lambda: mtjax.dwa(num_tasks=3, steps_per_epoch=2),
    lambda: mtjax.uncertainty(num_tasks=3),
  ],
)
def test_gram_free_methods_reject_nonfinite_gradients(factory):
  g = _tree(3)
  bad = jax.tree.map(lambda x: x.at[1].set(jnp.inf), g)
  tx = factory()
  state = tx.init(jax.tree.map(lambda x: x[0], g))
  with pytest.raises(ValueError, match="non-finite task gradients"):
    tx.update(bad, state, task_losses=jnp.ones(3))
  with pytest.raises(Exception, match="non-finite task gradients"):
    jax.block_until_ready(jax.jit(tx.update)(bad, state, task_losses=jnp.ones(3)))
  out, _ = jax.jit(tx.update)(g, state, task_losses=jnp.ones(3))
  assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(out))


def test_runtime_checks_switch():
  g = _tree(3)
  tx = mtjax.linear(num_tasks=3)
  state = tx.init(None)
  bad_losses = jnp.array([1.0, jnp.nan, 2.0])
  with mtjax.runtime_checks(False):
    assert not mtjax.runtime_checks_enabled()
    # Traced with checks off: no error, no callback in the program.
    out, _ = jax.jit(tx.update)(g, state, task_losses=bad_losses)
    lowered = jax.jit(lambda *a, **k: tx.update(*a, **k)).lower(g, state, task_losses=bad_losses)
    assert "callback" not in lowered.as_text()
    # Concrete values are always checked.
    with pytest.raises(ValueError, match="non-finite task losses"):
      tx.update(g, state, task_losses=bad_losses)
  assert mtjax.runtime_checks_enabled()
  # The switch is read at trace time: a function traced now has the checks again.
  lowered = jax.jit(lambda *a, **k: tx.update(*a, **k)).lower(g, state, task_losses=bad_losses)
  assert "callback" in lowered.as_text()


@pytest.mark.parametrize(
  "factory,conds",
  [
    (lambda: mtjax.pcgrad(num_tasks=3), 1),  # losses + Gram diagonal: one test
    (lambda: mtjax.linear(num_tasks=3), 1),  # losses + update: one test
    (lambda: mtjax.mgda(num_tasks=3, normalization="loss"), 2),  # + its own non-negative-loss check
  ],
)
def test_checks_are_one_cond_with_a_pure_callback(factory, conds):
  # One on-device test per update, through a pure (not side-effecting) callback: a side-effecting
  # one makes XLA:CPU run the whole step in sequence (see numerics.enforce).
  g = _tree(3)
  tx = factory()
  state = tx.init(None)
  text = str(jax.make_jaxpr(lambda g, l: tx.update(g, state, task_losses=l))(g, jnp.ones(3)))
  assert "debug_callback" not in text
  assert text.count("pure_callback") == conds


def test_enforce_under_vmap_raises_only_for_failing_members():
  g = _tree(3)
  tx = mtjax.pcgrad(num_tasks=3)
  state = tx.init(None)
  batched = jax.tree.map(lambda x: jnp.stack([x, 2 * x]), g)  # two independent problems
  run = jax.jit(jax.vmap(lambda g, l: tx.update(g, state, task_losses=l)[0]))
  good = jnp.ones((2, 3))
  out = run(batched, good)  # the cond is a select under vmap: the callback runs and must not raise
  ref = tx.update(g, state, task_losses=jnp.ones(3))[0]
  np.testing.assert_allclose(out["trunk"]["Dense_0"]["kernel"][0], ref["trunk"]["Dense_0"]["kernel"], rtol=1e-6)
  bad = good.at[1, 2].set(jnp.nan)
  with pytest.raises(Exception, match="mtjax: non-finite task losses"):
    jax.block_until_ready(run(batched, bad))


def test_enforce_keeps_values_and_gradients():
  x = jnp.arange(3.0)
  f = jax.jit(lambda x: numerics.enforce(x * 2, numerics.condition_check(x[0] > 5, "mtjax: too big")))
  np.testing.assert_array_equal(f(x), 2 * x)
  np.testing.assert_array_equal(jax.grad(lambda x: jnp.sum(f(x)))(x), jnp.full(3, 2.0))
  with pytest.raises(Exception, match="mtjax: too big"):
    jax.block_until_ready(f(x + 10))
  with pytest.raises(ValueError, match="mtjax: too big"):  # concrete: at once
    numerics.enforce(x, numerics.condition_check(jnp.asarray(True), "mtjax: too big"))
