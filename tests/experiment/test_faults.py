"""Faults around a run: relative folders, kills, reruns, corrupt checkpoints, full disks, restarts, failed checks."""

import errno
import json
import os
import shutil
import subprocess
import sys
import textwrap

import jax
import numpy as np
import optax
import pytest

import mtjax
from mtjax import cli
from mtjax import data
from mtjax import training
from mtjax.training import _checkpoint

KW = dict(steps=6, batch_size=32, seed=1, progress=False, log_every=1, checkpoint_every=3, track_similarity=False)
SETUP = """
import mtjax, optax
from mtjax import data, models
ds = data.conflicting_tasks(num_samples=256, seed=0)
train, valid = ds.split((0.75, 0.25))
model = models.MMoE(num_tasks=3, num_experts=2, expert=(4,), tower=(2, 1), features=ds.spec)
tx = optax.chain(mtjax.linear(num_tasks=3), optax.adam(1e-2))
"""


def _setup(method="linear"):
  env: dict = {}
  exec(SETUP, env)
  tx = env["tx"] if method == "linear" else optax.chain(mtjax.pcgrad(key=3, num_tasks=3), optax.adam(1e-2))
  return env["train"], env["valid"], env["model"], tx


def _fit(out, **kw):
  train, valid, model, tx = _setup()
  return training.fit(model, tx, train, eval_ds=valid, out_dir=out, **{**KW, **kw})


def _log(out):
  with open(os.path.join(out, "log.jsonl")) as f:
    return f.read()


def _same(a, b):
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  return len(la) == len(lb) and all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(la, lb))


def _ckpt_steps(out):
  return [s for s, _ in _checkpoint.step_dirs(os.path.join(out, "checkpoints"))]


@pytest.fixture(scope="module", autouse=True)
def compile_cache():
  """The in-graph checks are off here (fewer host callbacks to compile) except in the tests of
  failing checks, which switch them on. No persistent compilation cache: changing jax's global
  cache configuration inside a pytest-xdist worker preceded a segfault in a later module's compile
  (CI, 2026-11-30), so this module pays its compilations."""
  with mtjax.runtime_checks(False):
    yield None


@pytest.fixture(scope="module")
def ref(tmp_path_factory):
  """An uninterrupted run with checkpoints at steps 3 and 6, and its final evaluation."""
  out = str(tmp_path_factory.mktemp("ref") / "run")
  res = _fit(out)
  assert _ckpt_steps(out) == [3, 6]
  return out, res, _log(out)


def _copy(ref, tmp_path):
  out = str(tmp_path / "run")
  shutil.copytree(ref[0], out)
  return out


def test_relative_out_dir_resumes_bit_identically(ref, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  part = _fit("runs/one", stop_after=4)
  assert int(part.state.step) == 4 and _ckpt_steps("runs/one") == [3]
  resumed = _fit("runs/one")  # resumes from step 3 (orbax needs absolute paths: resolved in fit)
  assert int(resumed.state.step) == 6 and _same(resumed.state, ref[1].state)
  assert _log("runs/one") == ref[2]


def test_kill_right_after_a_checkpoint_loses_no_log_record(ref, tmp_path, compile_cache):
  out = str(tmp_path / "run")
  script = SETUP + textwrap.dedent(f"""
      import os
      from mtjax import training
      from mtjax.training import _checkpoint
      save = _checkpoint.save
      def save_then_die(*args, **kwargs):
        path = save(*args, **kwargs)
        if kwargs["step"] == 3:
          os.kill(os.getpid(), 9)
        return path
      _checkpoint.save = save_then_die
      training.fit(model, tx, train, eval_ds=valid, out_dir={out!r}, **{KW!r})
      """)
  env = {**os.environ, "MTJAX_RUNTIME_CHECKS": "0"}
  proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=env)
  assert proc.returncode == -9, proc.stderr[-2000:]
  assert _ckpt_steps(out) == [3]
  # Every record up to the checkpoint's step reached the disk before the kill.
  ref_records = [json.loads(line) for line in ref[2].splitlines()]
  want = [r for r in ref_records if r["step"] <= 3]
  assert [json.loads(line) for line in _log(out).splitlines()] == want
  with open(os.path.join(out, "log.jsonl"), "a") as f:  # and a torn line from a kill mid-write is dropped
    f.write('{"step": 4, "losses": [0.1')
  resumed = _fit(out)
  assert _same(resumed.state, ref[1].state)
  assert _log(out) == ref[2]


