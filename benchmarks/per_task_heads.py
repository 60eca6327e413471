"""The default per-task rows with and without the per-task backward passes, in one run (issue #9).

``mtjax.task_grads`` computes the default (``"map"``) rows of a loss that is separable by task --
``make_loss_fn``'s losses, every built-in model -- by transposing each task's loss alone, so that task
``t``'s backward pass runs through its own head only (``TaskJacobian.task_vjps``; ARCHITECTURE.md,
"Scale"). This script times, on the benchmark MMoE of ``step_time.py`` (input 128, 8 experts
[256, 128], towers [64, 1], BCE through ``mtjax.losses.make_loss_fn``, batch 1024), a full jitted
PCGrad + Adam step with those per-task passes and with the cotangent-``e_t`` rows they replace (every
task's pass through every head), against the summed-loss step: medians after compilation, runtime
checks off, one process.

``--loss vectorized`` uses ``step_time.py``'s own loss instead, computed on the stacked logits at once
(``jnp.mean(sigmoid_binary_cross_entropy(logits [T, B], y [T, B]), axis=1)``): row-local by task, so
``task_grads`` takes each task's pass from the stack with the other rows behind ``stop_gradient``.

Usage: ``python benchmarks/per_task_heads.py [--tasks 3 10] [--rounds 21] [--loss make_loss_fn|vectorized]``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import optax

import mtjax
import mtjax._src.task_grads as tg_lib
from mtjax import models

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _host  # noqa: E402
import step_time  # noqa: E402
from exact_rows_floor import _median_ms  # noqa: E402


def run(num_tasks: int, rounds: int, loss: str = "make_loss_fn") -> str:
  # step_time.py's model, batch and (vectorized) loss; make_loss_fn's loss reads the labels as "labels"
  params, batch, loss_fn = step_time.build(num_tasks)
  if loss == "make_loss_fn":
    model = models.MMoE(num_tasks=num_tasks, num_experts=8, expert=(256, 128), tower=(64, 1))
    loss_fn = mtjax.losses.make_loss_fn(model, "bce", has_aux=False)
    batch = {"x": batch["x"], "labels": batch["y"]}
  adam = optax.adam(1e-3)

  def summed(p, o, b):
    u, o = adam.update(jax.grad(lambda q: loss_fn(q, b).sum())(p), o, p)
    return optax.apply_updates(p, u), o

  opt = adam.init(params)
  summed_jit = jax.jit(summed)
  rows = {"summed-loss step": (lambda: summed_jit(params, opt, batch), None)}
  saved = tg_lib._TASK_VJPS.min_tasks
  try:
    for label, low in (("pcgrad, per-task backward passes", 1), ("pcgrad, e_t rows (every head)", 10**6)):
      tg_lib._TASK_VJPS.min_tasks = low
      tx = optax.chain(mtjax.pcgrad(num_tasks=num_tasks, key=0), adam)
      state = tx.init(params)
      tg = mtjax.task_grads(loss_fn)

      def step(p, s, b, tx=tx, tg=tg):
        losses, grads = tg(p, b)
        u, s = tx.update(grads, s, p, task_losses=losses)
        return optax.apply_updates(p, u), s

      t0 = time.perf_counter()
      with mtjax.runtime_checks(False):
        compiled = jax.jit(step).lower(params, state, batch).compile()
      rows[label] = (lambda c=compiled, s=state: c(params, s, batch), time.perf_counter() - t0)
  finally:
    tg_lib._TASK_VJPS.min_tasks = saved
  times = {k: _median_ms(f, rounds) for k, (f, _) in rows.items()}
  base = times["summed-loss step"]
  out = [
    f"## T = {num_tasks}: MMoE input 128, 8 experts [256,128], towers [64,1], {loss} BCE, batch 1024, Adam",
    "| step | ms/step | / summed | compile s |",
    "|---|---|---|---|",
  ]
  for k, (_, c) in rows.items():
    out.append(f"| {k} | {times[k]:.2f} | {times[k] / base:.2f} | {'' if c is None else f'{c:.1f}'} |")
  return "\n".join(out)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--tasks", type=int, nargs="+", default=[3, 10])
  parser.add_argument("--rounds", type=int, default=21)
  parser.add_argument("--loss", choices=("make_loss_fn", "vectorized"), default="make_loss_fn")
  args = parser.parse_args(argv)
  print(f"# jax {jax.__version__}, {jax.default_backend()}; medians of {args.rounds} steps after compilation")
  print(f"# {_host.describe()}")
  for t in args.tasks:
    print(run(t, args.rounds, args.loss))
    print()


if __name__ == "__main__":
  main()
