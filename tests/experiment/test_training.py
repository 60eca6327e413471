"""Training loop: exact resume from checkpoints, clear checkpoint errors, logs and metrics."""

import dataclasses
import json
import os

import jax
import numpy as np
import optax
import pytest

import mtjax
from mtjax import data
from mtjax import models
from mtjax import training


def _setup(method="pcgrad"):
  ds = data.conflicting_tasks(num_samples=600, seed=0)
  model = models.MMoE(num_tasks=3, num_experts=2, expert=(8,), tower=(4, 1), features=ds.spec, dropout=0.1)
  factories = {
    "pcgrad": lambda: mtjax.pcgrad(key=3, num_tasks=3),
    "gradnorm": lambda: mtjax.gradnorm(num_tasks=3, shared=models.partition(model)),
    "uncertainty": lambda: mtjax.uncertainty(num_tasks=3),
    "dwa": lambda: mtjax.dwa(num_tasks=3, steps_per_epoch=4),
  }
  return ds, model, optax.chain(factories[method](), optax.adam(1e-2))


def _leaves_equal(a, b):
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  return len(la) == len(lb) and all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(la, lb))


@pytest.mark.parametrize("method", ["pcgrad", "gradnorm", "dwa"])
def test_resume_is_bit_identical(tmp_path, method):
  ds, model, tx = _setup(method)
  kw = dict(steps=12, batch_size=64, seed=1, progress=False, log_every=1)
  full = training.fit(model, tx, ds, **kw)
  out = str(tmp_path / "run")
  part = training.fit(model, tx, ds, out_dir=out, checkpoint_every=5, stop_after=7, **kw)
  assert int(part.state.step) == 7
  resumed = training.fit(model, tx, ds, out_dir=out, checkpoint_every=5, **kw)
  assert int(resumed.state.step) == 12
  # Params, the whole optimizer state (method weights, EMA/loss history, keys) and the RNG.
  assert _leaves_equal(full.state, resumed.state)
  # Steps 6..12 were replayed from the step-5 checkpoint with the same data order.
  np.testing.assert_array_equal([r["losses"] for r in full.history[5:]], [r["losses"] for r in resumed.history])
  # The log holds every step once: records written after the checkpoint (steps 6, 7) were replaced.
  logged = [json.loads(l) for l in open(os.path.join(out, "log.jsonl"))]
  assert [r["step"] for r in logged if "losses" in r] == list(range(1, 13))
  np.testing.assert_array_equal([r["losses"] for r in logged], [r["losses"] for r in full.history])


def test_checkpoint_errors(tmp_path):
  ds, model, tx = _setup("pcgrad")
  out = str(tmp_path / "run")
  training.fit(model, tx, ds, steps=4, batch_size=64, out_dir=out, checkpoint_every=2, progress=False)
  # A different method (different state tree) cannot resume from it.
  _, _, other = _setup("uncertainty")
  with pytest.raises(training.CheckpointError, match="different experiment"):
    training.fit(model, other, ds, steps=6, batch_size=64, out_dir=out, progress=False)
  # Corrupt checkpoints are a clear error, not a crash deep in orbax (a corrupt newest one alone
  # falls back to the previous one with a warning: tests/experiment/test_faults.py).
  from mtjax.training import _checkpoint

  for _, ckpt in _checkpoint.step_dirs(os.path.join(out, "checkpoints")):
    for root, _, files in os.walk(os.path.join(ckpt, "state")):
      for f in files:
        with open(os.path.join(root, f), "wb") as fh:
          fh.write(b"garbage")
  with pytest.raises(training.CheckpointError, match="corrupt"):
    training.fit(model, tx, ds, steps=6, batch_size=64, out_dir=out, progress=False)
  out = str(tmp_path / "run2")  # a fresh run whose every meta.json is damaged
  training.fit(model, tx, ds, steps=4, batch_size=64, out_dir=out, checkpoint_every=2, progress=False)
  for name in os.listdir(os.path.join(out, "checkpoints")):
    with open(os.path.join(out, "checkpoints", name, "meta.json"), "w") as fh:
      fh.write("{not json")
  with pytest.raises(training.CheckpointError, match="corrupt"):
    training.fit(model, tx, ds, steps=6, batch_size=64, out_dir=out, progress=False)


def test_log_and_eval(tmp_path):
  ds, model, tx = _setup("gradnorm")
  train, valid = ds.split((0.8, 0.2))
  out = str(tmp_path / "run")
  res = training.fit(
    model, tx, train, steps=10, batch_size=64, eval_ds=valid, eval_every=5, log_every=2, out_dir=out, progress=False
  )
  lines = [json.loads(l) for l in open(os.path.join(out, "log.jsonl"))]
  steps = [l for l in lines if "losses" in l]
  assert [l["step"] for l in steps] == [2, 4, 6, 8, 10]
  assert all(len(l["losses"]) == 3 and len(l["weights"]) == 3 and len(l["cosine"]) == 3 for l in steps)
  # GradNorm's weights move away from 1 and keep summing to T.
  assert not np.allclose(steps[-1]["weights"], 1.0)
  np.testing.assert_allclose(np.sum(steps[-1]["weights"]), 3.0, rtol=1e-5)
  evals = [l for l in lines if "eval" in l]
  assert [e["step"] for e in evals] == [5, 10]
  assert 0.0 <= res.final_eval["task_0"]["auc"] <= 1.0
  assert set(res.final_eval["macro"]) == {"auc", "logloss"}
  assert res.ms_per_step > 0


