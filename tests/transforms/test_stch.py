"""STCH against a plain NumPy float64 reference (paper form and the authors' warm-up / log-nadir form)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import mtjax

SHAPES = {
  "shared": {"Dense_0": {"kernel": (3, 4), "bias": (4,)}, "Dense_1": {"kernel": (4,)}},
  "tower_0": {"kernel": (2,)},
  "tower_1": {"kernel": (2, 2)},
}
IS_LEAF = lambda s: isinstance(s, tuple)  # noqa: E731


def _sample(num_tasks, num_steps, seed):
  rng = np.random.default_rng(seed)
  return [
    (
      jax.tree.map(lambda s: rng.normal(size=(num_tasks,) + s), SHAPES, is_leaf=IS_LEAF),
      rng.uniform(0.1, 4.0, size=num_tasks),
    )
    for _ in range(num_steps)
  ]


def _numpy_stch(steps, *, mu, preference, ideal, normalization, warmup, nadir_steps, warmup_weighting, task_specific):
  num_tasks = steps[0][1].shape[0]
  lam = np.ones(num_tasks) if preference is None else np.asarray(preference, np.float64)
  nadir_n = warmup if nadir_steps is None else nadir_steps
  recorded = []
  history = []
  for t, (grads, losses) in enumerate(steps):
    if t < warmup:
      w = (
        np.full(num_tasks, 1.0 / num_tasks)
        if warmup_weighting == "mean"
        else np.array([1.0 / losses[i] for i in range(num_tasks)])
      )
      if t >= warmup - nadir_n:
        recorded.append(losses)
    else:
      if normalization == "none":
        f = np.array([lam[i] * (losses[i] - ideal) for i in range(num_tasks)])
      else:
        nadir = np.mean(recorded, axis=0)
        f = np.array([lam[i] * np.log(losses[i] / nadir[i]) for i in range(num_tasks)])
      e = np.exp((f - f.max()) / mu)
      p = e / e.sum()
      w = np.array([lam[i] * p[i] * (1.0 if normalization == "none" else 1.0 / losses[i]) for i in range(num_tasks)])
    flat, _ = jax.tree_util.tree_flatten_with_path(grads)
    updates = []
    for path, g in flat:
      shared = path[0].key == "shared"
      acc = np.zeros(g.shape[1:])
      for i in range(num_tasks):
        acc = acc + (w[i] if (shared or task_specific == "weighted") else 1.0) * g[i]
      updates.append(acc)
    history.append((updates, w))
  return history


@pytest.mark.parametrize(
  "num_tasks,kwargs",
  [
    (1, dict(mu=1.0)),
    (2, dict(mu=0.3, preference=[0.5, 2.0], ideal=0.1)),
    (3, dict(mu=0.7, warmup=2, task_specific="sum")),
    (5, dict(mu=0.5, normalization="log_nadir", warmup=3, warmup_weighting="log")),
    (8, dict(mu=0.2, normalization="log_nadir", warmup=3, nadir_steps=2, task_specific="sum")),
  ],
)
def test_matches_numpy_reference_over_steps(num_tasks, kwargs):
  opts = dict(
    mu=1.0,
    preference=None,
    ideal=0.0,
    normalization="none",
    warmup=0,
    nadir_steps=None,
    warmup_weighting="mean",
    task_specific="weighted",
  )
  opts.update(kwargs)
  steps = _sample(num_tasks, 6, seed=num_tasks)
  ref = _numpy_stch(steps, **opts)
  with jax.enable_x64(True):
    tx = mtjax.stch(
      num_tasks=num_tasks,
      mu=opts["mu"],
      preference=opts["preference"],
      ideal_point=opts["ideal"],
      normalization=opts["normalization"],
      warmup_steps=opts["warmup"],
      nadir_steps=opts["nadir_steps"],
      warmup_weighting=opts["warmup_weighting"],
      shared=mtjax.shared_mask(include="^shared/"),
      task_specific=opts["task_specific"],
    )
    params = jax.tree.map(lambda s: jnp.zeros(s, jnp.float64), SHAPES, is_leaf=IS_LEAF)
    state = tx.init(params)
    update = jax.jit(tx.update)
    for t, ((upd_ref, w), (grads, losses)) in enumerate(zip(ref, steps)):
      upd, state = update(jax.tree.map(jnp.asarray, grads), state, params, task_losses=jnp.asarray(losses))
      for got, want in zip(jax.tree.leaves(upd), upd_ref):
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-13, err_msg=f"step {t}")
      np.testing.assert_allclose(state.weights, w, rtol=1e-10, err_msg=f"step {t}")
    if opts["normalization"] == "log_nadir":
      n = opts["nadir_steps"] or opts["warmup"]
      np.testing.assert_allclose(
        state.nadir, np.mean([l for _, l in steps[opts["warmup"] - n : opts["warmup"]]], axis=0), rtol=1e-12
      )


def test_update_is_the_gradient_of_the_objective():
  rng = np.random.default_rng(0)
  with jax.enable_x64(True):
    params = {"shared": jnp.asarray(rng.normal(size=(3, 4))), "tower": jnp.asarray(rng.normal(size=(4, 3)))}
    x = jnp.asarray(rng.normal(size=(6, 3)))

    def loss_fn(p, x):
      return jnp.mean((jnp.tanh(x @ p["shared"]) @ p["tower"]) ** 2, axis=0) * jnp.array([1.0, 10.0, 100.0])

    pref, mu = jnp.array([1.0, 0.5, 2.0]), 0.3
    tx = mtjax.stch(num_tasks=3, mu=mu, preference=pref, ideal_point=0.2)
    losses, grads = mtjax.task_grads(loss_fn)(params, x)
    upd, _ = tx.update(grads, tx.init(params), params, task_losses=losses)
    want = jax.grad(lambda p: mtjax.stch_objective(loss_fn(p, x), mu, pref, 0.2))(params)
    for got, ref in zip(jax.tree.leaves(upd), jax.tree.leaves(want)):
      np.testing.assert_allclose(got, ref, rtol=1e-10, atol=1e-12)


def test_objective_and_limits():
  losses = np.array([0.5, 3.0, 2.0])
  for mu in (1e-3, 1.0, 10.0):
    value = float(mtjax.stch_objective(losses, mu))
    assert np.max(losses) - 1e-9 <= value <= np.max(losses) + mu * np.log(3) + 1e-6
  # Stable for huge losses / tiny mu: no overflow, the weights go to the worst task.
  tx = mtjax.stch(num_tasks=3, mu=1e-4)
  params = {"k": jnp.zeros(3)}
  upd, state = tx.update({"k": jnp.eye(3)}, tx.init(params), params, task_losses=jnp.array([1e30, 2e30, 1.0]))
  np.testing.assert_allclose(upd["k"], [0.0, 1.0, 0.0])
  # A large mu gives uniform weights.
  tx = mtjax.stch(num_tasks=3, mu=1e6)
  upd, _ = tx.update({"k": jnp.eye(3)}, tx.init(params), params, task_losses=jnp.array([1.0, 2.0, 3.0]))
  np.testing.assert_allclose(upd["k"], [1 / 3] * 3, rtol=1e-5)


def test_mu_is_traceable():
  params = {"k": jnp.zeros(2)}
  tx = optax.inject_hyperparams(mtjax.stch, static_args=("num_tasks", "warmup_steps", "nadir_steps"))(
    num_tasks=2, mu=1.0
  )
  state = tx.init(params)
  update = jax.jit(tx.update)
  losses = jnp.array([1.0, 2.0])
  u1, _ = update({"k": jnp.eye(2)}, state, params, task_losses=losses)
  state = state._replace(hyperparams={**state.hyperparams, "mu": jnp.asarray(0.1)})
  u2, _ = update({"k": jnp.eye(2)}, state, params, task_losses=losses)
  np.testing.assert_allclose(u1["k"], jax.nn.softmax(jnp.array([1.0, 2.0])), rtol=1e-6)
  np.testing.assert_allclose(u2["k"], jax.nn.softmax(jnp.array([10.0, 20.0])), rtol=1e-6)
  state = state._replace(hyperparams={**state.hyperparams, "mu": jnp.asarray(0.0)})
  with pytest.raises(Exception, match="mtjax: stch: mu must be positive"):
    jax.block_until_ready(update({"k": jnp.eye(2)}, state, params, task_losses=losses))


def test_errors():
  params = {"k": jnp.zeros(2)}
  with pytest.raises(ValueError, match="needs a warm-up"):
    mtjax.stch(num_tasks=2, normalization="log_nadir")
  with pytest.raises(ValueError, match="nadir_steps"):
    mtjax.stch(num_tasks=2, warmup_steps=2, nadir_steps=3)
  with pytest.raises(ValueError, match="normalization"):
    mtjax.stch(num_tasks=2, normalization="max")
  with pytest.raises(ValueError, match="preference"):
    mtjax.stch(num_tasks=2, preference=[1.0, 1.0, 1.0])
  with pytest.raises(ValueError, match="static Python int"):
    injected = optax.inject_hyperparams(mtjax.stch, static_args=("num_tasks",))(num_tasks=2, warmup_steps=2)
    jax.jit(injected.update)({"k": jnp.eye(2)}, injected.init(params), params, task_losses=jnp.ones(2))
  tx = mtjax.stch(num_tasks=2, normalization="log_nadir", warmup_steps=1)
  with pytest.raises(ValueError, match="mtjax: stch: task losses must be positive"):
    tx.update({"k": jnp.eye(2)}, tx.init(params), params, task_losses=jnp.array([0.0, 1.0]))
  with pytest.raises(ValueError, match="mtjax: stch: mu must be positive"):
    mtjax.stch(num_tasks=2, mu=-1.0).update(
      {"k": jnp.eye(2)}, tx.init(params), params, task_losses=jnp.array([1.0, 1.0])
    )
