"""mtjax against PyTorch on the same MMoE training step, measured in one run (issue #2).

The model and step of ``benchmarks/step_time.py``: MMoE, input 128, 8 ReLU experts [256, 128],
softmax gates ``softmax(W x)`` (no bias), towers [64, 1], BCE, batch 1024, Adam, at T = 3 and
T = 10. Written twice, once in PyTorch and once in mtjax, and timed in the same process, in
interleaved rounds (every step is timed in every round), as the median over many steps after
warm-up. Rows:

* PyTorch: the summed-loss step (one backward of ``sum_t L_t``); the loop of T backward passes
  (``torch.autograd.grad(L_t, params, retain_graph=True)`` per task, summed), i.e. plain
  per-task gradients; and, when TorchJD is installed, its PCGrad / MGDA / UPGrad steps
  (``torchjd.autojac.backward(losses)`` then ``jac_to_grad(params, aggregator)``: the whole-model
  Jacobian, as an MMoE user would call it), and the same aggregators through TorchJD's features
  API (``[mtl_backward]`` rows): ``torchjd.autojac.mtl_backward(losses, features=experts)`` with
  the stacked expert outputs ``[B, E, H]`` as the shared features, i.e. the Jacobian of the
  experts' parameters only (gates and towers get the plain sum of their task gradients), then
  ``jac_to_grad(expert_params, aggregator)``.
* mtjax: the summed-loss step, the bare per-task-gradient step (``mtjax.task_grads`` + plain sum),
  and PCGrad / MGDA / UPGrad steps (``optax.chain(method, optax.adam)``), with the default
  ``task_grads`` strategy, and again with ``task_grads(strategy="shared")`` (``[shared]`` rows:
  mtjax's MMoE marks its expert outputs as the representation, so these compute exactly what the
  ``[mtl_backward]`` rows compute: the experts' per-task rows, the heads summed); the default
  runtime checks on.

Columns: ms/step, the ratio to the framework's own summed-loss step, and, for the mtjax rows, the
ratio of mtjax's absolute time to the matching PyTorch row (< 1: mtjax is faster; a ``[shared]``
row is matched with the ``[mtl_backward]`` row of the same method).

Not part of the test suite or of the project's dependencies. Set up (CPU builds)::

    pip install torch==2.13.0 "torchjd[quadprog_projector]"   # next to the project's own install
    python benchmarks/torch_reference.py [--tasks 3 10] [--rounds 10]

Both frameworks use the machine's cores (``torch.set_num_threads``: all cores, as by default).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import _host  # the benchmarks' folder: sys.path[0] when run as a script
import numpy as np

MTL_TAG = "[mtl_backward]"  # TorchJD's features API; matched with mtjax's strategy="shared" rows
SHARED_TAG = "[shared]"


def pair_key(framework: str, name: str) -> str:
  """The key that pairs a PyTorch row with the mtjax row of the same computation."""
  base = name.split(" (")[0]  # "pcgrad (TorchJD 0.18.0)" -> "pcgrad", "summed-loss step (1 backward)" -> ...
  return base.replace(MTL_TAG, SHARED_TAG) if framework == "torch" else base


def torch_setup(num_tasks, x_np, y_np, seed=0):
  import torch
  from torch import nn

  torch.manual_seed(seed)

  class MMoE(nn.Module):
    def __init__(self):
      super().__init__()
      self.experts = nn.ModuleList(
        nn.Sequential(nn.Linear(128, 256), nn.ReLU(), nn.Linear(256, 128), nn.ReLU()) for _ in range(8)
      )
      self.gates = nn.ModuleList(nn.Linear(128, 8, bias=False) for _ in range(num_tasks))
      self.towers = nn.ModuleList(
        nn.Sequential(nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 1)) for _ in range(num_tasks)
      )

    def forward_with_features(self, x):
      """``([T] logits [B], expert outputs [B, E, H])``: the experts' outputs are the shared features."""
      experts = torch.stack([e(x) for e in self.experts], dim=1)  # [B, E, H]
      logits = []
      for gate, tower in zip(self.gates, self.towers):
        g = torch.softmax(gate(x), dim=-1)  # [B, E]
        logits.append(tower(torch.einsum("be,beh->bh", g, experts))[:, 0])
      return logits, experts

    def forward(self, x):
      return torch.stack(self.forward_with_features(x)[0])  # [T, B]

  model = MMoE()
  x = torch.as_tensor(x_np)
  y = torch.as_tensor(y_np)
  params = list(model.parameters())

  def task_losses():
    logits = model(x)
    return nn.functional.binary_cross_entropy_with_logits(logits, y, reduction="none").mean(dim=1)

  def task_losses_and_features():
    """T separate losses (one graph per task after the features, as mtl_backward needs) and the features."""
    logits, features = model.forward_with_features(x)
    bce = nn.functional.binary_cross_entropy_with_logits
    return [bce(logit, y[t]) for t, logit in enumerate(logits)], features

  opt = torch.optim.Adam(params, lr=1e-3)

  def summed():
    opt.zero_grad(set_to_none=True)
    task_losses().sum().backward()
    opt.step()

  def loop():
    opt.zero_grad(set_to_none=True)
    losses = task_losses()
    total = None
    for t in range(num_tasks):
      g = torch.autograd.grad(losses[t], params, retain_graph=t < num_tasks - 1)
      total = list(g) if total is None else [a + b for a, b in zip(total, g)]
    for p, g in zip(params, total):
      p.grad = g
    opt.step()

  steps = {"summed-loss step (1 backward)": summed, "per-task gradients (loop of T backward) + sum": loop}
  try:
    from importlib import metadata

    from torchjd import aggregation
    from torchjd.autojac import backward
    from torchjd.autojac import jac_to_grad
    from torchjd.autojac import mtl_backward
  except ImportError:
    print("(TorchJD not installed: no PyTorch-library method rows)")
    return steps

  def jd(aggregator):
    def step():
      opt.zero_grad(set_to_none=True)
      backward(task_losses())
      jac_to_grad(params, aggregator)
      opt.step()

    return step

  expert_params = [p for e in model.experts for p in e.parameters()]

  def jd_mtl(aggregator):
    def step():
      opt.zero_grad(set_to_none=True)
      losses, features = task_losses_and_features()
      # the Jacobian of the experts' parameters (the features' leaves); the gates' and towers'
      # parameters get their task's gradient in .grad (summed over tasks)
      mtl_backward(losses, features=features)
      jac_to_grad(expert_params, aggregator)
      opt.step()

    return step

  version = metadata.version("torchjd")
  for name in ("PCGrad", "MGDA", "UPGrad"):
    try:
      steps[f"{name.lower()} (TorchJD {version})"] = jd(getattr(aggregation, name)())
    except ImportError as e:  # UPGrad needs torchjd[quadprog_projector]
      print(f"(TorchJD {name} unavailable: {e})")
  for name in ("PCGrad", "MGDA", "UPGrad"):
    try:
      steps[f"{name.lower()} {MTL_TAG} (TorchJD {version})"] = jd_mtl(getattr(aggregation, name)())
    except ImportError as e:
      print(f"(TorchJD {name} unavailable: {e})")
  return steps


