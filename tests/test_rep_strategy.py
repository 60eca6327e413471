"""task_grads(strategy="rep") (MGDA-UB): NumPy float64 references on a tanh trunk with linear heads,
exact equality with the full-Jacobian methods when the trunk is the identity, errors, backward passes."""

import functools
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mtjax
from mtjax.transforms._pcgrad import projection_orders

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "transforms"))
from mtl_references import backward_counter  # pylint: disable=wrong-import-position
from mtl_references import np_min_norm_gram  # pylint: disable=wrong-import-position

B, D, H = 12, 5, 4
_counted, BACKWARD_TRACES = backward_counter()  # traced backward passes through the trunk


def _is_bce(t):
  return t % 2 == 1  # even tasks: MSE regression, odd tasks: binary cross-entropy on logits


def _problem(num_tasks, seed=0, dtype=np.float32):
  rng = np.random.default_rng(seed)
  params = {
    "trunk": {"kernel": rng.normal(size=(D, H)) * 0.7, "bias": rng.normal(size=H) * 0.1},
    "heads": {
      f"t{t}": {"kernel": rng.normal(size=H), "bias": np.asarray(rng.normal() * 0.1)} for t in range(num_tasks)
    },
  }
  y = rng.normal(size=(B, num_tasks))
  for t in range(num_tasks):
    if _is_bce(t):
      y[:, t] = rng.uniform(size=B) < 0.5
  batch = {"x": rng.normal(size=(B, D)), "y": y}
  as_jax = lambda tree: jax.tree.map(lambda a: jnp.asarray(a, dtype), tree)
  return params, batch, as_jax(params), as_jax(batch)


def _loss_fn(params, batch, views=False):
  z = jnp.tanh(batch["x"] @ params["trunk"]["kernel"] + params["trunk"]["bias"][None, :])
  z = mtjax.representation(_counted(z), batch_axis=0)
  losses = []
  for t in range(batch["y"].shape[1]):
    head = params["heads"][f"t{t}"]
    p = (mtjax.task_view(z, t) if views else z) @ head["kernel"] + head["bias"]
    y = batch["y"][:, t]
    if _is_bce(t):
      losses.append(jnp.mean(jax.nn.softplus(p) - y * p))
    else:
      losses.append(jnp.mean((p - y) ** 2))
  return jnp.stack(losses)


def _loss_fn_views(params, batch):
  """The same loss with each head reading its own mtjax.task_view (one backward through the heads)."""
  return _loss_fn(params, batch, views=True)


LOSSES = {"T VJPs": _loss_fn, "views": _loss_fn_views}


# ------------------------------------------------------------------------------------------------
# The NumPy float64 reference: hand-derived gradients of the model above.


def np_model(params, batch):
  """``(z [B, H], losses [T], r [T, B])`` with ``r_t = dL_t / dp_t``."""
  x, y = batch["x"], batch["y"]
  z = np.tanh(x @ params["trunk"]["kernel"] + params["trunk"]["bias"])
  losses, r = [], []
  for t in range(y.shape[1]):
    head = params["heads"][f"t{t}"]
    p = z @ head["kernel"] + head["bias"]
    if _is_bce(t):
      losses.append(np.mean(np.logaddexp(0.0, p) - y[:, t] * p))
      r.append((1.0 / (1.0 + np.exp(-p)) - y[:, t]) / B)
    else:
      losses.append(np.mean((p - y[:, t]) ** 2))
      r.append(2.0 * (p - y[:, t]) / B)
  return z, np.array(losses), np.array(r)


def np_z_rows(params, r):
  """``dL_t / dz = r_t v_t^T``: ``[T, B, H]``."""
  return np.stack([np.outer(r[t], params["heads"][f"t{t}"]["kernel"]) for t in range(len(r))])


def np_trunk_backward(params, batch, z, cot):
  """Gradient of the trunk's parameters for the cotangent ``cot [B, H]`` at ``z``."""
  dpre = cot * (1.0 - z**2)
  return {"kernel": batch["x"].T @ dpre, "bias": dpre.sum(axis=0)}


