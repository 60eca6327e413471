"""The large seeded fuzz of every method (issue #11): per-method figures over thousands of matrices.

Run it as a script (it is not collected by pytest; ``test_fuzz_report.py`` runs a small slice of it
in the slow tier)::

    python tests/fuzz/fuzz_report.py --per-method 10000          # ~10 min on 2 CPU cores
    python tests/fuzz/fuzz_report.py --per-method 500 --cases mgda upgrad

For every case (each method as ``mtjax.experiment`` builds it, plus PE-LTR's exact solver with
``c = 0`` and CAGrad with ``c = 1.5``) it compiles one update per shape ``(T, P)`` and dtype
(``T`` in 1, 2, 3, 5, 8, 16 with ``P = 8``, so ``T > P`` is covered; float32 and float64) and feeds it
``--per-method`` task-gradient matrices, split evenly over the shapes, dtypes and input families
(random, rank-deficient, ``T > P`` in effect, opposite, zero rows, Pareto-stationary, per-task scales
1e-12..1e12, huge and tiny entries whose Gram overflows / underflows the dtype, all-zero, and
random gradients with losses spread over 1e-30..1e30). Each matrix is applied for two consecutive
updates (the second from the first one's state, so stateful methods run past their first step),
every call in a daemon thread with a time limit.

Per update it checks, in float64 from the output:

* **hang**: no call (compilation included) takes longer than ``TIMEOUT_S``;
* **error**: an exception must be a clear ``mtjax:`` message (counted by message), and the random
  family with ordinary losses must raise none;
* **silent NaN/inf**: a non-finite update without an error is a violation;
* shape and dtype preserved; **zero in -> zero out**;
* **non-conflict / optimality certificates** where the method guarantees them: MGDA and PE-LTR
  exact (``c = 0``) satisfy ``g_t . d >= ||d||^2 - tol max_i ||g_i||^2`` (the Frank-Wolfe duality
  gap, which bounds the distance to the float64 optimum of the min-norm problem); UPGrad / DualProj
  ``g_t . d >= -eps tr(G) w_t`` (the KKT conditions of their regularized QP); CAGrad with ``c >= 1``
  ``J d >= 0`` and with ``c = 0.4`` the optimality of its dual weights (every task in their support
  attains ``min_t g_t . d``); Nash-MTL ``w_i (G w)_i = 1`` and FairGrad ``(G w)_i = w_i^(-1/alpha)`` on the
  float64 Gram (relative residual, when the state reports a solve);
* **permutation equivariance** (deterministic methods, first step, random and scaled families):
  permuting the tasks (rows and losses) leaves ``d`` unchanged;
* **scale equivariance** on the huge and tiny families: ``d(J) = s^k d(J / s)`` for an exact power
  of two ``s`` (methods in ``HOMOGENEITY``).

Every bound has a rounding allowance of ``ROUND * eps * tr(G) * sum_i |w_i|`` of the dtype.
"""

from __future__ import annotations

import argparse
import inspect
import itertools
import queue
import threading
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import mtjax
from mtjax.experiment._registry import METHODS

TIMEOUT_S = 30.0
ROUND = 64.0
P = 8
SHAPES = (1, 2, 3, 5, 8, 16)
DTYPES = ("float32", "float64")
FAMILIES = (
  "random",
  "rank_deficient",
  "t_gt_p",
  "opposite",
  "zero_rows",
  "stationary",
  "scaled",
  "huge",
  "tiny",
  "zero",
  "extreme_losses",
)
COMPILER_OPTIONS = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
RANDOMIZED = ("pcgrad", "gradvac", "rlw", "graddrop")  # no permutation equivariance (random orders/weights)
# No permutation equivariance by design: M-ConFIG reads task k = step mod T first; MetaBalance rescales every
# task relative to the target task 0.
ORDER_DEPENDENT = ("m_config", "metabalance")
# d(s J) = s^k d(J) for a uniform scale s > 0 (first step).
HOMOGENEITY = {
  "aligned_mtl": 1,
  "cagrad": 1,
  "cagrad-c1.5": 1,
  "config": 1,
  "dualproj": 1,
  "dwa": 1,
  "graddrop": 1,
  "gradvac": 1,
  "imtl": 1,
  "linear": 1,
  "mgda": 1,
  "nash_mtl": 0,
  "pareto_ltr": 1,
  "pareto_ltr-exact": 1,
  "pcgrad": 1,
  "rlw": 1,
  "uncertainty": 1,
  "upgrad": 1,
}
FAIRGRAD_ALPHA = 1.0
CAGRAD_C = 0.4  # the "cagrad" case: mtjax.experiment's default c
SOLVER_BASED = ("mgda", "upgrad", "dualproj", "cagrad", "pareto_ltr", "nash_mtl", "fairgrad")


