"""Every model marks its shared representation (mtjax.representation): task_grads(strategy="shared")
gives the exact per-task rows of the trunk, and the update of a method on it equals the method on the
full rows with shared= exactly the trunk's leaves; strategy="rep" runs (MGDA-UB) on every model."""

import functools
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mtjax
from mtjax import losses
from mtjax import models
from mtjax._src import tree as tree_lib

B = 8
SPEC = models.FeatureSpec(
  categorical=(
    models.Categorical("user", 11, 3),
    models.Categorical("item", 13, 3),
    models.Categorical("domain", 3, 2),
  ),
  dense=(models.Dense("dense", 2),),
  sequences=(models.IdSequence("history", 13, 3, max_len=4, table="item"),),
)

# case -> (registry name, config, loss kind); the configs of tests/models/test_all_models_train.py, smaller.
MOE = dict(num_experts=3, expert=(6,), tower=(4, 1))
LEVELS = dict(num_tasks=2, expert=(6,), tower=(4, 1))
STAR = dict(num_tasks=2, num_domains=3, domain_feature="domain", hidden=(6,))
CASES = {
  "shared_bottom": ("shared_bottom", dict(num_tasks=2, bottom=(8,), tower=(4, 1)), "plain"),
  "omoe": ("omoe", dict(num_tasks=2, **MOE), "plain"),
  "omoe_vmap": ("omoe", dict(num_tasks=2, expert_impl="vmap", **MOE), "plain"),
  "mmoe": ("mmoe", dict(num_tasks=3, **MOE), "plain"),
  "mmoe_vmap": ("mmoe", dict(num_tasks=3, expert_impl="vmap", **MOE), "plain"),
  "cgc": ("cgc", dict(num_specific_experts=2, **LEVELS), "plain"),
  "ple": ("ple", dict(num_levels=2, **LEVELS), "plain"),
  "ple_vmap": ("ple", dict(num_levels=2, expert_impl="vmap", **LEVELS), "plain"),
  "stem": ("stem", dict(**LEVELS), "plain"),
  "stem_2levels": ("stem", dict(num_levels=2, **LEVELS), "plain"),
  "pepnet": ("pepnet", dict(num_tasks=2, domain_fields=("domain",), prior_fields=("user",), tower=(6, 4, 1)), "plain"),
  "star": ("star", dict(auxiliary=(4,), **STAR), "plain"),
  "star_towers": ("star", dict(auxiliary=None, multi_task="towers", **STAR), "plain"),
  "esmm": ("esmm", dict(tower=(6, 1)), "esmm"),
  "esmm_bottom": ("esmm", dict(tower=(6, 1), bottom=(8,)), "esmm"),
  "esm2": ("esm2", dict(tower=(6, 1)), "esm2"),
  "escm2": ("escm2", dict(tower=(6, 1), counterfactual="dr"), "escm2"),
  "dbmtl": ("dbmtl", dict(num_tasks=3, bottom=(6,), tower=(4,), relation=(4,)), "plain"),
  "nmtr": ("nmtr", dict(num_tasks=3, interaction="mlp", mlp=(4, 1)), "plain"),
  "aitm": ("aitm", dict(num_tasks=3, tower=(6, 4)), "aitm"),
  "cross_stitch": ("cross_stitch", dict(num_tasks=3, hidden=(6, 4), tower=(1,)), "plain"),
  "dselect_k": ("dselect_k", dict(num_tasks=2, k=2, entropy_reg=0.1, **MOE), "plain"),
  "dselect_k_per_example": ("dselect_k", dict(num_tasks=2, k=2, per_example=True, **MOE), "plain"),
  "snr": ("snr", dict(num_tasks=2, num_subnetworks=(3, 2), subnetwork=(6,), tower=(4, 1)), "plain"),
  "snr_aver": ("snr", dict(num_tasks=3, num_subnetworks=(2,), subnetwork=(6,), variant="aver"), "plain"),
  "adatt": ("adatt", dict(num_tasks=2, num_levels=2, experts_per_task=2, expert=(6,), tower=(4, 1)), "plain"),
  "adatt_sp": ("adatt", dict(num_tasks=3, num_levels=1, num_shared_experts=0, expert=(6,), tower=(1,)), "plain"),
  "cross_stitch_channels": ("cross_stitch", dict(num_tasks=2, hidden=(6,), channel_wise=True), "plain"),
  "dupn": ("dupn", dict(num_tasks=3, lstm=4, attention=3, representation_dim=5, tower=(4, 1)), "plain"),
  "deepmcp": ("deepmcp", dict(prediction=(4, 1), matching=(3,), correlation_weight=0.5, num_negatives=2), "plain"),
  "hmoe": ("hmoe", dict(num_tasks=3, **MOE), "plain"),
  "hmoe_free": ("hmoe", dict(num_tasks=2, task_constrained=False, **MOE), "plain"),
  "youtube": (
    "youtube",
    dict(num_tasks=3, bias_features=("domain",), position_feature="domain", engagement_tasks=(0, 2), **MOE),
    "plain",
  ),
}


