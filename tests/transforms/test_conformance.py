"""The conformance table: every mtjax transform, and its important option variants, runs
through the same checks (in the spirit of optax's ``contrib/_common_test.py``).

``CASES`` lists ``(name, factory(num_tasks) -> transform, needs_task_losses)`` plus what the
property tests need to know about each case. Per case the file checks: chaining with
``optax.adam``; unknown extra args; no retracing; ``optax.inject_hyperparams``; float32 and
float64; zero / identical / opposite / tiny / huge gradients; T = 1 and T = 8; convergence of
``optax.chain(method, optax.sgd)`` inside ``lax.scan`` on a toy two-task problem; clear errors
for bad input; the state contract; and the cross-method properties (no conflict for
MGDA / PE-LTR / UPGrad / DualProj / CAGrad with c >= 1, PCGrad without conflict = plain sum,
permutation equivariance of the
deterministic methods, shared-mask semantics).

To keep the runtime small, each case compiles a handful of functions once (``functools.cache``
below) and every test reuses them with new values (which is itself the no-retracing check);
they are compiled with LLVM's expensive passes off (``FAST_COMPILE``: same numerics, ~30% less
compile time; the per-method test files use the default options). float64, T = 1 and T = 8
run in the fast tier for each method's default case and are ``slow`` for the option variants.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import mtjax

# A small multi-leaf model: a shared bottom of two layers and two task towers.
PARAM_SHAPES = {
  "bottom": {"Dense_0": {"kernel": (3, 2), "bias": (2,)}, "Dense_1": {"kernel": (2, 2)}},
  "tower_0": {"kernel": (2,)},
  "tower_1": {"kernel": (2,)},
}
SHARED = mtjax.shared_mask(exclude="tower_")
NUM_TASKS = 3  # the main table's T
NUM_STEPS = 5  # steps of the multi-step comparisons (DWA's epoch variants change weights at step 5)
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def _map_shapes(fn, shapes=PARAM_SHAPES):
  return jax.tree.map(fn, shapes, is_leaf=lambda x: isinstance(x, tuple))


def linear_weights(num_tasks: int) -> np.ndarray:
  return np.linspace(0.5, 1.5, num_tasks) if num_tasks > 1 else np.array([0.7])


def lower_bounds(num_tasks: int) -> np.ndarray:
  """Distinct PE-LTR priority bounds summing to 0.8."""
  return 0.8 * np.arange(1, num_tasks + 1) / (num_tasks * (num_tasks + 1) / 2)


class Case(NamedTuple):
  """One row of the table.

  Attributes:
    name: test id.
    factory: the mtjax factory (also wrapped by ``optax.inject_hyperparams``).
    options: ``num_tasks -> kwargs`` of ``factory`` (numeric ones become injected hyperparameters).
    needs_task_losses: whether ``update`` requires ``task_losses``.
    static_args: ``static_args`` for ``optax.inject_hyperparams`` (``"shared"`` is added).
    deterministic: no randomness (permutation equivariance applies).
    task_specific: the case's default handling of task-specific leaves (``"sum"``/``"weighted"``).
    per_task: names of per-task hyperparameters, permuted together with the tasks.
    degree: ``d(s J) = s^degree d(J)`` on the shared leaves at the first step (``s > 0``); ``None``: the
      update is not homogeneous in the gradients' scale (only finiteness is checked at tiny / huge scales).
    no_conflict: the direction never conflicts with a task (``J d >= -tol``).
    toy_lr: SGD step size on the toy problem, or an optax schedule (methods whose update does not
      shrink at the Pareto set, e.g. Nash-MTL's ``||d|| = sqrt(T)``, need a decaying one).
    toy_blocks: coordinate blocks of the toy problem's ``x`` that the method treats separately
      (per-layer / per-leaf surgery stops where every block is Pareto-stationary on its own).
  """

  name: str
  factory: Callable[..., optax.GradientTransformationExtraArgs]
  options: Callable[[int], dict]
  needs_task_losses: bool
  static_args: tuple = ("num_tasks",)
  deterministic: bool = True
  task_specific: str = "sum"
  per_task: tuple = ()
  degree: Any = 1
  no_conflict: bool = False
  toy_lr: Any = 0.1
  toy_blocks: tuple = ((0, 1, 2, 3),)

  def make(self, num_tasks: int, **overrides) -> optax.GradientTransformationExtraArgs:
    """The case's ``factory(num_tasks)``; ``overrides`` (e.g. ``shared=``) replace options."""
    return self.factory(**{**self.options(num_tasks), **overrides})


def _mgda(normalization, apply_to="raw", **kw):
  return lambda t: dict(num_tasks=t, normalization=normalization, apply_to=apply_to, tol=1e-6, **kw)


MGDA_STATIC = ("num_tasks", "max_iters")
SOLVER_STATIC = ("num_tasks", "max_iters")


def decaying_lr(base, halflife):
  """``base / (1 + count / halflife)``: for updates whose norm does not vanish at the Pareto set."""
  return lambda count: base / (1.0 + count / halflife)


DWA_STATIC = ("num_tasks", "steps_per_epoch", "window")
GRADNORM_STATIC = ("num_tasks", "steps_per_epoch")

CASES = [
  Case("linear", mtjax.linear, lambda t: dict(num_tasks=t), False, task_specific="weighted"),
  Case(
    "linear-weights",
    mtjax.linear,
    lambda t: dict(weights=linear_weights(t), num_tasks=t),
    False,
    task_specific="weighted",
    per_task=("weights",),
  ),
  Case("pcgrad", mtjax.pcgrad, lambda t: dict(key=0, num_tasks=t), False, deterministic=False),
  Case("pcgrad-mean", mtjax.pcgrad, lambda t: dict(key=0, num_tasks=t, reduction="mean"), False, deterministic=False),
  Case("gradvac", mtjax.gradvac, lambda t: dict(key=0, num_tasks=t, beta=0.5), False, deterministic=False),
  Case(
    "gradvac-layer",
    mtjax.gradvac,
    lambda t: dict(key=1, num_tasks=t, beta=0.3, granularity="layer"),
    False,
    deterministic=False,
    toy_blocks=((0, 1, 2), (3,)),
  ),
  Case(
    "gradvac-leaf",
    mtjax.gradvac,
    lambda t: dict(key=2, num_tasks=t, beta=0.3, granularity="leaf"),
    False,
    deterministic=False,
    toy_blocks=((0, 1), (2,), (3,)),
  ),
  Case("mgda", mtjax.mgda, _mgda("none"), False, static_args=MGDA_STATIC, no_conflict=True),
  Case("mgda-l2", mtjax.mgda, _mgda("l2"), False, static_args=MGDA_STATIC),
  Case("mgda-loss", mtjax.mgda, _mgda("loss"), True, static_args=MGDA_STATIC),
  Case("mgda-loss+", mtjax.mgda, _mgda("loss+"), True, static_args=MGDA_STATIC),
  Case(
    "mgda-l2-normalized",
    mtjax.mgda,
    _mgda("l2", "normalized"),
    False,
    static_args=MGDA_STATIC,
    degree=0,
    no_conflict=True,
  ),
  # d = sum_i w_i g_i / (L_i |g_i|) has norm ~1/L: a larger step on the toy problem.
  Case(
    "mgda-loss+-normalized",
    mtjax.mgda,
    _mgda("loss+", "normalized"),
    True,
    static_args=MGDA_STATIC,
    degree=0,
    no_conflict=True,
    toy_lr=1.0,
  ),
  Case(
    "pareto_ltr",
    mtjax.pareto_ltr,
    lambda t: dict(lower_bounds=np.zeros(t)),
    False,
    per_task=("lower_bounds",),
    no_conflict=True,
  ),
  Case(
    "pareto_ltr-bounds",
    mtjax.pareto_ltr,
    lambda t: dict(lower_bounds=lower_bounds(t)),
    False,
    per_task=("lower_bounds",),
  ),
  Case(
    "gradnorm",
    mtjax.gradnorm,
    lambda t: dict(num_tasks=t, alpha=1.5, learning_rate=0.025),
    True,
    static_args=GRADNORM_STATIC,
  ),
  Case(
    "gradnorm-all",
    mtjax.gradnorm,
    lambda t: dict(num_tasks=t, alpha=1.0, learning_rate=0.05, layer="all"),
    True,
    static_args=GRADNORM_STATIC,
  ),
  Case(
    "dwa",
    mtjax.dwa,
    lambda t: dict(num_tasks=t, temperature=2.0, steps_per_epoch=2),
    True,
    static_args=DWA_STATIC,
    task_specific="weighted",
  ),
  Case(
    "dwa-step",
    mtjax.dwa,
    lambda t: dict(num_tasks=t, temperature=2.0, mode="step"),
    True,
    static_args=DWA_STATIC,
    task_specific="weighted",
  ),
  Case(
    "dwa-window",
    mtjax.dwa,
    lambda t: dict(num_tasks=t, temperature=1.0, mode="window", window=2),
    True,
    static_args=DWA_STATIC,
    task_specific="weighted",
  ),
  Case(
    "uncertainty", mtjax.uncertainty, lambda t: dict(num_tasks=t, learning_rate=1e-3), True, task_specific="weighted"
  ),
  Case(
    "uncertainty-init",
    mtjax.uncertainty,
    lambda t: dict(num_tasks=t, init_log_var=-0.5, learning_rate=1e-3),
    True,
    task_specific="weighted",
  ),
  # Beyond the required set.
  Case("cagrad", mtjax.cagrad, lambda t: dict(num_tasks=t, c=0.4), False, static_args=SOLVER_STATIC),
  # c >= 1: the ball contains 0, so the direction conflicts with no task.
  Case(
    "cagrad-c1.5-rescale",
    mtjax.cagrad,
    lambda t: dict(num_tasks=t, c=1.5, rescale="1/(1+c^2)"),
    False,
    static_args=SOLVER_STATIC,
    no_conflict=True,
  ),
  Case("imtl", mtjax.imtl, lambda t: dict(num_tasks=t), False),
  Case("aligned_mtl", mtjax.aligned_mtl, lambda t: dict(num_tasks=t), False),
  Case("upgrad", mtjax.upgrad, lambda t: dict(num_tasks=t), False, static_args=SOLVER_STATIC),
  Case(
    "upgrad-exact",
    mtjax.upgrad,
    lambda t: dict(num_tasks=t, regularization=0.0),
    False,
    static_args=SOLVER_STATIC,
    no_conflict=True,
  ),
  Case("dualproj", mtjax.dualproj, lambda t: dict(num_tasks=t), False, static_args=SOLVER_STATIC),
  Case(
    "dualproj-exact",
    mtjax.dualproj,
    lambda t: dict(num_tasks=t, regularization=0.0),
    False,
    static_args=SOLVER_STATIC,
    no_conflict=True,
  ),
  Case("config", mtjax.config, lambda t: dict(num_tasks=t), False),
  # ||d||^2 = T whatever the scale (degree 0): a decaying step on the toy problem.
  Case(
    "fairgrad",
    mtjax.fairgrad,
    lambda t: dict(num_tasks=t, alpha=1.0),
    False,
    static_args=SOLVER_STATIC,
    degree=0,
    toy_lr=decaying_lr(0.3, 4.0),
  ),
  Case(
    "fairgrad-alpha0.5",
    mtjax.fairgrad,
    lambda t: dict(num_tasks=t, alpha=0.5),
    False,
    static_args=SOLVER_STATIC,
    degree=1 / 3,
    toy_lr=decaying_lr(0.3, 4.0),
  ),
  Case(
    "nash_mtl",
    mtjax.nash_mtl,
    lambda t: dict(num_tasks=t),
    False,
    static_args=SOLVER_STATIC,
    degree=0,
    toy_lr=decaying_lr(0.3, 4.0),
  ),
  Case("rlw", mtjax.rlw, lambda t: dict(key=0, num_tasks=t), False, deterministic=False, task_specific="weighted"),
  # Unbiased for the summed gradient but noisy at the Pareto set: a decaying step, as for SGD.
  Case(
    "graddrop",
    mtjax.graddrop,
    lambda t: dict(key=0, num_tasks=t),
    False,
    deterministic=False,
    toy_lr=decaying_lr(0.3, 4.0),
  ),
  # Methods of 2022-2026.
  # FAMO: the table's update passes only task_losses, so its rows use the next-batch form; the paper's
  # default form needs previous_task_losses_after_step= (one extra forward) and is checked in test_famo.py.
  Case("famo", mtjax.famo, lambda t: dict(num_tasks=t, post_step_losses="next_batch"), True, task_specific="weighted"),
  Case(
    "famo-adam",
    mtjax.famo,
    lambda t: dict(num_tasks=t, post_step_losses="next_batch", logit_update="adam", gamma=0.01),
    True,
    task_specific="weighted",
  ),
  Case(
    "stch",
    mtjax.stch,
    lambda t: dict(num_tasks=t, mu=1.0),
    True,
    static_args=("num_tasks", "warmup_steps", "nadir_steps"),
    task_specific="weighted",
  ),
  Case(
    "stch-log_nadir",
    mtjax.stch,
    lambda t: dict(num_tasks=t, mu=0.5, normalization="log_nadir", warmup_steps=2, warmup_weighting="log"),
    True,
    static_args=("num_tasks", "warmup_steps", "nadir_steps"),
    task_specific="weighted",
  ),
  Case("gls", mtjax.gls, lambda t: dict(num_tasks=t), True, task_specific="weighted"),
  Case("scale_invariant", mtjax.scale_invariant, lambda t: dict(num_tasks=t), True, task_specific="weighted"),
  Case(
    "imtl-loss",
    mtjax.imtl,
    lambda t: dict(num_tasks=t, mode="loss", learning_rate=1e-2),
    True,
    task_specific="weighted",
  ),
  Case(
    "imtl-hybrid",
    mtjax.imtl,
    lambda t: dict(num_tasks=t, mode="hybrid", learning_rate=1e-2),
    True,
    task_specific="weighted",
  ),
  # DB-MTL: the task-specific leaves get sum_i g_i / (L_i + eps), and `weights` records 1 / (L_i + eps).
  Case("db_mtl", mtjax.db_mtl, lambda t: dict(num_tasks=t), True, task_specific="weighted"),
  Case(
    "db_mtl-sigma",
    mtjax.db_mtl,
    lambda t: dict(num_tasks=t, beta=0.5, beta_sigma=0.5, eps=0.0),
    True,
    task_specific="weighted",
  ),
  # Task 0 is the target: no permutation equivariance (deterministic=False skips that check only).
  Case(
    "metabalance",
    mtjax.metabalance,
    lambda t: dict(num_tasks=t),
    False,
    static_args=("num_tasks", "target"),
    deterministic=False,
    toy_blocks=((0, 1), (2,), (3,)),
  ),
  Case(
    "metabalance-down-model",
    mtjax.metabalance,
    lambda t: dict(num_tasks=t, strategy="down", granularity="model", relax_factor=0.5),
    False,
    static_args=("num_tasks", "target"),
    deterministic=False,
  ),
  Case(
    "excess_mtl",
    mtjax.excess_mtl,
    lambda t: dict(num_tasks=t),
    False,
    static_args=("num_tasks", "warmup_steps"),
    task_specific="weighted",
  ),
  Case(
    "excess_mtl-code",
    mtjax.excess_mtl,
    lambda t: dict(num_tasks=t, weight_sum="num_tasks", step_size=0.1, warmup_steps=2, task_specific="sum"),
    False,
    static_args=("num_tasks", "warmup_steps"),
  ),
  # UPGrad on unit-norm task gradients: the update does not scale with the gradients (degree 0).
  Case(
    "normalize-upgrad",
    lambda num_tasks, normalization="l2", shared=None: mtjax.normalize(
      mtjax.upgrad(num_tasks=num_tasks, shared=shared), normalization, shared=shared
    ),
    lambda t: dict(num_tasks=t),
    False,
    degree=0,
  ),
  # MoCo's paper default tracks the raw gradients and steps lambda by gamma_k (Y Y^T + rho I) lambda, which is not
  # homogeneous in the gradients' scale (no `degree` holds: tiny gradients leave lambda uniform, huge ones push it
  # to a vertex): degree=None. LibMTL's loss-normalized variant is homogeneous of degree 0.
  Case("moco", mtjax.moco, lambda t: dict(num_tasks=t), False, degree=None),
  Case("moco-loss", mtjax.moco, lambda t: dict(num_tasks=t, normalization="loss"), True, degree=0),
  Case(
    "moco-loss-softmax",
    mtjax.moco,
    lambda t: dict(num_tasks=t, normalization="loss", simplex="softmax"),
    True,
    degree=0,
  ),
  # One task's gradient per step (round robin): deterministic, but not permutation equivariant (the order of the
  # tasks is the order of the round robin), hence deterministic=False.
  Case(
    "m_config",
    mtjax.m_config,
    lambda t: dict(num_tasks=t),
    False,
    deterministic=False,
    static_args=("num_tasks", "all_tasks", "adaptive", "wait_for_all"),
  ),
  Case(
    "m_config-random",
    mtjax.m_config,
    lambda t: dict(num_tasks=t, selection="random", key=0),
    False,
    deterministic=False,
    static_args=("num_tasks", "all_tasks", "adaptive", "wait_for_all"),
  ),
  Case(
    "m_config-all",
    mtjax.m_config,
    lambda t: dict(num_tasks=t, all_tasks=True),
    False,
    static_args=("num_tasks", "all_tasks", "adaptive", "wait_for_all"),
  ),
  # SDMGrad's one-batch variant (the authors' code) takes [T, ...] gradients; MoDo and SDMGrad's default
  # take [M, T, ...] micro-batch gradients: their table checks are in test_modo.py / test_sdmgrad.py.
  Case(
    "sdmgrad-1batch",
    mtjax.sdmgrad,
    lambda t: dict(num_tasks=t, num_batches=1),
    False,
    static_args=("num_tasks", "num_batches", "num_inner_steps", "normalize"),
  ),
]
CASE_BY_NAME = {c.name: c for c in CASES}
assert len(CASE_BY_NAME) == len(CASES)

ALL = pytest.mark.parametrize("name", [c.name for c in CASES])
DEFAULT_CASES = (
  "linear",
  "pcgrad",
  "gradvac",
  "mgda",
  "pareto_ltr",
  "gradnorm",
  "dwa",
  "uncertainty",
  "cagrad",
  "imtl",
  "aligned_mtl",
  "upgrad",
  "dualproj",
  "config",
  "fairgrad",
  "nash_mtl",
  "rlw",
  "graddrop",
  # methods of 2022-2026
  "famo",
  "stch",
  "gls",
  "scale_invariant",
  "db_mtl",
  "metabalance",
  "excess_mtl",
  "normalize-upgrad",
  "moco",
  "m_config",
  "sdmgrad-1batch",
)
# The compile-heavy contract tests: each method's default case in CI, its option variants in the extended
# tier (the cheap contract tests below run every case everywhere).
DEFAULTS_IN_CI = pytest.mark.parametrize(
  "name",
  [
    c.name if c.name in DEFAULT_CASES else pytest.param(c.name, marks=[pytest.mark.slow, pytest.mark.extended])
    for c in CASES
  ],
)


def _cases(pred):
  return pytest.mark.parametrize("name", [c.name for c in CASES if pred(c)])


# ----------------------------------------------------------------------------- data helpers


def random_task_grads(rng, num_tasks, dtype=np.float32, scale=1.0):
  return _map_shapes(lambda s: (scale * rng.normal(size=(num_tasks,) + s)).astype(dtype))


def random_params(rng, dtype=np.float32):
  return _map_shapes(lambda s: rng.normal(size=s).astype(dtype))


def random_losses(rng, num_tasks, dtype=np.float32):
  return rng.uniform(0.5, 2.0, size=num_tasks).astype(dtype)


def shared_flags(tree):
  """One bool per leaf (flattening order): is the leaf shared under ``SHARED``?"""
  return jax.tree.leaves(SHARED(tree))


def flat_rows(task_tree, num_tasks, only_shared=False):
  """``[T, P]`` float64 matrix of the (shared) leaves of a task-gradient tree."""
  leaves = jax.tree.leaves(task_tree)
  flags = shared_flags(jax.tree.map(lambda g: g[0], task_tree)) if only_shared else [True] * len(leaves)
  return np.concatenate([np.asarray(l, np.float64).reshape(num_tasks, -1) for l, f in zip(leaves, flags) if f], axis=1)


def flat_vector(tree, only_shared=False):
  leaves = jax.tree.leaves(tree)
  flags = shared_flags(tree) if only_shared else [True] * len(leaves)
  return np.concatenate([np.asarray(l, np.float64).ravel() for l, f in zip(leaves, flags) if f])


def assert_finite_tree(tree, what):
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    arr = np.asarray(leaf)
    if np.issubdtype(arr.dtype, np.inexact):
      assert np.all(np.isfinite(arr)), f"{what}: non-finite values in {jax.tree_util.keystr(path)}: {arr}"


def assert_trees_close(a, b, rtol, atol, what):
  assert jax.tree.structure(a) == jax.tree.structure(b), what
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(x, np.float64), np.asarray(y, np.float64), rtol=rtol, atol=atol, err_msg=what)


