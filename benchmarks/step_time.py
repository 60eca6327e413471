"""Step time of every gradient method and task_grads strategy on an MMoE (issue #2).

Model: MMoE, input 128, 8 experts MLP [256, 128], softmax gates, towers [64, 1], BCE, batch 1024,
T = 3 and T = 10. Each timed step is a full jitted training step with donated buffers: forward,
per-task gradients, the method, Adam. Reported, all measured in this one run:

* F: the forward pass (T losses); S: one single-task gradient (forward + one backward);
  floor = F + T * (S - F): one forward plus T single-task backward passes;
* bare per-task gradients per strategy (`mtjax.task_grads` alone) and its ratio to the floor;
* summed-loss step: one backward of sum_t L_t + Adam ("linear scalarization, one backward");
* bare per-task-gradient step: task_grads + plain task sum + Adam;
* every method's full step, as a ratio to the summed-loss step and to the bare per-task step,
  compiled without mtjax's in-graph runtime checks (NaN/inf, feasibility; ``mtjax.runtime_checks(False)``),
  and for the default strategy also with them (``+checks``: the default, as in ``mtjax.training.fit``);
* ``[deferred]`` rows: the weightings that do not read the gradients (linear, DWA, uncertainty,
  RLW, FAMO, STCH, GLS, SI, IMTL-L) with ``task_grads(deferred=True)``, i.e. one backward pass of
  ``sum_t w_t L_t``, and M-ConFIG (one task's gradient per step);
* the methods of 2022-2026 (``recent_method_factories``), and those whose step needs more than one
  batch's gradients (``SPECIAL``: MoDo and SDMGrad on three micro-batches of 341 samples, FAMO's
  extra-forward form, Auto-Lambda with a validation batch of the training batch's size);
* the temporary memory of each compiled strategy (XLA memory analysis).

Timings are medians over many steps after compilation, taken in interleaved rounds (every
function is timed in every round) so that drifts of the machine hit all alike; on a CPU only the
ratios of one run are meaningful.
Usage: python benchmarks/step_time.py [--tasks 3 10] [--steps 30] [--strategies loop map vmap] [--methods ...]
"""

from __future__ import annotations

import argparse
import statistics
import time

import _host  # the benchmarks' folder: sys.path[0] when run as a script
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


def extra_method_factories(num_tasks):
  """Methods beyond the required set: timed with the default strategy only."""
  t = num_tasks
  return {
    "cagrad": lambda: mtjax.cagrad(num_tasks=t),
    "imtl": lambda: mtjax.imtl(num_tasks=t),
    "aligned_mtl": lambda: mtjax.aligned_mtl(num_tasks=t),
    "upgrad": lambda: mtjax.upgrad(num_tasks=t),
    "dualproj": lambda: mtjax.dualproj(num_tasks=t),
    "config": lambda: mtjax.config(num_tasks=t),
    "fairgrad": lambda: mtjax.fairgrad(num_tasks=t),
    "nash_mtl": lambda: mtjax.nash_mtl(num_tasks=t),
    "rlw": lambda: mtjax.rlw(key=0, num_tasks=t),
    "graddrop": lambda: mtjax.graddrop(key=0, num_tasks=t),
  }


def recent_method_factories(num_tasks):
  """The methods of 2022-2026 that take one batch's [T, ...] gradients: timed with the default strategy."""
  t = num_tasks
  return {
    "famo": lambda: mtjax.famo(num_tasks=t, post_step_losses="next_batch"),
    "stch": lambda: mtjax.stch(num_tasks=t),
    "gls": lambda: mtjax.gls(num_tasks=t),
    "scale_invariant": lambda: mtjax.scale_invariant(num_tasks=t),
    "imtl_loss": lambda: mtjax.imtl(num_tasks=t, mode="loss"),
    "imtl_hybrid": lambda: mtjax.imtl(num_tasks=t, mode="hybrid"),
    "db_mtl": lambda: mtjax.db_mtl(num_tasks=t),
    "metabalance": lambda: mtjax.metabalance(num_tasks=t),
    "excess_mtl": lambda: mtjax.excess_mtl(num_tasks=t),
    "moco": lambda: mtjax.moco(num_tasks=t),
    "m_config": lambda: mtjax.m_config(num_tasks=t),
    "sdmgrad": lambda: mtjax.sdmgrad(num_tasks=t, num_batches=1),
    "normalize_upgrad": lambda: mtjax.normalize(mtjax.upgrad(num_tasks=t)),
  }


