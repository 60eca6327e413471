"""One process of the multi-host tests (tests/experiment/test_multihost.py); not a test module.

``python _multihost_worker.py PHASE OUT [COORDINATOR NUM_PROCESSES PROCESS_ID]``

- ``first`` (each of 2 processes under ``jax.distributed``): ``mtjax run`` of a tiny config through
  the command line (which starts ``jax.distributed``), then ``fit`` with PCGrad and with MGDA, PCGrad
  on the same data from an on-disk store, then a checkpointed PCGrad run stopped after 3 of 6 steps.
- ``resume`` (2 processes): the checkpointed run resumed to its end.
- ``single`` (one process with 2 CPU devices): the PCGrad and MGDA runs on a 2-device mesh and on
  one device.

Every run's parameters and log go to ``OUT/<run>_p<process>.npz`` / ``.json``.
"""

import json
import os
import shutil
import sys

import numpy as np


def main() -> None:
  phase, out = sys.argv[1], sys.argv[2]
  import jax

  if phase in ("first", "resume"):
    coordinator, num, pid = sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
    if phase == "first":  # the command line starts jax.distributed, then trains a config on the global mesh
      from mtjax import cli

      cfg = os.path.join(out, "tiny.toml")
      argv = ["run", cfg, "--out", os.path.join(out, "cli"), "--no-progress"]
      argv += ["--coordinator", coordinator, "--num-processes", str(num), "--process-id", str(pid)]
      assert cli.main(argv) == 0
    else:
      from mtjax import training

      training.initialize_distributed(coordinator, num_processes=num, process_id=pid)
    assert jax.process_count() == num and jax.process_index() == pid, (jax.process_count(), jax.process_index())
  import optax
  from jax.sharding import Mesh

  import mtjax
  from mtjax import data
  from mtjax import models
  from mtjax import training

  ds = data.mmoe_synthetic(256, 0.5, dim=8, seed=0)
  valid = data.mmoe_synthetic(96, 0.5, dim=8, seed=1)
  model = models.MMoE(num_tasks=2, num_experts=2, expert=(8,), tower=(4, 1))
  methods = {
    "pcgrad": lambda: optax.chain(mtjax.pcgrad(key=3, num_tasks=2), optax.adam(1e-2)),
    "mgda": lambda: optax.chain(mtjax.mgda(num_tasks=2, normalization="loss+"), optax.sgd(0.1)),
  }
  kw = dict(steps=6, batch_size=32, seed=2, progress=False, log_every=1, eval_ds=valid, eval_every=2)
  mesh = Mesh(np.array(jax.devices()), ("data",))
  me = jax.process_index()

  def dump(name, res):
    leaves = [np.asarray(training._distributed.host_value(x)) for x in jax.tree.leaves(res.state)]
    np.savez(os.path.join(out, f"{name}_p{me}.npz"), *leaves)
    with open(os.path.join(out, f"{name}_p{me}.json"), "w") as f:
      json.dump({"history": res.history, "final_eval": res.final_eval, "evals": res.evals}, f, default=float)

  ckpt = os.path.join(out, "ckpt")
  if phase == "first":
    errors = []  # misuse: no mesh, or a mesh of this process's devices only
    for bad in (None, Mesh(np.array(jax.local_devices()), ("data",))):
      try:
        training.fit(model, methods["pcgrad"](), ds, mesh=bad, **kw)
      except ValueError as e:
        errors.append(str(e))
    with open(os.path.join(out, f"errors_p{me}.json"), "w") as f:
      json.dump(errors, f)
    for name, tx in methods.items():
      dump(name, training.fit(model, tx(), ds, mesh=mesh, **kw))
    # the same data from an on-disk store: each process reads only its part of every global batch
    stored = data.open_store(os.path.join(out, "store"))
    dump("pcgrad_store", training.fit(model, methods["pcgrad"](), stored, mesh=mesh, **kw))
    stopped = training.fit(
      model, methods["pcgrad"](), ds, mesh=mesh, out_dir=ckpt, checkpoint_every=2, stop_after=3, **kw
    )
    dump("stopped", stopped)
    if me == 0:  # the log of the interrupted run, before the resume trims it
      shutil.copy(os.path.join(ckpt, "log.jsonl"), os.path.join(out, "stopped_log.jsonl"))
  elif phase == "resume":
    dump("resumed", training.fit(model, methods["pcgrad"](), ds, mesh=mesh, out_dir=ckpt, checkpoint_every=2, **kw))
  else:
    assert jax.device_count() == 2 and jax.process_count() == 1
    for name, tx in methods.items():
      dump(f"{name}_mesh", training.fit(model, tx(), ds, mesh=mesh, **kw))
      dump(f"{name}_one", training.fit(model, tx(), ds, **kw))
  print(f"process {me}: {phase} done", flush=True)


if __name__ == "__main__":
  main()
