"""Auto-Lambda against a plain NumPy float64 reference, jax.grad through the unrolled step, and the
conformance checks of ``test_conformance.py`` written out here (its table calls ``update`` without
the ``validation_batch`` that Auto-Lambda needs, and its shared-mask / scaling / permutation
properties do not hold for a meta-learned weighting whose hypergradient reads every leaf)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import mtjax

SHAPES = {
  "shared": {"Dense_0": {"kernel": (3, 2), "bias": (2,)}, "Dense_1": {"kernel": (2,)}},
  "tower_0": {"kernel": (2,)},
  "tower_1": {"kernel": (1, 2)},
}
IS_LEAF = lambda s: isinstance(s, tuple)  # noqa: E731
P = 3 * 2 + 2 + 2 + 2 + 2  # parameters in SHAPES


def _flat(tree):
  return jnp.concatenate([jnp.ravel(x) for x in jax.tree.leaves(tree)])


def _unflat(vec, like):
  leaves, treedef = jax.tree.flatten(like)
  out, start = [], 0
  for leaf in leaves:
    size = int(np.prod(np.shape(leaf)))
    out.append(np.reshape(vec[start : start + size], np.shape(leaf)))
    start += size
  return jax.tree.unflatten(treedef, out)


def quadratic_meta_loss(params, batch):
  """``L_j(x) = 0.5 sum_p a_jp (x_p - m_jp)^2 + c_j . x``: ``[T]`` analytic validation losses."""
  x = _flat(params)
  return 0.5 * jnp.sum(batch["a"] * (x[None, :] - batch["m"]) ** 2, axis=1) + batch["c"] @ x


def _sample(num_tasks, num_steps, seed):
  rng = np.random.default_rng(seed)
  params = jax.tree.map(lambda s: rng.normal(size=s), SHAPES, is_leaf=IS_LEAF)
  steps = []
  for _ in range(num_steps):
    grads = jax.tree.map(lambda s: rng.normal(size=(num_tasks,) + s), SHAPES, is_leaf=IS_LEAF)
    batch = {
      "a": rng.uniform(0.5, 2.0, size=(num_tasks, P)),
      "m": rng.normal(size=(num_tasks, P)),
      "c": 0.1 * rng.normal(size=(num_tasks, P)),
    }
    steps.append((grads, batch))
  return params, steps


def _numpy_auto_lambda(
  params, steps, *, alpha, beta, lr, init, primary=None, inner="sgd", order="meta_first", wd=0.0, nonnegative=False
):
  """Float64 reference. The transform's update d is applied as theta <- theta - lr * d between steps."""
  num_tasks = steps[0][1]["m"].shape[0]
  x = np.concatenate([np.ravel(np.asarray(leaf, np.float64)) for leaf in jax.tree.leaves(params)])
  lam = np.full(num_tasks, init, np.float64)
  mom, var = np.zeros(num_tasks), np.zeros(num_tasks)
  prim = range(num_tasks) if primary is None else primary
  history = []
  for k, (grads, batch) in enumerate(steps):
    g = np.stack(
      [np.concatenate([np.ravel(leaf[i]) for leaf in jax.tree.leaves(grads)]) for i in range(num_tasks)]
    )  # [T, P]
    d_old = np.zeros(P)
    for i in range(num_tasks):
      d_old += lam[i] * g[i]
    xv = x - alpha * (d_old + wd * x)
    val_grad = np.zeros(P)  # gradient of sum_{j in P} L_j at theta'
    meta = 0.0
    for j in prim:
      val_grad += batch["a"][j] * (xv - batch["m"][j]) + batch["c"][j]
      meta += 0.5 * np.sum(batch["a"][j] * (xv - batch["m"][j]) ** 2) + batch["c"][j] @ xv
    hyper = np.array([-alpha * g[i] @ val_grad for i in range(num_tasks)])
    if inner == "sgd":
      new_lam = lam - beta * hyper
    else:  # optax.adam(beta): b1 0.9, b2 0.999, eps 1e-8 outside the root, bias-corrected
      mom = 0.9 * mom + 0.1 * hyper
      var = 0.999 * var + 0.001 * hyper**2
      mhat, vhat = mom / (1 - 0.9 ** (k + 1)), var / (1 - 0.999 ** (k + 1))
      new_lam = lam - beta * mhat / (np.sqrt(vhat) + 1e-8)
    if nonnegative:
      new_lam = np.maximum(new_lam, 0.0)
    used = new_lam if order == "meta_first" else lam
    d = np.zeros(P)
    for i in range(num_tasks):
      d += used[i] * g[i]
    history.append((d, used.copy(), new_lam.copy(), meta))
    lam = new_lam
    x = x - lr * d
  return history


