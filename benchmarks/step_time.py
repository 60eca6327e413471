"""Step time of every gradient method and task_grads strategy on an MMoE (issue #2).

Model: MMoE, input 128, 8 experts MLP [256, 128], softmax gates, towers [64, 1], BCE, batch 1024,
T = 3 and T = 10. Each timed step is a full jitted training step with donated buffers: forward,
per-task gradients, the method, Adam. Reported, all measured in this one run:

* F: the forward pass (T losses); S: one single-task gradient (forward + one backward);
  floor = F + T * (S - F): one forward plus T single-task backward passes;
* bare per-task gradients per strategy (`mtjax.task_grads` alone) and its ratio to the floor;
* summed-loss step: one backward of sum_t L_t + Adam ("linear scalarization, one backward");
* bare per-task-gradient step: task_grads + plain task sum + Adam;
* every method's full step, as a ratio to the summed-loss step and to the bare per-task step;
* the temporary memory of each compiled strategy (XLA memory analysis).

Timings are medians over many steps after compilation; on a shared CPU only the ratios of one
run are meaningful. Usage: python benchmarks/step_time.py [--tasks 3 10] [--steps 30] [--quick]
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import mtjax
from mtjax import models

STRATEGIES = ("loop", "map", "vmap")


def method_factories(num_tasks):
  t = num_tasks
  return {
      "linear": lambda: mtjax.linear(num_tasks=t),
      "pcgrad": lambda: mtjax.pcgrad(key=0, num_tasks=t),
      "gradvac": lambda: mtjax.gradvac(key=0, num_tasks=t),
      "mgda": lambda: mtjax.mgda(num_tasks=t),
      "pareto_ltr": lambda: mtjax.pareto_ltr(jnp.full((t,), 0.5 / t), num_tasks=t),
      "gradnorm": lambda: mtjax.gradnorm(num_tasks=t),
      "dwa": lambda: mtjax.dwa(num_tasks=t, steps_per_epoch=100),
      "uncertainty": lambda: mtjax.uncertainty(num_tasks=t),
  }


GRAM_BASED = ("pcgrad", "gradvac", "mgda", "pareto_ltr", "gradnorm")


def build(num_tasks, batch_size=1024, dim=128, seed=0):
  model = models.MMoE(num_tasks=num_tasks, num_experts=8, expert=(256, 128), tower=(64, 1))
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.normal(size=(batch_size, dim)), jnp.float32)
  y = jnp.asarray(rng.integers(0, 2, size=(num_tasks, batch_size)), jnp.float32)
  params = model.init(jax.random.PRNGKey(seed), x)["params"]

  def loss_fn(p, batch):
    logits, _ = model.apply({"params": p}, batch["x"])
    return jnp.mean(optax.sigmoid_binary_cross_entropy(logits, batch["y"]), axis=1)

  return params, {"x": x, "y": y}, loss_fn


def timeit(fn, args, steps, warmup=3, carry=None):
  """Median seconds per call; with ``carry`` the call returns new carried args (donation)."""
  for _ in range(warmup):
    out = fn(*args)
    if carry:
      args = carry(args, out)
    jax.block_until_ready(out)
  times = []
  for _ in range(steps):
    t0 = time.perf_counter()
    out = fn(*args)
    jax.block_until_ready(out)
    times.append(time.perf_counter() - t0)
    if carry:
      args = carry(args, out)
  return statistics.median(times)


def temp_bytes(jitted, *args):
  try:
    mem = jitted.lower(*args).compile().memory_analysis()
    return int(mem.temp_size_in_bytes)
  except Exception:  # backends without memory analysis
    return -1


def run(num_tasks, steps, quick=False):
  params, batch, loss_fn = build(num_tasks)
  rows = []
  fwd = jax.jit(loss_fn)
  single = jax.jit(jax.grad(lambda p, b: loss_fn(p, b)[0]))
  f = timeit(fwd, (params, batch), steps)
  s = timeit(single, (params, batch), steps)
  floor = f + num_tasks * (s - f)
  rows.append(("forward F", f, None, None, None))
  rows.append(("single-task grad S", s, None, None, None))
  rows.append(("floor F + T(S-F)", floor, None, None, None))
  bare = {}
  for strat in STRATEGIES:
    tg = jax.jit(mtjax.task_grads(loss_fn, strategy=strat))
    bare[strat] = timeit(tg, (params, batch), steps)
    rows.append((f"task_grads[{strat}]", bare[strat], bare[strat] / floor, None, temp_bytes(tg, params, batch)))
  auto = mtjax.default_strategy()

  adam = optax.adam(1e-3)

  def summed_step(p, o, b):
    g = jax.grad(lambda q: loss_fn(q, b).sum())(p)
    u, o = adam.update(g, o, p)
    return optax.apply_updates(p, u), o

  summed = jax.jit(summed_step, donate_argnums=(0, 1))
  copy = lambda t: jax.tree.map(jnp.array, t)
  carry = lambda args, out: (out[0], out[1], args[2])
  t_sum = timeit(summed, (copy(params), adam.init(params), batch), steps, carry=carry)
  rows.append(("summed-loss step (1 backward)", t_sum, None, 1.0, None))

  def make_step(tx, strat):
    tg = mtjax.task_grads(loss_fn, strategy=strat)

    def step(p, o, b):
      losses, grads = tg(p, b)
      u, o = tx.update(grads, o, p, task_losses=losses)
      return optax.apply_updates(p, u), o

    return jax.jit(step, donate_argnums=(0, 1))

  def bare_tx():
    def update(g, o, p=None, **kw):
      del kw
      s_ = jax.tree.map(lambda x: jnp.sum(x, 0), g)
      return adam.update(s_, o, p)
    return optax.GradientTransformationExtraArgs(adam.init, update)

  base = {}
  for strat in ((auto,) if quick else STRATEGIES):
    tx = bare_tx()
    t_b = timeit(make_step(tx, strat), (copy(params), tx.init(params), batch), steps, carry=carry)
    base[strat] = t_b
    rows.append((f"per-task step [{strat}] (sum+Adam)", t_b, None, t_b / t_sum, None))
  for name, factory in method_factories(num_tasks).items():
    for strat in ((auto,) if quick else STRATEGIES):
      tx = optax.chain(factory(), adam)
      try:
        t_m = timeit(make_step(tx, strat), (copy(params), tx.init(params), batch), steps, carry=carry)
      except Exception as e:  # report, do not hide
        rows.append((f"{name} [{strat}] FAILED: {type(e).__name__}: {str(e)[:80]}", float("nan"), None, None, None))
        continue
      rows.append((f"{name} [{strat}]", t_m, t_m / base[strat], t_m / t_sum, None))
  return rows, floor, bare, auto


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--tasks", type=int, nargs="+", default=[3, 10])
  parser.add_argument("--steps", type=int, default=30)
  parser.add_argument("--quick", action="store_true", help="only the auto strategy for method steps")
  args = parser.parse_args(argv)
  print(f"jax {jax.__version__}, backend {jax.default_backend()}, devices {jax.devices()}")
  print("MMoE: input 128, 8 experts [256,128], towers [64,1], BCE, batch 1024; median of "
        f"{args.steps} steps after compilation")
  for t in args.tasks:
    rows, floor, bare, auto = run(t, args.steps, args.quick)
    print(f"\n## T = {t}   (auto strategy = {auto}; ratio column: task_grads / floor, or method / per-task step)")
    print(f"{'what':48s} {'ms/step':>9s} {'ratio':>7s} {'/summed':>8s} {'temp MiB':>9s}")
    for name, sec, ratio, vs_sum, mem in rows:
      r = f"{ratio:7.3f}" if ratio is not None else " " * 7
      vsum = f"{vs_sum:8.2f}" if vs_sum is not None else " " * 8
      m = f"{mem / 2**20:9.1f}" if mem is not None and mem >= 0 else " " * 9
      print(f"{name:48s} {sec * 1e3:9.2f} {r} {vsum} {m}")
    print(f"default strategy '{auto}': task_grads / floor = {bare[auto] / floor:.3f}")


if __name__ == "__main__":
  main()
