"""Multi-host (multi-controller) training: two processes under ``jax.distributed`` train like one.

Two processes on this machine (localhost coordinator, gloo CPU collectives, one CPU device each)
run ``tests/experiment/_multihost_worker.py``: ``mtjax run --coordinator ...``, ``fit`` with PCGrad
and MGDA on the global 2-device mesh, and a checkpointed run stopped after 3 of 6 steps, which a
second two-process launch resumes. A one-process run with 2 CPU devices (a 2-device mesh, and one
device) runs the same global batches. Every launch has a timeout and its processes are killed on
failure.
"""

import json
import os
import socket
import subprocess
import sys
import textwrap
import time

import numpy as np

from mtjax import cli
from mtjax import data

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_multihost_worker.py")
TIMEOUT = 180  # seconds per launch; the whole test takes ~35 s on 2 cores

CONFIG = """
name = "tiny"
seeds = [0]
[data]
name = "mmoe_synthetic"
num_samples = 400
correlation = 0.5
dim = 8
[model]
name = "mmoe"
num_experts = 2
expert = [8]
tower = [4, 1]
[method]
name = "pcgrad"
[optimizer]
name = "adam"
learning_rate = 0.01
[train]
steps = 2
batch_size = 32
log_every = 1
checkpoint_every = 2
"""


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _launch(jobs, out) -> list:
  """Runs ``[(name, argv, env)]`` at once; kills them all on a failure or after ``TIMEOUT``. Returns their outputs."""
  procs, logs = [], []
  try:
    for name, argv, env in jobs:
      log = open(os.path.join(out, f"{name}.log"), "w+")
      logs.append(log)
      procs.append(subprocess.Popen([sys.executable, WORKER, *argv], env=env, stdout=log, stderr=subprocess.STDOUT))
    deadline = time.monotonic() + TIMEOUT
    while any(p.poll() is None for p in procs):
      if time.monotonic() > deadline or any(p.poll() not in (None, 0) for p in procs):
        break
      time.sleep(0.2)
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
      p.wait()
  texts = []
  for log in logs:
    log.seek(0)
    texts.append(log.read())
    log.close()
  for (name, _, _), p, text in zip(jobs, procs, texts):
    assert p.returncode == 0, (
      f"{name} failed (exit {p.returncode}; killed after a failure or {TIMEOUT} s):\n{text[-6000:]}"
    )
  return texts


def _leaves(out, name):
  with np.load(os.path.join(out, f"{name}.npz")) as z:
    return [z[f"arr_{i}"] for i in range(len(z.files))]


def _run(out, name):
  with open(os.path.join(out, f"{name}.json")) as f:
    return json.load(f)


def _max_diff(a, b) -> float:
  assert len(a) == len(b) and all(x.shape == y.shape and x.dtype == y.dtype for x, y in zip(a, b))
  return max(float(np.max(np.abs(x.astype(np.float64) - y))) for x, y in zip(a, b) if x.size)


def _records(path):
  with open(path) as f:
    return [json.loads(line) for line in f]