def _run(tx, params, steps, lr, jit=True):
  update = jax.jit(tx.update) if jit else tx.update
  state = tx.init(params)
  out = []
  for grads, batch in steps:
    d, state = update(grads, state, params, validation_batch=batch)
    out.append((d, state))
    params = jax.tree.map(lambda p, u: p - lr * u, params, d)
  return out


REFERENCE_CASES = [
  dict(num_tasks=1, alpha=0.1, beta=0.5, init=1.0),
  dict(num_tasks=2, alpha=0.05, beta=0.3, init=0.1),
  dict(num_tasks=3, alpha=0.1, beta=1e-2, init=0.1, inner="adam"),
  dict(num_tasks=3, alpha=0.1, beta=0.2, init=0.5, primary=(1,)),
  dict(num_tasks=4, alpha=0.02, beta=1e-2, init=0.1, primary=(0, 2), inner="adam"),
  dict(num_tasks=3, alpha=0.1, beta=0.3, init=1.0, order="update_first"),
  dict(num_tasks=3, alpha=0.1, beta=0.5, init=0.1, wd=0.3, nonnegative=True),
  dict(num_tasks=8, alpha=0.05, beta=0.1, init=0.2, primary=(3, 4, 7)),
]


@pytest.mark.parametrize("case", REFERENCE_CASES, ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()))
def test_matches_numpy_reference_over_steps(case):
  case = dict(case)
  num_tasks = case.pop("num_tasks")
  inner = case.get("inner", "sgd")
  params, steps = _sample(num_tasks, 5, seed=num_tasks)
  lr = 0.3
  ref = _numpy_auto_lambda(params, steps, lr=lr, **case)
  with jax.enable_x64(True):
    opt = optax.sgd(case["beta"]) if inner == "sgd" else optax.adam(case["beta"])
    tx = mtjax.auto_lambda(
      quadratic_meta_loss,
      num_tasks=num_tasks,
      virtual_lr=case["alpha"],
      primary_tasks=case.get("primary"),
      weight_init=case["init"],
      weight_optimizer=opt,
      order=case.get("order", "meta_first"),
      virtual_weight_decay=case.get("wd", 0.0),
      nonnegative=case.get("nonnegative", False),
    )
    params64 = jax.tree.map(jnp.asarray, params)
    out = _run(tx, params64, [(jax.tree.map(jnp.asarray, g), jax.tree.map(jnp.asarray, b)) for g, b in steps], lr)
    for k, ((d, state), (d_ref, used, lam, meta)) in enumerate(zip(out, ref)):
      np.testing.assert_allclose(_flat(d), d_ref, rtol=1e-10, atol=1e-12, err_msg=f"step {k}")
      np.testing.assert_allclose(state.lambdas, lam, rtol=1e-10, atol=1e-12, err_msg=f"step {k}")
      np.testing.assert_allclose(state.weights, used, rtol=1e-10, atol=1e-12, err_msg=f"step {k}")
      np.testing.assert_allclose(state.meta_loss, meta, rtol=1e-10, err_msg=f"step {k}")
      assert state.lambdas.dtype == jnp.float64 and all(x.dtype == jnp.float64 for x in jax.tree.leaves(d))
  if case.get("nonnegative"):
    assert np.any(np.array([r[2] for r in ref]) == 0.0), "the clipping case should clip"