def tree_scale(tree):
  return max(float(np.max(np.abs(np.asarray(l, np.float64)))) for l in jax.tree.leaves(tree))


def losses_arg(case, losses):
  """What the inject bundle passes: methods that do not need losses get ``None``."""
  return losses if case.needs_task_losses else None


# ----------------------------------------------------------------------------- compiled bundles


def tap() -> optax.GradientTransformation:
  """Identity transform that keeps its input in its state: exposes the method's own output
  inside ``optax.chain(method, tap(), optax.adam(...))``."""
  return optax.GradientTransformation(
    lambda params: jax.tree.map(jnp.zeros_like, params), lambda updates, state, params=None: (updates, updates)
  )


class Bundle(NamedTuple):
  tx: Any
  step: Callable  # jitted (task_grads, state, params, task_losses) -> (updates, state)
  traces: list  # one entry per trace of `step`


@functools.cache
def chain_bundle(name: str, dtype: str = "float32") -> Bundle:
  """``optax.chain(method(shared=SHARED), tap(), optax.adam(1e-2))`` at T = NUM_TASKS, jitted once,
  with unknown extra args in every call. ``dtype`` only labels the cache entry (float64 bundles
  are only called under ``jax.enable_x64``)."""
  del dtype
  method = CASE_BY_NAME[name].make(NUM_TASKS, shared=SHARED)
  tx = optax.chain(method, tap(), optax.adam(1e-2))
  traces = []

  def step(task_grads, state, params, task_losses):
    traces.append(1)
    return tx.update(task_grads, state, params, task_losses=task_losses, foo=1, bar="x")

  return Bundle(tx, jax.jit(step, compiler_options=FAST_COMPILE), traces)


