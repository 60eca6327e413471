"""Issue #14, composing with optax: mtjax.accumulate, mtjax.inject_hyperparams, and the wrapper errors."""

import inspect

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from mtl_references import np_pcgrad

import mtjax
from mtjax.experiment._registry import METHODS
from mtjax.transforms._inject import is_static
from mtjax.transforms._inject import split_arguments
from mtjax.transforms._pcgrad import projection_orders as _projection_orders

SHAPES = {"bottom": {"kernel": (3, 2), "bias": (2,)}, "head": {"kernel": (2,)}}
IS_SHAPE = lambda x: isinstance(x, tuple)  # noqa: E731
projection_orders = jax.jit(_projection_orders, static_argnums=1)


def params_like(dtype=jnp.float32):
  return jax.tree.map(lambda s: jnp.zeros(s, dtype), SHAPES, is_leaf=IS_SHAPE)


def random_grads(rng, lead):
  return jax.tree.map(lambda s: rng.normal(size=tuple(lead) + s).astype(np.float32), SHAPES, is_leaf=IS_SHAPE)


def flat_rows(tree, num_tasks):
  """[T, P] float64 rows in jax's leaf order."""
  return np.concatenate([np.asarray(l, np.float64).reshape(num_tasks, -1) for l in jax.tree.leaves(tree)], axis=1)


def flat(tree):
  return np.concatenate([np.asarray(l, np.float64).ravel() for l in jax.tree.leaves(tree)])


def micro_steps(rng, num_tasks, count):
  """``count`` micro-steps of (per-task gradients as NumPy trees, per-task losses [T])."""
  return [
    (random_grads(rng, (num_tasks,)), rng.uniform(0.5, 3.0, size=num_tasks).astype(np.float32)) for _ in range(count)
  ]


