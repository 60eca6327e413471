"""How the gradient methods scale: embedding tables, rows strategies, many tasks, amortized weights.

One table per process (``--table a|b|c|d``); every table is measured against the summed-loss step
(one backward of ``sum_t L_t``, then Adam) timed IN THE SAME RUN. Every timed step is a full
jitted training step with donated buffers: forward, per-task gradients (``mtjax.task_grads``), the
method, Adam, exactly ``optax.chain(method, optax.adam(1e-3))``. All variants of a table share ONE
set of parameters and Adam moments, passed from step to step (each keeps only its own method
state), so the process holds one copy of the model, not one per variant.

* (a) ``--table a``: embedding MMoE (user 2M, item 1M, category 1000 ids, 32-d each: 96.6M
  parameters), 8 experts [256, 128], towers [64, 1], BCE via ``mtjax.losses.make_loss_fn``, batch
  2048, ids uniform over each vocabulary, T = 4 and 8: the summed step; PCGrad / MGDA / UPGrad with
  dense per-task rows of the tables (``task_grads(sparse=False)``, ``[T, V, d]``); the same with
  the default sparse rows (``mtjax.SparseRows``: only the looked-up rows).
* (b) ``--table b``: the MMoE of ``benchmarks/step_time.py`` (input 128, 8 experts [256, 128],
  towers [64, 1], batch 1024), T = 3 and 10: full rows (default strategy), ``"shared"`` (exact
  rows of the experts only), ``"rep"`` (Gram of the expert outputs' gradients, one trunk
  backward), the subset strategy (``deferred=True`` and ``gram_leaves=`` every expert's last
  Dense layer), GradNorm's subsets.
* (c) ``--table c``: the same MMoE at T = 64: PCGrad with full rows, ``chunk_size`` None (the
  default strategy: on CPU ``map``, one row after the other) and 8 (vmapped chunks of 8 rows),
  and ``"shared"`` with both: temporary memory and peak RSS. ``--vmap-unchunked`` adds all 64 rows
  vmapped at once (~9.6 GiB of temporaries at batch 1024: the case ``chunk_size`` is for). One
  step per round (tens of seconds per step on a 2-core CPU).
* (d) ``--table d``: ``mtjax.amortized`` at T = 10 on the same MMoE, with
  ``task_grads(deferred=True)``: PCGrad recomputed every k = 1, 4, 16 steps, MGDA with a weight
  EMA (0.9) every 16 steps; and PCGrad every 16 steps on ``strategy="shared"`` (exact trunk rows on
  refresh steps, one backward on the others). Times are AVERAGES over whole cycles (each round runs
  ``--cycles * 16`` consecutive steps of a variant and divides), the median over rounds.

Columns: ms/step (median after compilation over interleaved rounds: every variant is timed in
every round, so drifts of the machine hit all alike), the ratio to the summed step, the compiled
temporary memory (XLA memory analysis, MiB) and its ratio to the summed step's, the compile
time, and the peak RSS of a separate process that compiles and runs only that variant
(``--rss-rows``; the default for (a) and (c)); the table's own process peak RSS is printed
below it. All rows are compiled without mtjax's in-graph runtime checks
(``mtjax.runtime_checks(False)`` at trace time) except those marked ``+checks``.

Usage (full size; each its own process):
  python benchmarks/scale.py --table a --tasks 4 8 --out scale.json
  python benchmarks/scale.py --table b --tasks 3 10 --out scale.json
  python benchmarks/scale.py --table c --out scale.json
  python benchmarks/scale.py --table d --out scale.json
Smoke test: ``--tasks 2 --steps 2 --vocab-scale 0.001 --batch 64``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from typing import Any, Callable, Optional

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _host  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from step_time import Interleaved  # noqa: E402
from step_time import build as build_mmoe  # noqa: E402

import mtjax  # noqa: E402
from mtjax import models  # noqa: E402

LR = 1e-3
# Every expert's last Dense layer in the benchmark MMoE (paths: experts/expert_<e>/Dense_1/{kernel,bias}).
LAST_EXPERT_LAYER = r"^experts/expert_\d+/Dense_1/"
DEFAULT_TASKS = {"a": [4, 8], "b": [3, 10], "c": [64], "d": [10]}
DEFAULT_STEPS = {"a": 5, "b": 30, "c": 5, "d": 0}


def peak_rss_mib() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


@dataclasses.dataclass
class Case:
  """One row: ``method`` (a factory; ``None``: the summed-loss step) on ``task_grads(**tg)``."""

  name: str
  method: Optional[Callable[[], Any]] = None
  tg: dict = dataclasses.field(default_factory=dict)
  checks: bool = False
  slow: bool = False  # timed fewer steps (table a's dense rows)
  predict: Optional[Callable[[dict], float]] = None  # table d: expected ms from other rows


# ------------------------------------------------------------------------------------------------
# Models


def build_embedding(num_tasks: int, batch_size: int, vocab_scale: float, seed: int = 0):
  """Table (a): the embedding MMoE (96.6M parameters at vocab_scale 1), its batch and BCE loss."""
  vocab = lambda v: max(8, int(round(v * vocab_scale)))
  spec = models.FeatureSpec(
    categorical=(
      models.Categorical("user", vocab(2_000_000), 32),
      models.Categorical("item", vocab(1_000_000), 32),
      models.Categorical("category", vocab(1000), 32),
    )
  )
  model = models.MMoE(num_tasks=num_tasks, num_experts=8, expert=(256, 128), tower=(64, 1), features=spec)
  rng = np.random.default_rng(seed)
  ids = {f.name: jnp.asarray(rng.integers(0, f.vocab_size, size=batch_size), jnp.int32) for f in spec.categorical}
  labels = jnp.asarray(rng.integers(0, 2, size=(num_tasks, batch_size)), jnp.float32)
  params = jax.jit(model.init)(jax.random.PRNGKey(seed), ids)["params"]
  loss_fn = mtjax.losses.make_loss_fn(model, "bce", has_aux=False)
  desc = (
    f"MMoE on embeddings user {vocab(2_000_000):,} / item {vocab(1_000_000):,} / category "
    f"{vocab(1000):,} x 32, 8 experts [256,128], towers [64,1], BCE, batch {batch_size}, ids uniform"
  )
  return params, {"x": ids, "labels": labels}, loss_fn, desc


def build_dense(num_tasks: int, batch_size: int):
  params, batch, loss_fn = build_mmoe(num_tasks, batch_size=batch_size)
  desc = f"MMoE input 128, 8 experts [256,128], towers [64,1], BCE, batch {batch_size}"
  return params, batch, loss_fn, desc


# ------------------------------------------------------------------------------------------------
# Cases per table


def cases_a(t: int) -> list[Case]:
  out = [Case("summed-loss step (1 backward)")]
  methods = {
    "pcgrad": lambda: mtjax.pcgrad(key=0, num_tasks=t),
    "mgda": lambda: mtjax.mgda(num_tasks=t),
    "upgrad": lambda: mtjax.upgrad(num_tasks=t),
  }
  for name, f in methods.items():
    out.append(Case(f"{name} [dense rows, sparse=False]", f, {"sparse": False}, slow=True))
  for name, f in methods.items():
    out.append(Case(f"{name} [sparse rows]", f, {}))
  # The floor of exact per-task gradients: T backward passes of the dense part, plain sum (no method).
  out.append(Case("linear [sparse rows: bare per-task step]", lambda: mtjax.linear(num_tasks=t), {}))
  for name, f in methods.items():  # sparse tables + weights from the expert outputs' gradients
    out.append(Case(f"{name} [sparse rows, rep]", f, {"strategy": "rep"}))
  return out


def experts_only(params):
  """``shared=`` mask: the experts are the shared trunk, gates and towers are task-specific."""
  return {k: jax.tree.map(lambda _, s=(k == "experts"): s, v) for k, v in params.items()}


def cases_b(t: int) -> list[Case]:
  pc = lambda **kw: lambda: mtjax.pcgrad(key=0, num_tasks=t, **kw)
  mg = lambda **kw: lambda: mtjax.mgda(num_tasks=t, **kw)
  up = lambda **kw: lambda: mtjax.upgrad(num_tasks=t, **kw)
  auto = mtjax.default_strategy()
  out = [Case("summed-loss step (1 backward)")]
  for name, f in (("pcgrad", pc()), ("mgda", mg()), ("upgrad", up())):
    out.append(Case(f"{name} [full rows, {auto}]", f, {}))
  out.append(Case(f"pcgrad [full rows, {auto}] +checks", pc(), {}, checks=True))
  for name, f in (("pcgrad", pc()), ("mgda", mg()), ("upgrad", up())):
    out.append(Case(f"{name} [shared]", f, {"strategy": "shared"}))
  for name, f in (("pcgrad", pc()), ("mgda", mg()), ("upgrad", up())):
    out.append(Case(f"{name} [rep]", f, {"strategy": "rep"}))
  for name, f in (("pcgrad", pc(gram_leaves=LAST_EXPERT_LAYER)), ("mgda", mg(gram_leaves=LAST_EXPERT_LAYER))):
    out.append(Case(f"{name} [subset: experts' last layer, deferred]", f, {"deferred": True}))
  out.append(Case(f"gradnorm [full rows, {auto}]", lambda: mtjax.gradnorm(num_tasks=t), {}))
  out.append(Case("gradnorm [default layer, deferred]", lambda: mtjax.gradnorm(num_tasks=t), {"deferred": True}))
  out.append(
    Case(
      "gradnorm [shared=experts, their last layer, deferred]",
      lambda: mtjax.gradnorm(
        num_tasks=t, shared=experts_only, layer=lambda paths: [p.split("/")[-2] == "Dense_1" for p in paths]
      ),
      {"deferred": True},
    )
  )
  return out


def cases_c(t: int, vmap_unchunked: bool = False) -> list[Case]:
  pc = lambda: mtjax.pcgrad(key=0, num_tasks=t)
  auto = mtjax.default_strategy()
  out = [Case("summed-loss step (1 backward)"), Case(f"pcgrad [full rows, {auto}, chunk None]", pc, {})]
  if auto != "vmap" and vmap_unchunked:  # all 64 rows batched: ~9.6 GiB temporaries at T = 64, batch 1024
    out.append(Case("pcgrad [full rows, vmap, chunk None]", pc, {"strategy": "vmap"}))
  out += [
    Case("pcgrad [full rows, chunk 8]", pc, {"chunk_size": 8}),
    Case("pcgrad [shared, chunk None]", pc, {"strategy": "shared"}),
    Case("pcgrad [shared, chunk 8]", pc, {"strategy": "shared", "chunk_size": 8}),
  ]
  return out


def cases_d(t: int) -> list[Case]:
  auto = mtjax.default_strategy()
  single = "linear [deferred] (1 backward)"
  pc_full = f"pcgrad [full rows, {auto}]"

  def expect(full, k):
    return lambda ms: (ms[full] + (k - 1) * ms[single]) / k

  out = [
    Case("summed-loss step (1 backward)"),
    Case(single, lambda: mtjax.linear(num_tasks=t), {"deferred": True}),
    Case(pc_full, lambda: mtjax.pcgrad(key=0, num_tasks=t), {}),
  ]
  for k in (1, 4, 16):
    out.append(
      Case(
        f"amortized(pcgrad, every={k}) [deferred]",
        lambda k=k: mtjax.amortized(mtjax.pcgrad(key=0, num_tasks=t), every=k),
        {"deferred": True},
        predict=expect(pc_full, k),
      )
    )
  # The exact trunk rows ("shared": same update as the full rows with shared= the experts); its reuse
  # steps need no rows, only J^T w (one backward through the heads and one through the trunk).
  pc_shared = "pcgrad [shared]"
  out.append(Case(pc_shared, lambda: mtjax.pcgrad(key=0, num_tasks=t), {"strategy": "shared"}))
  out.append(
    Case(
      "amortized(pcgrad, every=16) [shared]",
      lambda: mtjax.amortized(mtjax.pcgrad(key=0, num_tasks=t), every=16),
      {"strategy": "shared"},
      predict=expect(pc_shared, 16),
    )
  )
  mg_full = f"mgda [full rows, {auto}]"
  out.append(Case(mg_full, lambda: mtjax.mgda(num_tasks=t), {}))
  out.append(
    Case(
      "amortized(mgda, every=16, ema=0.9) [deferred]",
      lambda: mtjax.amortized(mtjax.mgda(num_tasks=t), every=16, ema=0.9),
      {"deferred": True},
      predict=expect(mg_full, 16),
    )
  )
  return out


CASES = {"a": cases_a, "b": cases_b, "c": cases_c, "d": cases_d}


def table_cases(table: str, t: int, args) -> list[Case]:
  if table == "c":
    return cases_c(t, vmap_unchunked=args.vmap_unchunked)
  return CASES[table](t)


# ------------------------------------------------------------------------------------------------
# Steps


class Shared:
  """The parameters and Adam moments every variant of a table steps (donated, replaced each step)."""

  def __init__(self, params):
    self.adam = optax.adam(LR)
    self.params = params
    self.opt = self.adam.init(params)


def make_step(loss_fn, case: Case, adam):
  """``step(params, adam_state, method_state, batch)``: one full training step of ``case``."""
  if case.method is None:

    def step(p, o, m, b):
      g = jax.grad(lambda q: loss_fn(q, b).sum())(p)
      u, o = adam.update(g, o, p)
      return optax.apply_updates(p, u), o, m
  else:
    tx = optax.chain(case.method(), adam)
    tg = mtjax.task_grads(loss_fn, **case.tg)

    def step(p, o, m, b):
      losses, grads = tg(p, b)
      u, (m, o) = tx.update(grads, (m, o), p, task_losses=losses)
      return optax.apply_updates(p, u), o, m

  return jax.jit(step, donate_argnums=(0, 1, 2))


def compile_case(case: Case, shared: Shared, batch, loss_fn):
  """AOT-compiles the case's step (runtime checks per ``case.checks``); returns a runner and stats."""
  m_state = [() if case.method is None else case.method().init(shared.params)]
  jitted = make_step(loss_fn, case, shared.adam)
  t0 = time.perf_counter()
  with mtjax.runtime_checks(case.checks):  # read when the step is traced (lower)
    compiled = jitted.lower(shared.params, shared.opt, m_state[0], batch).compile()
  compile_s = time.perf_counter() - t0
  try:
    temp = int(compiled.memory_analysis().temp_size_in_bytes)
  except Exception:  # backends without memory analysis
    temp = -1

  def run(n: int = 1):
    for _ in range(n):
      shared.params, shared.opt, m_state[0] = compiled(shared.params, shared.opt, m_state[0], batch)
    return shared.params

  return run, temp, compile_s