@functools.cache
def method_bundle(name: str, num_tasks: int) -> Bundle:
  """The method alone with the default ``shared=None`` (every leaf shared), jitted once."""
  tx = CASE_BY_NAME[name].make(num_tasks)
  traces = []

  def step(task_grads, state, params, task_losses):
    traces.append(1)
    return tx.update(task_grads, state, params, task_losses=task_losses)

  return Bundle(tx, jax.jit(step, compiler_options=FAST_COMPILE), traces)


def injected(name: str, **overrides) -> optax.GradientTransformationExtraArgs:
  case = CASE_BY_NAME[name]
  static = tuple(sorted(set(case.static_args) | {"shared"}))
  kwargs = {**case.options(NUM_TASKS), "shared": SHARED, **overrides}
  return optax.inject_hyperparams(case.factory, static_args=static)(**kwargs)


@functools.cache
def inject_bundle(name: str) -> Bundle:
  """``optax.inject_hyperparams(factory)(...)`` at T = NUM_TASKS with ``shared=SHARED``, jitted once.

  Its update reads every numeric hyperparameter from the state, so a state made by
  ``injected(name, **other_values).init`` runs through the same compiled function."""
  tx = injected(name)
  traces = []

  def step(task_grads, state, params, task_losses):
    traces.append(1)
    return tx.update(task_grads, state, params, task_losses=task_losses)

  return Bundle(tx, jax.jit(step, compiler_options=FAST_COMPILE), traces)


