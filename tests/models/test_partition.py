"""Every built-in model's declared shared/task-specific partition (``model.task_specific()``)
equals the partition measured from its per-task gradients (``mtjax.infer_shared``), for the
configurations of the all-models test and for deeper/wider variants (issue #10)."""

import functools

import jax
import jax.numpy as jnp
import pytest
from test_all_models_train import CASES
from test_all_models_train import SPEC
from test_all_models_train import _data

import mtjax
from mtjax import losses
from mtjax import models
from mtjax._src import partition as partition_lib

VARIANTS = {name: (name, cfg, kind) for name, (cfg, kind) in CASES.items()}
VARIANTS.update(
  {
    "ple_3_levels": ("ple", dict(num_tasks=3, num_levels=3, expert=(16,), tower=(8, 1)), "plain3"),
    "stem_2_levels": ("stem", dict(num_tasks=2, num_levels=2, expert=(16,), tower=(8, 1)), "plain"),
    "aitm_3_tasks": ("aitm", dict(num_tasks=3, tower=(16, 8)), "esm2"),
  }
)


def _setup(variant):
  name, cfg, kind = VARIANTS[variant]
  x, y2, chain = _data()
  labels = {
    "plain": y2,
    "plain3": chain,
    "esmm": chain[jnp.array([0, 2])],
    "escm2": chain[jnp.array([0, 2])],
    "aitm": chain[jnp.array([0, 2])],
    "esm2": chain,
  }[kind]
  multi = {
    "aitm": losses.aitm_loss,
    "esmm": losses.esmm_loss,
    "escm2": functools.partial(losses.escm2_loss, mode="dr"),
    "esm2": losses.esm2_loss,
  }.get(kind)
  if name == "aitm" and kind == "esm2":
    multi = losses.aitm_loss
  model = models.get(name, features=SPEC, **cfg)
  rngs = {"params": jax.random.PRNGKey(0), "dropout": jax.random.PRNGKey(1)}
  variables = dict(jax.jit(lambda x: model.init(rngs, x))(x))
  params = variables.pop("params")
  loss_fn = losses.make_loss_fn(model, "bce", multi_task_loss=multi, has_aux=False)
  return model, params, loss_fn, {"x": x, "labels": labels}, variables


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_declared_partition_matches_measured(variant):
  model, params, loss_fn, batch, variables = _setup(variant)
  declared = models.partition(model)(params)
  measured = mtjax.infer_shared(lambda p: loss_fn(p, batch, variables=variables), params)
  paths = mtjax._src.tree.leaf_paths(params)
  flat_d, flat_m = jax.tree.leaves(declared), jax.tree.leaves(measured)
  wrong = [(p, d, m) for p, d, m in zip(paths, flat_d, flat_m) if d != m]
  assert not wrong, f"declared != measured (path, declared shared, measured shared): {wrong}"
  if variant not in ("star",):  # STAR: every layer serves every task
    assert not all(flat_d), "a multi-task model with towers declares no task-specific parameter"
  assert any(flat_d)


def test_infer_shared_counts_tasks_per_leaf():
  def loss_fn(p, x):
    h = x @ p["trunk"]
    return jnp.stack(
      [
        jnp.sum(h @ p["head_0"]) ** 2,
        jnp.sum(jax.lax.stop_gradient(h) @ p["head_1"]) ** 2,
        jnp.sum(h @ p["head_2"]) ** 2
        + jnp.sum(p["both"] * x[0, :2])
        + jnp.sum(p["both"] * x[1, :2]) * jnp.sum(h @ p["head_1"]),
      ]
    )

  p = {
    "trunk": jnp.ones((3, 4)),
    "head_0": jnp.ones(4),
    "head_1": jnp.ones(4),
    "head_2": jnp.ones(4),
    "both": jnp.ones(2),
    "unused": jnp.ones(2),
  }
  got = mtjax.infer_shared(loss_fn, p, jnp.ones((5, 3)))
  # head_1 is read by tasks 1 and 2, the trunk by 0 and 2 (task 1 stops its gradient), the unused
  # leaf by none (conservatively shared).
  assert got == {"trunk": True, "head_0": False, "head_1": True, "head_2": False, "both": False, "unused": True}


def test_describe_counts_parameters():
  p = {"trunk": jnp.ones((3, 4)), "tower_0": {"kernel": jnp.ones(4)}, "tower_1": {"kernel": jnp.ones(4)}}
  d = partition_lib.describe(mtjax.shared_mask(exclude="tower_"), p)
  assert d == {
    "shared_layers": ["trunk"],
    "task_specific_layers": ["tower_0", "tower_1"],
    "shared_params": 12,
    "task_specific_params": 8,
  }
  assert partition_lib.describe(None, p)["task_specific_params"] == 0


def test_config_spec_resolution():
  model = models.get("mmoe", num_tasks=2, num_experts=2, expert=(4,), tower=(2, 1))
  params = model.init(jax.random.PRNGKey(0), jnp.ones((3, 5)))["params"]
  assert partition_lib.resolve("all", model) is None
  by_model = partition_lib.resolve("model", model)(params)
  by_table = partition_lib.resolve({"exclude": ["tower_", "gate_"]}, model)(params)
  assert jax.tree.leaves(by_model) == jax.tree.leaves(by_table)
  with pytest.raises(ValueError, match="shared must be"):
    partition_lib.resolve("towers", model)