def test_hypergradient_equals_jax_grad_through_the_unrolled_step():
  """The meta step is lambda - beta * jax.grad of the primary validation loss at theta - alpha J^T lambda."""
  params, steps = _sample(3, 1, seed=7)
  grads, batch = steps[0]
  alpha, beta = 0.07, 0.4
  with jax.enable_x64(True):
    for primary in (None, (0, 2)):
      tx = mtjax.auto_lambda(
        quadratic_meta_loss,
        num_tasks=3,
        virtual_lr=alpha,
        primary_tasks=primary,
        weight_init=0.3,
        weight_optimizer=optax.sgd(beta),
      )
      _, state = jax.jit(tx.update)(grads, tx.init(params), params, validation_batch=batch)

      def unrolled(lam):
        virtual = jax.tree.map(lambda p, g: p - alpha * jnp.tensordot(lam, g, axes=1), params, grads)
        losses = quadratic_meta_loss(virtual, batch)
        return jnp.sum(losses if primary is None else losses[jnp.array(primary)])

      lam0 = jnp.full(3, 0.3)
      expected = lam0 - beta * jax.grad(unrolled)(lam0)
      np.testing.assert_allclose(state.lambdas, expected, rtol=1e-12)
      np.testing.assert_allclose(state.meta_loss, unrolled(lam0), rtol=1e-12)


def test_scalar_meta_loss_and_primary_subset_agree():
  params, steps = _sample(3, 3, seed=3)
  scalar = lambda p, b: quadratic_meta_loss(p, b)[1] + quadratic_meta_loss(p, b)[2]  # noqa: E731
  with jax.enable_x64(True):
    a = _run(
      mtjax.auto_lambda(scalar, num_tasks=3, virtual_lr=0.1, weight_optimizer=optax.sgd(0.2)), params, steps, 0.2
    )
    b = _run(
      mtjax.auto_lambda(
        quadratic_meta_loss, num_tasks=3, virtual_lr=0.1, primary_tasks=[1, 2], weight_optimizer=optax.sgd(0.2)
      ),
      params,
      steps,
      0.2,
    )
    for (da, sa), (db, sb) in zip(a, b):
      np.testing.assert_allclose(sa.lambdas, sb.lambdas, rtol=1e-12)
      np.testing.assert_allclose(_flat(da), _flat(db), rtol=1e-12)
    # the primary tasks' weights move; an auxiliary task only through its effect on the primary ones
    assert not np.allclose(sb.lambdas, 0.1)


# ----------------------------------------------------------------------------- a real model, deferred Jacobian


def _model_loss(params, batch):
  h = jnp.tanh(batch["x"] @ params["shared"]["Dense_0"]["kernel"] + params["shared"]["Dense_0"]["bias"][None, :])
  z = h * params["shared"]["Dense_1"]["kernel"][None, :]
  out0 = z @ params["tower_0"]["kernel"]
  out1 = z @ params["tower_1"]["kernel"][0]
  return jnp.stack([jnp.mean((out0 - batch["y"][0]) ** 2), jnp.mean((out1 - batch["y"][1]) ** 2)])


def _model_batch(rng, n=16):
  return {
    "x": jnp.asarray(rng.normal(size=(n, 3)), jnp.float32),
    "y": jnp.asarray(rng.normal(size=(2, n)), jnp.float32),
  }


@pytest.mark.parametrize("order", ["meta_first", "update_first"])
def test_deferred_jacobian_matches_materialized_rows(order):
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda s: jnp.asarray(rng.normal(size=s), jnp.float32), SHAPES, is_leaf=IS_LEAF)
  tx = mtjax.auto_lambda(_model_loss, num_tasks=2, virtual_lr=0.5, weight_optimizer=optax.sgd(0.5), order=order)
  rows_fn = mtjax.task_grads(_model_loss)
  lazy_fn = mtjax.task_grads(_model_loss, deferred=True)

  @jax.jit
  def both(params, state_r, state_l, train, val):
    losses, rows = rows_fn(params, train)
    _, lazy = lazy_fn(params, train)
    return (
      tx.update(rows, state_r, params, task_losses=losses, validation_batch=val),
      tx.update(lazy, state_l, params, task_losses=losses, validation_batch=val),
    )

  state_r = state_l = tx.init(params)
  for _ in range(3):
    (d_r, state_r), (d_l, state_l) = both(params, state_r, state_l, _model_batch(rng), _model_batch(rng))
    # float32, two summation orders of a meta-gradient compounded over steps: agreement to ~100 ulps
    np.testing.assert_allclose(state_l.lambdas, state_r.lambdas, rtol=2e-5, atol=1e-6)
    np.testing.assert_allclose(_flat(d_l), _flat(d_r), rtol=5e-5, atol=1e-6)
    params = jax.tree.map(lambda p, u: p - 0.1 * u, params, d_r)
  assert not np.allclose(state_r.lambdas, 0.1)