def run(bundle: Bundle, state, params, grads_seq, losses_seq):
  """Runs the steps; returns the per-step (updates, state) pairs."""
  out = []
  for grads, losses in zip(grads_seq, losses_seq):
    updates, state = bundle.step(grads, state, params, losses)
    out.append((updates, state))
  return out


def method_output(chain_state):
  """The method's own update, kept by ``tap()`` in the chain state."""
  return chain_state[1]


def sequence(seed, num_tasks=NUM_TASKS, dtype=np.float32, steps=NUM_STEPS):
  rng = np.random.default_rng(seed)
  params = random_params(rng, dtype)
  grads = [random_task_grads(rng, num_tasks, dtype) for _ in range(steps)]
  losses = [random_losses(rng, num_tasks, dtype) for _ in range(steps)]
  return params, grads, losses


# ----------------------------------------------------------------------------- the table


@DEFAULTS_IN_CI
def test_chains_with_adam_extra_args_and_no_retrace(name):
  bundle = chain_bundle(name)
  params, grads, losses = sequence(0, steps=3)
  state0 = bundle.tx.init(params)
  for step, (updates, state) in enumerate(run(bundle, state0, params, grads, losses)):
    for out in (updates, method_output(state)):
      assert jax.tree.structure(out) == jax.tree.structure(params)
      for u, p in zip(jax.tree.leaves(out), jax.tree.leaves(params)):
        assert u.shape == p.shape and u.dtype == p.dtype, (step, u.shape, u.dtype, p.shape, p.dtype)
    assert_finite_tree((updates, state), f"{name} step {step}")
  # Three calls with new values (and the evolving state): traced exactly once.
  assert len(bundle.traces) == 1, f"{name}: traced {len(bundle.traces)} times"


