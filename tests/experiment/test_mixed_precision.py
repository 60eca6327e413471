"""Mixed precision (issue #14): bfloat16 per-task rows, float32 Gram, solvers, state and update.

Every registered method gets bfloat16 per-task gradients of float32 parameters (what
``fit(precision="bf16")`` hands it: the backward pass runs in bfloat16). Its update must be float32
(the params' dtype), finite, its state float32 after every step, no operation of the update may
compute in bfloat16 (checked on the jaxpr: the rows are only ever read through a cast to float32 or
a float32-accumulating dot), and the result must match the float32 run on the same, bfloat16-rounded
rows (``REL_TOL``, relative to the update's norm; the Gram of bfloat16 rows is exact in float32
products, so the two runs differ only in summation order).
"""

import inspect
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "fuzz"))
import fuzz_report  # noqa: E402  (how the fuzz builds every registered method)

from mtjax.experiment._registry import METHODS  # noqa: E402

T, P = 3, 6
STEPS = 3  # DWA with steps_per_epoch=1 uses loss ratios from its third update on
REL_TOL = 1e-3
COMPILER_OPTIONS = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
CASES = tuple(fuzz_report.METHOD_CASES) + ("modo",)  # Auto-Lambda: tested with fit below
SLOW = ("cagrad", "nash_mtl", "gradvac", "fairgrad", "normalize", "mgda")  # over ~2 s (compiling the solver)
NUM_BATCHES = 2  # MoDo takes micro-batch rows [M, T, P]


def _make(case):
  if case == "modo":
    kwargs = {"num_tasks": T, "num_batches": NUM_BATCHES}
    if "key" in inspect.signature(METHODS["modo"]).parameters:
      kwargs["key"] = 0
    return METHODS["modo"](**kwargs)
  return fuzz_report.make(case, T)


# Exact in any dtype (no rounding): moving, selecting and comparing values (e.g. the Gram core's
# ``max |entry|`` and the transpose of the rows in the Gram's float32-accumulating dot).
EXACT = {
  "transpose",
  "reshape",
  "squeeze",
  "expand_dims",
  "broadcast_in_dim",
  "slice",
  "dynamic_slice",
  "gather",
  "concatenate",
  "select_n",
  "abs",
  "neg",
  "sign",
  "max",
  "min",
  "reduce_max",
  "reduce_min",
  "copy",
  "copy_p",
  "pjit",
  "jit",
  "closed_call",
  "cond",
  "while",
  "scan",
  "custom_jvp_call",
  "custom_vjp_call",
  "custom_vjp_call_jaxpr",
  "stop_gradient",
  "optimization_barrier",
}


def _bf16_ops(jaxpr) -> list:
  """Rounding primitives of ``jaxpr`` (nested ones too) with a bfloat16 output."""
  found = []
  for eqn in jaxpr.eqns:
    if str(eqn.primitive) not in EXACT and any(getattr(v.aval, "dtype", None) == jnp.bfloat16 for v in eqn.outvars):
      found.append(str(eqn.primitive))
    for p in eqn.params.values():
      for j in p if isinstance(p, (tuple, list)) else (p,):
        inner = getattr(j, "jaxpr", None)
        if inner is not None and hasattr(inner, "eqns"):
          found += _bf16_ops(inner)
        elif hasattr(j, "eqns"):
          found += _bf16_ops(j)
  return found


@pytest.mark.parametrize("case", [pytest.param(c, marks=[pytest.mark.slow] if c in SLOW else []) for c in CASES])
def test_bf16_rows_float32_math(case):
  rng = np.random.default_rng(CASES.index(case))
  lead = (NUM_BATCHES, T) if case == "modo" else (T,)
  rows = jnp.asarray(rng.normal(size=lead + (P,)), jnp.bfloat16)
  losses = jnp.asarray(rng.uniform(0.5, 2.0, size=lead), jnp.float32)
  params = {"w": jnp.zeros((P,), jnp.float32)}
  tx = _make(case)
  state0 = tx.init(params)

  def both(g16, s16, s32, l):  # one executable for the two precisions
    u16, s16 = tx.update({"w": g16}, s16, params, task_losses=l)
    u32, s32 = tx.update({"w": g16.astype(jnp.float32)}, s32, params, task_losses=l)
    return u16, s16, u32, s32

  bf16_ops = _bf16_ops(
    jax.make_jaxpr(lambda g, s, l: tx.update({"w": g}, s, params, task_losses=l))(rows, state0, losses).jaxpr
  )
  assert not bf16_ops, f"{case}: operations computing in bfloat16: {sorted(set(bf16_ops))}"
  step = jax.jit(both).lower(rows, state0, state0, losses).compile(compiler_options=COMPILER_OPTIONS)
  s16 = s32 = state0
  for _ in range(STEPS):
    u16, s16, u32, s32 = step(rows, s16, s32, losses)
    d16, d32 = np.asarray(u16["w"]), np.asarray(u32["w"], np.float64)
    assert u16["w"].dtype == jnp.float32, (case, u16["w"].dtype)
    assert np.all(np.isfinite(d16)), (case, d16)
    floats = [x.dtype for x in jax.tree.leaves(s16) if jnp.issubdtype(x.dtype, jnp.floating)]
    assert all(d == jnp.float32 for d in floats), (case, floats)
    assert jax.tree.structure(s16) == jax.tree.structure(state0)
    err = np.linalg.norm(d16 - d32) / max(np.linalg.norm(d32), 1e-30)
    assert err <= REL_TOL, (case, err, d16, d32)


