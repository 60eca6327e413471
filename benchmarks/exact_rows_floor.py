"""The floor of exact per-task rows on the embedding MMoE of ``scale.py --table a``.

Exact per-task rows need one backward pass per task through the dense part of the model. This
script times, in one process: the summed-loss step of the embedding MMoE (as in ``scale.py``:
forward, one backward, Adam over the 96.6M parameters), and the backward pass of its 8 experts
[256, 128] on the batch of 2048 embedded inputs (96 = 3 x 32) for T cotangents (``lax.map`` over
them, as ``task_grads`` does on CPU). It prints the floor that any exact-rows step reaches,
``(summed + (T - 1) * per-task backward) / summed``, whatever the tables and the method cost.

Usage: ``python benchmarks/exact_rows_floor.py [--tasks 8] [--rounds 5]``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _host  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import scale  # noqa: E402

B, D, E, H1, H2 = 2048, 96, 8, 256, 128


def _median_ms(fn, rounds):
  jax.block_until_ready(fn())
  times = []
  for _ in range(rounds):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t0)
  return 1e3 * statistics.median(times)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--tasks", type=int, default=8)
  parser.add_argument("--rounds", type=int, default=5)
  args = parser.parse_args(argv)
  t = args.tasks

  params, batch, loss_fn, desc = scale.build_embedding(t, B, 1.0)
  shared = scale.Shared(params)
  run, _, _ = scale.compile_case(scale.Case("summed"), shared, batch, loss_fn)
  summed = _median_ms(run, args.rounds)
  del params

  keys = jax.random.split(jax.random.key(0), 4)
  w1 = jax.random.normal(keys[0], (E, D, H1)) * 0.1
  w2 = jax.random.normal(keys[1], (E, H1, H2)) * 0.1
  x = jax.random.normal(keys[2], (B, D))
  cots = jax.random.normal(keys[3], (t, E, B, H2))

  def experts(w1, w2, x):  # the model's default expert impl: a list of MLPs, outputs stacked
    return jnp.stack([jax.nn.relu(jax.nn.relu(x @ w1[e]) @ w2[e]) for e in range(E)])

  forward = jax.jit(experts)
  mapped = jax.jit(lambda w1, w2, x, c: jax.lax.map(jax.vjp(experts, w1, w2, x)[1], c))
  fwd = _median_ms(lambda: forward(w1, w2, x), args.rounds)
  rows = _median_ms(lambda: mapped(w1, w2, x, cots), args.rounds)
  per_task = (rows - fwd) / t
  flop = 2 * 2 * B * E * (D * H1 + H1 * H2)  # weight and input gradients of both layers
  print(f"# {desc}; T = {t}; jax {jax.__version__}, {jax.default_backend()}")
  print(f"# {_host.describe()}")
  print(f"summed-loss step: {summed:.1f} ms")
  print(f"experts forward: {fwd:.1f} ms; {t} mapped backward passes (with the forward): {rows:.1f} ms")
  print(
    f"per-task backward through the experts: {per_task:.1f} ms ({flop / 1e9:.2f} GFLOP, "
    f"{flop / per_task / 1e6:.0f} GFLOP/s)"
  )
  print(f"floor of exact rows: (summed + {t - 1} x per-task) / summed = {(summed + (t - 1) * per_task) / summed:.2f}x")


if __name__ == "__main__":
  main()