def numpy_means(steps, k):
  """Per cycle of ``k`` micro-steps: the mean per-task gradients (NumPy float64 trees) and mean losses."""
  out = []
  for c in range(len(steps) // k):
    cycle = steps[c * k : (c + 1) * k]
    grads = jax.tree.map(
      lambda *g: np.mean(np.stack([np.asarray(x, np.float64) for x in g]), axis=0), *[g for g, _ in cycle]
    )
    out.append((grads, np.mean(np.stack([np.asarray(l, np.float64) for _, l in cycle]), axis=0)))
  return out


def run(tx, steps, *, with_losses=True, jit=True, **extra):
  params = params_like()
  state = tx.init(params)
  update = jax.jit(tx.update) if jit else tx.update
  outs = []
  for grads, losses in steps:
    kw = dict(extra)
    if with_losses:
      kw["task_losses"] = jnp.asarray(losses)
    upd, state = update(jax.tree.map(jnp.asarray, grads), state, params, **kw)
    outs.append(upd)
  return outs, state


# ---------------------------------------------------------------------------------------------------------------
# mtjax.accumulate
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [1, 3])
def test_accumulate_linear_matches_numpy_and_emits_zeros_in_between(k):
  rng = np.random.default_rng(k)
  w = np.array([1.0, 2.0, 0.5])
  steps = micro_steps(rng, 3, 3 * k)
  outs, state = run(mtjax.accumulate(optax.chain(mtjax.linear(w, num_tasks=3), optax.sgd(0.1)), every_k=k), steps)
  means = numpy_means(steps, k)
  for i, upd in enumerate(outs):
    if (i + 1) % k:
      np.testing.assert_array_equal(flat(upd), 0.0)
    else:
      rows = flat_rows(means[i // k][0], 3)
      np.testing.assert_allclose(flat(upd), -0.1 * (w @ rows), rtol=1e-5, atol=1e-6)
  assert int(state.gradient_step) == 3 and int(state.mini_step) == 0


def test_accumulate_pcgrad_matches_numpy_reference_on_the_mean_gradients():
  rng = np.random.default_rng(0)
  k, t = 4, 3
  steps = micro_steps(rng, t, 2 * k)
  outs, _ = run(mtjax.accumulate(mtjax.pcgrad(key=0, num_tasks=t), every_k=k), steps, with_losses=False)
  key = jax.random.PRNGKey(0)
  for c, (grads, _) in enumerate(numpy_means(steps, k)):
    key, orders = projection_orders(key, t)  # the method's key is split once per emitted step
    np.testing.assert_allclose(
      flat(outs[(c + 1) * k - 1]), np_pcgrad(flat_rows(grads, t), np.asarray(orders)), rtol=1e-4, atol=1e-5
    )
    for i in range(c * k, (c + 1) * k - 1):
      np.testing.assert_array_equal(flat(outs[i]), 0.0)


def numpy_dwa_step_weights(mean_losses, temperature):
  """DWA with one step per epoch (NumPy): lambda = T softmax(L_{s-1} / L_{s-2} / temp) from step 2 on."""
  num_tasks = mean_losses[0].shape[0]
  out = []
  for s in range(len(mean_losses)):
    if s < 2:
      out.append(np.ones(num_tasks))
    else:
      r = mean_losses[s - 1] / mean_losses[s - 2]
      e = np.exp(r / temperature)
      out.append(num_tasks * e / e.sum())
  return out


def test_accumulate_dwa_matches_numpy_on_mean_losses():
  """DWA's loss history advances once per cycle, with the cycle's mean losses."""
  rng = np.random.default_rng(3)
  k, t, cycles = 3, 3, 5
  steps = micro_steps(rng, t, cycles * k)
  tx = mtjax.accumulate(mtjax.dwa(num_tasks=t, steps_per_epoch=1, temperature=2.0), every_k=k)
  outs, state = run(tx, steps)
  means = numpy_means(steps, k)
  lams = numpy_dwa_step_weights([m for _, m in means], 2.0)
  for c, ((grads, _), lam) in enumerate(zip(means, lams)):
    np.testing.assert_allclose(flat(outs[(c + 1) * k - 1]), lam @ flat_rows(grads, t), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(state.inner_state.weights, lams[-1], rtol=1e-5)


@pytest.mark.parametrize("name", ["gradvac", "dwa", "pcgrad_adam"])
def test_accumulate_equals_one_step_of_the_stateful_method_on_the_means(name):
  """k micro-steps of accumulate(inner) == one step of inner on the NumPy means, cycle after cycle."""
  t, k, cycles = 3, 3, 4

  def inner():
    if name == "gradvac":
      return optax.chain(mtjax.gradvac(key=1, num_tasks=t, beta=0.5), optax.sgd(1.0))
    if name == "dwa":
      return mtjax.dwa(num_tasks=t, steps_per_epoch=2)
    return optax.chain(mtjax.pcgrad(key=2, num_tasks=t), optax.adam(0.1))

  rng = np.random.default_rng(7)
  steps = micro_steps(rng, t, cycles * k)
  acc_outs, acc_state = run(mtjax.accumulate(inner(), every_k=k), steps)
  means = [(jax.tree.map(lambda x: x.astype(np.float32), g), l.astype(np.float32)) for g, l in numpy_means(steps, k)]
  ref_outs, ref_state = run(inner(), means)
  for c in range(cycles):
    np.testing.assert_allclose(flat(acc_outs[(c + 1) * k - 1]), flat(ref_outs[c]), rtol=1e-4, atol=1e-5)
  for a, b in zip(jax.tree.leaves(acc_state.inner_state), jax.tree.leaves(ref_state)):
    np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(b, np.float64), rtol=1e-4, atol=1e-5)


def test_accumulate_state_is_a_fixed_shape_namedtuple_that_scans_and_checkpoints():
  t, k = 3, 2
  rng = np.random.default_rng(1)
  steps = micro_steps(rng, t, 6)
  tx = mtjax.accumulate(optax.chain(mtjax.pcgrad(num_tasks=t), optax.adam(0.1)), every_k=k)
  params = params_like()
  state0 = tx.init(params)
  assert isinstance(state0, mtjax.AccumulateState) and isinstance(state0, tuple) and hasattr(state0, "_fields")
  grads = jax.tree.map(lambda *g: jnp.stack(g), *[g for g, _ in steps])
  losses = jnp.stack([jnp.asarray(l) for _, l in steps])

  def body(state, x):
    upd, state = tx.update(x[0], state, params, task_losses=x[1])
    return state, upd

  final, scanned = jax.jit(lambda s: jax.lax.scan(body, s, (grads, losses)))(state0)
  assert jax.tree.map(lambda a: (a.shape, a.dtype), final) == jax.tree.map(lambda a: (a.shape, a.dtype), state0)
  outs, _ = run(tx, steps, jit=False)  # eager: the same numbers
  for i, upd in enumerate(outs):
    np.testing.assert_allclose(flat(jax.tree.map(lambda x: x[i], scanned)), flat(upd), rtol=1e-5, atol=1e-7)
  # A checkpoint round trip (host arrays, rebuilt tree) continues identically.
  leaves, treedef = jax.tree.flatten(final)
  restored = jax.tree.unflatten(treedef, [np.asarray(x) for x in leaves])
  nxt = jax.tree.map(jnp.asarray, steps[0][0])
  a, _ = tx.update(nxt, final, params, task_losses=jnp.asarray(steps[0][1]))
  b, _ = tx.update(nxt, restored, params, task_losses=jnp.asarray(steps[0][1]))
  assert int(final.mini_step) == 0 and int(final.gradient_step) == 3
  np.testing.assert_array_equal(flat(a), flat(b))


def test_accumulate_passes_listed_extra_args_at_the_emitting_step():
  """Auto-Lambda's validation_batch: the emitting micro-step's value goes to the method."""
  t, k = 2, 2

  def meta_loss_fn(params, batch):
    return 0.5 * jnp.sum((params["w"][None, :] - batch) ** 2, axis=1)

  def method():
    return mtjax.auto_lambda(
      meta_loss_fn, num_tasks=t, virtual_lr=1.0, weight_init=1.0, weight_optimizer=optax.sgd(0.5)
    )

  params = {"w": jnp.zeros(2)}
  g1, g2 = {"w": jnp.array([[-2.0, 0.0], [0.0, 2.0]])}, {"w": jnp.array([[0.0, 0.0], [0.0, 2.0]])}
  tx = mtjax.accumulate(method(), every_k=k, pass_through=("validation_batch",))
  state = tx.init(params)
  _, state = tx.update(g1, state, params, validation_batch=jnp.zeros((2, 2)))  # ignored: not the emitting step
  upd, state = tx.update(g2, state, params, validation_batch=jnp.eye(2))
  ref_tx = method()
  mean = jax.tree.map(lambda a, b: (a + b) / 2, g1, g2)
  ref, ref_state = ref_tx.update(mean, ref_tx.init(params), params, validation_batch=jnp.eye(2))
  np.testing.assert_allclose(upd["w"], ref["w"], rtol=1e-6)
  np.testing.assert_allclose(state.inner_state.lambdas, ref_state.lambdas, rtol=1e-6)
  with pytest.raises(
    ValueError,
    match=r"mtjax: accumulate: cannot accumulate the extra argument\(s\) "
    r"\['validation_batch'\].*pass_through=\('validation_batch',\)",
  ):
    mtjax.accumulate(method(), every_k=k).update(g1, state, params, validation_batch=jnp.eye(2))


def test_accumulate_refuses_what_it_cannot_average():
  params = {"w": jnp.zeros(4)}

  def loss_fn(p, x):
    return jnp.stack([jnp.mean((x @ p["w"] - 1.0) ** 2), jnp.mean((x @ p["w"] + 1.0) ** 2)])

  tx = mtjax.accumulate(optax.chain(mtjax.linear(num_tasks=2), optax.sgd(0.1)), every_k=2)
  state = tx.init(params)
  losses, jac = mtjax.task_grads(loss_fn, deferred=True)(params, jnp.ones((8, 4)))
  with pytest.raises(ValueError, match=r"mtjax: accumulate: got a deferred Jacobian .*jac.materialize\(\)"):
    tx.update(jac, state, params, task_losses=losses)
  rows = mtjax.SparseRows(jnp.array([0, 2]), jnp.ones((2, 2)), (4,))
  with pytest.raises(ValueError, match=r"leaf 'w' holds sparse embedding rows .*mtjax.densify"):
    tx.update({"w": rows}, state, params)
  with pytest.raises(ValueError, match=r"has shape \(3, 4\), but the accumulator holds .* = \(2, 4\)"):
    tx.update({"w": jnp.ones((3, 4))}, state, params)
  with pytest.raises(ValueError, match=r"task_losses must have shape \(2,\)"):
    tx.update({"w": jnp.ones((2, 4))}, state, params, task_losses=jnp.ones(3))
  with pytest.raises(ValueError, match=r"needs the number of tasks at init .*num_tasks=T"):
    mtjax.accumulate(mtjax.pcgrad(), every_k=2).init(params)
  np.testing.assert_array_equal(
    mtjax.accumulate(mtjax.pcgrad(), every_k=2, num_tasks=2).init(params).task_losses, np.zeros(2)
  )
  with pytest.raises(ValueError, match="every_k must be a static int >= 1"):
    mtjax.accumulate(mtjax.pcgrad(), every_k=0)


# ---------------------------------------------------------------------------------------------------------------
# mtjax.inject_hyperparams
# ---------------------------------------------------------------------------------------------------------------


def _meta_loss_fn(params, batch):
  w = params["bottom"]["kernel"]
  return jnp.stack([jnp.sum((w - batch) ** 2) * (i + 1.0) for i in range(3)])


# The minimal required arguments of each registry method besides num_tasks=3 (README / docstrings).
REQUIRED = {
  "linear": dict(weights=jnp.array([1.0, 2.0, 0.5])),
  "pareto_ltr": dict(lower_bounds=jnp.array([0.2, 0.2, 0.2])),
  "dwa": dict(steps_per_epoch=2),
  "stch": dict(steps_per_epoch=2),
  "auto_lambda": dict(meta_loss_fn=_meta_loss_fn, virtual_lr=0.1),
}


def method_kwargs(name, factory):
  kw = dict(REQUIRED.get(name, {}))
  params = inspect.signature(factory).parameters
  if "num_tasks" in params:
    kw["num_tasks"] = 3
  if "steps_per_epoch" in params and params["steps_per_epoch"].default is inspect.Parameter.empty:
    kw.setdefault("steps_per_epoch", 2)
  return kw


def lead_axes(factory):
  """[M, T] for the micro-batch methods (num_batches > 1), [T] otherwise."""
  params = inspect.signature(factory).parameters
  m = params["num_batches"].default if "num_batches" in params else 1
  return (m, 3) if m > 1 else (3,)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_inject_hyperparams_equals_the_plain_factory_for_every_method(name):
  factory = METHODS[name]
  kw = method_kwargs(name, factory)
  lead = lead_axes(factory)
  rng = np.random.default_rng(sorted(METHODS).index(name))
  params = params_like()
  extra = {"validation_batch": jnp.ones((3, 2))} if name == "auto_lambda" else {}
  plain, injected = factory(**kw), mtjax.inject_hyperparams(factory)(**kw)
  s0, s1 = plain.init(params), injected.init(params)
  arguments, static, _ = split_arguments(factory, (), kw)
  assert set(s1.hyperparams) | set(s1.hyperparams_states) == set(arguments) - static
  assert not {"num_tasks", "shared", "max_iters", "key", "gram_leaves"} & set(s1.hyperparams)
  step0, step1 = jax.jit(plain.update), jax.jit(injected.update)
  for _ in range(3):
    grads = jax.tree.map(jnp.asarray, random_grads(rng, lead))
    losses = jnp.asarray(rng.uniform(0.5, 2.0, size=lead), jnp.float32)
    u0, s0 = step0(grads, s0, params, task_losses=losses, **extra)
    u1, s1 = step1(grads, s1, params, task_losses=losses, **extra)
    for a, b in zip(jax.tree.leaves(u0), jax.tree.leaves(u1)):
      np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-6)
  assert int(s1.count) == 3


def test_inject_hyperparams_static_args_are_derived():
  with pytest.raises(ValueError, match="num_tasks must be a positive int"):  # plain optax traces num_tasks
    optax.inject_hyperparams(mtjax.cagrad)(c=0.4, num_tasks=3).init(params_like())
  state = mtjax.inject_hyperparams(mtjax.cagrad)(c=0.4, num_tasks=3).init(params_like())
  assert sorted(state.hyperparams) == ["c", "tol"]
  assert sorted(mtjax.inject_hyperparams(mtjax.mgda)().init(params_like()).hyperparams) == ["tol"]
  assert is_static("max_iters", 100, "int") and is_static("shared", lambda p: p, "tree_lib.SharedSpec")
  assert is_static("key", 0, "int | jax.Array") and is_static("meta_loss_fn", _meta_loss_fn, "Callable")
  assert is_static("shared", lambda p: p, inspect.Parameter.empty)  # by name, whatever the annotation
  assert is_static("window", 3, inspect.Parameter.empty) and not is_static("c", 0.3, inspect.Parameter.empty)
  assert not is_static("c", 0.4, "jax.typing.ArrayLike") and not is_static("beta", 0.9, "float | jax.Array")
  assert not is_static("c", optax.constant_schedule(0.4), "jax.typing.ArrayLike")  # a schedule
  with pytest.raises(ValueError, match=r"static_args \['nope'\] are not arguments of 'pcgrad'"):
    mtjax.inject_hyperparams(mtjax.pcgrad, static_args="nope")()


def test_inject_hyperparams_changed_and_scheduled_values_are_used():
  rng = np.random.default_rng(5)
  params = params_like()
  grads = jax.tree.map(jnp.asarray, random_grads(rng, (3,)))
  tx = mtjax.inject_hyperparams(mtjax.cagrad)(c=0.4, num_tasks=3)
  state = tx.init(params)
  state.hyperparams["c"] = jnp.asarray(0.9)
  upd, state = jax.jit(tx.update)(grads, state, params)
  ref, _ = mtjax.cagrad(c=0.9, num_tasks=3).update(grads, mtjax.cagrad(c=0.9, num_tasks=3).init(params), params)
  np.testing.assert_allclose(flat(upd), flat(ref), rtol=1e-5, atol=1e-6)
  # A schedule: c = 0, 0.5, 1.0 on steps 0, 1, 2; each step equals cagrad with that c.
  tx = mtjax.inject_hyperparams(mtjax.cagrad)(c=optax.linear_schedule(0.0, 1.0, 2), num_tasks=3)
  state = tx.init(params)
  for c in (0.0, 0.5, 1.0):
    upd, state = jax.jit(tx.update)(grads, state, params)
    plain = mtjax.cagrad(c=c, num_tasks=3)
    np.testing.assert_allclose(
      flat(upd), flat(plain.update(grads, plain.init(params), params)[0]), rtol=1e-5, atol=1e-6
    )
  # Through **kwargs: normalize_by_name's inner c is a hyperparameter too.
  factory = METHODS["normalize"]
  tx = mtjax.inject_hyperparams(factory)("cagrad", "l2", num_tasks=3, c=0.3)
  assert sorted(tx.init(params).hyperparams) == ["c"]


def test_inject_hyperparams_never_takes_a_callable_shared_for_a_schedule():
  rng = np.random.default_rng(6)
  params = params_like()
  grads = jax.tree.map(jnp.asarray, random_grads(rng, (3,)))
  mask = mtjax.shared_mask(exclude="head")
  tx = mtjax.inject_hyperparams(mtjax.pcgrad)(num_tasks=3, shared=mask)
  state = tx.init(params)
  assert not state.hyperparams and not state.hyperparams_states
  upd, _ = jax.jit(tx.update)(grads, state, params)
  ref = mtjax.pcgrad(num_tasks=3, shared=mask)
  np.testing.assert_allclose(flat(upd), flat(ref.update(grads, ref.init(params), params)[0]), rtol=1e-6)
  np.testing.assert_allclose(upd["head"]["kernel"], np.sum(np.asarray(grads["head"]["kernel"]), axis=0), rtol=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# Wrappers that cannot carry per-task gradients: clear errors, and the supported forms work
# ---------------------------------------------------------------------------------------------------------------

WRAPPERS = {
  "MultiSteps": (
    lambda tx: optax.MultiSteps(optax.chain(tx, optax.adam(1e-3)), 2),
    r"is inside optax.MultiSteps.*mtjax.accumulate\(optax.chain\(mtjax\.\w+\(\.\.\.\), optax.adam",
  ),
  "masked": (
    lambda tx: optax.masked(tx, {"bottom": {"kernel": True, "bias": True}, "head": {"kernel": False}}),
    r"is inside optax.masked: the leaves outside the mask would keep their task axis.*shared=mask",
  ),
  "multi_transform": (
    lambda tx: optax.multi_transform(
      {"a": tx, "b": optax.sgd(0.1)}, {"bottom": {"kernel": "a", "bias": "a"}, "head": {"kernel": "b"}}
    ),
    r"is inside optax.multi_transform \(optax.transforms.partition\).*"
    r"optax.chain\(mtjax\.\w+\(\.\.\.\), optax.multi_transform",
  ),
  "apply_if_finite": (
    lambda tx: optax.apply_if_finite(optax.chain(tx, optax.adam(1e-3)), 3),
    r"is inside optax.apply_if_finite.*optax.chain\(mtjax\.\w+\(\.\.\.\), optax.apply_if_finite\(",
  ),
}


@pytest.mark.parametrize("wrapper", sorted(WRAPPERS))
@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_method_refuses_the_wrappers_at_init(name, wrapper):
  factory = METHODS[name]
  wrap, pattern = WRAPPERS[wrapper]
  with pytest.raises(ValueError, match=r"^mtjax: \w+ " + pattern):
    wrap(factory(**method_kwargs(name, factory))).init(params_like())


@pytest.mark.parametrize("name", ["pcgrad", "graddrop", "moco", "db_mtl", "sdmgrad"])
def test_an_optimizer_before_the_method_is_refused(name):
  factory = METHODS[name]
  lead = lead_axes(factory)
  tx = optax.chain(optax.adam(1e-3), factory(**method_kwargs(name, factory)))
  params = params_like()
  grads = jax.tree.map(jnp.asarray, random_grads(np.random.default_rng(0), lead))
  losses = jnp.ones(lead)
  with jax.numpy_rank_promotion("allow"):  # what adam's broadcasting of [T, ...] against its moments needs
    with pytest.raises(
      ValueError,
      match=r"^mtjax: \w+ comes after a transform in optax.chain whose optimizer state "
      r"changes shape after one step \(\(2,\) -> \((\d, )?3, 2\)\).*Put the mtjax "
      r"method first: optax.chain\(mtjax\.\w+\(\.\.\.\), optax.adam",
    ):
      jax.jit(tx.update)(grads, tx.init(params), params, task_losses=losses)


def test_the_supported_forms_run():
  rng = np.random.default_rng(2)
  params = params_like()
  grads = jax.tree.map(jnp.asarray, random_grads(rng, (3,)))
  plain = mtjax.pcgrad(num_tasks=3)
  direction, plain_state = plain.update(grads, plain.init(params), params)
  direction2, _ = plain.update(grads, plain_state, params)  # the next step draws new projection orders
  # Stateless transforms before the method are fine (PCGrad is positively homogeneous).
  tx = optax.chain(optax.scale(0.5), mtjax.pcgrad(num_tasks=3))
  upd, _ = tx.update(grads, tx.init(params), params)
  np.testing.assert_allclose(flat(upd), 0.5 * flat(direction), rtol=1e-5, atol=1e-6)
  # MultiSteps after the method averages the combined updates; masked after the method masks params-shaped leaves.
  tx = optax.chain(mtjax.pcgrad(num_tasks=3), optax.MultiSteps(optax.sgd(1.0), 2))
  state = tx.init(params)
  first, state = tx.update(grads, state, params)
  second, state = tx.update(grads, state, params)
  np.testing.assert_array_equal(flat(first), 0.0)
  np.testing.assert_allclose(flat(second), -0.5 * (flat(direction) + flat(direction2)), rtol=1e-5, atol=1e-6)
  decay_mask = {"bottom": {"kernel": True, "bias": False}, "head": {"kernel": False}}
  tx = optax.chain(mtjax.pcgrad(num_tasks=3), optax.masked(optax.add_decayed_weights(0.1), decay_mask))
  ones = jax.tree.map(jnp.ones_like, params)
  upd, _ = tx.update(grads, tx.init(ones), ones)
  np.testing.assert_allclose(
    flat(upd), flat(direction) + 0.1 * flat(jax.tree.map(lambda m, p: p * m, decay_mask, ones)), rtol=1e-5, atol=1e-6
  )


def test_apply_if_finite_after_the_method_skips_non_finite_steps_with_the_checks_off():
  params = params_like()
  rng = np.random.default_rng(4)
  good = jax.tree.map(jnp.asarray, random_grads(rng, (3,)))
  bad = jax.tree.map(lambda g: g.at[0].set(jnp.nan), good)
  with mtjax.runtime_checks(False):  # read at trace time
    tx = optax.chain(mtjax.pcgrad(num_tasks=3), optax.apply_if_finite(optax.sgd(1.0), max_consecutive_errors=3))
    step = jax.jit(tx.update)
    state = tx.init(params)
    upd, state = step(bad, state, params)
    np.testing.assert_array_equal(flat(upd), 0.0)
    assert int(state[1].total_notfinite) == 1
    upd, state = step(good, state, params)
  plain = mtjax.pcgrad(num_tasks=3)
  direction, _ = plain.update(good, plain.init(params), params)
  np.testing.assert_allclose(flat(upd), -flat(direction), rtol=1e-5, atol=1e-6)
  assert int(state[1].notfinite_count) == 0