# ----------------------------------------------------------------------------- conformance, written out

NUM_TASKS = 3


def _make(num_tasks=NUM_TASKS, **kw):
  opts = dict(num_tasks=num_tasks, virtual_lr=0.1, weight_lr=1e-2)
  opts.update(kw)
  return mtjax.auto_lambda(quadratic_meta_loss, **opts)


def tap():
  return optax.GradientTransformation(
    lambda params: jax.tree.map(jnp.zeros_like, params), lambda updates, state, params=None: (updates, updates)
  )


def _sequence(seed, num_tasks=NUM_TASKS, dtype=np.float32, steps=3):
  params, seq = _sample(num_tasks, steps, seed)
  cast = lambda t: jax.tree.map(lambda x: np.asarray(x, dtype), t)  # noqa: E731
  losses = np.random.default_rng(seed).uniform(0.5, 2.0, size=(steps, num_tasks)).astype(dtype)
  return cast(params), [(cast(g), cast(b)) for g, b in seq], losses


@functools.cache
def chain_bundle(dtype="float32"):
  del dtype  # labels the cache entry: float64 bundles run under enable_x64
  tx = optax.chain(_make(), tap(), optax.adam(1e-2))
  traces = []

  def step(grads, state, params, losses, batch):
    traces.append(1)
    return tx.update(grads, state, params, task_losses=losses, validation_batch=batch, foo=1, bar="x")

  return tx, jax.jit(step), traces


def test_chains_with_adam_extra_args_and_no_retrace():
  tx, step, traces = chain_bundle()
  params, seq, losses = _sequence(0)
  state = tx.init(params)
  for k, ((grads, batch), l) in enumerate(zip(seq, losses)):
    updates, state = step(grads, state, params, l, batch)
    for out in (updates, state[1]):
      assert jax.tree.structure(out) == jax.tree.structure(params)
      for u, p in zip(jax.tree.leaves(out), jax.tree.leaves(params)):
        assert u.shape == p.shape and u.dtype == p.dtype, k
    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves((updates, state)))
  assert len(traces) == 1