class Rounds(Interleaved):
  """:class:`step_time.Interleaved` with a number of calls per round and steps per call for each entry."""

  def __init__(self):
    super().__init__(warmup=1)  # compiled ahead of time: one warm-up call
    self.per_round, self.steps_per_call = {}, {}

  def add(self, name, fn, per_round=3, steps_per_call=1):  # pylint: disable=arguments-renamed
    super().add(name, fn, ())
    self.per_round[name], self.steps_per_call[name] = per_round, steps_per_call

  def run(self, rounds: int, per_round=None):  # pylint: disable=unused-argument
    for _ in range(rounds):
      for name, entry in self.entries.items():
        fn, _, _, times = entry
        for _ in range(self.per_round[name]):
          t0 = time.perf_counter()
          jax.block_until_ready(fn())
          times.append((time.perf_counter() - t0) / self.steps_per_call[name])
    return {name: statistics.median(e[3]) for name, e in self.entries.items()}


# ------------------------------------------------------------------------------------------------
# Per-row peak RSS: each variant alone in a fresh process


def setup(table: str, t: int, args):
  if table == "a":
    return build_embedding(t, args.batch or 2048, args.vocab_scale)
  return build_dense(t, args.batch or 1024)


def sizing_argv(args) -> list[str]:
  out = ["--vocab-scale", repr(args.vocab_scale)] + (["--vmap-unchunked"] if args.vmap_unchunked else [])
  if args.batch:
    out += ["--batch", str(args.batch)]
  return out