def _batch(num_labels):
  rng = np.random.default_rng(0)
  x = {
    "user": rng.integers(0, 13, B),
    "item": rng.integers(0, 13, B),
    "domain": rng.integers(0, 3, B),
    "history": np.where(np.arange(4)[None] < rng.integers(0, 5, B)[:, None], rng.integers(0, 13, (B, 4)), -1),
    "dense": rng.normal(size=(B, 2)).astype(np.float32),
  }  # some user ids out of vocabulary
  y = (rng.random((3, B)) < 0.5).astype(np.float32)
  chain = np.cumprod(y, axis=0)  # click -> click & a -> click & a & buy
  return {k: jnp.asarray(v) for k, v in x.items()}, jnp.asarray(y[:num_labels]), chain


@functools.cache
def _setup(case):
  """(loss_fn, params, batch, T) for one case; the loss has aux and runs the model with train=False."""
  name, config, kind = CASES[case]
  num_tasks = config.get("num_tasks", {"esmm": 2, "escm2": 2, "esm2": 3}.get(kind, 2 if name == "deepmcp" else None))
  x, y, chain = _batch(num_tasks)
  labels = {
    "plain": y,
    "esmm": chain[np.array([0, 2])],
    "escm2": chain[np.array([0, 2])],
    "aitm": chain,
    "esm2": chain,
  }[kind]
  multi = {
    "plain": None,
    "esmm": losses.esmm_loss,
    "escm2": functools.partial(losses.escm2_loss, mode="dr"),
    "aitm": losses.aitm_loss,
    "esm2": losses.esm2_loss,
  }[kind]
  model = models.get(name, features=SPEC, **config)
  # Random values of the variables' shapes: tracing init is cheap, compiling it is not (the tests are
  # compile-bound). batch_stats (STAR's moving mean and variance) are ones.
  rng = np.random.default_rng(1)
  shapes = dict(jax.eval_shape(model.init, jax.random.PRNGKey(0), x))
  params = jax.tree.map(lambda a: jnp.asarray(rng.normal(0, 0.5, a.shape), a.dtype), shapes.pop("params"))
  variables = jax.tree.map(lambda a: jnp.ones(a.shape, a.dtype), shapes)
  loss = losses.make_loss_fn(model, "bce", multi_task_loss=multi)

  def loss_fn(p, batch):
    return loss(p, batch, None, variables)

  return loss_fn, params, {"x": x, "labels": jnp.asarray(labels)}, labels.shape[0]