def test_two_processes_train_like_one(tmp_path):
  out = str(tmp_path)
  with open(os.path.join(out, "tiny.toml"), "w") as f:
    f.write(textwrap.dedent(CONFIG))
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env["JAX_PLATFORMS"] = "cpu"
  single_env = dict(env, XLA_FLAGS="--xla_force_host_platform_device_count=2")
  data.write_store(data.mmoe_synthetic(256, 0.5, dim=8, seed=0), os.path.join(out, "store"))  # the workers' ds
  for phase in ("first", "resume"):
    coordinator = f"localhost:{_free_port()}"
    jobs = [(f"{phase}_p{i}", [phase, out, coordinator, "2", str(i)], env) for i in range(2)]
    if phase == "first":  # the one-process reference runs alongside
      jobs.append(("single", ["single", out], single_env))
    texts = _launch(jobs, out)
    if phase == "first":
      # mtjax run --coordinator ...: process 0 reports and writes the run's files, process 1 neither.
      assert "test metrics" in texts[0] and "test metrics" not in texts[1]
      run_dir = os.path.join(out, "cli")
      assert sorted(os.listdir(os.path.join(run_dir, "checkpoints"))) == ["step_2"]
      assert [r["step"] for r in _records(os.path.join(run_dir, "log.jsonl"))] == [1, 2, 2]  # losses 1, 2; eval
      assert json.load(open(os.path.join(run_dir, "results.json")))["test"]["macro"]["mse"] > 0
      for p in range(2):  # misuse is a clear error on every process
        no_mesh, local_mesh = _run(out, f"errors_p{p}")
        assert no_mesh.startswith("mtjax: fit: this is a multi-host run (2 processes"), no_mesh
        assert "must hold all 2 global devices" in local_mesh, local_mesh

  # (a) The same final parameters as one process on the same global batches: bit-identical on a
  # 2-device mesh (the same SPMD program), to float rounding on one device (measured: at most
  # 1.2e-7 apart after 6 steps, the summation order of the batch reductions).
  for method in ("pcgrad", "mgda"):
    multi, other = _leaves(out, f"{method}_p0"), _leaves(out, f"{method}_p1")
    assert _max_diff(multi, other) == 0.0, method  # every process holds the same replicated state
    assert _max_diff(multi, _leaves(out, f"{method}_mesh_p0")) <= 1e-6, method
    assert _max_diff(multi, _leaves(out, f"{method}_one_p0")) <= 1e-6, method
    hist, ref = _run(out, f"{method}_p0")["history"], _run(out, f"{method}_mesh_p0")["history"]
    assert len(hist) == 6
    np.testing.assert_allclose([r["losses"] for r in hist], [r["losses"] for r in ref], rtol=1e-6, atol=1e-6)
    assert _run(out, f"{method}_p0") == _run(out, f"{method}_p1")  # the same FitResult on every process
  # from a store (each process reading its part of each global batch from disk): the in-memory run, bit for bit
  for p in range(2):
    assert _max_diff(_leaves(out, f"pcgrad_store_p{p}"), _leaves(out, "pcgrad_p0")) == 0.0

  # (b) Stopped after 3 steps (checkpoint at step 2), resumed by a second launch: the uninterrupted run.
  uninterrupted = _leaves(out, "pcgrad_p0")
  for p in range(2):
    assert _max_diff(_leaves(out, f"resumed_p{p}"), uninterrupted) == 0.0
  assert _max_diff(_leaves(out, "stopped_p0"), uninterrupted) > 0  # it did stop early
  assert sorted(os.listdir(os.path.join(out, "ckpt", "checkpoints"))) == ["step_4", "step_6"]
  assert _run(out, "resumed_p0")["final_eval"] == _run(out, "pcgrad_p0")["final_eval"]

  # (c) One log.jsonl, written by process 0: every step once, evaluations at 2, 4, 6, as the uninterrupted run's.
  stopped = _records(os.path.join(out, "stopped_log.jsonl"))
  assert [(r["step"], "eval" in r) for r in stopped] == [(1, False), (2, False), (2, True), (3, False)]
  log = _records(os.path.join(out, "ckpt", "log.jsonl"))
  assert [r["step"] for r in log if "losses" in r] == [1, 2, 3, 4, 5, 6]
  assert [r["step"] for r in log if "eval" in r] == [2, 4, 6]
  reference = _run(out, "pcgrad_p0")
  assert [r for r in log if "losses" in r] == reference["history"]
  assert [r["eval"] for r in log if "eval" in r] == [ev for _, ev in reference["evals"]]
  assert sorted(os.listdir(os.path.join(out, "ckpt"))) == ["checkpoints", "log.jsonl"]


def test_distributed_flags_go_together(tmp_path, capsys):
  cfg = tmp_path / "tiny.toml"
  cfg.write_text(textwrap.dedent(CONFIG))
  assert cli.main(["run", str(cfg), "--out", str(tmp_path / "out"), "--coordinator", "localhost:1234"]) == 2
  assert "--coordinator, --num-processes and --process-id go together" in capsys.readouterr().err
  assert not os.path.exists(tmp_path / "out")  # refused before anything ran