def jax_setup(num_tasks, x_np, y_np, seed=0):
  import jax
  import jax.numpy as jnp
  import optax

  import mtjax
  from mtjax import models

  model = models.MMoE(num_tasks=num_tasks, num_experts=8, expert=(256, 128), tower=(64, 1))
  x, y = jnp.asarray(x_np), jnp.asarray(y_np)
  params = model.init(jax.random.PRNGKey(seed), x)["params"]
  batch = {"x": x, "y": y}

  def loss_fn(p, b):
    logits, _ = model.apply({"params": p}, b["x"])
    return jnp.mean(optax.sigmoid_binary_cross_entropy(logits, b["y"]), axis=1)

  adam = optax.adam(1e-3)

  def make(tx=None, strategy="auto"):
    """A jitted step with donated params/opt state; ``tx=None``: the summed-loss step."""
    opt = tx if tx is not None else adam

    def step(p, o, b):
      if tx is None:
        g = jax.grad(lambda q: loss_fn(q, b).sum())(p)
        u, o = adam.update(g, o, p)
      else:
        losses, grads = mtjax.task_grads(loss_fn, strategy=strategy)(p, b)
        u, o = tx.update(grads, o, p, task_losses=losses)
      return optax.apply_updates(p, u), o

    jitted = jax.jit(step, donate_argnums=(0, 1))
    state = [jax.tree.map(jnp.array, params), opt.init(params)]

    def run():
      state[0], state[1] = jitted(state[0], state[1], batch)
      jax.block_until_ready(state[0])

    return run

  def bare():
    def update(g, o, p=None, **kw):
      del kw
      return adam.update(jax.tree.map(lambda t: jnp.sum(t, 0), g), o, p)

    return optax.GradientTransformationExtraArgs(adam.init, update)

  t = num_tasks
  methods = {
    "pcgrad": lambda: mtjax.pcgrad(key=0, num_tasks=t),
    "mgda": lambda: mtjax.mgda(num_tasks=t),
    "upgrad": lambda: mtjax.upgrad(num_tasks=t),
  }
  steps = {"summed-loss step (1 backward)": make(), "per-task gradients (loop of T backward) + sum": make(bare())}
  for name, method in methods.items():
    steps[name] = make(optax.chain(method(), adam))
  for name, method in methods.items():  # the experts' rows only: TorchJD's mtl_backward(features=experts)
    steps[f"{name} {SHARED_TAG}"] = make(optax.chain(method(), adam), strategy="shared")
  return steps, (
    f"jax {jax.__version__} ({jax.default_backend()}), mtjax task_grads strategy '{mtjax.default_strategy()}'"
  )