# Per case, the parameters of the task heads (regex on the leaf path); every other leaf is the trunk.
HEADS = {
  "shared_bottom": r"^tower_",
  "omoe": r"^(gate|tower_)",
  "omoe_vmap": r"^(gate|tower_)",
  "mmoe": r"^(gate_|tower_)",
  "mmoe_vmap": r"^(gate_|tower_)",
  "cgc": r"^(level_0/gate_task_|tower_)",
  "ple": r"^(level_1/gate_task_|tower_)",
  "ple_vmap": r"^(level_1/gate_task_|tower_)",
  "stem": r"^(level_0/gate_task_|tower_)",
  "stem_2levels": r"^(level_1/gate_task_|tower_)",
  "pepnet": r"^tower_",
  "star": r"^(star_|auxiliary/)",
  "star_towers": r"^(star_task_|input/embedding/embed_domain/)",  # no auxiliary network: domain unused
  "esmm": r"^tower_",
  "esmm_bottom": r"^tower_",
  "esm2": r"^tower_",
  "escm2": r"^tower_",
  "dbmtl": r"^(tower_|relation_|output_)",
  "nmtr": r"^(interaction_|input/embedding/embed_domain/)",  # the domain field is unused
  "aitm": r"^(tower_|transfer_|attention_|head_)",
  "cross_stitch": r"^tower_",
  "dselect_k": r"^(gate_|tower_)",
  "dselect_k_per_example": r"^(gate_|tower_)",
  "snr": r"^(routing_tasks/|tower_)",
  "snr_aver": r"^(routing_tasks/|tower_)",
  "adatt": r"^tower_",  # the last fusion is below the representation (trunk), task-specific or not
  "adatt_sp": r"^tower_",
  "cross_stitch_channels": r"^tower_",
  "youtube": r"^(gate_|tower_)",  # the shallow tower feeds the representation: part of the trunk
  "dupn": r"^(tower_|input/embedding/embed_domain/)",  # DUPN reads no domain field
  "deepmcp": r"^(prediction/|matching_)",
  "hmoe": r"^(gate_|tower_|stack_)",
  "hmoe_free": r"^(gate_|tower_|stack_)",
}
# The registered models, plus the "vmap" experts: the numeric checks compile, so they run on these.
NUMERIC = sorted({c for c, (name, _, _) in CASES.items() if c == name} | {"mmoe_vmap"})


def _compile(fn, *args):
  # These programs are tiny: XLA's backend optimizations cost far more compile time than they save.
  return jax.jit(fn).lower(*args).compile({"xla_backend_optimization_level": 0})


def test_every_registered_model_is_covered():
  registered = set(models.available()) - {"my_linear"}  # a doctest may register a toy model
  assert {c[0] for c in CASES.values()} >= registered
  assert set(NUMERIC) >= registered and set(HEADS) == set(CASES)


def _check_split(case, rep, shared_mask, params, num_tasks):
  """The representation has the batch on batch_axis; the trunk (the shared leaves) is what it should be."""
  assert isinstance(rep, mtjax.RepJacobian) and rep.num_tasks == num_tasks
  for z in jax.tree.leaves(rep.z_rows):  # [T, *z.shape]
    assert z.shape[0] == num_tasks and z.shape[1 + rep.batch_axis] == B, (z.shape, rep.batch_axis)
  paths = tree_lib.leaf_paths(params)
  expected = [re.search(HEADS[case], p) is None for p in paths]
  assert shared_mask == expected, [(p, m) for p, m, e in zip(paths, shared_mask, expected) if m != e]


@pytest.mark.parametrize("case", sorted(set(CASES) - set(NUMERIC)))
def test_representation_of_variants(case):
  """Tracing only, for the variants of the registered models (expert impls, levels, options)."""
  loss_fn, params, batch, num_tasks = _setup(case)
  seen = {}

  def trace(p, b):
    (task_losses, _), rep = mtjax.task_grads(loss_fn, strategy="rep", has_aux=True)(p, b)
    _, shared = mtjax.task_grads(loss_fn, strategy="shared", has_aux=True)(p, b)
    _check_split(case, rep, shared.default_mask(len(jax.tree.leaves(p))), p, num_tasks)
    seen["done"] = True
    return task_losses

  jax.eval_shape(trace, params, batch)
  assert seen["done"]