def test_same_result_under_inject_hyperparams():
  params, seq, _ = _sequence(1)
  static = ("num_tasks", "meta_loss_fn", "primary_tasks", "order", "nonnegative")
  plain = _make(primary_tasks=(0, 2))
  injected = optax.inject_hyperparams(mtjax.auto_lambda, static_args=static)(
    quadratic_meta_loss, num_tasks=NUM_TASKS, virtual_lr=0.1, weight_lr=1e-2, primary_tasks=(0, 2)
  )
  traces = []

  def inj_step(g, s, p, b):
    traces.append(1)
    return injected.update(g, s, p, validation_batch=b)

  inj = jax.jit(inj_step)
  sp, si = plain.init(params), injected.init(params)
  plain_update = jax.jit(plain.update)
  for grads, batch in seq:
    dp, sp = plain_update(grads, sp, params, validation_batch=batch)
    di, si = inj(grads, si, params, batch)
    np.testing.assert_allclose(_flat(di), _flat(dp), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(si.inner_state.lambdas, sp.lambdas, rtol=1e-5, atol=1e-7)
  # a new injected value (the training optimizer's current learning rate) runs through the same compiled update
  si = si._replace(hyperparams={**si.hyperparams, "virtual_lr": 0.5 * si.hyperparams["virtual_lr"]})
  inj(seq[0][0], si, params, seq[0][1])
  assert len(traces) == 1


def test_float32_and_float64():
  params, seq, losses = _sequence(2)
  tx32, step32, _ = chain_bundle("float32")
  s32 = tx32.init(params)
  out32 = []
  for (g, b), l in zip(seq, losses):
    u, s32 = step32(g, s32, params, l, b)
    out32.append((u, s32))
  with jax.enable_x64(True):
    cast = lambda t: jax.tree.map(lambda x: np.asarray(x, np.float64), t)  # noqa: E731
    tx64, step64, _ = chain_bundle("float64")
    p64 = cast(params)
    s64 = tx64.init(p64)
    for k, ((g, b), l) in enumerate(zip(seq, losses)):
      u64, s64 = step64(cast(g), s64, p64, cast(l), cast(b))
      assert all(x.dtype == jnp.float64 for x in jax.tree.leaves((u64, s64[1])))
      assert s64[0].lambdas.dtype == jnp.float64
      u32, st32 = out32[k]
      np.testing.assert_allclose(_flat(st32[1]), _flat(s64[1]), rtol=1e-4, atol=1e-5, err_msg=f"step {k}")
      np.testing.assert_allclose(st32[0].lambdas, s64[0].lambdas, rtol=1e-4, atol=1e-6)
      np.testing.assert_allclose(_flat(u32), _flat(u64), rtol=1e-3, atol=1e-6)


def test_edge_case_gradients():
  tx, step, traces = chain_bundle()
  params, seq, losses = _sequence(3, steps=1)
  grads, batch = seq[0]
  init = tx.init(params)
  zero = jax.tree.map(np.zeros_like, grads)
  _, state = step(zero, init, params, losses[0], batch)
  assert all(np.all(x == 0) for x in jax.tree.leaves(state[1]))
  np.testing.assert_array_equal(state[0].lambdas, np.full(NUM_TASKS, 0.1, np.float32))  # zero hypergradient
  identical = jax.tree.map(lambda g: np.repeat(g[:1], NUM_TASKS, axis=0), grads)
  _, state = step(identical, init, params, losses[0], batch)
  g0, d = _flat(jax.tree.map(lambda g: g[0], identical)), _flat(state[1])
  np.testing.assert_allclose(d, float(jnp.sum(state[0].weights)) * g0, rtol=1e-5, atol=1e-6)
  assert float(jnp.sum(state[0].weights)) > 0
  opposite = jax.tree.map(lambda g: np.stack([g[0], -g[0], g[0]]), grads)
  one_zero = jax.tree.map(
    lambda g: g * np.array([1.0, 0.0, 1.0], np.float32).reshape((-1,) + (1,) * (g.ndim - 1)), grads
  )
  for kind in (opposite, one_zero):
    u, state = step(kind, init, params, losses[0], batch)
    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves((u, state)))
  for s in (1e-10, 1e3):  # tiny and large gradients: finite, and the tiny ones give a ~ linear update
    u, state = step(jax.tree.map(lambda g: (g * s).astype(np.float32), grads), init, params, losses[0], batch)
    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves((u, state)))
  assert len(traces) == 1


@pytest.mark.parametrize("num_tasks", [1, 8])
def test_one_and_many_tasks(num_tasks):
  tx = _make(num_tasks)
  update = jax.jit(tx.update)
  params, seq, losses = _sequence(4, num_tasks=num_tasks)
  state = tx.init(params)
  for (grads, batch), l in zip(seq, losses):
    d, state = update(grads, state, params, task_losses=l, validation_batch=batch)
    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves((d, state)))
    assert state.weights.shape == (num_tasks,)
  if num_tasks == 1:  # a positive multiple of the only gradient
    g0 = _flat(jax.tree.map(lambda g: g[0], seq[-1][0]))
    np.testing.assert_allclose(_flat(d), state.weights[0] * g0, rtol=1e-5, atol=1e-7)


def test_convergence_with_sgd_in_scan():
  """Two quadratic tasks, meta loss on the same tasks (equal mode): the iterate reaches the segment
  between the minima (the Pareto set), and an auxiliary task that conflicts is switched off."""
  minima = np.array([[1.0, -1.0, 0.5, 1.0], [-1.0, 1.0, -0.5, 0.0]], np.float32)

  def losses_fn(params, m):
    return 0.5 * jnp.sum((params["x"][None, :] - m) ** 2, axis=1) + 0.5

  def train(primary):
    tx = optax.chain(
      mtjax.auto_lambda(losses_fn, num_tasks=2, virtual_lr=0.1, weight_init=1.0, weight_lr=0.05, primary_tasks=primary),
      optax.sgd(0.1),
    )
    params = {"x": jnp.array([3.0, 3.0, 2.0, 3.0])}
    state = tx.init(params)

    def body(carry, _):
      params, state = carry
      grads = jax.jacrev(losses_fn)(params, minima)
      updates, state = tx.update(grads, state, params, task_losses=losses_fn(params, minima), validation_batch=minima)
      return (optax.apply_updates(params, updates), state), None

    (params, state), _ = jax.lax.scan(body, (params, state), None, length=300)
    return np.asarray(params["x"], np.float64), state

  x, state = train(None)
  a, b = minima.astype(np.float64)
  lam = np.clip((x - a) @ (b - a) / ((b - a) @ (b - a)), 0, 1)
  assert np.linalg.norm(x - (a + lam * (b - a))) < 0.05, x
  x, state = train((0,))  # auxiliary learning: task 1 only hinders task 0
  lambdas = np.asarray(state[0].lambdas)
  assert lambdas[1] < 0.5 * lambdas[0], lambdas
  assert np.linalg.norm(x - a) < 0.3, x