def np_rep_rows(z_rows, rep_gram):
  """The rows whose Gram the method sees: batch-summed ``[T, H]`` or stacked per sample ``[T, B*H]``."""
  return z_rows.sum(axis=1) if rep_gram == "sum" else z_rows.reshape(z_rows.shape[0], -1)


def np_min_norm(gram):
  """MGDA's min-norm weights of a Gram matrix, float64 (by enumerating supports)."""
  return np_min_norm_gram(gram, tol=1e-9)


def np_pcgrad_weights(rows, orders):
  """PCGrad's task weights: the surgery on the rows, tracking each projected gradient's coefficients."""
  t = rows.shape[0]
  total = np.zeros(t)
  for i in range(t):
    c = np.eye(t)[i]
    for j in orders[i]:
      g = c @ rows
      ip, nsq = g @ rows[j], rows[j] @ rows[j]
      if ip < 0 and nsq > 0:
        c[j] -= ip / nsq
    total += c
  return total


def np_rep_update(params, batch, weights, head_weights):
  """The "rep" update: trunk = backprop of sum_t w_t dL_t/dz, head t = head_weights_t * dL_t/d(head t)."""
  z, _, r = np_model(params, batch)
  z_rows = np_z_rows(params, r)
  trunk = np_trunk_backward(params, batch, z, np.tensordot(weights, z_rows, axes=1))
  heads = {
    f"t{t}": {"kernel": head_weights[t] * (z.T @ r[t]), "bias": head_weights[t] * r[t].sum()} for t in range(len(r))
  }
  return {"trunk": trunk, "heads": heads}


def _assert_tree_close(actual, expected, rtol, atol=0.0):
  assert jax.tree.structure(actual) == jax.tree.structure(expected)
  for (path, a), e in zip(jax.tree_util.tree_flatten_with_path(actual)[0], jax.tree.leaves(expected)):
    np.testing.assert_allclose(
      np.asarray(a, np.float64), np.asarray(e, np.float64), rtol=rtol, atol=atol, err_msg=jax.tree_util.keystr(path)
    )


# ------------------------------------------------------------------------------------------------