def only_main(args):
  """``--only NAME``: compile and run one variant, print its process peak RSS as JSON."""
  t = args.tasks[0]
  params, batch, loss_fn, _ = setup(args.table, t, args)
  case = {c.name: c for c in table_cases(args.table, t, args)}[args.only]
  shared = Shared(params)
  del params
  run, temp, _ = compile_case(case, shared, batch, loss_fn)
  jax.block_until_ready(run(1))
  print(json.dumps({"name": case.name, "rss_mib": peak_rss_mib(), "temp_bytes": temp}))


def rss_per_row(table: str, t: int, cases: list[Case], args) -> dict:
  out = {}
  for case in cases:
    cmd = [
      sys.executable,
      os.path.abspath(__file__),
      "--table",
      table,
      "--tasks",
      str(t),
      "--only",
      case.name,
      *sizing_argv(args),
    ]
    try:
      res = subprocess.run(cmd, capture_output=True, text=True, timeout=args.rss_timeout, check=False)
      lines = [ln for ln in res.stdout.splitlines() if ln.startswith("{")]
      if res.returncode != 0 or not lines:
        print(f"  (RSS of '{case.name}': process failed, rc {res.returncode}: {res.stderr.strip()[-300:]})")
        continue
      out[case.name] = json.loads(lines[-1])["rss_mib"]
      print(f"  RSS {case.name}: {out[case.name]:.0f} MiB", flush=True)
    except subprocess.TimeoutExpired:
      print(f"  (RSS of '{case.name}': timed out after {args.rss_timeout} s)")
  return out