def test_rerun_of_a_finished_folder_changes_nothing(ref, tmp_path):
  out = _copy(ref, tmp_path)
  before = _log(out)
  assert before.count('"eval"') == 1  # the final one
  res = _fit(out)
  assert _log(out) == before  # no second final eval record
  assert res.history == [] and _same(res.state, ref[1].state)  # nothing retrained
  assert res.final_eval == ref[1].final_eval


def _flip(path, at=0.5):
  with open(path, "r+b") as f:
    f.seek(int(os.path.getsize(path) * at))
    byte = f.read(1)
    f.seek(-1, 1)
    f.write(bytes([byte[0] ^ 0x10]))


def _state_files(ckpt):
  """The files orbax wrote for a checkpoint's arrays (some it does not read back)."""
  return sorted(os.path.join(r, f) for r, _, fs in os.walk(os.path.join(ckpt, "state")) for f in fs)


def test_no_flipped_bit_restores_silently(ref, tmp_path):
  out = _copy(ref, tmp_path)
  ckpt = dict(_checkpoint.step_dirs(os.path.join(out, "checkpoints")))[6]
  like = ref[1].state
  caught = 0
  for path in _state_files(ckpt):  # a flipped bit in each file in turn: an error or (a file not read) the exact state
    _flip(path)
    try:
      state, _ = _checkpoint.restore(ckpt, like)
      assert _same(state, ref[1].state), f"a flipped bit in {path} restored silently with changed values"
    except _checkpoint.CheckpointCorruptError as e:
      assert str(e).startswith("mtjax: checkpoint ")
      caught += 1
    _flip(path)  # undo
  assert caught > 0
  _checkpoint.restore(ckpt, like)


def test_corrupt_newest_checkpoint_falls_back_with_a_warning(ref, tmp_path):
  out = _copy(ref, tmp_path)
  ckpts = dict(_checkpoint.step_dirs(os.path.join(out, "checkpoints")))
  for path in _state_files(ckpts[6]):
    _flip(path)
  with pytest.warns(UserWarning, match="mtjax: resuming from .*step_3.*step_6 is corrupt") as record:
    res = _fit(out)
  assert sum("step_6 is corrupt" in str(w.message) for w in record) == 1
  assert int(res.state.step) == 6 and _same(res.state, ref[1].state)  # steps 4..6 replayed from step 3
  assert _log(out) == ref[2]
  # Flipped bits in every checkpoint: a clear error, nothing restored silently.
  ckpts = dict(_checkpoint.step_dirs(os.path.join(out, "checkpoints")))
  for ckpt in ckpts.values():
    for path in _state_files(ckpt):
      _flip(path)
  with pytest.raises(training.CheckpointError, match=r"^mtjax: no valid checkpoint"):
    _fit(out)


