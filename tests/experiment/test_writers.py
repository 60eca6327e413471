"""Metrics writers of fit: a callback gets log.jsonl's records, TensorBoard files hold them, a resume shows each
step once."""

import glob
import json
import os
import sys

import numpy as np
import optax
import pytest

import mtjax
from mtjax import data
from mtjax import experiment
from mtjax import models
from mtjax import training
from mtjax.experiment import _config

KW = dict(batch_size=32, seed=1, progress=False, log_every=1)


def _setup():
  ds = data.conflicting_tasks(num_samples=300, seed=0)
  train, valid = ds.split((0.8, 0.2))
  model = models.MMoE(num_tasks=3, num_experts=2, expert=(8,), tower=(4, 1), features=ds.spec)
  return train, valid, model, optax.chain(mtjax.uncertainty(num_tasks=3), optax.adam(1e-2))


def _log(out):
  with open(os.path.join(out, "log.jsonl")) as f:
    return [json.loads(line) for line in f]


def _tensorboard(logdir):
  """``{tag: [(step, value), ...]}`` as TensorBoard shows it (its own reader, which applies purges)."""
  from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

  acc = EventAccumulator(logdir, size_guidance={"scalars": 0})  # 0: keep every point
  acc.Reload()
  return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def _raw_steps(logdir, tag):
  """The steps of ``tag`` in the event files as written, stale points included."""
  from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

  steps = []
  for path in sorted(glob.glob(os.path.join(logdir, "events.out.tfevents.*"))):
    steps += [e.step for e in EventFileLoader(path).Load() if any(v.tag == tag for v in e.summary.value)]
  return steps


def _expected(records, names):
  """The scalars of log.jsonl records, built by hand: ``{tag: [(step, float32 value), ...]}``."""
  f32 = lambda v: float(np.float32(v))
  out: dict = {}
  add = lambda tag, step, v: out.setdefault(tag, []).append((step, f32(v)))
  for r in records:
    if "losses" in r:
      for k, n in enumerate(names):
        add(f"loss/{n}", r["step"], r["losses"][k])
        add(f"weight/{n}", r["step"], r["weights"][k])
      add("conflict", r["step"], r["conflict"])
      for i in range(len(names)):
        for j in range(i + 1, len(names)):
          add(f"cosine/{names[i]}-{names[j]}", r["step"], r["cosine"][i][j])
    else:
      for task, metrics in r["eval"].items():
        for metric, v in metrics.items():
          add(f"eval/{task}/{metric}", r["step"], v)
  return out


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """One fit of 4 steps (evaluations at step 2 and the end) with a callback, a callable and TensorBoard."""
  train, valid, model, tx = _setup()
  out = str(tmp_path_factory.mktemp("writers") / "run")
  seen, plain = [], []
  res = training.fit(
    model,
    tx,
    train,
    steps=4,
    eval_ds=valid,
    eval_every=2,
    out_dir=out,
    writers=[training.CallbackWriter(seen.append), plain.append, training.TensorBoardWriter(os.path.join(out, "tb"))],
    **KW,
  )
  return res, out, seen, plain, list(train.task_names)


def test_callback_writer_receives_exactly_the_records_of_log_jsonl(run):
  res, out, seen, plain, _ = run
  logged = _log(out)
  assert [r["step"] for r in logged] == [1, 2, 2, 3, 4, 4]  # training records and evaluations at 2 and 4
  assert seen == logged and plain == logged  # same records, same values, same order
  assert [r for r in seen if "losses" in r] == res.history


def test_tensorboard_scalars_have_readable_tags_and_the_logged_values(run):
  _, out, _, _, names = run
  got = _tensorboard(os.path.join(out, "tb"))
  want = _expected(_log(out), names)
  assert {
    "loss/task_0",
    "weight/task_2",
    "conflict",
    "cosine/task_0-task_1",
    "cosine/task_1-task_2",
    "eval/task_0/auc",
    "eval/macro/auc",
  } <= set(got)
  assert not any(t.startswith("cosine/task_1-task_0") or t == "cosine/task_0-task_0" for t in got)  # upper triangle
  assert got == want