# ------------------------------------------------------------------------------------------------


def run_table(table: str, t: int, args) -> dict:
  cases = table_cases(table, t, args)
  if args.methods:
    cases = [c for c in cases if c.method is None or any(m in c.name for m in args.methods)]
  rss_rows = {}
  do_rss = args.rss_rows == "yes" or (args.rss_rows == "auto" and table in ("a", "c"))
  if do_rss:  # before this process allocates anything big
    print(f"T = {t}: peak RSS of each variant in its own process ...", flush=True)
    rss_rows = rss_per_row(table, t, cases, args)

  params, batch, loss_fn, desc = setup(table, t, args)
  num_params = sum(int(np.size(x)) for x in jax.tree.leaves(params))
  shared = Shared(params)
  del params
  timer = Rounds()
  stats, failed = {}, {}
  steps = args.steps if args.steps is not None else DEFAULT_STEPS[table]
  if table == "a":  # dense rows are slow: `steps` rounds of 1 step; the others ~steps_fast steps
    rounds = max(1, steps)
    fast = max(1, math.ceil(args.steps_fast / rounds))
  elif table == "c":  # slow rows (tens of seconds per step at T = 64 on a CPU): `steps` rounds of 1 step
    rounds = max(1, steps)
  elif table == "d":
    rounds = args.rounds
  else:
    rounds = max(1, math.ceil(steps / 3))
  cycle = args.cycles * 16  # table d: consecutive steps per timed call (whole cycles of k = 1, 4, 16)
  for case in cases:
    print(f"  compiling {case.name} ...", flush=True)
    try:
      run, temp, compile_s = compile_case(case, shared, batch, loss_fn)
      if table == "d":
        timer.add(case.name, lambda run=run: run(cycle), per_round=1, steps_per_call=cycle)
      else:
        if table == "a":
          per_round = 1 if case.slow else fast
        else:
          per_round = 1 if table == "c" else 3
        timer.add(case.name, run, per_round=per_round)
      stats[case.name] = (temp, compile_s)
    except Exception as e:  # report, do not hide
      failed[case.name] = f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
      print(f"  FAILED {case.name}: {failed[case.name]}", flush=True)
  ms = {k: 1e3 * v for k, v in timer.run(rounds).items()}
  base = cases[0].name
  rows = []
  for case in cases:
    if case.name in failed:
      rows.append({"name": case.name, "failed": failed[case.name]})
      continue
    temp, compile_s = stats[case.name]
    row = {
      "name": case.name,
      "ms": ms[case.name],
      "vs_summed": ms[case.name] / ms[base],
      "temp_mib": temp / 2**20 if temp >= 0 else None,
      "temp_vs_summed": temp / stats[base][0] if temp >= 0 and stats[base][0] > 0 else None,
      "compile_s": compile_s,
      "rss_mib": rss_rows.get(case.name),
      "checks": case.checks,
      "timed_steps": len(timer.entries[case.name][3]) * timer.steps_per_call[case.name],
    }
    if case.predict is not None:
      try:
        row["expected_ms"] = case.predict(ms)
      except KeyError:
        pass
    rows.append(row)
  return {
    "table": table,
    "tasks": t,
    "model": desc,
    "num_params": num_params,
    "rows": rows,
    "process_peak_rss_mib": peak_rss_mib(),
    "rounds": rounds,
    "cycle_steps": cycle if table == "d" else None,
  }