@DEFAULTS_IN_CI
def test_same_result_under_inject_hyperparams(name):
  case = CASE_BY_NAME[name]
  plain, inject = chain_bundle(name), inject_bundle(name)
  params, grads, losses = sequence(1)
  plain_out = run(plain, plain.tx.init(params), params, grads, losses)
  # No extra args here, and no task_losses for methods that do not need them.
  inject_out = run(inject, inject.tx.init(params), params, grads, [losses_arg(case, l) for l in losses])
  for step, ((_, p_state), (i_updates, i_state)) in enumerate(zip(plain_out, inject_out)):
    scale = tree_scale(i_updates) + 1e-30
    assert_trees_close(method_output(p_state), i_updates, 1e-5, 1e-6 * scale, f"{name} step {step} updates")
    assert_trees_close(p_state[0], i_state.inner_state, 1e-5, 1e-6, f"{name} step {step} state")
  assert len(inject.traces) == 1


@DEFAULTS_IN_CI
def test_float32_and_float64(name):
  params32, grads32, losses32 = sequence(2)
  bundle32 = chain_bundle(name, "float32")
  out32 = run(bundle32, bundle32.tx.init(params32), params32, grads32, losses32)
  with jax.enable_x64(True):
    cast = lambda tree: jax.tree.map(lambda x: np.asarray(x, np.float64), tree)
    params64 = cast(params32)
    bundle64 = chain_bundle(name, "float64")
    out64 = run(bundle64, bundle64.tx.init(params64), params64, [cast(g) for g in grads32], [cast(l) for l in losses32])
    for step, ((u32, s32), (u64, s64)) in enumerate(zip(out32, out64)):
      for out in (u64, method_output(s64)):
        assert all(leaf.dtype == jnp.float64 for leaf in jax.tree.leaves(out)), f"{name}: dtype not kept"
      assert_finite_tree((u64, s64), f"{name} float64 step {step}")
      m32, m64 = method_output(s32), method_output(s64)
      assert_trees_close(m32, m64, 1e-3, 1e-5 * tree_scale(m64), f"{name} step {step}: float32 vs float64")
      assert_trees_close(u32, u64, 1e-3, 1e-6, f"{name} step {step}: adam updates float32 vs float64")
      w32, w64 = np.asarray(s32[0].weights), np.asarray(s64[0].weights)
      np.testing.assert_allclose(w32, w64, rtol=1e-3, atol=1e-5 * (np.max(np.abs(w64)) + 1e-30))