def test_np_reference_gradients_match_autodiff():
  """Guard on the reference: its per-task gradients are the exact ones of the JAX loss."""
  params, batch, jp, jb = _problem(3)
  with jax.enable_x64(True):
    jp, jb = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), (params, batch))
    losses, rows = jax.jit(mtjax.task_grads(_loss_fn, strategy="loop"))(jp, jb)
    z, np_losses, r = np_model(params, batch)
    np.testing.assert_allclose(losses, np_losses, rtol=1e-12)
    z_rows = np_z_rows(params, r)
    for t in range(3):
      trunk = np_trunk_backward(params, batch, z, z_rows[t])
      np.testing.assert_allclose(rows["trunk"]["kernel"][t], trunk["kernel"], rtol=1e-10, atol=1e-14)
      np.testing.assert_allclose(rows["trunk"]["bias"][t], trunk["bias"], rtol=1e-10, atol=1e-14)
      np.testing.assert_allclose(rows["heads"][f"t{t}"]["kernel"][t], z.T @ r[t], rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("loss", sorted(LOSSES))
@pytest.mark.parametrize("num_tasks,rep_gram", [(2, "sum"), (3, "stack"), (4, "sum")])
def test_mgda_rep_matches_numpy(num_tasks, rep_gram, loss):
  params, batch, _, _ = _problem(num_tasks, seed=num_tasks)
  with jax.enable_x64(True):
    jp, jb = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), (params, batch))
    tx = mtjax.mgda(num_tasks=num_tasks)

    @jax.jit
    def step(p, b):
      losses, jac = mtjax.task_grads(LOSSES[loss], strategy="rep", rep_gram=rep_gram)(p, b)
      assert isinstance(jac, mtjax.RepJacobian)
      return jac.gram()[0], tx.update(jac, tx.init(p), p, task_losses=losses), jac.z_rows

    gram, (update, state), z_rows = step(jp, jb)
    _, _, r = np_model(params, batch)
    np.testing.assert_allclose(z_rows, np_z_rows(params, r), rtol=1e-10, atol=1e-16)
    rows = np_rep_rows(np_z_rows(params, r), rep_gram)
    np_gram = rows @ rows.T
    np.testing.assert_allclose(gram, np_gram, rtol=1e-10, atol=1e-16)
    w = np_min_norm(np_gram)
    np.testing.assert_allclose(state.weights, w, rtol=1e-6, atol=1e-7)  # the float32 record
    expected = np_rep_update(params, batch, w, np.ones(num_tasks))
    _assert_tree_close(update, expected, rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("loss", sorted(LOSSES))
def test_mgda_rep_weighted_task_specific_matches_numpy(loss):
  num_tasks = 3
  params, batch, _, _ = _problem(num_tasks, seed=7)
  with jax.enable_x64(True):
    jp, jb = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), (params, batch))
    tx = mtjax.mgda(num_tasks=num_tasks, task_specific="weighted")

    @jax.jit
    def step(params, batch):
      losses, jac = mtjax.task_grads(LOSSES[loss], strategy="rep")(params, batch)
      return tx.update(jac, tx.init(params), params, task_losses=losses)[0]

    update = step(jp, jb)
    _, _, r = np_model(params, batch)
    rows = np_rep_rows(np_z_rows(params, r), "sum")
    w = np_min_norm(rows @ rows.T)
    assert not np.allclose(w, w[0])  # the heads' weighting is visible
    _assert_tree_close(update, np_rep_update(params, batch, w, w), rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("loss", sorted(LOSSES))
@pytest.mark.parametrize("rep_gram", ["sum", "stack"])
def test_pcgrad_rep_matches_numpy(rep_gram, loss):
  num_tasks = 4
  with jax.enable_x64(True):
    tx = mtjax.pcgrad(key=3, num_tasks=num_tasks)

    @jax.jit
    def update_fn(params, state, batch):
      losses, jac = mtjax.task_grads(LOSSES[loss], strategy="rep", rep_gram=rep_gram)(params, batch)
      return tx.update(jac, state, params, task_losses=losses)

    params, _, jp, _ = _problem(num_tasks, seed=11, dtype=jnp.float64)
    state = tx.init(jp)
    conflicts = 0
    for seed in range(2):  # two steps: the state key advances, the reference replays its orders
      _, batch, _, jb = _problem(num_tasks, seed=20 + seed, dtype=jnp.float64)
      _, orders = projection_orders(state.key, num_tasks)
      update, state = update_fn(jp, state, jb)
      _, _, r = np_model(params, batch)
      rows = np_rep_rows(np_z_rows(params, r), rep_gram)
      conflicts += int(np.sum(rows @ rows.T < 0))
      w = np_pcgrad_weights(rows, np.asarray(orders))
      np.testing.assert_allclose(state.weights, w, rtol=1e-6, atol=1e-6)
      _assert_tree_close(update, np_rep_update(params, batch, w, np.ones(num_tasks)), rtol=1e-8, atol=1e-12)
    assert conflicts > 0  # the surgery did something


# ------------------------------------------------------------------------------------------------
# An identity trunk: z IS the shared parameter, so dL_t/dz are the exact rows of params['shared'].

T_ID = 3
GRAM_METHODS = {
  "pcgrad": lambda **kw: mtjax.pcgrad(key=5, num_tasks=T_ID, **kw),
  "mgda": lambda **kw: mtjax.mgda(num_tasks=T_ID, **kw),
  "upgrad": lambda **kw: mtjax.upgrad(num_tasks=T_ID, **kw),
  "cagrad": lambda **kw: mtjax.cagrad(num_tasks=T_ID, **kw),
  "imtl": lambda **kw: mtjax.imtl(num_tasks=T_ID, **kw),
  "aligned_mtl": lambda **kw: mtjax.aligned_mtl(num_tasks=T_ID, **kw),
  "dualproj": lambda **kw: mtjax.dualproj(num_tasks=T_ID, **kw),
  "config": lambda **kw: mtjax.config(num_tasks=T_ID, **kw),
  "nash_mtl": lambda **kw: mtjax.nash_mtl(num_tasks=T_ID, **kw),
  "fairgrad": lambda **kw: mtjax.fairgrad(num_tasks=T_ID, **kw),
  "pareto_ltr": lambda **kw: mtjax.pareto_ltr([0.1] * T_ID, num_tasks=T_ID, **kw),
  "gradvac": lambda **kw: mtjax.gradvac(key=5, num_tasks=T_ID, **kw),
}


def _identity_problem(seed=0):
  rng = np.random.default_rng(seed)
  params = {
    "heads": {f"t{t}": jnp.asarray(rng.normal(size=H), jnp.float64) for t in range(T_ID)},
    "shared": jnp.asarray(rng.normal(size=(D, H)) * 0.6, jnp.float64),
  }
  batch = {
    "x": jnp.asarray(rng.normal(size=(B, D)), jnp.float64),
    "y": jnp.asarray(rng.normal(size=(B, T_ID)), jnp.float64),
  }
  return params, batch


def _identity_loss(params, batch):
  z = mtjax.representation(params["shared"], batch_axis=None)  # the trunk is the identity
  h = jnp.tanh(batch["x"] @ z)
  preds = jnp.stack([h @ params["heads"][f"t{t}"] for t in range(T_ID)], axis=1)
  return jnp.mean((preds - batch["y"]) ** 2, axis=0)


STATEFUL = ("pcgrad", "gradvac")  # PRNG keys, GradVac's targets: two steps


@functools.cache
def _identity_jacobians(seed):
  """``(params, losses, rep Jacobian, full rows)`` of one batch; computed once for all the methods (x64)."""
  params, _ = _identity_problem()
  _, batch = _identity_problem(seed)

  @jax.jit
  def grads(params, batch):
    losses, jac = mtjax.task_grads(_identity_loss, strategy="rep")(params, batch)
    _, rows = mtjax.task_grads(_identity_loss, strategy="loop")(params, batch)
    return losses, jac, rows

  return (params,) + grads(params, batch)


@pytest.mark.parametrize(
  "name,task_specific", [(n, "sum") for n in GRAM_METHODS] + [(n, "weighted") for n in ("mgda", "pcgrad")]
)
def test_identity_trunk_equals_the_full_jacobian_method(name, task_specific):
  with jax.enable_x64(True):
    params = _identity_jacobians(1)[0]
    mask = {"heads": {k: False for k in params["heads"]}, "shared": True}
    rep_tx = GRAM_METHODS[name](task_specific=task_specific)
    full_tx = GRAM_METHODS[name](shared=mask, task_specific=task_specific)

    @jax.jit
    def updates(params, losses, jac, rows, rep_state, full_state):
      assert isinstance(jac, mtjax.RepJacobian)
      return (
        rep_tx.update(jac, rep_state, params, task_losses=losses),
        full_tx.update(rows, full_state, params, task_losses=losses),
      )

    rep_state, full_state = rep_tx.init(params), full_tx.init(params)
    for seed in range(1, 3 if name in STATEFUL else 2):  # stateful methods advance alike
      params, losses, jac, rows = _identity_jacobians(seed)
      (rep_u, rep_state), (full_u, full_state) = updates(params, losses, jac, rows, rep_state, full_state)
      _assert_tree_close(rep_u, full_u, rtol=1e-10, atol=1e-13)
      assert all(np.all(np.isfinite(u)) for u in jax.tree.leaves(rep_u))
    for a, b in zip(jax.tree.leaves(rep_state), jax.tree.leaves(full_state)):
      if jnp.issubdtype(jnp.result_type(a), jnp.floating):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7, err_msg=name)
      else:
        np.testing.assert_array_equal(a, b)