def test_from_step_restarts_from_an_earlier_checkpoint(ref, tmp_path):
  out = _copy(ref, tmp_path)
  with pytest.raises(training.CheckpointError, match=r"^mtjax: no checkpoint of step 2 .*available steps: 3, 6\.$"):
    _fit(out, from_step=2)
  assert _ckpt_steps(out) == [3, 6]  # an error deletes nothing
  part = _fit(out, from_step=3, stop_after=1)
  assert int(part.state.step) == 4 and _ckpt_steps(out) == [3]  # later checkpoints and records dropped
  assert max(json.loads(line)["step"] for line in _log(out).splitlines()) == 4
  res = _fit(out)  # and the run then equals an uninterrupted one
  assert _same(res.state, ref[1].state) and _log(out) == ref[2]


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS])
def test_failed_checkpoint_write_is_one_line_and_keeps_older_checkpoints(ref, tmp_path, monkeypatch, code):
  import orbax.checkpoint as ocp

  out = _copy(ref, tmp_path)
  ckpt_dir = os.path.join(out, "checkpoints")

  def fail(self, *args, **kwargs):
    raise OSError(code, os.strerror(code), ckpt_dir)

  monkeypatch.setattr(ocp.StandardCheckpointer, "save", fail)
  with pytest.raises(_checkpoint.CheckpointSaveError) as info:
    if code == errno.ENOSPC:  # a full disk at the step-9 checkpoint of a resumed run
      _fit(out, steps=9)
    else:
      _checkpoint.save(ckpt_dir, ref[1].state, step=9, data_state={}, keep=1)
  message = str(info.value)
  assert message.startswith("mtjax: could not write the checkpoint of step 9") and "\n" not in message
  assert info.value.errno == code and errno.errorcode[code] in message
  assert sorted(os.listdir(ckpt_dir)) == ["step_3", "step_6"]  # nothing pruned, no partial folder left
  _checkpoint.restore(os.path.join(ckpt_dir, "step_6"), ref[1].state)  # and the kept ones are complete


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders (the errno cases simulate it)")
def test_read_only_output_folder_is_one_line(ref, tmp_path):
  out = _copy(ref, tmp_path)
  ckpt_dir = os.path.join(out, "checkpoints")
  os.chmod(ckpt_dir, 0o500)
  try:
    with pytest.raises(_checkpoint.CheckpointSaveError, match=r"^mtjax: could not write .*Permission denied"):
      _fit(out, steps=9)
    assert _ckpt_steps(out) == [3, 6]
  finally:
    os.chmod(ckpt_dir, 0o700)


def _nan_at_step(train, step, *, seed, batch_size):
  """``train`` with a NaN feature in the first sample of the batch of ``step`` (1-based, first epoch)."""
  idx = data.epoch_order(len(train), seed=seed, epoch=0)[(step - 1) * batch_size]
  features = dict(train.features)
  features["dense"] = features["dense"].copy()
  features["dense"][idx, 0] = np.nan
  return data.MultiTaskDataset(
    features=features, labels=train.labels, task_names=train.task_names, spec=train.spec, task_types=train.task_types
  )


CLI_CONFIG = """
name = "tiny"
[data]
name = "conflicting"
num_samples = 400
[model]
name = "mmoe"
num_experts = 2
expert = [4]
tower = [2, 1]
[method]
name = "pcgrad"
[optimizer]
name = "adam"
learning_rate = 0.01
[train]
steps = 5
batch_size = 32
log_every = 1
track_similarity = false
"""


def test_failed_in_graph_check_at_a_later_step_is_one_mtjax_line(tmp_path, monkeypatch, capfd):
  """A NaN reaching pcgrad's in-graph check at step 3 (not the first, compiled, call): through fit and
  ``mtjax run`` it is one ``mtjax: ... [at training step 3]`` line on stderr and exit code 2 (one
  test for both: a step with host callbacks is compiled anew by every run)."""
  from mtjax.experiment import _runner

  load = _runner.load_data

  def load_with_nan(cfg):
    train, valid, test = load(cfg)
    return _nan_at_step(train, 3, seed=cfg.train.seed, batch_size=cfg.train.batch_size), valid, test

  monkeypatch.setattr(_runner, "load_data", load_with_nan)
  cfg = tmp_path / "cfg.toml"
  cfg.write_text(CLI_CONFIG)
  with mtjax.runtime_checks(True):
    assert cli.main(["run", str(cfg), "--out", str(tmp_path / "out"), "--no-progress"]) == 2
  err = capfd.readouterr().err.strip().splitlines()
  # The NaN reaches the losses and the gradients; whichever of pcgrad's checks names it first, one line.
  assert len(err) == 1 and err[0].startswith("mtjax: non-finite task") and "pcgrad" in err[0], err
  assert err[0].endswith("[at training step 3]"), err
  # --from-step with a step that has no checkpoint: the available steps, one line.
  assert cli.main(["run", str(cfg), "--out", str(tmp_path / "out"), "--no-progress", "--from-step", "2"]) == 2
  err = capfd.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("mtjax: no checkpoint of step 2") and "available steps: none" in err[0]