EDGE_SCALES = (1e-10, 1e3, 1e10)


def _edge_grads(kind, rng):
  base = random_task_grads(rng, NUM_TASKS)
  if kind == "zero":
    return jax.tree.map(np.zeros_like, base)
  if kind == "identical":
    return jax.tree.map(lambda g: np.repeat(g[:1], NUM_TASKS, axis=0), base)
  if kind == "opposite":
    signs = np.array([1.0, -1.0, 1.0], np.float32)
    return jax.tree.map(lambda g: (signs.reshape((-1,) + (1,) * (g.ndim - 1)) * g[:1]).astype(g.dtype), base)
  if kind == "one_zero":
    return jax.tree.map(lambda g: g * np.array([1.0, 0.0, 1.0], np.float32).reshape((-1,) + (1,) * (g.ndim - 1)), base)
  if kind == "mixed_scales":
    s = np.array([1e10, 1.0, 1e-10], np.float32)
    return jax.tree.map(lambda g: (g * s.reshape((-1,) + (1,) * (g.ndim - 1))).astype(np.float32), base)
  raise ValueError(kind)


@ALL
def test_edge_case_gradients(name):
  case = CASE_BY_NAME[name]
  bundle = chain_bundle(name)
  rng = np.random.default_rng(3)
  params = random_params(rng)
  losses = random_losses(rng, NUM_TASKS)
  init = bundle.tx.init(params)

  def first_step(grads):
    updates, state = bundle.step(grads, init, params, losses)
    return updates, state, method_output(state)

  for kind in ("zero", "identical", "opposite", "one_zero", "mixed_scales"):
    grads = _edge_grads(kind, rng)
    updates, state, d = first_step(grads)
    assert_finite_tree((updates, state), f"{name}: {kind} gradients")
    if kind == "zero":
      for leaf in jax.tree.leaves(d):
        np.testing.assert_array_equal(leaf, 0.0)
    if kind == "identical":  # every shared leaf gets the same positive multiple of the common gradient
      g = flat_vector(jax.tree.map(lambda x: x[0], grads), only_shared=True)
      u = flat_vector(d, only_shared=True)
      alpha = float(u @ g / (g @ g))
      assert alpha > 0, f"{name}: identical gradients give a non-descent direction ({alpha})"
      np.testing.assert_allclose(u, alpha * g, rtol=1e-4, atol=1e-5 * np.max(np.abs(u)))

  # Tiny and huge: finite, and the update scales as s^degree (shared) or s (task-specific sum).
  grads = random_task_grads(rng, NUM_TASKS)
  _, _, d1 = first_step(grads)
  flags = shared_flags(params)
  for s in EDGE_SCALES:
    updates, state, d = first_step(jax.tree.map(lambda g: (g * s).astype(np.float32), grads))
    assert_finite_tree((updates, state), f"{name}: gradients scaled by {s:g}")
    for leaf, ref, shared in zip(jax.tree.leaves(d), jax.tree.leaves(d1), flags):
      if shared and case.degree is None:
        continue
      k = case.degree if shared else 1
      ref = np.asarray(ref, np.float64)
      np.testing.assert_allclose(
        np.asarray(leaf, np.float64) / s**k, ref, rtol=1e-4, atol=1e-5 * tree_scale(d1), err_msg=f"{name}: scale {s:g}"
      )
  assert len(bundle.traces) == 1


@DEFAULTS_IN_CI
@pytest.mark.parametrize("num_tasks", [1, 8])
def test_one_and_many_tasks(name, num_tasks):
  case = CASE_BY_NAME[name]
  bundle = method_bundle(name, num_tasks)
  params, grads, losses = sequence(4, num_tasks=num_tasks, steps=3)
  out = run(bundle, bundle.tx.init(params), params, grads, losses)
  for step, (updates, state) in enumerate(out):
    assert_finite_tree((updates, state), f"{name} T={num_tasks} step {step}")
    for u, p in zip(jax.tree.leaves(updates), jax.tree.leaves(params)):
      assert u.shape == p.shape and u.dtype == p.dtype
    assert np.shape(state.weights)[-1] == num_tasks
  g0 = flat_rows(grads[0], num_tasks)
  d0 = flat_vector(out[0][0])
  if num_tasks == 1:  # a positive multiple of the only gradient
    alpha = float(d0 @ g0[0] / (g0[0] @ g0[0]))
    assert alpha > 0
    np.testing.assert_allclose(d0, alpha * g0[0], rtol=1e-5, atol=1e-6 * np.max(np.abs(d0)))
  elif case.no_conflict:
    scale = np.max(np.sum(g0**2, axis=1))
    assert np.all(g0 @ d0 >= -1e-4 * scale), (name, g0 @ d0)
  assert len(bundle.traces) == 1


# The toy problem: L_i(x) = 0.5 |x - m_i|^2 + 0.5 on x = (Dense_0/kernel, Dense_0/bias, Dense_1/kernel).
TOY_SHAPES = {"Dense_0": {"kernel": (2,), "bias": (1,)}, "Dense_1": {"kernel": (1,)}}
TOY_MINIMA = np.array([[1.0, -1.0, 0.5, 1.0], [-1.0, 1.0, -0.5, 0.0]])
TOY_START = np.array([3.0, 3.0, 2.0, 3.0])


def toy_vector(params):
  return jnp.concatenate([params["Dense_0"]["kernel"], params["Dense_0"]["bias"], params["Dense_1"]["kernel"]])


def toy_params(x):
  x = jnp.asarray(x, jnp.float32)
  return {"Dense_0": {"kernel": x[:2], "bias": x[2:3]}, "Dense_1": {"kernel": x[3:]}}


def toy_losses(params):
  x = toy_vector(params)
  return 0.5 * jnp.sum(jnp.square(x[None, :] - TOY_MINIMA.astype(np.float32)), axis=1) + 0.5