# ------------------------------------------------------------------------------------------------


def test_rep_errors():
  _, _, jp, jb = _problem(3, dtype=np.float32)

  def rep_update(tx):  # traced only: the errors are raised while tracing
    def f():
      losses, jac = mtjax.task_grads(_loss_fn, strategy="rep")(jp, jb)
      return tx.update(jac, tx.init(jp), jp, task_losses=losses)

    return jax.eval_shape(f)

  with pytest.raises(ValueError, match=r"mgda: strategy='rep'.*without shared="):
    rep_update(mtjax.mgda(num_tasks=3, shared=mtjax.shared_mask(include="trunk")))
  # A mask that marks every leaf shared is the default and is accepted.
  update, _ = rep_update(mtjax.mgda(num_tasks=3, shared=lambda p: jax.tree.map(lambda _: True, p)))
  assert jax.tree.structure(update) == jax.tree.structure(jp)
  with pytest.raises(ValueError, match=r"gradvac: strategy='rep' gives one Gram .* asks for 4 Gram groups"):
    rep_update(mtjax.gradvac(key=0, num_tasks=3, granularity="layer"))  # trunk + one layer per head
  with pytest.raises(ValueError, match="rep_gram must be one of"):
    mtjax.task_grads(_loss_fn, strategy="rep", rep_gram="x")
  # No representation marked: a clear error.
  unmarked = lambda p, b: jnp.stack([jnp.mean(b["x"] @ p["trunk"]["kernel"]), jnp.mean(p["trunk"]["bias"])])
  with pytest.raises(ValueError, match=r"mtjax.representation\(z\).*none was marked"):
    jax.eval_shape(mtjax.task_grads(unmarked, strategy="rep"), jp, jb)