def fmt(x, spec):
  return format(x, spec) if x is not None else ""


def print_table(res: dict):
  t, table = res["tasks"], res["table"]
  print(f"\n## ({table}) T = {t}: {res['model']}; {res['num_params'] / 1e6:.1f}M parameters; Adam")
  how = (
    f"mean over {res['cycle_steps']} consecutive steps (whole cycles), median of {res['rounds']} rounds"
    if table == "d"
    else "median over interleaved rounds after compilation"
  )
  print(
    f"ms/step: {how}. Runtime checks OFF (mtjax.runtime_checks(False) at trace time) except rows "
    "marked +checks. Ratios are to the summed-loss step of this run. RSS: peak of a process running that "
    "variant alone."
  )
  extra = table == "d"
  head = "| step | ms/step | / summed | temp MiB | temp / summed | compile s | RSS MiB | timed steps |"
  sep = "|---|---|---|---|---|---|---|---|"
  if extra:
    head += " expected ms (C_k1 + (k-1) C_1bwd)/k |"
    sep += "---|"
  print(head)
  print(sep)
  for r in res["rows"]:
    if "failed" in r:
      print(f"| {r['name']} | FAILED: {r['failed']} |" + " |" * (6 + extra))
      continue
    line = (
      f"| {r['name']} | {r['ms']:.2f} | {r['vs_summed']:.2f} | {fmt(r['temp_mib'], '.1f')} | "
      f"{fmt(r['temp_vs_summed'], '.2f')} | {r['compile_s']:.1f} | {fmt(r['rss_mib'], '.0f')} | "
      f"{r['timed_steps']} |"
    )
    if extra:
      line += f" {fmt(r.get('expected_ms'), '.2f')} |"
    print(line)
  print(f"\nprocess peak RSS (this whole table run, monotone): {res['process_peak_rss_mib']:.0f} MiB")