# The methods of 2022-2026 whose step needs more than one batch's gradients (timed with the default strategy):
# MoDo / SDMGrad on 3 micro-batches of batch / 3 (mtjax.micro_batch_task_grads), FAMO's paper form (one extra
# forward for the previous batch's losses after the step), Auto-Lambda (a forward + backward on a validation
# batch of the same size through the virtual step).
SPECIAL = ("famo_extra_forward", "modo", "sdmgrad_3batch", "auto_lambda")

# Weightings that do not read the gradients: with task_grads(deferred=True) their update is one backward
# (M-ConFIG: one task's gradient per step, J^T e_k, plus J^T 1 for the task-specific leaves).
DEFERRED = ("linear", "dwa", "uncertainty", "rlw", "famo", "stch", "gls", "scale_invariant", "imtl_loss", "m_config")

GRAM_BASED = (
  "pcgrad",
  "gradvac",
  "mgda",
  "pareto_ltr",
  "gradnorm",
  "cagrad",
  "imtl",
  "aligned_mtl",
  "upgrad",
  "dualproj",
  "config",
  "fairgrad",
  "nash_mtl",
  "imtl_hybrid",
  "metabalance",
  "sdmgrad",
  "normalize_upgrad",
)


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


def special_steps(num_tasks, loss_fn, strategy, optimizer):
  """``{name: (tx, step(p, o, b) -> (p, o))}`` for the methods in ``SPECIAL`` (see there)."""
  t = num_tasks
  tg = mtjax.task_grads(loss_fn, strategy=strategy)

  def micro_loss(p, b):  # the batch with its labels sample-major, so that every leaf splits along axis 0
    return loss_fn(p, {"x": b["x"], "y": b["y"].T})

  micro = mtjax.micro_batch_task_grads(mtjax.task_grads(micro_loss, strategy=strategy), 3)

  def chained(method):
    return optax.chain(method, optimizer)

  def famo_step(tx):
    def step(p, o, b):
      losses, grads = tg(p, b)
      after = loss_fn(p, b)  # the previous batch's losses at the current parameters: one extra forward
      u, o = tx.update(grads, o, p, task_losses=losses, previous_task_losses_after_step=after)
      return optax.apply_updates(p, u), o

    return step

  def micro_step(tx):
    def step(p, o, b):
      n = 3 * (b["x"].shape[0] // 3)  # 1023 of the 1024 samples: three equal micro-batches
      losses, grads = micro(p, {"x": b["x"][:n], "y": b["y"][:, :n].T})
      u, o = tx.update(grads, o, p, task_losses=losses)
      return optax.apply_updates(p, u), o

    return step

  def auto_lambda_step(tx):
    def step(p, o, b):
      losses, grads = tg(p, b)
      u, o = tx.update(grads, o, p, task_losses=losses, validation_batch=b)
      return optax.apply_updates(p, u), o

    return step

  txs = {
    "famo_extra_forward": (chained(mtjax.famo(num_tasks=t)), famo_step),
    "modo": (chained(mtjax.modo(num_tasks=t)), micro_step),
    "sdmgrad_3batch": (chained(mtjax.sdmgrad(num_tasks=t)), micro_step),
    "auto_lambda": (chained(mtjax.auto_lambda(loss_fn, num_tasks=t, virtual_lr=1e-3)), auto_lambda_step),
  }
  return {name: (tx, make(tx)) for name, (tx, make) in txs.items()}


class Interleaved:
  """Times several jitted functions in interleaved rounds, so that slow drifts of the machine
  (frequency, other processes) hit every function alike; reports the median per call.

  ``add(name, fn, args, carry)``: with ``carry`` the call returns new carried args (donated
  buffers are replaced by the outputs, as in a training loop).
  """

  def __init__(self, warmup: int = 2):
    self.entries = {}
    self.warmup = warmup

  def add(self, name, fn, args, carry=None):
    for _ in range(self.warmup):  # compile and warm up
      out = fn(*args)
      jax.block_until_ready(out)
      if carry:
        args = carry(args, out)
    self.entries[name] = [fn, args, carry, []]

  def run(self, rounds: int, per_round: int = 3):
    for _ in range(rounds):
      for entry in self.entries.values():
        fn, args, carry, times = entry
        for _ in range(per_round):
          t0 = time.perf_counter()
          out = fn(*args)
          jax.block_until_ready(out)
          times.append(time.perf_counter() - t0)
          if carry:
            args = carry(args, out)
        entry[1] = args
    return {name: statistics.median(e[3]) for name, e in self.entries.items()}


def temp_bytes(jitted, *args):
  try:
    mem = jitted.lower(*args).compile().memory_analysis()
    return int(mem.temp_size_in_bytes)
  except Exception:  # backends without memory analysis
    return -1


def run(num_tasks, steps, strategies=STRATEGIES, methods=None, extra=True):
  params, batch, loss_fn = build(num_tasks)
  auto = mtjax.default_strategy()
  adam = optax.adam(1e-3)
  copy = lambda t: jax.tree.map(jnp.array, t)
  carry = lambda args, out: (out[0], out[1], args[2])
  timer = Interleaved()
  memory = {}

  timer.add("forward", jax.jit(loss_fn), (params, batch))
  timer.add("single", jax.jit(jax.grad(lambda p, b: loss_fn(p, b)[0])), (params, batch))
  for strat in strategies:
    tg = jax.jit(mtjax.task_grads(loss_fn, strategy=strat))
    memory[strat] = temp_bytes(tg, params, batch)
    timer.add(f"task_grads[{strat}]", tg, (params, batch))

  def summed_step(p, o, b):
    g = jax.grad(lambda q: loss_fn(q, b).sum())(p)
    u, o = adam.update(g, o, p)
    return optax.apply_updates(p, u), o

  timer.add("summed", jax.jit(summed_step, donate_argnums=(0, 1)), (copy(params), adam.init(params), batch), carry)

  def make_step(tx, strat, deferred=False):
    tg = mtjax.task_grads(loss_fn, strategy=strat, deferred=deferred)

    def step(p, o, b):
      losses, grads = tg(p, b)
      u, o = tx.update(grads, o, p, task_losses=losses)
      return optax.apply_updates(p, u), o

    return jax.jit(step, donate_argnums=(0, 1))

  def bare_tx():
    def update(g, o, p=None, **kw):
      del kw
      return adam.update(jax.tree.map(lambda x: jnp.sum(x, 0), g), o, p)

    return optax.GradientTransformationExtraArgs(adam.init, update)

  failed = {}
  for strat in strategies:
    tx = bare_tx()
    timer.add(f"bare[{strat}]", make_step(tx, strat), (copy(params), tx.init(params), batch), carry)
    factories = dict(method_factories(num_tasks))
    if strat == auto and extra:
      factories.update(extra_method_factories(num_tasks))
      factories.update(recent_method_factories(num_tasks))
    for name, factory in factories.items():
      if methods and name not in methods:
        continue
      variants = [(f"{name}[{strat}]", False)] + ([(f"{name}[{strat}]+checks", True)] if strat == auto else [])
      for label, checks in variants:
        tx = optax.chain(factory(), adam)
        try:
          with mtjax.runtime_checks(checks):  # read when the step is traced (first call, in add)
            timer.add(label, make_step(tx, strat), (copy(params), tx.init(params), batch), carry)
        except Exception as e:  # report, do not hide
          failed[label] = f"{type(e).__name__}: {str(e)[:80]}"
  if auto in strategies and extra:  # the methods of 2022-2026 that need more than one batch's gradients
    for name, (tx, step) in special_steps(num_tasks, loss_fn, auto, adam).items():
      if methods and name not in methods:
        continue
      try:
        with mtjax.runtime_checks(False):
          timer.add(
            f"{name}[{auto}]", jax.jit(step, donate_argnums=(0, 1)), (copy(params), tx.init(params), batch), carry
          )
      except Exception as e:  # report, do not hide
        failed[f"{name}[{auto}]"] = f"{type(e).__name__}: {str(e)[:80]}"
  if auto in strategies:  # deferred per-task gradients: one backward for weightings that ignore gradients
    factories = {
      **method_factories(num_tasks),
      **extra_method_factories(num_tasks),
      **recent_method_factories(num_tasks),
    }
    for name in DEFERRED:
      if methods and name not in methods:
        continue
      tx = optax.chain(factories[name](), adam)
      with mtjax.runtime_checks(False):
        timer.add(
          f"{name}[deferred]", make_step(tx, auto, deferred=True), (copy(params), tx.init(params), batch), carry
        )
  t = timer.run(rounds=max(1, steps // 3))
  f, s_ = t["forward"], t["single"]
  floor = f + num_tasks * (s_ - f)
  rows = [
    ("forward F", f, None, None, None),
    ("single-task grad S", s_, None, None, None),
    ("floor F + T(S-F)", floor, None, None, None),
  ]
  for strat in strategies:
    k = f"task_grads[{strat}]"
    rows.append((k, t[k], t[k] / floor, None, memory[strat]))
  rows.append(("summed-loss step (1 backward)", t["summed"], None, 1.0, None))
  for strat in strategies:
    b = t[f"bare[{strat}]"]
    rows.append((f"per-task step [{strat}] (sum+Adam)", b, None, b / t["summed"], None))
  for name in (
    list(method_factories(num_tasks))
    + list(extra_method_factories(num_tasks))
    + list(recent_method_factories(num_tasks))
    + list(SPECIAL)
  ):
    for strat in strategies:
      for k in (f"{name}[{strat}]", f"{name}[{strat}]+checks"):
        if k in t:
          rows.append((k, t[k], t[k] / t[f"bare[{strat}]"], t[k] / t["summed"], None))
        elif k in failed:
          rows.append((f"{k} FAILED {failed[k]}", float("nan"), None, None, None))
    k = f"{name}[deferred]"
    if k in t:
      rows.append((k, t[k], t[k] / t[f"bare[{auto}]"], t[k] / t["summed"], None))
  return rows, floor, {s: t[f"task_grads[{s}]"] for s in strategies}, auto


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--tasks", type=int, nargs="+", default=[3, 10])
  parser.add_argument("--steps", type=int, default=30)
  parser.add_argument("--strategies", nargs="+", default=list(STRATEGIES))
  parser.add_argument("--methods", nargs="+", default=None)
  parser.add_argument("--no-extra", action="store_true", help="only the required methods (no CAGrad, UPGrad, ...)")
  args = parser.parse_args(argv)
  print(f"jax {jax.__version__}, backend {jax.default_backend()}, devices {jax.devices()}")
  print(_host.describe())
  print(
    "MMoE: input 128, 8 experts [256,128], towers [64,1], BCE, batch 1024; median of "
    f"{args.steps} steps after compilation"
  )
  for t in args.tasks:
    rows, floor, bare, auto = run(t, args.steps, tuple(args.strategies), args.methods, extra=not args.no_extra)
    print(f"\n## T = {t}   (auto strategy = {auto}; ratio column: task_grads / floor, or method / per-task step)")
    print(f"{'what':48s} {'ms/step':>9s} {'ratio':>7s} {'/summed':>8s} {'temp MiB':>9s}")
    for name, sec, ratio, vs_sum, mem in rows:
      r = f"{ratio:7.3f}" if ratio is not None else " " * 7
      vsum = f"{vs_sum:8.2f}" if vs_sum is not None else " " * 8
      m = f"{mem / 2**20:9.1f}" if mem is not None and mem >= 0 else " " * 9
      print(f"{name:48s} {sec * 1e3:9.2f} {r} {vsum} {m}")
    if auto in bare:
      print(f"default strategy '{auto}': task_grads / floor = {bare[auto] / floor:.3f}")
      gram = [
        (name, sec, ratio)
        for name, sec, ratio, _, _ in rows
        if ratio is not None
        and name.split("[")[0] in GRAM_BASED
        and name.startswith(tuple(GRAM_BASED))
        and f"[{auto}]" in name
      ]
      if gram:
        worst = max(gram, key=lambda r: r[2])
        print(f"Gram-based methods, strategy '{auto}': method step / per-task step at most {worst[2]:.3f} ({worst[0]})")


if __name__ == "__main__":
  main()