def test_evaluate_matches_metrics_module():
  ds, model, tx = _setup("pcgrad")
  res = training.fit(model, tx, ds, steps=3, batch_size=64, progress=False)
  ev = training.evaluate(model, res.state, ds, batch_size=100)
  scores, _ = model.apply({"params": res.state.params}, ds.batch(np.arange(len(ds)))["x"])
  for t, name in enumerate(ds.task_names):
    assert ev[name]["auc"] == pytest.approx(mtjax.metrics.auc(ds.labels[t], np.asarray(scores[t])), abs=1e-6)


def test_nonfinite_data_and_bad_ids_are_clear_errors():
  ds, model, tx = _setup("pcgrad")
  # A NaN feature makes the task losses NaN: the transform's in-graph check stops training with
  # the mtjax message and the step number (no silent NaN parameters).
  features = dict(ds.features)
  features["dense"] = features["dense"].copy()
  features["dense"][:, 0] = np.nan
  bad = data.MultiTaskDataset(
    features=features, labels=ds.labels, task_names=ds.task_names, spec=ds.spec, task_types=ds.task_types
  )
  with pytest.raises(ValueError, match=r"mtjax: non-finite task losses .*\[at training step 1\]"):
    training.fit(model, tx, bad, steps=3, batch_size=64, progress=False)
  # With the in-graph checks compiled out, the loop's own host-side check still stops it.
  with mtjax.runtime_checks(False):
    with pytest.raises(ValueError, match=r"mtjax: non-finite task losses .* at step 1"):
      training.fit(model, tx, bad, steps=3, batch_size=64, progress=False)
  # Ids outside the vocabulary with oov="error" are an error inside the jitted step too.
  strict = models.MMoE(
    num_tasks=3, num_experts=2, expert=(8,), tower=(4, 1), features=dataclasses.replace(ds.spec, oov="error")
  )
  features = dict(ds.features)
  features["cat_0"] = features["cat_0"].copy()
  features["cat_0"][5] = ds.spec.categorical[0].vocab_size + 3
  out_of_range = data.MultiTaskDataset(
    features=features, labels=ds.labels, task_names=ds.task_names, spec=ds.spec, task_types=ds.task_types
  )
  with pytest.raises(ValueError, match=r"mtjax: feature 'cat_0' has ids outside"):
    training.fit(strict, tx, out_of_range, steps=30, batch_size=64, progress=False)


def test_progress_bar_shows_steps_and_task_losses(monkeypatch):
  import io
  import sys

  class Terminal(io.StringIO):
    def isatty(self):
      return True

  ds, model, tx = _setup("pcgrad")
  term = Terminal()
  monkeypatch.setattr(sys, "stderr", term)
  training.fit(model, tx, ds, steps=4, batch_size=64, log_every=2, progress=True, desc="demo")
  out = term.getvalue()
  assert "demo" in out and "4/4" in out and "task_0=" in out and "task_2=" in out, out
  # Not a terminal (a CI log): no progress bar at all.
  plain = io.StringIO()
  monkeypatch.setattr(sys, "stderr", plain)
  training.fit(model, tx, ds, steps=2, batch_size=64, progress=True)
  assert plain.getvalue() == ""


def test_fit_weights_the_task_losses_with_the_datasets_sample_weights():
  """Sample weights of a MultiTaskDataset reach the per-task losses of every step ('valid'
  normalization: weights 2 everywhere double the losses; weight 0 on a task silences it)."""
  base = data.conflicting_tasks(num_samples=256, num_tasks=2, seed=0)
  model = models.MMoE(num_tasks=2, num_experts=2, expert=(4,), tower=(2, 1), features=base.spec)
  tx = optax.chain(mtjax.linear(num_tasks=2), optax.sgd(0.0))  # no update: same parameters every step

  def first_losses(ds):
    res = training.fit(model, tx, ds, steps=2, batch_size=64, progress=False, track_similarity=False, log_every=1)
    return np.asarray(res.history[0]["losses"])

  plain = first_losses(base)
  twice = dataclasses.replace(base, weights=np.full(len(base), 2.0, np.float32))
  np.testing.assert_allclose(first_losses(twice), 2 * plain, rtol=1e-5)
  w = np.ones((2, len(base)), np.float32)
  w[1] = 0.0
  silenced = first_losses(dataclasses.replace(base, weights=w))
  np.testing.assert_allclose(silenced, [plain[0], 0.0], rtol=1e-5, atol=1e-7)
  sub = twice.subset(np.arange(10))
  assert sub.weights.shape == (2, 10) and sub.batch(np.arange(3))["weights"].shape == (2, 3)
  with pytest.raises(ValueError, match="finite and non-negative"):
    dataclasses.replace(base, weights=-np.ones(len(base)))
  with pytest.raises(ValueError, match=r"weights must be \[T, N\]"):
    dataclasses.replace(base, weights=np.ones(5))


def test_resume_with_an_empty_state_leaf(tmp_path):
  """A method built without num_tasks keeps a (0,)-shaped weights leaf until it knows T; orbax refuses
  to write empty arrays, so the checkpoint leaves it out and rebuilds it on restore (was a save error)."""
  ds, model, _ = _setup("pcgrad")
  tx = optax.chain(mtjax.pcgrad(key=3), optax.adam(1e-2))
  assert any(
    np.size(x) == 0 for x in jax.tree.leaves(tx.init(model.init(jax.random.PRNGKey(0), ds.batch(np.arange(2))["x"])))
  )
  kw = dict(steps=6, batch_size=64, seed=1, progress=False)
  full = training.fit(model, tx, ds, **kw)
  out = str(tmp_path / "run")
  training.fit(model, tx, ds, out_dir=out, checkpoint_every=2, stop_after=3, **kw)
  resumed = training.fit(model, tx, ds, out_dir=out, checkpoint_every=2, **kw)
  assert _leaves_equal(full.state, resumed.state)