def time_interleaved(fns: dict, rounds: int, per_round: int = 3, warmup: int = 3) -> dict:
  for fn in fns.values():
    for _ in range(warmup):
      fn()
  times = {k: [] for k in fns}
  for _ in range(rounds):
    for k, fn in fns.items():
      for _ in range(per_round):
        t0 = time.perf_counter()
        fn()
        times[k].append(time.perf_counter() - t0)
  return {k: 1e3 * statistics.median(v) for k, v in times.items()}


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--tasks", type=int, nargs="+", default=[3, 10])
  parser.add_argument("--rounds", type=int, default=10, help="interleaved rounds of 3 steps per function")
  args = parser.parse_args(argv)
  import torch

  torch.set_num_threads(os.cpu_count() or 1)
  for t in args.tasks:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(1024, 128)).astype(np.float32)
    y = rng.integers(0, 2, size=(t, 1024)).astype(np.float32)
    torch_steps = torch_setup(t, x, y)
    jax_steps, jax_info = jax_setup(t, x, y)
    fns = {("torch", k): v for k, v in torch_steps.items()}
    fns.update({("mtjax", k): v for k, v in jax_steps.items()})
    ms = time_interleaved(fns, args.rounds)
    print(f"\n## T = {t}: MMoE input 128, 8 experts [256,128], towers [64,1], BCE, batch 1024, Adam")
    print(
      f"torch {torch.__version__} ({torch.get_num_threads()} threads); {jax_info}; median of {3 * args.rounds} steps"
    )
    print(_host.describe())
    print("| framework | step | ms/step | / own summed-loss step | mtjax / PyTorch |")
    print("|---|---|---|---|---|")
    torch_sum = ms[("torch", "summed-loss step (1 backward)")]
    jax_sum = ms[("mtjax", "summed-loss step (1 backward)")]
    torch_by_key = {pair_key(fw, k): v for (fw, k), v in ms.items() if fw == "torch"}
    shared_ratios = []
    for (fw, k), v in ms.items():
      own = torch_sum if fw == "torch" else jax_sum
      vs = ""
      if fw == "mtjax":
        match = torch_by_key.get(pair_key(fw, k))
        vs = f"{v / match:.2f}" if match else ""
        if match and k.endswith(SHARED_TAG):
          shared_ratios.append(f"{k.split(' ')[0]} {v / match:.2f}")
      print(f"| {fw} | {k} | {v:.2f} | {v / own:.2f} | {vs} |")
    if shared_ratios:
      print(
        "\nmtjax task_grads(strategy='shared') / TorchJD mtl_backward(features=experts), same method: "
        + ", ".join(shared_ratios)
      )


if __name__ == "__main__":
  main()
