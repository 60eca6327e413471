"""Parameter counts and forward+backward step times of every registered model, in one run.

Configuration (documented, the same for every model where it applies): a feature spec of 4
categorical fields (user 10,000 ids, item 10,000, domain 3, prior 10; 16-dim embeddings), one
8-wide dense field and a 20-step item history (an ``IdSequence`` in the item table: pooled into
every model's input, read step by step by DUPN); batch 1024; T = 2 tasks (ESM^2: 3 composite
outputs); hidden widths around 128/64 with towers [32, 1]; experts [128, 64] (8 for
OMoE/MMoE/DSelect-k, 2 specific + 2 shared per task for CGC/PLE/STEM; the YouTube ranker is the
MMoE plus its shallow tower over "prior"; Cross-Stitch has one [128, 64] column per task; SNR two
levels of three [128, 64] sub-networks; AdaTT two levels of 2 task + 2 shared [128, 64] experts).
The step is ``jax.grad`` of the summed loss (BCE, or the model's entire-space loss) in train mode,
jitted; the median over many steps after compilation.

Usage: python benchmarks/model_step_time.py [--steps 20] [--batch 1024]
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time

import _host  # the benchmarks' folder: sys.path[0] when run as a script
import jax
import jax.numpy as jnp
import numpy as np

from mtjax import losses
from mtjax import models

SPEC = models.FeatureSpec(
  categorical=(
    models.Categorical("user", 10_000, 16),
    models.Categorical("item", 10_000, 16),
    models.Categorical("domain", 3, 16),
    models.Categorical("prior", 10, 16),
  ),
  dense=(models.Dense("dense", 8),),
  sequences=(models.IdSequence("history", 10_000, 16, max_len=20, table="item"),),
)

CONFIGS = {
  "shared_bottom": dict(num_tasks=2, bottom=(128, 64), tower=(32, 1)),
  "omoe": dict(num_tasks=2, num_experts=8, expert=(128, 64), tower=(32, 1)),
  "mmoe": dict(num_tasks=2, num_experts=8, expert=(128, 64), tower=(32, 1)),
  "cgc": dict(num_tasks=2, num_specific_experts=2, num_shared_experts=2, expert=(128, 64), tower=(32, 1)),
  "ple": dict(num_tasks=2, num_levels=2, num_specific_experts=2, num_shared_experts=2, expert=(128, 64), tower=(32, 1)),
  "stem": dict(num_tasks=2, num_specific_experts=2, num_shared_experts=2, expert=(128, 64), tower=(32, 1)),
  "pepnet": dict(num_tasks=2, domain_fields=("domain",), prior_fields=("prior",), tower=(128, 64, 32, 1)),
  "star": dict(num_tasks=2, num_domains=3, domain_feature="domain", hidden=(128, 64)),
  "esmm": dict(tower=(128, 64, 32, 1)),
  "esm2": dict(tower=(128, 64, 32, 1)),
  "aitm": dict(num_tasks=2, tower=(128, 64, 32)),
  "escm2": dict(tower=(128, 64, 32, 1), counterfactual="dr"),
  "dbmtl": dict(num_tasks=2, bottom=(128, 64), tower=(32,), relation=(32,)),
  "nmtr": dict(num_tasks=2, user_fields=("user",), item_fields=("item",), interaction="mlp", mlp=(128, 64, 1)),
  "cross_stitch": dict(num_tasks=2, hidden=(128, 64), tower=(32, 1)),
  "dselect_k": dict(num_tasks=2, num_experts=8, k=2, expert=(128, 64), tower=(32, 1), entropy_reg=1e-3),
  "snr": dict(num_tasks=2, num_subnetworks=(3, 3), subnetwork=(128, 64), tower=(32, 1)),
  "adatt": dict(num_tasks=2, num_levels=2, experts_per_task=2, num_shared_experts=2, expert=(128, 64), tower=(32, 1)),
  # the shallow tower reads "prior" as the position feature (10% dropped in train mode)
  "dupn": dict(num_tasks=2, lstm=64, attention=32, representation_dim=128, tower=(32, 1)),
  "deepmcp": dict(prediction=(128, 64, 1), matching=(64,), correlation_weight=1.0, num_negatives=4),
  "hmoe": dict(num_tasks=2, num_experts=8, expert=(128, 64), tower=(32, 1)),
  "youtube": dict(
    num_tasks=2,
    num_experts=8,
    expert=(128, 64),
    tower=(32, 1),
    bias_features=("prior",),
    position_feature="prior",
    engagement_tasks=(0,),
  ),
}
MULTI = {
  "esmm": losses.esmm_loss,
  "esm2": losses.esm2_loss,
  "aitm": losses.aitm_loss,
  "escm2": functools.partial(losses.escm2_loss, mode="dr"),
}


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--steps", type=int, default=20)
  parser.add_argument("--batch", type=int, default=1024)
  args = parser.parse_args(argv)
  rng = np.random.default_rng(0)
  b = args.batch
  x = {
    "user": rng.integers(0, 10_000, b),
    "item": rng.integers(0, 10_000, b),
    "domain": rng.integers(0, 3, b),
    "prior": rng.integers(0, 10, b),
    "dense": rng.normal(size=(b, 8)).astype(np.float32),
    # 20-step item histories in the item table, lengths uniform in 0..20 (-1 pads)
    "history": np.where(np.arange(20)[None] < rng.integers(0, 21, b)[:, None], rng.integers(0, 10_000, (b, 20)), -1),
  }
  x = {k: jnp.asarray(v) for k, v in x.items()}
  print(f"jax {jax.__version__} on {jax.default_backend()}; batch {b}; median of {args.steps} steps")
  print(_host.describe())
  print("| model | params | embedding params | fwd+bwd ms/step |")
  print("|---|---|---|---|")
  for name, cfg in CONFIGS.items():
    model = models.get(name, features=SPEC, **cfg)
    variables = dict(model.init({"params": jax.random.PRNGKey(0), "dropout": jax.random.PRNGKey(1)}, x))
    params = variables.pop("params")
    rows = 3 if name == "esm2" else 2
    labels = jnp.asarray(rng.integers(0, 2, (rows, b)), jnp.float32)
    loss_fn = losses.make_loss_fn(
      model, "bce", multi_task_loss=MULTI.get(name), train=True, mutable=tuple(variables), has_aux=True
    )
    grad = jax.jit(
      jax.grad(lambda p, v: loss_fn(p, {"x": x, "labels": labels}, {"dropout": jax.random.PRNGKey(2)}, v)[0].sum())
    )
    jax.block_until_ready(grad(params, variables))
    times = []
    for _ in range(args.steps):
      t0 = time.perf_counter()
      jax.block_until_ready(grad(params, variables))
      times.append(time.perf_counter() - t0)
    n_all = sum(int(np.size(p)) for p in jax.tree.leaves(params))
    n_emb = sum(
      int(np.size(p))
      for path, p in jax.tree_util.tree_leaves_with_path(params)
      if "embed" in jax.tree_util.keystr(path)
    )
    print(f"| {name} | {n_all:,} | {n_emb:,} | {1e3 * statistics.median(times):.2f} |")


if __name__ == "__main__":
  main()