def test_bad_input_raises_clear_errors():
  tx = _make()
  params, seq, losses = _sequence(5, steps=1)
  grads, batch = seq[0]
  state = tx.init(params)
  with pytest.raises(ValueError, match="mtjax: auto_lambda needs a validation batch"):
    tx.update(grads, state, params, task_losses=losses[0])
  with pytest.raises(ValueError, match="mtjax: auto_lambda needs the parameters"):
    tx.update(grads, state, validation_batch=batch)
  bad = {**grads, "tower_0": {"kernel": grads["tower_0"]["kernel"][0]}}
  with pytest.raises(ValueError, match=r"mtjax: .*tower_0"):
    tx.update(bad, state, params, validation_batch=batch)
  with pytest.raises(ValueError, match="mtjax: "):
    tx.update(jax.tree.map(lambda g: g[0], grads), state, params, validation_batch=batch)
  two = jax.tree.map(lambda g: g[:2], grads)
  with pytest.raises(ValueError, match="mtjax: .*num_tasks"):
    tx.update(two, state, params, validation_batch=batch)
  with pytest.raises(ValueError, match="mtjax: .*task_losses"):
    tx.update(grads, state, params, task_losses=np.ones(4, np.float32), validation_batch=batch)
  nan = losses[0].copy()
  nan[1] = np.nan
  with pytest.raises(ValueError, match="mtjax: non-finite task losses"):
    tx.update(grads, state, params, task_losses=nan, validation_batch=batch)
  # meta_loss_fn of the wrong shape, or a scalar with primary_tasks
  wrong = mtjax.auto_lambda(lambda p, b: quadratic_meta_loss(p, b)[:2], num_tasks=3, virtual_lr=0.1)
  with pytest.raises(ValueError, match=r"mtjax: auto_lambda: meta_loss_fn must return the \[T\]"):
    wrong.update(grads, state, params, validation_batch=batch)
  scalar = mtjax.auto_lambda(
    lambda p, b: jnp.sum(quadratic_meta_loss(p, b)), num_tasks=3, virtual_lr=0.1, primary_tasks=[0]
  )
  with pytest.raises(ValueError, match="mtjax: auto_lambda: meta_loss_fn returned a scalar"):
    scalar.update(grads, state, params, validation_batch=batch)
  # factory arguments
  for kwargs, match in [
    (dict(primary_tasks=[3]), "primary_tasks"),
    (dict(primary_tasks=[]), "primary_tasks"),
    (dict(primary_tasks=[0, 0]), "primary_tasks"),
    (dict(order="x"), "order"),
    (dict(virtual_lr=-1.0), "virtual_lr"),
    (dict(num_tasks=0), "num_tasks"),
  ]:
    with pytest.raises(ValueError, match=f"mtjax: auto_lambda: {match}"):
      _make(**kwargs)
  with pytest.raises(ValueError, match="meta_loss_fn must be a callable"):
    mtjax.auto_lambda(None, num_tasks=2, virtual_lr=0.1)


def test_nonfinite_gradients_and_meta_loss_raise():
  tx, step, _ = chain_bundle()
  params, seq, losses = _sequence(6, steps=1)
  grads, batch = seq[0]
  bad = jax.tree.map(np.copy, grads)
  bad["shared"]["Dense_1"]["kernel"][2, 1] = np.inf
  with pytest.raises(Exception, match="mtjax: "):
    jax.block_until_ready(step(bad, tx.init(params), params, losses[0], batch))
  bad_batch = {**batch, "m": batch["m"].copy()}
  bad_batch["m"][0, 0] = np.nan
  with pytest.raises(Exception, match="mtjax: auto_lambda: the meta loss"):
    jax.block_until_ready(step(grads, tx.init(params), params, losses[0], bad_batch))


