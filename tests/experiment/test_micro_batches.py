"""Micro-batches in the training loop: MoDo and SDMGrad (num_batches independent micro-batches per step)
through ``make_train_step`` / ``fit(micro_batches=M)`` and the experiment runner."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import mtjax
from mtjax import analysis
from mtjax import data
from mtjax import experiment
from mtjax import losses as losses_lib
from mtjax import models
from mtjax import training
from mtjax.experiment import _config


def _setup(num_samples=300, dropout=0.0):
  ds = data.conflicting_tasks(num_samples=num_samples, seed=0)
  model = models.MMoE(num_tasks=3, num_experts=2, expert=(8,), tower=(4, 1), features=ds.spec, dropout=dropout)
  return ds, model


def test_split_batch_follows_the_sample_axis_of_every_entry():
  rng = np.random.default_rng(0)
  batch = {
    "x": {"dense": rng.normal(size=(7, 2)).astype(np.float32), "ids": np.arange(7)},
    "labels": rng.normal(size=(3, 7)).astype(np.float32),
    "mask": rng.random((3, 7)) > 0.5,
  }
  parts = training.split_batch(batch, 3)
  assert [training._train.sample_count(p) for p in parts] == [3, 2, 2]  # numpy.array_split sizes
  for key, axis in (("labels", 1), ("mask", 1)):
    np.testing.assert_array_equal(np.concatenate([p[key] for p in parts], axis=axis), batch[key])
  for key in ("dense", "ids"):
    np.testing.assert_array_equal(np.concatenate([p["x"][key] for p in parts]), batch["x"][key])
  with pytest.raises(ValueError, match="mtjax: split_batch: cannot split a batch of 7 samples into 8"):
    training.split_batch(batch, 8)
  with pytest.raises(ValueError, match="no sample axis 0 of size 7"):
    training.split_batch({"x": np.zeros((6, 2)), "labels": np.zeros((3, 7))}, 2)


@pytest.mark.parametrize("method", ["modo", "sdmgrad"])
def test_train_step_equals_the_method_on_micro_batch_task_grads(method):
  """One step of make_train_step(micro_batches=3) == the method on mtjax.micro_batch_task_grads of the same
  three parts (an independent path: one split axis on a sample-major batch); the logged losses and cosines
  are those of the whole batch."""
  ds, model = _setup()
  tx = optax.chain(getattr(mtjax, method)(num_tasks=3), optax.sgd(0.1))
  batch = ds.batch(np.arange(48))
  state = training.init_state(model, tx, batch["x"], seed=0)
  step = training.make_train_step(model, tx, task_losses=("bce", "bce", "mse"), micro_batches=3, donate=False)
  new_state, metrics = step(state, batch)

  loss_fn = losses_lib.make_loss_fn(model, ("bce", "bce", "mse"), has_aux=False)

  def sample_major(params, b):  # labels sample-major, so that one axis splits every leaf
    return loss_fn(params, {"x": b["x"], "labels": b["labels_t"].T})

  flat = {"x": batch["x"], "labels_t": jnp.asarray(batch["labels"]).T}

  @jax.jit
  def reference(params, opt_state, flat):
    part_losses, grads = mtjax.micro_batch_task_grads(mtjax.task_grads(sample_major, sparse=False), 3)(params, flat)
    updates, _ = tx.update(grads, opt_state, params, task_losses=part_losses)
    whole_losses, whole_grads = mtjax.task_grads(loss_fn, sparse=False)(params, batch)
    return part_losses, optax.apply_updates(params, updates), whole_losses, analysis.track(whole_grads)["cosine"]

  part_losses, expected, whole_losses, cosine = reference(state.params, state.opt_state, flat)
  for a, b in zip(jax.tree.leaves(new_state.params), jax.tree.leaves(expected)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)

  np.testing.assert_allclose(metrics["losses"], whole_losses, rtol=1e-5)
  np.testing.assert_allclose(metrics["losses"], np.mean(part_losses, axis=0), rtol=1e-5)  # equal parts
  np.testing.assert_allclose(metrics["cosine"], cosine, atol=1e-5)
  assert not np.allclose(np.asarray(part_losses[0]), np.asarray(part_losses[1]))  # the parts differ


def test_fit_with_micro_batches_resumes_bit_identically(tmp_path):
  ds, model = _setup(dropout=0.1)  # every part draws its own dropout key from the step's key
  tx = optax.chain(mtjax.modo(num_tasks=3), optax.adam(3e-3))
  kw = dict(steps=4, batch_size=40, seed=1, progress=False, log_every=1, micro_batches=3)  # parts 14/13/13
  full = training.fit(model, tx, ds, **kw)
  weights = np.array([r["weights"] for r in full.history])
  assert weights.shape == (4, 3) and np.all(np.isfinite(weights)) and not np.allclose(weights[-1], 1 / 3)
  out = str(tmp_path / "run")
  training.fit(model, tx, ds, out_dir=out, checkpoint_every=2, stop_after=2, **kw)
  resumed = training.fit(model, tx, ds, out_dir=out, checkpoint_every=2, **kw)
  for a, b in zip(jax.tree.leaves(full.state), jax.tree.leaves(resumed.state)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_fit_without_micro_batches_says_how_to_feed_the_method():
  ds, model = _setup()
  tx = optax.chain(mtjax.modo(num_tasks=3), optax.sgd(0.1))
  with pytest.raises(ValueError, match=r"micro_batches=3"):
    training.fit(model, tx, ds, steps=1, batch_size=30, progress=False)
  with pytest.raises(ValueError, match="batch_size=2 cannot be split into micro_batches=3"):
    training.fit(model, tx, ds, steps=1, batch_size=2, progress=False, micro_batches=3)
  with pytest.raises(ValueError, match="strategy='rep' gives a lazy Jacobian"):
    training.make_train_step(model, tx, strategy="rep", micro_batches=3)


RAW = {
  "data": {"name": "conflicting", "num_samples": 400, "seed": 0},
  "model": {"name": "mmoe", "num_experts": 2, "expert": [8], "tower": [4, 1]},
  "optimizer": {"name": "adam", "learning_rate": 0.003},
  "train": {"steps": 4, "batch_size": 32, "log_every": 1},
}


def test_config_takes_num_batches_from_the_method():
  cfg = lambda method, **train: experiment.from_dict({**RAW, "method": method, "train": {**RAW["train"], **train}})
  assert _config.micro_batches(cfg({"name": "modo"})) == 3  # the paper's three batches (factory default)
  assert _config.micro_batches(cfg({"name": "modo", "num_batches": 2})) == 2  # the code's two
  assert _config.micro_batches(cfg({"name": "sdmgrad", "num_batches": 1})) == 1  # the authors' one-batch code
  assert _config.micro_batches(cfg({"name": "pcgrad"})) == 1
  with pytest.raises(experiment.ConfigError, match="train.strategy='rep' gives a lazy Jacobian"):
    cfg({"name": "modo"}, strategy="rep")
  with pytest.raises(experiment.ConfigError, match="cannot be amortized"):
    cfg({"name": "sdmgrad", "every": 4})
  with pytest.raises(experiment.ConfigError, match="need train.batch_size >= 3, got 2"):
    cfg({"name": "modo"}, batch_size=2)
  cfg({"name": "sdmgrad", "num_batches": 1}, strategy="rep")  # one batch: any strategy


def test_runner_trains_a_micro_batch_method():
  res = experiment.run(experiment.from_dict({**RAW, "method": {"name": "sdmgrad"}}), progress=False, plots=False)
  weights = np.array([r["weights"] for r in res.history])
  assert weights.shape == (4, 3) and np.all(np.isfinite(weights))
  assert all(np.isfinite(v["auc"]) for k, v in res.test.items() if k in ("task_0", "task_1"))


def test_method_specs_of_the_command_line():
  assert experiment.parse_method("modo") == {"name": "modo"}
  assert experiment.parse_method("sdmgrad:num_batches=1:lamda=0.5") == {
    "name": "sdmgrad",
    "num_batches": 1,
    "lamda": 0.5,
    "label": "sdmgrad:num_batches=1:lamda=0.5",
  }
  assert experiment.parse_method("mgda:normalization=loss+")["normalization"] == "loss+"  # a bare word
  for bad in (":x=1", "modo:gamma", "modo:=1"):
    with pytest.raises(experiment.ConfigError, match="method spec"):
      experiment.parse_method(bad)