def write_json(path: str, results: list, meta: dict):
  data = {}
  if os.path.exists(path):
    try:
      with open(path) as f:
        data = json.load(f)
    except (OSError, ValueError):
      data = {}
  for res in results:
    data[f"{res['table']}/T={res['tasks']}"] = {**res, "meta": meta}
  with open(path, "w") as f:
    json.dump(data, f, indent=1)
  print(f"\nwrote {path}")


def main(argv=None):
  parser = argparse.ArgumentParser(
    description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__
  )
  parser.add_argument("--table", choices=sorted(CASES), required=True)
  parser.add_argument("--tasks", type=int, nargs="+", default=None, help="default: a 4 8, b 3 10, c 64, d 10")
  parser.add_argument(
    "--steps", type=int, default=None, help="timed steps per variant (a: of the dense rows, default 5; b: 30; c: 5)"
  )
  parser.add_argument("--steps-fast", type=int, default=20, help="(a) timed steps of the other rows")
  parser.add_argument("--rounds", type=int, default=5, help="(d) rounds of --cycles * 16 steps per variant")
  parser.add_argument("--cycles", type=int, default=4, help="(d) cycles of 16 steps per timed call")
  parser.add_argument("--batch", type=int, default=None, help="default: a 2048, others 1024")
  parser.add_argument("--vocab-scale", type=float, default=1.0, help="(a) multiply every vocabulary size")
  parser.add_argument("--methods", nargs="+", default=None, help="only rows whose name contains one of these")
  parser.add_argument(
    "--rss-rows",
    choices=("auto", "yes", "no"),
    default="auto",
    help="peak RSS of each variant in its own process (auto: tables a and c)",
  )
  parser.add_argument("--rss-timeout", type=int, default=1800)
  parser.add_argument(
    "--vmap-unchunked",
    action="store_true",
    help="(c) also PCGrad with all T rows vmapped at once (~9.6 GiB of temporaries at T = 64)",
  )
  parser.add_argument("--out", default=None, help="JSON file to write/update (keyed by table and T)")
  parser.add_argument("--only", default=None, help=argparse.SUPPRESS)  # internal: one variant, print RSS
  args = parser.parse_args(argv)
  if args.tasks is None:
    args.tasks = DEFAULT_TASKS[args.table]
  if args.only is not None:
    only_main(args)
    return
  meta = {
    "jax": jax.__version__,
    "backend": jax.default_backend(),
    "devices": str(jax.devices()),
    "cpus": os.cpu_count(),
    "machine": platform.machine(),
    "cpu": _host.cpu_model(),
    "python": platform.python_version(),
    "argv": sys.argv[1:] if argv is None else list(argv),
    "default_strategy": mtjax.default_strategy(),
    "time": time.strftime("%Y-%m-%d %H:%M:%S"),
  }
  print(
    f"jax {jax.__version__}, backend {jax.default_backend()}, devices {jax.devices()}, {os.cpu_count()} CPUs; "
    f"mtjax default task_grads strategy '{mtjax.default_strategy()}'",
    flush=True,
  )
  print(_host.describe(), flush=True)
  results = []
  for t in args.tasks:
    res = run_table(args.table, t, args)
    print_table(res)
    results.append(res)
    if args.out:
      write_json(args.out, results, meta)


if __name__ == "__main__":
  main()