@pytest.mark.parametrize("case", NUMERIC)
def test_shared_jacobian_is_exact_and_rep_runs(case):
  """strategy="shared": the trunk's rows are exact and PCGrad on them is PCGrad with shared=<the trunk>
  on the full rows; strategy="rep": MGDA-UB gives finite params-shaped updates; the split is right."""
  loss_fn, params, batch, num_tasks = _setup(case)
  info = {}

  def run(params, batch):
    (losses_s, _), jac = mtjax.task_grads(loss_fn, strategy="shared", has_aux=True)(params, batch)
    (losses_f, _), rows = mtjax.task_grads(loss_fn, has_aux=True, sparse=False)(params, batch)
    info.update(shared=type(jac), mask=jac.default_mask(len(jax.tree.leaves(params))))
    pcgrad = mtjax.pcgrad(num_tasks=num_tasks)
    up_s, _ = pcgrad.update(jac, pcgrad.init(params), params)
    pcgrad_full = mtjax.pcgrad(num_tasks=num_tasks, shared=jax.tree.unflatten(jax.tree.structure(params), info["mask"]))
    up_f, _ = pcgrad_full.update(rows, pcgrad_full.init(params), params)
    (losses_r, _), rep = mtjax.task_grads(loss_fn, strategy="rep", has_aux=True)(params, batch)
    _check_split(case, rep, info["mask"], params, num_tasks)
    tx = mtjax.mgda(num_tasks=num_tasks)
    up_r, _ = tx.update(rep, tx.init(params), params, task_losses=losses_r)
    return (losses_s, losses_f, losses_r), mtjax.densify(jac.materialize()), rows, up_s, up_f, up_r

  (losses_s, losses_f, losses_r), rows_s, rows, up_s, up_f, up_r = _compile(run, params, batch)(params, batch)
  assert info["shared"] is mtjax.SharedJacobian
  assert any(info["mask"]) and not all(info["mask"])  # a trunk and heads
  np.testing.assert_allclose(losses_s, losses_f, rtol=1e-6)
  np.testing.assert_allclose(losses_r, losses_f, rtol=1e-6)
  close = functools.partial(np.testing.assert_allclose, rtol=1e-5, atol=1e-6)
  jax.tree.map(close, rows_s, rows)  # the exact full rows, heads included
  jax.tree.map(close, up_s, up_f)  # the exact shared-only Jacobian
  assert jax.tree.structure(up_r) == jax.tree.structure(params)
  for u, p in zip(jax.tree.leaves(up_r), jax.tree.leaves(params)):
    assert u.shape == p.shape and u.dtype == p.dtype and np.all(np.isfinite(u))
  assert any(np.any(u != 0) for u in jax.tree.leaves(up_r))


def test_marker_is_an_identity():
  z = {"a": jnp.arange(3.0), "b": (jnp.ones((2, 3)),)}
  assert mtjax.representation(z, batch_axis=1) is z


def test_two_representations_raise():
  def loss_fn(p, x):
    z = mtjax.representation(jnp.tanh(x @ p["trunk"]))
    z = mtjax.representation(z)
    return jnp.stack([jnp.mean(z @ p["h0"]), jnp.mean(z @ p["h1"])])

  p = {"trunk": jnp.ones((3, 4)), "h0": jnp.ones(4), "h1": -jnp.ones(4)}
  for strategy in ("rep", "shared"):
    with pytest.raises(ValueError, match="more than once"):
      mtjax.task_grads(loss_fn, strategy=strategy)(p, jnp.ones((2, 3)))


def test_model_without_representation_raises():
  class TwoHeads(nn.Module):
    @nn.compact
    def __call__(self, x, *, train=False):
      return nn.Dense(2)(nn.relu(nn.Dense(4)(x))).T, {}

  model = TwoHeads()
  batch = {"x": jnp.ones((4, 3)), "labels": jnp.zeros((2, 4))}
  params = model.init(jax.random.key(0), batch["x"])["params"]
  loss_fn = losses.make_loss_fn(model, "bce")
  for strategy in ("rep", "shared"):
    with pytest.raises(ValueError, match="mtjax.representation"):
      mtjax.task_grads(loss_fn, strategy=strategy, has_aux=True)(params, batch)


# ------------------------------------------------------------------------------------------------
# mtjax.task_view: each task reads its own copy of the representation, so one backward through the
# heads gives every task's dL_t/dz. The models whose heads are separable by task mark their views.

VIEWS = {
  "shared_bottom",
  "omoe",
  "omoe_vmap",
  "mmoe",
  "mmoe_vmap",
  "cgc",
  "ple",
  "ple_vmap",
  "stem",
  "stem_2levels",
  "pepnet",
  "youtube",
  "dupn",
  "hmoe",
  "cross_stitch",
  "cross_stitch_channels",
  "dselect_k",
  "dselect_k_per_example",
  "snr",
  "snr_aver",
  "adatt",
  "adatt_sp",
}


