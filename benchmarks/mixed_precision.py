"""float32 vs bfloat16 compute (issue #14): step time, memory and accuracy, in one run on one machine.

Speed and memory: the benchmark MMoE of ``step_time.py`` (input 128, 8 experts MLP [256, 128],
towers [64, 1], BCE, batch 1024, T = 3), the full jitted training step of
``mtjax.training.make_train_step`` (forward, per-task gradients, the method, Adam; donated state;
no similarity tracking) for each method in float32 and with ``precision="bf16"`` (float32 master
parameters, bfloat16 forward / backward and per-task rows, float32 Gram, solver, state and
update). Step times are medians after compilation, timed in interleaved rounds; memory is XLA's
compiled temporary memory (``memory_analysis().temp_size_in_bytes``) and the size of the per-task
rows ``[T, P]``; peak RSS is the whole process's.

Accuracy: the embedded default experiment of ``mtjax compare`` (MMoE on 3 synthetic, partly
conflicting tasks), shortened to ``--steps`` steps, run per method in both precisions with the same
seeds and data; the test metrics, macro AUC and Delta_m% (against linear scalarization in float32).

CPUs have little native bfloat16 arithmetic (XLA's CPU backend converts most bfloat16 ops to
float32 and back), so on a CPU the bfloat16 step is usually *slower*; the speed-up is a GPU / TPU
property. The memory columns and the accuracy effect carry over.

Usage: python benchmarks/mixed_precision.py [--methods linear pcgrad mgda] [--steps 150] [--timed 10]
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time

import _host  # the benchmarks' folder: sys.path[0] when run as a script
import jax
import jax.numpy as jnp
import numpy as np
import optax

import mtjax
from mtjax import experiment
from mtjax import models
from mtjax import training
from mtjax.experiment import _runner

PRECISIONS = ("fp32", "bf16")


def factories(t):
  return {
    "linear": lambda: mtjax.linear(num_tasks=t),
    "pcgrad": lambda: mtjax.pcgrad(key=0, num_tasks=t),
    "mgda": lambda: mtjax.mgda(num_tasks=t),
    "cagrad": lambda: mtjax.cagrad(num_tasks=t),
    "nash_mtl": lambda: mtjax.nash_mtl(num_tasks=t),
    "upgrad": lambda: mtjax.upgrad(num_tasks=t),
  }


def speed(methods, num_tasks=3, batch_size=1024, dim=128, timed=10, rounds=3):
  model = models.MMoE(num_tasks=num_tasks, num_experts=8, expert=(256, 128), tower=(64, 1))
  rng = np.random.default_rng(0)
  batch = {
    "x": jnp.asarray(rng.normal(size=(batch_size, dim)), jnp.float32),
    "labels": jnp.asarray(rng.integers(0, 2, size=(num_tasks, batch_size)), jnp.float32),
  }
  entries = {}
  for name in methods:
    for prec in PRECISIONS:
      tx = optax.chain(factories(num_tasks)[name](), optax.adam(1e-3))
      state = training.init_state(model, tx, batch["x"], seed=0)
      step = training.make_train_step(model, tx, task_losses="bce", track_similarity=False, precision=prec)
      mem = step.lower(state, batch).compile().memory_analysis()
      temp = int(mem.temp_size_in_bytes) if mem is not None else -1
      for _ in range(2):  # compile and warm up
        state, m = step(state, batch)
        jax.block_until_ready(m)
      entries[(name, prec)] = [step, state, [], temp]
  num_params = sum(int(np.size(x)) for x in jax.tree.leaves(state.params))
  for _ in range(rounds):  # interleaved: every step timed in every round
    for entry in entries.values():
      step, state, times, _ = entry
      for _ in range(max(1, timed // rounds)):
        t0 = time.perf_counter()
        state, m = step(state, batch)
        jax.block_until_ready(m)
        times.append(time.perf_counter() - t0)
      entry[1] = state
  out = {k: {"ms": 1e3 * statistics.median(e[2]), "temp_mb": e[3] / 2**20} for k, e in entries.items()}
  rows_mb = {p: num_tasks * num_params * (4 if p == "fp32" else 2) / 2**20 for p in PRECISIONS}
  return out, rows_mb, num_params


def accuracy(methods, steps, seeds=(0,)):
  raw = dict(experiment.DEFAULT_COMPARE)
  raw["train"] = {**raw["train"], "steps": steps, "eval_every": 0}
  raw["seeds"] = list(seeds)
  data = None
  results = {}
  for name in methods:
    for prec in PRECISIONS:
      cfg = experiment.from_dict({**raw, "method": {"name": name}, "train": {**raw["train"], "precision": prec}})
      data = data or _runner.load_data(cfg)
      label = f"{name}/{prec}"
      for s in seeds:
        res = _runner.run(cfg, seed=s, progress=False, data=data, plots=False)
        results.setdefault(label, []).append(res)
  train = data[0]
  prim = [_runner._primary(t) for t in train.task_types]  # pylint: disable=protected-access
  table = _runner.summarize(results, list(train.task_names), prim, baseline=f"{methods[0]}/fp32")
  return table, list(train.task_names), prim


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--methods", nargs="+", default=["linear", "pcgrad", "mgda"])
  ap.add_argument("--steps", type=int, default=150, help="training steps of the accuracy runs")
  ap.add_argument("--timed", type=int, default=12, help="timed steps per configuration")
  ap.add_argument("--seeds", type=int, nargs="+", default=[0])
  args = ap.parse_args(argv)
  t0 = time.time()
  print(f"jax {jax.__version__}, backend {jax.default_backend()}, devices {jax.devices()}")
  print(_host.describe())
  sp, rows_mb, num_params = speed(args.methods, timed=args.timed)
  print(
    f"\nStep time and memory: MMoE (8 experts [256, 128], towers [64, 1]), T = 3, batch 1024, "
    f"{num_params:,} parameters; per-task rows [T, P]: {rows_mb['fp32']:.1f} MiB fp32, "
    f"{rows_mb['bf16']:.1f} MiB bf16\n"
  )
  print("| method | fp32 ms/step | bf16 ms/step | bf16 / fp32 | fp32 temp MiB | bf16 temp MiB |")
  print("|---|---:|---:|---:|---:|---:|")
  for name in args.methods:
    a, b = sp[(name, "fp32")], sp[(name, "bf16")]
    print(
      f"| {name} | {a['ms']:.1f} | {b['ms']:.1f} | {b['ms'] / a['ms']:.2f} | {a['temp_mb']:.1f} | {b['temp_mb']:.1f} |"
    )
  table, names, prim = accuracy(args.methods, args.steps, tuple(args.seeds))
  print(
    f"\nAccuracy: default experiment (mtjax compare's), {args.steps} steps of batch 256, seeds {args.seeds}; "
    f"test metrics, Delta_m% vs {args.methods[0]}/fp32\n"
  )
  head = " | ".join(f"{n} {p[0]}" for n, p in zip(names, prim))
  print(f"| method / precision | {head} | macro {table[next(iter(table))]['macro_metric']} | Delta_m% |")
  print("|---|" + "---:|" * (len(names) + 2))
  for label, row in table.items():
    if label.startswith("_"):
      continue
    vals = " | ".join(f"{v:.4f}" for v in row["mean"])
    print(f"| {label} | {vals} | {row['macro']:.4f} | {row['delta_m']:+.2f} |")
  rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
  print(f"\npeak RSS of the process {rss:.0f} MiB; total {time.time() - t0:.0f} s")


if __name__ == "__main__":
  main()