def test_rep_traces_one_backward_pass_through_the_trunk():
  num_tasks = 4
  _, _, jp, jb = _problem(num_tasks, dtype=np.float32)
  tx = mtjax.mgda(num_tasks=num_tasks)

  def step(strategy):
    losses, grads = mtjax.task_grads(_loss_fn, strategy=strategy)(jp, jb)
    return tx.update(grads, tx.init(jp), jp, task_losses=losses)[0]

  del BACKWARD_TRACES[:]
  jax.make_jaxpr(lambda: step("rep"))()
  assert len(BACKWARD_TRACES) == 1  # sum_t w_t dL_t/dz, once through the trunk
  del BACKWARD_TRACES[:]
  jax.make_jaxpr(lambda: step("loop"))()
  assert len(BACKWARD_TRACES) == num_tasks  # the full rows: one trunk backward per task
  # "shared" also needs every task's trunk rows: they are batched by lax.map, one traced body.
  del BACKWARD_TRACES[:]
  jax.make_jaxpr(lambda: mtjax.task_grads(_loss_fn, strategy="shared")(jp, jb)[1].x_rows)()
  assert len(BACKWARD_TRACES) == 1


@pytest.mark.parametrize("loss", sorted(LOSSES))
def test_shared_without_a_gram_takes_one_backward_and_is_exact(loss):
  """strategy="shared" when the method needs no Gram (amortized reuse steps, loss-only weightings): the
  update is J^T w from one backward through the trunk (no T trunk rows), equal to the rows' update."""
  num_tasks = 3
  mask = {
    "heads": {f"t{t}": {"kernel": False, "bias": False} for t in range(num_tasks)},
    "trunk": {"kernel": True, "bias": True},
  }
  with jax.enable_x64(True):
    params, _, jp, _ = _problem(num_tasks, seed=5, dtype=jnp.float64)
    batches = [_problem(num_tasks, seed=30 + k, dtype=jnp.float64)[3] for k in range(3)]
    shared_tx = mtjax.amortized(mtjax.mgda(num_tasks=num_tasks), every=2)
    rows_tx = mtjax.amortized(mtjax.mgda(num_tasks=num_tasks, shared=mask), every=2)

    @jax.jit
    def both(p, b, s_state, r_state):
      losses, jac = mtjax.task_grads(LOSSES[loss], strategy="shared")(p, b)
      _, rows = mtjax.task_grads(_loss_fn, strategy="loop")(p, b)
      return (
        shared_tx.update(jac, s_state, p, task_losses=losses),
        rows_tx.update(rows, r_state, p, task_losses=losses),
      )

    s_state, r_state = shared_tx.init(jp), rows_tx.init(jp)
    for b in batches:  # refresh, reuse, refresh
      (u_s, s_state), (u_r, r_state) = both(jp, b, s_state, r_state)
      _assert_tree_close(u_s, u_r, rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(s_state.weights, r_state.weights, rtol=1e-10)

  # A method without a Gram on "shared": one backward through the trunk, no loop over T rows (the rows
  # are a lax.map, a scan in the program; a Gram method has it, a linear one does not).
  _, _, jp32, jb32 = _problem(num_tasks, dtype=np.float32)

  def program(tx):
    del BACKWARD_TRACES[:]
    jaxpr = jax.make_jaxpr(
      lambda: tx.update(mtjax.task_grads(LOSSES[loss], strategy="shared")(jp32, jb32)[1], tx.init(jp32), jp32)[0]
    )()
    return str(jaxpr), len(BACKWARD_TRACES)

  text, traces = program(mtjax.linear(num_tasks=num_tasks))
  assert traces == 1 and "scan" not in text
  text, traces = program(mtjax.mgda(num_tasks=num_tasks))
  assert traces == 1 and "scan" in text


def test_mmoe_mixing_reads_its_view_linearly(monkeypatch):
  """MMoE's gated mixing reads its view through sparse.linear_einsum. Under strategy="rep" (batch sums) it
  takes z and delta_t apart: the same update as mixing z + delta_t, without the per-sample [E, B, H]
  cotangent of the sum (what kept "rep" at 1.6x a summed step at T = 10; 1.14x with it,
  benchmarks/RESULTS.md). Under strategy="shared" the rows stay factors (FactoredViews): the same rows and
  update as the stacked copies' cotangents."""
  import numpy as np
  import optax

  import mtjax._src.sparse as sparse_lib
  from mtjax import data
  from mtjax import losses
  from mtjax import models
  from mtjax.models import _experts

  ds = data.mmoe_synthetic(128, 0.5, dim=6, seed=0)
  batch = ds.batch(np.arange(96))
  model = models.MMoE(num_tasks=2, num_experts=3, expert=(8,), tower=(4, 1))
  params = model.init(jax.random.PRNGKey(0), batch["x"])["params"]
  loss_fn = losses.make_loss_fn(model, "mse")
  hits = []

  def counted(spec, coef, x):
    rec = sparse_lib._active()
    parts = getattr(rec, "view_parts", None) or {}
    hits.append(type(parts.get(id(x))).__name__)
    return sparse_lib.linear_einsum(spec, coef, x)

  def update(einsum, strategy):
    monkeypatch.setattr(_experts, "linear_einsum", einsum)
    (task_losses, _), jac = mtjax.task_grads(loss_fn, strategy=strategy, has_aux=True)(params, batch)
    tx = optax.chain(mtjax.mgda(num_tasks=2), optax.sgd(1.0))
    rows = jac.z_rows if strategy == "shared" else jac.gram()
    return tx.update(jac, tx.init(params), params, task_losses=task_losses)[0], rows, type(jac.z_store).__name__

  plain = lambda spec, coef, x: jnp.einsum(spec, coef, x)
  for strategy, kind in (("rep", "tuple"), ("shared", "Factor")):
    hits.clear()
    apart, rows_a, store = update(counted, strategy)
    assert hits.count(kind) >= 2, hits  # each task's head read its view apart (the probe traces add more)
    assert store == ("FactoredViews" if strategy == "shared" else "BatchSums")
    together, rows_t, store_t = update(plain, strategy)
    assert store_t == ("LazyCopies" if strategy == "shared" else "BatchSums")
    for a, b in zip(jax.tree.leaves((apart, rows_a)), jax.tree.leaves((together, rows_t))):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
  hits.clear()
  monkeypatch.setattr(_experts, "linear_einsum", counted)
  mtjax.task_grads(loss_fn, strategy="map", has_aux=True)(params, batch)
  assert set(hits) == {"NoneType"}  # only the rep batch-sum and shared traces mark views


_TARGETS = (1.0, -1.0, 0.5)  # the three tasks' regression targets


def _linear_heads_loss(read_directly=False, uneven=False):
  def loss_fn(params, x):
    z = mtjax.representation(jnp.tanh(x @ params["trunk"]))  # [B, H]
    preds = []
    for t in range(3):
      v = mtjax.task_view(z, t)
      p = mtjax.linear_einsum("h,bh->b", params["heads"][t], v)
      if uneven and t == 1:  # task 1 makes a second product: not the same structure as the others
        p = p + mtjax.linear_einsum("h,bh->b", params["heads"][0], v)
      if read_directly and t == 2:
        p = p + jnp.sum(v**2, axis=1)  # a non-linear read of the view
      preds.append(p)
    return jnp.stack([jnp.mean((p - y) ** 2) for p, y in zip(preds, _TARGETS)])

  return loss_fn


def _linear_heads_problem(seed):
  """float64 params and inputs of _linear_heads_loss (call under jax.enable_x64)."""
  rng = np.random.default_rng(seed)
  params = {"trunk": jnp.asarray(rng.normal(size=(4, 5))), "heads": [jnp.asarray(rng.normal(size=5)) for _ in range(3)]}
  return params, jnp.asarray(rng.normal(size=(6, 4)))


@pytest.mark.parametrize("variant", ["linear", "uneven", "read_directly"])
def test_linear_einsum_factored_rows_equal_per_task_backward(variant):
  """strategy="shared" keeps the rows of heads that read their views through mtjax.linear_einsum as factors
  (FactoredViews); the rows, the update and the z rows equal the reference (jax.jacrev of the whole loss,
  float64) and T per-task backward passes. Heads that read a view otherwise, or make different products per task,
  fall back to the stacked copies, with the same values."""
  loss_fn = _linear_heads_loss(read_directly=variant == "read_directly", uneven=variant == "uneven")
  with jax.enable_x64(True):
    params, x = _linear_heads_problem(0)
    _, jac = mtjax.task_grads(loss_fn, strategy="shared")(params, x)
    store = type(jac.z_store).__name__
    assert store == ("FactoredViews" if variant == "linear" else "LazyCopies")
    full = jax.jacrev(loss_fn)(params, x)  # [T, ...] rows of every leaf
    rows = jax.tree.leaves(jac.materialize())
    # the trunk's rows (exact) and the heads' (materialize: T head VJPs)
    for got, want in zip(rows, jax.tree.leaves(full)):
      np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)
    assert mtjax.check_task_views(loss_fn, params, x, rtol=1e-10) <= 1e-10
    tx = mtjax.pcgrad(num_tasks=3, shared={"trunk": True, "heads": [False] * 3})
    up_s = tx.update(jac, tx.init(params), params)[0]
    up_f = tx.update(full, tx.init(params), params)[0]
    for a, b in zip(jax.tree.leaves(up_s), jax.tree.leaves(up_f)):
      np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)


def test_linear_einsum_rep_batch_sums_broadcast_over_the_batch():
  """strategy="rep" with rep_gram="sum": a product whose coefficient has no batch index ('h,bh->b') takes
  z and delta_t apart with delta_t's term broadcast along the batch; the Gram equals the batch sums of the
  per-task rows (jax.jacrev through the heads, float64)."""
  loss_fn = _linear_heads_loss()
  with jax.enable_x64(True):
    params, x = _linear_heads_problem(1)
    _, rep = mtjax.task_grads(loss_fn, strategy="rep")(params, x)
    z = jnp.tanh(x @ params["trunk"])

    def heads(zz):
      preds = [zz @ params["heads"][t] for t in range(3)]
      return jnp.stack([jnp.mean((p - y) ** 2) for p, y in zip(preds, _TARGETS)])

    sums = jax.jacrev(heads)(z).sum(axis=1)  # [T, H]
    np.testing.assert_allclose(rep.gram()[0], sums @ sums.T, rtol=1e-10)