def _uses_views(loss_fn, params, batch) -> bool:
  seen = {}

  def trace(p, b):
    _, rep = mtjax.task_grads(loss_fn, strategy="rep", has_aux=True)(p, b)
    seen["views"] = rep.head_sum is not None  # the heads' sum gradient came with the views' one backward
    return 0.0

  jax.eval_shape(trace, params, batch)
  return seen["views"]


@pytest.mark.parametrize("case", sorted(CASES))
def test_task_views_one_backward_equals_per_task_backward(case):
  """The views' rows equal T per-task backward passes (check_task_views); the separable models use them."""
  loss_fn, params, batch, _ = _setup(case)
  loss_only = lambda p, b: loss_fn(p, b)[0]
  assert _uses_views(loss_fn, params, batch) == (case in VIEWS)
  if case in VIEWS:
    diff = mtjax.check_task_views(loss_only, params, batch, rtol=1e-5)
    assert diff <= 1e-5
  else:
    with pytest.raises(ValueError, match="marks no mtjax.task_view"):
      mtjax.check_task_views(loss_only, params, batch)


def test_task_view_contract_errors_and_fallback():
  p = {"trunk": jnp.ones((3, 4)), "h": [jnp.arange(4.0), -jnp.ones(4), jnp.ones(4)]}
  x = jnp.asarray(np.random.default_rng(0).normal(size=(5, 3)), jnp.float32)

  def loss_with(view):
    def loss_fn(params, x):
      z = mtjax.representation(jnp.tanh(x @ params["trunk"]))
      return jnp.stack([jnp.mean((view(z, t) @ params["h"][t]) ** 2) for t in range(3)])

    return loss_fn

  good = loss_with(mtjax.task_view)
  # Outside task_grads an identity; the index must be a Python int.
  z = jnp.ones(3)
  assert mtjax.task_view(z, 1) is z
  with pytest.raises(TypeError, match="Python int"):
    mtjax.task_view(z, jnp.int32(0))
  # A task index beyond the loss's tasks, a view of something that is not the representation.
  with pytest.raises(ValueError, match="task index 3 is out of range for a loss of 3 tasks"):
    mtjax.task_grads(loss_with(lambda z, t: mtjax.task_view(z, t + 1)), strategy="rep")(p, x)
  with pytest.raises(ValueError, match="takes the value mtjax.representation returned"):
    mtjax.task_grads(loss_with(lambda z, t: mtjax.task_view(z * 1.0, t)), strategy="rep")(p, x)
  # A wrong view (task t reads task t+1's copy) is caught by check_task_views.
  with pytest.raises(ValueError, match="reads another task's view"):
    mtjax.check_task_views(loss_with(lambda z, t: mtjax.task_view(z, (t + 1) % 3)), p, x)
  assert mtjax.check_task_views(good, p, x) <= 1e-6

  # Heads that also read z directly: task_grads falls back to T per-task VJPs, and stays exact.
  def mixed(params, x):
    z = mtjax.representation(jnp.tanh(x @ params["trunk"]))
    return jnp.stack(
      [jnp.mean((mtjax.task_view(z, t) @ params["h"][t]) ** 2) + 0.1 * t * jnp.mean(z) for t in range(3)]
    )

  assert not _uses_views(lambda q, b: (mixed(q, b), None), p, x)
  for loss_fn in (good, mixed):
    _, rep = mtjax.task_grads(loss_fn, strategy="rep")(p, x)
    ref = jax.jacrev(lambda z_: _heads_only(loss_fn, p, x, z_))(jnp.tanh(x @ p["trunk"]))
    np.testing.assert_allclose(rep.z_rows, ref, rtol=1e-6, atol=1e-7)


def _heads_only(loss_fn, params, x, z):
  """loss_fn with the representation replaced by ``z`` (plain JAX: dL/dz by jacrev)."""
  from mtjax._src import sparse as sparse_lib  # pylint: disable=import-outside-toplevel

  class Swap:
    def representation(self, _, batch_axis):
      del batch_axis
      self.z = z
      return z

    def task_view(self, value, task):
      del task
      return value

    def lookup(self, table, ids, mode):  # pragma: no cover - no lookups here
      raise AssertionError

  with sparse_lib.recording(Swap()):
    return loss_fn(params, x)