def test_default_float32_unchanged():
  """Float32 rows of float32 params: no cast is inserted (the default path is today's)."""
  from mtjax._src import rows as rows_lib

  g = {"w": jnp.ones((T, P), jnp.float32)}
  assert rows_lib.upcast_rows(g, {"w": jnp.zeros((P,), jnp.float32)}) is g
  assert rows_lib.update_dtypes(jax.tree.leaves(g), None) == ()


# --- training: fit(precision="bf16"), the config switch, resume -------------------------------------


def _spy(inner):
  """``inner`` that records the dtype of the rows it is traced with (the rows reaching the method)."""
  import optax

  seen = []

  def update(updates, state, params=None, **kw):
    seen.append({str(x.dtype) for x in jax.tree.leaves(updates)})
    return inner.update(updates, state, params, **kw)

  return optax.GradientTransformationExtraArgs(inner.init, update), seen


def _tiny():
  from mtjax import data
  from mtjax import models

  ds = data.conflicting_tasks(num_samples=400, seed=0)
  model = models.MMoE(num_tasks=3, num_experts=2, expert=(8,), tower=(4, 1), features=ds.spec)
  return ds, model


BF16_FIT = dict(steps=12, batch_size=64, seed=1, progress=False, log_every=1, precision="bf16")


@pytest.fixture(scope="module")
def bf16_run():
  """``(dataset, model, tx, rows dtypes seen by the method, fit result)`` of one bfloat16 run."""
  import optax

  import mtjax
  from mtjax import training

  ds, model = _tiny()
  method, seen = _spy(mtjax.pcgrad(num_tasks=3, key=0))
  tx = optax.chain(method, optax.adam(3e-2))
  return ds, model, tx, seen, training.fit(model, tx, ds, **BF16_FIT)


@pytest.mark.slow
def test_fit_bf16_trains_with_float32_master_params(bf16_run):
  """bfloat16 rows reach the method, the master params and all state stay float32, the loss falls."""
  _, _, _, seen, full = bf16_run
  # seen[0]: fit's abstract check of the chain (float32 shapes); then the step's trace: bfloat16 rows
  # (int32: the ids of the embedding tables' sparse rows)
  assert "bfloat16" in seen[-1] and "float32" not in seen[-1], seen
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(full.state.params))  # float32 master params
  floats = [x for x in jax.tree.leaves(full.state.opt_state) if jnp.issubdtype(x.dtype, jnp.floating)]
  assert all(x.dtype == jnp.float32 for x in floats)  # method state and Adam moments
  losses = np.array([r["losses"] for r in full.history])
  assert np.all(np.isfinite(losses)) and losses[-3:].mean() < 0.9 * losses[:3].mean(), losses[[0, -1]]
  assert np.all(np.isfinite(np.array([r["cosine"] for r in full.history])))


@pytest.mark.slow
def test_bf16_resume_is_bit_identical(bf16_run, tmp_path):
  """Interrupted after a checkpoint and resumed: the same state as the uninterrupted run."""
  from mtjax import training

  ds, model, tx, _, full = bf16_run
  out = str(tmp_path / "run")
  training.fit(model, tx, ds, out_dir=out, checkpoint_every=4, stop_after=6, **BF16_FIT)
  resumed = training.fit(model, tx, ds, out_dir=out, checkpoint_every=4, **BF16_FIT)
  for a, b in zip(jax.tree.leaves(full.state), jax.tree.leaves(resumed.state)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_precision_names_and_errors():
  from mtjax import training
  from mtjax.experiment import ConfigError
  from mtjax.experiment import from_dict

  assert training.Precision.from_name(None) == training.Precision() and not training.Precision().mixed
  bf16 = training.Precision.from_name("bf16")
  assert bf16.mixed and bf16.compute_dtype == jnp.bfloat16 and bf16.param_dtype == jnp.float32
  assert training.Precision.from_name("bfloat16") == bf16 == training.Precision.from_name(jnp.bfloat16)
  with pytest.raises(ValueError, match="unknown precision 'fp8'"):
    training.Precision.from_name("fp8")
  raw = {
    "data": {"name": "conflicting"},
    "model": {"name": "mmoe"},
    "method": {"name": "linear"},
    "optimizer": {"name": "adam"},
  }
  assert from_dict({**raw, "train": {"precision": "bf16"}}).train.precision == "bf16"
  assert from_dict(raw).train.precision == "fp32"
  with pytest.raises(ConfigError, match=r"train.precision must be 'fp32' .* or 'bf16'.*got 'half'"):
    from_dict({**raw, "train": {"precision": "half"}})


@pytest.mark.slow
def test_config_switch_end_to_end(tmp_path, capsys):
  import json
  import os

  from mtjax import cli

  cfg = tmp_path / "cfg.toml"
  cfg.write_text(
    'name = "tiny"\n[data]\nname = "conflicting"\nnum_samples = 400\n[model]\nname = "mmoe"\n'
    'num_experts = 2\nexpert = [8]\ntower = [4, 1]\n[method]\nname = "mgda"\n[optimizer]\n'
    'name = "adam"\nlearning_rate = 0.01\n[train]\nsteps = 6\nbatch_size = 64\nprecision = "bf16"\n'
  )
  out = str(tmp_path / "out")
  assert cli.main(["run", str(cfg), "--out", out, "--no-progress"]) == 0
  assert "precision bf16 (float32 parameters, bfloat16 compute, float32 losses)" in capsys.readouterr().out
  res = json.load(open(os.path.join(out, "results.json")))
  assert res["precision"] == "bf16" and res["config"]["train"]["precision"] == "bf16"
  assert np.isfinite(res["test"]["macro"]["auc"])