def toy_losses_np(x):
  return 0.5 * np.sum((np.asarray(x, np.float64)[None, :] - TOY_MINIMA) ** 2, axis=1) + 0.5


def distance_to_segment(x, block=(0, 1, 2, 3)):
  """Distance of ``x[block]`` to the segment between the minima restricted to ``block``."""
  x, (a, b) = x[list(block)], TOY_MINIMA[:, list(block)]
  lam = np.clip((x - a) @ (b - a) / ((b - a) @ (b - a)), 0.0, 1.0)
  return float(np.linalg.norm(x - (a + lam * (b - a))))


@DEFAULTS_IN_CI
def test_convergence_with_sgd_in_scan(name):
  case = CASE_BY_NAME[name]
  tx = optax.chain(case.make(2), optax.sgd(case.toy_lr))
  params0 = toy_params(TOY_START)
  state0 = tx.init(params0)

  @functools.partial(jax.jit, compiler_options=FAST_COMPILE)
  def train(params, state):
    def body(carry, _):
      params, state = carry
      losses, grads = toy_losses(params), jax.jacrev(toy_losses)(params)
      updates, state = tx.update(grads, state, params, task_losses=losses)
      return (optax.apply_updates(params, updates), state), losses

    return jax.lax.scan(body, (params, state), None, length=200)

  (params, state), history = train(params0, state0)
  assert jax.tree.structure(state) == jax.tree.structure(state0)
  for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(state0)):
    assert a.shape == b.shape and a.dtype == b.dtype
  assert_finite_tree((params, state, history), name)
  x = np.asarray(toy_vector(params), np.float64)
  start, final = toy_losses_np(TOY_START), toy_losses_np(x)
  assert np.all(final < start), (name, start, final)
  assert final.sum() < 0.25 * start.sum(), (name, start, final)
  # Pareto-stationary points of two isotropic quadratics: the segment between the minima (per block
  # for methods that work on parameter groups separately).
  for block in case.toy_blocks:
    assert distance_to_segment(x, block) < 0.05, (name, x, block, distance_to_segment(x, block))


@ALL
def test_bad_input_raises_clear_errors(name):
  case = CASE_BY_NAME[name]
  tx = case.make(NUM_TASKS, shared=SHARED)
  params, (grads,), (losses,) = sequence(5, steps=1)
  state = tx.init(params)

  # A leaf without the task axis: leaves disagree on the leading size.
  bad = {**grads, "tower_0": {"kernel": grads["tower_0"]["kernel"][0]}}
  with pytest.raises(ValueError, match=r"mtjax: .*tower_0"):
    tx.update(bad, state, params, task_losses=losses)
  # Every leaf disagreeing with the params (no task axis anywhere).
  no_axis = jax.tree.map(lambda g: g[0], grads)
  with pytest.raises(ValueError, match="mtjax: "):
    tx.update(no_axis, state, params, task_losses=losses)
  # num_tasks mismatch.
  two = jax.tree.map(lambda g: g[:2], grads)
  with pytest.raises(ValueError, match="mtjax: .*num_tasks"):
    tx.update(two, state, params, task_losses=losses[:2])
  # task_losses of the wrong shape.
  with pytest.raises(ValueError, match="mtjax: .*task_losses"):
    tx.update(grads, state, params, task_losses=np.ones(NUM_TASKS + 1, np.float32))
  # Missing task_losses.
  if case.needs_task_losses:
    with pytest.raises(ValueError, match="mtjax: .*task_losses"):
      tx.update(grads, state, params)
  # NaN losses: a ValueError eagerly, the same message from a runtime error under jit.
  nan_losses = losses.copy()
  nan_losses[1] = np.nan
  with pytest.raises(ValueError, match="mtjax: non-finite task losses"):
    tx.update(grads, state, params, task_losses=nan_losses)
  bundle = chain_bundle(name)
  with pytest.raises(Exception, match="mtjax: non-finite task losses") as info:
    jax.block_until_ready(bundle.step(grads, bundle.tx.init(params), params, nan_losses))
  assert isinstance(info.value, (ValueError, jax.errors.JaxRuntimeError)), type(info.value)


@_cases(lambda c: c.factory not in (mtjax.linear, mtjax.dwa, mtjax.uncertainty))
def test_nonfinite_gradients_raise(name):
  # Every method that computes a Gram matrix sees NaN/inf on its diagonal.
  bundle = chain_bundle(name)
  params, (grads,), (losses,) = sequence(6, steps=1)
  bad = jax.tree.map(np.copy, grads)
  bad["bottom"]["Dense_1"]["kernel"][2, 0, 1] = np.inf
  with pytest.raises(Exception, match="mtjax: non-finite task gradients"):
    jax.block_until_ready(bundle.step(bad, bundle.tx.init(params), params, losses))


def test_pareto_ltr_bounds_above_one_raise():
  with pytest.raises(ValueError, match="mtjax: pareto_ltr: lower_bounds sum to more than 1"):
    mtjax.pareto_ltr([0.7, 0.5])
  with pytest.raises(ValueError, match="mtjax: pareto_ltr: lower_bounds must be non-negative"):
    mtjax.pareto_ltr([0.7, -0.1])
  # Traced bounds (injected hyperparameters) are checked on device.
  bundle = inject_bundle("pareto_ltr")
  params, (grads,), _ = sequence(7, steps=1)
  state = bundle.tx.init(params)
  state = state._replace(hyperparams={**state.hyperparams, "lower_bounds": jnp.array([0.5, 0.4, 0.3])})
  with pytest.raises(Exception, match="mtjax: pareto_ltr: lower_bounds sum to more than 1"):
    jax.block_until_ready(bundle.step(grads, state, params, None))