def _base(case: str) -> str:
  return case.split("-")[0]


def make(case: str, t: int):
  """The transform of ``case`` for ``t`` tasks (as ``mtjax.experiment`` builds the method)."""
  factory = METHODS[_base(case)]
  kwargs: dict[str, Any] = {}
  params_of = inspect.signature(factory).parameters
  if "num_tasks" in params_of:
    kwargs["num_tasks"] = t
  if "steps_per_epoch" in params_of:
    kwargs["steps_per_epoch"] = 1
  if "key" in params_of:
    kwargs["key"] = 0
  if case == "pareto_ltr":
    kwargs["lower_bounds"] = [0.5 / t] * t  # as mtjax.experiment's build_tx
  elif case == "pareto_ltr-exact":
    kwargs.update(lower_bounds=[0.0] * t, solver="exact")
  elif case == "cagrad-c1.5":
    kwargs["c"] = 1.5
  elif case == "fairgrad":
    kwargs["alpha"] = FAIRGRAD_ALPHA
  elif case == "sdmgrad":
    kwargs["num_batches"] = 1  # its one-batch form (the authors' code): the fuzz feeds one batch's [T, P] rows
  return factory(**kwargs)


# Every registered method that takes one batch's task gradients. Auto-Lambda (a meta loss on a validation batch,
# which the fuzz inputs do not define) has the same edge-gradient checks in tests/transforms/test_auto_lambda.py;
# MoDo takes only micro-batch gradients [M, T, ...] (M = 2 or 3), its edge-gradient checks are in
# tests/transforms/test_modo.py (micro_batch_checks.check_edge_gradients). SDMGrad is fuzzed in its one-batch form.
MICRO_BATCH_ONLY = ("modo",)
METHOD_CASES = tuple(
  sorted(
    m for m in METHODS if "meta_loss_fn" not in inspect.signature(METHODS[m]).parameters and m not in MICRO_BATCH_ONLY
  )
)
ALL_CASES = METHOD_CASES + ("pareto_ltr-exact", "cagrad-c1.5")