def test_state_contract():
  tx, step, traces = chain_bundle()
  params, seq, losses = _sequence(8, steps=2)
  chain_state = tx.init(params)
  after = step(seq[0][0], chain_state, params, losses[0], seq[0][1])[1]
  for state in (chain_state[0], after[0]):
    assert type(state).__name__ == "AutoLambdaState" and "weights" in state._fields
    leaves, treedef = jax.tree.flatten(state)
    assert type(jax.tree.unflatten(treedef, leaves)) is type(state)
  crossed = jax.jit(lambda s: s)(after)
  u1, _ = step(seq[1][0], crossed, params, losses[1], seq[1][1])
  u2, _ = step(seq[1][0], after, params, losses[1], seq[1][1])
  for a, b in zip(jax.tree.leaves(u1), jax.tree.leaves(u2)):
    np.testing.assert_array_equal(a, b)
  assert len(traces) == 1


# ----------------------------------------------------------------------------- training loop and runner


def _fit_setup():
  from mtjax import data
  from mtjax import models

  ds = data.conflicting_tasks(num_samples=300, seed=0)
  model = models.MMoE(num_tasks=3, num_experts=2, expert=(8,), tower=(4, 1), features=ds.spec, dropout=0.1)
  return ds, model


@pytest.mark.slow
def test_fit_with_validation_ds_learns_weights_and_resumes_bit_identically(tmp_path):
  from mtjax import training

  ds, model = _fit_setup()
  meta = training.validation_loss_fn(model, training._train.default_task_losses(ds.task_types))
  tx = optax.chain(mtjax.auto_lambda(meta, num_tasks=3, virtual_lr=1e-2, weight_lr=1e-2), optax.sgd(1e-2))
  kw = dict(steps=6, batch_size=32, seed=1, progress=False, log_every=1, validation_ds=ds, track_similarity=False)
  full = training.fit(model, tx, ds, **kw)
  lambdas = np.asarray(full.state.opt_state[0].lambdas)
  assert np.all(np.isfinite(lambdas)) and not np.allclose(lambdas, 0.1)
  np.testing.assert_allclose(full.history[-1]["weights"], lambdas, rtol=1e-6)  # logged: the weights used
  out = str(tmp_path / "run")
  training.fit(model, tx, ds, out_dir=out, checkpoint_every=2, stop_after=3, **kw)
  resumed = training.fit(model, tx, ds, out_dir=out, checkpoint_every=2, **kw)
  for a, b in zip(jax.tree.leaves(full.state), jax.tree.leaves(resumed.state)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # Without validation_ds the transform says what is missing (at the first step).
  with pytest.raises(ValueError, match="mtjax: auto_lambda needs a validation batch"):
    training.fit(model, tx, ds, **{**kw, "validation_ds": None})


@pytest.mark.slow
def test_runner_builds_auto_lambda_with_the_models_loss(monkeypatch):
  """Not registered in mtjax.experiment (see the report): with an entry, the runner builds it with
  the model's validation losses and trains with a reshuffled pass over the training split."""
  from mtjax import experiment
  from mtjax.experiment import _registry as reg
  from mtjax.experiment import _runner

  monkeypatch.setitem(reg.METHODS, "auto_lambda", mtjax.auto_lambda)
  cfg = experiment.from_dict(
    {
      "data": {"name": "conflicting", "num_samples": 400, "seed": 0},
      "model": {"name": "mmoe", "num_experts": 2, "expert": [8], "tower": [4, 1]},
      "method": {"name": "auto_lambda", "weight_lr": 0.01},
      "optimizer": {"name": "sgd", "learning_rate": 0.05},
      "train": {"steps": 4, "batch_size": 32, "log_every": 1},
    }
  )
  assert _runner.needs_meta_loss(cfg)
  with pytest.raises(experiment.ConfigError, match="needs the model's loss"):
    _runner.build_tx(cfg, num_tasks=3, seed=0, steps_per_epoch=3)
  res = experiment.run(cfg, progress=False, plots=False)
  weights = np.array([r["weights"] for r in res.history])
  assert weights.shape == (4, 3) and np.all(np.isfinite(weights)) and not np.allclose(weights[-1], 0.1)