@DEFAULTS_IN_CI
def test_state_contract(name):
  bundle = chain_bundle(name)
  params, grads, losses = sequence(8, steps=2)
  chain_state = bundle.tx.init(params)
  for state in (chain_state[0], bundle.step(grads[0], chain_state, params, losses[0])[1][0]):
    assert isinstance(state, tuple) and hasattr(state, "_fields"), type(state)
    assert type(state).__name__.endswith("State"), type(state).__name__
    assert "weights" in state._fields
    leaves, treedef = jax.tree.flatten(state)
    rebuilt = jax.tree.unflatten(treedef, leaves)
    assert type(rebuilt) is type(state)
    assert_trees_close(rebuilt, state, 0, 0, name)
  # Through a jit boundary and back into the (already compiled) update.
  _, after = bundle.step(grads[0], chain_state, params, losses[0])
  crossed = jax.jit(lambda s: s)(after)
  assert jax.tree.structure(crossed) == jax.tree.structure(after)
  assert_trees_close(crossed, after, 0, 0, name)
  u1, _ = bundle.step(grads[1], crossed, params, losses[1])
  u2, _ = bundle.step(grads[1], after, params, losses[1])
  assert_trees_close(u1, u2, 0, 0, name)
  assert len(bundle.traces) == 1


# ----------------------------------------------------------------------------- properties


@_cases(lambda c: c.no_conflict)
def test_direction_does_not_conflict_with_any_task(name):
  bundle = chain_bundle(name)
  rng = np.random.default_rng(9)
  params = random_params(rng)
  for trial in range(6):
    grads = random_task_grads(rng, NUM_TASKS)
    if trial % 2:  # a strongly conflicting pair
      grads = jax.tree.map(lambda g: np.stack([g[0], -0.5 * g[0] + 0.3 * g[1], g[2]]), grads)
    losses = random_losses(rng, NUM_TASKS)
    _, state = bundle.step(grads, bundle.tx.init(params), params, losses)
    jac = flat_rows(grads, NUM_TASKS, only_shared=True)
    d = flat_vector(method_output(state), only_shared=True)
    gnorm = np.sqrt(np.max(np.sum(jac**2, axis=1)))
    assert np.all(jac @ d >= -1e-4 * gnorm * max(np.linalg.norm(d), gnorm)), (name, trial, jac @ d)
    assert np.linalg.norm(d) > 0


@pytest.mark.parametrize("name", ["pcgrad", "pcgrad-mean"])
def test_pcgrad_without_conflict_is_the_plain_sum(name):
  bundle = chain_bundle(name)
  rng = np.random.default_rng(10)
  params = random_params(rng)
  for _ in range(3):
    grads = jax.tree.map(np.abs, random_task_grads(rng, NUM_TASKS))  # all pairwise products > 0
    _, state = bundle.step(grads, bundle.tx.init(params), params, random_losses(rng, NUM_TASKS))
    divisor = NUM_TASKS if name == "pcgrad-mean" else 1
    for leaf, g, shared in zip(jax.tree.leaves(method_output(state)), jax.tree.leaves(grads), shared_flags(params)):
      expected = np.sum(np.asarray(g, np.float64), axis=0) / (divisor if shared else 1)
      np.testing.assert_allclose(leaf, expected, rtol=1e-5, atol=1e-6)


@_cases(lambda c: c.deterministic)
def test_permutation_equivariance(name):
  case = CASE_BY_NAME[name]
  bundle = inject_bundle(name)
  params, grads, losses = sequence(11)
  perm = np.array([2, 0, 1])
  options = case.options(NUM_TASKS)
  state = bundle.tx.init(params)
  state_p = injected(name, **{k: np.asarray(options[k])[perm] for k in case.per_task}).init(params)
  for step in range(NUM_STEPS):
    g_p = jax.tree.map(lambda g: g[perm], grads[step])
    updates, state = bundle.step(grads[step], state, params, losses_arg(case, losses[step]))
    updates_p, state_p = bundle.step(g_p, state_p, params, losses_arg(case, losses[step][perm]))
    scale = tree_scale(updates)
    assert_trees_close(updates_p, updates, 1e-4, 1e-5 * scale, f"{name} step {step}")
    w, w_p = np.asarray(state.inner_state.weights), np.asarray(state_p.inner_state.weights)
    np.testing.assert_allclose(w_p, w[..., perm], rtol=1e-4, atol=1e-6, err_msg=f"{name} step {step}")
  assert len(bundle.traces) == 1


@ALL
def test_shared_mask_semantics(name):
  case = CASE_BY_NAME[name]
  bundle = chain_bundle(name)
  params, (grads,), (losses,) = sequence(12, steps=1)
  _, state = bundle.step(grads, bundle.tx.init(params), params, losses)
  d = method_output(state)
  weights = np.asarray(state[0].weights, np.float64)
  for name_ in ("tower_0", "tower_1"):
    g = np.asarray(grads[name_]["kernel"], np.float64)
    if case.task_specific == "sum":  # exactly the plain sum of the task gradients
      expected = np.sum(g, axis=0)
    else:  # the weighted sum with the weights this step used (recorded in the state)
      expected = sum(weights[t] * g[t] for t in range(NUM_TASKS))
    np.testing.assert_allclose(d[name_]["kernel"], expected, rtol=1e-6, atol=1e-6)
  # The weights come from the shared leaves only: changing the towers' gradients changes nothing else.
  other = {
    **grads,
    "tower_0": {"kernel": 100.0 * grads["tower_1"]["kernel"]},
    "tower_1": {"kernel": -grads["tower_0"]["kernel"]},
  }
  _, state_o = bundle.step(other, bundle.tx.init(params), params, losses)
  np.testing.assert_array_equal(flat_vector(method_output(state_o), only_shared=True), flat_vector(d, only_shared=True))
  assert len(bundle.traces) == 1