def family(rng: np.random.Generator, name: str, t: int, p: int, dtype: str) -> tuple[np.ndarray, np.ndarray]:
  """``(jac [t, p], losses [t])`` of one input family, in ``dtype``."""
  big = 1e20 if dtype == "float32" else 1e155
  small = 1e-20 if dtype == "float32" else 1e-160
  j = rng.normal(size=(t, p))
  losses = rng.uniform(0.1, 2.0, size=t)
  if name == "zero":
    j = np.zeros((t, p))
  elif name == "rank_deficient":
    j = np.outer(rng.normal(size=t), rng.normal(size=p))
  elif name == "t_gt_p":
    j[:, min(2, p) :] = 0.0
  elif name == "opposite" and t >= 2:
    j[1] = -j[0]
  elif name == "zero_rows":
    j[: max(1, t // 2)] = 0.0
  elif name == "stationary" and t >= 2:
    w = rng.dirichlet(np.ones(t))
    j[-1] = -(w[:-1] @ j[:-1]) / w[-1]
  elif name == "scaled":
    j *= 10.0 ** rng.uniform(-12, 12, size=(t, 1))
  elif name == "huge":  # squared norms overflow the dtype; entries (and sums of T of them) do not
    j *= big * 10.0 ** rng.uniform(0, 10)
  elif name == "tiny":  # squared norms underflow the dtype; entries stay normal numbers
    j *= small * 10.0 ** rng.uniform(-10, 0)
  elif name == "extreme_losses":
    losses = 10.0 ** rng.uniform(-30, 30, size=t)
  return j.astype(dtype), losses.astype(dtype)


class _Worker:
  """One daemon thread that runs the calls; a call that does not return within ``TIMEOUT_S`` is a
  hang: the thread is abandoned and a fresh one serves the next call."""

  def __init__(self):
    self.tasks: queue.Queue = queue.Queue()
    self.thread = threading.Thread(target=self._loop, args=(self.tasks,), daemon=True)
    self.thread.start()

  @staticmethod
  def _loop(tasks):
    while True:
      fn, args, x64, box, done = tasks.get()
      try:
        with jax.enable_x64(x64):
          box["value"] = jax.block_until_ready(fn(*args))
      except BaseException as e:  # pylint: disable=broad-except
        box["error"] = e
      done.set()


_WORKER: list = []


def _run(fn, *args):
  """``fn(*args)`` on the worker thread; ``TimeoutError`` after ``TIMEOUT_S``."""
  if not _WORKER:
    _WORKER.append(_Worker())
  box: dict[str, Any] = {}
  done = threading.Event()
  # The x64 context is thread-local: carry it into the worker.
  _WORKER[0].tasks.put((fn, args, bool(jax.config.jax_enable_x64), box, done))
  if not done.wait(TIMEOUT_S):
    _WORKER.clear()  # abandon the stuck thread
    raise TimeoutError
  if "error" in box:
    raise box["error"]
  return box["value"]


def _compile(case: str, t: int, dtype: str):
  tx = make(case, t)
  params = {"w": jnp.zeros((P,), dtype)}
  state = tx.init(params)
  update = jax.jit(lambda g, s, losses: tx.update(g, s, params, task_losses=losses))
  args = ({"w": jnp.zeros((t, P), dtype)}, state, jnp.ones((t,), dtype))
  return update.lower(*args).compile(compiler_options=COMPILER_OPTIONS), state


def _weights(state) -> np.ndarray | None:
  w = getattr(state, "weights", None)
  if w is None or np.size(w) == 0:
    return None
  return np.asarray(w, np.float64).reshape(-1)


def _certificate(case: str, j: np.ndarray, d: np.ndarray, state, dtype: str) -> str | None:
  """The violated guarantee of ``case`` at ``(J, d)``, or ``None``."""
  eps = float(np.finfo(dtype).eps)
  # Every guarantee is homogeneous: check it on J / s, d / s (degree-1 methods) and w * s (Nash-MTL,
  # FairGrad with alpha = 1) for an exact power of two s, so that float64 itself neither overflows
  # (huge) nor underflows (tiny).
  top = float(np.max(np.abs(j)))
  if top == 0.0 or not np.isfinite(top):
    return None
  s = 2.0 ** np.round(np.log2(top))
  j = j / s
  if HOMOGENEITY.get(case) == 1:
    d = d / s
  gram = j @ j.T
  trace = float(np.trace(gram))
  if not np.isfinite(trace) or trace == 0.0:
    return None
  w = _weights(state)
  if w is not None and _base(case) in ("nash_mtl", "fairgrad"):
    w = w * s
  wsum = float(np.abs(w).sum()) if w is not None else 1.0
  allowance = ROUND * eps * trace * max(wsum, 1.0)
  jd = j @ d
  base = _base(case)
  if case in ("mgda", "pareto_ltr-exact"):
    tol = 1e-6 if case == "mgda" else 1e-8
    slack = jd - (d @ d - tol * np.max(np.diag(gram)))
  elif base in ("upgrad", "dualproj"):
    # KKT of the regularized dual-cone QP (ridge eps = 1e-4), up to the solver's tol (1e-7, on the
    # Gram divided by its largest diagonal).
    slack = jd + 1e-4 * trace * w + 1e-7 * trace
  elif case == "cagrad-c1.5":
    slack = jd
  elif case == "cagrad":
    # Optimality of CAGrad's dual (c = 0.4, rescale "none"): the state records a = 1/T + lam w*
    # (lam = c |g0| / |g_w*|), and d = J^T a maximizes min_t g_t . d over the ball iff every task in
    # the support of w* attains that minimum: w* . (J d) - min_t (J d)_t <= tol |d| max_t |g_t|.
    # Not checked where g_w* = 0 is possible (a zero task: CAGrad's special case, tested apart) or
    # where task norms differ by more than 1e6 (the objective is flat to the dtype's resolution).
    norms = np.linalg.norm(j, axis=1)
    g0 = j.mean(axis=0)
    if g0 @ g0 <= 100 * len(norms) * eps * np.mean(norms) ** 2:
      # The average gradient is below the rounding floor of b^T G b (documented: the Gram cannot
      # resolve it, r = 0 and d = g0); d must still lie in the ball |d - g0| <= c |g0|.
      far = np.linalg.norm(d - g0) - CAGRAD_C * np.linalg.norm(g0)
      return None if far <= 1e-3 * np.linalg.norm(g0) else f"d leaves the ball by {far:.2e} where g0 is rounding"
    lam = float(w.sum() - 1.0) if w is not None else 0.0
    if w is None or np.min(norms) <= 1e-6 * np.max(norms) or lam <= 1e-12:
      return None
    dual = (w - 1.0 / len(w)) / lam
    gap = (dual @ jd - np.min(jd)) / max(np.linalg.norm(d) * np.max(norms), 1e-300)
    return None if gap <= 1e-4 else f"dual optimality gap {gap:.2e} > 1e-4 (relative to |d| max|g|)"
  elif base in ("nash_mtl", "fairgrad"):
    status = int(np.asarray(getattr(state, "status", 0)))
    if status != 0 or w is None or np.any(w <= 0):
      return None
    keep = np.diag(gram) > 0
    w = w[keep]
    g = gram[np.ix_(keep, keep)]
    # Rounding allowance of G w for weights stored in the dtype: eps |G| |w| (cancellation in G w).
    spread = ROUND * eps * (np.abs(g) @ np.abs(w))
    if base == "nash_mtl":
      resid = np.abs(w * (g @ w) - 1.0) - w * spread
    else:
      target = w ** (-1.0 / FAIRGRAD_ALPHA)
      resid = (np.abs(g @ w - target) - spread) / target
    # float32 on a rank-deficient Gram (T > P, rank-one, ...): the cosine matrix is singular to
    # float32 (condition ~1e17) and the solve stops at its rounding floor (a few 1e-2).
    singular = np.linalg.matrix_rank(j) < j.shape[0]
    # float64: the solvers stop at a squared Newton decrement of tol = 1e-10, documented as a relative
    # residual of about sqrt(tol) = 1e-5; allow three times that (1.08e-5 was seen on 2 of 2,200 matrices).
    tol = (5e-2 if singular else 1e-3) if dtype == "float32" else 3e-5
    worst = float(np.max(resid)) if resid.size else 0.0
    return None if worst <= tol else f"equation residual {worst:.2e} > {tol:g} beyond rounding"
  else:
    return None
  worst = float(np.min(slack)) / max(allowance, np.finfo(np.float64).tiny)
  return None if worst >= -1.0 else f"guarantee violated by {-worst:.1f} rounding units"


def fuzz_case(case: str, per_method: int, seed: int = 0, shapes=SHAPES, dtypes=DTYPES) -> dict:
  """Runs ``per_method`` matrices through ``case``; returns the figures and the violations."""
  report: dict[str, Any] = {
    "case": case,
    "matrices": 0,
    "updates": 0,
    "hangs": 0,
    "errors": {},
    "silent_nonfinite": 0,
    "violations": [],
    "seconds": 0.0,
  }
  start = time.perf_counter()
  combos = list(itertools.product(dtypes, shapes))
  per_combo = max(1, per_method // len(combos))
  for ci, (dtype, t) in enumerate(combos):
    with jax.enable_x64(dtype == "float64"):
      try:
        update, state0 = _run(_compile, case, t, dtype)
      except TimeoutError:
        report["hangs"] += 1
        report["violations"].append(f"compilation over {TIMEOUT_S} s (T={t}, {dtype})")
        continue
      rng = np.random.default_rng([seed, ALL_CASES.index(case), ci])
      for i in range(per_combo):
        fam = FAMILIES[i % len(FAMILIES)]
        j, losses = family(rng, fam, t, P, dtype)
        report["matrices"] += 1
        _one(report, case, update, state0, j, losses, fam, t, dtype, rng)
  report["seconds"] = time.perf_counter() - start
  return report


def _call(report, update, state, j, losses, where):
  try:
    out = _run(update, {"w": jnp.asarray(j)}, state, jnp.asarray(losses))
  except TimeoutError:
    report["hangs"] += 1
    report["violations"].append(f"hang (> {TIMEOUT_S} s) on {where}")
    return None
  except Exception as e:  # pylint: disable=broad-except
    msg = str(e)
    if "mtjax:" not in msg:
      report["violations"].append(f"unclear error {type(e).__name__} on {where}: {msg[:200]}")
      return None
    key = msg[msg.index("mtjax:") :][:90]
    report["errors"][key] = report["errors"].get(key, 0) + 1
    return "error"
  report["updates"] += 1
  return out


def _one(report, case, update, state0, j, losses, fam, t, dtype, rng):
  where = f"{fam} T={t} {dtype}"
  state = state0
  for step in range(2):
    out = _call(report, update, state, j, losses, f"{where} step={step}")
    if out is None or out == "error":
      if out == "error" and fam == "random":
        report["violations"].append(f"error on ordinary input ({where})")
      return
    updates, state = out
    d = updates["w"]
    if d.shape != (P,) or d.dtype != jnp.dtype(dtype):
      report["violations"].append(f"shape/dtype {d.shape} {d.dtype} on {where}")
    d = np.asarray(d, np.float64)
    if not np.all(np.isfinite(d)):
      report["silent_nonfinite"] += 1
      report["violations"].append(f"silent non-finite update on {where} step={step}")
      return
    if fam == "zero" and np.any(d != 0):
      report["violations"].append(f"zero in, nonzero out on {where}")
    bad = _certificate(case, j.astype(np.float64), d, state, dtype)
    if bad:
      report["violations"].append(f"{bad} on {where} step={step}")
    losses = (losses * rng.uniform(0.5, 1.0, size=t)).astype(dtype)
  tol = 1e-4 if dtype == "float32" else 1e-9
  if _base(case) in SOLVER_BASED:  # d is determined to the solver's tolerance, not to rounding
    tol = 1e-4
  if _base(case) not in RANDOMIZED + ORDER_DEPENDENT and fam in ("random", "scaled") and t > 1:
    perm = rng.permutation(t)
    fixed = np.linspace(0.5, 1.5, t).astype(dtype)
    out = _call(report, update, state0, j[perm], fixed[perm], f"{where} permuted")
    ref = _call(report, update, state0, j, fixed, f"{where} reference")
    if out is not None and out != "error" and ref is not None and ref != "error":
      a = np.asarray(out[0]["w"], np.float64)
      b = np.asarray(ref[0]["w"], np.float64)
      # Relative to |d|, floored at sqrt(tol) max_i |g_i| for the degree-1 methods: their solvers
      # stop at a duality gap relative to the largest task, so with 1e-12..1e12 scales d is only
      # determined to ~sqrt(gap) of the largest gradient.
      # Relative to |d|, floored for the degree-1 solver / spectral methods at 3e-3 max_i |g_i|: the
      # solvers stop at a duality gap relative to the largest task (tol 1e-6), so d is determined to
      # ~sqrt(tol) of it (and d ~ 0 when 0 is in the hull, e.g. T > P); IMTL-G and Aligned-MTL invert
      # Grams whose condition reaches 1e48 on the scaled family.
      floor = 3e-3 * np.max(np.linalg.norm(j.astype(np.float64), axis=1))
      floor = floor if HOMOGENEITY.get(case) == 1 and _base(case) in SOLVER_BASED + ("imtl", "aligned_mtl") else 0.0
      err = np.linalg.norm(a - b)
      if _base(case) == "config":
        # ConFIG solves a linear system in the tasks' cosine matrix C (cond(C) = cond(U)^2 for the
        # unit gradients U), so d is determined to about cond(C) eps of the dtype and a permutation
        # changes the rounding of that solve (seen: 2e-3 |d| at cond(C) = 9e3 in float32).
        unit_rows = j.astype(np.float64) / np.linalg.norm(j.astype(np.float64), axis=1, keepdims=True)
        sv = np.linalg.svd(unit_rows, compute_uv=False)
        sv = sv[sv > sv[0] * max(unit_rows.shape) * np.finfo(np.float64).eps]  # a pseudo-inverse for T > P
        tol = max(tol, 10.0 * (sv[0] / sv[-1]) ** 2 * float(np.finfo(dtype).eps))
      if _base(case) == "cagrad" and fam == "scaled":
        # With per-task scales 1e-12..1e12 CAGrad's objective min_t g_t . d is flat to the dtype's
        # resolution (the tiny tasks' g_t . d ~ 0 for every d in the ball), so d itself is not
        # determined (float64 too); compare the objective it reaches instead.
        jj = j.astype(np.float64)
        top = np.max(np.linalg.norm(jj, axis=1))
        err = abs(np.min(jj @ a) - np.min(jj @ b)) / top
        floor = 1e-4 * top
        if err > floor:
          report["violations"].append(f"permuted tasks change CAGrad's objective on {where} by {err:.2e} max|g|")
        err = 0.0
      if err > 10 * tol * max(np.linalg.norm(b), 1e-300) + floor:
        report["violations"].append(
          f"not permutation equivariant on {where}: |d(PJ) - d(J)| = {err:.2e}, |d(J)| = {np.linalg.norm(b):.2e}"
        )
  if case in HOMOGENEITY and fam in ("huge", "tiny"):
    s = 2.0 ** np.round(np.log2(np.abs(j).max()))
    unit = _call(report, update, state0, (j / s).astype(dtype), losses, f"{where} unit")
    again = _call(report, update, state0, j, losses, f"{where} scaled")
    if unit is not None and unit != "error" and again is not None and again != "error":
      k = HOMOGENEITY[case]
      expected = np.asarray(unit[0]["w"], np.float64)  # in units of s^k (float64 would under/overflow)
      got = np.asarray(again[0]["w"], np.float64) / s**k
      floor = 1e-5 * (np.linalg.norm(j.astype(np.float64) / s) if k == 1 else 1.0)
      err = np.linalg.norm(got - expected) / max(np.linalg.norm(expected), floor)
      if not err <= tol:
        report["violations"].append(f"not scale equivariant on {where}: rel. {err:.2e}")


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--per-method", type=int, default=10000)
  parser.add_argument("--cases", nargs="*", default=list(ALL_CASES))
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args(argv)
  with mtjax.runtime_checks(True):
    reports = [fuzz_case(c, args.per_method, args.seed) for c in args.cases]
  print("| method | matrices | updates | hangs | silent NaN/inf | errors (mtjax:) | violations | s |")
  print("|---|---|---|---|---|---|---|---|")
  total_bad = 0
  for r in reports:
    errors = sum(r["errors"].values())
    total_bad += len(r["violations"]) + r["hangs"]
    print(
      f"| {r['case']} | {r['matrices']} | {r['updates']} | {r['hangs']} | {r['silent_nonfinite']} | "
      f"{errors} | {len(r['violations'])} | {r['seconds']:.0f} |"
    )
  for r in reports:
    for msg, n in sorted(r["errors"].items()):
      print(f"  {r['case']}: {n} x {msg}")
    for v in r["violations"][:10]:
      print(f"  VIOLATION {r['case']}: {v}")
  return 1 if total_bad else 0


if __name__ == "__main__":
  raise SystemExit(main())