def test_resume_shows_every_step_once_in_tensorboard(tmp_path):
  train, valid, model, tx = _setup()
  out, tb = str(tmp_path / "run"), str(tmp_path / "run" / "tb")
  kw = dict(steps=6, eval_ds=valid, eval_every=3, out_dir=out, checkpoint_every=2, **KW)
  part = training.fit(model, tx, train, stop_after=3, writers=[training.TensorBoardWriter(tb)], **kw)  # "killed" at 3
  assert int(part.state.step) == 3
  res = training.fit(model, tx, train, writers=[training.TensorBoardWriter(tb)], **kw)  # resumes from step 2
  assert int(res.state.step) == 6
  # The files hold step 3 twice (written, then replayed from the step-2 checkpoint) ...
  assert _raw_steps(tb, "loss/task_0") == [1, 2, 3, 3, 4, 5, 6]
  assert _raw_steps(tb, "eval/task_0/auc") == [3, 3, 6]
  # ... and TensorBoard shows every step once, with the values of the (resumed) log.
  got = _tensorboard(tb)
  assert all(len({s for s, _ in pts}) == len(pts) for pts in got.values())
  assert [s for s, _ in got["loss/task_0"]] == [1, 2, 3, 4, 5, 6]
  assert got == _expected(_log(out), list(train.task_names))


def test_a_failing_writer_stops_training_and_is_named(tmp_path):
  train, _, model, tx = _setup()
  events = []

  class Failing(training.MetricsWriter):
    def write_scalars(self, step, values):
      events.append(("write", step))
      if step == 2:
        raise RuntimeError("my dashboard is down")

    def close(self):
      events.append(("close",))

  out = str(tmp_path / "run")
  with pytest.raises(RuntimeError, match="my dashboard is down") as info:
    training.fit(model, tx, train, steps=4, out_dir=out, writers=[Failing()], **KW)
  assert any("metrics writer" in note and "Failing" in note for note in info.value.__notes__)
  assert events == [("write", 1), ("write", 2), ("close",)]  # stopped at once, closed in the end
  assert [r["step"] for r in _log(out)] == [1, 2]  # log.jsonl is closed (flushed) too


def test_writers_must_be_writers_or_callables():
  train, _, model, tx = _setup()
  with pytest.raises(TypeError, match="^mtjax: fit: writers must be"):
    training.fit(model, tx, train, steps=2, writers=[42], **KW)


def test_tensorboard_writer_without_tensorboardx_says_what_to_install(monkeypatch):
  monkeypatch.setitem(sys.modules, "tensorboardX", None)  # "import tensorboardX" raises ImportError
  with pytest.raises(ImportError, match=r"^mtjax: .*pip install 'mtjax\[tensorboard\]'"):
    training.TensorBoardWriter("unused")
  monkeypatch.setattr(_config, "_missing", lambda module: module == "tensorboardX")
  with pytest.raises(experiment.ConfigError, match=r"tensorboard = true needs tensorboardX.*mtjax\[tensorboard\]"):
    experiment.from_dict(_raw(tensorboard=True))


def _raw(**train):
  return {
    "name": "tiny",
    "data": {"name": "conflicting", "num_samples": 300},
    "model": {"name": "mmoe", "num_experts": 2, "expert": [8], "tower": [4, 1]},
    "method": {"name": "pcgrad"},
    "optimizer": {"name": "adam", "learning_rate": 0.01},
    "train": {"steps": 5, "batch_size": 32, "log_every": 1, **train},
  }


def test_train_tensorboard_config_writes_event_files_into_the_run_folder(tmp_path):
  with pytest.raises(experiment.ConfigError, match="train.tensorboard must be bool"):
    experiment.from_dict(_raw(tensorboard="yes"))
  assert experiment.from_dict(_raw()).train.tensorboard is False
  cfg = experiment.from_dict(_raw(tensorboard=True))
  out = str(tmp_path / "run")
  res = experiment.run(cfg, out_dir=out, progress=False, plots=False)
  logged = _log(out)
  assert [r["step"] for r in logged if "losses" in r] == [1, 2, 3, 4, 5]
  assert glob.glob(os.path.join(out, "tensorboard", "events.out.tfevents.*"))
  got = _tensorboard(os.path.join(out, "tensorboard"))
  assert got == _expected(logged, [k for k in res.test if k != "macro"])  # the task names
  assert [s for s, _ in got["eval/macro/auc"]] == [5]  # the final validation evaluation
