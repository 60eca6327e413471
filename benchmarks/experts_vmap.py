"""Times MMoE forward + backward with vectorized (``nn.vmap``) vs Python-list experts.

Setting (from the task brief): input 128, 8 experts of widths [256, 128], batch 1024, 3 tasks,
towers [64, 1], BCE loss summed over tasks. Each variant is jitted, compiled and warmed up, then
the median wall time of ``--steps`` calls is reported; the script prints list / vmap.

Run: ``python benchmarks/experts_vmap.py [--steps 30]``. Timings on a shared CPU are noisy.
"""

from __future__ import annotations

import argparse
import statistics
import time

import _host  # the benchmarks' folder: sys.path[0] when run as a script
import jax
import jax.numpy as jnp
import optax

from mtjax import models


def time_impl(impl: str, steps: int, batch: int = 1024, dim: int = 128, num_tasks: int = 3) -> float:
  model = models.MMoE(num_tasks=num_tasks, num_experts=8, expert=(256, 128), tower=(64, 1), expert_impl=impl)
  kx, ky, kp = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(kx, (batch, dim))
  y = jax.random.bernoulli(ky, 0.5, (num_tasks, batch)).astype(jnp.float32)
  params = model.init(kp, x)

  @jax.jit
  def step(params, x, y):
    def loss(p):
      logits, _ = model.apply(p, x)
      return optax.sigmoid_binary_cross_entropy(logits, y).mean(axis=1).sum()

    return jax.value_and_grad(loss)(params)

  jax.block_until_ready(step(params, x, y))  # compile
  for _ in range(3):
    jax.block_until_ready(step(params, x, y))
  times = []
  for _ in range(steps):
    t0 = time.perf_counter()
    jax.block_until_ready(step(params, x, y))
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def main():
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--steps", type=int, default=30)
  args = parser.parse_args()
  print(f"backend: {jax.default_backend()}, devices: {jax.devices()}")
  print(_host.describe())
  results = {impl: time_impl(impl, args.steps) for impl in ("vmap", "list")}
  for impl, t in results.items():
    print(f"{impl:5s}: median {t * 1e3:8.2f} ms per forward+backward")
  print(f"list / vmap = {results['list'] / results['vmap']:.2f}")


if __name__ == "__main__":
  main()
